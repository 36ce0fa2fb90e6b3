"""Tests for kernels_cpu.py: every CPU kernel against its NumPy reference (spark.py, topk.py).

No test here measures speed (that is `python kernels_cpu.py`); they check that the fast paths
compute the same thing as the references, on awkward shapes: odd sizes, k = 1, k = f (every
neuron kept), no survivor at all, every neuron a survivor, fewer cached tokens than k_top,
grouped-query heads, caches that are views into a bigger buffer, several tokens at once.

Tolerances (per dtype):
- float64: the kernels do the reference's arithmetic in another order (a GEMV, a gather, a
  weighted sum of rows), so we allow 1e-10 absolute + 1e-9 relative: far above float64
  rounding (~1e-16 per operation, sums of a few hundred terms) and far below any real bug.
- float32 against the float64 reference: 1e-4 absolute + 1e-3 relative. Sums of ~100-1000
  products of O(1) values carry ~1e-6..1e-5 of rounding; a survivor whose p sits within ~1e-7
  of theta may be in or out depending on rounding, but it contributes gelu(p - theta) ~ 1e-7.
- float16 / bfloat16 (statistical top-k only): compared with topk.statistical_topk, which
  computes in float32 and rounds once, like ours: one rounding step of the output dtype.
"""

import math

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
    return torch.as_tensor(np.asarray(a)).to(dtype)


# ------------------------------------------------------------------------------------------
# Spark FFN decode vs spark.spark_ffn_np
# ------------------------------------------------------------------------------------------


def _spark_weights(d, f, r, rng):
    K1 = rng.standard_normal((r, f)) / math.sqrt(r)  # p ~ N(0, |x1|^2 / r): O(1) scores
    K2 = rng.standard_normal((d - r, f)) / math.sqrt(d - r)
    V = rng.standard_normal((f, d)) / math.sqrt(f)
    return K1, K2, V


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("d,f,r,k,lead", [
    (37, 53, 11, 7, ()),  # odd sizes, one token as a vector
    (37, 53, 11, 7, (1,)),  # one token as a [1, d] row
    (37, 53, 11, 7, (5,)),  # several tokens: union of their survivors
    (37, 53, 11, 7, (2, 3)),  # any leading shape
    (64, 301, 32, 1, (1,)),  # k = 1
    (64, 301, 32, 300, (3,)),  # k = f - 1: nearly every neuron
    (64, 301, 1, 24, (2,)),  # r = 1
    (64, 301, 63, 24, (2,)),  # r = d - 1
])
@pytest.mark.parametrize("fused", [False, None], ids=["eager", "auto"])
def test_spark_ffn_decode_matches_reference(dtype, tol, d, f, r, k, lead, fused):
    """fused=False: the eager PyTorch path; None: the fused C loop where it applies (one float32
    token, when it is built), eager otherwise. The fused loop also has tests of its own below."""
    rng = np.random.default_rng(0)
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal(lead + (d,))
    ref = spark.spark_ffn_np(x, K1, K2, V, k, r)  # float64
    prepared = kc.prepare_spark_ffn_cpu(_t(K1, dtype), _t(K2, dtype), _t(V, dtype))
    got = kc.spark_ffn_decode_cpu(_t(x, dtype), *prepared, k, r, fused=fused)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(f"spark_ffn_decode_cpu {dtype} d{d} f{f} r{r} k{k} {lead} fused={fused}", got, ref, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_ffn_decode_large_gather_path(monkeypatch, dtype, tol):
    """Our test shapes gather less than 2 MB, where _gather_dot copies the rows; force the
    sampled_addmm path (the one the Gemma-sized benchmark takes) and check it too."""
    monkeypatch.setattr(kc, "_SMALL_GATHER_BYTES", 0)
    rng = np.random.default_rng(13)
    d, f, r, k = 40, 301, 17, 60
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal((1, d))
    got = kc.spark_ffn_decode_cpu(_t(x, dtype), *kc.prepare_spark_ffn_cpu(_t(K1, dtype), _t(K2, dtype), _t(V, dtype)), k, r)
    assert_close(f"spark_ffn_decode_cpu via sampled_addmm {dtype}", got, spark.spark_ffn_np(x, K1, K2, V, k, r), **tol)
    Wg, Wu, Wd = _relu_weights(d, f, rng, 0.5)
    x[:, 0] = 1.0
    got = kc.relu_ffn_decode_cpu(_t(x, dtype), *kc.prepare_relu_ffn_cpu(_t(Wg, dtype), _t(Wu, dtype), _t(Wd, dtype)))
    assert_close(f"relu_ffn_decode_cpu via sampled_addmm {dtype}", got, spark.relu_l1_ffn_np(x, Wg, Wu, Wd)[0], **tol)


def test_spark_ffn_decode_all_neurons_k_equals_f():
    """k == f: statistical_topk returns p unchanged (no shift, negatives kept), every neuron used."""
    rng = np.random.default_rng(1)
    d, f, r = 20, 33, 9
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal((3, d))
    ref = spark.spark_ffn_np(x, K1, K2, V, f, r)
    got = kc.spark_ffn_decode_cpu(_t(x, torch.float64), *kc.prepare_spark_ffn_cpu(
        _t(K1, torch.float64), _t(K2, torch.float64), _t(V, torch.float64)), f, r)
    assert_close("spark_ffn_decode_cpu k == f", got, ref, **F64)


def test_spark_ffn_decode_zero_survivors():
    """Constant predictor scores (K1 = 0): std = 0, theta = p, nobody survives, y = 0 exactly."""
    rng = np.random.default_rng(2)
    d, f, r = 16, 40, 8
    _, K2, V = _spark_weights(d, f, r, rng)
    K1 = np.zeros((r, f))
    x = rng.standard_normal((2, d))
    ref = spark.spark_ffn_np(x, K1, K2, V, 5, r)
    assert not ref.any()  # the reference agrees: nothing fires
    got = kc.spark_ffn_decode_cpu(_t(x, torch.float64), *kc.prepare_spark_ffn_cpu(
        _t(K1, torch.float64), _t(K2, torch.float64), _t(V, torch.float64)), 5, r)
    assert_close("spark_ffn_decode_cpu, no survivor", got, ref, atol=0.0, rtol=0.0)


def test_spark_ffn_decode_batch_equals_one_token_at_a_time():
    """The union trick: each token of a batch gets exactly what it gets alone."""
    rng = np.random.default_rng(3)
    d, f, r, k = 48, 200, 24, 16
    K1, K2, V = (_t(a, torch.float64) for a in _spark_weights(d, f, r, rng))
    prepared = kc.prepare_spark_ffn_cpu(K1, K2, V)
    x = _t(rng.standard_normal((6, d)), torch.float64)
    together = kc.spark_ffn_decode_cpu(x, *prepared, k, r)
    alone = torch.stack([kc.spark_ffn_decode_cpu(x[i], *prepared, k, r) for i in range(6)])
    assert_close("batch vs one at a time", together, alone, **F64)


def test_spark_ffn_decode_bad_inputs():
    rng = np.random.default_rng(4)
    d, f, r = 16, 40, 8
    K1, K2, V = (_t(a, torch.float32) for a in _spark_weights(d, f, r, rng))
    P = kc.prepare_spark_ffn_cpu(K1, K2, V)
    x = torch.randn(d)
    with pytest.raises(ValueError, match="K2t"):  # K2 passed without prepare_spark_ffn_cpu
        kc.spark_ffn_decode_cpu(x, K1, K2, V, 5, r)
    with pytest.raises(ValueError, match="r must be"):
        kc.spark_ffn_decode_cpu(x, *P, 5, d)
    with pytest.raises(ValueError, match="1 <= k"):
        kc.spark_ffn_decode_cpu(x, *P, 0, r)
    with pytest.raises(ValueError, match="1 <= k"):
        kc.spark_ffn_decode_cpu(x, *P, f + 1, r)
    with pytest.raises(ValueError, match="x"):  # wrong d
        kc.spark_ffn_decode_cpu(torch.randn(d + 1), *P, 5, r)
    with pytest.raises(TypeError, match="dtype"):  # mixed dtypes
        kc.spark_ffn_decode_cpu(x.double(), *P, 5, r)
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.spark_ffn_decode_cpu(x.bfloat16(), *(t.bfloat16() for t in P), 5, r)
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.spark_ffn_decode_cpu(torch.ones(d, dtype=torch.int64), *P, 5, r)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kc.spark_ffn_decode_cpu(x.numpy(), *P, 5, r)
    with pytest.raises(ValueError, match="NaN"):
        kc.spark_ffn_decode_cpu(torch.full((d,), math.nan), *P, 5, r)
    with pytest.raises(ValueError, match="K1"):
        kc.prepare_spark_ffn_cpu(K1, K2[:-1], V)


# ------------------------------------------------------------------------------------------
# ReLU FFN decode vs spark.relu_l1_ffn_np
# ------------------------------------------------------------------------------------------


def _relu_weights(d, f, rng, shift=0.0):
    """Gate pre-activations ~N(-shift, 1) when x[0] = 1 (row 0 of Wg is the shift)."""
    Wg = rng.standard_normal((d, f)) / math.sqrt(d - 1)
    Wg[0] = -shift
    Wu = rng.standard_normal((d, f)) / math.sqrt(d)
    Wd = rng.standard_normal((f, d)) / math.sqrt(f)
    return Wg, Wu, Wd


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("d,f,shift,lead", [
    (33, 71, 0.0, ()),  # half the neurons on
    (33, 71, 2.3, (1,)),  # ~1 % on: the L1-trained regime
    (33, 71, 2.3, (4,)),  # union over 4 tokens
    (64, 257, 1.0, (2, 2)),
])
@pytest.mark.parametrize("fused", [False, None], ids=["eager", "auto"])
def test_relu_ffn_decode_matches_reference(dtype, tol, d, f, shift, lead, fused):
    rng = np.random.default_rng(5)
    Wg, Wu, Wd = _relu_weights(d, f, rng, shift)
    x = rng.standard_normal(lead + (d,))
    x[..., 0] = 1.0
    ref, _ = spark.relu_l1_ffn_np(x, Wg, Wu, Wd)
    got = kc.relu_ffn_decode_cpu(_t(x, dtype), *kc.prepare_relu_ffn_cpu(_t(Wg, dtype), _t(Wu, dtype), _t(Wd, dtype)),
                                 fused=fused)
    assert got.shape == x.shape
    assert_close(f"relu_ffn_decode_cpu {dtype} {lead} shift {shift} fused={fused}", got, ref, **tol)


@pytest.mark.parametrize("case", ["no survivor", "every neuron"])
def test_relu_ffn_decode_extremes(case):
    rng = np.random.default_rng(6)
    d, f = 24, 50
    Wg, Wu, Wd = _relu_weights(d, f, rng, 0.0)
    Wg[1:] = 0.0  # gate = x[0] * Wg[0]: we choose its sign for every neuron
    Wg[0] = -1.0 if case == "no survivor" else 1.0
    x = rng.standard_normal((3, d))
    x[:, 0] = 1.0
    ref, _ = spark.relu_l1_ffn_np(x, Wg, Wu, Wd)
    got = kc.relu_ffn_decode_cpu(_t(x, torch.float64), *kc.prepare_relu_ffn_cpu(
        _t(Wg, torch.float64), _t(Wu, torch.float64), _t(Wd, torch.float64)))
    assert_close(f"relu_ffn_decode_cpu, {case}", got, ref, **F64)
    if case == "no survivor":
        assert not got.any()


def test_relu_ffn_decode_bad_inputs():
    Wg, Wu, Wd = torch.randn(8, 12), torch.randn(8, 12), torch.randn(12, 8)
    P = kc.prepare_relu_ffn_cpu(Wg, Wu, Wd)
    with pytest.raises(ValueError, match="Wut"):  # Wu given untransposed
        kc.relu_ffn_decode_cpu(torch.randn(8), Wg, Wu, Wd)
    with pytest.raises(ValueError, match="d=9"):
        kc.relu_ffn_decode_cpu(torch.randn(9), *P)
    with pytest.raises(ValueError, match="Wd"):
        kc.prepare_relu_ffn_cpu(Wg, Wu, Wd.t())
    with pytest.raises(TypeError, match="float32 or float64"):
        kc.relu_ffn_decode_cpu(torch.randn(8).half(), *(t.half() for t in P))
    with pytest.raises(ValueError, match="NaN"):
        kc.relu_ffn_decode_cpu(torch.full((8,), math.nan), *P)


# ------------------------------------------------------------------------------------------
# The fused C loop (section 3b) vs the references. It is built with the system C compiler on
# Linux; where it cannot be (no compiler, SPARK_NO_FUSED=1, macOS) these tests skip and say why.
# Tolerance: F32, as the eager float32 path (float32 dot products and row sums in another
# order; the threshold in float64 as the reference).
# ------------------------------------------------------------------------------------------

needs_fused = pytest.mark.skipif(kc._fused_lib() is None, reason=f"fused loop not built: {kc.fused_status()}")


def test_fused_library_builds_in_ci():
    """The fused tests skip where the library cannot be built; so that a broken build cannot turn
    them all into silent skips, CI (CI=true on Linux, which has a C compiler) and anyone who sets
    SPARK_REQUIRE_FUSED=1 require it to build."""
    import os
    import platform

    required = os.environ.get("SPARK_REQUIRE_FUSED") == "1" or (
        os.environ.get("CI") == "true" and platform.system() == "Linux" and not os.environ.get("SPARK_NO_FUSED"))
    if not required:
        pytest.skip("neither CI=true on Linux nor SPARK_REQUIRE_FUSED=1")
    assert kc._fused_lib() is not None, kc.fused_status()


@needs_fused
def test_fused_refuses_strided_weights():
    """The C loop reads each weight as a packed row-major array: a transposed view (K2.t() passed
    as K2t) or an expanded tensor must take the eager path (fused=None, same result as the
    reference) or raise (fused=True), never be read as if it were packed."""
    rng = np.random.default_rng(25)
    d, f, r, k = 24, 60, 8, 9
    K1, K2, V = (_t(a, torch.float32) for a in _spark_weights(d, f, r, rng))
    x = _t(rng.standard_normal(d), torch.float32)
    K2t_view = K2.t()  # [f, d-r] but strided
    V_exp = V[:1].expand(f, d)  # [f, d] with 1 row of storage
    for K2t_, V_ in ((K2t_view, V), (K2t_view.contiguous(), V_exp)):
        ref = spark.spark_ffn_np(x.double().numpy(), K1.double().numpy(), K2t_.t().double().numpy(),
                                 V_.double().numpy(), k, r)
        assert_close("strided weights take the eager path", kc.spark_ffn_decode_cpu(x, K1, K2t_, V_, k, r), ref, **F32)
        with pytest.raises(ValueError, match="contiguous"):
            kc.spark_ffn_decode_cpu(x, K1, K2t_, V_, k, r, fused=True)
    Wg, Wu, Wd = (_t(a, torch.float32) for a in _relu_weights(d, f, rng, 0.5))
    xr = x.clone()
    xr[0] = 1.0
    ref, _ = spark.relu_l1_ffn_np(xr.double().numpy(), Wg.double().numpy(), Wu.double().numpy(), Wd.double().numpy())
    assert_close("relu, Wu.t() as Wut", kc.relu_ffn_decode_cpu(xr, Wg, Wu.t(), Wd), ref, **F32)
    with pytest.raises(ValueError, match="contiguous"):
        kc.relu_ffn_decode_cpu(xr, Wg, Wu.t(), Wd, fused=True)


@needs_fused
@pytest.mark.parametrize("d,f,r,k,lead", [
    (37, 53, 11, 7, ()),  # odd sizes, one token as a vector
    (37, 53, 11, 7, (1,)),  # as a [1, d] row
    (64, 301, 32, 1, (1,)),  # k = 1
    (64, 301, 32, 300, (1,)),  # k = f - 1: nearly every neuron
    (64, 301, 1, 24, ()),  # r = 1
    (64, 301, 63, 24, ()),  # r = d - 1
    (2304, 1382, 1024, 110, ()),  # Gemma-2 2B's d and r (f cut to 1/10): rows of 5 and 9 KB
])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_spark_ffn_matches_reference(d, f, r, k, lead, threads):
    rng = np.random.default_rng(20)
    K1, K2, V = _spark_weights(d, f, r, rng)
    x = rng.standard_normal(lead + (d,))
    prepared = kc.prepare_spark_ffn_cpu(*(_t(a, torch.float32) for a in (K1, K2, V)))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # the loop splits the survivors between torch's threads
    try:
        got = kc.spark_ffn_decode_cpu(_t(x, torch.float32), *prepared, k, r, fused=True)
    finally:
        torch.set_num_threads(old)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_close(f"fused spark_ffn d{d} f{f} r{r} k{k} threads {threads}", got,
                 spark.spark_ffn_np(x, K1, K2, V, k, r), **F32)


@needs_fused
def test_fused_spark_ffn_zero_survivors_and_strided_input():
    rng = np.random.default_rng(21)
    d, f, r = 16, 40, 8
    _, K2, V = _spark_weights(d, f, r, rng)
    K1 = np.zeros((r, f))  # constant scores: std = 0, nobody survives, y = 0 exactly
    prepared = kc.prepare_spark_ffn_cpu(*(_t(a, torch.float32) for a in (K1, K2, V)))
    got = kc.spark_ffn_decode_cpu(torch.randn(d), *prepared, 5, r, fused=True)
    assert not got.any()
    K1, K2, V = _spark_weights(d, f, r, rng)
    prepared = kc.prepare_spark_ffn_cpu(*(_t(a, torch.float32) for a in (K1, K2, V)))
    xs = torch.randn(d, 3)[:, 1]  # a non-contiguous token
    assert_close("fused spark_ffn, strided x", kc.spark_ffn_decode_cpu(xs, *prepared, 5, r, fused=True),
                 spark.spark_ffn_np(xs.double().numpy(), K1, K2, V, 5, r), **F32)


@needs_fused
@pytest.mark.parametrize("d,f,shift", [(33, 71, 0.0), (33, 71, 2.3), (2048, 563, 2.3), (24, 50, "all"), (24, 50, "none")])
def test_fused_relu_ffn_matches_reference(d, f, shift):
    rng = np.random.default_rng(22)
    Wg, Wu, Wd = _relu_weights(d, f, rng, 0.0 if isinstance(shift, str) else shift)
    if isinstance(shift, str):  # every neuron on, or none: the gate is x[0] * (+-1)
        Wg[1:] = 0.0
        Wg[0] = 1.0 if shift == "all" else -1.0
    x = rng.standard_normal(d)
    x[0] = 1.0
    prepared = kc.prepare_relu_ffn_cpu(*(_t(a, torch.float32) for a in (Wg, Wu, Wd)))
    got = kc.relu_ffn_decode_cpu(_t(x, torch.float32), *prepared, fused=True)
    ref, _ = spark.relu_l1_ffn_np(x, Wg, Wu, Wd)
    assert_close(f"fused relu_ffn d{d} f{f} shift {shift}", got, ref, **F32)
    if shift == "none":
        assert not got.any()


@needs_fused
def test_fused_bad_inputs():
    d, f, r = 16, 40, 8
    sp = kc.prepare_spark_ffn_cpu(torch.randn(r, f), torch.randn(d - r, f), torch.randn(f, d))
    rl = kc.prepare_relu_ffn_cpu(torch.randn(d, f), torch.randn(d, f), torch.randn(f, d))
    x = torch.randn(d)
    for bad in (math.nan, math.inf):
        xb = x.clone()
        xb[0] = bad
        with pytest.raises(ValueError, match="NaN"):
            kc.spark_ffn_decode_cpu(xb, *sp, 5, r, fused=True)
    xb = x.clone()
    xb[0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        kc.relu_ffn_decode_cpu(xb, *rl, fused=True)
    with pytest.raises(ValueError, match="one float32 token"):  # two tokens
        kc.spark_ffn_decode_cpu(torch.randn(2, d), *sp, 5, r, fused=True)
    with pytest.raises(ValueError, match="one float32 token"):  # float64
        kc.relu_ffn_decode_cpu(x.double(), *(t.double() for t in rl), fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        kc.relu_ffn_decode_cpu(x, *rl, fused="yes")
    with pytest.raises(ValueError, match="one float32 token"):  # checked for k == f too (a dense path)
        kc.spark_ffn_decode_cpu(torch.randn(2, d), *sp, f, r, fused=True)


def test_fused_unavailable_falls_back_or_says_why(monkeypatch):
    """Without the library, fused=None quietly takes the eager path (same result) and fused=True
    raises naming the reason."""
    monkeypatch.setitem(kc._FUSED, "lib", None)
    monkeypatch.setitem(kc._FUSED, "status", "eager PyTorch (fused loop unavailable: test)")
    d, f, r = 16, 40, 8
    rng = np.random.default_rng(23)
    K1, K2, V = _spark_weights(d, f, r, rng)
    sp = kc.prepare_spark_ffn_cpu(*(_t(a, torch.float32) for a in (K1, K2, V)))
    x = rng.standard_normal(d)
    assert_close("eager fallback", kc.spark_ffn_decode_cpu(_t(x, torch.float32), *sp, 5, r),
                 spark.spark_ffn_np(x, K1, K2, V, 5, r), **F32)
    with pytest.raises(ValueError, match="unavailable: test"):
        kc.spark_ffn_decode_cpu(_t(x, torch.float32), *sp, 5, r, fused=True)


# ------------------------------------------------------------------------------------------
# Spark attention decode vs spark.spark_attention_np (T = 1)
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
    """generate_cpu passes [:, :, :n] views of a [B, Hkv, capacity, *] buffer: no copy, same result."""
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
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    k1, k2, vv = kc.prepare_spark_kv_cpu(k, v, 3)
    with pytest.raises(ValueError, match="one new token"):
        kc.spark_attention_decode_cpu(torch.randn(1, 4, 2, 8), k1, k2, vv, 4, 3)
    with pytest.raises(ValueError, match="k1"):  # r does not match the split
        kc.spark_attention_decode_cpu(q, k1, k2, vv, 4, 4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kc.spark_attention_decode_cpu(torch.randn(1, 3, 1, 8), k1, k2, vv, 4, 3)
    with pytest.raises(ValueError, match="k_top"):
        kc.spark_attention_decode_cpu(q, k1, k2, vv, 0, 3)
    with pytest.raises(ValueError, match="empty"):
        kc.spark_attention_decode_cpu(q, k1[:, :, :0], k2[:, :, :0], vv[:, :, :0], 4, 3)
    with pytest.raises(ValueError, match="r must be"):
        kc.prepare_spark_kv_cpu(k, v, 8)
    with pytest.raises(TypeError, match="dtype"):
        kc.spark_attention_decode_cpu(q.double(), k1, k2, vv, 4, 3)


@pytest.mark.parametrize("B,H,Hkv,n,hd", [(1, 2, 2, 30, 16), (2, 6, 3, 17, 8), (1, 4, 1, 1, 6)])
def test_attention_decode_cpu_matches_reference(B, H, Hkv, n, hd):
    """The dense baseline of the benchmark computes spark.attention_np's T = 1 case."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((B, H, 1, hd))
    k = rng.standard_normal((B, Hkv, n, hd))
    v = rng.standard_normal((B, Hkv, n, hd))
    ref = spark.attention_np(q, k, v)
    got = kc.attention_decode_cpu(_t(q, torch.float64), _t(k, torch.float64), _t(v, torch.float64))
    assert_close(f"attention_decode_cpu B{B} H{H}/{Hkv} n{n}", got, ref, **F64)


def test_attention_decode_cpu_bad_inputs():
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="H % Hkv"):
        kc.attention_decode_cpu(q, k, k)
    with pytest.raises(ValueError, match="H % Hkv"):  # two new tokens: not a decode step
        kc.attention_decode_cpu(torch.randn(1, 2, 2, 8), k, k)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gated_ffn_decode_cpu_matches_reference(act):
    """The dense FFN baseline computes spark.gated_ffn_np."""
    rng = np.random.default_rng(12)
    d, f = 24, 61
    Wg, Wu, Wd = rng.standard_normal((d, f)), rng.standard_normal((d, f)), rng.standard_normal((f, d))
    x = rng.standard_normal((3, d))
    ref = spark.gated_ffn_np(x, Wg, Wu, Wd, act)
    got = kc.gated_ffn_decode_cpu(*(_t(a, torch.float64) for a in (x, Wg, Wu, Wd)), act)
    assert_close(f"gated_ffn_decode_cpu {act}", got, ref, **F64)


# ------------------------------------------------------------------------------------------
# Statistical top-k over rows vs topk.statistical_topk_np / topk.statistical_topk
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k", [
    ((5, 7, 1000), 80),  # leading dims, D not a power of two
    ((40, 16384), 1311),  # 16 rows per 1 MB block: 3 blocks, the last one partial
    ((3, 1), 1),  # D = 1, k = D: returned unchanged
    ((6, 3), 1),  # tiny rows
    ((9, 1000), 1),  # k = 1
    ((9, 1000), 999),  # k = D - 1
    ((0, 50), 5),  # no rows at all
])
@pytest.mark.parametrize("fill,soft", [(0.0, True), (0.0, False), (-1.5, True), (-math.inf, False)])
@pytest.mark.parametrize("fused", [False, None], ids=["eager", "auto"])
def test_statistical_topk_cpu_matches_reference(shape, k, fill, soft, fused):
    """fused=None takes section 3b's C row loop for float32, soft, fill 0 (when it is built)."""
    rng = np.random.default_rng(9)
    x = 0.3 + 2.0 * rng.standard_normal(shape)
    ref = topk.statistical_topk_np(x, k, fill, soft)  # float64
    got64 = kc.statistical_topk_cpu(_t(x, torch.float64), k, fill, soft, fused=fused)
    assert_close(f"statistical_topk_cpu float64 {shape} k{k}", got64, ref, **F64)
    # float32 against the float64 reference: theta is within ~1e-6 std of the reference's (one-pass
    # variance from float32 sums, see kernels_cpu.py); an entry that close to theta may land on the
    # other side and then differs by |x - theta| ~ 1e-6 std = 2e-6 here (std 2), plus float32
    # rounding of x - theta (~1e-6 for |x| ~ 8). 1e-5 absolute leaves a margin of 3-5x.
    got32 = kc.statistical_topk_cpu(_t(x, torch.float32), k, fill, soft, fused=fused)
    assert got32.dtype == torch.float32
    assert_close(f"statistical_topk_cpu float32 {shape} k{k}", got32, ref, atol=1e-5, rtol=1e-6)


def test_statistical_topk_cpu_in_place():
    """out=x overwrites x with the result (the fastest form), for the fast path and the general one."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((50, 3000))
    for fill, soft in [(0.0, True), (-1.0, False)]:
        ref = topk.statistical_topk_np(x, 100, fill, soft)
        xt = torch.tensor(x)  # a copy: x itself stays intact
        got = kc.statistical_topk_cpu(xt, 100, fill, soft, out=xt)
        assert got is xt
        assert_close(f"in place, fill {fill} soft {soft}", xt, ref, **F64)


def test_statistical_topk_cpu_k_equals_d_returns_input():
    x = torch.randn(4, 9)
    assert kc.statistical_topk_cpu(x, 9) is x


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_statistical_topk_cpu_half_precision(dtype, atol):
    """Statistics in float32, one rounding to the output dtype, like topk.statistical_topk."""
    x = (torch.randn(33, 700) * 2 + 0.5).to(dtype)
    got = kc.statistical_topk_cpu(x, 50)
    ref = topk.statistical_topk(x, 50)
    assert got.dtype == dtype
    assert_close(f"statistical_topk_cpu {dtype}", got, ref, atol=atol, rtol=1e-2)


def test_statistical_topk_cpu_constant_and_nan_rows():
    x = torch.randn(5, 64)
    x[1] = 3.25  # constant row: theta = 3.25, std = 0, no survivor (topk.py's definition)
    x[3, 10] = math.nan  # a NaN row comes out all NaN; the other rows are untouched
    for fill, soft in [(0.0, True), (-1.0, False)]:
        got = kc.statistical_topk_cpu(x, 6, fill, soft)
        ref = topk.statistical_topk(x, 6, fill, soft)
        assert (got[1] == fill).all()
        assert torch.isnan(got[3]).all()
        keep = torch.tensor([0, 2, 4])
        assert_close(f"finite rows, fill {fill}", got[keep], ref[keep], atol=2e-6, rtol=1e-6)


def test_statistical_topk_cpu_out_and_noncontiguous():
    x = torch.randn(64, 300).t()  # [300, 64], not contiguous
    out = torch.empty(300, 64)
    got = kc.statistical_topk_cpu(x, 7, out=out)
    assert got is out
    assert_close("out=, non-contiguous x", got, topk.statistical_topk(x, 7), atol=2e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="out"):
        kc.statistical_topk_cpu(x, 7, out=torch.empty(300, 63))


def test_statistical_topk_cpu_gradient():
    """Analytic backward (through the threshold) vs autograd through topk.statistical_topk."""
    x = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kc.statistical_topk_cpu(t, 6), (x,))
    assert torch.autograd.gradcheck(lambda t: kc.statistical_topk_cpu(t, 6, -2.0, False), (x,))
    g = torch.randn(4, 37, dtype=torch.float64)
    (ours,) = torch.autograd.grad(kc.statistical_topk_cpu(x, 6), x, g)
    (ref,) = torch.autograd.grad(topk.statistical_topk(x, 6), x, g)
    assert_close("gradient vs topk.statistical_topk", ours, ref, **F64)
    c = torch.full((2, 5), 1.5, dtype=torch.float64, requires_grad=True)  # constant rows: zero gradient, no NaN
    (gc,) = torch.autograd.grad(kc.statistical_topk_cpu(c, 2).sum(), c)
    assert torch.equal(gc, torch.zeros_like(gc))


def test_statistical_topk_cpu_bad_inputs():
    with pytest.raises(ValueError, match="1 <= k"):
        kc.statistical_topk_cpu(torch.randn(3, 5), 0)
    with pytest.raises(ValueError, match="1 <= k"):
        kc.statistical_topk_cpu(torch.randn(3, 5), 6)
    with pytest.raises(ValueError, match="1 <= k"):
        kc.statistical_topk_cpu(torch.randn(3, 5), 2.0)
    with pytest.raises(TypeError, match="floating"):
        kc.statistical_topk_cpu(torch.ones(3, 5, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kc.statistical_topk_cpu(np.ones((3, 5)), 2)
    with pytest.raises(ValueError, match="scalar"):
        kc.statistical_topk_cpu(torch.tensor(1.0), 1)


@needs_fused
def test_statistical_topk_cpu_fused_modes_and_special_rows():
    """The C row loop: allocating, out=, in place; constant row (no survivor) and NaN row (all
    NaN) as the reference defines them; float32 tolerance as in the reference test above."""
    rng = np.random.default_rng(24)
    x = 0.3 + 2.0 * rng.standard_normal((37, 2000))
    x[4] = -0.75
    x[9, 3] = math.nan
    ok = np.ones(37, dtype=bool)
    ok[9] = False
    ref = topk.statistical_topk_np(np.where(np.isnan(x), 0.0, x), 150)  # (the reference refuses NaN)
    for mode in ("allocating", "out=", "in place"):
        xt = _t(x, torch.float32)
        out = {"allocating": None, "out=": torch.empty_like(xt), "in place": xt}[mode]
        got = kc.statistical_topk_cpu(xt, 150, out=out, fused=True)
        assert out is None or got is out
        assert (got[4] == 0).all() and torch.isnan(got[9]).all()
        assert_close(f"fused statistical top-k, {mode}", got[torch.from_numpy(ok)], ref[ok], atol=1e-5, rtol=1e-6)


@needs_fused
def test_statistical_topk_cpu_fused_gradient_and_bad_inputs():
    x = (torch.randn(6, 300) * 1.5 + 0.2).requires_grad_(True)
    g = torch.randn(6, 300)
    (ours,) = torch.autograd.grad(kc.statistical_topk_cpu(x, 30, fused=True), x, g)
    (ref,) = torch.autograd.grad(topk.statistical_topk(x, 30), x, g)
    # float32 on both sides, statistics summed in a different order (float64 sums here, float32
    # in topk.py): theta differs by ~1e-7 std, which moves the gradient's mean/std terms by about
    # as much; an entry that close to theta could flip its mask (an O(1) change at one entry).
    # 1e-5 absolute covers the rounding with a 10x margin; a flipped entry would fail it.
    assert_close("fused statistical top-k gradient (float32)", ours, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="soft=True"):
        kc.statistical_topk_cpu(torch.randn(3, 50).double(), 5, fused=True)
    with pytest.raises(ValueError, match="soft=True"):
        kc.statistical_topk_cpu(torch.randn(3, 50), 5, -1.0, fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        kc.statistical_topk_cpu(torch.randn(3, 50), 5, fused=1)


# ------------------------------------------------------------------------------------------
# generate_cpu vs spark.GPT.generate
# ------------------------------------------------------------------------------------------


def _tiny(ffn, attn, **kw):
    torch.manual_seed(0)
    cfg = spark.GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                          ffn=ffn, attn=attn, attn_k=6, **kw)
    model = spark.GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the sparse paths select sharply
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


@pytest.mark.parametrize("ffn,attn", [("spark", "spark"), ("dense", "dense"), ("relu_l1", "dense"),
                                      ("stat_topk", "spark"), ("dense", "spark")])
def test_generate_cpu_matches_model_generate(ffn, attn):
    model = _tiny(ffn, attn)
    idx = torch.randint(0, 97, (2, 5))
    # 40 new tokens with block_size 24: the window slides and the cache is rebuilt, as in generate
    want, want_logits = model.generate(idx, 40, temperature=0, return_logits=True)
    got, got_logits = kc.generate_cpu(model, idx, 40, temperature=0, return_logits=True)
    assert torch.equal(got, want), "greedy tokens differ from model.generate"
    assert_close("decode logits", got_logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.manual_seed(5)
    want = model.generate(idx, 12, temperature=0.9, top_k=10)
    torch.manual_seed(5)
    got = kc.generate_cpu(model, idx, 12, temperature=0.9, top_k=10)
    assert torch.equal(got, want), "sampled tokens differ from model.generate with the same seed"


def test_generate_cpu_bad_inputs():
    model = _tiny("spark", "spark")
    idx = torch.zeros(1, 3, dtype=torch.int64)
    assert torch.equal(kc.generate_cpu(model, idx, 0), idx)
    with pytest.raises(TypeError, match="spark.GPT"):
        kc.generate_cpu(torch.nn.Linear(2, 2), idx, 3)
    with pytest.raises(TypeError, match="idx"):
        kc.generate_cpu(model, idx.float(), 3)
    with pytest.raises(ValueError, match="token ids"):
        kc.generate_cpu(model, idx + 97, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kc.generate_cpu(model, idx, -1)
    with pytest.raises(ValueError, match="temperature"):
        kc.generate_cpu(model, idx, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        kc.generate_cpu(model, idx, 3, top_k=0)


# ------------------------------------------------------------------------------------------
# The benchmark code runs (tiny shapes; no timing is checked)
# ------------------------------------------------------------------------------------------


def test_benchmark_records_have_the_shared_format():
    gen = torch.Generator().manual_seed(0)
    ffn = kc.bench_spark_ffn(d=64, f_gated=96, r=32, reps=1, gen=gen) + kc.bench_relu_ffn(d=64, f=96, density=0.1,
                                                                                       reps=1, gen=gen)
    # one record per path: eager always, fused when the loop is built
    assert [r["path"] for r in ffn] == (["eager", "fused"] * 2 if kc._fused_lib() is not None else ["eager"] * 2)
    recs = ffn + [kc.bench_spark_attention(n=40, H=2, hd=16, k_top=8, r=8, reps=1, gen=gen)]
    recs += kc.bench_statistical_topk(R=8, D=256, reps=1, gen=gen)
    for r in recs:
        assert {"name", "baseline_ms", "ms", "speedup", "limit"} <= set(r)
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["limit"] > 0
