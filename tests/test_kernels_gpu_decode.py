"""Tests for the Triton decode kernels (kernels_gpu.py, section 7) against spark.py's NumPy references.

Where this runs: without CUDA (CI, laptops) tests/conftest.py sets TRITON_INTERPRET=1 and the
kernels run in Triton's interpreter on CPU tensors, at small awkward shapes (f = 300 in 3 to
10 slices of neurons; caches of 1 to 100 tokens in splits of 16; r = 1 and
hd - 1 / d - 1; k = 1 and k = f; k_top = 1, below and above n; grouped-query heads; batch > 1;
1 to 8 tokens and a call of 10 split into launches). The launch settings are lowered (monkeypatch)
so that several splits, chunks and launches happen at these sizes. The `gpu` tests add CUDA
graph capture (no host synchronisation) and generate_gpu's graph on a GPU.

References (float64, on the same values the kernels get): spark.spark_ffn_np,
spark.attention_np, spark.spark_attention_np (exact top-k; with ties it keeps an arbitrary kt of
them, so the tie tests give tied tokens equal keys and values, where every choice gives the same
output but keeping more or fewer than kt does not), and spark.GPT.generate for generate_gpu.

Tolerances
- float32: every sum is float32 over at most a few hundred terms of O(1) products (scores,
  softmax, gate; FFN predictor, dot products, the weighted row sums), a few float32 ulps of the
  largest partial sum, ~1e-6 relative. The FFN's threshold is float32 too: a neuron within a
  float32 rounding of theta may survive on one side only, and then contributes gelu(p - theta) u
  V with p - theta ~ 1e-6, as small. We allow atol = 1e-5 max|ref| and rtol = 1e-5.
- bfloat16 (FFN): products of bf16 values are exact in float32, so only two roundings are the
  kernel's own: a = gelu(t) u rounded to bf16 before the product with V, and y stored in bf16;
  each is 2^-9 relative on a GPU and up to 2^-8 in the interpreter (triton 3.9 truncates). The
  first moves y by at most 2^-8 sum_j |a_j| |V_j|, the second by 2^-8 |y|: atol = 2^-7 max(|a| |V|),
  rtol = 2^-7 (twice the bounds).
"""


import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, SEED, assert_close, run_in_cuda_graph, scores_of
import kernels_gpu as dg
import kernels_gpu
import spark
from topk import statistical_topk_np

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the CPU runs the kernels in Triton's interpreter
pytestmark = pytest.mark.skipif(kernels_gpu.triton is None, reason="needs triton (none on this platform)")


GPU_LAUNCHES = {name: getattr(dg, name) for name in ("MIN_SPLIT", "ATTN_BN", "TARGET_PROGRAMS")}  # before the fixture


@pytest.fixture(autouse=True)
def _small_launches(monkeypatch):
    """Several programs at the test sizes: splits of 16 cache tokens, gather chunks of 16 kept
    tokens (kernels_gpu's tests do the same)."""
    monkeypatch.setattr(dg, "MIN_SPLIT", 16)
    monkeypatch.setattr(dg, "ATTN_BN", 16)
    monkeypatch.setattr(dg, "TARGET_PROGRAMS", 8)


def rand(*shape, dtype=torch.float32, std=1.0):
    """Drawn in float64 and rounded: the reference gets exactly the kernel's values."""
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype).to(DEVICE)


def np64(t):
    """A tensor's values as a float64 NumPy array (exact for float32 and bf16), for the references."""
    return t.detach().cpu().double().numpy()


# ------------------------------------------------------------------------------------------
# Spark FFN decode
# ------------------------------------------------------------------------------------------


def ffn_case(M, d, f, r, dtype=torch.float32):
    """x [M, d] and Spark FFN weights (K1, K2, V) of unit-variance outputs, in dtype on DEVICE.
    Random p has no two entries within float32 rounding of each other at these sizes, so the
    survivors are the reference's (up to the soft-threshold flips of the module docstring)."""
    return rand(M, d, dtype=dtype), rand(r, f, dtype=dtype, std=r ** -0.5), rand(d - r, f, dtype=dtype,
                                                                                  std=(d - r) ** -0.5), rand(f, d, dtype=dtype, std=f ** -0.5)


# (M, d, f, r, k): f = 300 = 4 slices of 64 + 44 for one token, 2 of 128 + 44 for several (with
# SMALL_FFN_TILES 9 of 32 + 12 either way); r = 1 and d - 1; k = 1, 8 % and f; f < r.
# d = 33 and 40 are not multiples of 16 (the chunks of x[r:] and of V's rows are masked, and a
# whole row is a masked power of two); M = 3, 5 and 8 pad to 16 rows in tl.dot; k = 24 of 300 is
# the paper's 8 %.
FFN_CASES = [
    (1, 40, 300, 13, 24),
    (2, 40, 300, 1, 24),  # r = 1
    (3, 33, 300, 32, 1),  # r = d - 1 (x[r:] is one value), k = 1
    (8, 40, 300, 20, 24),  # 8 tokens: their union
    (5, 17, 70, 9, 70),  # k = f: every neuron, unshifted
    (4, 40, 20, 32, 2),  # f < r: R is [f, r], a trapezoid
    (1, 17, 70, 9, 70),  # one token, every neuron: several steps of E
    (1, 33, 20, 32, 2),  # one token: f < r and d - r = 1
    (1, 40, 300, 1, 24),  # one token: r = 1
]


# tiles far smaller than the GPU's, so that these shapes have several of each: moments programs
# (r = 13 -> 4 of 4 rows of R) and chunks of R's rows, chunks of p's r, slices, steps of E listed
# rows, reduce programs (d = 40 -> 3 of 16), chunks of x[r:] and of V's rows
SMALL_FFN_TILES = dict(FFN_BI=4, FFN_BJ=8, FFN_BR=16, FFN_FS1=32, FFN_E=4, FFN_FS=32, FFN_BK=16, FFN_RB=16)


@pytest.mark.parametrize("f", [300, 20])
def test_spark_ffn_moments_give_mean_and_variance_of_p(f):
    """prepare_spark_ffn_gpu's moments: x1 . mu is the mean of p = x1 K1 over the f neurons and
    |R x1|^2 its (population) variance, for any x1 (float64 from float32 moments: 1e-6); f < r too."""
    r = 32
    _, K1, K2, V = ffn_case(1, 40, f, r)
    mu, Rm, _ = dg.prepare_spark_ffn_gpu(K1, K2, V)[0].spark_moments
    assert Rm.shape == (min(f, r), r) and torch.equal(Rm, Rm.triu())
    x1 = np.random.default_rng(0).normal(size=(5, r))
    p = x1 @ np64(K1)
    assert_close("mean of p", x1 @ np64(mu), p.mean(axis=1), 1e-6, 1e-6)
    assert_close("variance of p", ((x1 @ np64(Rm).T) ** 2).sum(axis=1), p.var(axis=1), 1e-6, 1e-6)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: "M{}d{}f{}r{}k{}".format(*c))
def test_spark_ffn_decode_matches_reference(case, tiles, monkeypatch):
    """y of every case against spark_ffn_np on float64 copies of the same float32 values; the
    prepared layout (neuron-major: K1 a view of a contiguous K1^T, K2t contiguous) and y's shape,
    dtype and device."""
    for name, value in (SMALL_FFN_TILES.items() if tiles == "small" else ()):
        monkeypatch.setattr(dg, name, value)
    M, d, f, r, k = case
    x, K1, K2, V = ffn_case(M, d, f, r)
    K1p, K2t, Vp = dg.prepare_spark_ffn_gpu(K1, K2, V)
    assert K1p.shape == (r, f) and K1p.t().is_contiguous() and K2t.shape == (f, d - r) and K2t.is_contiguous()
    y = dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp, k, r)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    ref = spark.spark_ffn_np(np64(x), np64(K1), np64(K2), np64(V), k, r)
    assert_close("y", y, ref, 1e-5 * np.abs(ref).max(), 1e-5)


def test_spark_ffn_decode_reads_k1_through_its_strides():
    """The kernels read K1 through its strides: a row-major K1 [r, f] carrying the prepared
    moments gives the prepared (neuron-major) K1's result, one token and several."""
    d, f, r, k = 40, 96, 12, 9
    x, K1, K2, V = ffn_case(3, d, f, r)
    K1p, K2t, Vp = dg.prepare_spark_ffn_gpu(K1, K2, V)
    # The same values with row-major strides (r f elements, f apart between input dims): a
    # prepared K1 is neuron-major only for speed (each program's slice of neurons is then one
    # contiguous block), so any strides must give the same y. Its moments are the prepared
    # ones, with the copy's own version counter.
    K1r = K1p.contiguous()  # [r, f] row-major
    K1r.spark_moments = K1p.spark_moments[:2] + (K1r._version,)
    assert K1r.is_contiguous() and not K1p.is_contiguous()
    # (the same products summed in the same order: equal bits in the interpreter; 1e-6 leaves
    # room for a GPU compiler that orders a tile's float32 products differently per layout)
    for xs in (x[:1], x):
        assert_close("row-major K1", dg.spark_ffn_decode_gpu(xs, K1r, K2t, Vp, k, r),
                     dg.spark_ffn_decode_gpu(xs, K1p, K2t, Vp, k, r), 1e-6, 1e-6)


def test_spark_ffn_decode_bf16_and_many_tokens(monkeypatch):
    """bf16 (tolerance in the module docstring); 10 tokens of shape [2, 5, d] in launches of 4, 4, 2."""
    monkeypatch.setattr(dg, "MAX_TOKENS", 4)
    d, f, r, k = 40, 300, 16, 24
    x, K1, K2, V = ffn_case(10, d, f, r, torch.bfloat16)
    x = x.view(2, 5, d)
    y = dg.spark_ffn_decode_gpu(x, *dg.prepare_spark_ffn_gpu(K1, K2, V), k, r)
    assert y.shape == (2, 5, d) and y.dtype == torch.bfloat16
    x64, K1_, K2_, V_ = np64(x), np64(K1), np64(K2), np64(V)
    ref = spark.spark_ffn_np(x64, K1_, K2_, V_, k, r)
    a = spark.gelu_np(statistical_topk_np(x64[..., :r] @ K1_, k)) * (x64[..., r:] @ K2_)  # [..., f]
    assert_close("y bf16", y, ref, 2.0**-7 * (np.abs(a) @ np.abs(V_)).max(), 2.0**-7)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
def test_spark_ffn_decode_edge_tokens():
    """A NaN token gets a NaN row (the reference's), the others are untouched; a token whose
    predictor scores are all equal (x[:r] = 0) has no survivor: y = 0 (topk's constant-row rule)."""
    d, f, r, k = 24, 150, 8, 12
    x, K1, K2, V = ffn_case(3, d, f, r)
    x[0, 3] = float("nan")  # in x[:r]: theta is NaN
    x[1, :r] = 0.0
    x2 = x.clone()
    x2[2, r + 1] = float("inf")  # in x[r:] only
    w = dg.prepare_spark_ffn_gpu(K1, K2, V)
    y, y2 = dg.spark_ffn_decode_gpu(x, *w, k, r), dg.spark_ffn_decode_gpu(x2, *w, k, r)
    assert torch.isnan(y[0]).all() and torch.isnan(y2[2]).all()
    assert_close("y of a constant row", y[1], np.zeros(d), 0.0, 0.0)
    # the same tokens one at a time (one token takes its own path through the kernel)
    assert torch.isnan(dg.spark_ffn_decode_gpu(x[0], *w, k, r)).all()
    assert_close("one constant token", dg.spark_ffn_decode_gpu(x[1], *w, k, r), np.zeros(d), 0.0, 0.0)
    assert torch.isnan(dg.spark_ffn_decode_gpu(x2[2], *w, k, r)).all()
    ref = spark.spark_ffn_np(np64(x[2:]), np64(K1), np64(K2), np64(V), k, r)
    assert_close("y of the finite token", y[2:], ref, 1e-5 * np.abs(ref).max(), 1e-5)


def test_spark_ffn_decode_bad_input(monkeypatch):
    """Each bad argument gets an error naming it: the un-prepared K2 (wrong shape) and its strided
    transpose (right shape, not a prepared layout), mixed dtypes, float64, k and r out of range,
    and a CPU tensor when the interpreter is off."""
    d, f, r, k = 16, 50, 4, 5
    x, K1, K2, V = ffn_case(1, d, f, r)
    K1p, K2t, Vp = dg.prepare_spark_ffn_gpu(K1, K2, V)
    with pytest.raises(ValueError, match="K2t"):  # K2 as stored by the module, not prepared
        dg.spark_ffn_decode_gpu(x, K1p, K2, Vp, k, r)
    with pytest.raises(ValueError, match="K2t must have a contiguous last axis"):  # K2.t(): a strided view
        dg.spark_ffn_decode_gpu(x, K1p, K2.t(), Vp, k, r)
    with pytest.raises(TypeError, match="V must have x's dtype"):
        dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp.to(torch.bfloat16), k, r)
    with pytest.raises(TypeError, match="K1 must have x's dtype"):  # (K1 is checked apart: any strides)
        dg.spark_ffn_decode_gpu(x, K1p.to(torch.bfloat16), K2t, Vp, k, r)
    with pytest.raises(TypeError, match="x is float64"):
        dg.spark_ffn_decode_gpu(x.double(), K1p, K2t, Vp, k, r)
    with pytest.raises(ValueError, match="k must satisfy"):
        dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp, f + 1, r)
    with pytest.raises(ValueError, match="r must be in"):
        dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp, k, d)
    with pytest.raises(ValueError, match="prepare_spark_ffn_gpu: expected"):
        dg.prepare_spark_ffn_gpu(K1, K2.t(), V)
    # The threshold comes from moments of p that prepare_spark_ffn_gpu computes from K1 and
    # attaches to it: a K1 without them, or changed since, would give a wrong theta silently.
    # So K1 as stored by the module, a copy of the prepared one, a prepared K1 modified in
    # place (its version counter moved) and a K1 whose moments cannot be computed are refused.
    with pytest.raises(ValueError, match="K1 carries no moments"):  # K1 as stored by the module
        dg.spark_ffn_decode_gpu(x, K1, K2t, Vp, k, r)
    K1c = K1p.clone()  # (a clone has no moments either)
    with pytest.raises(ValueError, match="K1 carries no moments"):
        dg.spark_ffn_decode_gpu(x, K1c, K2t, Vp, k, r)
    K1p.mul_(2.0)  # changed in place after its moments were computed
    with pytest.raises(ValueError, match="K1 was changed in place"):
        dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp, k, r)
    # moments that do not fit K1 (attached by hand) are refused, not read out of bounds
    K1w = K1p.clone()
    K1w.spark_moments = (torch.zeros(3), torch.zeros(3, 3), K1w._version)
    with pytest.raises(ValueError, match=r"K1.spark_moments must be \(mu \[r\]"):
        dg.spark_ffn_decode_gpu(x, K1w, K2t, Vp, k, r)
    K1[0, 0] = float("nan")
    with pytest.raises(ValueError, match="K1 holds NaN"):
        dg.prepare_spark_ffn_gpu(K1, K2, V)
    if not HAS_CUDA:  # a CPU tensor outside the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="x must be on a CUDA device"):
            dg.spark_ffn_decode_gpu(x, K1p, K2t, Vp, k, r)


# ------------------------------------------------------------------------------------------
# Attention decode
#
# With the settings of _small_launches a cache of n tokens is split into chunks of 16 (at most
# 8 programs' worth), so n = 37 and 100 take 3 and 7 splits, the last one partial, and the
# merge adds partials of which some may be empty (lengths below the split's first token).
# ------------------------------------------------------------------------------------------


def kv_case(B, H, Hkv, n, hd, dtype=torch.float32):
    """q [B, H, 1, hd] and a cache k, v [B, Hkv, n, hd] of standard normal values on DEVICE. The
    scores of random float32 keys are far apart compared with float32 rounding (n <= 100), so
    the kernels' top-k is the reference's token for token."""
    return rand(B, H, 1, hd, dtype=dtype), rand(B, Hkv, n, hd, dtype=dtype), rand(B, Hkv, n, hd, dtype=dtype)


# (B, H, Hkv, n, hd): n = 1; 37 (3 splits, the last partial); 100 (7 splits); hd 24 pads to 32
DENSE_CASES = [(1, 2, 2, 1, 16), (2, 4, 2, 37, 24), (1, 8, 2, 100, 16)]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "B{}H{}Hkv{}n{}hd{}".format(*c))
def test_attention_decode_matches_reference(case):
    """Dense flash-decoding against attention_np (T = 1): one token, partial splits, padded hd."""
    q, k, v = kv_case(*case)
    out = dg.attention_decode_gpu(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close("out", out, spark.attention_np(np64(q), np64(k), np64(v)), 1e-5, 1e-5)
    out3 = dg.attention_decode_gpu(q[:, :, 0], k, v)  # q [B, H, hd] works too
    assert out3.shape == q[:, :, 0].shape


# (B, H, Hkv, n, hd, r, k_top): n below and above k_top, r = 1 and hd - 1, k_top = 1, grouped-query
SPARK_CASES = [
    (1, 2, 2, 1, 16, 8, 4),  # one token
    (2, 4, 2, 37, 24, 1, 10),  # r = 1, grouped-query, batch 2
    (1, 4, 1, 37, 16, 15, 40),  # r = hd - 1, n < k_top: all kept
    (2, 2, 1, 100, 16, 5, 1),  # k_top = 1
    (1, 4, 2, 100, 24, 12, 33),  # 3 gather chunks of 16, the last of 1
]


@pytest.mark.parametrize("gather", [False, True], ids=["select attends", "gather kernel"])
@pytest.mark.parametrize("case", SPARK_CASES, ids=lambda c: "B{}H{}Hkv{}n{}hd{}r{}k{}".format(*c))
def test_spark_attention_decode_matches_reference(case, gather, monkeypatch):
    """Spark attention against spark_attention_np: n below and above k_top, the two extreme r,
    k_top = 1, grouped-query heads, batch 2, gather chunks of which the last is partial; the
    kept tokens attended by the select's own programs (few query heads, as here) or by the
    gather kernel after it (many: ATTEND_PROGRAMS set to 0)."""
    if gather:
        monkeypatch.setattr(dg, "ATTEND_PROGRAMS", 0)
    B, H, Hkv, n, hd, r, k_top = case
    q, k, v = kv_case(B, H, Hkv, n, hd)
    k1, k2, vv = dg.prepare_spark_kv_gpu(k, v, r)
    out = dg.spark_attention_decode_gpu(q, k1, k2, vv, k_top, r)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close("out", out, spark.spark_attention_np(np64(q), np64(k), np64(v), k_top, r), 1e-5, 1e-5)


def chunk_select(monkeypatch, mode):
    """The select kernel's long-cache paths at small n: "search" (scores re-read in chunks of 16
    for every sweep, and compacted in chunks), "compaction" (scores in registers for the search,
    compacted in chunks of 16, as a 32K-token cache on the GPU), "two passes" (past 48 scores,
    the kt largest of each third of the row, then of their lists, as a cache longer than 8192
    tokens on the GPU; only when the lists hold at most half the row, so the tests using it
    take n >= 6 k_top), "two passes, search" (both: the second pass then re-reads its candidates
    and their positions in chunks). -> the parts of every select launch, recorded in the two-pass
    modes (a test asserts that a first pass of several parts ran), else None."""
    mode = mode or ""
    if "search" in mode:
        monkeypatch.setattr(dg, "MAX_SELECT_IN_REGISTERS", 16)
        monkeypatch.setattr(dg, "SELECT_CHUNK", 16)
    if mode == "compaction":
        monkeypatch.setattr(dg, "COMPACT_CHUNK", 16)
    if "two passes" in mode:
        monkeypatch.setattr(dg, "SELECT_SPLIT", 48)
        monkeypatch.setattr(dg, "SELECT_PARTS", 3)
        passes, launch = [], dg._select_pass
        monkeypatch.setattr(dg, "_select_pass", lambda *a, **kw: passes.append(a[5]) or launch(*a, **kw))
        return passes
    return None


def ran_two_passes(passes):
    """True unless chunk_select recorded launches of which none was a first pass of parts."""
    return passes is None or max(passes, default=1) > 1


@pytest.mark.parametrize("mode", ["search", "compaction", "two passes", "two passes, search"])
def test_spark_attention_decode_chunked_select(mode, monkeypatch):
    """A cache longer than the select kernel holds at once, both ways (chunk_select)."""
    passes = chunk_select(monkeypatch, mode)
    q, k, v = kv_case(2, 4, 2, 130, 16)
    out = dg.spark_attention_decode_gpu(q, *dg.prepare_spark_kv_gpu(k, v, 6), 20, 6)
    assert_close("out", out, spark.spark_attention_np(np64(q), np64(k), np64(v), 20, 6), 1e-5, 1e-5)
    assert ran_two_passes(passes)


@pytest.mark.parametrize("chunked", [None, "search", "compaction"])
def test_spark_attention_decode_ties_keep_exactly_kt(chunked, monkeypatch):
    """Scores with ties across the kt-th place: tokens are copies of 6 prototype rows (equal keys,
    equal values), integer predictor parts so that equal scores are equal bits. The kernel keeps
    exactly kt (as the reference): keeping the whole tie would add weight the reference has not."""
    chunk_select(monkeypatch, chunked)  # (the ties then straddle chunks: their rank is carried over)
    hd, r, n = 16, 4, 60
    gen = torch.Generator().manual_seed(5)
    protos_k = torch.randint(-3, 4, (6, hd), generator=gen).double()
    protos_k[:, r:] = torch.randn(6, hd - r, generator=gen, dtype=torch.float64)
    protos_v = torch.randn(6, hd, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 6, (n,), generator=gen)
    k, v = protos_k[which][None, None], protos_v[which][None, None]  # [1, 1, n, hd]
    q = torch.randint(-2, 3, (1, 2, 1, hd), generator=gen).double()
    q[0, 1, 0, :r] = 2 * q[0, 0, 0, :r]  # head 1: the same order of scores, other gate
    q[..., r:] = torch.randn(1, 2, 1, hd - r, generator=gen, dtype=torch.float64)
    # k_top: the first group, plus part of the second (so the kt-th place is inside a tie)
    s = (protos_k[:, :r] @ q[0, 0, 0, :r]).numpy()
    counts = np.bincount(which.numpy(), minlength=6)
    order = [g for g in np.argsort(-s) if counts[g] > 0]
    if s[order[0]] == s[order[1]] or counts[order[1]] < 2:
        pytest.skip("the drawn prototypes give no tie across a boundary")  # (seed 5 gives one)
    # (head 0's first group has counts[order[0]] copies; one more place goes to the second group,
    # which has at least two copies: the kt-th place is inside a tie of equal scores)
    k_top = int(counts[order[0]]) + 1
    q32, k32, v32 = (t.float().to(DEVICE) for t in (q, k, v))
    out = dg.spark_attention_decode_gpu(q32, *dg.prepare_spark_kv_gpu(k32, v32, r), k_top, r)
    assert_close("out with ties", out, spark.spark_attention_np(q.numpy(), k.numpy(), v.numpy(), k_top, r), 1e-5, 1e-5)


def test_spark_attention_decode_adjacent_floats():
    """Scores that differ only in their last bits (consecutive float32 values, in shuffled order):
    the select must decide all 32 bits of the kt-th largest, not stop at a rounded threshold."""
    n, hd, r, k_top = 90, 8, 1, 37
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(1, 1, n, hd, generator=gen, dtype=torch.float64)
    k[0, 0, :, 0] = (1.0 + torch.randperm(n, generator=gen).double() * 2.0**-23)  # exact in float32
    v = torch.randn(1, 1, n, hd, generator=gen, dtype=torch.float64)
    q = torch.randn(1, 2, 1, hd, generator=gen, dtype=torch.float64)
    q[..., 0] = torch.tensor([1.0, -3.0]).view(1, 2, 1)  # scores k_j0 and -3 k_j0: exact (r = 1)
    q32, k32, v32 = (t.float().to(DEVICE) for t in (q, k, v))
    out = dg.spark_attention_decode_gpu(q32, *dg.prepare_spark_kv_gpu(k32, v32, r), k_top, r)
    assert_close("out", out, spark.spark_attention_np(q.numpy(), k.numpy(), v.numpy(), k_top, r), 1e-5, 1e-5)


# Score shapes the select's statistical first guess gets wrong (its bracket of mean + z std misses
# the kt-th score), so that the search must recover from it: conftest.scores_of, and kt near n
# (the threshold near the bottom, below zero).
def check_select(scores, k_top, visible=None):
    """The select kernel alone on one row of scores (the first `visible` of them seen): its list
    must be the positions of the k_top largest, ties in position order, ascending, with their
    scores, and its max the row's. (Through the whole attention the extreme shapes below would
    hide a wrong list: with a few huge scores the softmax gives every other token a weight of
    ~0, whichever of them is kept; and tokens with equal scores and equal rows hide the tie order.)"""
    S = scores.float().to(DEVICE)[None]  # [1, n]
    n = S.shape[1] if visible is None else visible
    lens = S if visible is None else torch.tensor([visible], dtype=torch.int32, device=DEVICE)
    idx, ssel, mx, kt = dg._spark_select(S, k_top, 1, lens, visible is not None)  # (without visible, lens is S: never read)
    KT = min(k_top, n)
    seen = S[0, :n].cpu()
    ref = torch.from_numpy(np.sort(np.argsort(-seen.numpy(), kind="stable")[:KT]))  # stable: lower positions first
    assert int(kt[0]) == KT
    assert torch.equal(idx[0, :KT].cpu().long(), ref), "the kept positions"
    assert torch.equal(ssel[0, :KT].cpu(), S[0].cpu()[ref])
    assert float(mx[0]) == float(seen.max())


@pytest.mark.parametrize("chunked,kind,n,k_top", [
    (c, *shape) for c in (None, "search", "two passes", "two passes, search")
    for shape in (("sinks", 300, 40), ("powers of two", 300, 40), ("negative", 300, 40))] + [
    (c, *shape) for c in (None, "search") for shape in (("normal", 300, 280), ("powers of two", 300, 290))])
def test_spark_attention_decode_select_any_score_shape(chunked, kind, n, k_top, monkeypatch):
    """The select is exact whatever the scores look like: distinct scores (no ties) drawn from
    shapes far from normal, where its statistical first guess misses. kt near n (280, 290 of
    300) puts the kt-th score low, where the guess mean + z std has z < 0; the "search" modes
    re-read the scores in chunks for every sweep, the "two passes" modes select each third of the
    row and then their lists (chunk_select)."""
    passes = chunk_select(monkeypatch, chunked)
    scores = scores_of(kind, n, torch.Generator().manual_seed(3)).float()
    assert len(torch.unique(scores)) == n, "distinct scores"
    check_select(scores, k_top)
    assert ran_two_passes(passes)


@pytest.mark.parametrize("chunked", [None, "two passes", "two passes, search"])
@pytest.mark.parametrize("visible", [None, 100, 25])
def test_spark_attention_decode_select_ties_in_position_order(chunked, visible, monkeypatch):
    """Integer scores with many ties (300 tokens, 12 values; the 40th place inside a tie) and
    lengths below n and below k_top: the list is the stable order's, so a tie keeps its lowest
    positions, also when the tie straddles the two-pass select's parts."""
    passes = chunk_select(monkeypatch, chunked)
    scores = torch.randint(0, 12, (300,), generator=torch.Generator().manual_seed(4)).float()
    check_select(scores, 40, visible)
    assert ran_two_passes(passes)


@pytest.mark.parametrize("fit", [dg.FIT_STEPS, 1])
def test_spark_attention_decode_select_longest_search(fit, monkeypatch):
    """The select's longest search: sinks make the statistical guess miss, and the 8 scores
    after the kt-th are the 8 floats below it, so nothing ends the search before its interval
    is one key wide. With fit = 1 (the guess, then quarter points only) a NumPy replica of the
    search takes all 1 + 16 sweeps the kernel then allows; two sweeps fewer leave four scores at
    or above lo, and a wrong list (one fewer leaves two: the tie pass still keeps the right kt).
    With the fit (the default: up to FIT_STEPS - 1 fitted sweeps, then 16) it takes 19 of 24."""
    monkeypatch.setattr(dg, "FIT_STEPS", fit)
    n, k_top = 300, 40
    scores = scores_of("sinks", n, torch.Generator().manual_seed(2)).float()
    order = torch.argsort(scores, descending=True)
    for i in range(8):  # the next 8 scores 1 .. 8 floats below the kt-th
        scores[order[k_top + i]] = torch.nextafter(scores[order[k_top + i - 1]], torch.tensor(float("-inf")))
    assert len(torch.unique(scores)) == n
    check_select(scores, k_top)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("chunked", [None, "two passes"])
def test_spark_attention_decode_nan_query(chunked, monkeypatch):
    """A query head holding NaN has NaN scores: its output is NaN (in two passes too: its
    padding is NaN), no list entry of it is read unwritten, and the other heads are untouched."""
    passes = chunk_select(monkeypatch, chunked)
    q, k, v = kv_case(1, 4, 2, 70, 16)
    q[0, 1, 0, 2] = float("nan")
    out = dg.spark_attention_decode_gpu(q, *dg.prepare_spark_kv_gpu(k, v, 4), 10, 4)
    assert torch.isnan(out[0, 1]).all()
    finite = q.clone()
    finite[0, 1] = 0.0  # (the other heads' outputs do not depend on head 1)
    ref = spark.spark_attention_np(np64(finite), np64(k), np64(v), 10, 4)
    keep = [0, 2, 3]
    assert_close("the other heads", out[:, keep], ref[:, keep], 1e-5, 1e-5)
    assert ran_two_passes(passes)


@pytest.mark.parametrize("gather", [False, True], ids=["select attends", "gather kernel"])
@pytest.mark.parametrize("chunked", [None, "two passes"])
def test_decode_lengths(chunked, gather, monkeypatch):
    """lengths [B]: each query sees the first lengths[b] tokens of its cache (one sequence below
    k_top, one above), as the reference on the truncated caches; out-of-range values are an error.
    In two passes the last part has no visible token, and sequence 0 fewer than k_top in all.
    Both ways of attending to the kept tokens (test_spark_attention_decode_matches_reference)."""
    passes = chunk_select(monkeypatch, chunked)
    if gather:
        monkeypatch.setattr(dg, "ATTEND_PROGRAMS", 0)
    B, H, Hkv, n, hd, r, k_top = 2, 4, 2, 80, 16, 6, 12
    q, k, v = kv_case(B, H, Hkv, n, hd)
    lengths = torch.tensor([9, 41], dtype=torch.int32, device=DEVICE)
    k1, k2, vv = dg.prepare_spark_kv_gpu(k, v, r)
    got_s = dg.spark_attention_decode_gpu(q, k1, k2, vv, k_top, r, lengths=lengths)
    got_d = dg.attention_decode_gpu(q, k, v, lengths=lengths.long())
    for b, L in enumerate(lengths.tolist()):
        args = np64(q[b:b + 1]), np64(k[b:b + 1, :, :L]), np64(v[b:b + 1, :, :L])
        assert_close(f"spark out, sequence {b}", got_s[b:b + 1], spark.spark_attention_np(*args, k_top, r), 1e-5, 1e-5)
        assert_close(f"dense out, sequence {b}", got_d[b:b + 1], spark.attention_np(*args), 1e-5, 1e-5)
    assert ran_two_passes(passes)
    # lengths past the cache, or below 1, are an error: a device-side check, which raises at once on
    # the CPU; on a GPU it fails the process's CUDA context at the next synchronisation, which a
    # test cannot recover from, so it is checked where the tests run in the interpreter
    if DEVICE == "cpu":
        for bad in ([n + 7, n], [0, 5]):
            with pytest.raises(RuntimeError, match=r"lengths\[b\] must be in \[1, n = 80\]"):
                dg.attention_decode_gpu(q, k, v, lengths=torch.tensor(bad, dtype=torch.int32, device=DEVICE))


def test_attention_decode_bad_input():
    """Each bad argument gets an error naming it: the unsplit cache as k1, a cache with strided
    rows, mixed dtypes, float64, r and k_top out of range, H not a multiple of Hkv, lengths of
    the wrong shape, more than one query per sequence, heads too long for the kernels' tiles."""
    q, k, v = kv_case(1, 4, 2, 20, 16)
    k1, k2, vv = dg.prepare_spark_kv_gpu(k, v, 6)
    with pytest.raises(ValueError, match="expected k1"):  # the unsplit cache: not a prepared layout
        dg.spark_attention_decode_gpu(q, k, k2, vv, 8, 6)
    with pytest.raises(ValueError, match="k1 must have a contiguous last axis"):
        dg.spark_attention_decode_gpu(q, k1.transpose(2, 3).contiguous().transpose(2, 3), k2, vv, 8, 6)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        dg.spark_attention_decode_gpu(q, k1, k2, vv.to(torch.bfloat16), 8, 6)
    with pytest.raises(TypeError, match="q is float64"):
        dg.attention_decode_gpu(q.double(), k, v)
    with pytest.raises(ValueError, match="r must be in"):
        dg.spark_attention_decode_gpu(q, k1, k2, vv, 8, 16)
    with pytest.raises(ValueError, match="k_top must be in"):
        dg.spark_attention_decode_gpu(q, k1, k2, vv, 0, 6)
    with pytest.raises(ValueError, match="H \\(4\\) a multiple of Hkv"):
        dg.attention_decode_gpu(q, k[:, :1].expand(1, 3, 20, 16).contiguous(), v[:, :1].expand(1, 3, 20, 16).contiguous())
    with pytest.raises(ValueError, match="lengths must be"):
        dg.attention_decode_gpu(q, k, v, lengths=torch.ones(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="one new token"):
        dg.attention_decode_gpu(q.expand(1, 4, 2, 16), k, v)
    with pytest.raises(ValueError, match=r"hd = 257 in torch.float32: .*hd <= 256 in float32"):
        dg.attention_decode_gpu(*kv_case(1, 2, 1, 3, 257))


# ------------------------------------------------------------------------------------------
# generate_gpu
#
# Off CUDA the decoder runs its step eagerly (no graph) through the interpreted kernels, which
# tests everything but the capture: the static caches written at the device position, the
# lengths the kernels mask with, the window rebuild, decode_loop's sampling. On a GPU the same
# tests run the graph replays. A step of the tiny model is ~15 interpreted launches (~0.3 s).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_add_layernorm_matches_torch(dtype, bias):
    """The decoder's fused residual add + LayerNorm against torch's x + a then nn.LayerNorm, at
    an odd width (d 37: the padded lanes must not enter the mean or the variance), and without
    the add. float32: the same formula, sums in another order (1e-5). bf16: x + a is rounded to
    bf16 in both, the same bits; h may differ in its last bf16 bit (2^-7 relative), as both round
    a float32 result computed in a different order."""
    gen = torch.Generator().manual_seed(4)
    x, a = (torch.randn(3, 37, generator=gen).to(DEVICE, dtype) * 3 for _ in range(2))
    ln = torch.nn.LayerNorm(37, bias=bias).to(DEVICE, dtype)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(37, generator=gen))
        if bias:
            ln.bias.copy_(torch.randn(37, generator=gen))
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        xo, h = dg._add_layernorm(x, a, ln)
        assert torch.equal(xo, x + a)
        assert_close("h", h.float(), ln(x + a).float(), tol * 4, tol)
        xo, h = dg._add_layernorm(x, None, ln)
        assert xo is x or torch.equal(xo, x)
        assert_close("h without the add", h.float(), ln(x).float(), tol * 4, tol)


def tiny_model(ffn, attn, dtype=torch.float32, bias=False):
    """2 layers, 4 heads / 2 KV heads of 16, d 64, Spark f 192, k_top 8, context 24; 2-D weights
    at 10x the init scale so that greedy decoding has no near-ties (kernels_cpu's bench does the same).
    bias: attention projections and LayerNorms with biases, drawn nonzero."""
    torch.manual_seed(0)
    cfg = spark.GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                          ffn=ffn, attn=attn, attn_k=8, bias=bias)
    model = spark.GPT(cfg).to(DEVICE, dtype).eval()
    for p in model.parameters():
        p.data.mul_(10.0 if p.dim() == 2 else 1.0)
        if p.dim() == 1 and bias:
            p.data.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kinds", [("spark", "spark", False), ("dense", "dense", False), ("spark", "spark", True)],
                         ids=lambda k: "/".join(k[:2]) + ("/bias" if k[2] else ""))
def test_generate_gpu_greedy_matches_generate(kinds):
    """A prompt of 5 tokens and 22 new ones: the cache passes k_top (8) and block_size (24; the
    window slides and prefill rebuilds the static buffers). On CUDA the steps are graph replays.
    With biases, the decoder's re-laid projections carry them too (their concatenation, addmm)."""
    model = tiny_model(kinds[0], kinds[1], bias=kinds[2])
    # batch 2: the kernels' per-sequence programs; both sequences have the same length here
    idx = torch.randint(0, 50, (2, 5), device=DEVICE)
    ref = model.generate(idx, 22, temperature=0)
    got = dg.generate_gpu(model, idx, 22, temperature=0)
    assert torch.equal(got, ref)


def test_generate_gpu_sampled_matches_generate():
    """temperature 1 with top_k: the same seed draws the same tokens (decode_loop is shared)."""
    model = tiny_model("spark", "spark")
    idx = torch.randint(0, 50, (2, 3), device=DEVICE)
    torch.manual_seed(7)
    ref, ref_logits = model.generate(idx, 10, temperature=1.0, top_k=20, return_logits=True)
    torch.manual_seed(7)
    got, logits = dg.generate_gpu(model, idx, 10, temperature=1.0, top_k=20, return_logits=True)
    assert torch.equal(got, ref)
    assert_close("logits", logits, ref_logits, 1e-3, 1e-4)


def test_generate_gpu_bad_input():
    """The decoder's own checks (a spark.GPT, float32 / bf16 / fp16 weights, a CUDA model for a
    graph) and GPT.generate's (check_generate_args), each naming the argument."""
    model = tiny_model("spark", "spark")
    with pytest.raises(TypeError, match="model must be a spark.GPT"):
        dg.generate_gpu(model.blocks[0], torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        dg.generate_gpu(model, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), -1)
    with pytest.raises(TypeError, match="model is float64"):
        dg.generate_gpu(tiny_model("spark", "spark", torch.float64), torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 2)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="graph=True needs a model on a CUDA device"):
            dg.generate_gpu(model, torch.zeros(1, 1, dtype=torch.long), 2, graph=True)


# ------------------------------------------------------------------------------------------
# GPU only: no host synchronisation (CUDA graph capture), bf16 attention, the graph decoder
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_kernels_capture_in_cuda_graph():
    """Each public kernel runs inside a CUDA graph capture (which fails on any host sync) and gives
    the eager result bit for bit (deterministic: no floating-point atomics)."""
    x, K1, K2, V = ffn_case(3, 40, 300, 13, torch.bfloat16)
    w = dg.prepare_spark_ffn_gpu(K1, K2, V)
    q, k, v = kv_case(2, 4, 2, 100, 16, torch.bfloat16)
    split = dg.prepare_spark_kv_gpu(k, v, 5)
    lengths = torch.tensor([30, 90], dtype=torch.int32, device="cuda")
    for name, fn in {"ffn": lambda: dg.spark_ffn_decode_gpu(x, *w, 24, 13),
                     "dense": lambda: dg.attention_decode_gpu(q, k, v, lengths=lengths),
                     "spark": lambda: dg.spark_attention_decode_gpu(q, *split, 10, 5, lengths=lengths)}.items():
        assert_close(f"{name} in a graph", run_in_cuda_graph(fn), fn(), 0.0, 0.0)


@pytest.mark.gpu
def test_spark_attention_decode_bf16_gpu():
    """bf16 caches on the GPU against float64 on the same values: the scores' float32 sums may
    order near-equal scores otherwise than float64, so we compare with keys far apart (a random
    n = 300 has gaps >> float32 rounding) and allow the gather's float32 sums and out's bf16 rounding."""
    q, k, v = kv_case(2, 8, 4, 300, 64, torch.bfloat16)
    out = dg.spark_attention_decode_gpu(q, *dg.prepare_spark_kv_gpu(k, v, 32), 16, 32)
    ref = spark.spark_attention_np(np64(q), np64(k), np64(v), 16, 32)
    assert_close("out bf16", out, ref, 2.0**-8 * np.abs(ref).max(), 2.0**-7)
    out = dg.attention_decode_gpu(q, k, v)
    ref = spark.attention_np(np64(q), np64(k), np64(v))
    # p rounded to bf16 before the product with V (flash attention's choice): 2^-9 of sum p |v|
    assert_close("dense out bf16", out, ref, 2.0**-7 * np.abs(np64(v)).max(), 2.0**-7)


@pytest.mark.gpu
def test_generate_gpu_graph_bf16_runs():
    """The graph decoder on a bf16 model: finite logits, and the same tokens with and without the
    graph (the graph replays the very kernels the eager step launches)."""
    model = tiny_model("spark", "spark", torch.bfloat16)
    idx = torch.randint(0, 50, (1, 4), device="cuda")
    a = dg.generate_gpu(model, idx, 12, temperature=0, graph=True)
    b = dg.generate_gpu(model, idx, 12, temperature=0, graph=False)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_decode_at_gpu_launch_settings_random_shapes(monkeypatch):
    """The tests above lower the launch settings so that small shapes split; this one keeps the
    GPU's own (splits of 64+ tokens, 264 target programs, the select in registers up to 8192
    scores and in two passes past that) and draws shapes at random: caches of 1 to 40000 tokens,
    with and without lengths, batch 1 to 8 (so both ways of attending), hd 64 to 256, any r, k_top
    from 1 to past n; FFNs of 1 to 8 tokens, d to 2304, f to 14000, any r, k = 1, 8 % and f.
    float32 against float64 on the same values. Tolerances: float32 sums over up to ~10^4 terms
    (~sqrt(N) ulps, 1e-5 relative), with a 10x margin. Random keys put the kt-th and (kt+1)-th
    scores of 40000 far apart compared with float32 rounding, so the kept tokens are the
    reference's."""
    for name, value in GPU_LAUNCHES.items():
        monkeypatch.setattr(dg, name, value)
    rng = np.random.default_rng(SEED)
    for _ in range(10):
        B = int(rng.choice([1, 2, 8]))
        H, Hkv = [(8, 4), (8, 1), (4, 4), (2, 2)][rng.integers(4)]
        hd = int(rng.choice([64, 128, 256]))
        r = int(rng.integers(1, hd))
        n = int(np.exp(rng.uniform(0, np.log(40000 if B <= 2 else 10000))))
        k_top = int(rng.choice([1, 37, 256, 600]))
        lengths = rng.integers(1, n + 1, B) if rng.random() < 0.5 else np.full(B, n)
        q, k, v = kv_case(B, H, Hkv, n, hd)
        got = dg.spark_attention_decode_gpu(q, *dg.prepare_spark_kv_gpu(k, v, r), k_top, r,
                                            lengths=torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
        for b, L in enumerate(lengths.tolist()):
            ref = spark.spark_attention_np(np64(q[b:b + 1]), np64(k[b:b + 1, :, :L]), np64(v[b:b + 1, :, :L]), k_top, r)
            assert_close(f"B{B} H{H} Hkv{Hkv} n{n} hd{hd} r{r} k_top{k_top}, sequence {b} (length {L})",
                         got[b:b + 1], ref, 1e-4 * np.abs(ref).max(), 1e-4)
    for _ in range(6):
        M, d = int(rng.integers(1, 9)), int(rng.choice([96, 1000, 2304]))
        f, r = int(rng.integers(100, 14000)), int(rng.integers(1, d))
        k = int(rng.choice([1, max(1, round(0.08 * f)), f]))
        x, K1, K2, V = ffn_case(M, d, f, r)
        y = dg.spark_ffn_decode_gpu(x, *dg.prepare_spark_ffn_gpu(K1, K2, V), k, r)
        ref = spark.spark_ffn_np(np64(x), np64(K1), np64(K2), np64(V), k, r)
        assert_close(f"M{M} d{d} f{f} r{r} k{k}", y, ref, 1e-4 * np.abs(ref).max(), 1e-4)
