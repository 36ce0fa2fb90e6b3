"""Tests for kernels_gpu.py, part 2: Spark attention's Triton kernels against spark.py's references.

Where this runs: without CUDA (CI, laptops) tests/conftest.py sets TRITON_INTERPRET=1 and the
kernels run in Triton's interpreter on CPU tensors, at small awkward shapes (T = 1, 5, 37, 70;
hd = 8, 16, 24 padded to 16 and 32, and the longest heads, 128 in float32 and 256 in bf16; r = 1
and hd - 1; grouped-query H 4 / Hkv 2). On a GPU machine the same tests run compiled kernels on
CUDA tensors, and the `gpu` test adds the training preset.

References: spark.spark_attention (torch; keeps every score tied with the kt-th, as the kernels
do) in float64 and float32, and spark.spark_attention_np (float64; keeps exactly kt, so it is used
only where no score ties). Gradients: torch autograd through spark.spark_attention in float64.

Tolerances
- float32 inputs: the kernels compute in float32 (scores, exp, softplus, tile sums of up to 70
  keys): a few float32 ulps of O(1) values, ~1e-6; we allow atol = rtol = 2e-5 for outputs and
  gradients. Kept counts are exact: random float32 scores have no near-ties at these sizes, and
  tied scores (tests below) are exact integers or zeros in every summation order.
- bfloat16 inputs: compared with float64 on the same (bf16) values, so only the kernel's own
  roundings count: the weights e g are rounded to bf16 before the product with V, and out is
  stored in bf16. Each is one bf16 rounding, 2^-9 relative on a GPU (round to nearest) and up to
  2^-8 in Triton's interpreter (3.9 truncates float32 to bf16). The first moves out_i by at most
  2^-8 sum_j p_ij g_ij |v_j| = 2^-8 spark_attention(q, k, |v|)_i, the second by 2^-8 |out_i|:
  atol = 2^-7 max spark_attention(q, k, |v|), rtol = 2^-7 (twice the bounds). Gradients go
  through bf16 products of the same kind (w, ds, dz cast for the tensor cores): we allow 2^-5 of
  the gradient's largest entry.
"""

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, assert_close, scores_of
import kernels_gpu
import spark
from kernels_gpu import spark_attention_gpu

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the CPU runs the kernels in Triton's interpreter
needs_triton = pytest.mark.skipif(kernels_gpu.triton is None, reason="needs triton (none on this platform)")
pytestmark = needs_triton

# (B, H, Hkv, T, hd, r, k_top): T = 1 and 5 (one tile), 37 (three 16-row blocks, the last
# partial), 70 (five, widths 16 .. 128); k_top = 1, 3, 16 and >= T (every visible key kept)
SHAPES = [
    (2, 4, 2, 1, 8, 4, 1),
    (2, 2, 2, 5, 8, 1, 3),  # r = 1
    (2, 4, 2, 37, 16, 15, 16),  # r = hd - 1, grouped-query
    (1, 4, 1, 37, 24, 12, 40),  # k_top >= T; hd 24 pads hd - r = 12 to 16 and hd to 32
    (1, 2, 2, 70, 24, 23, 3),  # r = hd - 1 = 23 pads to 32, hd - r = 1 to 16
    (2, 2, 1, 70, 16, 8, 1),  # k_top = 1
    (1, 2, 1, 40, 128, 64, 9),  # 512-byte rows (the longest): the backward's 32 x 32 tiles
]


def make_qkv(B, H, Hkv, T, hd, dtype=torch.float32):
    """Random q [B, H, T, hd], k, v [B, Hkv, T, hd] on DEVICE in `dtype` (drawn in float64 and
    rounded, so every dtype sees the same values up to its own rounding)."""
    return tuple(torch.randn(B, n, T, hd, dtype=torch.float64).to(dtype).to(DEVICE) for n in (H, Hkv, Hkv))


def torch_ref(q, k, v, k_top, r, dtype=torch.float64):
    """spark.spark_attention on the CPU in `dtype`: (out, kept). The inputs' values are taken as
    they are (a bf16 q becomes the float64 number it holds)."""
    return spark.spark_attention(*(x.detach().cpu().to(dtype) for x in (q, k, v)), k_top, r, return_kept=True)


def grads(fn, q, k, v, dout):
    """(dq, dk, dv) of fn(q, k, v) against the upstream gradient dout (fn returns out).
    The inputs are copied into fresh leaves, so one set of tensors serves both implementations."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    fn(*leaves).backward(dout)
    return [x.grad for x in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}hd{}r{}k{}".format(*s))
def test_forward_matches_references(shape):
    """out and the kept count at every shape of SHAPES, float32 inputs, against the three references.
    Random scores: no two within float32 rounding of each other, so the NumPy reference (exactly kt
    per row) and the torch path (ties kept) agree, and so must the kernels, pair for pair."""
    B, H, Hkv, T, hd, r, k_top = shape
    q, k, v = make_qkv(B, H, Hkv, T, hd)
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    # the API: out like q, kept a 0-d int64 tensor (on the device: no host synchronisation)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert kept.shape == () and kept.dtype == torch.int64
    # three references: torch in float64 and float32 (ties kept, as ours), NumPy loops in float64
    ref64, kept64 = torch_ref(q, k, v, k_top, r)
    ref32, kept32 = torch_ref(q, k, v, k_top, r, torch.float32)
    ref_np = spark.spark_attention_np(*(x.cpu().double().numpy() for x in (q, k, v)), k_top, r)
    assert_close("out vs torch float64", out, ref64, 2e-5, 2e-5)
    assert_close("out vs torch float32", out, ref32, 2e-5, 2e-5)
    assert_close("out vs numpy float64", out, ref_np, 2e-5, 2e-5)
    assert_close("kept vs torch float64", kept, kept64, 0, 0)
    assert_close("kept vs torch float32", kept, kept32, 0, 0)


@pytest.mark.parametrize("shape", SHAPES[1:5] + SHAPES[6:], ids=lambda s: "B{}H{}Hkv{}T{}hd{}r{}k{}".format(*s))
def test_gradients_match_torch_float64(shape):
    """dq, dk, dv of the two backward kernels, float32 inputs, against float64 autograd. The
    grouped-query shapes check that dk and dv sum over the G query heads of their KV head; the
    long heads, that the backward's tiles shrink to fit the GPU's shared memory."""
    B, H, Hkv, T, hd, r, k_top = shape
    q, k, v = make_qkv(B, H, Hkv, T, hd)
    dout = torch.randn(B, H, T, hd, dtype=torch.float64)  # upstream gradient, the same for both
    # ours: float32 kernels; reference: autograd through the torch path in float64 (its keep is
    # computed from s.detach(), so the threshold is a constant there too)
    got = grads(lambda *x: spark_attention_gpu(*x, k_top, r)[0], q, k, v, dout.to(DEVICE, torch.float32))
    ref = grads(lambda *x: spark.spark_attention(*x, k_top, r), *(x.cpu().double() for x in (q, k, v)), dout)
    for name, g, gr in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float32  # gradients come back in the inputs' dtype
        assert_close(name, g, gr, 2e-5, 2e-5)


@pytest.mark.parametrize("k_top", [3, 16])
def test_ties_are_all_kept(k_top):
    """Integer q and k (entries -2 .. 2) with r = 4, hd = 8: both scales are 1/2, so every score is
    exact in any summation order and many tie, at the threshold too. The kernels keep every key
    tied with the kt-th, as the torch path does (so their counts exceed B H sum min(kt, i + 1))."""
    B, H, Hkv, T, hd, r = 2, 4, 2, 37, 8, 4
    q, k = (torch.randint(-2, 3, (B, n, T, hd)).float().to(DEVICE) for n in (H, Hkv))
    v = torch.randn(B, Hkv, T, hd).to(DEVICE)
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    ref, kept_ref = torch_ref(q, k, v, k_top, r)  # not NumPy: it keeps exactly kt of a tie
    assert_close("out", out, ref, 2e-5, 2e-5)
    assert_close("kept", kept, kept_ref, 0, 0)
    # without ties exactly sum_i min(kt, i + 1) keys per head would be kept: more means ties were
    # met at thresholds, so the test did test them
    assert int(kept) > B * H * sum(min(k_top, i + 1) for i in range(T))
    # the gradient sees the same kept set (the threshold is a constant for it)
    dout = torch.randn(B, H, T, hd, dtype=torch.float64)
    got = grads(lambda *x: spark_attention_gpu(*x, k_top, r)[0], q, k, v, dout.to(DEVICE, torch.float32))
    want = grads(lambda *x: spark.spark_attention(*x, k_top, r), *(x.cpu().double() for x in (q, k, v)), dout)
    for name, g, gr in zip(("dq", "dk", "dv"), got, want):
        assert_close(f"{name} (ties)", g, gr, 2e-5, 2e-5)


def test_all_scores_tied_keeps_every_visible_key():
    """q[:r] = 0: every score is 0, the kt-th largest is 0, and all visible keys are kept."""
    B, H, Hkv, T, hd, r, k_top = 2, 2, 2, 37, 16, 8, 5
    q, k, v = make_qkv(B, H, Hkv, T, hd)
    q[..., :r] = 0.0
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    ref, _ = torch_ref(q, k, v, k_top, r)
    assert_close("out", out, ref, 2e-5, 2e-5)
    # every visible pair: query i sees i + 1 keys, T (T + 1) / 2 pairs per head
    assert int(kept) == B * H * T * (T + 1) // 2


# (future keys' scores, above the row's max, overflow exp(s - m) in lanes tl.where then drops;
# the interpreter's NumPy warns about them)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("kind", ["sinks", "powers of two", "negative"])
def test_threshold_any_score_shape(kind):
    """The threshold is exact whatever the scores look like (the kept counts are compared
    exactly: with a few huge scores the outputs alone would not tell, every other key weighing
    ~0 whether kept or not), on shapes where a statistical guess of the kt-th score is far off.
    r = 1 and q[:1] = 1 make row i's scores the first entries of keys 0 .. i: four huge "sink"
    keys first, magnitudes over 80 powers of two, or all negative (distinct values, so the kept
    counts are exact too)."""
    B, H, Hkv, T, hd, r, k_top = 1, 2, 1, 70, 8, 1, 16
    q, k, v = make_qkv(B, H, Hkv, T, hd, torch.float64)
    first = scores_of(kind, T, torch.Generator().manual_seed(4))  # (conftest: why each shape is hard)
    k[..., 0] = first.float().double().to(DEVICE)  # exact in float32
    q[..., 0] = 1.0
    q, k, v = q.float(), k.float(), v.float()
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    ref, kept_ref = torch_ref(q, k, v, k_top, r)
    assert_close("out", out, ref, 2e-5, 2e-5)
    assert_close("kept", kept, kept_ref, 0, 0)


@pytest.mark.parametrize("T", [37, 70])
def test_threshold_from_recomputed_tiles(monkeypatch, T):
    """Rows longer than MAX_KEYS_IN_REGISTERS recompute their score tiles for every bit: forced
    here with a limit of 16 keys (tiles of 16 keys, up to 5 per row)."""
    monkeypatch.setattr(kernels_gpu, "MAX_KEYS_IN_REGISTERS", 16)
    # blocks 1 .. (rows 16 and on) see more than 16 keys: one launch that re-reads tiles for
    # each of the up to 32 bits, and for m, the kept minimum and L
    B, H, Hkv, hd, r, k_top = 2, 4, 2, 16, 8, 7
    q, k, v = make_qkv(B, H, Hkv, T, hd)
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    ref, kept_ref = torch_ref(q, k, v, k_top, r)
    assert_close("out", out, ref, 2e-5, 2e-5)
    assert_close("kept", kept, kept_ref, 0, 0)


def test_threshold_row_arrays():
    """Pass 1's per-row outputs: m is the max visible score, thr lies in (the (kt+1)-th, the kt-th
    largest] (-inf where every visible key is kept), kept = the number of scores >= thr."""
    B, H, Hkv, T, hd, r, k_top = 1, 2, 1, 37, 16, 4, 9
    q, k, v = make_qkv(B, H, Hkv, T, hd)
    _, m, _, thr, kept = kernels_gpu._spark_attn_fwd(q, k, v, k_top, r)
    # the scores in float64, future keys -inf; k broadcasts over the H query heads (Hkv = 1)
    s = (q[..., :r].double().cpu() @ k[..., :r].double().cpu().transpose(-1, -2)) / r**0.5  # [B, H, T, T]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -np.inf)
    top = s.sort(dim=-1, descending=True).values  # [B, H, T, T], each row's scores, largest first
    assert_close("m", m, top[..., 0], 2e-6, 2e-6)
    i = torch.arange(T)
    sel = i >= k_top  # rows that drop keys
    assert torch.isinf(thr[..., ~sel].cpu()).all() and (thr[..., ~sel] < 0).all()
    # kth: the kt-th largest score, nxt: the next one; the float32 thr must lie in (nxt, kth]
    # (1e-6: float32 scores against float64 ones; random scores are further apart than that)
    kth, nxt = top[..., sel, k_top - 1], top[..., sel, k_top]
    t = thr[..., sel].cpu().double()
    assert ((t <= kth + 1e-6) & (t > nxt + 1e-6)).all(), "thr must separate the kt-th score from the next"
    visible_kept = (s >= thr.cpu().double()[..., None]) & (s > -np.inf)  # thr = -inf keeps the visible keys
    assert_close("kept per row", kept, visible_kept.sum(-1).int(), 0, 0)


def test_strided_views_are_read_in_place():
    """q, k, v as projections give them: [B, T, heads, hd].transpose(1, 2) (not contiguous).
    The kernels take each tensor's batch, head and position strides, so nothing is copied; the
    gradients come back contiguous, [B, heads, T, hd], which autograd accepts for any view."""
    B, H, Hkv, T, hd, r, k_top = 2, 4, 2, 37, 16, 8, 5
    q, k, v = (torch.randn(B, T, n, hd).to(DEVICE).transpose(1, 2) for n in (H, Hkv, Hkv))
    assert not q.is_contiguous()  # position stride n hd, head stride hd: the kernels take both
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    ref, kept_ref = torch_ref(q, k, v, k_top, r)
    assert_close("out", out, ref, 2e-5, 2e-5)
    assert_close("kept", kept, kept_ref, 0, 0)
    dout = torch.randn(B, H, T, hd, dtype=torch.float64)
    got = grads(lambda *x: spark_attention_gpu(*x, k_top, r)[0], q, k, v, dout.to(DEVICE, torch.float32))
    want = grads(lambda *x: spark.spark_attention(*x, k_top, r), *(x.cpu().double() for x in (q, k, v)), dout)
    for name, g, gr in zip(("dq", "dk", "dv"), got, want):
        assert_close(f"{name} (views)", g, gr, 2e-5, 2e-5)


@pytest.mark.parametrize("dtype,hd", [(torch.bfloat16, 24), (torch.float16, 24), (torch.bfloat16, 256)])
def test_half_precision(dtype, hd):
    """bf16 / fp16 inputs against float64 on the same values (tolerances: module docstring);
    hd = 256 in bf16 takes the backward's 32 x 32 tiles."""
    B, H, Hkv, T, r, k_top = 2, 4, 2, 37, hd // 2, 9
    q, k, v = make_qkv(B, H, Hkv, T, hd, dtype)
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    assert out.dtype == dtype
    # the references get the same half-precision values, widened to float64: scores of bf16 / fp16
    # inputs are exact products summed in float32 in the kernels, so the kept sets agree exactly
    ref, kept_ref = torch_ref(q, k, v, k_top, r)
    bound, _ = torch_ref(q, k, v.abs(), k_top, r)  # sum_j p_ij g_ij |v_j|
    assert_close("out", out, ref, 2.0**-7 * float(bound.max()), 2.0**-7)
    assert_close("kept", kept, kept_ref, 0, 0)
    dout = torch.randn(B, H, T, hd, dtype=torch.float64)
    got = grads(lambda *x: spark_attention_gpu(*x, k_top, r)[0], q, k, v, dout.to(DEVICE, dtype))
    want = grads(lambda *x: spark.spark_attention(*x, k_top, r), *(x.cpu().double() for x in (q, k, v)), dout)
    for name, g, gr in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        assert_close(name, g, gr, 2.0**-5 * float(gr.abs().max()), 0)


def test_bad_arguments(monkeypatch):
    """Wrong dtypes, shapes, k_top, r and devices: a clear error before any kernel runs."""
    q, k, v = make_qkv(1, 2, 1, 5, 8)
    # each error names the argument and says what was expected
    with pytest.raises(TypeError, match="q is float64"):
        spark_attention_gpu(q.double(), k, v, 3, 4)
    with pytest.raises(TypeError, match="share dtype"):
        spark_attention_gpu(q, k.half(), v, 3, 4)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        spark_attention_gpu(q, k.cpu().numpy(), v, 3, 4)
    with pytest.raises(ValueError, match="attention expects q"):
        spark_attention_gpu(q[0], k, v, 3, 4)
    with pytest.raises(ValueError, match="divisible by Hkv"):
        spark_attention_gpu(q[:, :1], k.expand(1, 2, 5, 8), v.expand(1, 2, 5, 8), 3, 4)
    with pytest.raises(ValueError, match="S = T = 5"):  # a KV cache (S > T) is the torch path's job
        spark_attention_gpu(q, torch.cat([k, k], 2), torch.cat([v, v], 2), 3, 4)
    with pytest.raises(ValueError, match="k_top must be in"):
        spark_attention_gpu(q, k, v, 0, 4)
    with pytest.raises(TypeError, match="k_top must be an int"):
        spark_attention_gpu(q, k, v, 2.0, 4)
    for r in (0, 8):
        with pytest.raises(ValueError, match=r"r must be in \[1, 7\]"):
            spark_attention_gpu(q, k, v, 3, r)
    with pytest.raises(ValueError, match="hd >= 2"):
        spark_attention_gpu(q[..., :1], k[..., :1], v[..., :1], 3, 1)
    with pytest.raises(ValueError, match=r"hd = 129 in torch.float32: .*hd <= 128 in float32"):
        spark_attention_gpu(*make_qkv(1, 2, 1, 5, 129), 3, 4)
    if not HAS_CUDA:  # a CPU tensor is accepted only by the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="q must be on a CUDA device"):
            spark_attention_gpu(q, k, v, 3, 4)


@pytest.mark.gpu
def test_training_preset_against_torch():
    """The training preset (B 2, H 12, T 1024, hd 64, r 32, k_top 256, bf16) against the torch path
    in float32 on the same bf16 values. Scores within float32 rounding of a threshold may be kept
    by one side only (torch scales q before the dot, we scale after): the counts may differ by a
    few in a million and the rows concerned by about one small weight, inside the bf16 tolerance."""
    B, H, T, hd, r, k_top = 2, 12, 1024, 64, 32, 256
    q, k, v = make_qkv(B, H, H, T, hd, torch.bfloat16)
    out, kept = spark_attention_gpu(q, k, v, k_top, r)
    # the reference in float32 on the GPU (float64 at this size would be slow), bound as in test_half_precision
    ref, kept_ref = spark.spark_attention(q.float(), k.float(), v.float(), k_top, r, return_kept=True)
    bound = spark.spark_attention(q.float(), k.float(), v.float().abs(), k_top, r)
    assert_close("out", out, ref, 2.0**-7 * float(bound.max()), 2.0**-7)
    assert abs(int(kept) - int(kept_ref)) <= 1e-5 * int(kept_ref), (int(kept), int(kept_ref))
    # gradients: autograd through the torch path in float32, 2^-5 of the largest entry as above
    dout = torch.randn_like(q)
    got = grads(lambda *x: spark_attention_gpu(*x, k_top, r)[0], q, k, v, dout)
    want = grads(lambda *x: spark.spark_attention(*x, k_top, r), q.float(), k.float(), v.float(), dout.float())
    for name, g, gr in zip(("dq", "dk", "dv"), got, want):
        assert_close(name, g, gr, 2.0**-5 * float(gr.abs().max()), 0)
