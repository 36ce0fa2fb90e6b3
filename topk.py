"""topk.py: exact top-k and statistical top-k, the two sparsifying operators of this project.

Papers (facts and settings digested in notes/papers.md)
- Exact top-k: "The Lazy Neuron Phenomenon" (Li et al., ICLR 2023, arXiv 2210.06313). Its
  Top-k Transformer keeps the k largest FFN activations of each token and zeroes the rest
  (notes/papers.md, "Exact top-k (Lazy Neuron)").
- Statistical top-k: "Spark Transformer" (You et al., arXiv 2506.06644, statistical top-k).
  Instead of sorting, it estimates the k-th largest value of a row from the row's mean and
  standard deviation, as if the row were Gaussian, and keeps what lies above that threshold:

      theta(z) = mean(z) + std(z) * Q(1 - k/D)          Q = standard normal quantile (inverse CDF)
      statistical_topk(z) = max(z - theta(z), 0)         (a *soft* threshold: survivors shift down)

  Two reductions and one elementwise pass: linear time, no sort. Gemma 3n ships this operator
  (Hugging Face `Gemma3nTextMLP._gaussian_topk`, population std, target sparsity p = 1 - k/D;
  notes/papers.md, "Statistical top-k (Spark)").

What a reader learns here
- the two operators written plainly in NumPy (the references), then the same in PyTorch
  (differentiable, any device, float32/16/bf16, no host synchronisation on a GPU);
- where statistical top-k is exact (i.i.d. Gaussian rows) and where it drifts (skewed,
  heavy-tailed rows): `python topk.py` measures target k vs achieved k on several row
  distributions, the overlap with exact top-k, and the CPU time of both operators.

Dimension letters (used in every shape comment below)
    D   length of the last axis (the row we select in: FFN width f, or number of keys n)
    k   how many entries of a row should survive, 1 <= k <= D
    ... any leading dimensions (batch, tokens, heads); each row is treated independently

Choices where the sources are silent (also in notes/topk.md)
- Population std (divide by D), as Gemma 3n's public code does; llama.cpp uses D - 1.
- Statistics in float64 in NumPy, and in at least float32 in torch (bf16/fp16 rows are upcast).
- We centre each row on its first entry before taking mean and variance. It changes nothing
  mathematically (mean(z - z0) + z0 = mean(z), var is shift invariant) but makes a constant row
  give *exactly* mean = z0 and std = 0 in floating point; without it NumPy's mean of a
  constant row is off by an ulp in most cases and a constant row would keep "survivors" of size
  1e-17. With the shift, a constant row has theta = its value and no survivors (all `fill`).
- k == D: the input is returned unchanged (the same object, no copy): nothing is thresholded,
  as if theta = -inf.
- An entry survives when it is strictly greater than theta (ties at theta are dropped).
- Non-finite input, one answer everywhere: a row holding NaN or +-inf has no mean or std, so
  its theta is NaN and statistical top-k returns the whole row as NaN, in NumPy and torch
  alike, with no exception and no warning. Exact top-k treats +-inf as ordinary values and
  ranks NaN above every number (torch.topk's rule; NumPy sorts NaN last and we take the last
  k), so NaN is kept. Other rows are never affected.
- Overflow and underflow: a finite row gets the same theta in NumPy and torch at any scale, even
  where its squares would leave the float range (float32 beyond ~1e19 or below ~1e-19, float64
  beyond ~1e154 or below ~1e-154): both divide the row by a power of two before squaring.
- Empty last axis (D = 0): no valid k exists (1 <= k <= 0), so it is a ValueError naming k and
  D. Leading dimensions of size 0 are fine and give an empty result of the same shape.
"""

import argparse
import math
import os
import statistics
import timeit

import numpy as np
import torch

# ------------------------------------------------------------------------------------------
# 0. Argument checks and the normal quantile
# ------------------------------------------------------------------------------------------


def check_k(k, D):
    """Raise ValueError unless k is an integer with 1 <= k <= D (D = length of the last axis)."""
    # bool is an int in Python; k=True would silently mean k=1, so we refuse it.
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int with 1 <= k <= D (D={D}), got k={k!r} of type {type(k).__name__}")
    if not 1 <= k <= D:  # (D = 0, an empty last axis, has no valid k)
        raise ValueError(f"k must satisfy 1 <= k <= D, got k={k} with D={D}" + " (the last axis is empty)" * (D == 0))


@torch.compiler.assume_constant_result  # torch.compile cannot trace NormalDist's C code: it calls it once
def normal_icdf(p):
    """Q(p): the standard normal quantile, the z with P(N(0,1) <= z) = p, for 0 < p < 1.

    Python's statistics.NormalDist gives it to double precision (Wichura's AS241 algorithm), so
    we need no SciPy. Q(0.92) = 1.405 (k = 8 %), Q(0.95) = 1.645 (Gemma 3n's multiplier). Under
    torch.compile its result is a constant of the graph (p depends on k and D only).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) for the normal quantile, got p={p}")
    return statistics.NormalDist().inv_cdf(p)


def _check_np(x, name="x"):
    """The NumPy references take a floating array with at least one axis."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (rows are taken along the last), got a scalar")
    return x


def _check_torch(x, name="x"):
    """The torch versions take a floating tensor with at least one axis (values are not inspected)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__} (use the *_np function for NumPy)")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one axis (rows are taken along the last), got a scalar")


def _check_fill_soft(fill, soft=True):
    """fill must be a real number (0.0, -inf, ...) and soft a bool; anything else is a TypeError."""
    if isinstance(fill, bool) or not isinstance(fill, (int, float, np.integer, np.floating)):
        raise TypeError(f"fill must be a real number (e.g. 0.0 or -inf), got {fill!r} of type {type(fill).__name__}")
    if not isinstance(soft, (bool, np.bool_)):
        raise TypeError(f"soft must be a bool, got {soft!r} of type {type(soft).__name__}")


# ------------------------------------------------------------------------------------------
# 1. Exact top-k (Lazy Neuron paper, Top-k Transformer) -- NumPy reference
# ------------------------------------------------------------------------------------------


def exact_topk_np(x, k, fill=0.0):
    """Keep the k largest entries of each row, set the others to `fill`.   [..., D] -> [..., D]

    fill = 0.0 before an activation with act(0) = 0 (ReLU, GELU); fill = -inf before a softmax.
    Which of several equal values survives is not defined (tests compare kept values, not
    positions, when there are ties).
    """
    x = _check_np(x)
    D = x.shape[-1]
    check_k(k, D)
    _check_fill_soft(fill)
    if k == D:
        return x  # every entry is among the k largest
    # argpartition puts the k largest last, in no particular order: O(D) per row. NumPy orders
    # NaN after every number, so NaN ranks highest, as in torch.topk.
    idx = np.argpartition(x, D - k, axis=-1)[..., D - k :]  # [..., k]
    out = np.full_like(x, fill)  # [..., D]
    np.put_along_axis(out, idx, np.take_along_axis(x, idx, axis=-1), axis=-1)
    return out


# ------------------------------------------------------------------------------------------
# 2. Statistical top-k (Spark Transformer, arXiv 2506.06644) -- NumPy reference
# ------------------------------------------------------------------------------------------


def statistical_threshold_np(x, k):
    """theta = mean(x) + std(x) * Q(1 - k/D) over the last axis.   [..., D] -> [..., 1] float64

    If the D entries of a row were i.i.d. Gaussian, about k of them would exceed theta.
    Population std (divide by D). k == D gives theta = -inf (everything survives). A row holding
    NaN or +-inf has no mean or std: its theta is NaN. One float64 array of x's shape is the only
    copy (decode loops call this once per token), and no BLAS call.
    """
    x = _check_np(x)
    D = x.shape[-1]
    check_k(k, D)
    if k == D:
        return np.full(x.shape[:-1] + (1,), -np.inf)
    with np.errstate(invalid="ignore"):  # inf - inf in a row holding +-inf: NaN is that row's answer
        # Centre on the first entry so a constant row gives mean = z0 and std = 0 exactly (module docstring).
        c = np.subtract(x, x[..., :1], dtype=np.float64)  # [..., D]  z - z0, upcast in the same pass
        mean_c = c.mean(axis=-1, keepdims=True)  # [..., 1]
        c -= mean_c  # [..., D]  z - mean
        # float64 squares overflow above ~1e154 and underflow below ~1e-154, so we scale each row by
        # 2^-e, max|c| < 2^e <= 2 max|c|, before squaring (exact: only exponents move). e >= -1000
        # keeps 2^-e finite for a row of subnormals.   e [..., 1]
        e = np.frexp(np.maximum(c.max(axis=-1, keepdims=True), -c.min(axis=-1, keepdims=True)))[1].clip(-1000, None)
        var = np.square(np.multiply(c, np.ldexp(1.0, -e), out=c), out=c).mean(axis=-1, keepdims=True)  # [..., 1] var/4^e
    # theta = mean + std * Q(1 - k/D)          (Spark, statistical top-k; Gemma 3n: p = 1 - k/D)
    return x[..., :1] + mean_c + np.ldexp(np.sqrt(var), e) * normal_icdf(1.0 - k / D)


def statistical_topk_np(x, k, fill=0.0, soft=True):
    """Statistical top-k along the last axis.   [..., D] -> [..., D], dtype of x

    soft=True  (the paper's operator): survivors become x - theta, the rest `fill`;
               with fill = 0 this is max(x - theta, 0).
    soft=False: survivors keep their value x (useful before a softmax, with fill = -inf).
    An entry survives when x > theta. k == D returns x unchanged.
    """
    x = _check_np(x)
    D = x.shape[-1]
    check_k(k, D)
    _check_fill_soft(fill, soft)
    if k == D:
        return x
    theta = statistical_threshold_np(x, k)  # [..., 1] float64
    z = x.astype(np.float64)  # [..., D]
    kept = z - theta if soft else z  # [..., D]
    out = np.where(z > theta, kept, fill)  # [..., D]
    out = np.where(np.isnan(theta), np.nan, out)  # a row holding NaN or +-inf: theta NaN, the whole row NaN
    return out.astype(x.dtype)


def achieved_k(y, fill=0.0):
    """How many entries of each row differ from `fill` (survived).   [..., D] -> [...] int

    Works on NumPy arrays (returns an int64 array) and torch tensors (returns an int64 tensor on
    the same device, without synchronising). NaN counts as a survivor (NaN != fill).
    """
    _check_fill_soft(fill)
    if isinstance(y, torch.Tensor):
        return (y != fill).sum(dim=-1)
    y = np.asarray(y)
    if y.ndim == 0:
        raise ValueError("y must have at least one axis (rows are taken along the last), got a scalar")
    return (y != fill).sum(axis=-1).astype(np.int64)


# ------------------------------------------------------------------------------------------
# 3. The same operators in PyTorch (must match the NumPy references above)
#    Any leading shape, CPU or CUDA, float32/float16/bfloat16/float64, differentiable.
#    On a GPU nothing waits for the device: no .item(), no branch on values.
# ------------------------------------------------------------------------------------------


def exact_topk(x, k, fill=0.0):
    """Torch version of exact_topk_np.   [..., D] -> [..., D]

    Gradient: 1 for kept entries, 0 elsewhere (torch.where routes it).
    NaN follows torch.topk (ranked above every number, so it is kept in its row).
    """
    _check_torch(x)
    D = x.shape[-1]
    check_k(k, D)
    _check_fill_soft(fill)
    if k == D:
        return x
    idx = torch.topk(x, k, dim=-1, sorted=False).indices  # [..., k]
    # A boolean mask of the survivors, then one where(): differentiable and dtype-preserving.
    keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)  # [..., D]
    return torch.where(keep, x, fill)


def _row_mean_std(z, scaled=False):
    """Mean, population std and the centred row, for each row of z (in the statistics dtype).

    z [..., D] -> mean [..., 1], std [..., 1], c = z - mean [..., D]
    Two plain passes (a mean, then the norm of the centred row) rather than torch.var_mean: on
    the CPU var_mean's Welford reduction was ~16x slower at training shapes ([768, 512]; 2-core
    AMD EPYC VM, torch 2.13 CPU).
    Centred on the first entry first, so that a constant row gives exactly std = 0 (module docstring).
    Overflow: squares overflow float32 above ~1.8e19 (and lose digits below ~1e-19), so a row of
    1e30s would get std = inf. scaled=True first divides each row by a power of two s with
    s <= max|z| < 2 s. A power of two only moves exponents, so wherever the plain computation
    fits the results are bit-identical. It costs two reductions and two passes, so on the CPU
    we compute plainly and redo the batch scaled only when a std is out of range; on another
    device that check would wait for the device, so there we always scale.
    """
    scaled = scaled or z.device.type != "cpu"
    if scaled:
        zd = z.detach()  # s is piecewise constant: no gradient flows through it
        big = torch.maximum(zd.amax(dim=-1, keepdim=True), -zd.amin(dim=-1, keepdim=True))  # [..., 1] max|z|
        big = big.clamp_min(torch.finfo(z.dtype).tiny)  # an all-zero row: any power of two will do
        # frexp writes big = m 2^e with m in [0.5, 1), so s = big / (2 m) is exactly 2^(e-1)
        s = big / (2 * torch.frexp(big).mantissa)  # [..., 1]
        z = z / s  # [..., D] exact
    z0 = z[..., :1]  # [..., 1]
    c = z - z0  # [..., D]
    mean_c = c.mean(dim=-1, keepdim=True)  # [..., 1]  exactly 0 for a constant row
    c.sub_(mean_c)  # [..., D]  z - mean
    # population std = ||z - mean|| / sqrt(D)
    std = torch.linalg.vector_norm(c, dim=-1, keepdim=True) / math.sqrt(z.shape[-1])  # [..., 1]
    if scaled:
        return (z0 + mean_c) * s, std * s, c * s
    # On the CPU reading these waits for nothing. Below sqrt(tiny) squares underflow.
    lo, hi = torch.aminmax(std.detach())
    if not (math.sqrt(torch.finfo(z.dtype).tiny) <= float(lo) and float(hi) < math.inf):  # False for NaN too
        return _row_mean_std(z, scaled=True)  # an overflow, an underflow, a constant or a NaN/inf row
    return z0 + mean_c, std, c


def statistical_threshold(x, k):
    """Torch version of statistical_threshold_np.   [..., D] -> [..., 1]

    The statistics are computed in float32 for float16/bfloat16 input (float64 stays float64),
    and theta is returned in that precision. Gradients flow through mean and std (theta is not
    detached; the paper does not say whether it is: notes/papers.md, "Statistical top-k (Spark)").
    """
    _check_torch(x)
    D = x.shape[-1]
    check_k(k, D)
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    if k == D:
        return torch.full(x.shape[:-1] + (1,), -math.inf, dtype=stat_dtype, device=x.device)
    if x.numel() == 0:  # leading dims of size 0 (a shape check, not a value check)
        return torch.empty(x.shape[:-1] + (1,), dtype=stat_dtype, device=x.device)
    mean, std, _ = _row_mean_std(x.to(stat_dtype))  # [..., 1] each
    # theta = mean + std * Q(1 - k/D)
    return mean + std * normal_icdf(1.0 - k / D)


def statistical_topk_grad(g, z, mean, std, q, soft=True, out=None):
    """Gradient of statistical top-k with respect to its input, theta included.   -> [..., D]

    g [..., D] upstream gradient; z [..., D] the input (statistics dtype); mean, std [..., 1] its
    row statistics; q = Q(1 - k/D); out [..., D] (optional, soft only; ignored when soft=False)
    the forward's output max(z - theta, 0), whose positive entries are exactly the survivors.
    Derivation, for one row of length D:

        theta = mu + q sigma,   mu = (1/D) sum_j z_j,   sigma^2 = (1/D) sum_j (z_j - mu)^2
        d mu / d z_j = 1/D,     d sigma / d z_j = (z_j - mu) / (D sigma)
        => d theta / d z_j = 1/D + q (z_j - mu) / (D sigma)

        soft:  y_i = (z_i - theta) m_i,  m_i = [z_i > theta]  (m is piecewise constant)
               dL/dz_j = g_j m_j - S * d theta / d z_j,   S = sum_i g_i m_i
        hard:  y_i = z_i m_i               dL/dz_j = g_j m_j

    A constant row (sigma = 0) has no survivors, so S = 0 and its gradient is 0 (we avoid 0/0).
    Autograd through the plain ops gives the same numbers; writing it out saves ~15 elementwise
    passes per call, which is what makes a statistical top-k FFN train at nearly dense speed.
    """
    if out is not None and soft:
        # g_j m_j with m_j = [out_j > 0] (the soft output only: a hard output z m can be <= 0 on a
        # survivor). ReLU's backward kernel does exactly this in one pass over float tensors. The
        # obvious `g * (z > theta)` builds a bool mask and multiplies a float by it: ~10x slower
        # (0.14 + 0.27 ms vs 0.04 ms at [768, 512] on a 2-core AMD EPYC VM, torch 2.13 CPU).
        gm = torch.ops.aten.threshold_backward(g, out, 0.0)  # [..., D]
    else:
        gm = g * (z > mean + q * std)  # [..., D]  g_j m_j, m = survivors
    if not soft:
        return gm
    D = z.shape[-1]
    S = gm.sum(dim=-1, keepdim=True)  # [..., 1]
    safe_std = torch.where(std > 0, std, 1.0)  # [..., 1]
    # dL/dz = g m - S (1/D + q (z - mu) / (D sigma))  =  g m - a z + (a mu - S/D),  a = S q / (D sigma)
    # (per-row scalars first, so the [..., D] work is two in-place passes on gm: a fused
    # multiply-add and an add)
    a = S * (q / D) / safe_std  # [..., 1]
    return gm.addcmul_(z, a, value=-1.0).add_(a * mean - S / D)


class _StatisticalTopk(torch.autograd.Function):
    """statistical_topk's forward with the analytic backward of statistical_topk_grad."""

    @staticmethod
    def forward(ctx, z, q, fill, soft):  # z [..., D] in the statistics dtype
        mean, std, c = _row_mean_std(z)  # [..., 1], [..., 1], [..., D] = z - mean
        theta = mean + std * q  # [..., 1]
        if soft and fill == 0.0:
            # max(z - theta, 0) = max(c - q std, 0), in place on c; clamp keeps NaN (NaN row -> all NaN)
            out = c.sub_(std * q).clamp_min_(0.0)  # [..., D]
        else:
            kept = z - theta if soft else z  # [..., D]
            # NaN rows: theta is NaN and `z > theta` is False, so we route NaN through explicitly.
            out = torch.where(z > theta, kept, torch.where(torch.isnan(theta), theta, fill))  # [..., D]
        # the soft output with fill 0 marks the survivors itself (out > 0); the backward uses it
        ctx.save_for_backward(z, mean, std, out if soft and fill == 0.0 else None)
        ctx.q, ctx.soft = q, soft
        return out

    @staticmethod
    def backward(ctx, g):
        z, mean, std, out = ctx.saved_tensors
        return statistical_topk_grad(g, z, mean, std, ctx.q, ctx.soft, out), None, None, None


def statistical_topk(x, k, fill=0.0, soft=True):
    """Torch version of statistical_topk_np.   [..., D] -> [..., D], dtype of x

    With fill = 0 and soft = True this is Gemma 3n's operator relu(x - (mean + std * Q(p))),
    p = 1 - k/D. A row holding NaN or +-inf becomes all NaN (its theta is NaN); other rows are
    unaffected. Gradient: statistical_topk_grad (1 on survivors, minus the terms through mean
    and std). With fill = 0 and soft = True the backward reads the output itself (its positive
    entries are the survivors), so modifying the result in place before backward (y.relu_(),
    y.mul_(2)) raises autograd's "modified by an inplace operation" error.
    """
    _check_torch(x)
    D = x.shape[-1]
    check_k(k, D)
    _check_fill_soft(fill, soft)
    if k == D:
        return x
    if x.numel() == 0:
        return x.clone()
    z = x.to(torch.promote_types(x.dtype, torch.float32))  # [..., D] statistics dtype
    return _StatisticalTopk.apply(z, normal_icdf(1.0 - k / D), float(fill), bool(soft)).to(x.dtype)


# ------------------------------------------------------------------------------------------
# 4. Demonstration: how close is statistical top-k to exact top-k, and what does it cost?
#    python topk.py [--quick]
# ------------------------------------------------------------------------------------------


def demo_rows(kind, rows, D, rng):
    """Rows drawn from the distributions we test the Gaussian assumption against.   -> [rows, D]"""
    from spark import gelu_np  # here, not at the top: spark.py imports this file

    if kind == "gaussian":  # the assumption holds: i.i.d. N(0.3, 2^2)
        return 0.3 + 2.0 * rng.standard_normal((rows, D))
    if kind == "gelu":  # GELU of Gaussians: skewed, piled up just below 0
        return gelu_np(rng.standard_normal((rows, D)))
    if kind == "student_t3":  # heavy tails (3 degrees of freedom)
        return rng.standard_t(3, size=(rows, D))
    if kind == "bimodal":  # two modes: 90 % around 0, 10 % around +3
        hi = rng.random((rows, D)) < 0.10
        return np.where(hi, 3.0, 0.0) + 0.5 * rng.standard_normal((rows, D))
    raise ValueError(f"kind must be gaussian, gelu, student_t3 or bimodal, got {kind!r}")


def _median_ms(fn, reps):
    """Median wall time of fn() in milliseconds over reps calls, after one warm-up call."""
    fn()
    return 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))


def _plot(sample_rows, k, path):
    """One histogram per distribution with the exact k-th largest value and the statistical theta."""
    from matplotlib.figure import Figure  # no pyplot: nothing is shown, so no GUI backend is needed

    fig = Figure(figsize=(4 * len(sample_rows), 3.2))
    axes = fig.subplots(1, len(sample_rows))
    for ax, (kind, row) in zip(axes, sample_rows.items()):
        theta = float(statistical_threshold_np(row, k)[0])
        kth = float(np.sort(row)[-k])  # the exact top-k keeps entries >= this value
        ax.hist(row, bins=120, range=tuple(np.percentile(row, [0.05, 99.95])), color="0.6")
        ax.axvline(kth, color="C0", label=f"exact k-th value {kth:.2f}")
        ax.axvline(theta, color="C3", ls="--", label=f"statistical θ {theta:.2f}")
        ax.set_title(f"{kind}: {int((row > theta).sum())} above θ (k = {k})", fontsize=9)
        ax.set_yticks([])
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Statistical vs exact top-k: achieved k, overlap, CPU time.")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one repetition, no figure")
    args = ap.parse_args(argv)
    rows, M, reps = (4, 8, 1) if args.quick else (256, 2048, 7)
    D, density = 16384, 0.08
    k = round(density * D)  # 1311 of 16384
    rng = np.random.default_rng(0)

    # --- accuracy: target k vs achieved k, overlap of survivors with exact top-k --------------
    print(f"Statistical vs exact top-k, D = {D}, k = {k} ({density:.0%}), {rows} rows per distribution")
    print(f"{'rows drawn from':<12} {'target k':>8} {'achieved k: mean':>17} {'min':>6} {'max':>6} {'rel. err':>9} {'overlap':>8}")
    sample_rows = {}
    for kind in ["gaussian", "gelu", "student_t3", "bimodal"]:
        x = demo_rows(kind, rows, D, rng)  # [rows, D] float64
        got = achieved_k(statistical_topk_np(x, k))  # [rows]
        exact = exact_topk_np(x, k, fill=-np.inf) != -np.inf  # [rows, D], -inf so that survivors <= 0 count
        # overlap = |stat survivors ∩ exact survivors| / k: the recall of the true top-k
        overlap = ((x > statistical_threshold_np(x, k)) & exact).sum(-1) / k  # [rows]
        print(f"{kind:<12} {k:>8} {got.mean():>17.1f} {got.min():>6} {got.max():>6} {got.mean() / k - 1:>+9.1%} {overlap.mean():>8.1%}")
        sample_rows[kind] = x[0]

    # --- timing on the CPU: [M, 16384] float32, eager torch -----------------------------------
    xt = torch.randn(M, D)  # [M, D] float32, 128 MiB for M = 2048
    buf = torch.empty_like(xt)
    t_copy = _median_ms(lambda: buf.copy_(xt), reps)
    t_exact = _median_ms(lambda: exact_topk(xt, k), reps)
    t_stat = _median_ms(lambda: statistical_topk(xt, k), reps)
    gbs = 2 * xt.numel() * xt.element_size() / t_copy / 1e6  # one read + one write per copy
    print(f"\nCPU time, x = [{M}, {D}] float32, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cores), median of {reps}")
    print(f"{'operator':<36} {'ms':>8} {'vs exact':>9}")
    print(f"{'exact_topk (torch.topk + scatter)':<36} {t_exact:>8.1f} {1.0:>8.2f}x")
    print(f"{'statistical_topk (eager torch)':<36} {t_stat:>8.1f} {t_exact / t_stat:>8.2f}x")
    print(f"{'copy (1 read + 1 write: the floor)':<36} {t_copy:>8.1f} {t_exact / t_copy:>8.2f}x   ({gbs:.1f} GB/s)")
    print(f"statistical_topk reaches {t_copy / t_stat:.0%} of the memory-bandwidth floor; "
          f"the fused C row loop is in kernels_cpu.py.")
    if not args.quick:
        _plot(sample_rows, k, os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes", "figures", "topk.png"))


if __name__ == "__main__":
    main()
