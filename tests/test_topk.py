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

Independent checks. Our NumPy references and torch versions were written from the same reading
of the paper, so agreeing with each other cannot show that reading right. Gemma 3n's operator,
rebuilt from torch.distributions and torch's own std, checks the formula; finite differences
(gradcheck) and autograd through plain ops check the hand-written backward; i.i.d. Gaussian
rows check that theta really keeps about k entries.
"""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import assert_close
import topk
from topk import achieved_k, exact_topk, exact_topk_np, normal_icdf
from topk import statistical_threshold, statistical_threshold_np, statistical_topk, statistical_topk_np

TOL = {  # dtype -> (atol, rtol), see the module docstring
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2.0**-8),
    torch.float16: (2e-5, 2.0**-10),
}

# (D, k) on awkward shapes: D = 1, 3, 1000, 16384 with k = 1, D-1, D (and 8 % for the big one).
# D = 1 and k = D take the early return (x itself). D = 3 is far from Gaussian, but the operator
# is a formula and must match it anyway: Q(2/3) = 0.43 and Q(1/3) = -0.43. k = 1 and k = D - 1
# put theta in the tails, Q(1 - 1/D) and Q(1/D) = +-3.09 at D = 1000. D = 16384 makes the
# float32 sums longest; k = 1311 and 80 are Spark's 8 %.
SHAPES = [(1, 1), (3, 1), (3, 2), (3, 3), (1000, 1), (1000, 999), (1000, 1000), (1000, 80), (16384, 1), (16384, 16383), (16384, 1311)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_x(lead, D, dtype, scale=1.0, shift=0.3):
    """Random rows in `dtype` (torch) and the *same values* as a float64 NumPy array."""
    # Drawn in float64 and rounded once to dtype, then copied back exactly: the rounding is part
    # of the input both sides see, not an error of the comparison. shift 0.3 keeps the mean
    # away from 0, so a theta that forgot the mean is wrong by 0.3, not by nothing.
    xt = (shift + scale * torch.randn(*lead, D, dtype=torch.float64)).to(dtype)
    return xt, xt.double().numpy()


# ------------------------------------------------------------------------------------------
# torch vs NumPy reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,k", SHAPES)
def test_statistical_topk_soft_matches_reference(D, k, dtype):
    """Soft statistical top-k and its threshold equal the NumPy reference in every dtype."""
    xt, xn = make_x((2, 3), D, dtype)
    # The output tolerance is the dtype's (TOL); theta itself is never rounded below float32, so
    # it gets float32's tolerance even for bfloat16 / float16 input.
    atol, rtol = TOL[dtype]
    got = statistical_topk(xt, k)
    assert got.dtype == dtype and got.shape == xt.shape
    assert_close(f"statistical_topk D={D} k={k} {dtype}", got, statistical_topk_np(xn, k), atol, rtol)
    th = statistical_threshold(xt, k)  # in >= float32: the float32 tolerance, or float64's
    assert th.shape == (2, 3, 1) and th.dtype == torch.promote_types(dtype, torch.float32)
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    assert_close(f"statistical_threshold D={D} k={k} {dtype}", th, statistical_threshold_np(xn, k), *tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fill", [0.0, -math.inf])
def test_statistical_topk_hard_matches_reference_away_from_theta(dtype, fill):
    """soft=False: exactly the reference's values, except inside the band where theta's rounding decides."""
    D, k = 1000, 80
    xt, xn = make_x((4,), D, dtype)
    got = statistical_topk(xt, k, fill=fill, soft=False).double().numpy()
    ref = statistical_topk_np(xn, k, fill=fill, soft=False)
    theta = statistical_threshold_np(xn, k)
    # float32 statistics put theta off by ~1e-6, so a band of 1e-4 leaves 100x margin. It hides
    # little: with x ~ N(0.3, 1) and theta ~1.7, about 4000 x 0.15 x 2e-4 = 0.1 entries fall in
    # it, so nearly every entry is compared exactly.
    band = 1e-12 if dtype == torch.float64 else 1e-4  # float32 statistics: theta is off by ~1e-6
    far = np.abs(xn - theta) > band
    assert_close(f"soft=False away from theta, {dtype}", got[far], ref[far], 0.0, 0.0)
    near = ~far  # inside the band either outcome is right: the value or the fill
    assert np.all((got[near] == xn[near]) | (got[near] == fill))


def _check_exact_topk(got, x, k, fill):
    """Tie-robust check of an exact top-k result (which tied entry survives is not defined):
    k survivors per row, each equal to the input at its position, and the multiset of kept
    values equal to the k largest values of the row."""
    # Ties are the rule in low precision: in bfloat16 the 1311 largest of 16384 values take only
    # ~130 distinct values, so which copy of a tied value survives is not defined, but the
    # values kept are. Tolerance 0: selection does no arithmetic.
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
    """Exact top-k, torch and NumPy, keep the k largest values (both fills; k == D returns x itself)."""
    fill = -math.inf if k == D - 1 else 0.0  # exercise both fills; -inf also makes kept zeros countable
    xt, xn = make_x((2, 3), D, dtype)
    got = exact_topk(xt, k, fill=fill)
    assert got.dtype == dtype and got.shape == xt.shape
    if k == D:
        assert got is xt and exact_topk_np(xn, k) is xn
        return
    _check_exact_topk(got.double().numpy(), xn, k, fill)
    _check_exact_topk(exact_topk_np(xn, k, fill=fill), xn, k, fill)


def test_matches_gemma3n_operator():
    """Gemma 3n computes cutoff = mean + std(unbiased=False) * icdf(p), then relu(x - cutoff),
    with p the target sparsity (notes/papers.md, "Statistical top-k (Spark)"). Written here
    independently with torch.distributions (not our normal_icdf): the same operator."""
    # What it catches that our NumPy reference cannot: a Bessel std (D - 1, as llama.cpp does), a
    # quantile taken at k/D instead of 1 - k/D, or a wrong normal_icdf, since both of our
    # versions share that function. p = 0.5 puts theta at the mean (Q = 0). k is rounded, so the
    # quantile is taken at the p that k gives exactly (0.95 -> k = 102 -> p = 0.9502).
    x = torch.randn(8, 2048, dtype=torch.float64) * 1.7 + 0.2
    for p in (0.95, 0.92, 0.5, 0.99):
        k = round((1 - p) * x.shape[-1])
        p_exact = 1 - k / x.shape[-1]
        icdf = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p_exact, dtype=torch.float64))
        cutoff = x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False) * icdf
        gemma = torch.relu(x - cutoff)
        assert_close(f"gemma3n p={p}", statistical_topk(x, k), gemma, 1e-12, 1e-12)  # float64: order of sums only
        assert_close(f"gemma3n numpy p={p}", statistical_topk_np(x.numpy(), k), gemma, 1e-12, 1e-12)
    assert abs(normal_icdf(0.95) - 1.6448536) < 1e-7  # Gemma 3n's multiplier for p = 0.95


def test_gaussian_rows_achieve_k_within_5_percent():
    """i.i.d. Gaussian rows, D = 16384, k = 8 %: the mean achieved k is within 5 % of k."""
    # One row's count is k up to a relative O(sqrt(log D / D)), a few % here; the mean over 64
    # rows is far tighter, so 5 % fails only if theta is wrong (say a D - 1 std or a wrong Q).
    D = 16384
    k = round(0.08 * D)
    x = torch.randn(64, D) * 3.0 - 1.0
    got = achieved_k(statistical_topk(x, k)).double().mean().item()
    assert abs(got / k - 1) < 0.05, f"mean achieved k {got:.1f} vs k {k}"
    got_np = achieved_k(statistical_topk_np(x.double().numpy(), k)).mean()
    assert abs(got_np / k - 1) < 0.05, f"numpy: mean achieved k {got_np:.1f} vs k {k}"


def test_achieved_k_counts():
    """achieved_k counts entries different from fill, in NumPy and torch; a scalar is refused."""
    y = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    # a row with no survivors must count 0; with fill = -inf, a kept 0.0 and -1.0 both count
    assert achieved_k(y).tolist() == [2, 0]
    assert achieved_k(torch.tensor(y)).tolist() == [2, 0]
    assert achieved_k(np.array([[-np.inf, 0.0, -1.0]]), fill=-np.inf).tolist() == [2]
    with pytest.raises(ValueError, match="at least one axis"):
        achieved_k(np.float64(1.0))
    for a in (y, torch.tensor(y)):  # fill is checked before NumPy and torch part ways
        with pytest.raises(TypeError, match="fill"):
            achieved_k(a, fill="a")


def test_numpy_threshold_upcasts_before_any_arithmetic():
    """float32 rows give bit for bit the theta of the same values in float64 (the one copy is the
    float64 one), and the input is left untouched."""
    # 13824 and 1106: the Spark FFN width and k at Gemma-2 2B shapes. Bit equality (not a
    # tolerance) is the point: if x is upcast before its first subtraction, both calls run the
    # same float64 operations on the same numbers; a float32 step anywhere would show at 1e-7.
    x = (np.random.randn(5, 13824) * 3 + 1).astype(np.float32)
    before = x.copy()
    assert np.array_equal(statistical_threshold_np(x, 1106), statistical_threshold_np(x.astype(np.float64), 1106))
    assert np.array_equal(x, before)


# ------------------------------------------------------------------------------------------
# Non-finite input and overflow: one answer in NumPy and torch
# ------------------------------------------------------------------------------------------


def _rows_with_trouble(dtype):
    """Seven rows of 40: normal, +inf inside, -inf inside, NaN first, ~1e30 (float32 squares overflow),
    ~1e-30 (float32 squares underflow), normal. -> (torch tensor, float64 NumPy array)"""
    # The NaN sits first on purpose: the statistics centre each row on its first entry, so a
    # NaN there reaches every entry of the row before any reduction does.
    x = np.random.randn(7, 40)
    x[1, 5], x[2, 11], x[3, 0] = np.inf, -np.inf, np.nan
    x[4] *= 1e30
    x[5] *= 1e-30
    xt = torch.tensor(x).to(dtype)
    return xt, xt.double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("soft,fill", [(True, 0.0), (True, -math.inf), (False, 0.0), (False, -math.inf)])
def test_non_finite_rows_are_nan_and_huge_rows_match_numpy(dtype, soft, fill):
    """A row holding NaN or +-inf comes out all NaN in both languages, without an exception or a
    warning; rows of ~1e30 and ~1e-30 (whose float32 squares overflow / underflow) get NumPy's
    float64 answer from torch too; the normal rows are exactly what they are alone."""
    xt, xn = _rows_with_trouble(dtype)
    # The NumPy reference runs on the float64 copy of the same values; float64 squares of 1e30
    # (1e60) and 1e-30 (1e-60) are in range, so it is the right answer for both rows.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test
        ref = statistical_topk_np(xn, 6, fill=fill, soft=soft)
        got = statistical_topk(xt, 6, fill=fill, soft=soft)
        theta = statistical_threshold(xt, 6)
    # rows 1-3 hold inf, -inf, NaN: all NaN, theta included
    bad = [1, 2, 3]
    assert np.isnan(ref[bad]).all() and torch.isnan(got[bad]).all() and torch.isnan(theta[bad]).all()
    ok = [0, 4, 5, 6]
    # Rows 4 and 5 are ~1e30 and ~1e-30, so errors are compared after dividing by the row's
    # scale; one tolerance, float32's, serves both dtypes (float64 is far inside it).
    for i in ok:  # relative to each row's scale: the float32 tolerance of the module docstring
        scale = np.abs(xn[i]).max()
        assert_close(f"row {i} soft={soft} fill={fill}", got[i].double() / scale, ref[i] / scale, 2e-5, 2e-5)
    # The trouble made torch redo the batch with scaled statistics; the normal rows must not
    # notice (the scaling is by powers of two, so they are bit-identical to a batch of their own).
    alone = statistical_topk(xt[[0, 6]], 6, fill=fill, soft=soft)
    assert_close("normal rows are unaffected", got[[0, 6]], alone, 0.0, 0.0)


def test_scaled_statistics_are_bit_identical_where_plain_ones_fit():
    """_row_mean_std's overflow remedy divides rows by a power of two: on ordinary rows the
    scaled and plain computations agree bit for bit (so redoing a batch changes no other row)."""
    # Why bit for bit: floating-point rounding is relative, so dividing every input by 2^e and
    # multiplying the results by 2^e changes no rounding, as long as nothing overflows or turns
    # subnormal. float32 rows of size ~5: far from both limits.
    z = torch.randn(64, 300) * 5 + 2
    plain, scaled = topk._row_mean_std(z), topk._row_mean_std(z, scaled=True)
    for name, a, b in zip(("mean", "std", "z - mean"), plain, scaled):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("scale", [1e200, 1e-200, 2.0**664, 2.0**-664])
def test_float64_rows_near_the_range_limits_agree_in_numpy_and_torch(scale):
    """float64 squares of ~1e200 overflow and of ~1e-200 underflow. Both languages divide each row
    by a power of two before squaring, so NumPy and torch agree, without a warning, and equal the
    answer for the unscaled row times the scale (bit for bit when the scale is a power of two)."""
    # 1e200 and 1e-200 are decimal, so x * scale rounds; 2^664 ~ 7.7e199 and 2^-664 are powers
    # of two, exact, and must reproduce the unscaled answer bit for bit.
    x = np.random.randn(5, 50) + 0.3  # [5, 50] O(1) rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning ("overflow encountered in square") fails
        theta, y = statistical_threshold_np(x * scale, 7), statistical_topk_np(x * scale, 7)
        theta_t, y_t = statistical_threshold(torch.tensor(x * scale), 7), statistical_topk(torch.tensor(x * scale), 7)
    # x * 1e200 rounds each entry (relative 1e-16), so a decimal scale agrees to rounding only
    tol = 0.0 if math.frexp(scale)[0] == 0.5 else 1e-12
    assert_close(f"NumPy theta at scale {scale:g}", theta / scale, statistical_threshold_np(x, 7), tol, tol)
    assert_close(f"NumPy output at scale {scale:g}", y / scale, statistical_topk_np(x, 7), tol, tol)
    # torch (float64) against NumPy: summation order differs, so ~1e-15 relative (module docstring)
    assert_close(f"torch theta at scale {scale:g}", theta_t / scale, theta / scale, 1e-12, 1e-12)
    assert_close(f"torch output at scale {scale:g}", y_t / scale, y / scale, 1e-12, 1e-12)


def test_exact_topk_ranks_nan_highest_and_inf_as_values_in_both():
    """Exact top-k: NaN ranks above every number and +-inf are ordinary values, in NumPy as in torch."""
    x = np.array([[1.0, np.nan, 3.0, -np.inf, np.inf, 2.0], [-np.inf, -np.inf, 0.5, -1.0, 7.0, np.nan]])
    # k = 1: the NaN alone; k = 2: NaN and +inf (row 0) or 7 (row 1); k = 3 adds 3.0 / 0.5.
    # fill -5 is below every finite value, so kept -inf entries would show as -inf, not as fill.
    for k in (1, 2, 3):
        ref = exact_topk_np(x, k, fill=-5.0)
        got = exact_topk(torch.tensor(x), k, fill=-5.0)
        assert_close(f"exact top-{k} with NaN and inf", got, ref, 0.0, 0.0)
    assert np.isnan(exact_topk_np(x, 1)[:, [1, 5]].diagonal()).all()  # k = 1 keeps each row's NaN


# ------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck, including through the threshold)
# ------------------------------------------------------------------------------------------


def test_gradcheck_statistical_topk_and_threshold():
    """Finite differences agree with the analytic gradient (soft, hard, and theta itself)."""
    # A row with a clear gap around theta: finite differences (eps 1e-6) never cross it.
    # gradcheck perturbs one entry by +-1e-6 and compares slopes at atol 1e-5: an entry that
    # crossed theta would jump by its own value (hard) or bend the slope (soft), and fail. theta
    # itself moves by only ~eps/D per perturbation, so a gap of 1e-4 is ample.
    x = torch.randn(3, 40, dtype=torch.float64)
    k = 6
    gap = (x - statistical_threshold(x, k)).abs().min().item()
    assert gap > 1e-4, "test input too close to theta for finite differences"
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: statistical_topk(t, k), (x,))
    assert torch.autograd.gradcheck(lambda t: statistical_topk(t, k, soft=False), (x,))
    assert torch.autograd.gradcheck(lambda t: statistical_threshold(t, k), (x,))
    # x * 1e160: float64 squares overflow, so the statistics take the scaled path; its gradient
    # must be right too (the power-of-two scale is a constant to autograd)
    assert torch.autograd.gradcheck(lambda t: statistical_topk(t * 1e160, k), (x,))
    assert torch.autograd.gradcheck(lambda t: statistical_threshold(t * 1e160, k), (x,))
    # the threshold is not detached: survivors' gradient includes the -d(theta)/dx terms
    (g,) = torch.autograd.grad(statistical_topk(x, k).sum(), x)
    assert not torch.allclose(g, (statistical_topk(x, k) > 0).double()), "gradient ignores theta"


def test_gradcheck_exact_topk():
    """Exact top-k's gradient is 1 on the kept entries and 0 elsewhere (finite differences agree)."""
    # 17 random float64 values per row: the k-th and (k+1)-th largest are far more than eps = 1e-6
    # apart, so no perturbation changes the kept set. fill = -1.0 is a nonzero constant, whose
    # gradient must still be 0.
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: exact_topk(t, 5), (x,))
    assert torch.autograd.gradcheck(lambda t: exact_topk(t, 1, fill=-1.0), (x,))


@pytest.mark.parametrize("soft", [True, False])
def test_analytic_gradient_equals_autograd_of_plain_ops(soft):
    """statistical_topk's hand-written backward vs autograd through the plain formula, at a
    realistic width (D = 1000) and with a constant row (its gradient must be 0, not NaN)."""
    # the plain formula's autograd gives NaN on the constant row (0/0 in d std), hence nan_to_num
    # below; our backward must give exactly 0 there
    x = torch.randn(5, 1000, dtype=torch.float64)
    x[3] = 0.7  # constant row
    g = torch.randn(5, 1000, dtype=torch.float64)
    k = 80
    x1 = x.clone().requires_grad_(True)
    (statistical_topk(x1, k, soft=soft) * g).sum().backward()
    x2 = x.clone().requires_grad_(True)
    theta = statistical_threshold(x2, k)  # plain ops, autograd all the way
    # The same formula as the forward, written with ordinary differentiable ops: autograd then
    # derives d theta / dz through mean and std itself, independently of statistical_topk_grad.
    plain = torch.where(x2 > theta, x2 - theta if soft else x2, torch.zeros((), dtype=x2.dtype))
    (plain * g).sum().backward()
    # float64, two orders of the same sums: 1e-12 absolute on O(1) gradients
    assert_close(f"analytic grad soft={soft}", x1.grad, torch.nan_to_num(x2.grad), 1e-12, 1e-10)
    assert torch.all(x1.grad[3] == 0)


def test_gradient_from_output_mask_equals_gradient_from_threshold():
    """statistical_topk_grad has two ways to find the survivors: from the forward's output
    (out > 0, the fast path statistical_topk uses) and from z > theta (used without `out`: the
    hard threshold and fill != 0). Both must give the same gradient, constant and NaN rows included."""
    # The two masks are computed differently (out = c - q std clamped, versus z > mean + q std),
    # so an entry within rounding of theta could be a survivor in one and not the other, an O(1)
    # difference in the gradient. With 1800 random entries about 1e-4 of them are expected that
    # close in float32, so the check is exact in practice; the tolerance covers only the sums.
    D, k = 300, 30
    q = normal_icdf(1.0 - k / D)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:  # ~1e4 ulps of an O(1) gradient
        z = torch.randn(6, D, dtype=dtype) * 2.0 + 0.5
        z[2] = -1.25  # constant row: no survivors, zero gradient
        z[4, 7] = math.nan  # NaN row: NaN gradient in both
        g = torch.randn(6, D, dtype=dtype)
        mean, std, c = topk._row_mean_std(z)
        out = c.sub_(std * q).clamp_min_(0.0)
        a = topk.statistical_topk_grad(g, z, mean, std, q, True, out)
        b = topk.statistical_topk_grad(g, z, mean, std, q, True)
        ok = [0, 1, 2, 3, 5]
        assert_close(f"grad {dtype}", a[ok], b[ok], tol, tol)
        assert torch.all(a[2] == 0) and torch.isnan(a[4]).all() and torch.isnan(b[4]).all()


def test_out_is_ignored_for_the_hard_gradient_and_in_place_edits_are_caught():
    """soft=False outputs z m, which can be <= 0 on a survivor (theta < 0): statistical_topk_grad
    must not take survivors from it. And since the soft backward reads its output, editing the
    output in place before backward must raise, not give a wrong gradient."""
    D, k = 200, 150  # a large k: theta < 0, so negative survivors exist
    q = normal_icdf(1.0 - k / D)
    z = torch.randn(3, D, dtype=torch.float64)
    g = torch.randn(3, D, dtype=torch.float64)
    mean, std, _ = topk._row_mean_std(z)
    hard_out = torch.where(z > mean + q * std, z, torch.zeros((), dtype=z.dtype))
    assert (hard_out < 0).any()
    assert torch.equal(topk.statistical_topk_grad(g, z, mean, std, q, False, hard_out),
                       topk.statistical_topk_grad(g, z, mean, std, q, False))
    # The soft output with fill 0 is saved for the backward; y.mul_(2) bumps its version
    # counter, and autograd must refuse rather than read survivors from doubled values.
    y = statistical_topk(torch.randn(4, 50, requires_grad=True), 10)
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------
# Defined edge cases and argument errors
# ------------------------------------------------------------------------------------------

ALL_OPS = [
    ("exact_topk_np", exact_topk_np, False),
    ("statistical_threshold_np", statistical_threshold_np, False),
    ("statistical_topk_np", statistical_topk_np, False),
    ("exact_topk", exact_topk, True),
    ("statistical_threshold", statistical_threshold, True),
    ("statistical_topk", statistical_topk, True),
]
IDS = [o[0] for o in ALL_OPS]


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=IDS)
def test_bad_k_and_x_raise_naming_them(name, fn, is_torch):
    """k must be an int in [1, D] (errors name k and D; NumPy ints are fine), the last axis must
    not be empty, x must be a floating array / tensor with at least one axis."""
    lib = torch if is_torch else np
    x = torch.randn(2, 5) if is_torch else np.random.randn(2, 5)
    # out of range (0, -1, D + 1), not an int (2.0, 1.5, "3", None), and bool, which Python
    # would otherwise take as 1
    for bad_k in [0, -1, 6, 2.0, 1.5, "3", None, True]:
        with pytest.raises(ValueError) as e:
            fn(x, bad_k)
        assert "k" in str(e.value) and "D=5" in str(e.value)
    fn(x, np.int64(2))  # a NumPy integer is an int
    # D = 0 has no valid k at all; integer x is refused (the output keeps x's dtype, and x - theta
    # is not an integer); a 0-d x has no row to select in
    with pytest.raises(ValueError, match="empty"):
        fn(x[:, :0], 1)
    with pytest.raises(TypeError, match="floating"):
        fn(lib.arange(10).reshape(2, 5), 2)
    with pytest.raises(ValueError, match="scalar"):
        fn(x[0, 0], 1)
    if is_torch:
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(np.random.randn(2, 5), 2)


@pytest.mark.parametrize("name,fn,is_torch", [o for o in ALL_OPS if "threshold" not in o[0]], ids=[i for i in IDS if "threshold" not in i])
def test_bad_fill_and_soft_raise_type_error_naming_them(name, fn, is_torch):
    """fill must be a real number ('a', None, True are refused), soft a bool; -inf and NumPy floats are fine."""
    x = torch.randn(2, 5) if is_torch else np.random.randn(2, 5)
    # a string, None, a bool (a number only by accident), a list: none is a fill value
    for bad in ["a", None, True, [0.0]]:
        with pytest.raises(TypeError, match="fill"):
            fn(x, 2, fill=bad)
    # -inf is the fill before a softmax; a NumPy float32 scalar is a real number too
    fn(x, 2, fill=-math.inf)
    fn(x, 2, fill=np.float32(-1.0))
    # soft=1 is refused although 1 == True: only a bool is taken, so nothing is guessed
    if "statistical" in name:
        for bad in [1, "yes", None]:
            with pytest.raises(TypeError, match="soft"):
                fn(x, 2, soft=bad)


@pytest.mark.parametrize("name,fn,is_torch", ALL_OPS, ids=IDS)
def test_leading_dims_of_size_zero(name, fn, is_torch):
    """Leading dimensions of size 0 give an empty result of the right shape."""
    # no rows at all, but D = 7 and k = 3 are valid: the answer is an empty array, not an error
    x = torch.randn(0, 3, 7) if is_torch else np.random.randn(0, 3, 7)
    expected = (0, 3, 1) if "threshold" in name else (0, 3, 7)
    assert tuple(fn(x, 3).shape) == expected


def test_k_equal_D_returns_input_unchanged():
    """k == D: the input object itself comes back, and the threshold is -inf."""
    # `is`, not equality: k == D is the dense setting, and returning x costs no copy. theta is
    # -inf by definition: Q(1 - k/D) = Q(0) does not exist (normal_icdf refuses p = 0).
    xt = torch.randn(4, 9)
    xn = xt.numpy()
    assert statistical_topk(xt, 9) is xt and exact_topk(xt, 9) is xt
    assert statistical_topk_np(xn, 9) is xn and exact_topk_np(xn, 9) is xn
    assert torch.all(statistical_threshold(xt, 9) == -math.inf)
    assert np.all(statistical_threshold_np(xn, 9) == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_rows_have_no_survivors_and_no_nan(dtype):
    """std = 0: theta = the row's value, nothing is strictly above it, so every entry is `fill`."""
    # values whose float64 sums are inexact (0.1, 1/3, ...): the centring on the first entry is
    # what makes their std exactly 0; D = 1001 is odd so no sum is exact by symmetry
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


def test_non_contiguous_input():
    """Strided rows give the contiguous result (to float64 rounding: the sums run in another order)."""
    # The transposed view reads each row with stride 40, which sends torch's reductions down a
    # different (strided) kernel with another summation order: float64 rounding only, 1e-12.
    # Exact top-k does no arithmetic, so it must match exactly; NumPy vs torch is the float64
    # tolerance of the module docstring.
    base = torch.randn(300, 40, dtype=torch.float64)
    xt = base.t()  # [40, 300], last axis has stride 40
    assert not xt.is_contiguous()
    assert_close("stat non-contiguous", statistical_topk(xt, 17), statistical_topk(xt.contiguous(), 17), 1e-12, 1e-12)
    assert_close("exact non-contiguous", exact_topk(xt, 17), exact_topk(xt.contiguous(), 17), 0.0, 0.0)
    xn = base.numpy().T
    assert_close("np stat non-contiguous", statistical_topk_np(xn, 17), statistical_topk_np(np.ascontiguousarray(xn), 17), 1e-12, 1e-12)
    assert_close("np vs torch non-contiguous", statistical_topk(xt, 17), statistical_topk_np(xn, 17), 1e-10, 1e-10)


def test_normal_icdf():
    """Q(p) against known quantiles; p outside (0, 1) is refused."""
    # Table values to 10 digits, hence 1e-9: Q(0.92) is Spark's 8 % density, Q(0.025) the
    # familiar -1.96. p = 0 and 1 would give -inf and +inf, which no k in [1, D - 1] needs.
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
    """On CUDA the operators match the CPU and never wait for the device (sync debug mode 'error')."""
    # On CUDA _row_mean_std always takes the scaled path (checking a std on the host would wait
    # for the device); on ordinary rows the CPU computes plainly, an independent check of it.
    x = torch.randn(64, 4096, dtype=dtype)
    x[3] *= 1e30 if dtype == torch.float32 else 1.0  # float32 squares overflow: the scaled statistics
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
    scale = x.abs().amax(-1, keepdim=True).float()
    assert_close("cuda statistical_topk", ys.cpu().float() / scale, statistical_topk(x, 300).float() / scale, atol, rtol)
    assert_close("cuda achieved_k", n, achieved_k(statistical_topk(x, 300)), 2, 0)  # float32 reduction order can flip an entry at theta
    _check_exact_topk(ye.double().cpu().numpy(), x.double().numpy(), 300, 0.0)
    assert (achieved_k(yh, fill=-math.inf) > 0).all()


@pytest.mark.gpu
def test_cuda_backward_matches_cpu():
    """The analytic backward (survivors from the output via threshold_backward) on CUDA."""
    # float64 on both devices: only the reduction order differs, and the gradients are O(1)
    x = torch.randn(64, 4096, dtype=torch.float64)
    g = torch.randn(64, 4096, dtype=torch.float64)
    grads = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_(True)
        (gx,) = torch.autograd.grad(statistical_topk(xd, 300), xd, g.to(dev))
        grads.append(gx.cpu())
    assert_close("cuda backward", grads[1], grads[0], 1e-10, 1e-9)  # float64: reduction order only


# ------------------------------------------------------------------------------------------
# The demonstration runs; the test harness reports what it should
# ------------------------------------------------------------------------------------------


def test_demo_quick_runs():
    """`python topk.py --quick` prints the accuracy table for all four distributions and the timing."""
    proc = subprocess.run([sys.executable, topk.__file__, "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("gaussian", "gelu", "student_t3", "bimodal", "exact_topk", "statistical_topk", "copy"):
        assert word in proc.stdout, word


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
