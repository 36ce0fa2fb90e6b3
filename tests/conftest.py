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

# --- Triton interpreter: must be set before any `import triton` (kernels_gpu.py imports it) ---
# We decide without importing torch.cuda first to keep this cheap; if the user already chose,
# we respect it.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing: the tests that need it will fail on import anyway
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest

# The project is flat: make the repository root importable (spark.py, topk.py, ...) no matter
# where pytest is started from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED = 1234


def _to_numpy(a):
    """Tensor (any device/dtype) or array-like -> float64 NumPy array (bool/int kept exact)."""
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu()
            if a.dtype in (torch.bfloat16, torch.float16):
                a = a.float()
            a = a.numpy()
    except ImportError:
        pass
    a = np.asarray(a)
    if a.dtype.kind in "fc":
        return a.astype(np.float64)
    return a


def assert_close(name, got, ref, atol, rtol):
    """Assert |got - ref| <= atol + rtol * |ref| elementwise (NaN must match NaN, inf must match inf).

    On failure the message names the quantity, the shapes, and the worst offenders:
    the max absolute error and the max relative error, each with its index and both values.
    """
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
    # NaN and inf must sit at the same places with the same sign.
    nan_g, nan_r = np.isnan(g), np.isnan(r)
    if (nan_g != nan_r).any():
        idx = tuple(int(i) for i in np.argwhere(nan_g != nan_r)[0])
        raise AssertionError(f"{name}: NaN pattern differs, first at {idx}: got {g[idx]}, expected {r[idx]}")
    inf_g, inf_r = np.isinf(g), np.isinf(r)
    if (inf_g != inf_r).any() or (g[inf_g] != r[inf_r]).any():
        idx = tuple(int(i) for i in np.argwhere((inf_g != inf_r) | (inf_g & (g != r)))[0])
        raise AssertionError(f"{name}: inf pattern differs, first at {idx}: got {g[idx]}, expected {r[idx]}")
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


# One torch thread for the tests: their tensors are small, and on a 2-core machine shared with
# anything else two OpenMP threads spin-wait on each other (we saw a test file go from 1.5 s to
# 54 s). Benchmarks (`python kernels_cpu.py`, ...) choose their own thread count.
try:
    import torch as _torch

    _torch.set_num_threads(1)
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(SEED)
    np.random.seed(SEED)
    try:
        import torch

        torch.manual_seed(SEED)
    except ImportError:
        pass
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none (CI, laptops)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CPU machine")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
