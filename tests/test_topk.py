"""Tests for topk.py: every torch function against its NumPy reference, gradients, edge cases.

Tolerances (output = x - theta for soft statistical top-k; values are O(1) in these tests):
- float64: both sides compute in float64 and differ only in summation order, so errors are
  ~1e-15 relative; we allow atol = rtol = 1e-10.
- float32: torch computes mean and std in float32 (relative error ~1e-7 * a few), so theta and
  x - theta are off by ~1e-6 at unit scale: atol = rtol = 2e-5.
- bfloat16 / float16: the statistics are float32, then the output is rounded to the input dtype:
  half an ulp is 2^-9 (bf16) / 2^-11 (fp16) relative, so rtol = one ulp = 2^-8 / 2^-10, plus
  atol = 2e-5 for the float32 threshold error on outputs near zero.
Entries that lie within the threshold error of theta may survive on one side and not on the
other. For the soft operator this is harmless (the value there is ~0 either way, covered by
atol). For soft=False (survivors keep their value: a jump) we compare exactly away from theta
and accept either outcome inside a band of width `band` around it.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_close
import topk
from topk import (
    achieved_k,
    exact_topk,
    exact_topk_np,
    normal_icdf,
    statistical_threshold,
    statistical_threshold_np,
    statistical_topk,
    statistical_topk_np,
)

TOL = {  # dtype -> (atol, rtol), see the module docstring
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2.0**-8),
    torch.float16: (2e-5, 2.0**-10),
}

# (D, k) on awkward shapes: D = 1, 3, 1000, 16384 with k = 1, D-1, D (and 8 % for the big one)
SHAPES = [(1, 1), (3, 1), (3, 2), (3, 3), (1000, 1), (1000, 999), (1000, 1000), (1000, 80), (16384, 1), (16384, 16383), (16384, 1311)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_x(lead, D, dtype, scale=1.0, shift=0.3):
    """Random rows in `dtype` (torch) and the *same values* as a float64 NumPy array."""
    xt = (shift + scale * torch.randn(*lead, D, dtype=torch.float64)).to(dtype)
    return xt, xt.double().numpy()


# ------------------------------------------------------------------------------------------
# torch vs NumPy reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,k", SHAPES)
def test_statistical_topk_soft_matches_reference(D, k, dtype):
    xt, xn = make_x((2, 3), D, dtype)
    atol, rtol = TOL[dtype]
    got = statistical_topk(xt, k)
    assert got.dtype == dtype and got.shape == xt.shape
    assert_close(f"statistical_topk D={D} k={k} {dtype}", got, statistical_topk_np(xn, k), atol, rtol)
    # the threshold itself, in >= float32
    th = statistical_threshold(xt, k)
    assert th.shape == (2, 3, 1) and th.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(f"statistical_threshold D={D} k={k} {dtype}", th, statistical_threshold_np(xn, k), 2e-5 if dtype != torch.float64 else 1e-10, 2e-5 if dtype != torch.float64 else 1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", [0.0, -math.inf])
def test_statistical_topk_hard_matches_reference_away_from_theta(dtype, fill):
    D, k = 1000, 80
    xt, xn = make_x((4,), D, dtype)
    got = statistical_topk(xt, k, fill=fill, soft=False).double().numpy()
    ref = statistical_topk_np(xn, k, fill=fill, soft=False)
    theta = statistical_threshold_np(xn, k)
    band = 1e-12 if dtype == torch.float64 else 1e-4  # float32 statistics: theta is off by ~1e-6
    far = np.abs(xn - theta) > band
    assert_close(f"soft=False away from theta, {dtype}", got[far], ref[far], 0.0, 0.0)
    near = ~far  # inside the band either outcome is right: the value or the fill
    assert np.all((got[near] == xn[near]) | (got[near] == fill))


def _check_exact_topk(got, x, k, fill):
    """Tie-robust check of an exact top-k result (REFERENCE.md §1: which tied entry survives is
    implementation-defined): k survivors per row, each equal to the input at its position, and
    the multiset of kept values equal to the k largest values of the row."""
    got = np.asarray(got, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    kept = got != fill
    counts = kept.sum(-1)
    assert np.all(counts == k), f"rows keep {np.unique(counts)} entries, expected k={k}"
    assert_close("kept entries equal the input there", got[kept], x[kept], 0.0, 0.0)
    kept_sorted = np.sort(np.where(kept, got, -np.inf), axis=-1)[..., -k:]
    true_sorted = np.sort(x, axis=-1)[..., -k:]
    assert_close("kept values are the k largest", kept_sorted, true_sorted, 0.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,k", SHAPES)
def test_exact_topk_matches_reference(D, k, dtype):
    fill = -math.inf if k == D - 1 else 0.0  # exercise both fills; -inf also makes kept zeros countable
    xt, xn = make_x((2, 3), D, dtype)
    got = exact_topk(xt, k, fill=fill)
    assert got.dtype == dtype and got.shape == xt.shape
    if k == D:
        assert got is xt  # k == D: returned unchanged
        assert exact_topk_np(xn, k) is xn
        return
    _check_exact_topk(got.double().numpy(), xn, k, fill)
    _check_exact_topk(exact_topk_np(xn, k, fill=fill), xn, k, fill)


def test_matches_gemma3n_operator():
    """REFERENCE.md §2: Gemma 3n computes cutoff = mean + std(unbiased=False) * icdf(p), then
    relu(x - cutoff), with p the target sparsity. Written here independently with
    torch.distributions (not our normal_icdf) to check our operator is the same one."""
    x = torch.randn(8, 2048, dtype=torch.float64) * 1.7 + 0.2
    for p in (0.95, 0.92, 0.5, 0.99):
        k = round((1 - p) * x.shape[-1])
        p_exact = 1 - k / x.shape[-1]
        icdf = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p_exact, dtype=torch.float64))
        cutoff = x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False) * icdf
        gemma = torch.relu(x - cutoff)
        assert_close(f"gemma3n p={p}", statistical_topk(x, k), gemma, 1e-12, 1e-12)
        assert_close(f"gemma3n numpy p={p}", statistical_topk_np(x.numpy(), k), gemma, 1e-12, 1e-12)
    assert abs(normal_icdf(0.95) - 1.6448536) < 1e-7  # Gemma 3n's multiplier for p = 0.95


def test_gaussian_rows_achieve_k_within_5_percent():
    """i.i.d. Gaussian rows, D = 16384, k = 8 %: the mean achieved k is within 5 % of k."""
    D = 16384
    k = round(0.08 * D)
    x = torch.randn(64, D) * 3.0 - 1.0
    got = achieved_k(statistical_topk(x, k)).double().mean().item()
    assert abs(got / k - 1) < 0.05, f"mean achieved k {got:.1f} vs k {k}"
    got_np = achieved_k(statistical_topk_np(x.double().numpy(), k)).mean()
    assert abs(got_np / k - 1) < 0.05, f"numpy: mean achieved k {got_np:.1f} vs k {k}"


def test_achieved_k_counts():
    y = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert achieved_k(y).tolist() == [2, 0]
    assert achieved_k(torch.tensor(y)).tolist() == [2, 0]
    y2 = np.array([[-np.inf, 0.0, -1.0]])
    assert achieved_k(y2, fill=-np.inf).tolist() == [2]
    with pytest.raises(ValueError, match="at least one axis"):
        achieved_k(np.float64(1.0))


# ------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck, including through the threshold)
# ------------------------------------------------------------------------------------------


def test_gradcheck_statistical_topk_and_threshold():
    # A row with a clear gap around theta: finite differences (eps 1e-6) never cross it.
    x = torch.randn(3, 40, dtype=torch.float64)
    k = 6
    th = statistical_threshold(x, k)
    gap = (x - th).abs().min().item()
    assert gap > 1e-4, "test input too close to theta for finite differences"
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: statistical_topk(t, k), (x,))
    assert torch.autograd.gradcheck(lambda t: statistical_topk(t, k, soft=False), (x,))
    assert torch.autograd.gradcheck(lambda t: statistical_threshold(t, k), (x,))
    # the threshold is not detached: survivors' gradient includes the -d(theta)/dx terms
    y = statistical_topk(x, k).sum()
    (g,) = torch.autograd.grad(y, x)
    assert not torch.allclose(g, (statistical_topk(x, k) > 0).double()), "gradient ignores theta"


def test_gradcheck_exact_topk():
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: exact_topk(t, 5), (x,))
    assert torch.autograd.gradcheck(lambda t: exact_topk(t, 1, fill=-1.0), (x,))


# ------------------------------------------------------------------------------------------
# Defined edge cases
# ------------------------------------------------------------------------------------------

ALL_OPS = [
    ("exact_topk_np", exact_topk_np, False),
    ("statistical_threshold_np", statistical_threshold_np, False),
    ("statistical_topk_np", statistical_topk_np, False),
    ("exact_topk", exact_topk, True),
    ("statistical_threshold", statistical_threshold, True),
    ("statistical_topk", statistical_topk, True),
]


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=[o[0] for o in ALL_OPS])
@pytest.mark.parametrize("bad_k", [0, -1, 6, 2.0, 1.5, "3", None, True])
def test_bad_k_raises_naming_k_and_D(name, fn, is_torch, bad_k):
    x = torch.randn(2, 5) if is_torch else np.random.randn(2, 5)
    with pytest.raises(ValueError) as e:
        fn(x, bad_k)
    assert "k" in str(e.value) and "D=5" in str(e.value)


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=[o[0] for o in ALL_OPS])
def test_numpy_integer_k_accepted_and_empty_last_axis_rejected(name, fn, is_torch):
    x = torch.randn(2, 5) if is_torch else np.random.randn(2, 5)
    fn(x, np.int64(2))
    empty = torch.randn(2, 0) if is_torch else np.random.randn(2, 0)
    with pytest.raises(ValueError, match="empty"):
        fn(empty, 1)


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=[o[0] for o in ALL_OPS])
def test_bad_x_types(name, fn, is_torch):
    if is_torch:
        with pytest.raises(TypeError, match="floating"):
            fn(torch.arange(10).reshape(2, 5), 2)
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(np.random.randn(2, 5), 2)
        with pytest.raises(ValueError, match="scalar"):
            fn(torch.tensor(1.0), 1)
    else:
        with pytest.raises(TypeError, match="floating"):
            fn(np.arange(10).reshape(2, 5), 2)
        with pytest.raises(ValueError, match="scalar"):
            fn(np.float64(1.0), 1)


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=[o[0] for o in ALL_OPS])
def test_leading_dims_of_size_zero(name, fn, is_torch):
    x = torch.randn(0, 3, 7) if is_torch else np.random.randn(0, 3, 7)
    out = fn(x, 3)
    expected = (0, 3, 1) if "threshold" in name else (0, 3, 7)
    assert tuple(out.shape) == expected


def test_k_equal_D_returns_input_unchanged():
    xt = torch.randn(4, 9)
    xn = xt.numpy()
    assert statistical_topk(xt, 9) is xt and exact_topk(xt, 9) is xt
    assert statistical_topk_np(xn, 9) is xn and exact_topk_np(xn, 9) is xn
    assert torch.all(statistical_threshold(xt, 9) == -math.inf)
    assert np.all(statistical_threshold_np(xn, 9) == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_rows_have_no_survivors_and_no_nan(dtype):
    """std = 0: theta = the row's value, nothing is strictly above it, so every entry is `fill`."""
    vals = [0.1, -2.2, 1 / 3, 7.7, 0.0, 123.456]
    D = 1001
    xt = torch.tensor(vals, dtype=torch.float64)[:, None].expand(len(vals), D).to(dtype)
    xn = xt.double().numpy()
    for soft in (True, False):
        for fill in (0.0, -math.inf):
            out_t = statistical_topk(xt, 80, fill=fill, soft=soft)
            out_n = statistical_topk_np(xn, 80, fill=fill, soft=soft)
            assert not torch.isnan(out_t).any() and not np.isnan(out_n).any()
            assert achieved_k(out_t, fill=fill).tolist() == [0] * len(vals)
            assert achieved_k(out_n, fill=fill).tolist() == [0] * len(vals)
    assert_close("theta of constant rows = the value", statistical_threshold(xt, 80), xn[:, :1], 0.0, 0.0)
    assert_close("theta_np of constant rows = the value", statistical_threshold_np(xn, 80), xn[:, :1], 0.0, 0.0)


def test_nan_rows():
    x = np.random.randn(3, 50)
    x[1, 7] = np.nan
    for fn in (exact_topk_np, statistical_topk_np, statistical_threshold_np):
        with pytest.raises(ValueError, match="NaN"):
            fn(x, 5)
    xt = torch.tensor(x)
    clean = torch.tensor(x[[0, 2]])
    # statistical: the NaN row is all NaN, the other rows are exactly what they are alone
    out = statistical_topk(xt, 5)
    assert torch.isnan(out[1]).all()
    assert_close("rows without NaN unaffected", out[[0, 2]], statistical_topk(clean, 5), 0.0, 0.0)
    out = statistical_topk(xt, 5, soft=False, fill=-math.inf)
    assert torch.isnan(out[1]).all()
    # exact: torch.topk ranks NaN first, so it is kept; other rows unaffected
    out = exact_topk(xt, 5)
    assert torch.isnan(out[1, 7]) and achieved_k(out[1]).item() == 5
    assert_close("exact: rows without NaN unaffected", out[[0, 2]], exact_topk(clean, 5), 0.0, 0.0)


def test_non_contiguous_input():
    base = torch.randn(300, 40, dtype=torch.float64)
    xt = base.t()  # [40, 300], last axis has stride 40
    assert not xt.is_contiguous()
    # float64; strided rows are reduced in another order, so equal to rounding (1e-12), not bitwise
    assert_close("stat non-contiguous", statistical_topk(xt, 17), statistical_topk(xt.contiguous(), 17), 1e-12, 1e-12)
    assert_close("exact non-contiguous", exact_topk(xt, 17), exact_topk(xt.contiguous(), 17), 0.0, 0.0)
    xn = base.numpy().T
    assert_close("np stat non-contiguous", statistical_topk_np(xn, 17), statistical_topk_np(np.ascontiguousarray(xn), 17), 1e-12, 1e-12)  # NumPy sums strided rows in another order
    assert_close("np vs torch non-contiguous", statistical_topk(xt, 17), statistical_topk_np(xn, 17), 1e-10, 1e-10)


def test_normal_icdf():
    assert abs(normal_icdf(0.5)) < 1e-15
    assert abs(normal_icdf(0.92) - 1.4050715603) < 1e-9
    assert abs(normal_icdf(0.025) + 1.9599639845) < 1e-9
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="p must be"):
            normal_icdf(p)


# ------------------------------------------------------------------------------------------
# GPU only: runs on CUDA and never synchronises with the host
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_without_host_sync(dtype):
    x = torch.randn(64, 4096, dtype=dtype)
    xc = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        ys = statistical_topk(xc, 300)
        yh = statistical_topk(xc, 300, fill=-math.inf, soft=False)
        ye = exact_topk(xc, 300)
        n = achieved_k(ys)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    atol, rtol = TOL[dtype]
    assert_close("cuda statistical_topk", ys, statistical_topk(x, 300), atol, rtol)
    assert_close("cuda achieved_k", n, achieved_k(statistical_topk(x, 300)), 2, 0)  # float32 reduction order can flip an entry at theta
    _check_exact_topk(ye.double().cpu().numpy(), x.double().numpy(), 300, 0.0)
    assert (achieved_k(yh, fill=-math.inf) > 0).all()


@pytest.mark.gpu
def test_cuda_backward_matches_cpu():
    """The analytic backward (survivors from the output via threshold_backward) on CUDA."""
    x = torch.randn(64, 4096, dtype=torch.float64)
    g = torch.randn(64, 4096, dtype=torch.float64)
    grads = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_(True)
        (gx,) = torch.autograd.grad(statistical_topk(xd, 300), xd, g.to(dev))
        grads.append(gx.cpu())
    assert_close("cuda backward", grads[1], grads[0], 1e-10, 1e-9)  # float64: reduction order only


# ------------------------------------------------------------------------------------------
# The demonstration runs and writes its JSON records
# ------------------------------------------------------------------------------------------


def test_demo_json(tmp_path):
    out = tmp_path / "topk.json"
    proc = subprocess.run(
        [sys.executable, topk.__file__, "--rows", "4", "--timing-rows", "8", "--reps", "1", "--no-plot", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    recs = json.loads(out.read_text())
    timing = [r for r in recs if "baseline_ms" in r]
    assert len(timing) == 1
    for key in ("name", "baseline_ms", "ms", "speedup", "limit"):
        assert key in timing[0]
    assert timing[0]["speedup"] == pytest.approx(timing[0]["baseline_ms"] / timing[0]["ms"])
    assert {r["name"] for r in recs} >= {"achieved_k/gaussian", "achieved_k/student_t3"}


def test_assert_close_reports_where_it_fails():
    """The harness itself: a failure names the quantity, the max errors and where they occur."""
    ref = np.zeros((3, 4))
    got = ref.copy()
    got[2, 1] = 0.5
    with pytest.raises(AssertionError) as e:
        assert_close("demo", got, ref, 1e-3, 0.0)
    msg = str(e.value)
    assert "demo" in msg and "max abs err 5.000e-01 at (2, 1)" in msg
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_close("nan", np.array([np.nan]), np.array([0.0]), 1.0, 1.0)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close("shape", np.zeros(3), np.zeros(4), 1.0, 1.0)
    assert_close("within tolerance", got, ref, 0.5, 0.0)


@pytest.mark.parametrize("soft", [True, False])
def test_analytic_gradient_equals_autograd_of_plain_ops(soft):
    """statistical_topk's hand-written backward vs autograd through the plain formula, at a
    realistic width (D = 1000) and with a constant row (its gradient must be 0, not NaN)."""
    x = torch.randn(5, 1000, dtype=torch.float64)
    x[3] = 0.7  # constant row
    g = torch.randn(5, 1000, dtype=torch.float64)
    k = 80
    x1 = x.clone().requires_grad_(True)
    (statistical_topk(x1, k, soft=soft) * g).sum().backward()
    x2 = x.clone().requires_grad_(True)
    theta = statistical_threshold(x2, k)  # plain ops, autograd all the way
    plain = torch.where(x2 > theta, x2 - theta if soft else x2, torch.zeros((), dtype=x2.dtype))
    (plain * g).sum().backward()
    assert_close(f"analytic grad soft={soft}", x1.grad, torch.nan_to_num(x2.grad), 1e-12, 1e-10)
    assert torch.all(x1.grad[3] == 0)


def test_gradient_from_output_mask_equals_gradient_from_threshold():
    """statistical_topk_grad has two ways to find the survivors: from the forward's output
    (out > 0, the fast path statistical_topk uses) and from z > theta (used without `out`, e.g.
    by kernels_cpu.py). Both must give the same gradient, constant and NaN rows included."""
    D, k = 300, 30
    q = topk.normal_icdf(1.0 - k / D)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        z = torch.randn(6, D, dtype=dtype) * 2.0 + 0.5
        z[2] = -1.25  # constant row: no survivors, zero gradient
        z[4, 7] = math.nan  # NaN row: NaN gradient in both
        g = torch.randn(6, D, dtype=dtype)
        mean, std, c = topk._row_mean_std(z)
        out = c.sub_(std * q).clamp_min_(0.0)
        a = topk.statistical_topk_grad(g, z, mean, std, q, True, out)
        b = topk.statistical_topk_grad(g, z, mean, std, q, True)
        ok = torch.ones(6, dtype=torch.bool)
        ok[4] = False
        assert_close(f"grad {dtype}", a[ok], b[ok], tol, tol)
        assert torch.all(a[2] == 0) and torch.isnan(a[4]).all() and torch.isnan(b[4]).all()


def test_out_is_ignored_for_the_hard_gradient_and_in_place_edits_are_caught():
    """soft=False outputs z m, which can be <= 0 on a survivor (theta < 0): statistical_topk_grad
    must not take survivors from it. And since the soft backward reads its output, editing the
    output in place before backward must raise, not give a wrong gradient."""
    D, k = 200, 150  # a large k: theta < 0, so negative survivors exist
    q = topk.normal_icdf(1.0 - k / D)
    z = torch.randn(3, D, dtype=torch.float64)
    g = torch.randn(3, D, dtype=torch.float64)
    mean, std, _ = topk._row_mean_std(z)
    hard_out = torch.where(z > mean + q * std, z, torch.zeros((), dtype=z.dtype))
    assert (hard_out < 0).any()
    assert torch.equal(topk.statistical_topk_grad(g, z, mean, std, q, False, hard_out),
                       topk.statistical_topk_grad(g, z, mean, std, q, False))
    x = torch.randn(4, 50, requires_grad=True)
    y = statistical_topk(x, 10)
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()
