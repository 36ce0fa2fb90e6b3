"""Tests for kernels_cpu.py: every kernel, both versions, against its NumPy reference.

No test here measures speed (that is `python kernels_cpu.py`); they check that each version
computes what its reference (spark.py, topk.py) computes, on awkward shapes: odd sizes, k = 1,
k = f (every neuron kept), no survivor at all, every neuron a survivor, fewer cached tokens than
k_top, grouped-query heads, caches that are views into a bigger buffer, several tokens at once,
rows and tokens holding NaN or +-inf. The `version` fixture runs a test twice, with the switch
kernels_cpu.FUSED off (version 1, eager PyTorch) and on (version 2, the fused C loop, where it
applies; skipped, saying why, where the C library cannot be built), and `ran` records which
version functions a call actually took, so a test knows version 2 was really exercised.

Tolerances (per dtype):
- float64: the kernels do the reference's arithmetic in another order (a GEMV, a gather, a
  weighted sum of rows), so we allow 1e-10 absolute + 1e-9 relative: far above float64
  rounding (~1e-16 per operation, sums of a few hundred terms) and far below any real bug.
- float32 against the float64 reference: 1e-4 absolute + 1e-3 relative. Sums of ~100-1000
  products of O(1) values carry ~1e-6..1e-5 of rounding; a survivor whose p sits within ~1e-7
  of theta may be in or out depending on rounding, but it contributes gelu(p - theta) ~ 1e-7.
- float16 / bfloat16 (statistical top-k, version 1 only): compared with topk.statistical_topk,
  which computes in float32 and rounds once, like ours: one rounding step of the output dtype.
"""

import json
import math
import os
import platform
import stat

import numpy as np
import pytest
import torch

import kernels_cpu as kc
import spark
import topk
from conftest import assert_close

F64 = dict(atol=1e-10, rtol=1e-9)
F32 = dict(atol=1e-4, rtol=1e-3)


def _t(a, dtype):
    """A NumPy array (the references' inputs) as a torch tensor of the kernel's dtype."""
    return torch.as_tensor(np.asarray(a)).to(dtype)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request, monkeypatch):
    """The switch set for version 1 (FUSED off) or version 2 (FUSED on; skip if it cannot be built).

    A test that takes this fixture runs twice. With FUSED on, a call still takes version 1 where
    version 2 does not apply (several tokens, float64, strided weights, ...), so the "v2" run of
    a test checks the routing as much as the C loop; `ran` says which one each call took."""
    monkeypatch.setattr(kc, "FUSED", request.param == 2)
    if request.param == 2 and kc._lib() is None:
        pytest.skip(f"version 2 unavailable here: {kc.fused_status()}")
    return request.param


@pytest.fixture
def ran(monkeypatch):
    """A list that collects the names of the version functions each kernel call runs.

    The spies replace the module's functions, so the public kernels call them by name as usual.
    statistical_topk_cpu's version 2 is the C call itself, which has no Python function to spy
    on: for it, an empty list means version 2 ran, ["statistical_topk"] that version 1 did."""
    names = []
    for name in ("_spark_ffn_v1", "_spark_ffn_v2", "_relu_ffn_v1", "_relu_ffn_v2", "statistical_topk"):
        def spy(*args, _fn=getattr(kc, name), _name=name, **kw):
            names.append(_name)
            return _fn(*args, **kw)
        monkeypatch.setattr(kc, name, spy)
    return names


def _prep_spark(dtype, *K1_K2_V):
    """prepare_spark_ffn_cpu on NumPy weights converted to dtype."""
    return kc.prepare_spark_ffn_cpu(*(_t(a, dtype) for a in K1_K2_V))


def _prep_relu(dtype, *Wg_Wu_Wd):
    """prepare_relu_ffn_cpu on NumPy weights converted to dtype."""
    return kc.prepare_relu_ffn_cpu(*(_t(a, dtype) for a in Wg_Wu_Wd))


def _raises(*cases):
    """Each case (exception type, message pattern, call): the call must raise exactly that."""
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def _ref_quiet(fn, *args):
    """A NumPy reference on input holding NaN or inf: its NaN rows are the answer, not a warning."""
    with np.errstate(all="ignore"):
        return fn(*args)


# ------------------------------------------------------------------------------------------
# Spark FFN decode vs spark.spark_ffn_np
#
# Version 1 (eager PyTorch + NumPy) handles every case; version 2 (the C tail after the
# predictor GEMV) one float32 token with packed weights and k < f. The shapes below put the
# threshold through its corners: k = 1 (few survivors), k = f - 1 (nearly all), r = 1 and
# r = d - 1 (a one-column predictor, or a one-column K2), and Gemma-2 2B's d and r with rows of
# 5 and 9 KB, long enough for the prefetch distance to matter.
# ------------------------------------------------------------------------------------------


def _spark_weights(d, f, r, rng):
    """Random Spark FFN weights K1 [r, f], K2 [d-r, f], V [f, d], scaled so that every score,
    gate and output is O(1) for x ~ N(0, 1): errors then compare with O(1) values."""
    K1 = rng.standard_normal((r, f)) / math.sqrt(r)  # p ~ N(0, |x1|^2 / r): O(1) scores
    K2 = rng.standard_normal((d - r, f)) / math.sqrt(d - r)
    V = rng.standard_normal((f, d)) / math.sqrt(f)
    return K1, K2, V


def _relu_weights(d, f, rng, shift=0.0):
    """Random ReLU-gated FFN weights Wg, Wu [d, f], Wd [f, d] whose gate pre-activations are
    ~N(-shift, 1) when x[0] = 1 (row 0 of Wg is the shift): a gate bias in disguise, so that
    shift 2.3 leaves ~1 % of the neurons on, as after L1 training (see the ReLU section)."""
    Wg = rng.standard_normal((d, f)) / math.sqrt(d - 1)
    Wg[0] = -shift
    Wu = rng.standard_normal((d, f)) / math.sqrt(d)
    Wd = rng.standard_normal((f, d)) / math.sqrt(f)
    return Wg, Wu, Wd


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("d,f,r,k,lead", [
    (37, 53, 11, 7, ()),  # odd sizes, one token as a vector
    (37, 53, 11, 7, (1,)),  # one token as a [1, d] row
    (37, 53, 11, 7, (5,)),  # several tokens: union of their survivors
    (37, 53, 11, 7, (2, 3)),  # any leading shape
    (64, 301, 32, 1, (1,)),  # k = 1
    (64, 301, 32, 300, (3,)),  # k = f - 1: nearly every neuron
    (64, 301, 32, 300, ()),  # k = f - 1, one token
    (64, 301, 1, 24, (2,)),  # r = 1
    (64, 301, 63, 24, ()),  # r = d - 1
    (2304, 1382, 1024, 110, ()),  # Gemma-2 2B's d and r (f cut to 1/10): rows of 5 and 9 KB
])
def test_spark_ffn_decode_matches_reference(version, ran, dtype, tol, d, f, r, k, lead):
    """Both versions against spark_ffn_np at every shape above. Version 2 takes one float32 token
    only: `ran` checks that it really ran there and that version 1 ran everywhere else. The
    float64 runs check the algorithm (tight tolerance), the float32 ones what a model runs."""
    rng = np.random.default_rng(0)
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal(lead + (d,))
    prepared = _prep_spark(dtype, K1, K2, V)
    got = kc.spark_ffn_decode_cpu(_t(x, dtype), *prepared, k, r)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(f"spark_ffn_decode_cpu v{version} {dtype} d{d} f{f} r{r} k{k} {lead}", got,
                 spark.spark_ffn_np(x, K1, K2, V, k, r), **tol)
    one_f32_token = dtype == torch.float32 and math.prod(lead) == 1
    assert ran == ["_spark_ffn_v2" if version == 2 and one_f32_token else "_spark_ffn_v1"]


@pytest.mark.parametrize("threads", [1, 2])
def test_spark_ffn_decode_v2_splits_survivors_between_threads(version, ran, threads):
    """Version 2 gives each of torch's threads a share of the survivors and a partial y, and adds
    the partial sums at the end. What this checks: the result is right with torch set to 1 and to
    2 threads (the conftest sets 1 for the tests, so we raise it here), i.e. the C call gets one
    or two partial-sum rows and the sum over them is right. What it cannot check: whether OpenMP
    really ran two threads (the runtime may give fewer, and nothing reports it back). Version 1:
    the same numbers, computed by torch's own threads."""
    rng = np.random.default_rng(20)
    d, f, r, k = 300, 1000, 100, 200
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal(d)
    prepared = _prep_spark(torch.float32, K1, K2, V)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kc.spark_ffn_decode_cpu(_t(x, torch.float32), *prepared, k, r)
    finally:
        torch.set_num_threads(old)
    ref = spark.spark_ffn_np(x, K1, K2, V, k, r)
    assert_close(f"spark_ffn_decode_cpu v{version}, {threads} threads", got, ref, **F32)


def test_spark_ffn_decode_all_neurons_k_equals_f(version):
    """k == f: statistical_topk returns p unchanged (no shift, negatives kept), every neuron used.
    The C tail is never asked (its Q(1 - k/f) would be Q(0) = -inf): version 1 computes it densely."""
    rng = np.random.default_rng(1)
    d, f, r = 20, 33, 9
    K1, K2, V = _spark_weights(d, f, r, rng)
    for lead, dtype, tol in (((3,), torch.float64, F64), ((), torch.float32, F32)):
        x = rng.standard_normal(lead + (d,))
        got = kc.spark_ffn_decode_cpu(_t(x, dtype), *_prep_spark(dtype, K1, K2, V), f, r)
        assert_close(f"spark_ffn_decode_cpu k == f {dtype}", got, spark.spark_ffn_np(x, K1, K2, V, f, r), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spark_ffn_decode_zero_survivors(version, dtype):
    """Constant predictor scores (K1 = 0): std = 0, theta = p, nobody survives, y = 0 exactly.
    This is what centring on the first entry buys (topk.py): without it theta would sit an ulp
    off p and a few neurons would "survive" with activations of 1e-17."""
    rng = np.random.default_rng(2)
    d, f, r = 16, 40, 8
    _, K2, V = _spark_weights(d, f, r, rng)
    K1 = np.zeros((r, f))
    for lead in ((), (2,)):
        x = rng.standard_normal(lead + (d,))
        ref = spark.spark_ffn_np(x, K1, K2, V, 5, r)
        assert not ref.any()  # the reference agrees: nothing fires
        got = kc.spark_ffn_decode_cpu(_t(x, dtype), *_prep_spark(dtype, K1, K2, V), 5, r)
        assert_close(f"spark_ffn_decode_cpu, no survivor, {lead}", got, ref, atol=0.0, rtol=0.0)


def test_spark_ffn_decode_batch_equals_one_token_at_a_time(version):
    """The union trick: each token of a batch gets exactly what it gets alone. Version 1 gathers
    the union of the 6 tokens' survivors once; one token at a time takes version 2 where it runs."""
    rng = np.random.default_rng(3)
    d, f, r, k = 48, 200, 24, 16
    K1, K2, V = (_t(a, torch.float64) for a in _spark_weights(d, f, r, rng))
    prepared = kc.prepare_spark_ffn_cpu(K1, K2, V)
    x = _t(rng.standard_normal((6, d)), torch.float64)
    together = kc.spark_ffn_decode_cpu(x, *prepared, k, r)
    alone = torch.stack([kc.spark_ffn_decode_cpu(x[i], *prepared, k, r) for i in range(6)])
    assert_close("batch vs one at a time", together, alone, **F64)
    assert kc.spark_ffn_decode_cpu(x[:0], *prepared, k, r).shape == (0, d)  # an empty batch: an empty y


def test_spark_ffn_decode_strided_token(version, ran):
    """A non-contiguous token is fine for both versions. x[:, 1] of a [d, 3] tensor has stride 3:
    version 2 hands C a pointer and a length, so it must pack x first (x2 = X[0, r:].contiguous()),
    or the C loop would read every third value of the wrong numbers."""
    rng = np.random.default_rng(21)
    d, f, r = 16, 40, 8
    K1, K2, V = _spark_weights(d, f, r, rng)
    xs = torch.randn(d, 3)[:, 1]  # [d], stride 3
    got = kc.spark_ffn_decode_cpu(xs, *_prep_spark(torch.float32, K1, K2, V), 5, r)
    ref = spark.spark_ffn_np(xs.double().numpy(), K1, K2, V, 5, r)
    assert_close("spark_ffn_decode_cpu, strided x", got, ref, **F32)
    assert ran == [f"_spark_ffn_v{version}"]


def test_strided_weights_never_reach_version_2(version, ran):
    """Version 2 reads each weight as a packed row-major array from data_ptr(): a transposed view
    (K2.t() passed as K2t) or an expanded tensor must take version 1, with the reference's result."""
    rng = np.random.default_rng(25)
    d, f, r, k = 24, 60, 8, 9
    K1, K2, V = (_t(a, torch.float32) for a in _spark_weights(d, f, r, rng))
    x = _t(rng.standard_normal(d), torch.float32)
    for K2t, V_ in ((K2.t(), V), (K2.t().contiguous(), V[:1].expand(f, d))):
        ref = spark.spark_ffn_np(x.double().numpy(), K1.double().numpy(), K2t.t().double().numpy(),
                                 V_.double().numpy(), k, r)
        assert_close("strided Spark weights", kc.spark_ffn_decode_cpu(x, K1, K2t, V_, k, r), ref, **F32)
    Wg, Wu, Wd = (_t(a, torch.float32) for a in _relu_weights(d, f, rng, 0.5))
    x[0] = 1.0
    ref, _ = spark.relu_l1_ffn_np(x.double().numpy(), Wg.double().numpy(), Wu.double().numpy(), Wd.double().numpy())
    assert_close("relu, Wu.t() as Wut", kc.relu_ffn_decode_cpu(x, Wg, Wu.t(), Wd), ref, **F32)
    assert ran == ["_spark_ffn_v1", "_spark_ffn_v1", "_relu_ffn_v1"]


def test_spark_ffn_decode_bad_inputs():
    """Every wrong argument gets one clear error that names it: unprepared K2, r or k out of range
    (a bool r too), the wrong d, a scalar x, mixed or unsupported dtypes, NumPy input. The likely
    mistake is passing K2 [d-r, f] where K2t [f, d-r] is wanted: the message says to use
    prepare_spark_ffn_cpu. A bool is an int to Python, so r=True would otherwise mean r = 1."""
    rng = np.random.default_rng(4)
    d, f, r = 16, 40, 8
    K1, K2, V = (_t(a, torch.float32) for a in _spark_weights(d, f, r, rng))
    P = kc.prepare_spark_ffn_cpu(K1, K2, V)
    x = torch.randn(d)
    _raises(
        (ValueError, "K2t", lambda: kc.spark_ffn_decode_cpu(x, K1, K2, V, 5, r)),  # K2 not prepared
        (ValueError, "r must be", lambda: kc.spark_ffn_decode_cpu(x, *P, 5, d)),
        (ValueError, "r must be", lambda: kc.spark_ffn_decode_cpu(x, *P, 5, True)),
        (ValueError, "1 <= k", lambda: kc.spark_ffn_decode_cpu(x, *P, 0, r)),
        (ValueError, "1 <= k", lambda: kc.spark_ffn_decode_cpu(x, *P, f + 1, r)),
        (ValueError, "d=17", lambda: kc.spark_ffn_decode_cpu(torch.randn(d + 1), *P, 5, r)),  # wrong d
        (ValueError, "x", lambda: kc.spark_ffn_decode_cpu(torch.tensor(1.0), *P, 5, r)),
        (TypeError, "one dtype", lambda: kc.spark_ffn_decode_cpu(x.double(), *P, 5, r)),  # mixed dtypes
        (TypeError, "x must be a float32", lambda: kc.spark_ffn_decode_cpu(x.bfloat16(), *(t.bfloat16() for t in P), 5, r)),
        (TypeError, "x must be a float32", lambda: kc.spark_ffn_decode_cpu(torch.ones(d, dtype=torch.int64), *P, 5, r)),
        (TypeError, "x must be .* torch.Tensor", lambda: kc.spark_ffn_decode_cpu(x.numpy(), *P, 5, r)),
    )
    with pytest.raises(ValueError, match="K1"):
        kc.prepare_spark_ffn_cpu(K1, K2[:-1], V)


# ------------------------------------------------------------------------------------------
# ReLU FFN decode vs spark.relu_l1_ffn_np
#
# The gate is dense (all of Wg is read), the survivors are the positive gates. Random weights
# have half the gates positive; an L1-trained model ~1 %, which we get by a bias in disguise
# (x[0] = 1 and row 0 of Wg = -shift, so each gate is ~N(-shift, 1)). The reference here is
# the y of spark.relu_l1_ffn_np (Sakana AI, arXiv 2603.23198), the FFN of an L1-trained model;
# its second output, the L1 term, is a training quantity that decoding does not need.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("d,f,shift,lead", [
    (33, 71, 0.0, ()),  # half the neurons on
    (33, 71, 2.3, (1,)),  # ~1 % on: the L1-trained regime
    (33, 71, 2.3, (4,)),  # union over 4 tokens
    (64, 257, 1.0, (2, 2)),
    (2048, 563, 2.3, ()),  # rows of 8 KB, as in the benchmark
])
def test_relu_ffn_decode_matches_reference(version, ran, dtype, tol, d, f, shift, lead):
    """Both versions against the y of relu_l1_ffn_np, from half the neurons on to the ~1 % of an
    L1-trained model; version 2 only for one float32 token (checked with `ran`)."""
    rng = np.random.default_rng(5)
    Wg, Wu, Wd = _relu_weights(d, f, rng, shift)
    x = rng.standard_normal(lead + (d,))
    x[..., 0] = 1.0
    ref, _ = spark.relu_l1_ffn_np(x, Wg, Wu, Wd)
    got = kc.relu_ffn_decode_cpu(_t(x, dtype), *_prep_relu(dtype, Wg, Wu, Wd))
    assert got.shape == x.shape
    assert_close(f"relu_ffn_decode_cpu v{version} {dtype} {lead} shift {shift}", got, ref, **tol)
    one_f32_token = dtype == torch.float32 and math.prod(lead) == 1
    assert ran == ["_relu_ffn_v2" if version == 2 and one_f32_token else "_relu_ffn_v1"]


@pytest.mark.parametrize("case", ["no survivor", "every neuron"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_relu_ffn_decode_extremes(version, case, dtype, tol):
    """No gate positive (y = 0 exactly: no row is read) and every gate positive (every row is).
    The first is the edge where a gather has nothing to gather (m = 0: empty index lists, one
    empty bag for embedding_bag, one C thread writing zeros); the second where the sparse path
    reads as much as the dense one and must still give the dense result."""
    rng = np.random.default_rng(6)
    d, f = 24, 50
    Wg, Wu, Wd = _relu_weights(d, f, rng, 0.0)
    Wg[1:] = 0.0  # gate = x[0] * Wg[0]: we choose its sign for every neuron
    Wg[0] = -1.0 if case == "no survivor" else 1.0
    prepared = _prep_relu(dtype, Wg, Wu, Wd)
    for lead in ((), (3,)):
        x = rng.standard_normal(lead + (d,))
        x[..., 0] = 1.0
        got = kc.relu_ffn_decode_cpu(_t(x, dtype), *prepared)
        assert_close(f"relu_ffn_decode_cpu, {case}", got, spark.relu_l1_ffn_np(x, Wg, Wu, Wd)[0], **tol)
        if case == "no survivor":
            assert not got.any()
    assert kc.relu_ffn_decode_cpu(_t(np.ones((0, d)), dtype), *prepared).shape == (0, d)  # an empty batch


def test_relu_ffn_decode_bad_inputs():
    """Unprepared Wu (not transposed), a wrong d, a wrong Wd, float16: each names what it expected.
    Wu untransposed is the likely mistake ([d, f] where Wut [f, d] is wanted): with d != f it has
    the wrong shape and the message points to prepare_relu_ffn_cpu."""
    Wg, Wu, Wd = torch.randn(8, 12), torch.randn(8, 12), torch.randn(12, 8)
    P = kc.prepare_relu_ffn_cpu(Wg, Wu, Wd)
    _raises(
        (ValueError, "Wut", lambda: kc.relu_ffn_decode_cpu(torch.randn(8), Wg, Wu, Wd)),  # Wu given untransposed
        (ValueError, "d=9", lambda: kc.relu_ffn_decode_cpu(torch.randn(9), *P)),
        (ValueError, "Wd", lambda: kc.prepare_relu_ffn_cpu(Wg, Wu, Wd.t())),
    )
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.relu_ffn_decode_cpu(torch.randn(8).half(), *(t.half() for t in P))


# ------------------------------------------------------------------------------------------
# Non-finite input: what the references return (NaN rows), no exception, no warning
#
# spark_ffn_np and relu_l1_ffn_np give a token holding NaN or +-inf an all-NaN row: its theta
# is NaN, or 0 * inf = NaN appears in u and spreads through y. The kernels give the same row
# without computing it, and the other tokens of a batch keep their own results.
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # a RuntimeWarning from our side fails the test
@pytest.mark.parametrize("kind", ["spark", "relu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_ffn_decode_non_finite_tokens_give_the_reference_nan_rows(version, kind, dtype, tol):
    """A token holding NaN, +inf or -inf (in the predictor slice or after it) comes out all NaN,
    as in the reference; the finite tokens beside it are unaffected, alone or in a batch."""
    rng = np.random.default_rng(30)
    d, f, r, k = 20, 45, 7, 6
    if kind == "spark":
        W = _spark_weights(d, f, r, rng)
        ref_fn, kernel = (lambda x: spark.spark_ffn_np(x, *W, k, r)), kc.spark_ffn_decode_cpu
        args = (*_prep_spark(dtype, *W), k, r)
    else:
        W = _relu_weights(d, f, rng, 1.0)
        ref_fn, kernel = (lambda x: spark.relu_l1_ffn_np(x, *W)[0]), kc.relu_ffn_decode_cpu
        args = _prep_relu(dtype, *W)
    x = rng.standard_normal((5, d))
    x[:, 0] = 1.0
    x[1, 2], x[2, 3], x[3, 15] = math.nan, math.inf, -math.inf  # token 4 stays finite, token 0 too
    ref = _ref_quiet(ref_fn, x)
    assert np.isnan(ref[1:4]).all() and np.isfinite(ref[[0, 4]]).all()  # the reference's answer
    assert_close(f"{kind} batch with non-finite tokens", kernel(_t(x, dtype), *args), ref, **tol)
    for i in range(5):  # one token at a time (version 2 where it applies)
        assert_close(f"{kind} token {i}", kernel(_t(x[i], dtype), *args), ref[i], **tol)


def test_ffn_decode_nan_weights_in_the_dense_part_give_nan(version):
    """NaN in K1 (or Wg) makes theta (or a gate) NaN: NaN out, as in the reference, no exception.
    (NaN in the rows a sparse kernel skips, K2/V or Wu/Wd, cannot be seen: the kernel never reads
    them. The reference reads every row, so it would give NaN; we do not test that difference.)"""
    rng = np.random.default_rng(31)
    d, f, r = 16, 40, 8
    K1, K2, V = _spark_weights(d, f, r, rng)
    K1[2, 5] = math.nan
    x = rng.standard_normal(d)
    ref = _ref_quiet(spark.spark_ffn_np, x, K1, K2, V, 5, r)
    got = kc.spark_ffn_decode_cpu(_t(x, torch.float32), *_prep_spark(torch.float32, K1, K2, V), 5, r)
    assert np.isnan(ref).all() and torch.isnan(got).all()
    Wg, Wu, Wd = _relu_weights(d, f, rng, 1.0)
    Wg[3, 7] = math.nan
    got = kc.relu_ffn_decode_cpu(_t(x, torch.float32), *_prep_relu(torch.float32, Wg, Wu, Wd))
    assert np.isnan(_ref_quiet(spark.relu_l1_ffn_np, x, Wg, Wu, Wd)[0]).all() and torch.isnan(got).all()


# ------------------------------------------------------------------------------------------
# Spark attention decode vs spark.spark_attention_np (T = 1); the dense baselines
#
# Spark attention keeps, per query head, the k_top cached tokens with the largest predictor
# scores q[:r] . k[:r] (an exact top-k), then attends to those only, with a softplus gate from
# the other hd - r dimensions. The kernel takes the cache split at r (k1, k2) so that the score
# pass streams k1 alone.
#
# One version. The shapes cover the top-k active and not (n below, at and above k_top), the
# split r at both ends, grouped-query heads (G = 2 and 4), a single cached token, and caches
# that are views into a bigger preallocated buffer (what generate_cpu passes).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("B,H,Hkv,n,hd,k_top,r", [
    (1, 2, 2, 50, 16, 7, 5),  # plain multi-head, top-k active
    (2, 4, 2, 9, 8, 16, 3),  # n below k_top: attend to every key
    (2, 4, 4, 16, 8, 16, 3),  # n == k_top
    (2, 6, 3, 40, 12, 1, 11),  # k_top = 1, r = hd - 1, grouped-query (G = 2)
    (1, 4, 1, 33, 10, 5, 1),  # r = 1, one KV head for 4 query heads
    (3, 2, 2, 1, 6, 4, 2),  # a single cached token
])
def test_spark_attention_decode_matches_reference(dtype, tol, B, H, Hkv, n, hd, k_top, r):
    """One version: spark_attention_np's last query (T = 1) at every shape above, q given as
    [B, H, 1, hd] or [B, H, hd]. The exact top-k decides the kept keys in both, so float32 can
    differ from the float64 reference only where two scores tie to rounding (random data: never)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, H, 1, hd))
    k = rng.standard_normal((B, Hkv, n, hd))
    v = rng.standard_normal((B, Hkv, n, hd))
    ref = spark.spark_attention_np(q, k, v, k_top, r)  # [B, H, 1, hd]
    k1, k2, vv = kc.prepare_spark_kv_cpu(_t(k, dtype), _t(v, dtype), r)
    got = kc.spark_attention_decode_cpu(_t(q, dtype), k1, k2, vv, k_top, r)
    assert_close(f"spark_attention_decode_cpu {dtype} B{B} H{H}/{Hkv} n{n} hd{hd} kt{k_top} r{r}", got, ref, **tol)
    got3 = kc.spark_attention_decode_cpu(_t(q[:, :, 0], dtype), k1, k2, vv, k_top, r)  # q as [B, H, hd]
    assert_close("q given as [B, H, hd]", got3, ref[:, :, 0], **tol)


def test_spark_attention_decode_on_views_of_a_bigger_cache():
    """generate_cpu passes [:, :, :n] views of a [B, Hkv, capacity, *] buffer: no copy, same result.
    The kernel gathers rows through a "row table" (the buffer seen as [rows, w] with a row offset
    per batch and head), so the offsets must use the buffer's strides (capacity rows per head),
    not n; a layout that is not whole rows must be copied first, and still give the result."""
    rng = np.random.default_rng(8)
    B, H, Hkv, cap, n, hd, r, kt = 2, 4, 2, 64, 37, 12, 5, 6
    k = _t(rng.standard_normal((B, Hkv, cap, hd)), torch.float64)
    v = _t(rng.standard_normal((B, Hkv, cap, hd)), torch.float64)
    q = _t(rng.standard_normal((B, H, 1, hd)), torch.float64)
    k1, k2, vv = kc.prepare_spark_kv_cpu(k, v, r)  # [B, Hkv, cap, *]
    got = kc.spark_attention_decode_cpu(q, k1[:, :, :n], k2[:, :, :n], vv[:, :, :n], kt, r)
    ref = spark.spark_attention_np(q.numpy(), k[:, :, :n].numpy(), v[:, :, :n].numpy(), kt, r)
    assert_close("attention on cache views", got, ref, **F64)
    # a layout that is not whole rows (hd sliced from a wider tensor) is copied, still correct
    wide = torch.cat([k2, k2], dim=-1)[..., :hd - r]
    got2 = kc.spark_attention_decode_cpu(q, k1[:, :, :n], wide[:, :, :n], vv[:, :, :n], kt, r)
    assert_close("attention on a strided k2", got2, ref, **F64)


def test_spark_attention_decode_bad_inputs():
    """Two tokens, a split at the wrong r, H not a multiple of Hkv, k_top < 1, an empty cache, r out
    of range, mixed dtypes: each raises naming what was expected."""
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    k1, k2, vv = kc.prepare_spark_kv_cpu(k, v, 3)
    _raises(
        (ValueError, "one new token", lambda: kc.spark_attention_decode_cpu(torch.randn(1, 4, 2, 8), k1, k2, vv, 4, 3)),
        (ValueError, "k1", lambda: kc.spark_attention_decode_cpu(q, k1, k2, vv, 4, 4)),  # r does not match the split
        (ValueError, "multiple of Hkv", lambda: kc.spark_attention_decode_cpu(q[:, :3], k1, k2, vv, 4, 3)),
        (ValueError, "k_top", lambda: kc.spark_attention_decode_cpu(q, k1, k2, vv, 0, 3)),
        (ValueError, "n = 0", lambda: kc.spark_attention_decode_cpu(q, k1[:, :, :0], k2[:, :, :0], vv[:, :, :0], 4, 3)),
        (ValueError, "r must be", lambda: kc.prepare_spark_kv_cpu(k, v, 8)),
    )
    with pytest.raises(TypeError, match="dtype"):
        kc.spark_attention_decode_cpu(q.double(), k1, k2, vv, 4, 3)


@pytest.mark.parametrize("B,H,Hkv,n,hd", [(1, 2, 2, 30, 16), (2, 6, 3, 17, 8), (1, 4, 1, 1, 6)])
def test_attention_decode_cpu_matches_reference(B, H, Hkv, n, hd):
    """The dense baseline of the benchmark computes spark.attention_np's T = 1 case: every speedup
    in the table divides by its time, so it must compute the same thing as the sparse kernel's
    reference, with grouped-query heads (G = 2 and 4) and a single cached token too."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((B, H, 1, hd))
    k = rng.standard_normal((B, Hkv, n, hd))
    v = rng.standard_normal((B, Hkv, n, hd))
    ref = spark.attention_np(q, k, v)
    got = kc.attention_decode_cpu(_t(q, torch.float64), _t(k, torch.float64), _t(v, torch.float64))
    assert_close(f"attention_decode_cpu B{B} H{H}/{Hkv} n{n}", got, ref, **F64)
    got3 = kc.attention_decode_cpu(_t(q[:, :, 0], torch.float64), _t(k, torch.float64), _t(v, torch.float64))
    assert_close("q given as [B, H, hd]", got3, ref[:, :, 0], **F64)


def test_attention_decode_cpu_bad_inputs():
    """The dense baseline checks its shapes too (it is public: generate_cpu calls it), and its
    one message names the layout it expects, q [B, H, 1, hd] and k, v [B, Hkv, n, hd]."""
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 10, 8)
    _raises(
        (ValueError, "H % Hkv", lambda: kc.attention_decode_cpu(q, k, k)),  # 3 query heads over 2 KV heads
        (ValueError, "H % Hkv", lambda: kc.attention_decode_cpu(torch.randn(1, 2, 2, 8), k, k)),  # 2 new tokens
    )


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gated_ffn_decode_cpu_matches_reference(act):
    """The dense FFN baseline computes spark.gated_ffn_np, with both activations: GeGLU ("gelu")
    is the Spark FFN's baseline in the benchmark, the ReLU-gated FFN ("relu") the L1-sparse
    one's, and generate_cpu runs a model's GatedFFN layers through it with their own act."""
    rng = np.random.default_rng(12)
    d, f = 24, 61
    Wg, Wu, Wd = rng.standard_normal((d, f)), rng.standard_normal((d, f)), rng.standard_normal((f, d))
    x = rng.standard_normal((3, d))
    ref = spark.gated_ffn_np(x, Wg, Wu, Wd, act)
    got = kc.gated_ffn_decode_cpu(*(_t(a, torch.float64) for a in (x, Wg, Wu, Wd)), act)
    assert_close(f"gated_ffn_decode_cpu {act}", got, ref, **F64)


# ------------------------------------------------------------------------------------------
# Statistical top-k over rows vs topk.statistical_topk_np / topk.statistical_topk
#
# Version 1 is topk.statistical_topk itself (any float dtype, autograd); version 2 the C row
# loop for float32 rows with soft=True, fill 0, when autograd is not recording. Version 2 takes
# theta in one float64 pass (the reference takes two): the numerics test below puts it on rows
# where a one-pass variance could lose digits.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k", [
    ((5, 7, 1000), 80),  # leading dims, D not a power of two
    ((40, 16384), 1311),  # the benchmark's row length
    ((3, 1), 1),  # D = 1, k = D: returned unchanged
    ((6, 3), 1),  # tiny rows
    ((9, 1000), 1),  # k = 1
    ((9, 1000), 999),  # k = D - 1
    ((0, 50), 5),  # no rows at all
])
@pytest.mark.parametrize("fill,soft", [(0.0, True), (0, True), (0.0, False), (-1.5, True), (-math.inf, False)])
def test_statistical_topk_cpu_matches_reference(version, ran, shape, k, fill, soft):
    """Both versions against statistical_topk_np: every shape above, soft and hard thresholds,
    fill 0 (as a float and as an int), -1.5 and -inf. Version 2 runs for float32 rows with
    soft=True and fill 0; float64 and every other fill or soft take version 1 (checked)."""
    rng = np.random.default_rng(9)
    x = 0.3 + 2.0 * rng.standard_normal(shape)
    ref = topk.statistical_topk_np(x, k, fill, soft)  # float64
    got64 = kc.statistical_topk_cpu(_t(x, torch.float64), k, fill, soft)
    assert_close(f"statistical_topk_cpu float64 {shape} k{k}", got64, ref, **F64)
    assert ran == ["statistical_topk"]  # float64: version 1 always
    ran.clear()
    # float32 against the float64 reference. Version 2 decides survivors exactly (c > tc with tc
    # rounded down) except that c = x - x[0] is itself rounded to float32 (6e-8 relative of
    # |c| <= ~16 here, 1e-6), and its output carries that rounding: 1e-5 absolute leaves 10x.
    # Version 1 computes in float32 (topk.py): theta within ~1e-6 of the reference's, same bound.
    got32 = kc.statistical_topk_cpu(_t(x, torch.float32), k, fill, soft)
    assert got32.dtype == torch.float32
    assert_close(f"statistical_topk_cpu v{version} float32 {shape} k{k}", got32, ref, atol=1e-5, rtol=1e-6)
    assert ran == ([] if version == 2 and soft and fill == 0 else ["statistical_topk"])  # [] : the C loop ran


def test_statistical_topk_cpu_out_and_in_place(version):
    """out= receives the result; out=x overwrites x (the fastest form), for every fill and soft:
    version 2 writes there directly, version 1 copies its result there. A non-contiguous x is
    copied into rows first (version 2 needs packed rows). In place is safe in the C loop because
    each entry is read (in both passes) before it is written, and only its own row is touched."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((50, 3000))
    for fill, soft in [(0.0, True), (-1.0, False)]:
        ref = topk.statistical_topk_np(x, 100, fill, soft)
        xt = _t(x, torch.float32)
        out = torch.empty_like(xt)
        assert kc.statistical_topk_cpu(xt, 100, fill, soft, out=out) is out
        assert_close(f"out=, fill {fill} soft {soft}", out, ref, atol=1e-5, rtol=1e-6)
        assert kc.statistical_topk_cpu(xt, 100, fill, soft, out=xt) is xt
        assert_close(f"in place, fill {fill} soft {soft}", xt, ref, atol=1e-5, rtol=1e-6)
    xs = torch.randn(64, 300).t()  # [300, 64], not contiguous: copied into rows first
    assert_close("non-contiguous x", kc.statistical_topk_cpu(xs, 7), topk.statistical_topk_np(xs.double().numpy(), 7),
                 atol=1e-5, rtol=1e-6)


def test_statistical_topk_cpu_k_equals_d_returns_input(version):
    """k == D thresholds nothing: x itself comes back (as topk), or a copy of it in out. Version 2
    must not run there: Q(1 - D/D) = Q(0) = -inf would make theta -inf and every entry x + inf."""
    x = torch.randn(4, 9)
    assert kc.statistical_topk_cpu(x, 9) is x
    out = torch.empty(4, 9)
    assert kc.statistical_topk_cpu(x, 9, out=out) is out and torch.equal(out, x)


# float16 has 11 significant bits, bfloat16 8: one rounding of an output of size |y| is at most
# |y| 2^-11 (4.9e-4 |y|) and |y| 2^-8 (3.9e-3 |y|); rtol is twice that. The reference takes the
# same (already rounded) input in float64, so the input's own rounding is not counted twice.
# atol 1e-4: an entry within ~1e-6 of theta (float32 statistics vs float64) may fall on the
# other side of it, with a value of that size.
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_statistical_topk_cpu_half_precision(version, ran, dtype, rtol):
    """Half precision takes version 1 (topk.statistical_topk: statistics in float32, one rounding
    to the output dtype) in both settings of the switch; checked against the float64 reference."""
    x = (torch.randn(33, 700) * 2 + 0.5).to(dtype)
    got = kc.statistical_topk_cpu(x, 50)
    assert got.dtype == dtype and ran == ["statistical_topk"]
    assert_close(f"statistical_topk_cpu {dtype}", got, topk.statistical_topk_np(x.double().numpy(), 50), atol=1e-4,
                 rtol=rtol)


@pytest.mark.filterwarnings("error")  # a RuntimeWarning fails the test: NaN rows are an answer
def test_statistical_topk_cpu_constant_and_non_finite_rows(version):
    """A constant row has theta = its value and no survivor; a row holding NaN, +inf or -inf
    comes out all NaN, as statistical_topk_np gives it; the other rows are untouched. Rows 3 and
    5 hold the bad value in their first entry, the one theta is centred on, and row 4 in its last
    (the end of the C loop's vectorised sums)."""
    x = 0.3 + 2.0 * np.random.default_rng(26).standard_normal((7, 400))
    x[1] = 3.25
    x[2, 10], x[3, 0], x[4, 399], x[5, 0] = math.nan, math.inf, -math.inf, math.nan
    ref = topk.statistical_topk_np(x, 30)
    assert np.isnan(ref[2:6]).all() and (ref[1] == 0).all()
    got = kc.statistical_topk_cpu(_t(x, torch.float32), 30)
    assert_close("constant and non-finite rows", got, ref, atol=1e-5, rtol=1e-6)


def test_statistical_topk_cpu_threshold_numerics(version):
    """Rows far from 0, a first entry far from the row mean, huge and tiny scales: theta's one-pass
    float64 statistics (version 2) and topk.py's float32 ones (version 1) agree with the two-pass
    float64 reference. Tolerance: one float32 rounding of the row's spread (x - x[0])."""
    rng = np.random.default_rng(27)
    z = rng.standard_normal((6, 5000))
    # The rows: offset by 1000 (uncentred one-pass sums would lose ~6 of 16 digits); scale 1e-3;
    # scale 1e30 (c^2 ~ 1e60: fine in float64, an overflow in float32); a first entry 10^4 std
    # from the mean (the worst case for centring on z[0]); a negative offset with a small spread;
    # a skewed row (its first 100 entries shifted up by 50 std).
    rows = np.stack([1000.0 + z[0], z[1] * 1e-3, z[2] * 1e30, np.r_[1e4, z[3, 1:]], -5e3 + 0.1 * z[4],
                     np.r_[z[5, :100] + 50.0, z[5, 100:]]]).astype(np.float32)
    ref = topk.statistical_topk_np(rows, 400)
    got = kc.statistical_topk_cpu(torch.from_numpy(rows.copy()), 400).numpy()
    spread = np.abs(rows - rows[:, :1]).max(axis=1, keepdims=True)  # [6, 1]
    assert (np.abs(got - ref) <= 2 * np.finfo(np.float32).eps * spread).all(), np.abs(got - ref).max(axis=1)
    assert ((got > 0) == (ref > 0)).mean() > 0.999  # survivors: the same but for a rounding's width


def test_statistical_topk_cpu_gradient(version, ran):
    """With autograd on, version 1 (topk.statistical_topk: analytic backward) runs, any dtype:
    its gradient passes gradcheck in float64, and `ran` shows that a float32 x requiring grad
    takes version 1 too, even where version 2 would take the same x without autograd."""
    x = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kc.statistical_topk_cpu(t, 6), (x,))
    assert torch.autograd.gradcheck(lambda t: kc.statistical_topk_cpu(t, 6, -2.0, False), (x,))
    ran.clear()
    x32 = (torch.randn(6, 300) * 1.5 + 0.2).requires_grad_(True)
    y = kc.statistical_topk_cpu(x32, 30)
    assert ran == ["statistical_topk"] and y.requires_grad  # version 1: differentiable
    with torch.no_grad():
        kc.statistical_topk_cpu(x32, 30)
    assert ran == ["statistical_topk"] + ([] if version == 2 else ["statistical_topk"])  # no autograd: version 2
    with pytest.raises(ValueError, match="out"):
        kc.statistical_topk_cpu(x32, 30, out=torch.empty(6, 300))


def test_statistical_topk_cpu_bad_inputs(version):
    """Both versions answer bad arguments as topk does (version 1 is topk's own check), and a
    wrong out (shape, or not contiguous) is refused before anything is written."""
    _raises(
        (ValueError, "1 <= k", lambda: kc.statistical_topk_cpu(torch.randn(3, 5), 0)),
        (ValueError, "1 <= k", lambda: kc.statistical_topk_cpu(torch.randn(3, 5), 6)),
        (ValueError, "k must", lambda: kc.statistical_topk_cpu(torch.randn(3, 5), 2.0)),
        (TypeError, "floating", lambda: kc.statistical_topk_cpu(torch.ones(3, 5, dtype=torch.int32), 2)),
        (TypeError, "torch.Tensor", lambda: kc.statistical_topk_cpu(np.ones((3, 5)), 2)),
        (ValueError, "scalar", lambda: kc.statistical_topk_cpu(torch.tensor(1.0), 1)),
        (TypeError, "fill", lambda: kc.statistical_topk_cpu(torch.randn(3, 5), 2, fill="a")),
        (TypeError, "soft", lambda: kc.statistical_topk_cpu(torch.randn(3, 5), 2, soft="yes")),
        (ValueError, "out", lambda: kc.statistical_topk_cpu(torch.randn(300, 64), 7, out=torch.empty(300, 63))),
    )
    with pytest.raises(ValueError, match="out"):
        kc.statistical_topk_cpu(torch.randn(300, 64), 7, out=torch.empty(64, 300).t())


# ------------------------------------------------------------------------------------------
# generate_cpu vs spark.GPT.generate
#
# The two share spark.decode_loop (sampling, window rebuild) and differ in everything below
# it: our prefill copies the model's caches into preallocated ones, our step runs the decode
# kernels. Greedy decoding with weights at 10x the init scale has no near-ties, so equal
# tokens are a sharp test. Each decode step exercises the whole stack at once: the preallocated
# split KV cache written in place, the row-table gathers on its views, the FFN kernels with
# batch 2 (version 1) and batch 1 (version 2), and the window rebuild past block_size.
# ------------------------------------------------------------------------------------------


def _tiny(ffn, attn, **kw):
    """A 2-layer GPT of the given FFN and attention kinds, weights 10x the init scale.

    At the 0.02 init scale a random model's logits are nearly flat, so greedy decoding would hang
    on near-ties that the order of float additions decides; at 10x the winner is clear, and so are
    the sparse selections (which neurons survive, which tokens Spark attention keeps)."""
    torch.manual_seed(0)
    cfg = spark.GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                          ffn=ffn, attn=attn, attn_k=6, **kw)
    model = spark.GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the sparse paths select sharply
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


@pytest.mark.parametrize("ffn,attn", [("spark", "spark"), ("dense", "dense"), ("relu", "dense"), ("relu_l1", "dense"),
                                      ("stat_topk", "spark"), ("topk", "dense"), ("dense", "spark")])
def test_generate_cpu_matches_model_generate(version, ffn, attn):
    """Every FFN kind (Spark, GeGLU, ReLU-gated, ReLU-L1, both top-k FFNs) with dense and Spark
    attention: the same greedy tokens as GPT.generate (an independent check of every kernel as
    behaviour), logits to float32 rounding, the same tokens when sampling with the same seed
    (one decode loop, spark.decode_loop), and batch 1, where version 2 runs in every FFN layer."""
    model = _tiny(ffn, attn)
    idx = torch.randint(0, 97, (2, 5))
    # 40 new tokens with block_size 24: the window slides and the cache is rebuilt, as in generate
    want, want_logits = model.generate(idx, 40, temperature=0, return_logits=True)
    got, got_logits = kc.generate_cpu(model, idx, 40, temperature=0, return_logits=True)
    assert torch.equal(got, want), "greedy tokens differ from model.generate"
    assert_close("decode logits", got_logits, want_logits, atol=1e-4, rtol=1e-4)
    one = kc.generate_cpu(model, idx[:1], 10, temperature=0)  # batch 1: one token per call (version 2)
    assert torch.equal(one, model.generate(idx[:1], 10, temperature=0))
    torch.manual_seed(5)
    want = model.generate(idx, 12, temperature=0.9, top_k=10)
    torch.manual_seed(5)
    got = kc.generate_cpu(model, idx, 12, temperature=0.9, top_k=10)
    assert torch.equal(got, want), "sampled tokens differ from model.generate with the same seed"


def test_generate_cpu_bad_inputs():
    """spark.check_generate_args answers for generate_cpu as for GPT.generate; a model that is not
    a spark.GPT, or not in float32/float64, gets its own error. 0 new tokens returns idx.
    (float32 or float64 only: the model's weights go to the kernels, which take those two; bf16
    would halve the bytes but its matrix-vector product is slower, see kernels_cpu._check_tensors.)"""
    model = _tiny("spark", "spark")
    idx = torch.zeros(1, 3, dtype=torch.int64)
    assert torch.equal(kc.generate_cpu(model, idx, 0), idx)
    _raises(
        (TypeError, "spark.GPT", lambda: kc.generate_cpu(torch.nn.Linear(2, 2), idx, 3)),
        (TypeError, "idx", lambda: kc.generate_cpu(model, idx.float(), 3)),
        (ValueError, "token ids", lambda: kc.generate_cpu(model, idx + 97, 3)),
        (ValueError, "max_new_tokens", lambda: kc.generate_cpu(model, idx, -1)),
        (ValueError, "temperature", lambda: kc.generate_cpu(model, idx, 3, temperature=-1.0)),
        (ValueError, "top_k", lambda: kc.generate_cpu(model, idx, 3, top_k=0)),
    )
    with pytest.raises(TypeError, match="model must be a float32"):
        kc.generate_cpu(_tiny("spark", "spark").to(torch.bfloat16), idx, 3)


# ------------------------------------------------------------------------------------------
# Building and loading the fused library: only from directories nobody else can write
#
# A shared library runs with our rights once loaded, so kernels_cpu loads one only from a
# cache that nobody else could have written into; otherwise it builds privately. These tests
# make such directories (under tmp_path, with a HOME of their own) and call _build_and_load
# directly, so the library the other tests use is never touched.
# ------------------------------------------------------------------------------------------

needs_cc = pytest.mark.skipif(platform.system() != "Linux" or kc.shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="the fused loop is built on Linux with a C compiler only")


def test_fused_library_builds_in_ci():
    """The version-2 tests skip where the library cannot be built; so that a broken build cannot
    turn them all into silent skips, CI (CI=true on Linux, which has a C compiler) and anyone who
    sets SPARK_REQUIRE_FUSED=1 require it to build."""
    required = os.environ.get("SPARK_REQUIRE_FUSED") == "1" or (
        os.environ.get("CI") == "true" and platform.system() == "Linux" and not os.environ.get("SPARK_NO_FUSED"))
    if not required:
        pytest.skip("neither CI=true on Linux nor SPARK_REQUIRE_FUSED=1")
    assert kc._lib() is not None, kc.fused_status()


def _so_files(root):
    """Every .so file under root: what a build left there (nothing, when it built privately)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".so")]


@needs_cc
@pytest.mark.parametrize("mode,where", [(0o700, "home"), (0o777, "home"), (0o775, "home"), (0o770, ".cache"),
                                        (0o777, "spark_cache"), (0o1777, "spark_cache parent")],
                         ids=["home 0700", "home 0777", "home 0775", ".cache 0770", "SPARK_CACHE 0777",
                              "SPARK_CACHE in a sticky 1777 dir"])
def test_library_loads_only_from_a_private_cache(tmp_path, monkeypatch, mode, where):
    """The cache ($HOME/.cache/spark, or $SPARK_CACHE) and every directory above it up to HOME (or
    up to / outside HOME) must be writable by us alone (sticky ancestors like /tmp are fine);
    otherwise the library is built and loaded in a fresh private temporary directory instead."""
    # The directories are ours (whoever runs the tests, root included), so what makes one unsafe
    # here is its mode: group or world write, without the sticky bit that makes /tmp safe.
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    os.chmod(home, 0o700)
    monkeypatch.setenv("HOME", str(home))
    cache = home / ".cache" / "spark"
    if where == ".cache":
        os.chmod(home / ".cache", mode)
    elif where == "home":
        os.chmod(home, mode)
    else:  # a SPARK_CACHE outside HOME: checked up to /
        parent = tmp_path / "elsewhere"
        parent.mkdir()
        cache = parent / "cache"
        cache.mkdir(mode=0o700)
        os.chmod(parent if where == "spark_cache parent" else cache, mode)
    lib, status = kc._build_and_load(os.environ.get("CC", "cc"), str(cache))
    assert lib is not None, status  # a library is loaded in every case: from the cache, or privately
    private = mode in (0o700, 0o1777)  # the cache is ours alone (a sticky ancestor, like /tmp, is allowed)
    assert ("built privately" in status) != private, status
    assert bool(_so_files(cache)) == private  # nothing was written into a directory others can write
    x = torch.randn(4, 300)
    y = torch.empty_like(x)
    lib.stat_topk_rows(x.data_ptr(), y.data_ptr(), 4, 300, kc._q(30, 300))  # the library loaded works
    assert_close("stat_topk_rows from this library", y, topk.statistical_topk_np(x.numpy(), 30), atol=1e-5, rtol=1e-6)


@needs_cc
def test_library_file_writable_by_others_is_not_loaded(tmp_path, monkeypatch):
    """A library file in the cache that others could have written is not loaded (it could hold
    anything: here it is not even a library): we build privately and leave that file alone."""
    monkeypatch.setenv("HOME", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    cc = os.environ.get("CC", "cc")
    so = tmp_path / f"kernels_cpu_fused_{kc._cache_key(cc)}.so"
    so.write_text("not a library")
    os.chmod(so, 0o666)
    lib, status = kc._build_and_load(cc, str(tmp_path))
    assert lib is not None and "built privately" in status and str(so) in status
    assert so.read_text() == "not a library"


def test_cache_key_changes_with_the_cpu_flags(monkeypatch):
    """-march=native compiles for this CPU's features: another flag set must not reuse the file.
    A library built with AVX-512 instructions and loaded on a CPU without them (a cache in a
    home directory shared by two machines) would die of an illegal instruction at its first call,
    so the key hashes the CPU's flags, not only its model name."""
    keys = []
    # the same model name with and without AVX-512 (as two VMs of one CPU model can be)
    for flags in ("fpu sse2 avx2", "fpu sse2 avx2 avx512f", "fpu sse2 avx2"):
        monkeypatch.setattr(kc, "_cpu_id", lambda flags=flags: ["model name\t: Some CPU", f"flags\t\t: {flags}"])
        keys.append(kc._cache_key("cc"))
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert any(line.startswith(("flags", "Features")) for line in kc._cpu_id()) or platform.system() != "Linux"


@needs_cc
def test_failing_compiler_warns_with_its_message_and_falls_back_to_version_1(tmp_path, monkeypatch):
    """CC pointing at a compiler that fails: a RuntimeWarning carries the compiler's own message,
    the kernel returns version 1's (correct) result, and fused_status() says why. The compiler
    here prints its error first and 200 lines of notes after it, as a real one does: the first
    error (what went wrong) must reach both the warning and fused_status()."""
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: error: this compiler is out of order' >&2\n"
                  "i=0; while [ $i -lt 200 ]; do echo \"note: more of the same, line $i\" >&2; i=$((i+1)); done\n"
                  "exit 1\n")
    os.chmod(cc, stat.S_IRWXU)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kc, "FUSED", True)
    monkeypatch.setattr(kc, "_LIB", {})  # forget the library built by other tests (restored after)
    rng = np.random.default_rng(28)
    d, f, r = 16, 40, 8
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal(d)
    with pytest.warns(RuntimeWarning, match="(?s)out of order.*line 199"):  # all of the message, head first
        got = kc.spark_ffn_decode_cpu(_t(x, torch.float32), *_prep_spark(torch.float32, K1, K2, V), 5, r)
    assert_close("version 1 after a failed build", got, spark.spark_ffn_np(x, K1, K2, V, 5, r), **F32)
    assert "version 1" in kc.fused_status() and "out of order" in kc.fused_status()


def test_fused_status_says_which_version_runs(monkeypatch):
    """fused_status() names the version that runs and the reason: the switch, or where the
    library was loaded from (or why it could not be built). `python kernels_cpu.py` prints it
    above the table, so every table says which version its "v2" rows ran."""
    monkeypatch.setattr(kc, "FUSED", False)
    assert kc.fused_status().startswith("version 1 (eager PyTorch) everywhere: ")
    assert "kernels_cpu.FUSED is off" in kc.fused_status()
    monkeypatch.setattr(kc, "FUSED", True)
    assert kc.fused_status().startswith("version 2" if kc._lib() is not None else "version 1")


# ------------------------------------------------------------------------------------------
# The benchmark code runs, and refuses to time a wrong kernel (tiny shapes; no timing is checked)
# ------------------------------------------------------------------------------------------


def test_benchmark_records():
    """Every bench_* function runs at tiny shapes and returns rows in the documented format, with
    of limit = speedup / limit; version 2 rows exist exactly when the library is built. One rep at
    tiny shapes times nothing meaningful: this checks the plumbing (each version's reference
    check, the record fields, the not_a_bound flag), never a speed."""
    gen = torch.Generator().manual_seed(0)
    ffn = kc.bench_spark_ffn(d=64, f_gated=96, r=32, reps=1, gen=gen) + kc.bench_relu_ffn(d=64, f=96, density=0.1,
                                                                                       reps=1, gen=gen)
    # one record per version: version 1 always, version 2 when the library is built
    assert [r["version"] for r in ffn] == (["v1", "v2"] * 2 if kc._lib() is not None else ["v1"] * 2)
    recs = ffn + kc.bench_spark_ffn(d=64, f_gated=96, r=32, M=3, reps=1, gen=gen)
    recs += [kc.bench_spark_attention(n=40, H=2, hd=16, k_top=8, r=8, reps=1, gen=gen)]
    recs += kc.bench_statistical_topk(R=8, D=256, reps=1, gen=gen)
    for r in recs:
        assert {"name", "baseline_ms", "ms", "speedup", "limit", "fraction_of_limit", "not_a_bound"} <= set(r)
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["limit"] > 0
        assert math.isclose(r["speedup"] / r["limit"], r["fraction_of_limit"])
        assert r["not_a_bound"] == (r["fraction_of_limit"] > 1)  # (one rep at tiny shapes: either can happen)
    rec = kc.bench_decode_model(new=4, reps=1)  # ms per token, no byte limit
    assert rec["limit"] is None and not rec["not_a_bound"] and rec["ms"] > 0


def test_benchmark_refuses_to_time_a_wrong_kernel(monkeypatch):
    """A version that returns wrong numbers (zeros here) fails its reference check: not timed.
    A fast wrong kernel is the easiest speedup to get, so the benchmark checks each version on
    its own input before it times anything, and fails the run rather than print the row."""
    monkeypatch.setattr(kc, "_spark_ffn_v1", lambda X, *w: X.new_zeros(X.shape))
    with pytest.raises(AssertionError, match="not timed"):
        kc.bench_spark_ffn(d=64, f_gated=96, r=32, reps=1, gen=torch.Generator().manual_seed(0))


def test_benchmark_marks_a_floor_that_is_not_a_bound(capsys):
    """A median that beats its floor (of limit > 100 %) proves that floor is not a bound: the row
    prints NOT A BOUND in place of its limit and of limit, and its record says not_a_bound."""
    ok = kc._record("ok", [2.0], [1.0], 0.5)  # floor 0.5 s under our median of 1 s: limit 4x, 50 %
    beat = kc._record("beat", [2.0], [1.0], 1.2)  # our median beat the floor: limit 1.67x, 120 %
    assert not ok["not_a_bound"] and beat["not_a_bound"]
    kc._print_table([ok, beat])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}  # after the header
    assert "NOT A BOUND" in rows["beat"] and "120%" not in rows["beat"] and "1.67x" not in rows["beat"]
    assert "NOT A BOUND" not in rows["ok"] and "4.00x" in rows["ok"] and "50%" in rows["ok"]


def _fake_benchmarks(monkeypatch, json_path=None):
    """Replace every bench_* by a stub returning one made-up row; -> the list of whether
    json_path existed each time a stub ran (it must already: the file is opened first)."""
    seen = []

    def one(*args, **kwargs):
        seen.append(json_path is not None and json_path.exists())
        return kc._record("made-up", [2.0], [1.0], 0.5)

    for name in ("bench_spark_ffn", "bench_relu_ffn", "bench_statistical_topk"):
        monkeypatch.setattr(kc, name, lambda *a, **kw: [one()])
    for name in ("bench_spark_attention", "bench_decode_model"):
        monkeypatch.setattr(kc, name, one)
    return seen


def test_benchmark_checks_its_arguments_before_it_runs(monkeypatch, capsys):
    """`python kernels_cpu.py` refuses --reps that is not an int >= 1 and --quick together with
    --reps, naming the argument, before any benchmark runs (argparse exits with status 2). The
    benchmark bodies are stubs here: a bad argument must never reach them, whatever they cost."""
    seen = _fake_benchmarks(monkeypatch)
    for argv, message in ((["--reps", "0"], "argument --reps: must be an int >= 1, got '0'"),
                          (["--reps", "2.5"], "argument --reps: must be an int >= 1, got '2.5'"),
                          (["--quick", "--reps", "3"], "argument --reps: not allowed with argument --quick")):
        with pytest.raises(SystemExit) as exit_info:
            kc.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    assert seen == []  # nothing was benchmarked


def test_benchmark_json_path(tmp_path, monkeypatch):
    """--json PATH: the folder is made (as out/ on a fresh clone) and the file opened before any
    benchmark runs, and gets one record per table row; a path that cannot be written fails
    before any benchmark runs, with an OSError naming it."""
    path = tmp_path / "out" / "kernels_cpu.json"
    seen = _fake_benchmarks(monkeypatch, path)
    recs = kc.main(["--json", str(path), "--quick"])
    assert seen and all(seen)
    with open(path) as fh:
        assert [r["name"] for r in json.load(fh)] == [r["name"] for r in recs]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    seen.clear()
    with pytest.raises(OSError, match="a_file"):  # its folder would have to be a file
        kc.main(["--json", str(blocker / "kernels_cpu.json")])
    assert seen == []
