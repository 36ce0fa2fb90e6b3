"""Shared test harness for spark.

- `assert_close(name, got, ref, atol, rtol)`: compares two arrays / tensors and, on failure, says
  how far apart they are and where (max abs error, max rel error, the index of each, the values
  there). Every comparison in the suite goes through it, so a failure always shows its evidence.
- Fixed seeds: every test starts from the same NumPy / torch / random state (autouse fixture).
- `gpu` marker: `@pytest.mark.gpu` tests skip when CUDA is not available (CI, laptops).
- Triton interpreter: on a machine without CUDA we set TRITON_INTERPRET=1 *before* triton is
  imported anywhere, so Triton kernels run (slowly, at small shapes) on the CPU in CI.
"""

import os
import random
import sys

import numpy as np
import pytest
import torch

# --- Triton interpreter: must be set before any `import triton` (kernels_gpu.py imports it).
# If the user already chose (TRITON_INTERPRET set either way), we respect it.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project is flat: make the repository root importable (spark.py, topk.py, ...) no matter
# where pytest is started from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED = 1234

# One torch thread for the tests: their tensors are small, and on a 2-core machine shared with
# anything else two OpenMP threads spin-wait on each other (on a 2-core AMD EPYC VM we saw a
# test file go from 1.5 s to 54 s). Benchmarks (`python kernels_cpu.py`, ...) choose their own thread count.
torch.set_num_threads(1)


def _to_numpy(a):
    """Tensor (any device/dtype) or array-like -> float64 NumPy array (bool/int kept exact)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        # NumPy has no bfloat16; float16 -> float32 is exact, and so is bfloat16 -> float32.
        a = (a.float() if a.dtype in (torch.bfloat16, torch.float16) else a).numpy()
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind in "fc" else a


def assert_close(name, got, ref, atol, rtol):
    """Assert |got - ref| <= atol + rtol * |ref| elementwise (NaN must match NaN, inf must match inf).

    On failure the message names the quantity, the shapes, and the worst offenders:
    the max absolute error and the max relative error, each with its index and both values.
    Integer and bool outputs (indices, counts, masks) are compared exactly.
    """
    # Everything is compared in float64, so the only rounding in the comparison is the tested code's.
    g = _to_numpy(got)
    r = _to_numpy(ref)
    if g.shape != r.shape:
        raise AssertionError(f"{name}: shape mismatch, got {g.shape}, expected {r.shape}")
    if g.size == 0:
        return
    if g.dtype.kind not in "fc" or r.dtype.kind not in "fc":
        bad = g != r
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {g.size} entries differ (exact compare); "
                f"first at {idx}: got {g[idx]}, expected {r[idx]}"
            )
        return
    # NaN and inf must sit at the same places with the same sign. They are compared as patterns
    # first because inf - inf is NaN and NaN <= tol is False: a plain |got - ref| <= tol would
    # call two equal infinities different and could not say where a NaN appeared.
    nan_g, nan_r = np.isnan(g), np.isnan(r)
    if (nan_g != nan_r).any():
        idx = tuple(int(i) for i in np.argwhere(nan_g != nan_r)[0])
        raise AssertionError(f"{name}: NaN pattern differs, first at {idx}: got {g[idx]}, expected {r[idx]}")
    inf_g, inf_r = np.isinf(g), np.isinf(r)
    if (inf_g != inf_r).any() or (g[inf_g] != r[inf_r]).any():
        idx = tuple(int(i) for i in np.argwhere((inf_g != inf_r) | (inf_g & (g != r)))[0])
        raise AssertionError(f"{name}: inf pattern differs, first at {idx}: got {g[idx]}, expected {r[idx]}")
    # |got - ref| <= atol + rtol |ref| on the finite entries (the others matched above).
    finite = ~(nan_g | inf_g)
    err = np.abs(np.where(finite, g, 0.0) - np.where(finite, r, 0.0))
    tol = atol + rtol * np.abs(np.where(finite, r, 0.0))
    bad = err > tol
    if bad.any():
        rel = err / np.maximum(np.abs(np.where(finite, r, 0.0)), 1e-300)
        i_abs = np.unravel_index(int(np.argmax(err)), err.shape)
        i_rel = np.unravel_index(int(np.argmax(np.where(finite, rel, 0.0))), err.shape)
        i_bad = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.size} entries outside atol={atol:g} + rtol={rtol:g}*|ref|, shape {g.shape}\n"
            f"  max abs err {err[i_abs]:.3e} at {tuple(map(int, i_abs))}: got {g[i_abs]!r}, expected {r[i_abs]!r}\n"
            f"  max rel err {rel[i_rel]:.3e} at {tuple(map(int, i_rel))}: got {g[i_rel]!r}, expected {r[i_rel]!r}\n"
            f"  first failing index {i_bad}: got {g[i_bad]!r}, expected {r[i_bad]!r}"
        )


def run_in_cuda_graph(step):
    """step() captured in a CUDA graph and replayed once; returns what the capture returned.

    A capture fails on any host synchronisation (.item(), .cpu(), a data-dependent shape), so a
    function that gets through it never makes the host wait for the GPU. CUDA graphs require a
    warm-up outside the capture (on a side stream): it also compiles the Triton kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return out


def scores_of(kind, n, gen):
    """n distinct float64 scores of one shape, for the exact selects (training threshold and
    decode list): "sinks" (four huge scores above normal ones: the std is dominated by them, so a
    statistical guess of the kt-th score lands far above it), "powers of two" (signs random,
    magnitudes 2^-40 .. 2^40: mean and std say nothing useful), "negative" (all in [-2, -1): the
    order keys of negative floats run backwards from their bits) or "normal"."""
    if kind == "sinks":
        return torch.cat([1e4 + torch.arange(4, dtype=torch.float64), torch.randn(n - 4, generator=gen, dtype=torch.float64)])
    if kind == "powers of two":
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).double() + torch.rand(n, generator=gen, dtype=torch.float64))
    if kind == "negative":
        return -torch.rand(n, generator=gen, dtype=torch.float64) - 1.0
    return torch.randn(n, generator=gen, dtype=torch.float64)  # "normal"


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none (CI, laptops)")


def pytest_collection_modifyitems(config, items):
    """Skip the `gpu` tests where there is no CUDA device (they run on the GPU machine)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
