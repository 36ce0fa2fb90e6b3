"""Tests for kernels_gpu.py: the Triton kernels against topk.py's references.

Where this runs: without CUDA (CI, laptops) tests/conftest.py sets TRITON_INTERPRET=1 and the
kernels run in Triton's interpreter on CPU tensors, at small shapes; on a GPU machine the same
tests run compiled kernels on CUDA tensors, and the `gpu` test adds the benchmark's shape.
The chunked path (rows longer than kernels_gpu.MAX_BLOCK) is forced at D = 3000 by lowering
MAX_BLOCK to 1024: three chunks, the last one partial.

Tolerances (outputs x - theta are O(1); references in float64):
- float32: the kernels compute mean and std in float32 (tree sums, relative error ~1e-7 times
  a few), so theta and x - theta are off by ~1e-6 at unit scale: atol = rtol = 2e-5, as
  tests/test_topk.py allows topk.statistical_topk.
- bfloat16 / float16: float32 inside, one rounding at the store: half an ulp, 2^-9 (bf16) or
  2^-11 (fp16) relative; we allow one ulp, rtol = 2^-8 / 2^-10, plus atol = 2e-5 for the
  float32 threshold error on outputs near zero. Triton's interpreter (3.9) converts float32 to
  bfloat16 by dropping bits (rounding toward zero) where the GPU rounds to nearest: up to a
  whole ulp, 2^-7 relative, so bf16 gets rtol = 2^-7 in the interpreter.
- Gradients: dz = g m - S (1/D + q (z - mu)/(D sigma)); g m is exact, the rest is a float32
  sum S times small factors, so the same tolerances hold.
- The fused activation adds gelu and a product in float32 (a few ulps): atol = rtol = 5e-5 in
  float32; in half precision one ulp of the output, as above.
- float64 is not supported by the kernels (float32 statistics only), so there is no
  torch.autograd.gradcheck here: float32 and half-precision gradients are compared with the
  float64 analytic gradient (topk.statistical_topk's backward, itself gradchecked in
  tests/test_topk.py).
An entry within float32 rounding of theta may survive in one implementation and not in the
other. For the soft output that is harmless (the value there is ~0). For gradients and the hard
threshold it is not, so those checks use random float32 rows (no entry that close: checked) or
skip the rows where it happens.
"""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, assert_close, run_in_cuda_graph
import kernels_gpu
from kernels_gpu import gelu_topk_mul, gelu_topk_mul_gpu, statistical_topk_gpu, statistical_topk_grad_gpu
from topk import normal_icdf, statistical_threshold, statistical_threshold_np, statistical_topk, statistical_topk_grad
from topk import statistical_topk_np

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the CPU runs the kernels in Triton's interpreter
needs_triton = pytest.mark.skipif(kernels_gpu.triton is None, reason="needs triton (none on this platform)")

TOL = {  # dtype -> (atol, rtol), see the module docstring
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2.0**-8 if HAS_CUDA else 2.0**-7),  # the interpreter truncates to bf16
    torch.float16: (2e-5, 2.0**-10),
}
DTYPES = list(TOL)  # float64 is refused by the kernels (a test of the errors checks that)

# (D, k): D = 1 (only k = 1 = D), 3, 1000 (one block), 3000 (chunked); k = 1, D - 1, D, and 8 %
SHAPES = [(1, 1), (3, 1), (3, 2), (3, 3), (1000, 1), (1000, 999), (1000, 1000), (1000, 80),
          (3000, 1), (3000, 2999), (3000, 3000), (3000, 240)]


def set_max_block(monkeypatch, max_block):
    """The longest row a program holds at once, forward and backward kernels alike."""
    monkeypatch.setattr(kernels_gpu, "MAX_BLOCK", max_block)
    monkeypatch.setattr(kernels_gpu, "MAX_BLOCK_BWD", max_block)


def chunk_long_rows(monkeypatch, D):
    """Rows of 3000 or more go through the chunked path (MAX_BLOCK 1024: three chunks)."""
    if D >= 3000:
        set_max_block(monkeypatch, 1024)


def make_x(lead, D, dtype, scale=1.0, shift=0.3):
    """Random rows in `dtype` on DEVICE, and the same values as a float64 NumPy array.

    The shift keeps the mean away from 0, so a wrong centring would show.
    """
    xt = (shift + scale * torch.randn(*lead, D, dtype=torch.float64)).to(dtype)
    return xt.to(DEVICE), xt.double().numpy()


def grad64(fn, xs, g):
    """Gradients of sum(fn(*xs) * g) in float64 (the analytic backward of the torch reference).

    xs are copied to float64 leaves on their device; g (any dtype, any device) follows them.
    """
    xs = [x.detach().double().requires_grad_() for x in xs]
    return torch.autograd.grad(fn(*xs), xs, g.double().to(xs[0].device))


def no_entry_near_theta(x, k):
    """True when no entry of any row is within float32 rounding of theta (module docstring)."""
    x64 = torch.as_tensor(x, dtype=torch.float64).cpu()
    return bool(((x64 - statistical_threshold(x64, k)).abs() > 1e-5).all())  # 10x the float32 error of theta


# ------------------------------------------------------------------------------------------
# statistical top-k, forward
#   Against topk.statistical_topk_np (float64) on awkward shapes, one block and chunked; short
#   rows grouped into programs; the hard threshold; constant, non-finite, huge and tiny rows;
#   strided views; empty leading dims; k == D; each bad argument.
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,k", SHAPES)
def test_forward_matches_numpy_reference(D, k, dtype, monkeypatch):
    """Soft statistical top-k equals topk.statistical_topk_np in every dtype, one block and chunked."""
    chunk_long_rows(monkeypatch, D)
    # six rows in a (2, 3) leading shape: the kernels see them as [6, D]; with BLOCK 1024 and
    # TILE 2048 at D = 1000, two rows share a program
    xt, xn = make_x((2, 3), D, dtype)
    got = statistical_topk_gpu(xt, k)
    # the reference gets the very values the kernel saw (x rounded to dtype, then float64)
    assert got.dtype == dtype and got.shape == xt.shape and got.device == xt.device
    assert_close(f"statistical_topk_gpu D={D} k={k} {dtype}", got, statistical_topk_np(xn, k), *TOL[dtype])


@needs_triton
@pytest.mark.parametrize("D,max_block", [(100, 8192), (300, 128)], ids=["one_block", "chunked"])
def test_short_rows_grouped_into_programs(D, max_block, monkeypatch):
    """Short rows are grouped, TILE // BLOCK = 16 to a program: 37 rows make 3 programs, the last
    with 5 rows and 11 masked ones. Every kernel, forward and backward, matches its reference."""
    set_max_block(monkeypatch, max_block)
    k = round(0.08 * D)
    # float32 only: this test is about which program reads which row, not about rounding
    (xt, xn), (ut, _) = make_x((37,), D, torch.float32), make_x((37,), D, torch.float32)
    assert no_entry_near_theta(xn, k)  # so gradients may be compared entry by entry
    xt.requires_grad_(), ut.requires_grad_()
    g = torch.randn(37, D, dtype=torch.float64).float().to(DEVICE)
    y, h = statistical_topk_gpu(xt, k), gelu_topk_mul_gpu(xt, ut, k)
    assert_close("grouped rows: y", y, statistical_topk_np(xn, k), *TOL[torch.float32])
    assert_close("grouped rows: h", h, gelu_topk_mul(xt.double(), ut.double(), k), 5e-5, 5e-5)
    assert_close("grouped rows: dx", torch.autograd.grad(y, xt, g)[0],
                 grad64(lambda x: statistical_topk(x, k), [xt], g)[0], *TOL[torch.float32])
    for name, got, ref in zip(("dp", "du"), torch.autograd.grad(h, (xt, ut), g),
                              grad64(lambda p, u: gelu_topk_mul(p, u, k), [xt, ut], g)):
        assert_close(f"grouped rows: {name}", got, ref, 5e-5, 5e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1000, 3000])
def test_hard_threshold_matches_reference_away_from_theta(D, dtype, monkeypatch):
    """soft=False, fill=-inf: exactly the reference's values, except inside the band where theta's rounding decides."""
    chunk_long_rows(monkeypatch, D)
    k = round(0.08 * D)
    xt, xn = make_x((4,), D, dtype)
    # the hard threshold keeps x itself on survivors: before a softmax, with fill -inf
    got = statistical_topk_gpu(xt, k, fill=-math.inf, soft=False).double().cpu().numpy()
    ref = statistical_topk_np(xn, k, fill=-math.inf, soft=False)
    far = np.abs(xn - statistical_threshold_np(xn, k)) > 1e-4  # float32 statistics: theta is off by ~1e-6
    # away from theta the answer is a copy of x or -inf: exact, whatever the dtype
    assert_close(f"soft=False away from theta, {dtype}", got[far], ref[far], 0.0, 0.0)


# Rows holding inf make the interpreter's NumPy warn about inf - inf (on a GPU nothing warns).
INTERPRETER_INF_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@needs_triton
@INTERPRETER_INF_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_block", [16384, 256], ids=["one_block", "chunked"])
def test_constant_non_finite_and_extreme_rows(max_block, dtype, monkeypatch):
    """topk.py's answers on awkward rows, in both paths, forward and backward:
    a constant row keeps nothing and has gradient 0 (exactly), a row holding NaN, +inf or -inf is
    all NaN (other rows untouched), rows of 1e30s and 1e-30s agree with float64 (no overflow or
    underflow in the float32 squares)."""
    set_max_block(monkeypatch, max_block)
    D, k = 1000, 80
    base = torch.randn(7, D, dtype=torch.float64) + 0.3
    base[0] = 0.1  # constant (0.1 is inexact in binary: its sums round)
    base[1, 17], base[2, 0], base[3, 999] = math.nan, math.inf, -math.inf  # non-finite, one of them first
    base[4] *= 1e30  # squares would overflow float32
    base[5] *= 1e-30  # squares would underflow float32
    scale = torch.tensor([1, 1, 1, 1, 1e30, 1e-30, 1], dtype=torch.float64)[:, None]  # row 6: plain
    xt = base.to(dtype).to(DEVICE).requires_grad_()
    xn = xt.detach().double().cpu().numpy()  # the reference sees the values rounded to dtype
    y = statistical_topk_gpu(xt, k)
    # the exact answers first (no tolerance can hide a 1e-8 survivor or a finite NaN row)
    assert (y[0] == 0).all(), "a constant row keeps nothing, exactly"
    assert y[1:4].isnan().all(), "rows holding NaN or +-inf are all NaN"
    # compared in units of each row's scale, so the tolerances above apply to every row
    assert_close(f"awkward rows {dtype}", y.double().cpu() / scale, statistical_topk_np(xn, k) / scale.numpy(), *TOL[dtype])
    # backward through kernel 2: the same rows, the float64 analytic gradient as reference
    g = torch.randn(7, D, dtype=torch.float64)
    y.backward(g.to(dtype).to(DEVICE))
    ref = grad64(lambda x: statistical_topk(x, k), [xt], g.to(dtype))[0].cpu()  # float64 analytic gradient
    assert (xt.grad[0] == 0).all(), "a constant row has gradient 0, exactly"
    # NaN rows: NaN gradients (as topk's); the others within tolerance (gradients do not scale with the row)
    assert_close(f"awkward rows gradient {dtype}", xt.grad, ref, *TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_block", [16384, 256], ids=["one_block", "chunked"])
def test_constant_rows_keep_nothing_for_any_k(max_block, dtype, monkeypatch):
    """Constant rows whose float32 mean is not exact (0.7 and 0.1 sum with rounding): without
    centring on the first entry, std would be ~1e-8 instead of 0 and, for k near D (q < 0),
    every entry would survive by ~1e-8. Centred, nothing survives, exactly, in both kernels."""
    set_max_block(monkeypatch, max_block)
    # an expanded tensor: row stride 0, unit stride along D, so the kernels read it in place
    x = torch.tensor([0.7, 0.1, -2.7, 3e30, 1e-30])[:, None].expand(5, 1000).to(dtype).to(DEVICE)
    # k = 1: q > 0, theta above the value; k = 500: q = 0, theta = mean; k = 999: q < 0
    for k in (1, 500, 999):
        assert (statistical_topk_gpu(x, k) == 0).all(), f"k={k}"
        assert (gelu_topk_mul_gpu(x, x, k) == 0).all(), f"gelu_topk_mul k={k}"


@needs_triton
def test_non_contiguous_inputs_give_the_contiguous_answer():
    """A transposed tensor, a strided last axis and a row-sliced view give exactly the result of a
    contiguous copy (the row-sliced view is read in place through its row stride), forward and backward."""
    D, k = 300, 24
    # x.mT and x[..., ::2] have a strided last axis (copied first); x[..., :D] has unit stride
    # along D and a row stride of 2 D (read in place)
    wide = torch.randn(2, 5, 2 * D, device=DEVICE)
    views = {"x.mT": torch.randn(D, 5, device=DEVICE).mT, "x[..., ::2]": wide[..., ::2], "x[..., :D]": wide[..., :D]}
    for name, x in views.items():
        x = x.detach().requires_grad_()  # a leaf with the view's strides
        xc = x.detach().contiguous().requires_grad_()
        g = torch.randn(x.shape, device=DEVICE)
        y, yc = statistical_topk_gpu(x, k), statistical_topk_gpu(xc, k)
        (y * g).sum().backward()
        (yc * g).sum().backward()
        # bit for bit: the same rows go through the same kernel, only the addresses differ
        assert torch.equal(y, yc) and torch.equal(x.grad, xc.grad), name
        h, hc = gelu_topk_mul_gpu(x, x * 2, k), gelu_topk_mul_gpu(xc, xc * 2, k)
        assert torch.equal(h, hc), f"gelu_topk_mul {name}"


@needs_triton
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7)])
def test_empty_leading_dims(shape):
    """Leading dimensions of size 0: an empty result of the same shape, and an empty gradient."""
    # no row means no kernel launch (a grid of 0 programs is refused by Triton)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = statistical_topk_gpu(x, 3)
    h = gelu_topk_mul_gpu(x, x, 3)
    assert y.shape == shape and h.shape == shape
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == shape


@needs_triton
def test_k_equal_D_returns_input_or_plain_gelu():
    """k == D thresholds nothing: statistical_topk_gpu returns x itself, gelu_topk_mul_gpu gelu(p) * u."""
    x = torch.randn(3, 5, device=DEVICE)
    u = torch.randn(3, 5, device=DEVICE)
    assert statistical_topk_gpu(x, 5) is x  # the same object, as topk.statistical_topk
    assert torch.equal(gelu_topk_mul_gpu(x, u, 5), torch.nn.functional.gelu(x, approximate="tanh") * u)


@needs_triton
@pytest.mark.parametrize("call,err,words", [
    (lambda x: statistical_topk_gpu(x, 0), ValueError, "k must satisfy"),
    (lambda x: statistical_topk_gpu(x, 6), ValueError, "k must satisfy"),
    (lambda x: statistical_topk_gpu(x, True), ValueError, "k must be an int"),
    (lambda x: statistical_topk_gpu(x, 2, fill="a"), TypeError, "fill must be a real number"),
    (lambda x: statistical_topk_gpu(x, 2, soft=1), TypeError, "soft must be a bool"),
    (lambda x: statistical_topk_gpu(x.double(), 2), TypeError, "x must be float32, bfloat16 or float16"),
    (lambda x: statistical_topk_gpu(x.int(), 2), TypeError, "x must be a floating-point tensor"),
    (lambda x: statistical_topk_gpu(x.numpy(force=True), 2), TypeError, "x must be a torch.Tensor"),
    (lambda x: statistical_topk_gpu(x[0, 0], 1), ValueError, "x must have at least one axis"),
    (lambda x: gelu_topk_mul_gpu(x, x[:, :4], 2), ValueError, "u must have p's shape"),
    (lambda x: gelu_topk_mul_gpu(x, x.half(), 2), ValueError, "u must have p's shape, dtype"),
    (lambda x: gelu_topk_mul_gpu(x.double(), x, 2), TypeError, "p must be float32"),
    (lambda x: statistical_topk_grad_gpu(x, x, x[:, :1], x[:1, :1], 1.0), ValueError, "mean, std"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_raise_naming_them(call, err, words):
    """Each bad argument gets one clear error that names it."""
    # k, fill and soft are checked by topk's own functions (one wording across the project);
    # the dtype, shape and device checks are this file's
    with pytest.raises(err, match=words):
        call(torch.randn(3, 5, device=DEVICE))


# ------------------------------------------------------------------------------------------
# statistical top-k, backward
#   Through autograd (kernel 2 behind statistical_topk_gpu) and through the launcher itself,
#   statistical_topk_grad_gpu, whose arguments are topk.statistical_topk_grad's.
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("soft,fill", [(True, 0.0), (False, -math.inf)], ids=["soft", "hard"])
@pytest.mark.parametrize("D,k", [(3, 1), (3, 2), (1000, 1), (1000, 999), (1000, 80), (3000, 2999), (3000, 240)])
def test_gradient_matches_float64_analytic_gradient(D, k, soft, fill, dtype, monkeypatch):
    """Autograd through statistical_topk_gpu (kernel 2) equals topk.statistical_topk's analytic backward in float64."""
    chunk_long_rows(monkeypatch, D)
    xt, xn = make_x((2, 3), D, dtype)
    assert no_entry_near_theta(xn, k)  # else a survivor could flip and change g m and S
    xt.requires_grad_()
    g = torch.randn(2, 3, D, dtype=torch.float64).to(dtype)
    statistical_topk_gpu(xt, k, fill, soft).backward(g.to(DEVICE))
    # the reference: topk.statistical_topk in float64, whose backward is statistical_topk_grad
    ref = grad64(lambda x: statistical_topk(x, k, fill, soft), [xt], g)[0]
    assert xt.grad.dtype == dtype
    assert_close(f"gradient D={D} k={k} soft={soft} {dtype}", xt.grad, ref, *TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1000, 3000])
def test_grad_launcher_matches_statistical_topk_grad(D, dtype, monkeypatch):
    """statistical_topk_grad_gpu(g, z, mean, std, q) computes topk.statistical_topk_grad on the same arguments."""
    chunk_long_rows(monkeypatch, D)
    k = round(0.08 * D)
    zt, zn = make_x((5,), D, dtype)
    g = torch.randn(5, D, dtype=torch.float64).to(dtype)
    mean = torch.tensor(zn.mean(-1, keepdims=True), dtype=torch.float32)  # [5, 1] float32 statistics,
    std = torch.tensor(zn.std(-1, keepdims=True), dtype=torch.float32)  # as the forward saves them
    q = normal_icdf(1.0 - k / D)
    # both sides get the same float32 statistics, so they agree on theta and on every survivor
    got = statistical_topk_grad_gpu(g.to(DEVICE), zt, mean.to(DEVICE), std.to(DEVICE), q)
    ref = statistical_topk_grad(g.double(), torch.tensor(zn), mean.double(), std.double(), q)
    assert_close(f"statistical_topk_grad_gpu D={D} {dtype}", got, ref, *TOL[dtype])


# ------------------------------------------------------------------------------------------
# the fused activation gelu(statistical_topk(p)) * u
#   Kernels 3 and 4 against gelu_topk_mul, the plain torch composition, run in float64; its
#   autograd backward is the reference for dp and du (kernel 4 recomputes t = max(p - theta, 0)).
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,k", [(3, 1), (3, 2), (1000, 1), (1000, 999), (1000, 80), (3000, 1), (3000, 240)])
def test_gelu_topk_mul_matches_reference(D, k, dtype, monkeypatch):
    """Kernels 3 and 4 equal gelu_topk_mul (tanh GELU of topk.statistical_topk, times u) and its
    autograd backward, both in float64."""
    chunk_long_rows(monkeypatch, D)
    # p is the gate pre-activation (mean 0.3), u the up projection (mean 0)
    (pt, pn), (ut, _) = make_x((2, 3), D, dtype), make_x((2, 3), D, dtype, shift=0.0)
    assert no_entry_near_theta(pn, k)
    pt.requires_grad_(), ut.requires_grad_()
    g = torch.randn(2, 3, D, dtype=torch.float64).to(dtype)
    h = gelu_topk_mul_gpu(pt, ut, k)
    h.backward(g.to(DEVICE))
    href = gelu_topk_mul(pt.detach().double(), ut.detach().double(), k)
    dp, du = grad64(lambda p, u: gelu_topk_mul(p, u, k), [pt, ut], g)
    # float32: GELU and the product add a few ulps to topk's tolerance; half precision: one
    # rounding at the store dominates, as for statistical top-k
    atol, rtol = (5e-5, 5e-5) if dtype == torch.float32 else TOL[dtype]
    assert h.dtype == dtype and pt.grad.dtype == dtype and ut.grad.dtype == dtype
    assert_close(f"gelu_topk_mul D={D} k={k} {dtype}", h, href, atol, rtol)
    assert_close(f"gelu_topk_mul dp D={D} k={k} {dtype}", pt.grad, dp, atol, rtol)
    assert_close(f"gelu_topk_mul du D={D} k={k} {dtype}", ut.grad, du, atol, rtol)


@needs_triton
@INTERPRETER_INF_WARNINGS
@pytest.mark.parametrize("max_block", [16384, 256], ids=["one_block", "chunked"])
def test_gelu_topk_mul_constant_and_non_finite_rows(max_block, monkeypatch):
    """A constant row of p gives h = gelu(0) u = 0 and dp = 0; a row of p holding NaN or inf gives
    NaN h, dp and du (as the reference); the other rows are unaffected."""
    set_max_block(monkeypatch, max_block)
    D, k = 1000, 80
    p = torch.randn(4, D) + 0.3
    p[0], p[1, 5], p[2, 0] = -0.1, math.nan, math.inf  # constant; NaN inside; inf first; row 3 plain
    u = torch.randn(4, D)
    pt, ut = p.to(DEVICE).requires_grad_(), u.to(DEVICE).requires_grad_()
    g = torch.randn(4, D)
    h = gelu_topk_mul_gpu(pt, ut, k)
    h.backward(g.to(DEVICE))
    # the exact answers first, then every row against the float64 reference and its gradient
    assert (h[0] == 0).all() and (pt.grad[0] == 0).all()
    assert h[1:3].isnan().all() and pt.grad[1:3].isnan().all() and ut.grad[1:3].isnan().all()
    dp, du = grad64(lambda p, u: gelu_topk_mul(p, u, k), [pt, ut], g)
    assert_close("gelu_topk_mul awkward rows", h, gelu_topk_mul(p.double(), u.double(), k), 5e-5, 5e-5)
    assert_close("gelu_topk_mul awkward rows dp", pt.grad, dp, 5e-5, 5e-5)
    assert_close("gelu_topk_mul awkward rows du", ut.grad, du, 5e-5, 5e-5)


# ------------------------------------------------------------------------------------------
# without triton, without CUDA, and on a GPU
#   The file must import everywhere (CI on macOS has no triton wheels); the benchmark must say
#   what it needs; on a GPU, everything must run at the benchmark's shape with no host sync.
# ------------------------------------------------------------------------------------------


def test_imports_without_triton_and_says_what_is_missing(monkeypatch):
    """The file imports where triton is not installed (macOS has no wheels); each kernel call then
    raises an error that names triton."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    # a second copy of the module, loaded under another name while triton cannot be imported
    spec = importlib.util.spec_from_file_location("kernels_gpu_without_triton", kernels_gpu.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.triton is None
    x = torch.randn(2, 8)
    for call in (lambda: mod.statistical_topk_gpu(x, 2), lambda: mod.gelu_topk_mul_gpu(x, x, 2)):
        with pytest.raises(RuntimeError, match="needs triton"):
            call()
    assert mod.main([]) == []  # the benchmark says what it needs and returns


@pytest.mark.skipif(HAS_CUDA, reason="checks the message printed where there is no GPU")
def test_benchmark_without_cuda_says_so(capsys):
    """`python kernels_gpu.py` without a GPU prints that it needs one and returns (exit status 0)."""
    assert kernels_gpu.main(["--quick"]) == []
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_benchmark_shape_on_cuda_without_host_sync():
    """At the benchmark's shape ([8192, 16384] bf16, k = 8 %) and at a chunked one ([64, 65536]):
    forward, backward and the fused activation inside one CUDA graph capture (which fails on any
    host synchronisation), then compared with the float64 references after replay."""
    for R, D in [(8192, 16384), (64, 65536)]:
        k = round(0.08 * D)
        gen = torch.Generator(device="cuda").manual_seed(0)
        x, u, g = (torch.randn(R, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
        x.requires_grad_(), u.requires_grad_()

        def step():  # everything we check, forward and backward, as one graph
            y = statistical_topk_gpu(x, k)
            h = gelu_topk_mul_gpu(x, u, k)
            return (y, h, *torch.autograd.grad(y, x, g), *torch.autograd.grad(h, (x, u), g))

        y, h, dx, dp, du = run_in_cuda_graph(step)
        x64, u64, g64 = x.detach().double(), u.detach().double(), g.double()
        # bf16 inputs sit on a coarse grid: skip the few rows with an entry within rounding of theta
        ok = ((x64 - statistical_threshold(x64, k)).abs() > 1e-5).all(-1).cpu()
        assert ok.float().mean() > 0.9
        atol, rtol = TOL[torch.bfloat16]
        assert_close(f"y {R}x{D}", y, statistical_topk(x64, k), atol, rtol)
        assert_close(f"h {R}x{D}", h, gelu_topk_mul(x64, u64, k), atol, rtol)
        dx_ref = grad64(lambda x: statistical_topk(x, k), [x64], g64)[0]
        dp_ref, du_ref = grad64(lambda p, u: gelu_topk_mul(p, u, k), [x64, u64], g64)
        for name, got, ref in (("dx", dx, dx_ref), ("dp", dp, dp_ref), ("du", du, du_ref)):
            assert_close(f"{name} {R}x{D}", got.cpu()[ok], ref.cpu()[ok], atol, rtol)
