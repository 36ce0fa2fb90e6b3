"""kernels_gpu.py: the GPU half of spark, in Triton. For training: statistical top-k, forward and
backward, the fused activation of the Spark FFN and Gemma 3n, gelu(statistical_topk(p)) * u, and
Spark attention, which never stores its [T, S] scores. For inference: TwELL, the L1-sparse FFN
whose gate is packed inside its own matmul, and Spark decoding (FFN and attention of one new
token, and a whole model in a CUDA graph).

Statistical top-k (Spark Transformer, arXiv 2506.06644, statistical top-k; notes/papers.md,
"Statistical top-k (Spark)") thresholds each row z of length D at

    theta = mean(z) + std(z) * Q(1 - k/D)          y = max(z - theta, 0)

Two reductions and one elementwise pass, no sort: it is memory-bound, so a kernel is as fast as
the bytes it moves. In eager PyTorch each step (upcast, centre, mean, norm, subtract, clamp,
cast) is a separate pass over memory; here one Triton program reads its row from memory once
and writes the answer once. The same holds for the backward and for the fused activation,
where the sparse pre-activation never touches memory at all.

What a reader learns here (in the manner of Triton's tutorials 02-fused-softmax and 05-layer-norm)
- one program per row (or per few short rows), the row in registers when it fits, a chunked
  loop when it does not, and how those sizes were chosen by measuring;
- row statistics that are exact for constant rows and safe from overflow, in float32;
- merging the statistics of chunks in one pass (Chan, Golub and LeVeque's update, 1979);
- a backward written from its derivation (topk.statistical_topk_grad) as one pass per row;
- fusing an activation so that a whole intermediate tensor is never stored;
- what a compiler must know to use vector loads (alignment, and masks constant over a vector);
- measuring a memory-bound kernel against the copy that moves the same bytes;
- an exact top-k without a sort (a radix select on the bits of the scores, in registers), and
  attention in two passes, flash-attention style, with a mask and a gate inside the tiles.

The kernels, each with the reference it must match (same argument names and order)
    statistical_topk_gpu(x, k, fill, soft)       reference: topk.statistical_topk (and _np)
        _stat_topk_fwd_kernel: threshold, output, and per-row mean and std for the backward.
        _stat_topk_bwd_kernel: statistical_topk_grad_gpu(g, z, mean, std, q, soft),
                               reference: topk.statistical_topk_grad.
    gelu_topk_mul_gpu(p, u, k)                    reference: gelu_topk_mul(p, u, k) below
        _gelu_topk_mul_fwd_kernel, _gelu_topk_mul_bwd_kernel: forward and backward in one pass
        each; the backward recomputes max(p - theta, 0) from p and the saved mean and std.
    spark_attention_gpu(q, k, v, k_top, r)        reference: spark.spark_attention (and _np)
        _spark_attn_thr_kernel: each query's threshold (its kt-th score), max and kept count;
        _spark_attn_fwd_kernel: the output and softmax sum; _spark_attn_bwd_dq_kernel, _spark_attn_bwd_dkdv_kernel.
    twell_ffn_gpu(x, Wg, Wu, Wd, tile, C)         reference: spark.twell_ffn (and _np)      section 6
        _twell_produce_kernel (gate matmul + packing), _twell_consume_kernel, the dense route.
    spark_ffn_decode_gpu(x, K1, K2t, V, k, r)     reference: spark.spark_ffn_np              section 7
    spark_attention_decode_gpu(q, k1, k2, v, k_top, r), attention_decode_gpu(q, k, v),
    generate_gpu(model, idx, max_new_tokens, ...)  references: spark_attention_np, attention_np, GPT.generate
    polar_attention_decode_gpu(q, k, v, heads)    reference: spark.polar_attention_np, T = 1     section 7e
tests/test_kernels_gpu*.py run them in Triton's interpreter on the CPU (CI) and on a GPU.
`python kernels_gpu.py [--json PATH] [--quick] [--only PART]` is the benchmark (CUDA only): the
kernels against their baselines, whole training steps of a GPT-2-small-sized model (rows
train_step/...), TwELL (twell_ffn/..., twell_memory/...), decoding (spark_ffn_decode/...,
spark_attention_decode/..., decode_model/...) and Polar decoding (polar_attention_decode/...).

Dimension letters
    D   row length (FFN width f, or number of keys n)        R   number of rows (all leading dims)
    k   target survivors per row, 1 <= k <= D                BLOCK   entries of a row held at once
    ROWS   rows one program works on (a tile is [ROWS, BLOCK]); Spark attention's letters: section 5

Choices (as topk.py's, so that every implementation gives one answer; notes/kernels_gpu.md)
- Input and output float32, bfloat16 or float16; statistics always in float32; q = Q(1 - k/D)
  computed once on the host in float64 (then passed to the kernel as float32). float64 input
  is refused: the kernels have no float64 statistics path (tests compare against float64
  references instead of using torch.autograd.gradcheck).
- Population std; centred on the row's first entry, so a constant row has std = 0 exactly and
  no survivor; an entry survives when it is strictly above theta; k == D returns x itself.
- A row holding NaN or +-inf comes out all NaN; other rows are unaffected.
- Overflow: every row is divided by a power of two s with s <= max|z| < 2 s before squaring
  (exact: only exponents move), so a finite row of 1e30s gets NumPy's float64 answer.
- No host synchronisation: nothing reads a value back; every branch is on shapes.
Numbers quoted in comments were measured on an NVIDIA H200 (torch 2.11, triton 3.6).
"""

import argparse
import itertools
import json
import math
import os
import types

import torch
import torch.nn.functional as F

from topk import _check_fill_soft, _check_torch, check_k, exact_topk, normal_icdf
from topk import statistical_threshold, statistical_topk, statistical_topk_grad
import spark  # (spark.py imports this file only inside functions, so both orders work)
from spark import _check_attn_shapes, _check_int

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice  # fast_logf: one MUFU.LG2 on NVIDIA GPUs
    try:  # programmatic dependent launch (section 7a)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # an older triton: plain launches
        gdc_launch_dependents = gdc_wait = None
except ImportError:  # the file still imports (tests, docs); every kernel call says what is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # only read by the kernels' annotations below
    gdc_wait = None

# @jit compiles a kernel with Triton, or leaves a plain function when triton is missing.
jit = triton.jit if triton is not None else (lambda fn: fn)

# The tile one program works on: ROWS rows x BLOCK entries. BLOCK is the row length rounded up
# to a power of two, at most MAX_BLOCK (forward kernels) or MAX_BLOCK_BWD (backward kernels); a
# longer row is processed in chunks of that size. Rows shorter than TILE are grouped, TILE // BLOCK
# of them to a program, so that each program has enough bytes in flight. Chosen on an H200
# (notes/kernels_gpu.md); tests lower them to exercise chunks and grouping at small shapes.
MAX_BLOCK = 8192
MAX_BLOCK_BWD = 16384
TILE = 2048
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ------------------------------------------------------------------------------------------
# 0. Argument checks and launch configuration
# ------------------------------------------------------------------------------------------


def _check_x(name, x):
    """x must be a float32/bf16/fp16 tensor with at least one axis, on a CUDA device (or on the
    CPU under Triton's interpreter, TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("kernels_gpu needs triton (pip install triton; without a GPU set TRITON_INTERPRET=1 "
                           "to run the kernels in Triton's interpreter); topk.statistical_topk needs neither")
    _check_torch(x, name)
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (statistics are float32 inside), got {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{name} must be on a CUDA device (or set TRITON_INTERPRET=1 to run on the CPU), got {x.device}")


def _check_same(where, ref_name, ref, rows, **tensors):
    """Every tensor: a tensor of ref's dtype on ref's device (and with a contiguous last axis when rows)."""
    for name, t in tensors.items():
        _check_x(name, t)
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"{where}: {name} must have {ref_name}'s dtype and device (the inputs share dtype and "
                            f"device: {ref.dtype}, {ref.device}), got {t.dtype} on {t.device}")
        if rows and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} must have a contiguous last axis (the kernels read rows); got strides "
                             f"{tuple(t.stride())}")


def _check_inputs(where, rows=True, **tensors):
    """float32 / bf16 / fp16 tensors of one dtype on one device (CUDA, or the CPU under the
    interpreter), last axes contiguous when `rows`; float64 gets its own message (the references run it)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            raise TypeError(f"{where}: {name} is float64; the kernels take float32, bfloat16 or float16 "
                            f"(spark.py's and topk.py's torch versions run float64)")
    (name0, t0), *_ = tensors.items()
    _check_x(name0, t0)
    _check_same(where, name0, t0, rows, **tensors)


def _rows(x):
    """[..., D] -> [R, D] with unit stride along D. A view when possible: the kernels take the
    row stride, so a row-sliced view (x[:, :D] of a wider tensor) is read in place; only a
    strided last axis (x.t(), x[..., ::2]) is copied."""
    x = x.reshape(-1, x.shape[-1])  # [R, D] (reshape copies only if the leading dims cannot merge)
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(R, D, *strides, backward=False):
    """The launch grid and the tile: (grid, dict of the kernels' BLOCK, ROWS, ONE_BLOCK, ALIGN, num_warps)
    for R rows of length D whose row strides (in elements) are `strides`.

    Of the settings we tried on an H200 (notes/kernels_gpu.md), the forward kernels ran fastest
    with 32 entries per thread and chunks of 8192; the backward kernels, which hold two or three
    rows at once (g, z or g, p, u), with 8 entries per thread and whole rows up to 16384 (one
    pass instead of two).
    """
    BLOCK = min(triton.next_power_of_2(D), MAX_BLOCK_BWD if backward else MAX_BLOCK)
    ROWS = max(1, TILE // BLOCK)
    num_warps = min(max(ROWS * BLOCK // (256 if backward else 1024), 1), 32)
    ALIGN = math.gcd(16, *strides)  # a power of two dividing every row stride (see _row_starts)
    return (triton.cdiv(R, ROWS),), dict(BLOCK=BLOCK, ROWS=ROWS, ONE_BLOCK=BLOCK >= D, ALIGN=ALIGN, num_warps=num_warps)


# ------------------------------------------------------------------------------------------
# 1. Building blocks shared by the kernels (Triton functions, inlined where they are called).
#    They work on a tile of ROWS rows: x [ROWS, BLOCK], per-row values [ROWS].
# ------------------------------------------------------------------------------------------


@jit
def _pow2_scale(m):
    """For m >= 0 (float32): s and 1/s, s a power of two with s <= m < 2 s.

    Read off m's exponent bits (float32 = sign | 8 exponent bits | 23 mantissa bits): keeping
    only the exponent of m gives 2^floor(log2 m). We clamp the exponent to [2^-126, 2^126] so
    that both s and 1/s are normal numbers (m = 0, subnormal, inf or NaN land on the ends; a
    NaN or inf row becomes NaN later anyway, through its sums).
    """
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent: m = 1.f * 2^(e - 127)
    e = tl.minimum(tl.maximum(e, 1), 253)
    s = (e << 23).to(tl.float32, bitcast=True)  # 2^(e - 127)
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 - e)
    return s, inv_s


@jit
def _row_starts(Base, rows, stride, ALIGN: tl.constexpr):
    """[ROWS, 1] pointers to the first entry of each row: Base + row * stride.

    Vector accesses (16 bytes at once, instead of one load per entry) need the compiler to know
    that every row starts 16-byte aligned and that masks like `col < D` are constant over each
    group of entries. Triton knows by itself only whether an integer argument is a multiple of
    16, so a row of D = 3000 bf16 entries (a multiple of 8) ran entry by entry at half the copy's
    speed on an H200. So the kernels take D as a compile-time constant (one compilation per row
    length, as an FFN layer has one), and ALIGN, a power of two the host found dividing every
    row stride, is stated here.
    """
    return Base + tl.multiple_of(rows * stride, ALIGN)[:, None]


@jit
def _block_moments(x, mask, n, x0, inv_s):
    """Per row: mean and M2 (sum of squared deviations) of c = (x - x0) / s over n masked entries.

    Two passes over registers (the centred, "two-pass" variance): the row is already here, so
    the accurate formula costs no memory traffic. Scaling first keeps |c| < 4, so squares cannot
    overflow; centring on x0 makes c = 0 exactly for a constant row (topk.py's rule). Masked
    lanes (padding past D, rows past R) are zeroed so they stay out of both sums.
    """
    c = tl.where(mask, x * inv_s[:, None] - (x0 * inv_s)[:, None], 0.0)  # [ROWS, BLOCK]
    mean_c = tl.sum(c, axis=1) / n  # [ROWS]
    dev = tl.where(mask, c - mean_c[:, None], 0.0)  # [ROWS, BLOCK]
    return mean_c, tl.sum(dev * dev, axis=1)


@jit
def _row_stats_chunked(X_rows, rmask, x0, D, BLOCK: tl.constexpr):
    """Mean and population std of each row (D entries, D > BLOCK), reading it once, in chunks.

    X_rows [ROWS, 1] points to the start of each row. Each chunk's (count n_b, mean, M2) is merged
    into the running one with the parallel update of Chan, Golub and LeVeque (1979):
        delta = mean_b - mean_a,  n = n_a + n_b
        mean  = mean_a + delta n_b / n,   M2 = M2_a + M2_b + delta^2 n_a n_b / n
    The running statistics are kept in units of a power of two s that grows with the running
    max|x|; when it grows, mean and M2 are rescaled (exactly, by powers of two).
    """
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    n = 0.0  # entries merged so far (the same for every row)
    # per-row loop-carried float32 values [ROWS] (written from x0 so their type is fixed from the start)
    mean_c = x0 * 0.0  # mean of (x - x0) / s over the merged entries
    m2 = x0 * 0.0  # their M2, in units of s^2
    m = x0 * 0.0  # running max |x|
    s = x0 * 0.0 + 1.0  # current scale
    for start in range(0, D, BLOCK):
        mask = rmask[:, None] & (start + cols < D)  # [ROWS, BLOCK]
        x = tl.load(X_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.max(tl.abs(x), axis=1))
        s_new, inv_s = _pow2_scale(m)
        r = s * inv_s  # s_old / s_new, a power of two <= 1 (1 for the first chunk's empty stats)
        mean_c = mean_c * r
        m2 = m2 * r * r
        n_b = tl.minimum(D - start, BLOCK).to(tl.float32)  # entries in this chunk
        mean_b, m2_b = _block_moments(x, mask, n_b, x0, inv_s)
        delta = mean_b - mean_c
        n_ab = n + n_b
        mean_c = mean_c + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (n * n_b / n_ab)
        n = n_ab
        s = s_new
    # back to the row's units: mean = x0 + s mean_c, std = s sqrt(M2 / D)
    return x0 + mean_c * s, tl.sqrt(m2 / D) * s


@jit
def _row_stats_in_registers(x, mask, x0, D):
    """Mean and population std of each row of a tile that holds whole rows (the one-block case)."""
    s, inv_s = _pow2_scale(tl.max(tl.abs(x), axis=1))  # masked lanes are 0: never the max
    mean_c, m2 = _block_moments(x, mask, D, x0, inv_s)
    return x0 + mean_c * s, tl.sqrt(m2 / D) * s


@jit
def _threshold(x, theta, fill, SOFT: tl.constexpr):
    """Statistical top-k's output for entries x [ROWS, BLOCK] with thresholds theta [ROWS, 1] (float32)."""
    if SOFT:
        kept = x - theta  # the paper's soft threshold: survivors shift down by theta
    else:
        kept = x  # survivors keep their value (before a softmax, with fill = -inf)
    y = tl.where(x > theta, kept, fill)
    # theta is NaN for a row holding NaN or +-inf (its sums are NaN): the whole row comes out NaN
    return tl.where(theta != theta, theta, y)


# ------------------------------------------------------------------------------------------
# 2. Kernel 1: statistical top-k, forward
#
# Motivation. At [8192, 16384] bf16 the input is 268 MB; any top-k must read it once and write
# its output once: 537 MB, ~130 us at the H200's copy rate (4.1 TB/s). Eager torch (topk.statistical_topk)
# makes ~10 passes (upcast to float32, max, centre, mean, subtract, norm, threshold, cast) and
# allocates float32 temporaries. One program per row (or per few short rows) reads the row from
# memory once and writes once, plus 8 bytes of statistics per row, kept for the backward.
#
# The tiled loop, in plain Python, for one row x[0:D]:
#
#     x0 = x[0]
#     if D <= BLOCK:                                  # the row fits: one load into registers
#         s = 2^floor(log2 max|x|)
#         c = x/s - x0/s;  mean_c = sum(c)/D;  m2 = sum((c - mean_c)^2)
#     else:                                           # chunks: merge (n, mean, M2) chunk by chunk
#         for start in range(0, D, BLOCK): ... Chan's update (see _row_stats_chunked)
#     mean = x0 + s mean_c;   std = s sqrt(m2 / D);   theta = mean + q std
#     y[j] = x[j] - theta if x[j] > theta else fill   # from registers, or a second pass over chunks
#     save mean, std
#
# A long row's second pass reads it again, but from the 60 MB L2, where the first pass has just
# left it (a program holds 16 KB of a bf16 row at a time). Holding a whole 16384-entry row in
# registers instead was slower: 235 us against 153 us at [8192, 16384] bf16. Our reading: such
# a program takes most of an SM's registers, so few programs share an SM and little else runs
# while one of them waits for its row or reduces it (notes/kernels_gpu.md).
# ------------------------------------------------------------------------------------------


@jit
def _stat_topk_fwd_kernel(
    X,  # pointer to x [R, D], float32/bf16/fp16; row r starts at X + r * stride_xr, entries contiguous
    Y,  # pointer to the output y [R, D], x's dtype; row r starts at Y + r * stride_yr
    Mean,  # pointer to mean [R] float32: each row's mean, for the backward
    Std,  # pointer to std [R] float32: each row's population std, for the backward
    stride_xr,  # elements from one row of x to the next
    stride_yr,  # elements from one row of y to the next
    R,  # number of rows
    D: tl.constexpr,  # row length, compiled in: masks `col < D` then allow vector accesses (see _row_starts)
    q,  # Q(1 - k/D), the normal quantile (float32)
    fill,  # value of the entries that do not survive (0.0, or -inf before a softmax)
    SOFT: tl.constexpr,  # True: survivors become x - theta; False: they keep x
    BLOCK: tl.constexpr,  # entries of a row held at once (a power of two)
    ROWS: tl.constexpr,  # rows per program
    ALIGN: tl.constexpr,  # a power of two dividing every row stride (a hint for vector accesses)
    ONE_BLOCK: tl.constexpr,  # BLOCK >= D: whole rows in registers, read once
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] this program's rows
    rmask = rows < R
    rows = rows.to(tl.int64)  # so that row * stride cannot overflow
    X_rows = _row_starts(X, rows, stride_xr, ALIGN)  # [ROWS, 1] start of each row
    Y_rows = _row_starts(Y, rows, stride_yr, ALIGN)
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    x0 = tl.load(X + rows * stride_xr, mask=rmask, other=0.0).to(tl.float32)  # [ROWS] first entries: the centres
    if ONE_BLOCK:
        mask = rmask[:, None] & (cols < D)  # [ROWS, BLOCK]
        x = tl.load(X_rows + cols, mask=mask, other=0.0).to(tl.float32)
        mean, std = _row_stats_in_registers(x, mask, x0, D)  # [ROWS] each
        theta = (mean + q * std)[:, None]  # [ROWS, 1]
        tl.store(Y_rows + cols, _threshold(x, theta, fill, SOFT).to(Y.dtype.element_ty), mask=mask)
    else:
        mean, std = _row_stats_chunked(X_rows, rmask, x0, D, BLOCK)
        theta = (mean + q * std)[:, None]
        for start in range(0, D, BLOCK):  # second pass: the output, chunk by chunk
            mask = rmask[:, None] & (start + cols < D)
            x = tl.load(X_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y_rows + start + cols, _threshold(x, theta, fill, SOFT).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Std + rows, std, mask=rmask)


def _stat_topk_fwd(x, q, fill, soft):
    """Launch kernel 1 on rows x [R, D] (unit stride along D). -> y [R, D] (x's dtype), mean [R], std [R] float32"""
    R, D = x.shape
    y = torch.empty((R, D), dtype=x.dtype, device=x.device)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    std = torch.empty(R, dtype=torch.float32, device=x.device)
    grid, tile = _launch(R, D, x.stride(0), D)
    _stat_topk_fwd_kernel[grid](x, y, mean, std, x.stride(0), y.stride(0), R, D, q, fill, SOFT=soft, **tile)
    return y, mean, std


# ------------------------------------------------------------------------------------------
# 3. Kernel 2: statistical top-k, backward
#
# Motivation. The gradient (derived in topk.statistical_topk_grad's docstring) is, per row,
#     m_j = [z_j > theta],   S = sum_j g_j m_j
#     dz_j = g_j m_j - S (1/D + q (z_j - mean) / (D std))
# It needs g and z (read) and writes dz: 3 x 268 MB at [8192, 16384] bf16. Eager torch makes
# ~5 passes with the written-out formula and ~20 with autograd through the plain ops. One
# program per row: load g and z, reduce S, write dz (the row in registers; two passes over the
# chunks for long rows, as S must be known before the first dz is written).
#
#     theta = mean + q std                            # from the forward's saved statistics
#     S = sum(g[j] for j if z[j] > theta)             # pass 1 (the same registers when D <= BLOCK)
#     a = S q / (D std)      (a = 0 when std = 0: a constant row has no survivor, S = 0)
#     dz[j] = g[j] [z[j] > theta] - S/D - a (z[j] - mean)          # pass 2
#     (hard threshold, soft=False: dz[j] = g[j] [z[j] > theta], no pass 1)
# ------------------------------------------------------------------------------------------


@jit
def _stat_topk_bwd_kernel(
    G,  # pointer to the upstream gradient g [R, D]; row r at G + r * stride_gr, entries contiguous
    Z,  # pointer to the forward's input z [R, D]; row r at Z + r * stride_zr
    DZ,  # pointer to the output dz [R, D], z's dtype; row r at DZ + r * stride_dzr
    Mean,  # pointer to mean [R] float32 (saved by the forward)
    Std,  # pointer to std [R] float32 (saved by the forward)
    stride_gr,  # elements from one row of g to the next
    stride_zr,  # elements from one row of z to the next
    stride_dzr,  # elements from one row of dz to the next
    R,  # number of rows
    D: tl.constexpr,  # row length, compiled in: masks `col < D` then allow vector accesses (see _row_starts)
    q,  # Q(1 - k/D) (float32)
    SOFT: tl.constexpr,  # soft threshold (gradient through theta) or hard (g on survivors only)
    BLOCK: tl.constexpr,  # entries of a row held at once (a power of two)
    ROWS: tl.constexpr,  # rows per program
    ALIGN: tl.constexpr,  # a power of two dividing every row stride (a hint for vector accesses)
    ONE_BLOCK: tl.constexpr,  # BLOCK >= D: one load of g and z, kept in registers
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] this program's rows
    rmask = rows < R
    rows = rows.to(tl.int64)
    G_rows = _row_starts(G, rows, stride_gr, ALIGN)  # [ROWS, 1] start of each row
    Z_rows = _row_starts(Z, rows, stride_zr, ALIGN)
    DZ_rows = _row_starts(DZ, rows, stride_dzr, ALIGN)
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    mean = tl.load(Mean + rows, mask=rmask, other=0.0)  # [ROWS]
    std = tl.load(Std + rows, mask=rmask, other=0.0)
    theta = (mean + q * std)[:, None]  # [ROWS, 1]
    # 1/D + q (z - mean)/(D std) = 1/D + b (z - mean), b = q / (D std); std = 0 (a constant row,
    # S = 0) would give 0/0, so we divide by 1 there instead (as topk.statistical_topk_grad)
    b = q / (D * tl.where(std > 0, std, 1.0))  # [ROWS]
    if ONE_BLOCK:
        mask = rmask[:, None] & (cols < D)  # [ROWS, BLOCK]
        g = tl.load(G_rows + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z_rows + cols, mask=mask, other=0.0).to(tl.float32)
        gm = tl.where(z > theta, g, 0.0)  # g_j m_j (padding: z = 0 may exceed theta, but g = 0 there)
        if SOFT:
            S = tl.sum(gm, axis=1)  # [ROWS]
            gm = gm - (S / D)[:, None] - (S * b)[:, None] * (z - mean[:, None])
        tl.store(DZ_rows + cols, gm.to(DZ.dtype.element_ty), mask=mask)
    else:
        S = mean * 0.0  # [ROWS] float32 zeros (loop-carried)
        if SOFT:
            for start in range(0, D, BLOCK):  # pass 1: S
                mask = rmask[:, None] & (start + cols < D)
                g = tl.load(G_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                z = tl.load(Z_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                S += tl.sum(tl.where(z > theta, g, 0.0), axis=1)
        for start in range(0, D, BLOCK):  # pass 2: dz
            mask = rmask[:, None] & (start + cols < D)
            g = tl.load(G_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(Z_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            gm = tl.where(z > theta, g, 0.0)
            if SOFT:
                gm = gm - (S / D)[:, None] - (S * b)[:, None] * (z - mean[:, None])
            tl.store(DZ_rows + start + cols, gm.to(DZ.dtype.element_ty), mask=mask)


def statistical_topk_grad_gpu(g, z, mean, std, q, soft=True):
    """topk.statistical_topk_grad(g, z, mean, std, q, soft) in one Triton kernel.   -> dz [..., D], z's dtype

    g, z [..., D] (float32/bf16/fp16); mean, std [..., 1] (float32: the row statistics of z, as
    the forward saves them); q = Q(1 - k/D). A row with NaN statistics gets a NaN gradient, as
    in the reference.
    """
    _check_x("z", z)
    _check_x("g", g)
    if (g.shape != z.shape or g.device != z.device or not all(isinstance(t, torch.Tensor) and t.device == z.device
                                                              and t.shape == z.shape[:-1] + (1,) for t in (mean, std))):
        raise ValueError(f"g must have z's shape {tuple(z.shape)} and mean, std that shape with the last axis 1, "
                         f"all on z's device {z.device}; got g {tuple(g.shape)}, mean {getattr(mean, 'shape', mean)}, "
                         f"std {getattr(std, 'shape', std)}")
    R, D = z.numel() // z.shape[-1], z.shape[-1]
    dz = torch.empty((R, D), dtype=z.dtype, device=z.device)
    if R == 0:
        return dz.view(z.shape)
    g2, z2 = _rows(g), _rows(z)  # [R, D]
    mean = mean.reshape(-1).to(torch.float32).contiguous()  # [R]
    std = std.reshape(-1).to(torch.float32).contiguous()  # [R]
    grid, tile = _launch(R, D, g2.stride(0), z2.stride(0), D, backward=True)
    _stat_topk_bwd_kernel[grid](g2, z2, dz, mean, std, g2.stride(0), z2.stride(0), dz.stride(0), R, D, q,
                                SOFT=bool(soft), **tile)
    return dz.view(z.shape)


class _StatisticalTopkGPU(torch.autograd.Function):
    """Kernel 1 forward, kernel 2 backward; saves x and the row statistics (8 bytes per row)."""

    @staticmethod
    def forward(ctx, x, q, fill, soft):  # x [R, D], unit stride along D
        y, mean, std = _stat_topk_fwd(x, q, fill, soft)
        ctx.save_for_backward(x, mean, std)
        ctx.q, ctx.soft = q, soft
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, std = ctx.saved_tensors
        return statistical_topk_grad_gpu(g, x, mean[:, None], std[:, None], ctx.q, ctx.soft), None, None, None


def statistical_topk_gpu(x, k, fill=0.0, soft=True):
    """topk.statistical_topk(x, k, fill, soft) in Triton.   [..., D] -> [..., D], x's dtype

    Any leading shape; float32, bfloat16 or float16 (statistics in float32); differentiable
    (kernel 2). k == D returns x itself; leading dimensions of size 0 give an empty result.
    """
    _check_x("x", x)
    D = x.shape[-1]
    check_k(k, D)
    _check_fill_soft(fill, soft)
    if k == D:
        return x  # nothing is thresholded (topk.py's rule)
    if x.numel() == 0:
        return x.clone()  # no row: no kernel (a launch over 0 programs is not allowed)
    q = normal_icdf(1.0 - k / D)  # float64 on the host, once; no value of x is read
    return _StatisticalTopkGPU.apply(_rows(x), q, float(fill), bool(soft)).view(x.shape)


# ------------------------------------------------------------------------------------------
# 4. Kernels 3 and 4: the fused activation h = gelu(statistical_topk(p)) * u
#
# The Spark FFN (arXiv 2506.06644; notes/papers.md, "Spark FFN") and Gemma 3n's MLP gate the up
# projection u with gelu of a statistical top-k of p. Written plainly (the reference below),
# the sparse pre-activation t = max(p - theta, 0), gelu(t) and the product are each a full
# [R, f] tensor written to memory and read back, on top of statistical top-k's own passes, and
# autograd keeps t and gelu(t) for the backward. Fused, the forward reads p and u and writes h
# (3 tensors); the backward reads g, p, u and writes dp, du (5 tensors), recomputing t from p
# and the saved mean and std instead of storing it.
#
#     forward:   theta = mean(p) + q std(p);  t = max(p - theta, 0);  h = gelu(t) u
#     backward:  du = g gelu(t)
#                gt = g u gelu'(t) [p > theta]                 (the gradient reaching t)
#                dp = gt - S/D - S q (p - mean) / (D std),    S = sum(gt)   (kernel 2's formula)
# Tiled as kernels 1 and 2: whole rows in registers, or chunks (a statistics pass, then the
# output; in the backward a pass for S, then one for dp and du).
# GELU is the tanh approximation (Gemma's), gelu(t) = t/2 (1 + tanh(c (t + 0.044715 t^3))),
# c = sqrt(2/pi); we write tanh with exp, which every Triton version has.
# ------------------------------------------------------------------------------------------


def gelu_topk_mul(p, u, k):
    """The torch reference: gelu(statistical_topk(p, k)) * u (tanh GELU, soft threshold, fill 0).   [..., f]"""
    return F.gelu(statistical_topk(p, k), approximate="tanh") * u


@jit
def _add2(a1, a2, b1, b2):
    return a1 + b1, a2 + b2


@jit
def _gelu_tanh(t):
    """gelu(t) and gelu'(t), tanh approximation, float32."""
    c = 0.7978845608028654  # sqrt(2 / pi)
    inner = c * (t + 0.044715 * t * t * t)
    th = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh(inner); exp overflowing to inf gives 1
    gelu = 0.5 * t * (1.0 + th)
    # d/dt: 0.5 (1 + tanh) + 0.5 t (1 - tanh^2) c (1 + 3 * 0.044715 t^2)
    slope = 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * c * (1.0 + 0.134145 * t * t)
    return gelu, slope


@jit
def _gelu_topk_mul_fwd_kernel(
    P,  # pointer to p [R, D] (the gate pre-activation); row r at P + r * stride_pr, entries contiguous
    U,  # pointer to u [R, D] (the up projection), p's dtype; row r at U + r * stride_ur
    H,  # pointer to the output h [R, D], p's dtype, contiguous rows of D
    Mean,  # pointer to mean [R] float32: p's row means, for the backward
    Std,  # pointer to std [R] float32: p's row stds, for the backward
    stride_pr,  # elements from one row of p to the next
    stride_ur,  # elements from one row of u to the next
    R,  # number of rows
    D: tl.constexpr,  # row length, compiled in: masks `col < D` then allow vector accesses (see _row_starts)
    q,  # Q(1 - k/D) (float32)
    BLOCK: tl.constexpr,  # entries of a row held at once (a power of two)
    ROWS: tl.constexpr,  # rows per program
    ALIGN: tl.constexpr,  # a power of two dividing every row stride (a hint for vector accesses)
    ONE_BLOCK: tl.constexpr,  # BLOCK >= D: whole rows of p and u in registers, read once
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] this program's rows
    rmask = rows < R
    rows = rows.to(tl.int64)
    P_rows = _row_starts(P, rows, stride_pr, ALIGN)  # [ROWS, 1] start of each row
    U_rows = _row_starts(U, rows, stride_ur, ALIGN)
    H_rows = _row_starts(H, rows, D, ALIGN)
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    p0 = tl.load(P + rows * stride_pr, mask=rmask, other=0.0).to(tl.float32)  # [ROWS]
    if ONE_BLOCK:
        mask = rmask[:, None] & (cols < D)  # [ROWS, BLOCK]
        p = tl.load(P_rows + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_rows + cols, mask=mask, other=0.0).to(tl.float32)  # issued now: it arrives while we reduce
        mean, std = _row_stats_in_registers(p, mask, p0, D)
        theta = (mean + q * std)[:, None]  # [ROWS, 1]
        gelu, _ = _gelu_tanh(_threshold(p, theta, 0.0, True))  # t = max(p - theta, 0); NaN rows stay NaN
        tl.store(H_rows + cols, (gelu * u).to(H.dtype.element_ty), mask=mask)
    else:
        mean, std = _row_stats_chunked(P_rows, rmask, p0, D, BLOCK)
        theta = (mean + q * std)[:, None]
        for start in range(0, D, BLOCK):
            mask = rmask[:, None] & (start + cols < D)
            p = tl.load(P_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            gelu, _ = _gelu_tanh(_threshold(p, theta, 0.0, True))
            tl.store(H_rows + start + cols, (gelu * u).to(H.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Std + rows, std, mask=rmask)


@jit
def _gelu_topk_mul_bwd_kernel(
    G,  # pointer to the upstream gradient g [R, D] (of h); row r at G + r * stride_gr, entries contiguous
    P,  # pointer to p [R, D]; row r at P + r * stride_pr
    U,  # pointer to u [R, D]; row r at U + r * stride_ur
    DP,  # pointer to the output dp [R, D], p's dtype, contiguous rows of D
    DU,  # pointer to the output du [R, D], u's dtype, contiguous rows of D
    Mean,  # pointer to mean [R] float32 (saved by the forward)
    Std,  # pointer to std [R] float32 (saved by the forward)
    stride_gr,  # elements from one row of g to the next
    stride_pr,  # elements from one row of p to the next
    stride_ur,  # elements from one row of u to the next
    R,  # number of rows
    D: tl.constexpr,  # row length, compiled in: masks `col < D` then allow vector accesses (see _row_starts)
    q,  # Q(1 - k/D) (float32)
    BLOCK: tl.constexpr,  # entries of a row held at once (a power of two)
    ROWS: tl.constexpr,  # rows per program
    ALIGN: tl.constexpr,  # a power of two dividing every row stride (a hint for vector accesses)
    ONE_BLOCK: tl.constexpr,  # BLOCK >= D: g, p, u in registers, read once
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] this program's rows
    rmask = rows < R
    rows = rows.to(tl.int64)
    G_rows = _row_starts(G, rows, stride_gr, ALIGN)  # [ROWS, 1] start of each row
    P_rows = _row_starts(P, rows, stride_pr, ALIGN)
    U_rows = _row_starts(U, rows, stride_ur, ALIGN)
    DP_rows = _row_starts(DP, rows, D, ALIGN)
    DU_rows = _row_starts(DU, rows, D, ALIGN)
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    mean = tl.load(Mean + rows, mask=rmask, other=0.0)  # [ROWS]
    std = tl.load(Std + rows, mask=rmask, other=0.0)
    theta = (mean + q * std)[:, None]  # [ROWS, 1]
    b = q / (D * tl.where(std > 0, std, 1.0))  # [ROWS], as kernel 2
    if ONE_BLOCK:
        mask = rmask[:, None] & (cols < D)  # [ROWS, BLOCK]
        g = tl.load(G_rows + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(P_rows + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U_rows + cols, mask=mask, other=0.0).to(tl.float32)
        gelu, slope = _gelu_tanh(_threshold(p, theta, 0.0, True))  # t recomputed, never stored
        gt = tl.where(p > theta, g * u * slope, 0.0)  # gradient reaching t, on survivors
        S = tl.sum(gt, axis=1)  # [ROWS]
        tl.store(DU_rows + cols, (g * gelu).to(DU.dtype.element_ty), mask=mask)
        dp = gt - (S / D)[:, None] - (S * b)[:, None] * (p - mean[:, None])
        tl.store(DP_rows + cols, dp.to(DP.dtype.element_ty), mask=mask)
    else:
        S = mean * 0.0  # [ROWS] float32 zeros (loop-carried)
        for start in range(0, D, BLOCK):  # pass 1: S
            mask = rmask[:, None] & (start + cols < D)
            g = tl.load(G_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(P_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            _, slope = _gelu_tanh(_threshold(p, theta, 0.0, True))
            S += tl.sum(tl.where(p > theta, g * u * slope, 0.0), axis=1)
        for start in range(0, D, BLOCK):  # pass 2: du and dp
            mask = rmask[:, None] & (start + cols < D)
            g = tl.load(G_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(P_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            gelu, slope = _gelu_tanh(_threshold(p, theta, 0.0, True))
            gt = tl.where(p > theta, g * u * slope, 0.0)
            tl.store(DU_rows + start + cols, (g * gelu).to(DU.dtype.element_ty), mask=mask)
            dp = gt - (S / D)[:, None] - (S * b)[:, None] * (p - mean[:, None])
            tl.store(DP_rows + start + cols, dp.to(DP.dtype.element_ty), mask=mask)


class _GeluTopkMulGPU(torch.autograd.Function):
    """Kernel 3 forward, kernel 4 backward; saves p, u and p's row statistics."""

    @staticmethod
    def forward(ctx, p, u, q):  # p, u [R, D], unit stride along D
        R, D = p.shape
        h = torch.empty((R, D), dtype=p.dtype, device=p.device)  # contiguous: the kernel writes row r at r * D
        mean = torch.empty(R, dtype=torch.float32, device=p.device)
        std = torch.empty(R, dtype=torch.float32, device=p.device)
        grid, tile = _launch(R, D, p.stride(0), u.stride(0), D)
        _gelu_topk_mul_fwd_kernel[grid](p, u, h, mean, std, p.stride(0), u.stride(0), R, D, q, **tile)
        ctx.save_for_backward(p, u, mean, std)
        ctx.q = q
        return h

    @staticmethod
    def backward(ctx, g):
        p, u, mean, std = ctx.saved_tensors
        g = _rows(g)  # [R, D], unit stride along D (autograd may hand us an expanded view)
        R, D = p.shape
        dp = torch.empty((R, D), dtype=p.dtype, device=p.device)  # contiguous, as the kernel writes them
        du = torch.empty((R, D), dtype=u.dtype, device=u.device)
        grid, tile = _launch(R, D, g.stride(0), p.stride(0), u.stride(0), D, backward=True)
        _gelu_topk_mul_bwd_kernel[grid](g, p, u, dp, du, mean, std, g.stride(0), p.stride(0), u.stride(0), R, D, ctx.q, **tile)
        return dp, du, None


def gelu_topk_mul_gpu(p, u, k):
    """gelu_topk_mul(p, u, k) in Triton: gelu(statistical_topk(p, k)) * u.   p, u [..., D] -> h [..., D]

    p and u share shape and dtype (float32, bfloat16 or float16; statistics in float32);
    differentiable in both. k == D (nothing thresholded) is plain torch: gelu(p) * u.
    """
    _check_x("p", p)
    _check_x("u", u)
    if u.shape != p.shape or u.dtype != p.dtype or u.device != p.device:
        raise ValueError(f"u must have p's shape, dtype and device ({tuple(p.shape)}, {p.dtype}, {p.device}); "
                         f"got {tuple(u.shape)}, {u.dtype}, {u.device}")
    D = p.shape[-1]
    check_k(k, D)
    if k == D or p.numel() == 0:
        return gelu_topk_mul(p, u, k)  # nothing to threshold (gelu(p) * u), or no row: plain torch
    return _GeluTopkMulGPU.apply(_rows(p), _rows(u), normal_icdf(1.0 - k / D)).view(p.shape)


# ------------------------------------------------------------------------------------------
# 5. Spark attention for training, forward and backward, without storing the [T, S] scores
# ------------------------------------------------------------------------------------------
# Spark attention (Spark Transformer, arXiv 2506.06644, Spark attention; notes/papers.md, "Spark
# attention") splits every head's dimensions in two: the first r predict WHICH keys a query
# attends to, the other hd - r give HOW MUCH, through a softplus gate. For query i of a head and
# its visible keys j <= i (causal, S == T, grouped-query: head h reads KV head h // G):
#
#     s_ij = q_i[:r] . k_j[:r] / sqrt(r)                 predictor score
#     thr_i = kt-th largest of {s_ij : j <= i},  kt = min(k_top, i + 1)
#     keep_ij = s_ij >= thr_i                            (ties at thr all kept; i + 1 <= k_top: all kept)
#     e_ij = exp(s_ij - m_i) keep_ij,  m_i = max_j s_ij,  L_i = sum_j e_ij,  p_ij = e_ij / L_i
#     z_ij = q_i[r:] . k_j[r:] / sqrt(hd - r),   g_ij = softplus(z_ij)
#     out_i = sum_j p_ij g_ij v_j
#
# spark.spark_attention (torch) computes exactly this by materialising every [T, S] tensor (s,
# the mask, keep, e, the gate, w) and calling torch.topk. At the training preset of a GPT-2-small
# Spark model (B 8, H 12, T 1024, hd 64, r 32, k_top 256, bf16) one such tensor is 96 M entries,
# 201 MB in bf16 and 403 MB in float32: a layer's forward writes and reads ~8 of them and autograd
# keeps several for the backward. The fused kernels below read q, k, v (3 x 12.6 MB), write out
# (12.6 MB) and 16 bytes per query row (98 K rows: 1.6 MB), and keep nothing else for the backward.
#
# Two passes, as the top-k needs the whole row before the softmax may start:
# - pass 1 (_spark_attn_thr_kernel): each query row's threshold thr_i, by an exact radix select
#   on the bits of its scores (below), its max m_i and its number of kept keys.
#   With m_i known, pass 2 needs no running max or rescaling.
# - pass 2 (_spark_attn_fwd_kernel): flash-attention-style tiles, s and z recomputed,
#   out_i = sum_j exp(s_ij - m_i) [s_ij >= thr_i] g_ij v_j / L_i, with L_i summed on the way.
# - backward (_spark_attn_bwd_dq_kernel, _spark_attn_bwd_dkdv_kernel): the recomputation of
#   FlashAttention-2 (Dao 2023, arXiv 2307.08691), with the threshold a constant, as the torch path
#   computes keep from s.detach():
#       w = p g,  dw_ij = dO_i . v_j,  D_i = dO_i . out_i
#       dv_j = sum_i w_ij dO_i
#       ds_ij = p_ij (g_ij dw_ij - D_i)        (softmax backward; sum_j p_ij g_ij dw_ij = dO_i . out_i)
#       dz_ij = p_ij dw_ij sigmoid(z_ij)       (softplus' = sigmoid)
#       dq_i[:r] = sum_j ds_ij k_j[:r] / sqrt(r),   dq_i[r:] = sum_j dz_ij k_j[r:] / sqrt(hd - r)
#       dk_j[:r] = sum_i ds_ij q_i[:r] / sqrt(r),   dk_j[r:] = sum_i dz_ij q_i[r:] / sqrt(hd - r)
#   dk and dv also sum over the G query heads that share KV head j's.
#
# FLOPs per visible (query, key) pair (T^2 / 2 pairs per head): pass 1 2 r for s plus the
# selection (one compare and one add per bit tried, up to 32 bits, on the CUDA cores); pass 2
# 2 r + 2 (hd - r) + 2 hd = 4 hd, as flash attention; backward 14 hd (the dq kernel recomputes
# s, z and dw; the dk dv kernel recomputes them once more), as FlashAttention-2's two-kernel form.
#
# Speed, measured on an NVIDIA H200 (torch 2.11, triton 3.6; standalone do_bench timings, not part
# of `python kernels_gpu.py`, whose train_step rows time whole steps instead) at B 32, H = Hkv
# 12, T 1024, hd 64, r 32, k_top 256, bf16, median ms: forward 1.28 (pass 1 0.90, of which the
# search ~0.7 at ~19 sweeps a block; pass 2 ~0.38), backward 1.23; flash attention (SDPA, dense)
# 0.16 and 0.79. With tl.log for the gate instead of the hardware log2 (see _softplus): forward
# 1.38, backward 1.51. At B 8 the torch path took 3.66 ms forward and 5.63 forward + backward,
# with 1.75 GB of temporaries against our 50 MB. Pass 1 is the largest part: its search runs on
# the CUDA cores, while every other step is tensor-core work that flash attention also does (plus
# one exp and one log per pair for the gate, and the sigmoid in the backward).
#
# Dimension letters (spark.py's): B batch, H query heads, Hkv key/value heads, G = H // Hkv,
# T queries = S keys, hd head size, r predictor dims, kt tokens kept per query (k_top).
# Tile letters: BLOCK_M query rows and BLOCK_N keys a program holds at once; R1, R2, HDP the
# powers of two >= 16 that r, hd - r and hd are padded to (tl.dot needs dims >= 16; the padding
# is masked to zero on load, so it adds nothing to any dot product).
#
# Choices
# - Input float32, bfloat16 or float16 (q, k, v alike); scores, softmax and gate in float32;
#   tl.dot of half-precision tiles accumulates in float32, float32 tiles use input_precision
#   "ieee" (no TF32: the keep decisions compare scores, so they must be float32-exact). float64 is
#   refused (no float64 path; tests compare against float64 references instead).
# - No dropout on the attention weights (spark.spark_attention's dropout_p): the training preset
#   uses none.
# - Scores must be finite (finite q and k of sane size): the selection orders floats by their bits.
# - The stored threshold is not the kt-th score itself but a value between it and the next lower
#   score (the midpoint, when one exists in float32): the same keys pass s >= thr, but pass 2 and
#   the backward, which recompute s with tiles of other shapes, cannot lose the kt-th key to a
#   last-bit difference in the tensor-core sum. Ties at the kt-th score are all kept, as the torch
#   path keeps them (the NumPy reference keeps exactly kt; which of a tie it keeps is arbitrary).
# - No host synchronisation: the number of kept pairs comes back as a 0-d tensor on the device.



# Pass 1 holds BLOCK_M1 query rows x all keys (a power of two >= T) in registers when the keys
# number at most MAX_KEYS_IN_REGISTERS: 16 x 2048 float32 scores are 128 per thread of 8 warps.
# Longer rows recompute their score tiles for every bit (correct, ~32x the score FLOPs of pass 1).
# Tests lower MAX_KEYS_IN_REGISTERS to exercise that path at small T.
MAX_KEYS_IN_REGISTERS = 2048
BLOCK_M1 = 16  # pass 1 query rows per program (tl.dot's smallest M)
MAX_HEAD_BYTES = 512  # the longest head taken, hd times the dtype's bytes (shared memory: _spark_attn_bwd)

# ------------------------------------------------------------------------------------------
# 5a. Argument checks
# ------------------------------------------------------------------------------------------


def _check_attn_args(q, k, v, k_top, r):
    """q [B, H, T, hd], k and v [B, Hkv, T, hd]: one dtype (float32/bf16/fp16), one device,
    H % Hkv == 0, S == T (training / prefill), k_top >= 1, 1 <= r <= hd - 1."""
    _check_inputs("spark_attention_gpu", rows=False, q=q, k=k, v=v)  # (views are made contiguous by the caller)
    _check_attn_shapes(q, k, v)  # spark.py's: q [B, H, T, hd], k v [B, Hkv, S, hd], H % Hkv == 0
    T, hd = q.shape[2], q.shape[3]
    if k.shape[2] != T:
        raise ValueError(f"spark_attention_gpu is the training / prefill path: k and v need S = T = {T} keys, "
                         f"got S = {k.shape[2]} (with a KV cache use spark.spark_attention)")
    if hd < 2:
        raise ValueError(f"q's head size hd = {hd} leaves no room for the split: Spark attention needs hd >= 2")
    if hd * q.element_size() > MAX_HEAD_BYTES:
        raise ValueError(f"q's head size hd = {hd} in {q.dtype}: spark_attention_gpu takes rows of at most "
                         f"{MAX_HEAD_BYTES} bytes (hd <= {MAX_HEAD_BYTES // 4} in float32, {MAX_HEAD_BYTES // 2} in "
                         f"bfloat16 or float16)")
    _check_int("k_top", k_top, 1)
    _check_int("r", r, 1, hd - 1)


# ------------------------------------------------------------------------------------------
# 5b. Building blocks (Triton functions, inlined where they are called)
# ------------------------------------------------------------------------------------------


@jit
def _load_tile(Base, rows, n_rows, stride_t, c0, N_COLS: tl.constexpr, WIDTH: tl.constexpr):
    """Rows `rows` [BLOCK] (positions t < n_rows) and columns c0 .. c0 + N_COLS - 1 of one head,
    zero-padded to WIDTH columns.   -> [BLOCK, WIDTH], the tensor's dtype

    Base points to element [t = 0, col 0] of the head; row t starts stride_t elements further,
    columns are contiguous. The zero padding (rows past n_rows, columns past N_COLS) adds
    nothing to the dot products the tile enters.
    """
    cols = tl.arange(0, WIDTH)
    mask = (rows < n_rows)[:, None] & (cols < N_COLS)[None, :]
    return tl.load(Base + rows.to(tl.int64)[:, None] * stride_t + (c0 + cols)[None, :], mask=mask, other=0.0)


@jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) in float32: a [M, K], b [K, N] -> [M, N].

    PREC "ieee": exact float32 products and sums, no TF32 (float32 inputs). "tf32" is what the
    launchers pass for bf16 / fp16 inputs, where it means nothing: their products are exact in
    float32 and the tensor cores accumulate in float32. Under Triton's interpreter the launchers
    pass "ieee" for every dtype, and half-precision tiles are widened to float32 first (the same
    values, hence the same products): the interpreter's bfloat16 tl.dot (triton 3.9) returns garbage.
    """
    if PREC == "ieee":
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@jit
def _scores(a, b, scale, PREC: tl.constexpr):
    """a [BLOCK_M, W] . b [BLOCK_N, W]^T * scale -> [BLOCK_M, BLOCK_N] float32.

    Every kernel computes s (and z) through this one function, queries on the left, so that the
    same inputs give the same bits in the forward and the backward wherever the tiles agree.
    """
    return _dot(a, tl.trans(b), None, PREC) * scale


@jit
def _softplus(z, PREC: tl.constexpr):
    """softplus(z) = log(1 + e^z) = max(z, 0) + log(1 + e^-|z|): no overflow for large z.

    PREC "tf32" (bf16 / fp16 inputs on a GPU, see _dot) takes the log from the hardware's
    log2 (libdevice.fast_logf: relative error ~2^-22, far below the inputs' 2^-8 or 2^-11);
    otherwise tl.log, an accurate polynomial of ~20 instructions that, in a kernel doing a few
    dozen per (query, key) pair, cost more than the matmuls (float32 inputs; the interpreter,
    which has no libdevice)."""
    t = 1.0 + tl.exp(-tl.abs(z))
    if PREC == "tf32":
        lg = libdevice.fast_logf(t)
    else:
        lg = tl.log(t)
    return tl.maximum(z, 0.0) + lg


@jit
def _sigmoid(z):
    """sigmoid(z) = 1 / (1 + e^-z), from e^-|z| <= 1 so that nothing overflows."""
    t = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + t), t / (1.0 + t))


@jit
def _float_of_key(u):
    """The float32 whose order key is u (int32 holding 32 bits, any shape).

    Order keys: read a float's bits as unsigned; for a non-negative float set the sign bit, for
    a negative one flip every bit. Then key order is float order (-inf < ... < -0 < +0 < ... < +inf),
    and the bits of the kt-th largest score can be found one at a time, from the top. Decoding:
    top bit set (u < 0 as int32) -> the float's bits are u without it; else they are ~u.
    """
    bits = tl.where(u < 0, u & 0x7FFFFFFF, u ^ -1)
    return bits.to(tl.float32, bitcast=True)


@jit
def _thr_scores(q1, K1h, start_n, rows, T, stride_kt, scale1,
                R: tl.constexpr, R1: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Pass 1's scores of its query rows against keys start_n .. start_n + BLOCK_N - 1,
    -inf where a key is in a query's future (or past T).   -> [BLOCK_M, BLOCK_N] float32"""
    keys = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    s = _scores(q1, _load_tile(K1h, keys, T, stride_kt, 0, R, R1), scale1, PREC)
    return tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))  # j <= i (and so j < T)


# ------------------------------------------------------------------------------------------
# 5c. Pass 1: the threshold of every query row (exact top-k by radix select)
#
# Motivation. torch.topk on [T, S] rows sorts (or partially sorts) each row after writing it to
# memory. We need only one number per row, the kt-th largest score, so we search its 32 bits:
# with order keys (see _float_of_key) the greatest key P such that at least kt scores are
# >= float(P) is the kt-th largest, and it is found greedily bit by bit, each step one
# comparison of the row with one candidate. The scores stay in registers; nothing is sorted,
# nothing is written but four numbers per row.
#
#     s[j] = q1 . k1[j] / sqrt(r) for j <= i, -inf after         # registers: [BLOCK_M, keys]
#     m = max(s)
#     if i + 1 <= k_top: thr = -inf                             # every visible key is kept
#     else:
#         P = 0                                                 # order key being built
#         for bit in 31 .. 0:
#             C = P | (1 << bit)
#             if count(s >= float(C)) >= kt: P = C              # still >= kt scores above
#             stop early once count(s >= float(P)) == kt for all rows of the program
#         t0 = float(P)       # kt-th largest, or (early stop) a value that selects the same kt
#         v = min(s[s >= t0]);  below = max(s[s < t0])          # the kept minimum, the next lower
#         thr = (v + below) / 2 if strictly between them else v
#     kept = count(s >= float(P)), known from the last bit taken (kt or, with ties, more)
#
# Cost. Per row, up to 32 steps of (compare, add) over its keys: at the preset ~50 M visible
# pairs per layer, so at most 3.2 G compares, all on registers. A program of 16 rows stops as
# soon as all 16 selections are decided (for random scores we expect ~20 bits: sign, exponent,
# and the mantissa bits that separate the kt-th score from the next; ties take all 32). Compares are
# done on floats, not on integer keys: float32 compares run on twice as many lanes as int32
# ones on Hopper, and a float compare makes -0 == +0, as a float threshold will.
# Programs whose rows all see at most k_top keys (the first k_top rows) skip the search.
# The softmax sum L is left to pass 2, which computes every exp(s - m) anyway: a last pass over
# the scores here, for L and the kept count, took 0.4 of 1.4 ms (H200, B 32), more than ten sweeps.
# ------------------------------------------------------------------------------------------


@jit
def _spark_attn_thr_kernel(
    Q,  # pointer to q [B, H, T, hd] (only columns 0 .. r-1 are read); element [b, h, t, c] at
        # Q + b * stride_qb + h * stride_qh + t * stride_qt + c
    K,  # pointer to k [B, Hkv, T, hd] (columns 0 .. r-1 are read); element [b, g, t, c] at
        # K + b * stride_kb + g * stride_kh + t * stride_kt + c
    M,  # pointer to m [B, H, T] float32, contiguous: output, each row's max visible score
    Thr,  # pointer to thr [B, H, T] float32, contiguous: output, each row's threshold (-inf: all visible kept)
    Kept,  # pointer to kept [B, H, T] int32, contiguous: output, each row's number of kept keys
    stride_qb, stride_qh, stride_qt,  # elements between consecutive batches, heads, positions of q
    stride_kb, stride_kh, stride_kt,  # the same for k
    H,  # query heads
    G,  # query heads per KV head, H // Hkv
    T,  # tokens (queries = keys)
    k_top,  # kt: keys kept per query at most
    scale1,  # 1 / sqrt(r) (float32)
    first_block,  # this launch's first query block (launches are grouped by how many keys their rows see)
    R: tl.constexpr,  # r: predictor dims (compiled in, as hd: one value per model)
    R1: tl.constexpr,  # r padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per score tile: all keys (a power of two >= T) when ONE_BLOCK
    ONE_BLOCK: tl.constexpr,  # all scores of the rows in registers at once (else: recompute tiles)
    PREC: tl.constexpr,  # "ieee" or "tf32", see _dot
):
    pid_m, bh = first_block + tl.program_id(0), tl.program_id(1)  # query block, b * H + h
    b, h = bh // H, bh % H
    Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh  # q[b, h, 0, 0]
    Kh = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh  # k[b, h // G, 0, 0]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions i
    q1 = _load_tile(Qh, rows, T, stride_qt, 0, R, R1)  # [BLOCK_M, R1]
    hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)  # keys past the last row's position are never visible
    n_vis = rows + 1  # keys visible to row i
    kt = tl.minimum(n_vis, k_top)  # [BLOCK_M] int32
    need = (rows < T) & (n_vis > k_top)  # rows that drop keys: the only ones searched
    # The scores: all in registers (one tile), or a tile loop re-run for every reduction.
    if ONE_BLOCK:
        s_all = _thr_scores(q1, Kh, 0, rows, T, stride_kt, scale1, R, R1, BLOCK_N, PREC)  # [BLOCK_M, BLOCK_N]
    # m = max_j s_ij
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        if ONE_BLOCK:
            s = s_all
        else:
            s = _thr_scores(q1, Kh, start_n, rows, T, stride_kt, scale1, R, R1, BLOCK_N, PREC)
        m = tl.maximum(m, tl.max(s, axis=1))
    m = tl.where(rows < T, m, 0.0)  # padding rows see nothing; 0 keeps exp(s - m) NaN-free there
    # Radix select: P, the order key of the kt-th largest score, one bit at a time.
    P = tl.zeros((BLOCK_M,), tl.int32)
    n_ge = n_vis.to(tl.float32)  # scores >= float(P) (P = 0 stands for "all visible"): the kept count
    n_open = tl.sum((need & (n_ge != kt)).to(tl.int32), axis=0)  # rows whose kept set is not yet decided
    for step in range(32):
        if n_open > 0:
            C = P | (tl.full((), 1, tl.int32) << (31 - step))  # candidate key: P with the next bit set (int32 shift)
            c = _float_of_key(C)[:, None]  # [BLOCK_M, 1]
            cnt = tl.zeros((BLOCK_M,), tl.float32)  # scores >= c (float: exact up to 2^24 keys)
            for start_n in range(0, hi, BLOCK_N):
                if ONE_BLOCK:
                    s = s_all
                else:
                    s = _thr_scores(q1, Kh, start_n, rows, T, stride_kt, scale1, R, R1, BLOCK_N, PREC)
                cnt += tl.sum(tl.where(s >= c, 1.0, 0.0), axis=1)
            take = cnt >= kt  # at least kt scores at or above C: the kt-th largest is too
            P = tl.where(take, C, P)
            n_ge = tl.where(take, cnt, n_ge)
            n_open = tl.sum((need & (n_ge != kt)).to(tl.int32), axis=0)
    # t0 selects exactly the kept set: v = min(s >= t0) is the kt-th largest score and
    # below = max(s < t0) the next lower one; the threshold goes between them.
    t0 = tl.where(need, _float_of_key(P), float("-inf"))[:, None]  # [BLOCK_M, 1]
    v = tl.full((BLOCK_M,), float("inf"), tl.float32)
    below = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        if ONE_BLOCK:
            s = s_all
        else:
            s = _thr_scores(q1, Kh, start_n, rows, T, stride_kt, scale1, R, R1, BLOCK_N, PREC)
        v = tl.minimum(v, tl.min(tl.where(s >= t0, s, float("inf")), axis=1))
        below = tl.maximum(below, tl.max(tl.where(s < t0, s, float("-inf")), axis=1))
    # thr = (v + below) / 2, halved first so that it cannot overflow; rounding may land it on
    # v or below, or below may be -inf (every visible score tied at v): then thr = v.
    mid = 0.5 * v + 0.5 * below
    thr = tl.where(need, tl.where((mid > below) & (mid <= v), mid, v), float("-inf"))
    out = bh.to(tl.int64) * T + rows  # [BLOCK_M] index into the [B, H, T] row arrays
    tl.store(M + out, m, mask=rows < T)
    tl.store(Thr + out, thr, mask=rows < T)
    tl.store(Kept + out, n_ge.to(tl.int32), mask=rows < T)  # count(s >= thr) = count(s >= float(P))


# ------------------------------------------------------------------------------------------
# 5d. Pass 2: the output, flash-attention style
#
# One program per BLOCK_M query rows of one head; it walks the key tiles up to its last row
# (causal), recomputes s and z, and accumulates. m and thr come from pass 1, so each kept
# weight is final the moment it is computed: no running max, no rescaling of the accumulator.
#
#     acc = 0;  L = 0                                     # [BLOCK_M, hd], [BLOCK_M] float32
#     for each key tile j0 .. j0 + BLOCK_N - 1 with j0 <= last row:
#         s = q1 k1^T / sqrt(r);  z = q2 k2^T / sqrt(hd - r)
#         e = exp(s - m) [j <= i and s >= thr]
#         L += rowsum(e)
#         acc += (e softplus(z)) v                        # e g cast to the input dtype, as flash does with p
#     out = acc / L;  store L for the backward
#
# Bytes: q read once, each K and V tile once per query block (from L2 after the first); out
# written once. FLOPs 4 hd per visible pair (2 r + 2 (hd - r) for s and z, 2 hd for w v).
# ------------------------------------------------------------------------------------------


@jit
def _spark_attn_fwd_kernel(
    Q,  # pointer to q [B, H, T, hd]; element [b, h, t, c] at Q + b * stride_qb + h * stride_qh + t * stride_qt + c
    K,  # pointer to k [B, Hkv, T, hd]; element [b, g, t, c] at K + b * stride_kb + g * stride_kh + t * stride_kt + c
    V,  # pointer to v [B, Hkv, T, hd]; element [b, g, t, c] at V + b * stride_vb + g * stride_vh + t * stride_vt + c
    Out,  # pointer to out [B, H, T, hd], q's dtype, contiguous (written)
    M,  # pointer to m [B, H, T] float32 (pass 1)
    L,  # pointer to L [B, H, T] float32, contiguous (written: each row's sum of exp(s - m) over kept keys)
    Thr,  # pointer to thr [B, H, T] float32 (pass 1)
    stride_qb, stride_qh, stride_qt,  # elements between consecutive batches, heads, positions of q
    stride_kb, stride_kh, stride_kt,  # the same for k
    stride_vb, stride_vh, stride_vt,  # the same for v
    H,  # query heads
    G,  # query heads per KV head
    T,  # tokens (queries = keys)
    scale1,  # 1 / sqrt(r)
    scale2,  # 1 / sqrt(hd - r)
    HD: tl.constexpr,  # hd
    R: tl.constexpr,  # r
    R1: tl.constexpr,  # r padded to a power of two >= 16
    R2: tl.constexpr,  # hd - r padded likewise
    HDP: tl.constexpr,  # hd padded likewise
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per tile
    PREC: tl.constexpr,  # "ieee" or "tf32", see _dot
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh  # q[b, h, 0, 0]
    Kh = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh  # k[b, h // G, 0, 0]
    Vh = V + b.to(tl.int64) * stride_vb + (h // G).to(tl.int64) * stride_vh  # v[b, h // G, 0, 0]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    q1 = _load_tile(Qh, rows, T, stride_qt, 0, R, R1)  # [BLOCK_M, R1]
    q2 = _load_tile(Qh, rows, T, stride_qt, R, HD - R, R2)  # [BLOCK_M, R2]
    row_at = bh.to(tl.int64) * T + rows  # index into the [B, H, T] row arrays
    m = tl.load(M + row_at, mask=rows < T, other=0.0)[:, None]  # [BLOCK_M, 1]
    thr = tl.load(Thr + row_at, mask=rows < T, other=float("inf"))[:, None]  # padding rows keep nothing
    acc = tl.zeros((BLOCK_M, HDP), tl.float32)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, tl.minimum(T, (pid_m + 1) * BLOCK_M), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        s = _scores(q1, _load_tile(Kh, keys, T, stride_kt, 0, R, R1), scale1, PREC)  # [BLOCK_M, BLOCK_N]
        z = _scores(q2, _load_tile(Kh, keys, T, stride_kt, R, HD - R, R2), scale2, PREC)
        # e = exp(s - m) [j <= i and s >= thr]
        keep = (keys[None, :] <= rows[:, None]) & (s >= thr)
        e = tl.where(keep, tl.exp(s - m), 0.0)
        l_sum += tl.sum(e, axis=1)  # L = sum_j e_ij
        # acc += (e g) v
        vt = _load_tile(Vh, keys, T, stride_vt, 0, HD, HDP)  # [BLOCK_N, HDP]
        acc = _dot((e * _softplus(z, PREC)).to(vt.dtype), vt, acc, PREC)
    # out = acc / L (padding rows keep nothing: L = 0 there, and nothing is stored)
    tl.store(L + row_at, l_sum, mask=rows < T)
    l_sum = tl.where(rows < T, l_sum, 1.0)[:, None]
    cols = tl.arange(0, HDP)[None, :]
    tl.store(Out + row_at[:, None] * HD + cols, (acc / l_sum).to(Out.dtype.element_ty),
             mask=(rows < T)[:, None] & (cols < HD))


# ------------------------------------------------------------------------------------------
# 5e. Backward (FlashAttention-2's recomputation, arXiv 2307.08691, in two kernels)
#
# Nothing of size [T, S] was kept: each kernel recomputes s, z, p = e / L, g = softplus(z) and
# dw = dO v^T tile by tile from q, k, v, dO and the row arrays m, thr (pass 1) and L (pass 2). The threshold is a
# constant (keep is computed from s.detach() in the torch path); so is m (softmax does not
# depend on it).
#
#   kernel dq (one program per query block of one head), first:
#       D = rowsum(dO * out)                             # stored for kernel dk dv
#       for each key tile up to the last row:
#           ds = p (g dw - D);  dz = p dw sigmoid(z)
#           dq1 += ds k1;  dq2 += dz k2
#       dq = [dq1 / sqrt(r), dq2 / sqrt(hd - r)]
#   kernel dk dv (one program per key block of one KV head), second:
#       for each of the G query heads of the KV head, for each query block from the diagonal on:
#           dv += w^T dO;  dk1 += ds^T q1;  dk2 += dz^T q2
#       dk = [dk1 / sqrt(r), dk2 / sqrt(hd - r)]
# Each program owns the rows it writes, so no atomics: dk and dv of a KV head are summed over
# its G query heads inside one program.
# ------------------------------------------------------------------------------------------


@jit
def _bwd_tile(q1, q2, do, m, l_inv, thr, dd, rows, keys, Kh, Vh, T, stride_kt, stride_vt, scale1, scale2,
              HD: tl.constexpr, R: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, HDP: tl.constexpr,
              PREC: tl.constexpr):
    """The backward's per-tile recomputation for query rows `rows` and keys `keys`.
    -> w, ds, dz [BLOCK_M, BLOCK_N] float32, and the key tiles k1 [BLOCK_N, R1], k2 [BLOCK_N, R2]"""
    k1 = _load_tile(Kh, keys, T, stride_kt, 0, R, R1)
    k2 = _load_tile(Kh, keys, T, stride_kt, R, HD - R, R2)
    vt = _load_tile(Vh, keys, T, stride_vt, 0, HD, HDP)  # [BLOCK_N, HDP]
    s = _scores(q1, k1, scale1, PREC)
    z = _scores(q2, k2, scale2, PREC)
    # p = exp(s - m) / L on kept keys, g = softplus(z), w = p g
    keep = (keys[None, :] <= rows[:, None]) & (s >= thr)
    p = tl.where(keep, tl.exp(s - m) * l_inv, 0.0)
    g = _softplus(z, PREC)
    # dw_ij = dO_i . v_j
    dw = _dot(do, tl.trans(vt), None, PREC)  # [BLOCK_M, BLOCK_N]
    # ds = p (g dw - D),  dz = p dw sigmoid(z)
    ds = p * (g * dw - dd)
    dz = p * dw * _sigmoid(z)
    return p * g, ds, dz, k1, k2


@jit
def _spark_attn_bwd_dq_kernel(
    Q,  # pointer to q [B, H, T, hd]; element [b, h, t, c] at Q + b * stride_qb + h * stride_qh + t * stride_qt + c
    K,  # pointer to k [B, Hkv, T, hd]; element [b, g, t, c] at K + b * stride_kb + g * stride_kh + t * stride_kt + c
    V,  # pointer to v [B, Hkv, T, hd]; element [b, g, t, c] at V + b * stride_vb + g * stride_vh + t * stride_vt + c
    Out,  # pointer to the forward's out [B, H, T, hd], contiguous
    DO,  # pointer to dO [B, H, T, hd]; element [b, h, t, c] at DO + b * stride_ob + h * stride_oh + t * stride_ot + c
    DQ,  # pointer to dq [B, H, T, hd], q's dtype, contiguous (written)
    M,  # pointer to m [B, H, T] float32 (pass 1)
    L,  # pointer to L [B, H, T] float32 (pass 2)
    Thr,  # pointer to thr [B, H, T] float32 (pass 1)
    Dd,  # pointer to D [B, H, T] float32, contiguous (written: rowsum(dO * out), for kernel dk dv)
    stride_qb, stride_qh, stride_qt,  # elements between consecutive batches, heads, positions of q
    stride_kb, stride_kh, stride_kt,  # the same for k
    stride_vb, stride_vh, stride_vt,  # the same for v
    stride_ob, stride_oh, stride_ot,  # the same for dO
    H,  # query heads
    G,  # query heads per KV head
    T,  # tokens
    scale1,  # 1 / sqrt(r)
    scale2,  # 1 / sqrt(hd - r)
    HD: tl.constexpr, R: tl.constexpr,  # hd, r
    R1: tl.constexpr, R2: tl.constexpr, HDP: tl.constexpr,  # r, hd - r, hd padded to powers of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per tile
    PREC: tl.constexpr,  # "ieee" or "tf32", see _dot
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh  # q[b, h, 0, 0]
    DOh = DO + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh  # dO[b, h, 0, 0]
    Kh = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh  # k[b, h // G, 0, 0]
    Vh = V + b.to(tl.int64) * stride_vb + (h // G).to(tl.int64) * stride_vh  # v[b, h // G, 0, 0]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_at = bh.to(tl.int64) * T + rows  # index into the [B, H, T] row arrays
    q1 = _load_tile(Qh, rows, T, stride_qt, 0, R, R1)
    q2 = _load_tile(Qh, rows, T, stride_qt, R, HD - R, R2)
    do = _load_tile(DOh, rows, T, stride_ot, 0, HD, HDP)  # [BLOCK_M, HDP]
    # D = rowsum(dO * out)
    o = _load_tile(Out + bh.to(tl.int64) * T * HD, rows, T, HD, 0, HD, HDP)
    dd = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # [BLOCK_M]
    tl.store(Dd + row_at, dd, mask=rows < T)
    m = tl.load(M + row_at, mask=rows < T, other=0.0)[:, None]
    l_inv = 1.0 / tl.load(L + row_at, mask=rows < T, other=1.0)[:, None]
    thr = tl.load(Thr + row_at, mask=rows < T, other=float("inf"))[:, None]
    dq1 = tl.zeros((BLOCK_M, R1), tl.float32)
    dq2 = tl.zeros((BLOCK_M, R2), tl.float32)
    for start_n in range(0, tl.minimum(T, (pid_m + 1) * BLOCK_M), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        w, ds, dz, k1, k2 = _bwd_tile(q1, q2, do, m, l_inv, thr, dd[:, None], rows, keys, Kh, Vh, T, stride_kt,
                                      stride_vt, scale1, scale2, HD, R, R1, R2, HDP, PREC)
        # dq1 += ds k1,  dq2 += dz k2
        dq1 = _dot(ds.to(k1.dtype), k1, dq1, PREC)
        dq2 = _dot(dz.to(k2.dtype), k2, dq2, PREC)
    # dq = [dq1 / sqrt(r), dq2 / sqrt(hd - r)]
    DQh = DQ + bh.to(tl.int64) * T * HD  # dq[b, h, 0, 0]
    c1, c2 = tl.arange(0, R1)[None, :], tl.arange(0, R2)[None, :]
    rmask = (rows < T)[:, None]
    tl.store(DQh + rows[:, None] * HD + c1, (dq1 * scale1).to(DQ.dtype.element_ty), mask=rmask & (c1 < R))
    tl.store(DQh + rows[:, None] * HD + R + c2, (dq2 * scale2).to(DQ.dtype.element_ty), mask=rmask & (c2 < HD - R))


@jit
def _spark_attn_bwd_dkdv_kernel(
    Q,  # pointer to q [B, H, T, hd]; element [b, h, t, c] at Q + b * stride_qb + h * stride_qh + t * stride_qt + c
    K,  # pointer to k [B, Hkv, T, hd]; element [b, g, t, c] at K + b * stride_kb + g * stride_kh + t * stride_kt + c
    V,  # pointer to v [B, Hkv, T, hd]; element [b, g, t, c] at V + b * stride_vb + g * stride_vh + t * stride_vt + c
    DO,  # pointer to dO [B, H, T, hd]; element [b, h, t, c] at DO + b * stride_ob + h * stride_oh + t * stride_ot + c
    DK,  # pointer to dk [B, Hkv, T, hd], k's dtype, contiguous (written)
    DV,  # pointer to dv [B, Hkv, T, hd], v's dtype, contiguous (written)
    M,  # pointer to m [B, H, T] float32 (pass 1)
    L,  # pointer to L [B, H, T] float32 (pass 2)
    Thr,  # pointer to thr [B, H, T] float32 (pass 1)
    Dd,  # pointer to D [B, H, T] float32 (kernel dq)
    stride_qb, stride_qh, stride_qt,  # elements between consecutive batches, heads, positions of q
    stride_kb, stride_kh, stride_kt,  # the same for k
    stride_vb, stride_vh, stride_vt,  # the same for v
    stride_ob, stride_oh, stride_ot,  # the same for dO
    H,  # query heads
    G,  # query heads per KV head
    T,  # tokens
    scale1,  # 1 / sqrt(r)
    scale2,  # 1 / sqrt(hd - r)
    HD: tl.constexpr, R: tl.constexpr,  # hd, r
    R1: tl.constexpr, R2: tl.constexpr, HDP: tl.constexpr,  # r, hd - r, hd padded to powers of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per tile
    BLOCK_N: tl.constexpr,  # keys per program
    PREC: tl.constexpr,  # "ieee" or "tf32", see _dot
):
    pid_n, bg = tl.program_id(0), tl.program_id(1)  # key block, b * Hkv + KV head
    Hkv = H // G
    b, kvh = bg // Hkv, bg % Hkv
    Kh = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh  # k[b, kvh, 0, 0]
    Vh = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh  # v[b, kvh, 0, 0]
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    dk1 = tl.zeros((BLOCK_N, R1), tl.float32)
    dk2 = tl.zeros((BLOCK_N, R2), tl.float32)
    dv = tl.zeros((BLOCK_N, HDP), tl.float32)
    first_m = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # the first query block that sees these keys
    for g in range(G):
        h = kvh * G + g  # a query head reading this KV head
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh  # q[b, h, 0, 0]
        DOh = DO + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh  # dO[b, h, 0, 0]
        for start_m in range(first_m, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_at = (b * H + h).to(tl.int64) * T + rows
            q1 = _load_tile(Qh, rows, T, stride_qt, 0, R, R1)
            q2 = _load_tile(Qh, rows, T, stride_qt, R, HD - R, R2)
            do = _load_tile(DOh, rows, T, stride_ot, 0, HD, HDP)
            m = tl.load(M + row_at, mask=rows < T, other=0.0)[:, None]
            l_inv = 1.0 / tl.load(L + row_at, mask=rows < T, other=1.0)[:, None]
            thr = tl.load(Thr + row_at, mask=rows < T, other=float("inf"))[:, None]
            dd = tl.load(Dd + row_at, mask=rows < T, other=0.0)[:, None]
            w, ds, dz, k1, k2 = _bwd_tile(q1, q2, do, m, l_inv, thr, dd, rows, keys, Kh, Vh, T, stride_kt,
                                          stride_vt, scale1, scale2, HD, R, R1, R2, HDP, PREC)
            # dv += w^T dO,  dk1 += ds^T q1,  dk2 += dz^T q2
            dv = _dot(tl.trans(w.to(do.dtype)), do, dv, PREC)
            dk1 = _dot(tl.trans(ds.to(q1.dtype)), q1, dk1, PREC)
            dk2 = _dot(tl.trans(dz.to(q2.dtype)), q2, dk2, PREC)
    # dk = [dk1 / sqrt(r), dk2 / sqrt(hd - r)]
    at = bg.to(tl.int64) * T * HD + keys.to(tl.int64)[:, None] * HD  # [BLOCK_N, 1] row starts in dk, dv
    c1, c2, c = tl.arange(0, R1)[None, :], tl.arange(0, R2)[None, :], tl.arange(0, HDP)[None, :]
    kmask = (keys < T)[:, None]
    tl.store(DK + at + c1, (dk1 * scale1).to(DK.dtype.element_ty), mask=kmask & (c1 < R))
    tl.store(DK + at + R + c2, (dk2 * scale2).to(DK.dtype.element_ty), mask=kmask & (c2 < HD - R))
    tl.store(DV + at + c, dv.to(DV.dtype.element_ty), mask=kmask & (c < HD))


# ------------------------------------------------------------------------------------------
# 5f. Launchers, the autograd Function and the public function
# ------------------------------------------------------------------------------------------


def _pad16(n):
    """The power of two >= max(n, 16) a dimension is padded to (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def _tiles(T, block_m, block_n):
    """A kernel's (BLOCK_M, BLOCK_N), each at most the padded T. Chosen on an H200 at the preset
    (bf16, T 1024, hd 64; median ms over the tiles, warps tried): pass 2 64 x 32 with 4 warps
    (0.144; 64 x 64: 0.226, 128 x 64 with 8 warps: 0.167); kernel dq 64 x 64, 4 warps (0.185;
    128 x 64: 0.203); kernel dk dv 64 x 64, 4 warps (0.252; 32 x 128 with 8 warps: 0.411).
    Re-measured at B 32 with pass 2 summing L (and tl.log for the gate): the same tiles won
    (pass 2 0.48 ms, others 0.49-1.56; dq 0.64, others 0.62-1.65; dk dv 0.87, others 1.02-2.58),
    and capping registers (two programs per SM) made every kernel slower or no faster."""
    return min(block_m, _pad16(T)), min(block_n, _pad16(T))


def _precision(q):
    """PREC of every kernel (see _dot): "ieee" for float32 inputs and under the interpreter."""
    return "ieee" if q.dtype == torch.float32 or q.device.type != "cuda" else "tf32"


def _strides(x):
    """(batch, head, position) strides of a [B, heads, T, hd] tensor whose last axis is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _last_contiguous(x):
    """x itself when its last axis has unit stride (any view [B, T, H, hd].transpose(1, 2) does), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _spark_attn_fwd(q, k, v, k_top, r):
    """Passes 1 and 2.   -> out [B, H, T, hd] (q's dtype), m, L, thr [B, H, T] float32, kept [B, H, T] int32"""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    dev = q.device
    m, l_sum, thr = (torch.empty(B, H, T, dtype=torch.float32, device=dev) for _ in range(3))
    kept = torch.empty(B, H, T, dtype=torch.int32, device=dev)
    out = torch.empty(B, H, T, hd, dtype=q.dtype, device=dev)
    if out.numel() == 0:  # B, H or T is 0: nothing to launch (a grid may not be empty)
        kept.zero_()
        return out, m, l_sum, thr, kept
    prec = _precision(q)
    scale1, scale2 = 1.0 / math.sqrt(r), 1.0 / math.sqrt(hd - r)
    R1, R2, HDP = _pad16(r), _pad16(hd - r), _pad16(hd)
    # pass 1, one launch per key width: causal rows of block j see min(T, 16 (j + 1)) keys, so the
    # blocks that fit in `width` registers (a power of two) hold that many, not T: at T = 1024 this
    # compares 2/3 of the pairs a single width of 1024 would. Blocks past MAX_KEYS_IN_REGISTERS go
    # to one launch that recomputes tiles of 64 keys.
    n_blocks, j = triton.cdiv(T, BLOCK_M1), 0
    while j < n_blocks:
        width = _pad16(min(T, (j + 1) * BLOCK_M1))  # keys the last row of block j sees, padded
        one_block = width <= MAX_KEYS_IN_REGISTERS
        j_end = min(n_blocks, width // BLOCK_M1) if one_block else n_blocks  # blocks that fit in `width`
        # 128 scores per thread (measured fastest on an H200 at width 1024, of 2, 4, 8, 16 warps)
        warps = min(8, max(1, width // 256)) if one_block else 4
        _spark_attn_thr_kernel[(j_end - j, B * H)](
            q, k, m, thr, kept, *_strides(q), *_strides(k), H, G, T, k_top, scale1, j,
            R=r, R1=R1, BLOCK_M=BLOCK_M1, BLOCK_N=width if one_block else 64, ONE_BLOCK=one_block, PREC=prec,
            num_warps=warps)
        j = j_end
    # pass 2
    bm, bn = _tiles(T, 64, 32)
    _spark_attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, out, m, l_sum, thr, *_strides(q), *_strides(k), *_strides(v), H, G, T, scale1, scale2,
        HD=hd, R=r, R1=R1, R2=R2, HDP=HDP, BLOCK_M=bm, BLOCK_N=bn, PREC=prec, num_warps=4)
    return out, m, l_sum, thr, kept


def _spark_attn_bwd(do, q, k, v, out, m, l_sum, thr, r):
    """The two backward kernels.   -> dq [B, H, T, hd], dk, dv [B, Hkv, T, hd] (the inputs' dtype)"""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(
        B, Hkv, T, hd, dtype=k.dtype, device=k.device), torch.empty(B, Hkv, T, hd, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:  # nothing to launch
        return dq, dk.zero_(), dv.zero_()
    dd = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # D = rowsum(dO * out)
    prec = _precision(q)
    scale1, scale2 = 1.0 / math.sqrt(r), 1.0 / math.sqrt(hd - r)
    consts = dict(HD=hd, R=r, R1=_pad16(r), R2=_pad16(hd - r), HDP=_pad16(hd), PREC=prec, num_warps=4)
    # 64 x 64 tiles for rows of up to 256 bytes (hd 128 in bf16), 32 x 32 for 512 (hd 256 in bf16,
    # 128 in float32; longer rows are refused by _check_attn_args). Compiled by Triton 3.6 for an
    # H200, which has 227 KB of shared memory a program, the dk dv kernel at 512-byte rows needs
    # 272 KB at 64 x 64 and 101-136 KB at 32 x 32 (r = hd / 2, and the r padding worst); pass 2's
    # 64 x 32 tiles 107-172 KB. At 1024-byte rows pass 2 would need 213-270 KB.
    tile = 64 if hd * q.element_size() <= 256 else 32  # (true of hd exactly when of hd padded to a power of two)
    bm, bn = _tiles(T, tile, tile)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), H, G, T, scale1, scale2)
    _spark_attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, out, do, dq, m, l_sum, thr, dd, *args, BLOCK_M=bm, BLOCK_N=bn, **consts)
    _spark_attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * Hkv)](
        q, k, v, do, dk, dv, m, l_sum, thr, dd, *args, BLOCK_M=bm, BLOCK_N=bn, **consts)
    return dq, dk, dv


class _SparkAttentionGPU(torch.autograd.Function):
    """Passes 1 and 2 forward, the two recomputing kernels backward; saves q, k, v, out and
    16 bytes per query row (m, L, thr float32; the kept counts are returned, not saved)."""

    @staticmethod
    def forward(ctx, q, k, v, k_top, r):  # q [B, H, T, hd], k v [B, Hkv, T, hd], last axes contiguous
        out, m, l_sum, thr, kept = _spark_attn_fwd(q, k, v, k_top, r)
        ctx.save_for_backward(q, k, v, out, m, l_sum, thr)
        ctx.r = r
        kept = kept.sum()  # 0-d int64: (query, key) pairs kept, over B, H and T
        ctx.mark_non_differentiable(kept)
        return out, kept

    @staticmethod
    def backward(ctx, dout, _dkept):
        q, k, v, out, m, l_sum, thr = ctx.saved_tensors
        dq, dk, dv = _spark_attn_bwd(_last_contiguous(dout), q, k, v, out, m, l_sum, thr, ctx.r)
        return dq, dk, dv, None, None


def spark_attention_gpu(q, k, v, k_top, r):
    """spark.spark_attention(q, k, v, k_top, r) for training (causal, S == T) in Triton.

    q [B, H, T, hd], k v [B, Hkv, T, hd] -> (out [B, H, T, hd] in q's dtype, kept: a 0-d int64
    tensor, the number of (query, key) pairs that got weight, summed over B, H and T).
    float32, bfloat16 or float16 (one dtype for all three; float32 inside); differentiable in
    q, k and v. Views with a contiguous last axis (q_proj(x).view(B, T, H, hd).transpose(1, 2))
    are read in place.
    """
    _check_attn_args(q, k, v, k_top, r)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    return _SparkAttentionGPU.apply(q, k, v, k_top, r)


# ------------------------------------------------------------------------------------------
# 6. TwELL: the L1-sparse FFN with its gate packed inside the gate matmul (Triton)
# ------------------------------------------------------------------------------------------
# TwELL (Sakana AI, "Sparser, Faster, Lighter Transformer Language Models", arXiv 2603.23198, its
# TwELL format; notes/papers.md, "TwELL"; the format is drawn in notes/twell.md and defined above
# spark.twell_pack_np) is how an L1-sparse ReLU-gated FFN
#
#     g = relu(x Wg)      u = x Wu      h = g * u      y = h Wd
#
# skips the zeros of g (about 99.5 % after L1 training) on a GPU. Three kernels and a fallback:
# - producer (_twell_produce_kernel): the gate matmul x @ Wg, tiled with an output tile of exactly
#   `tile` columns, whose epilogue applies the ReLU, rounds to bf16 and writes the TwELL slot of
#   every (row, tile) -- count word and entry words -- plus the per-row overflow flag. The dense
#   g [M, f] is never written: only the packed words, C / 2 times smaller than bf16 g.
# - consumer (_twell_consume_kernel): one program per row reads its slots and, for each stored
#   entry j, u_j = x . Wu[:, j], h_j = g_j u_j, y += h_j Wd[j, :]: 2 rows of d weights per
#   nonzero instead of 2 f d per token. h is never written either.
# - hybrid route (_twell_dense_h_kernel, _twell_dense_y_kernel): a row with a tile holding more
#   nonzeros than its slot can (tile / C - 1) is computed densely, in the same call, in a buffer
#   of a FIXED number `cap` of rows. The consumer compacts the overflowing row ids on the device
#   (an atomic counter hands out buffer slots), so the host never waits; the dense kernels read
#   that counter and their programs past it exit at once, so an unused capacity costs no work.
#   More overflowing rows than cap is an error (below), never a silent drop.
#
# The public functions, each with the reference it must match (same argument names and order)
#     prepare_twell_gpu(Wg, Wu, Wd) -> (Wg, WuT, Wd)    the weight layouts the kernels read
#     twell_gate_pack_gpu(x, Wg, tile, C)               the producer alone; reference:
#         -> (packed, overflow)                          spark.twell_pack(relu(x @ Wg), tile, C), bit for bit
#     twell_consume_gpu(x, packed, overflow, WuT, Wd, tile, C)   the consumer alone; reference: the
#         -> y, overflowing rows NaN                     rows without overflow of spark.twell_ffn
#     twell_ffn_gpu(x, Wg, Wu, Wd, tile, C, cap=, WuT=) all of it; reference: spark.twell_ffn
# tests/test_kernels_gpu_twell.py runs them in Triton's interpreter on the CPU (CI) and on a GPU.
#
# Dimension letters (spark.py's): M rows (tokens, all leading dims), d model width, f FFN width,
# nT = ceil(f / tile) tiles per row, W = tile / C words per slot (capacity W - 1 entries), n the
# nonzeros of a row. Tile letters: BM rows and BK of d a producer's matmul tile holds at once;
# E entries a consumer program handles at once; BD2 = ceil(d / 2) rounded up to a power of two.
#
# Choices
# - bf16 in, bf16 out (x, Wg, Wu, Wd and y), float32 accumulation. Every rounding to bf16 is round
#   to nearest even done on the float32 bits (_bf16_round), not by a dtype conversion: Triton's
#   interpreter converts float32 to bf16 by dropping bits where a GPU rounds, and the packed words
#   must be bit-identical to spark.twell_pack's everywhere.
# - The same roundings as torch's bf16 FFN (spark.twell_ffn, relu_l1_ffn on bf16 tensors): g, u,
#   h = bf16(g u) and y are each rounded to bf16 once, after float32 sums. Only the order of those
#   float32 sums differs from torch's, so a value within float32 rounding of a bf16 boundary may
#   come out one bf16 ulp apart (tests/test_kernels_gpu_twell.py: exact on inputs whose sums are
#   exact, and the tolerance that follows from this otherwise).
# - A NaN or +inf gate (from non-finite x or weights) is an error, as in spark.twell_pack; its
#   slot is poisoned and its row routed dense as well, so y is NaN or inf there, never a finite
#   wrong value, even if the error is not looked at. (A -inf gate is a ReLU's 0, as in torch.)
# - Errors without a host wait: the call ends with one torch._assert_async on a word the last
#   kernel writes (1 when at most cap rows overflowed and no gate was NaN or inf). On the CPU (Triton's
#   interpreter) it raises RuntimeError at once. On a GPU it is a device-side assert: the call
#   returns, and the next synchronisation (y.cpu(), y.item(), torch.cuda.synchronize(), ...)
#   raises "RuntimeError: CUDA error: device-side assert triggered"; the process's CUDA context
#   is unusable after that (restart it with a larger cap). The rows past cap are NaN in y.
# - The hybrid buffer's slot order depends on which consumer program reaches the counter first;
#   y does not (each row's dense result is the same in any slot), so y is deterministic.


# ------------------------------------------------------------------------------------------
# 6a. Launch settings (defaults for an NVIDIA H200; bench_twell times the candidates and takes
#    the fastest for its own rows) and argument checks
# ------------------------------------------------------------------------------------------

# Producer: BM rows x `tile` columns of the gate per matmul tile, BK of d per step, one
# persistent program per SM (PRODUCE_PROGRAMS on the CPU, so that the interpreter's programs loop
# over several tiles too). BM = 128 reads Wg (from L2) half as often as BM = 64: on an H200 the
# matmul alone took 4.5 ms at BM 128 against 6.3-6.5 ms at BM 64 (with BK 64). The defaults need
# 208 KB of shared memory (four stages of 48 KB, and U's 16 KB in float8; section 6c); the whole
# producer took 5.56-5.60 ms with them against 5.71-5.83 at BK 32 with 4 stages, 5.74-5.87 with 5,
# and 6.54-6.60 at BK 64 with 3 (one process, NVIDIA H200). bench_twell times the candidates. On a
# GPU with less shared memory, such as an A100's 164 KB, set BK 32 (Triton 3.9 compiles that for
# sm_80, where U is float16, into 72 KB, offline; not run here, for want of such a GPU).
PRODUCE_PROGRAMS = 2
PRODUCE_CFG = dict(BM=128, BK=64, num_stages=4)  # warps: 8 at BM 128 (_produce)
OFF32_WORDS = 2**31  # packed words from which the producer's word offsets are int64 (tests lower it)
# Consumer: E entries at once, each a [E, d] tile of Wu rows and one of Wd rows (held as two [E, BD2]
# tiles, the even and the odd columns).
CONSUME_CFG = dict(E=4, num_warps=2)
# Few rows (decoding): few programs, so the slowest row's chain of steps sets the time; wider
# steps and more warps shorten it. On an H200 (E, warps) = (8, 4) against (4, 2): one FFN call
# 60 against 71 us at M = 8, 88 against 109 us at M = 64 (tokens other than the benchmark's); at
# M = 131072 the whole FFN 10.2 against 9.4-9.6 ms. The cut-off of 256 rows lies between the sizes
# measured; the crossover itself was not measured.
CONSUME_FEW_CFG, CONSUME_FEW_ROWS = dict(E=8, num_warps=4), 256
CONSUME_NTB_MAX = 64  # count words a consumer program reads at once (more tiles: a loop over chunks)
# Hybrid dense kernels: a plain matmul tile.
DENSE_CFG = dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)
# Hybrid capacity when the caller gives none: 1/16 of the rows, at least 64, at most M. Its
# cost when unused is the buffer (cap f bf16 bytes, 1/16 of dense h) and programs that exit.
CAP_DIV, CAP_MIN = 16, 64
MAX_TILE = 256  # the producer's [128, tile] float32 accumulator takes 128 registers a thread at 256, its
#                pipelined inputs 192 KB of shared memory and U (tile / 2)^2 bytes more (16 KB in float8);
#                its numbering needs tile < 1024 (count and 1024 + k in section 6c)
NAN_WORD = spark.BF16_NAN << 16  # an entry word of an overflowing slot: bf16 NaN in the high half


def _check_bf16(name, t, ndim):
    """t must be a bf16 tensor of `ndim` axes on a CUDA device (or the CPU under the interpreter)."""
    _check_x(name, t)
    if t.dtype != torch.bfloat16 or t.ndim != ndim:
        raise TypeError(f"{name} must be a bfloat16 tensor with {ndim} axes (the TwELL kernels are bf16), "
                        f"got {t.dtype} with shape {tuple(t.shape)}")


def _check_same_device(ref_name, ref, **ts):
    """ValueError naming the first tensor of ts that is not on ref's device (the TwELL arguments mix
    dtypes: bf16 weights, uint32 words, bool flags, so _check_same's dtype rule does not apply)."""
    for name, t in ts.items():
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_tile(f, tile, C):
    """spark's format checks, plus the producer's: 32 <= tile <= MAX_TILE. -> (nT, W)"""
    nT, W = spark._twell_sizes(f, tile, C)
    if not 32 <= tile <= MAX_TILE:
        raise ValueError(f"tile must be in [32, {MAX_TILE}] for the Triton producer (tl.dot needs 16 columns in "
                         f"each half of a tile, its [128, tile] accumulator must fit in registers), got {tile}")
    return nT, W


def prepare_twell_gpu(Wg, Wu, Wd):
    """The weight layouts the TwELL kernels read.   Wg [d, f], Wu [d, f], Wd [f, d] -> (Wg, WuT [f, d], Wd)

    The consumer reads one column of Wu and one row of Wd per nonzero: Wu is transposed to
    WuT [f, d] so that the column is a contiguous row (d bf16, 16-byte loads) like Wd's. All
    three bf16, contiguous, on one device. A model does this once, when it loads its weights, and
    passes WuT to every twell_ffn_gpu call (otherwise each call transposes Wu: d f bf16 read and written).
    """
    for name, w in (("Wg", Wg), ("Wu", Wu), ("Wd", Wd)):
        _check_bf16(name, w, 2)
    _check_same_device("Wg", Wg, Wu=Wu, Wd=Wd)
    d, f = Wg.shape
    if Wu.shape != Wg.shape or Wd.shape != (f, d):
        raise ValueError(f"expected Wg and Wu [d, f], Wd [f, d]; got Wg {tuple(Wg.shape)}, Wu {tuple(Wu.shape)}, "
                         f"Wd {tuple(Wd.shape)}")
    return Wg.contiguous(), Wu.t().contiguous(), Wd.contiguous()


# ------------------------------------------------------------------------------------------
# 6b. Building blocks (Triton functions, inlined where they are called)
# ------------------------------------------------------------------------------------------


@jit
def _bf16_bits(v):
    """float32 v -> int32 with bf16(v) in the high 16 bits (round to nearest even), low 16 bits 0.

    spark.twell_pack_np's formula: add 0x7FFF plus the lowest kept bit (bit 16) and clear the low
    half; a carry out of the mantissa runs into the exponent (0x3FFF8000 -> 2.0, the largest
    floats -> inf). On int32 it also holds for negative v (the sign bit rides along), except a
    NaN, which _bf16_round keeps as it is.
    """
    b = v.to(tl.int32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000 as int32


@jit
def _bf16_round(v):
    """float32 v -> float32 holding bf16(v), round to nearest even (NaN stays NaN)."""
    return tl.where(v != v, v, _bf16_bits(v).to(tl.float32, bitcast=True))


@jit
def _dot_tile(
    A,  # pointer to A [., K] bf16, rows contiguous along K
    B,  # pointer to B: element (k, n) at B + k * stride_bk + n * stride_bn, bf16
    rows,  # [BM] int64 rows of A to read
    rmask,  # [BM] which of them are real (others read as 0)
    cols,  # [BN] columns of B to read
    cmask,  # [BN] which of them are real
    K,  # the summed length
    stride_am,  # elements from one row of A to the next
    stride_bk,  # elements from B[k, n] to B[k + 1, n]
    stride_bn,  # elements from B[k, n] to B[k, n + 1]
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    WIDEN: tl.constexpr,  # True under Triton's interpreter: see below
):
    """acc [BM, BN] float32 = A[rows, :K] @ B[:K, cols], tl.dot over chunks of BK (bf16 in, float32 sums).

    The interpreter's bf16 tl.dot (triton 3.9) returns garbage, so there (WIDEN) the tiles are
    widened to float32 first and multiplied in exact float32 ("ieee", no TF32): the same values,
    hence the same products and float32 sums as the tensor cores' bf16 dot.
    """
    ks = tl.arange(0, BK)
    a_ptr = A + rows[:, None] * stride_am + ks[None, :]  # [BM, BK]
    b_ptr = B + ks[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn  # [BK, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = k0 + ks < K
        a = tl.load(a_ptr, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if WIDEN:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)  # bf16 tensor cores, float32 accumulation
        a_ptr += BK
        b_ptr += BK * stride_bk
    return acc


# ------------------------------------------------------------------------------------------
# 6c. The producer: gate matmul with a TwELL epilogue
#
# A persistent kernel: one program per SM walks the (row block, tile) pairs, tiles fastest, so
# the programs running side by side share x's row block (read from memory once, then from L2)
# while all of Wg (d f bf16, 23 MB at d 2048, f 5632) stays in L2. The epilogue packs the
# accumulator where it lies, in the tensor cores' register layout; nothing is written but words.
#
#     U = [i <= j] for i, j < H = tile / 2                   # [H, H] of ones on and above the diagonal
#     packed = 0                                              # a memset: the words after the entries stay 0
#                                                             # (cheaper than the epilogue writing them)
#     for each (row block, tile t) of this program:
#         acc = x[rows] @ Wg[:, t tile : (t + 1) tile]       # [BM, tile] float32, tensor cores
#         for each half h = 0, 1 of the tile (acc0, acc1: its two column halves, [BM, H]):
#             v_h = bf16 bits of relu(acc_h) << 16            # round to nearest even
#             nz_h = v_h != 0;  bad_h = acc_h is NaN or +inf
#         k0 = nz0 @ U;  k1 = sum(nz0) + nz1 @ U              # tensor cores again: k = 1, 2, ... at a row's
#                                                             # 1st, 2nd, ... nonzero of the tile: its word
#         count = sum(nz0) + sum(nz1);  over = count > W - 1 or any bad
#         word_h = column | v_h   (| NaN bits instead of v_h, in an overflowing slot)
#         packed[row, t W + k_h] = word_h  where nz_h and k_h <= W - 1     (a scatter)
#         packed[row, t W] = min(count, W - 1);  overflowing rows: flag[row] = 1
#
# Why a matmul for the numbering. A cumsum along the tile (tl.cumsum) wants a row's columns in a
# layout of its own, and Triton moves [BM, tile] tensors through shared memory to get there; so
# does a scattered tl.store, into a layout of one column per thread. Both moves, and the spills
# they caused, cost more than the matmul (notes/twell.md: 7.9-8.8 ms for versions built so,
# against 4.5 ms for the matmul alone, NVIDIA H200). k = nz @ U is a second tl.dot whose result
# lies in the same register layout as acc, with 0/1 operands in float8 (exact) and float16 sums
# (exact below 2048). The scatter is one PTX st.global per entry (_scatter_store), which Triton
# does not re-lay. Why halves: a whole tile's U would be [tile, tile], half of it zeros below the
# diagonal; two [H, H] products skip the zero block (half the multiply-adds), and U takes 16 KB of
# shared memory instead of 64 (float8, tile 256), which leaves room for four pipeline stages of
# 64-wide steps of d instead of 32-wide ones. The halves are a split of each thread's registers
# (tl.split; in Triton 3.9's code for sm_90a, offline, the epilogue's shared-memory accesses and
# shuffles stayed as many as before it).
#
# Bytes at M = 131072, d 2048, f 5632, tile 256, C 8: x read once (537 MB), Wg from L2, packed
# zeroed (M nT W 4 = 369 MB, against 1476 MB of dense bf16 g) and then its counts and entries
# written (at most 26 MB at 27.8 nonzeros a row; the overflowing rows' entries are capped).
# FLOPs 2 M d f = 3.0e12, a third of the dense FFN's, plus M f tile = 0.2e12 for the numbering.
# ------------------------------------------------------------------------------------------


@jit
def _scatter_store(base, k, value, mask, WIDEN: tl.constexpr):
    """tl.store(base + k, value, mask=mask) for int32 k and values, the operands left in their layout.

    A tl.store of pointers computed from data cannot be coalesced, and Triton re-lays its operands
    into a one-column-per-thread layout first (through shared memory); an inline PTX store is not
    a memory operation to Triton, so it stores from the registers where the values are. base:
    pointers broadcast against k (here one per row, [BM, 1]), and the address base + 4 k one
    multiply-add (mad.wide). The interpreter cannot run PTX (WIDEN): there it is the plain tl.store.
    """
    if WIDEN:
        tl.store(base + k, value, mask=mask)
    else:
        tl.inline_asm_elementwise("{ .reg .b64 a; mad.wide.s32 a, $2, 4, $1; @$4 st.global.b32 [a], $3; mov.b32 $0, 0; }",
                                  "=r,l,r,r,b", [base, k, value, mask], dtype=tl.int32, is_pure=False, pack=1)


@jit
def _gate_bits(a):
    """Gates a [BM, H] float32 (one half of a tile) -> (v, nz, cnt).

    v: bf16(relu(a)) in the high 16 bits, 0 below (_bf16_bits: round to nearest even); a NaN gate
    gives 0, not an entry, and a finite gate at most 0x7F80, bf16 inf. nz = v != 0: the entries.
    cnt [BM]: the row's entries + 1024 x its bad gates, NaN or +inf, in one sum. (An inf in x also
    meets the zeros read for the padding columns of a narrow last tile: inf * 0 = NaN there counts
    as bad, even where the real gates are -inf. The FFN of such an x is not finite anyway, through
    x Wu.)
    """
    v = _bf16_bits(tl.where(a > 0, a, 0.0))
    nz = v != 0
    bad = ~(a <= 3.4028234663852886e38)
    return v, nz, tl.sum(nz.to(tl.int32) + bad.to(tl.int32) * 1024, axis=1)


@jit
def _number(nz, u_op, start, ONE: tl.constexpr, IT: tl.constexpr, OP: tl.constexpr, WIDEN: tl.constexpr):
    """0x6400 + start + k at the k-th entry (k = 1, 2, ...) of each row of nz [BM, H], in nz's
    register layout: start[row] + nz @ U on the tensor cores, U = u_op [H, H]. (0x6400 + k is how
    the float16 sums below hold 1024 + k: their bits, read as an integer; start + k < 1024.)"""
    if WIDEN:  # the interpreter: exact float32 products and sums, then float16 as on a GPU (exact: < 2048)
        k = tl.dot(nz.to(tl.float32), u_op, (1024 + start).to(tl.float32)[:, None] + tl.zeros(nz.shape, tl.float32),
                   input_precision="ieee").to(tl.float16)
    else:
        nz_op = tl.where(nz, ONE, 0).to(IT).to(OP, bitcast=True)  # 0 / 1 written as bits
        k = tl.dot(nz_op, u_op, (1024 + start).to(tl.float16)[:, None] + tl.zeros(nz.shape, tl.float16),
                   out_dtype=tl.float16)
    return k.to(tl.int16, bitcast=True).to(tl.int32)


@jit
def _twell_produce_kernel(
    X,  # pointer to x [M, d] bf16; row m at X + m * stride_xm, entries contiguous
    Wg,  # pointer to Wg [d, f] bf16, contiguous (row k at Wg + k f)
    Packed,  # pointer to packed [M, NT W] int32 (the uint32 words' bits), contiguous, zeroed;
    #          counts and entries written here
    Stat,  # pointer to int32 [M + 3], zeroed: [0, M) per-row overflow flags (set here), [M]
    #        overflowing rows (the consumer's count), [M + 1] NaN or +inf gates (counted here),
    #        [M + 2] the ok word (the last kernel's)
    M,  # number of rows
    d,  # model width (the summed length)
    f,  # FFN width (columns of Wg)
    stride_xm,  # elements from one row of x to the next
    NAN_WORD,  # spark.BF16_NAN << 16: the high half of an overflowing slot's entries
    n_tiles,  # (row blocks) x NT
    TILE: tl.constexpr,  # columns per tile = the matmul's output tile width
    W: tl.constexpr,  # words per slot, TILE / C
    NT: tl.constexpr,  # tiles per row: packed's row is NT W words
    BM: tl.constexpr,  # rows per matmul tile
    BK: tl.constexpr,  # entries of d per matmul step
    OFF64: tl.constexpr,  # M NT W >= OFF32_WORDS (2^31): word offsets in int64
    FP8: tl.constexpr,  # the GPU has float8 tensor cores (compute capability >= 8.9)
    WIDEN: tl.constexpr,  # the interpreter's float32 dot (see _dot_tile)
):
    tl.static_assert((TILE < 1024) & (TILE >= 32))  # count < 1024 (cnt's low bits); halves of >= 16 (tl.dot)
    H: tl.constexpr = TILE // 2  # columns per half
    pid = tl.program_id(0)
    r_loc, c_h = tl.arange(0, BM), tl.arange(0, H)
    upper = c_h[:, None] <= c_h[None, :]  # [H, H] U
    # the numbering's operands, 0 and 1, written as bits: float8 e4m3 (1.0 = 0x38), or float16
    # (1.0 = 0x3C00) for halves of 16 (tl.dot wants k >= 32 for float8), GPUs without float8, and
    # row blocks under 64 (decoding). Below 64 rows Triton uses the older tensor-core instruction
    # (mma, operands in registers), and building U's float8 operand for it goes through shared
    # memory and conversions: in a program of one tile that costs more than float16 sums save
    # (offline SASS: a 1482-instruction prologue against 938; one token's producer on an H200:
    # 28.7-28.9 against 24.6-24.8 us)
    F8: tl.constexpr = FP8 and H >= 32 and BM >= 64
    OP: tl.constexpr = tl.float8e4nv if F8 else tl.float16
    IT: tl.constexpr = tl.int8 if F8 else tl.int16
    ONE: tl.constexpr = 0x38 if F8 else 0x3C00
    u_op = upper.to(tl.float32) if WIDEN else tl.where(upper, ONE, 0).to(IT).to(OP, bitcast=True)  # U as an operand
    for tile_id in range(pid, n_tiles, tl.num_programs(0)):
        t = tile_id % NT  # the tile (fastest)
        row0 = (tile_id // NT) * BM
        rows = row0 + r_loc  # [BM]
        cols = t * TILE + tl.arange(0, TILE)  # [TILE] global columns of this tile (the last one is narrower when f % TILE != 0)
        acc = _dot_tile(X, Wg, rows.to(tl.int64), rows < M, cols, cols < f, d, stride_xm, f, 1, BM, TILE, BK, WIDEN)
        # padded rows and columns read zeros, so their acc is 0: never stored, never counted.
        # The tile's two column halves, [BM, H] each, and their gates' bits
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, H)), (0, 2, 1)))
        v0, nz0, cnt0 = _gate_bits(acc0)
        v1, nz1, cnt1 = _gate_bits(acc1)
        cnt = cnt0 + cnt1
        count, n_bad = cnt & 1023, cnt >> 10  # (count <= TILE <= 256 < 1024)
        over = (count > W - 1) | (n_bad > 0)  # [BM] the slot cannot hold the tile
        # word = j | bf16 << 16: global column j in the low half (< 65536), the value's bits above,
        # or in an overflowing slot NaN bits instead: (v & keep) | (nan + j). The column is added,
        # not or-ed (no carry below bit 16), so that each value's constant part of j is one add
        keep = tl.where(over, 0, -65536)[:, None]  # [BM, 1] (-65536 = 0xFFFF0000)
        nan = tl.where(over, NAN_WORD, 0)[:, None] + t * TILE  # [BM, 1]
        # the slot's word 0, minus 0x6400 (_number's k is 0x6400 + k: base itself may point
        # before packed, but only base + k of an entry is stored to); int32 offsets (fewer
        # registers for the scatter) unless packed has 2^31 words or more (OFF64)
        base = Packed + ((rows.to(tl.int64) if OFF64 else rows)[:, None] * (NT * W) + t * W - 0x6400)  # [BM, 1]
        # words 1..min(count, W - 1): the left half's entries, then the right half's after them
        k0 = _number(nz0, u_op, tl.zeros((BM,), tl.int32), ONE, IT, OP, WIDEN)
        _scatter_store(base, k0, (v0 & keep) | (nan + c_h[None, :]), nz0 & (k0 < 0x6400 + W), WIDEN)
        k1 = _number(nz1, u_op, cnt0 & 1023, ONE, IT, OP, WIDEN)
        _scatter_store(base, k1, (v1 & keep) | (nan + H + c_h[None, :]), nz1 & (k1 < 0x6400 + W), WIDEN)
        rm = rows < M
        # word 0, the count, never above the capacity (the words after the entries stay 0)
        tl.store(Packed + rows.to(tl.int64) * (NT * W) + t * W, tl.minimum(count, W - 1), mask=rm)
        # the row's flag: every tile that overflows writes the same 1 (no race on the value)
        tl.store(Stat + rows, tl.full((BM,), 1, tl.int32), mask=rm & over)
        n_bad = tl.sum(tl.where(rm, n_bad, 0), axis=0)
        tl.atomic_add(Stat + M + 1, n_bad, mask=n_bad > 0)  # one scalar atomic, only when there are any


def _produce(xs, Wg, tile, C):
    """Launch the producer on rows xs [M, d] (unit stride along d).
    -> packed int32 [M, nT W], stat int32 [M + 3] (see the kernel's arguments)"""
    (M, d), f = xs.shape, Wg.shape[1]
    nT, W = _check_tile(f, tile, C)
    cfg = dict(PRODUCE_CFG)
    # few rows (decoding): a tile no taller than needed, so that the nT programs waste no work
    BM = min(cfg.pop("BM"), max(16, triton.next_power_of_2(M)))
    # warps: from 64 rows on (the wgmma instruction), one warpgroup of 4 per 64 rows, so that each
    # warp's rows span the whole tile and the halves are a split of its registers; at 64 rows, 8
    # warps would split the columns instead (offline, sm_90a: shared-memory round trips, 3,964
    # instructions a tile against 3,606; the FFN of 64 tokens took 77.4-77.5 us so, against
    # 68.5-68.6 with the whole-tile numbering, NVIDIA H200). Below 64 rows (the older mma), 8.
    cfg["num_warps"] = BM // 16 if BM >= 64 else 8
    n_tiles = nT * triton.cdiv(M, BM)
    on_gpu = xs.device.type == "cuda"
    programs = min(n_tiles, torch.cuda.get_device_properties(xs.device).multi_processor_count if on_gpu else PRODUCE_PROGRAMS)
    packed = torch.zeros(M, nT * W, dtype=torch.int32, device=xs.device)  # the kernel writes counts and entries
    stat = torch.zeros(M + 3, dtype=torch.int32, device=xs.device)
    _twell_produce_kernel[(programs,)](xs, Wg, packed, stat, M, d, f, xs.stride(0), NAN_WORD, n_tiles,
                                       TILE=tile, W=W, NT=nT, BM=BM, OFF64=M * nT * W >= OFF32_WORDS,
                                       FP8=on_gpu and torch.cuda.get_device_capability(xs.device) >= (8, 9),
                                       WIDEN=not on_gpu, **cfg)
    return packed, stat


def _x_rows(x, d, where):
    """x must be a bf16 tensor [..., d] (d = `where`). -> x as rows [M, d] with unit stride along d"""
    _check_x("x", x)
    if x.dtype != torch.bfloat16 or x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"x must be a bfloat16 tensor [..., d] with d = {where} = {d}, got {x.dtype} {tuple(x.shape)}")
    return _rows(x)


def twell_gate_pack_gpu(x, Wg, tile=256, C=8):
    """The producer alone: TwELL of relu(x @ Wg).   x [..., d], Wg [d, f] -> (packed uint32 [M, nT W], overflow bool [M])

    Bit for bit spark.twell_pack(relu(x @ Wg), tile, C) when x @ Wg rounds the same (it does
    when the float32 sums are exact; otherwise an entry within float32 rounding of a bf16
    boundary may differ by one ulp, as two matmuls summing in other orders do). A NaN or +inf
    gate is an error (torch._assert_async: at once on the CPU, at the next sync on a GPU).
    """
    _check_bf16("Wg", Wg, 2)
    xs = _x_rows(x, Wg.shape[0], "Wg.shape[0]")
    _check_same_device("x", x, Wg=Wg)
    Wg = Wg.contiguous()
    if xs.shape[0] == 0:
        nT, W = _check_tile(Wg.shape[1], tile, C)
        return torch.empty(0, nT * W, dtype=torch.uint32, device=x.device), torch.empty(0, dtype=torch.bool, device=x.device)
    packed, stat = _produce(xs, Wg, tile, C)
    M = xs.shape[0]
    torch._assert_async(stat[M + 1] == 0, "twell_gate_pack_gpu: x @ Wg has a NaN or +inf gate (non-finite x or Wg)")
    return packed.view(torch.uint32), stat[:M] != 0


# ------------------------------------------------------------------------------------------
# 6d. The consumer: y = sum over a row's stored entries of g_j (x . Wu[:, j]) Wd[j, :]
#
# One program per row, the row's x and y [d] in registers (float32). The stored entries are
# spread over nT slots (words 1..count of each); the program walks them E at a time, in order,
# without writing a list anywhere: from the counts c[t] and their running sum end[t], entry e
# (0-based over the row) lies in tile ti = #{t : end[t] <= e}, at word 1 + e - sum of c over the
# tiles before ti. Both are sums over the NT tiles, cheap next to the [E, d] weight reads.
#
#     c = packed[m, t W] for every tile t;  end = cumsum(c);  n = end[-1]
#     (an overflowing row: n = 0 and y = NaN, overwritten by the hybrid route; it takes
#      slot = counter++ of the hybrid buffer, Rows[slot] = m when slot < cap)
#     words = the words of entries 0 .. E - 1
#     for e0 in range(0, n, E):
#         j = words & 0xFFFF;  g = high half of words          # [E]
#         issue the loads of E rows of WuT [f, d] and of Wd [f, d], rows j
#         words = the words of entries e0 + E .. e0 + 2E - 1  # in flight during the sums below
#         u = bf16(Wu^T[j] . x)                     # [E]
#         h = bf16(g u)                             # [E]
#         y += sum over the E entries of h Wd[j]    # [d]
#     y = bf16(y)
#
# Its time is not memory's: on an H200 it took the same time when every column was folded onto 8
# neurons, whose 64 KB of weight rows stay in L1, as on the real columns (3.27-3.35 against
# 3.29-3.31 ms, notes/twell.md). x, y and the weight rows are held as even and odd columns, [BD2] each:
# for even d a pair of bf16 columns is one 32-bit word, turned into two float32 by one
# instruction each (_pairs; odd d reads them one bf16 at a time), and u sums
# fma(even, x_even, odd x_odd) over the pairs.
#
# Bytes per row: 2 n d bf16 weights (a few MB of hot rows stay in L1 and L2; all of Wu and Wd
# is 46 MB at d 2048, f 5632, within an H200's L2) + x and y (4 d) + nT + n words. FLOPs 4 n d.
# At n = 30, d = 2048: 246 KB of weight rows and 0.25 MFLOP per row, where the dense FFN's
# up and down matmuls do 4 f d = 46 MFLOP.
# ------------------------------------------------------------------------------------------


@jit
def _pairs(Base, j, emask, i2, d: tl.constexpr):
    """Rows j of a bf16 matrix [., d] (row j at Base + j d), as two float32 tiles [E, BD2]: the
    even columns 2 i2 and the odd ones 2 i2 + 1 (0 where emask is false or past d).

    A bf16 becomes a float32 by moving its 16 bits to the high half. For even d a pair of columns
    is one 32-bit word w, and that takes one instruction per value: w << 16 (the even column, the
    low half) and w & 0xFFFF0000 (the odd one). Triton's own bf16 -> float32 of a loaded pair
    spends two on the high half (NVIDIA H200, offline SASS). Odd d: two bf16 loads.
    Precondition for even d: Base is 4-byte aligned (then so is every row; _consume ensures it).
    """
    if d % 2 == 0:
        w = tl.load(Base.to(tl.pointer_type(tl.int32)) + j[:, None] * (d // 2) + i2[None, :],
                    mask=emask[:, None] & (i2 < d // 2)[None, :], other=0)
        return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
    row = Base + j[:, None] * d + 2 * i2[None, :]
    lo = tl.load(row, mask=emask[:, None] & (2 * i2 < d)[None, :], other=0.0)
    hi = tl.load(row + 1, mask=emask[:, None] & (2 * i2 + 1 < d)[None, :], other=0.0)
    return lo.to(tl.float32), hi.to(tl.float32)


@jit
def _entry_words(row, t0, e, n, end, c, W: tl.constexpr):
    """The words of a row's entries e [E] (0 past the last, n), read from the slots of the NTB
    tiles from t0 on, whose counts are c [NTB] and running sums end [NTB] (as in the pseudo-code)."""
    before = end[None, :] <= e[:, None]  # [E, NTB] tiles wholly before entry e
    ti = tl.sum(before.to(tl.int32), axis=1)  # [E] entry e's tile
    skip = tl.sum(tl.where(before, c[None, :], 0), axis=1)  # [E] entries in the tiles before it
    return tl.load(row + (t0 + ti) * W + 1 + (e - skip), mask=e < n, other=0)


@jit
def _twell_consume_kernel(
    X,  # pointer to x [M, d] bf16; row m at X + m * stride_xm, entries contiguous
    WuT,  # pointer to Wu transposed [f, d] bf16, contiguous: neuron j's column at WuT + j d
    Wd,  # pointer to Wd [f, d] bf16, contiguous: neuron j's row at Wd + j d
    Packed,  # pointer to packed [M, NT W] int32, contiguous
    Stat,  # pointer to int32 [M + 3]: [0, M) overflow flags (such rows are skipped), [M] the
    #        counter of overflowing rows (zeroed; each adds itself here)
    Rows,  # pointer to int32 [cap]: the hybrid buffer's row ids, slot by slot (written here)
    Y,  # pointer to y [M, d] bf16; row m at Y + m * stride_ym
    M,  # number of rows
    f,  # FFN width: a column >= f is never read (only a foreign packed tensor could hold one)
    stride_xm,  # elements from one row of x to the next
    stride_ym,  # elements from one row of y to the next
    cap,  # hybrid buffer slots
    d: tl.constexpr,  # model width
    BD2: tl.constexpr,  # pairs of columns, ceil(d / 2) rounded up to a power of two
    W: tl.constexpr,  # words per slot
    NT: tl.constexpr,  # tiles per row
    NTB: tl.constexpr,  # tiles read at once (a power of two)
    E: tl.constexpr,  # entries handled at once
):
    m = tl.program_id(0).to(tl.int64)
    i2 = tl.arange(0, BD2)  # [BD2] column pairs: columns 2 i2 (even) and 2 i2 + 1 (odd)
    over = tl.load(Stat + m) != 0  # this row overflows: the hybrid route computes it
    # its slot in the hybrid buffer: one scalar atomic per overflowing row (past cap: counted only)
    slot = tl.atomic_add(Stat + M, 1, mask=over)
    tl.store(Rows + slot, m.to(tl.int32), mask=over & (slot < cap))
    # x and y [d] in registers (float32) as even and odd halves [BD2], the halves of each weight row
    xe = tl.load(X + m * stride_xm + 2 * i2, mask=2 * i2 < d, other=0.0).to(tl.float32)
    xo = tl.load(X + m * stride_xm + 2 * i2 + 1, mask=2 * i2 + 1 < d, other=0.0).to(tl.float32)
    ye = tl.zeros((BD2,), dtype=tl.float32)
    yo = tl.zeros((BD2,), dtype=tl.float32)
    row = Packed + m * (NT * W)  # the row's first word
    for t0 in range(0, NT, NTB):
        tt = t0 + tl.arange(0, NTB)  # [NTB] tiles
        c = tl.load(row + tt * W, mask=(tt < NT), other=0)  # [NTB] count words
        c = tl.where(over, 0, c)  # an overflowing row holds no entry for us
        end = tl.cumsum(c, axis=0)  # [NTB] entries up to and including tile tt
        n = tl.sum(c, axis=0)
        words = _entry_words(row, t0, tl.arange(0, E), n, end, c, W)  # [E] the first E entries
        for e0 in range(0, n, E):
            e = e0 + tl.arange(0, E)  # [E] entry numbers within these tiles
            j = (words & 0xFFFF).to(tl.int64)  # [E] columns
            g = (words & -65536).to(tl.float32, bitcast=True)  # [E] bf16 values (the high half; 0 past n)
            wmask = (e < n) & (j < f)  # [E]
            # both weight tiles are issued before the sums, so their reads overlap, and so is the
            # next step's words' read
            wue, wuo = _pairs(WuT, j, wmask, i2, d)  # [E, BD2] twice
            wde, wdo = _pairs(Wd, j, wmask, i2, d)  # [E, BD2] twice
            words = _entry_words(row, t0, e + E, n, end, c, W)
            # u_j = x . Wu[:, j];  h_j = g_j u_j   (each rounded to bf16, as torch's bf16 FFN)
            u = _bf16_round(tl.sum(tl.fma(wue, xe[None, :], wuo * xo[None, :]), axis=1))  # [E]
            h = _bf16_round(g * u)[:, None]  # [E, 1]; 0 for masked entries (g = 0)
            # y += sum_j h_j Wd[j, :]
            ye += tl.sum(h * wde, axis=0)  # [BD2]
            yo += tl.sum(h * wdo, axis=0)
    # NaN until the hybrid route writes the row; exact in bf16: y is bf16-valued
    ye = tl.where(over, float("nan"), _bf16_round(ye))
    yo = tl.where(over, float("nan"), _bf16_round(yo))
    tl.store(Y + m * stride_ym + 2 * i2, ye.to(Y.dtype.element_ty), mask=2 * i2 < d)
    tl.store(Y + m * stride_ym + 2 * i2 + 1, yo.to(Y.dtype.element_ty), mask=2 * i2 + 1 < d)


def _consume(xs, packed, stat, WuT, Wd, tile, C, cap):
    """Launch the consumer. xs [M, d] rows, packed int32 [M, nT W], stat int32 [M + 3].
    -> y [M, d] bf16, rows int32 [max(cap, 1)] (the hybrid buffer's row ids)"""
    (M, d), f = xs.shape, Wd.shape[0]
    nT, W = spark._twell_sizes(f, tile, C)
    y = torch.empty(M, d, dtype=torch.bfloat16, device=xs.device)
    rows = torch.empty(max(cap, 1), dtype=torch.int32, device=xs.device)  # slots >= the count are never read
    # _pairs reads two bf16 as one 32-bit word: the weights must start on 4 bytes (a view that
    # starts at an odd element does not; it is copied, never read misaligned)
    WuT, Wd = (w if w.data_ptr() % 4 == 0 else w.clone() for w in (WuT, Wd))
    _twell_consume_kernel[(M,)](xs, WuT, Wd, packed, stat, rows, y, M, f, xs.stride(0), y.stride(0), cap,
                                d=d, BD2=triton.next_power_of_2((d + 1) // 2), W=W, NT=nT,
                                NTB=min(triton.next_power_of_2(nT), CONSUME_NTB_MAX),
                                **(CONSUME_FEW_CFG if M < CONSUME_FEW_ROWS else CONSUME_CFG))
    return y, rows


def twell_consume_gpu(x, packed, overflow, WuT, Wd, tile=256, C=8):
    """The consumer alone.   x [..., d], packed uint32 [M, nT W], overflow bool [M] -> y [..., d] bf16

    WuT [f, d] and Wd [f, d] as prepare_twell_gpu returns them. packed may come from any TwELL
    producer (spark.twell_pack, twell_gate_pack_gpu): rows without overflow get
    y = sum_j g_j (x . Wu[:, j]) Wd[j], rows with overflow are NaN (this function has no dense
    route: twell_ffn_gpu has). A count above the capacity or a column >= f is an error
    (torch._assert_async, as spark.twell_unpack's); such a word is never read.
    """
    _check_bf16("WuT", WuT, 2)
    _check_bf16("Wd", Wd, 2)
    f, d = WuT.shape
    xs = _x_rows(x, d, "WuT.shape[1]")
    nT, W = spark._twell_sizes(f, tile, C)  # any tile and C of the format (the producer's limits do not apply)
    M = xs.shape[0]
    if Wd.shape != (f, d):
        raise ValueError(f"Wd must be [f, d] = {[f, d]} (WuT's shape), got {tuple(Wd.shape)}")
    if not (isinstance(packed, torch.Tensor) and packed.dtype == torch.uint32 and packed.shape == (M, nT * W)):
        raise ValueError(f"packed must be a uint32 tensor [M, nT W] = {[M, nT * W]} (f={f}, tile={tile}, C={C}), "
                         f"got {getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
    if not (isinstance(overflow, torch.Tensor) and overflow.dtype == torch.bool and overflow.shape == (M,)):
        raise ValueError(f"overflow must be a bool tensor [M] = [{M}], got {getattr(overflow, 'dtype', type(overflow))} "
                         f"{tuple(getattr(overflow, 'shape', ()))}")
    _check_same_device("x", x, packed=packed, overflow=overflow, WuT=WuT, Wd=Wd)
    if M == 0:
        return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    p = packed.view(torch.int32).contiguous()
    # the check spark.twell_unpack makes: counts <= W - 1, and held columns < f
    s = p.view(M, nT, W)
    held = torch.arange(1, W, device=p.device) <= s[..., :1]
    torch._assert_async(((s[..., 0] >= 0) & (s[..., 0] <= W - 1)).all() & (~held | ((s[..., 1:] & 0xFFFF) < f)).all(),
                        "twell_consume_gpu: packed has a count above the capacity tile/C - 1, or a column >= f")
    stat = torch.cat([overflow.to(torch.int32), overflow.new_zeros(3, dtype=torch.int32)])  # flags, counters
    y, _ = _consume(xs, p, stat, WuT.contiguous(), Wd.contiguous(), tile, C, 0)
    return y.view(x.shape)


# ------------------------------------------------------------------------------------------
# 6e. The hybrid route: the dense FFN on the overflowing rows, in a buffer of cap rows
#
# The consumer left the overflowing rows' ids in Rows[0 .. k) and k in Stat[M]. Two matmul
# kernels over a grid sized for cap rows; a program whose block of slots starts at or past
# min(k, cap) exits at once (the count is read on the device, so the host never waits):
#     H[s] = bf16(bf16(relu(x[Rows[s]] Wg)) * bf16(x[Rows[s]] Wu))       s < min(k, cap)
#     y[Rows[s]] = bf16(H[s] Wd)
#     ok = (k <= cap and no NaN / inf gate)       (program (0, 0) of the second kernel, the last one)
# FLOPs 6 d f per overflowing row, as the dense FFN; H is cap f bf16 (2.9 MB per 256 rows at
# f 5632). They run after the consumer, which wrote NaN into these rows.
# ------------------------------------------------------------------------------------------


@jit
def _twell_dense_h_kernel(
    X,  # pointer to x [M, d] bf16; row m at X + m * stride_xm, entries contiguous
    Wg,  # pointer to Wg [d, f] bf16, contiguous
    WuT,  # pointer to Wu transposed [f, d] bf16, contiguous
    H,  # pointer to the buffer h [cap, f] bf16, contiguous
    Stat,  # pointer to int32 [M + 3]: [M] is k, the number of overflowing rows
    Rows,  # pointer to int32 [cap]: slot s holds an overflowing row's id
    M,  # number of rows
    d,  # model width
    f,  # FFN width
    stride_xm,  # elements from one row of x to the next
    cap,  # buffer slots
    BM: tl.constexpr,  # slots per program
    BN: tl.constexpr,  # columns of f per program
    BK: tl.constexpr,  # entries of d per matmul step
    WIDEN: tl.constexpr,  # the interpreter's float32 dot (see _dot_tile)
):
    n = tl.minimum(tl.load(Stat + M), cap)  # slots in use
    if tl.program_id(1) * BM < n:  # else: nothing here (the common case), exit
        s = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM] slots
        smask = s < n
        rows = tl.load(Rows + s, mask=smask, other=0).to(tl.int64)  # [BM] their rows of x
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cols < f
        gate = _dot_tile(X, Wg, rows, smask, cols, cmask, d, stride_xm, f, 1, BM, BN, BK, WIDEN)  # x Wg
        up = _dot_tile(X, WuT, rows, smask, cols, cmask, d, stride_xm, 1, d, BM, BN, BK, WIDEN)  # x Wu (B = WuT read transposed)
        # h = bf16(bf16(relu(gate)) * bf16(up)); relu keeps a NaN, as torch's does
        h = _bf16_round(_bf16_round(tl.where(gate < 0, 0.0, gate)) * _bf16_round(up))
        tl.store(H + s.to(tl.int64)[:, None] * f + cols[None, :], h.to(H.dtype.element_ty),
                 mask=smask[:, None] & cmask[None, :])


@jit
def _twell_dense_y_kernel(
    H,  # pointer to the buffer h [cap, f] bf16, contiguous
    Wd,  # pointer to Wd [f, d] bf16, contiguous
    Y,  # pointer to y [M, d] bf16; row m at Y + m * stride_ym
    Stat,  # pointer to int32 [M + 3]: [M] is k, the number of overflowing rows, [M + 1] the
    #        NaN / inf gates, [M + 2] where the ok word goes
    Rows,  # pointer to int32 [cap]: slot s holds an overflowing row's id
    M,  # number of rows
    d,  # model width
    f,  # FFN width (the summed length)
    stride_ym,  # elements from one row of y to the next
    cap,  # buffer slots
    BM: tl.constexpr,  # slots per program
    BN: tl.constexpr,  # columns of d per program
    BK: tl.constexpr,  # entries of f per matmul step
    WIDEN: tl.constexpr,  # the interpreter's float32 dot (see _dot_tile)
):
    k = tl.load(Stat + M)  # overflowing rows (final: the consumer, an earlier launch, counted them)
    n = tl.minimum(k, cap)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(Stat + M + 2, ((k <= cap) & (tl.load(Stat + M + 1) == 0)).to(tl.int32))
    if tl.program_id(1) * BM < n:
        s = tl.program_id(1) * BM + tl.arange(0, BM)
        smask = s < n
        rows = tl.load(Rows + s, mask=smask, other=0).to(tl.int64)
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cols < d
        acc = _dot_tile(H, Wd, s.to(tl.int64), smask, cols, cmask, f, f, d, 1, BM, BN, BK, WIDEN)  # [BM, BN] h Wd
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], _bf16_round(acc).to(Y.dtype.element_ty),
                 mask=smask[:, None] & cmask[None, :])


def _hybrid(xs, Wg, WuT, Wd, stat, rows, y, cap):
    """Launch the two dense kernels over a grid for cap rows; they write y's overflowing rows and
    the ok word (the second one always runs, with one block of slots when cap = 0)."""
    (M, d), f = xs.shape, Wg.shape[1]
    h = torch.empty(max(cap, 1), f, dtype=torch.bfloat16, device=xs.device)  # fixed size: no host wait
    cfg = dict(DENSE_CFG, WIDEN=xs.device.type != "cuda")
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    blocks = max(1, triton.cdiv(cap, BM))
    if cap > 0:
        _twell_dense_h_kernel[(triton.cdiv(f, BN), blocks)](
            xs, Wg, WuT, h, stat, rows, M, d, f, xs.stride(0), cap, BM=BM, BN=BN, **cfg)
    _twell_dense_y_kernel[(triton.cdiv(d, BN), blocks)](
        h, Wd, y, stat, rows, M, d, f, y.stride(0), cap, BM=BM, BN=BN, **cfg)


# ------------------------------------------------------------------------------------------
# 6f. The whole FFN
# ------------------------------------------------------------------------------------------


def twell_ffn_gpu(x, Wg, Wu, Wd, tile=256, C=8, *, cap=None, WuT=None):
    """spark.twell_ffn in Triton: the ReLU-gated FFN through TwELL, hybrid routing included.   x [..., d] -> y [..., d] bf16

    x, Wg [d, f], Wu [d, f], Wd [f, d] bf16 on one device; any d, any f <= 65536, any number of
    rows (one token included). Five kernels (after zeroing M + 3 counters), no host synchronisation:
        producer (packed words, overflow flags)
        consumer (rows without overflow; NaN in the others, whose ids it lists for the hybrid route)
        hybrid: dense h, then dense y, for the overflowing rows (programs past their count exit);
            the second writes the ok word
        torch._assert_async on the ok word
    cap: rows the hybrid route can hold (default min(M, max(64, ceil(M / 16)))). More
    overflowing rows than cap, or a NaN / inf gate, raises: at once on the CPU, at the next
    synchronisation on a GPU (section 6's comment, "Errors without a host wait"); never a silently dropped row.
    WuT: prepare_twell_gpu(Wg, Wu, Wd)[1], Wu transposed once; without it each call transposes Wu.
    """
    _check_bf16("Wg", Wg, 2)
    xs = _x_rows(x, Wg.shape[0], "Wg.shape[0]")
    _check_same_device("x", x, Wg=Wg)
    M, (d, f) = xs.shape[0], Wg.shape
    if WuT is None:
        Wg, WuT, Wd = prepare_twell_gpu(Wg, Wu, Wd)
    else:
        for name, w, shape in (("Wu", Wu, (d, f)), ("WuT", WuT, (f, d)), ("Wd", Wd, (f, d))):
            _check_bf16(name, w, 2)
            if tuple(w.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} (Wg is [d, f] = {[d, f]}), got {tuple(w.shape)}")
        _check_same_device("x", x, Wu=Wu, WuT=WuT, Wd=Wd)
        Wg, WuT, Wd = Wg.contiguous(), WuT.contiguous(), Wd.contiguous()
    _check_tile(f, tile, C)
    if cap is None:
        cap = min(M, max(CAP_MIN, -(-M // CAP_DIV)))
    spark._check_int("cap", cap, 0)
    if M == 0:
        return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    packed, stat = _produce(xs, Wg, tile, C)
    y, rows = _consume(xs, packed, stat, WuT, Wd, tile, C, cap)
    _hybrid(xs, Wg, WuT, Wd, stat, rows, y, cap)
    torch._assert_async(stat[M + 2], f"twell_ffn_gpu: more rows overflowed a tile than cap = {cap} holds (pass a "
                        f"larger cap), or x @ Wg has a NaN or +inf gate (non-finite x or weights)")
    return y.view(x.shape)


# ------------------------------------------------------------------------------------------
# 7. Spark decoding: the FFN and attention kernels of one new token, dense flash-decoding, and a
#    whole spark.GPT decoding inside a CUDA graph
# ------------------------------------------------------------------------------------------
# The Spark Transformer (arXiv 2506.06644; notes/papers.md, "Spark's headline results") decodes up
# to 1.40x faster on a GPU with kernels that are not public. Decoding one token is memory-bound:
# a layer costs the bytes of weights and cache it reads. Spark's sparsity pays only if a kernel
# reads the predictor in full and then *only* the rows of the survivors, with no host round trip
# and no sort in between. The kernels here do that:
#
#     spark_ffn_decode_gpu(x, K1, K2t, V, k, r)         reference: spark.spark_ffn_np
#         _ffn_moments_kernel: mean and variance of p from x[:r] alone (moments of K1 computed
#                              once by prepare_spark_ffn_gpu), as partial sums;
#         _ffn_sparse_kernel:  a slice of p = x[:r] K1, theta from the partial sums, then
#                              u = x[r:] . K2t[j] and y_slice = sum_j gelu(p_j - theta) u_j V[j]
#                              over the survivors only;
#         _ffn_reduce_kernel:  y = sum of the slices' partial y, in a fixed order (NaN rows for
#                              tokens whose x is not finite).
#     spark_attention_decode_gpu(q, k1, k2, v, k_top, r)   reference: spark.spark_attention_np, T = 1
#         _spark_scores_kernel: s_j = q[:r] . K1_j / sqrt(r), the cache split over all SMs;
#         _spark_select_kernel: the kt-th largest score per query head by a search over an
#                               interval of order keys that starts from a statistical guess, the
#                               kept tokens compacted (cumsum); past 8192 tokens in two passes;
#                               with few query heads its last pass then reads K2 and V of the
#                               kept tokens only, partial (m, l, acc) per chunk of the list;
#         _spark_gather_kernel: the same reads and partials after the select, with many heads;
#         _decode_merge_kernel: out = sum acc / sum l (flash-decoding's merge).
#     attention_decode_gpu(q, k, v)                     reference: spark.attention_np, T = 1
#         _attn_split_kernel + _decode_merge_kernel: dense flash-decoding, the same skeleton.
#     generate_gpu(model, idx, max_new_tokens, ...)     reference: spark.GPT.generate
#         every decode step one CUDA graph replay (static KV buffers, positions on the device).
#     bench_decode(quick=False)                         the benchmark rows spark_ffn_decode/...,
#         spark_attention_decode/..., decode_model/... (CUDA only; checked before timed).
# tests/test_kernels_gpu_decode.py runs the kernels in Triton's interpreter on the CPU and on a GPU.
#
# Dimension letters (kernels_cpu.py's): d model width, f FFN neurons, r predictor slice, k target
# survivors per token, M tokens in one call (at most MAX_TOKENS per launch), B batch, H query heads,
# Hkv KV heads, G = H // Hkv, hd head size, n cached tokens (capacity of the cache tensors), kt =
# min(k_top, visible tokens). Tile letters: BI, BJ the moments kernel's tile of R; BR input dims
# per step of p; FS neurons per sparse program; E rows gathered at once; BK, BD chunks of a row;
# CH cache tokens per split, BN keys per tile; MP, GP token / head rows padded to 16 (tl.dot's
# smallest M), MT tokens padded to a power of two.
#
# Choices
# - float32, bfloat16 or float16 (x and the weights, or q and the cache, share one dtype); every
#   sum, statistic, score, softmax and gate in float32. Under Triton's interpreter all tl.dot run
#   in float32 (kernels_gpu._dot). float64 is refused (the references run it).
# - No host synchronisation anywhere (every size the host uses is a shape; the numbers of
#   survivors, of kept tokens and of visible tokens live on the device), so each public function
#   can be captured in a CUDA graph. Deterministic: no floating-point atomics; every sum runs in
#   an order fixed by the shapes and the data, so two runs give the same bits.
# - Several tokens in one FFN call gather the UNION of their survivors (a row is loaded when any
#   token keeps it; a token's non-survivors inside it get a = 0). Cost: each union row is read once
#   for all tokens, so the rows read grow as f (1 - (1 - k/f)^M): 8 %, 15 %, 28 %, 49 % of f at M
#   = 1, 2, 4, 8 (k/f = 8 %, independent tokens); walking each token's own list instead would read
#   M k rows (8, 16, 32, 64 %), worse unless the rows of different tokens share L2.
# - Spark attention keeps EXACTLY kt tokens per query head, as the reference: all scores above the
#   kt-th largest value v, then those equal to v in position order (lowest positions first) until
#   kt are kept. The reference (exact_topk_np: argpartition) keeps an arbitrary kt of a tie, so
#   with ties only outputs that do not depend on the choice are comparable (tests: tied tokens
#   with equal keys and values). Scores are float32: two keys whose float64 scores differ by less
#   than a float32 rounding may swap places at the kt-th rank.
# - A query sees `lengths[b]` tokens of its sequence's cache (a device tensor, for a decoder whose
#   cache is a preallocated buffer), all n by default; lengths outside [1, n] are an error raised
#   by a device-side check (reading them on the host would be a synchronisation), and the kernels
#   also clamp them to [1, n], so no kernel reads past the cache before that error surfaces.
# - Non-finite inputs: a token whose x holds NaN or +-inf gets an all-NaN row of y (as
#   spark.spark_ffn_np). A query head whose scores hold NaN gets NaN (nothing is kept); the
#   selection orders floats by their bits, so scores must otherwise be finite.
# - Scratch tensors come from torch's caching allocator on every call (inside a CUDA graph, from
#   its private pool): no global state, so concurrent calls on different streams are safe.
# Performance: bench_decode's H200 rows are in notes/kernels_gpu.md. In short, at one token these
# kernels read up to 3.3-3.8x fewer bytes than dense decoding (less at several tokens and short
# caches), but their time is in chains of dependent steps, not in bytes: the FFN at one token is
# 2.21x faster than torch's dense GeGLU (byte limit 3.3x with the moments); Spark attention, its
# select taking ~8 us of ~19 at 8192 tokens, is slower than dense flash-decoding up to 8192
# tokens (0.61-0.96x; 1.21x SDPA at 8192) and faster than both from 16384 on (1.32x and 1.69x
# at 32768); a whole Gemma-2-2B-shaped model decodes 1.29x faster than the dense one (one run
# of the final kernels; the notes give the ranges over runs).


# ------------------------------------------------------------------------------------------
# 7a. Launch settings (the FFN's from a sweep on an NVIDIA H200, 132 SMs; the attention's kept
#    after the sweeps of notes/kernels_gpu.md; tests lower some of them to exercise several
#    splits and chunks at small shapes) and argument checks
# ------------------------------------------------------------------------------------------

MAX_TOKENS = 8  # tokens per FFN launch (MP = 16 rows of tl.dot); more tokens: one launch per 8
FFN_BI, FFN_BJ = 16, 1024  # moments kernel: BI rows of R per program (64 programs at r = 1024), BJ columns per step
FFN_BR, FFN_STAGES = 128, 3  # sparse kernel: input dims per step of p, pipeline stages
FFN_FS1, FFN_E, FFN_WARPS1 = 64, 8, 4  # one token: neurons and warps per program (216 at f = 13824, ~5 survivors), rows at once
FFN_FS, FFN_BK, FFN_WARPS = 128, 256, 8  # several tokens: neurons per program (108), chunk of a K2t / V row, warps
FFN_RB = 32  # columns per reduce program (72 programs at d = 2304)
TARGET_PROGRAMS = 264  # attention splits aim at two programs per SM of an H200
MIN_SPLIT = 64  # at least this many cache tokens per split
ATTN_BN = 32  # keys per tile in the split kernels
GATHER_E = 16  # kept tokens attended per program (kt 256 -> 16 programs per query head)
ATTEND_PROGRAMS = 128  # the select attends itself when its programs number at most this (an H200 has 132 SMs)
SELECT_SPLIT, SELECT_PARTS = 8192, 8  # longer caches are selected in two passes, the first over 8 parts
MAX_SELECT_IN_REGISTERS = 32768  # a query head's scores held at once by the select kernel
SELECT_CHUNK = 4096  # longer caches: chunks re-read from L2 for every step of the search
COMPACT_CHUNK = 8192  # the select kernel's compaction holds at most this many scores at once
FIT_STEPS = 8  # the select's sweeps 1 .. FIT_STEPS - 1 may place their candidates by a fit, later ones not


# Programmatic dependent launch (CUDA's PDL, Hopper and later). A decode step is a chain of short
# kernels, each reading what the one before wrote. Launched plainly, a kernel's programs are
# placed on the SMs only once the previous kernel has finished, and the GPU idles meanwhile.
# Launched with launch_pdl=True, a kernel may be placed as soon as every program of the previous
# one has said so (gdc_launch_dependents) and then waits (gdc_wait) until that kernel has finished
# and its writes are visible. Every load of what an earlier kernel of the chain wrote, and every
# store, comes after the wait (before it, a kernel reads only weights and inputs that were
# complete before the previous kernel started), so results are those of plain launches; only
# the placing overlaps.
#     PDL = 2 (inside a chain): say "place the next" at once, then wait
#     PDL = 1 (a chain's last kernel): wait only; the next is placed as this one exits
# Why the last kernel waits to be done: what follows it is not part of the chain, and placed
# early it can get in the way. In back-to-back Spark attention calls, a merge that let the next
# call's score kernel be placed at once made every call slower (26.8 against 23.3 us at 8192
# tokens on an H200; our reading: that kernel's 264 programs were then placed on SMs still busy
# with the gather, unevenly); after the FFN's reduction, back-to-back FFN calls went from 24.5 to
# 33.1 us (a whole model gained 1 %). USE_PDL = False gives plain launches.
USE_PDL = True


def _pdl(x, last=False):
    """The launch arguments of a decode kernel on x's device: PDL where the GPU has it (above)."""
    on = (USE_PDL and gdc_wait is not None and x.is_cuda and torch.version.hip is None
          and torch.cuda.get_device_capability(x.device)[0] >= 9)  # (NVIDIA Hopper and later only)
    return {"PDL": 1 if last else 2, "launch_pdl": True} if on else {"PDL": 0}


@jit
def _wait_previous(PDL: tl.constexpr):
    """A decode kernel's first statement (PDL as _pdl gives it; 0: nothing, stream order waits)."""
    if PDL == 2:
        gdc_launch_dependents()
    if PDL >= 1:
        gdc_wait()


def _shapes(**tensors):
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())


# ------------------------------------------------------------------------------------------
# 7b. Spark FFN decode (Spark Transformer, arXiv 2506.06644; notes/papers.md, "Spark FFN").
#    Reference: spark.spark_ffn_np(x, K1, K2, V, k, r) with K2 = K2t^T.
#
#    p = x[:r] K1;  theta = mean(p) + std(p) Q(1 - k/f);  t = max(p - theta, 0)
#    y = sum over survivors j (p_j > theta) of gelu(t_j) (x[r:] . K2t[j]) V[j]
#
#    The lesson of this section: theta does not need p. The mean and the variance of p over the
#    f neurons are a linear and a quadratic function of x1 = x[:r], with coefficients that depend
#    on K1 only, so they are computed once when the weights are prepared:
#        mean(p) = x1 . mu,                 mu = K1's row means (mu_i = mean_j K1[i, j])  [r]
#        var(p)  = |R x1|^2,                R^T R = (K1 - mu)(K1 - mu)^T / f             [r, r]
#    R is the triangular factor of a QR decomposition of (K1 - mu)^T / sqrt(f), taken in float64.
#    var(p) is then a sum of squares: never negative, no cancellation, and only R's upper
#    triangle is read (r^2 / 2 float32 values, 2 MB at r = 1024, against K1's 28 MB).
#    So one kernel can compute its slice of p, threshold it and gather its survivors' rows at once:
#    no second launch waits for all of p. (The programs stream K1 in step and then all gather, so
#    on an H200 the gathers overlap little with the streaming: notes/kernels_gpu.md.)
#
#    Bytes read (weights): r f + m (d - r) + m d values (+ 2 r^2 bytes: R's triangle in float32),
#    m the (union of) survivors, vs 3 d f_gated for the dense gated FFN of equal parameters: at
#    Gemma-2 2B shapes (d 2304, f 13824, r 1024, k 1106) 18.1 M values + 2.1 MB vs 63.7 M values:
#    a 3.32x byte limit (3.52x without R). FLOPs 2 x the weights read (x M).
#
#    Three kernels, no host synchronisation, deterministic:
#
#    _ffn_moments_kernel (one program per BI rows of R; PDL: waits for x, then lets the next kernel start):
#        part[b] = (x1[rows] . mu[rows],  sum over its rows i of (R[i, i:] . x1[i:])^2)
#    _ffn_sparse_kernel (one program per FS neurons):
#        p = X[:, :r] @ K1[:, slice]                           # tl.dot, tokens padded to 16 rows; the
#                                                              # slice is one contiguous block (K1 is
#                                                              # stored as K1^T [f, r])
#        (PDL: only now wait for the moments)
#        theta = sum_b part[b, 0] + q sqrt(sum_b part[b, 1])   # every program the same bits
#        keep = p > theta;  listed_j = any token keeps j       # the union over tokens
#        u = X[:, r:] @ K2t[listed]^T                          # loads of unlisted rows are masked off
#        a = gelu(where(keep, p - theta, 0)) * u               # 0 where a token does not keep j
#        y_part[slice] = a @ V[listed]                         # (one token: E listed rows at a time)
#    _ffn_reduce_kernel (one program per FFN_RB columns and token):
#        y = sum over the programs of y_part, in program order; a NaN row where x is not finite
#
#    Why per-slice partial y rather than one list of survivors: a global list needs the survivors'
#    count of every earlier slice (a second launch, or atomics whose order changes from run to
#    run). The price is the partial y of every slice: 2 NS M d float32 values written and read
#    (216 x 2304 x 8 bytes = 4 MB per token at Gemma-2 2B shapes, from L2).
# ------------------------------------------------------------------------------------------


def prepare_spark_ffn_gpu(K1, K2, V):
    """Re-lay Spark FFN weights for decoding, once: K1 [r, f], K2 [d-r, f], V [f, d]
    (spark.SparkFFN's parameters) -> (K1 [r, f], K2t [f, d-r], V [f, d]), detached, in the order
    spark_ffn_decode_gpu takes them, every matrix neuron-major: K2 is stored transposed, so that
    neuron j's weights are one contiguous row (a gathered row is then whole cache lines), and K1
    is a [r, f] view of a contiguous K1^T [f, r], so that a program's slice of neurons is one
    contiguous block (on an H200 that made the whole FFN 2-5 % faster than a contiguous
    [r, f], at 1 to 8 tokens). K2t and V are contiguous. K1 and K2 are copies unless already laid
    out so (r f and (d - r) f values, 28 and 35 MB a layer at Gemma-2 2B shapes in bf16); V is
    shared when contiguous. The returned K1
    carries p's moments (above) as K1.spark_moments = (mu [r], R [min(r, f), r], K1's version),
    float32; spark_ffn_decode_gpu refuses a K1 without them or changed in place since (through
    torch's version counter: a write that bypasses it, such as K1.data.copy_(...) or a write to
    the module's parameter through its .data, is not seen; prepare again after changing K1).
    R is stored whole, [min(r, f), r] (4 MB at r = 1024), though the kernels read its upper
    triangle only. A K1 holding NaN or +-inf is refused (its moments would be NaN for every x).
    """
    _check_inputs("prepare_spark_ffn_gpu", False, K1=K1, K2=K2, V=V)  # (any strides: we copy)
    if K1.dim() != 2 or K2.dim() != 2 or K2.shape[1] != K1.shape[1] or V.shape != (K1.shape[1], K1.shape[0] + K2.shape[0]):
        raise ValueError(f"prepare_spark_ffn_gpu: expected K1 [r, f], K2 [d-r, f], V [f, d]; got {_shapes(K1=K1, K2=K2, V=V)}")
    K1p = K1.detach().t().contiguous().t()  # strides (1, r) for r > 1 (a new tensor object, even when it shares K1's storage)
    if not torch.isfinite(K1p).all():
        raise ValueError("prepare_spark_ffn_gpu: K1 holds NaN or +-inf")
    f = K1p.shape[1]
    K = K1p.double()
    mu = K.mean(dim=1)  # [r]
    # (K1 - mu)^T / sqrt(f) = Q R: R^T R = (K1 - mu)(K1 - mu)^T / f, R upper triangular [min(f, r), r]
    R = torch.linalg.qr((K - mu[:, None]).t() / f ** 0.5, mode="r")[1]
    K1p.spark_moments = (mu.float(), R.float().contiguous(), K1p._version)
    return K1p, K2.detach().t().contiguous(), V.detach().contiguous()


# Kernel 1: the two moments of p, as partial sums over blocks of BI rows of R (and of mu). Row i
# of R is zero left of the diagonal, so a program reads R[rows, rows[0]:] only: the upper
# triangle, r^2 / 2 values. A program's rows are few (BI = 16) and the tokens at most 8, so the
# products are broadcasts on the CUDA cores, float32 throughout (no tensor-core rounding).
#     for each chunk of BJ columns from rows[0]:  z[m, i] += sum_j R[i, j] x1[m, j]
#     part[b, m] = (sum_i x1[m, i] mu[i],  sum_i z[m, i]^2)
@jit
def _ffn_moments_kernel(
    X,  # pointer to x [M, d]; token m at X + m * stride_xm, entries contiguous
    Mu,  # pointer to mu [r] float32
    Rm,  # pointer to R [NR, r] float32, contiguous, zero below the diagonal
    Part,  # pointer to the partial moments [NBM, M, 2] float32 (written)
    stride_xm,  # elements from one token of x to the next
    M,  # tokens
    NR,  # rows of R, min(r, f)
    R: tl.constexpr,  # r
    MT: tl.constexpr,  # tokens padded to a power of two
    BI: tl.constexpr,  # rows of R per program
    BJ: tl.constexpr,  # columns per step
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    # x must be complete before the next kernel starts (it reads x before its own wait): so wait
    # first, then let it be placed. (PTX promises the visibility of a finished kernel's writes to
    # the kernel that waited for it; the next one relies on that carrying one launch further:
    # by then the writer has finished and its writes have reached global memory.)
    if PDL >= 1:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()
    b = tl.program_id(0)
    rows = tl.arange(0, MT)  # [MT] tokens
    rmask = rows < M
    i = b * BI + tl.arange(0, BI)  # [BI] rows of R (and entries of mu)
    z = tl.zeros((MT, BI), tl.float32)  # z[m, i] = (R x1_m)_i
    # unrolled, so that every chunk's load is issued before the first product (one round trip);
    # R[i, j] = 0 for j < i: the loads left of the block's first row are masked off (no traffic)
    for j0 in tl.static_range(0, R, BJ):
        jj = j0 + tl.arange(0, BJ)  # [BJ] columns
        rt = tl.load(Rm + i.to(tl.int64)[:, None] * R + jj[None, :],
                     mask=(i < NR)[:, None] & ((jj >= b * BI) & (jj < R))[None, :], other=0.0)  # [BI, BJ]
        for m in tl.static_range(MT):  # each token against the same tile of R
            x1 = tl.load(X + m * stride_xm + jj, mask=jj < tl.where(m < M, R, 0), other=0.0).to(tl.float32)  # [BJ]
            z += tl.where(rows[:, None] == m, tl.sum(rt * x1[None, :], axis=1)[None, :], 0.0)
    xi = tl.load(X + rows[:, None] * stride_xm + i[None, :], mask=rmask[:, None] & (i < R)[None, :],
                 other=0.0).to(tl.float32)  # [MT, BI]
    mu = tl.load(Mu + i, mask=i < R, other=0.0)
    tl.store(Part + (b * M + rows) * 2, tl.sum(xi * mu[None, :], axis=1), mask=rmask)
    tl.store(Part + (b * M + rows) * 2 + 1, tl.sum(z * z, axis=1), mask=rmask)


# Kernel 2 (the section's pseudo-code), one program per slice of FS neurons. Its rows of K2t and
# V are loaded only where some token keeps the neuron: a masked-off row issues no memory access,
# so the bytes read are the survivors'. Two ways to gather them, measured on an H200
# (notes/kernels_gpu.md):
# - several tokens (FS = 128, half the rows listed at 8 tokens): no list; the products run over
#   the whole slice on the tensor cores, zeros where nothing is kept;
# - one token (FS = 64, ~5 survivors at 8 %): a list (a cumsum), then E whole rows of K2t and V
#   loaded in one statement, one round trip to memory, and the products on the CUDA cores. Rows
#   loaded in chunks of a pipelined loop took ~1 us a chunk, whatever the tiles and stages.
@jit
def _ffn_sparse_kernel(
    X,  # pointer to x [M, d]; token m at X + m * stride_xm, entries contiguous
    K1,  # pointer to K1 [r, f]: element [i, j] at K1 + i * stride_ki + j * stride_kj (prepared: 1, r)
    K2t,  # pointer to K2t [f, d-r], contiguous: neuron j's row at K2t + j * D2
    V,  # pointer to V [f, d], contiguous: neuron j's row at V + j * D
    Part,  # pointer to the partial moments [NBM, M, 2] float32 (kernel 1)
    Ypart,  # pointer to the partial outputs [NS, M, d] float32, contiguous (written)
    stride_xm,  # elements from one token of x to the next
    stride_ki, stride_kj,  # elements between consecutive input dims, neurons of K1
    M,  # tokens
    q,  # Q(1 - k/f) (float32)
    NBM,  # kernel 1's programs
    F: tl.constexpr,  # f
    D: tl.constexpr,  # d
    R: tl.constexpr,  # r
    MP: tl.constexpr,  # tokens padded to 16
    NBP: tl.constexpr,  # partial moments summed at once (a power of two)
    FS: tl.constexpr,  # neurons per program (a power of two)
    BR: tl.constexpr,  # input dims per step of p
    ONE: tl.constexpr,  # one token (M == 1): its survivors listed; else the masked whole-slice products
    BK: tl.constexpr,  # several tokens: chunk of a K2t or V row (>= 16)
    E: tl.constexpr,  # one token: listed neurons gathered at once
    D2P: tl.constexpr,  # one token: d - r padded to a power of two
    DP: tl.constexpr,  # one token: d padded to a power of two
    ALL: tl.constexpr,  # k == f: statistical top-k keeps every neuron unshifted (t = p)
    PREC: tl.constexpr,  # "ieee" or "tf32" (kernels_gpu._dot)
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    if PDL == 2:
        gdc_launch_dependents()  # the reduction may be placed (it waits for this kernel to finish)
    D2: tl.constexpr = D - R
    pid = tl.program_id(0)
    rows = tl.arange(0, MP)  # [MP] tokens
    rmask = rows < M
    j = pid * FS + tl.arange(0, FS)  # [FS] neurons
    inside = rmask[:, None] & (j < F)[None, :]
    # p = x[:, :r] K1[:, slice], before waiting for kernel 1 (x is complete: kernel 1 waited for it)
    kk = tl.arange(0, BR)
    p = tl.zeros((MP, FS), tl.float32)
    for r0 in range(0, R, BR):
        x1 = tl.load(X + rows[:, None] * stride_xm + (r0 + kk)[None, :], mask=rmask[:, None] & (r0 + kk < R)[None, :],
                     other=0.0)
        w = tl.load(K1 + (r0 + kk).to(tl.int64)[:, None] * stride_ki + j.to(tl.int64)[None, :] * stride_kj,
                    mask=(r0 + kk < R)[:, None] & (j < F)[None, :], other=0.0)  # [BR, FS]
        p = _dot(x1, w, p, PREC)
    if PDL >= 1:
        gdc_wait()
    if not ONE:
        # theta = mean + q std from kernel 1's partial sums, in block order (every program the same bits)
        s1 = tl.zeros((MP,), tl.float32)
        s2 = tl.zeros((MP,), tl.float32)
        for b0 in range(0, NBM, NBP):
            bb = b0 + tl.arange(0, NBP)
            msk = rmask[:, None] & (bb < NBM)[None, :]
            s1 += tl.sum(tl.load(Part + (bb[None, :] * M + rows[:, None]) * 2, mask=msk, other=0.0), axis=1)
            s2 += tl.sum(tl.load(Part + (bb[None, :] * M + rows[:, None]) * 2 + 1, mask=msk, other=0.0), axis=1)
        theta = s1 + q * tl.sqrt(s2)  # [MP] (NaN when x[:r] is not finite: no survivors)
        # t = statistical_topk(p) = p - theta on each token's survivors, 0 elsewhere (k == f: p)
        if ALL:
            keep = inside
            t = p
        else:
            keep = inside & (p > theta[:, None])
            t = tl.where(keep, p - theta[:, None], 0.0)
        g, _ = _gelu_tanh(t)  # [MP, FS] (0 where a token does not keep the neuron)
        # several tokens: the products run over the whole slice on the tensor cores, zeros where no
        # token keeps a neuron; its rows of K2t and V are loaded only where some token keeps it (a
        # masked-off row issues no memory access). At 8 tokens half the rows are listed anyway.
        listed = tl.max(keep.to(tl.int32), axis=0) > 0  # [FS] the union over tokens
        # u = x[:, r:] K2t[listed]^T, one chunk of d - r at a time
        u = tl.zeros((MP, FS), tl.float32)
        for k0 in range(0, D2, BK):
            kc = k0 + tl.arange(0, BK)
            x2 = tl.load(X + rows[:, None] * stride_xm + R + kc[None, :], mask=rmask[:, None] & (kc < D2)[None, :],
                         other=0.0)
            w2 = tl.load(K2t + j.to(tl.int64)[:, None] * D2 + kc[None, :], mask=listed[:, None] & (kc < D2)[None, :],
                         other=0.0)  # [FS, BK]
            u = _dot(x2, tl.trans(w2), u, PREC)
        a = (g * u).to(V.dtype.element_ty)  # [MP, FS] rounded to V's dtype, as the dense bf16 FFN rounds h
        # y_part = a V[listed], one chunk of d at a time
        for d0 in range(0, D, BK):
            dd = d0 + tl.arange(0, BK)
            vt = tl.load(V + j.to(tl.int64)[:, None] * D + dd[None, :], mask=listed[:, None] & (dd < D)[None, :],
                         other=0.0)  # [FS, BK]
            y = _dot(a, vt, tl.zeros((MP, BK), tl.float32), PREC)
            tl.store(Ypart + (pid * M + rows[:, None]) * D + dd[None, :], y, mask=rmask[:, None] & (dd < D)[None, :])
    else:
        # one token: its survivors listed (a cumsum), E whole rows of K2t and V loaded at once (one
        # round trip to memory; rows in chunks of a pipelined loop waited ~1 us a chunk on an H200),
        # and the two products on the CUDA cores. Everything on vectors of the slice [FS]: row 0 of
        # p taken once, so that no reduction runs over the 16 padded rows of the tensor-core
        # layout (on an H200, 42 -> 32 groups of barriers, 0.1-0.4 us of ~20.5)
        p0 = tl.sum(tl.where(rows[:, None] == 0, p, 0.0), axis=0)  # [FS] (adding zeros: exact)
        # theta = mean + q std, as above, for the one token (written again on vectors: the [MP] code
        # above, shared through a helper and row 0 taken after, took 0.1-0.2 us longer on an H200)
        s1 = tl.zeros((), tl.float32)
        s2 = tl.zeros((), tl.float32)
        for b0 in range(0, NBM, NBP):
            bb = b0 + tl.arange(0, NBP)
            a1, a2 = tl.reduce((tl.load(Part + bb * 2, mask=bb < NBM, other=0.0),
                                tl.load(Part + bb * 2 + 1, mask=bb < NBM, other=0.0)), 0, _add2)
            s1 += a1
            s2 += a2
        theta = s1 + q * tl.sqrt(s2)
        if ALL:
            keep0 = j < F
            t0 = p0
        else:
            keep0 = (j < F) & (p0 > theta)
            t0 = tl.where(keep0, p0 - theta, 0.0)
        g0, _ = _gelu_tanh(t0)  # [FS]
        listed = keep0.to(tl.int32)
        pos = tl.where(keep0, tl.cumsum(listed, axis=0) - 1, -1)  # [FS] its place in the list (-1: not listed)
        n_loc = tl.sum(listed, axis=0)  # list length (~5 at 8 % of FS = 64: one step of E = 8)
        c2 = tl.arange(0, D2P)  # [D2P] columns of a K2t row (d - r, padded)
        cd = tl.arange(0, DP)  # [DP] columns of a V row (d, padded)
        x2 = tl.load(X + R + c2, mask=c2 < D2, other=0.0).to(tl.float32)  # [D2P]
        y = tl.zeros((DP,), tl.float32)  # this slice's part of y
        # E listed neurons at a time (usually one step)
        for e0 in range(0, n_loc, E):
            e = e0 + tl.arange(0, E)  # [E] list positions
            em = e < n_loc
            pick = pos[None, :] == e[:, None]  # [E, FS] one-hot: row e marks the neuron listed at e
            jj = tl.sum(tl.where(pick, j[None, :], 0), axis=1).to(tl.int64)  # [E] the neurons listed
            w2 = tl.load(K2t + jj[:, None] * D2 + c2[None, :], mask=em[:, None] & (c2 < D2)[None, :], other=0.0)
            vt = tl.load(V + jj[:, None] * D + cd[None, :], mask=em[:, None] & (cd < D)[None, :], other=0.0)
            u = tl.sum(w2.to(tl.float32) * x2[None, :], axis=1)  # [E] u = K2t[jj] x[r:]
            g_e = tl.sum(tl.where(pick, g0[None, :], 0.0), axis=1)  # [E] g at the listed neurons (one term each)
            a = (g_e * u).to(V.dtype.element_ty).to(tl.float32)  # rounded to V's dtype, as above
            y += tl.sum(a[:, None] * vt.to(tl.float32), axis=0)  # [DP] y += sum_e a_e V[jj_e]
        tl.store(Ypart + pid * D + cd, y, mask=cd < D)


# Kernel 3: y[m, cols] = sum over the NS slices of y_part[s, m, cols], the slices in order.
# It reads 4 NS M d bytes (2 MB per token at Gemma-2 2B shapes) and writes y. Many narrow
# programs (BK columns each), each loading its partials SB at a time (all of them at Gemma-2 2B
# shapes, NS = 216: one round trip).
# A token whose x holds NaN or +-inf gets a NaN row (the reference's); each program checks the
# token's whole x (d values from L2) in the same round trip.
@jit
def _ffn_reduce_kernel(
    Ypart,  # pointer to the partial outputs [NS, M, d] float32 (kernel 2)
    X,  # pointer to x [M, d]; token m at X + m * stride_xm, entries contiguous
    Y,  # pointer to y [M, d], x's dtype, contiguous (written)
    stride_xm,  # elements from one token of x to the next
    M,  # tokens
    NS,  # partials (kernel 2's programs)
    D: tl.constexpr,  # d
    DP: tl.constexpr,  # d padded to a power of two
    SB: tl.constexpr,  # partials summed at once (a power of two)
    BK: tl.constexpr,  # columns per program
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    pid_d, m = tl.program_id(0), tl.program_id(1)
    dd = pid_d * BK + tl.arange(0, BK)
    xs = tl.arange(0, DP)
    xx = tl.load(X + m * stride_xm + xs, mask=xs < D, other=0.0).to(tl.float32)
    bad = tl.max(((xx != xx) | (tl.abs(xx) == float("inf"))).to(tl.int32), axis=0) > 0
    acc = tl.zeros((BK,), tl.float32)
    for s0 in range(0, NS, SB):
        s = s0 + tl.arange(0, SB)
        # y = sum_s y_part[s]: a fixed order, so the same bits on every run
        part = tl.load(Ypart + (s[:, None] * M + m) * D + dd[None, :], mask=(s < NS)[:, None] & (dd < D)[None, :],
                       other=0.0)
        acc += tl.sum(part, axis=0)
    acc = tl.where(bad, float("nan"), acc)
    tl.store(Y + m * D + dd, acc.to(Y.dtype.element_ty), mask=dd < D)


# The launches. Every size comes from the shapes (f, d, r, M), never from the data, so the same
# three launches are valid for any x: a CUDA graph can replay them. Scratch, float32:
#     partial moments [NBM, M, 2], y_part [NS, M, d]
# at Gemma-2 2B shapes and M = 1: 512 bytes and 2 MB.
def _spark_ffn_launch(X, K1, K2t, V, k, r, Y):
    """The three kernels on X [M, d] (M <= MAX_TOKENS, unit stride along d) into Y [M, d]."""
    M, d = X.shape
    f = V.shape[0]
    mu, Rm, _ = K1.spark_moments
    dev, f32 = X.device, torch.float32
    NBM = triton.cdiv(r, FFN_BI)
    FS, warps = (FFN_FS1, FFN_WARPS1) if M == 1 else (FFN_FS, FFN_WARPS)
    FS = min(FS, _pad16(f))
    # the tiles are sized for 2-byte values: float32 takes half as many per tile (the same bytes),
    # so the pipeline's stages fit in shared memory (several tokens' at float32 would need 288 KB
    # of an H200's 227 KB)
    per2 = X.element_size() // 2  # 1 for 2-byte values, 2 for float32
    NS = triton.cdiv(f, FS)
    part = torch.empty(NBM, M, 2, dtype=f32, device=dev)
    ypart = torch.empty(NS, M, d, dtype=f32, device=dev)
    _ffn_moments_kernel[(NBM,)](X, mu, Rm, part, X.stride(0), M, Rm.shape[0], R=r, MT=triton.next_power_of_2(M),
                                BI=FFN_BI, BJ=min(FFN_BJ, triton.next_power_of_2(r)), num_warps=4, **_pdl(X))
    q = normal_icdf(1.0 - k / f) if k < f else 0.0  # float64 on the host, from k and f only
    _ffn_sparse_kernel[(NS,)](X, K1, K2t, V, part, ypart, X.stride(0), K1.stride(0), K1.stride(1), M, q, NBM, F=f, D=d, R=r, MP=16,
                              NBP=min(256, triton.next_power_of_2(NBM)), FS=FS, BR=min(max(16, FFN_BR // per2), _pad16(r)),
                              ONE=M == 1, BK=min(max(16, FFN_BK // per2), _pad16(d)),
                              E=max(2, min(FFN_E, 32768 // triton.next_power_of_2(d))),  # (E rows of d in registers)
                              D2P=triton.next_power_of_2(d - r), DP=triton.next_power_of_2(d), ALL=k == f,
                              PREC=_precision(X), num_warps=warps, num_stages=FFN_STAGES, **_pdl(X))
    _ffn_reduce_kernel[(triton.cdiv(d, FFN_RB), M)](ypart, X, Y, X.stride(0), M, NS, D=d, DP=triton.next_power_of_2(d),
                                                    SB=min(256, triton.next_power_of_2(NS)), BK=FFN_RB, num_warps=4, **_pdl(X, last=True))


@torch.no_grad()
def spark_ffn_decode_gpu(x, K1, K2t, V, k, r):
    """Spark FFN for decoding in Triton; computes spark.spark_ffn_np(x, K1, K2t^T, V, k, r).

    x [d] or [M, d] (any leading shape) in the weights' dtype; K1 [r, f] (any strides: the
    prepared one is neuron-major), K2t [f, d-r], V [f, d] from prepare_spark_ffn_gpu -> y, x's
    shape and dtype. k: target survivors per token
    (statistical top-k, soft threshold, fill 0; k == f keeps every neuron unshifted, as topk),
    r: predictor slice. Several tokens gather the union of their survivors (module docstring);
    more than MAX_TOKENS tokens run MAX_TOKENS at a time.
    """
    where = "spark_ffn_decode_gpu"
    _check_inputs(where, x=x, K2t=K2t, V=V)
    _check_same(where, "x", x, False, K1=K1)  # (K1 is read through its strides)
    if x.dim() == 0 or K1.dim() != 2 or K2t.dim() != 2 or V.dim() != 2:
        raise ValueError(f"{where}: expected x [..., d], K1 [r, f], K2t [f, d-r], V [f, d]; got {_shapes(x=x, K1=K1, K2t=K2t, V=V)}")
    d, f = x.shape[-1], V.shape[0]
    spark._check_int("r", r, 1, d - 1)
    if K1.shape != (r, f) or K2t.shape != (f, d - r) or V.shape != (f, d):
        raise ValueError(f"{where}: with x [..., d={d}], r={r}, f={f} expected K1 [r, f] = {(r, f)}, K2t [f, d-r] = "
                         f"{(f, d - r)} (K2 transposed: use prepare_spark_ffn_gpu), V [f, d] = {(f, d)}; got "
                         f"{_shapes(K1=K1, K2t=K2t, V=V)}")
    if not (K2t.is_contiguous() and V.is_contiguous()):
        raise ValueError(f"{where}: K2t and V must be contiguous (a strided view such as K2.t() is not a "
                         f"prepared layout: use prepare_spark_ffn_gpu)")
    moments = getattr(K1, "spark_moments", None)
    if moments is None:
        raise ValueError(f"{where}: K1 carries no moments of p (K1.spark_moments): prepare the weights with "
                         f"prepare_spark_ffn_gpu")
    if moments[2] != K1._version:
        raise ValueError(f"{where}: K1 was changed in place since prepare_spark_ffn_gpu computed its moments: "
                         f"prepare the weights again")
    mu, Rm = moments[0], moments[1]
    if (mu.shape != (r,) or Rm.shape != (min(r, f), r) or mu.dtype != torch.float32 or Rm.dtype != torch.float32
            or mu.device != K1.device or Rm.device != K1.device or not Rm.is_contiguous()):
        raise ValueError(f"{where}: K1.spark_moments must be (mu [r] = {(r,)}, R [min(r, f), r] = {(min(r, f), r)}, "
                         f"version), float32, contiguous, on K1's device {K1.device}; got mu {tuple(mu.shape)} "
                         f"{mu.dtype} on {mu.device}, R {tuple(Rm.shape)} {Rm.dtype} on {Rm.device}")
    check_k(k, f)
    X = x.reshape(-1, d)  # [M, d] (a view when possible; the last axis is contiguous)
    Y = torch.empty(X.shape, dtype=x.dtype, device=x.device)
    for m0 in range(0, X.shape[0], MAX_TOKENS):
        _spark_ffn_launch(X[m0:m0 + MAX_TOKENS], K1, K2t, V, k, r, Y[m0:m0 + MAX_TOKENS])
    return Y.view(x.shape)


# ------------------------------------------------------------------------------------------
# 7c. Attention decode: one new query per sequence against a KV cache (Spark Transformer, arXiv
#    2506.06644, Spark attention; notes/papers.md, "Spark attention"; flash-decoding's split).
#    Reference: spark.spark_attention_np(q, k, v, k_top, r) and spark.attention_np with T = 1.
#
#    At batch 1 a layer has B Hkv = 4 KV heads: one program per head would leave 128 of an
#    H200's 132 SMs idle. So the cache is split into chunks of CH tokens (CH chosen from the
#    shapes so that about TARGET_PROGRAMS programs run) and each program handles one chunk of
#    one KV head for its G query heads (one read of the chunk serves them all).
#
#    Dense (attention_decode_gpu), two kernels:
#        _attn_split_kernel:  per chunk, flash attention's running (m, l, acc) over its tiles:
#                             s = q K^T / sqrt(hd), m' = max(m, max s), p = exp(s - m'),
#                             l = l e^(m - m') + sum p, acc = acc e^(m - m') + p V
#        _decode_merge_kernel: M = max_c m_c; out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
#        Bytes: 2 n hd per KV head (all of K and V). FLOPs 4 n hd per query head.
#
#    Spark (spark_attention_decode_gpu), three kernels (four with many query heads):
#        _spark_scores_kernel: per chunk, s_j = q[:r] . K1_j / sqrt(r) -> a float32 scratch
#                              S [B H, n] (4 bytes per score: 1/16 of what K1 costs at r = 128 bf16)
#        _spark_select_kernel: per (GATHER_E list entries, query head), over the head's n scores
#                              (in registers up to MAX_SELECT_IN_REGISTERS): m = max s; the kt-th
#                              largest by an interval search (below); the kept tokens compacted
#                              (cumsum) into a list, ascending (past SELECT_SPLIT tokens: two
#                              passes, below); then, for this program's GATHER_E entries only:
#                              K2_j and V_j, w_j = e^(s_j - m) softplus(q[r:] . K2_j / sqrt(hd - r)),
#                              l = sum e^(s_j - m), acc = sum w_j V_j
#                              (more than ATTEND_PROGRAMS such programs: one per query head, and
#                              _spark_gather_kernel does the last step, per GATHER_E entries)
#        _decode_merge_kernel: as dense (every chunk has the same m, so out = sum acc / sum l)
#        Values read per KV head: n r + up to G kt (2 hd - r), vs 2 n hd dense; at n = 8192, hd 256,
#        r 128, kt 256, G 2: 1.05 M + 0.20 M vs 4.19 M, 3.3x fewer. Plus 8 G n bytes of float32
#        scores written and read back (131 KB per KV head there, 5 % of the bf16 bytes read).
#
#    The select. With order keys (kernels_gpu._float_of_key: key order is float order) the
#    kt-th largest score is found by narrowing an interval of keys [lo, hi) with
#    count(s >= float(lo)) >= kt > count(s >= float(hi)). Each sweep counts three candidates in
#    one block-wide reduction. The first sweep uses statistics: for scores drawn from a normal
#    distribution the kt-th largest sits near mean + z std, z = Q(1 - kt/n) (as statistical
#    top-k's threshold), so the first candidates are that value and half a std either side. The
#    next ones come from a fit: if the interval's scores were spread evenly, the kt-th largest
#    would sit at a known fraction of it; when a fit does not leave at most a quarter of the
#    interval's scores, quarter points take the next sweep. After FIT_STEPS sweeps only quarter
#    points, which end any interval of 32-bit keys within 16 more: the search is exact whatever
#    the scores look like, and a bad guess or fit only costs sweeps.
#        lo = key(-inf), n_lo = n; hi = key(max s) + 1, n_hi = 0
#        sweep 0: c = key(mean + std (z - 1/2, z, z + 1/2))
#        sweeps 1 .. FIT_STEPS - 1, unless the last fit left more than a quarter of the scores:
#            nothing found below hi yet (lo = key(-inf)): c = key(float(hi) - std (4.5, 1.5, 1/2))
#            else, with m = n_lo - n_hi scores in [lo, hi) and a = kt - n_hi of them wanted:
#            c = key(float(hi) - (float(hi) - float(lo)) u) for u = f + e, f, f - e,
#            f = (a + 1/2) / (m + 1), e = sqrt(a (m - a) / m) / (m + 1) (one binomial std)
#        other sweeps (at most 16 of them): c = the quarter points of [lo, hi)
#            cnt_c = count(s >= float(c)) for the three c (one reduction)
#            lo, n_lo = the largest c with cnt_c >= kt; hi, n_hi = the smallest c with cnt_c < kt
#            stop when n_lo == kt (exactly kt scores >= float(lo)) or hi == lo + 1
#        n_lo == kt: keep s >= float(lo)
#        else (v = float(lo) is the kt-th value, held by a tie): keep s > v, then the first
#            kt - count(s > v) of the s == v in position order
#    Cost: in a NumPy replica over 8192 scores, ~3.7-4 sweeps on average for normal and lognormal
#    scores (quarter points after the guess: ~5; a radix select two bits a step, the first version
#    here: ~9-10), ~5 for Student t with 3 degrees of freedom (5), ~7 for two modes 10 std apart
#    (11), ~6 for four scores 40-70 std above the rest (10). It loses where the spread is far from
#    even: ~13 for four scores 10^4 std above the rest (10), ~12 for magnitudes spread over
#    2^-40 .. 2^40 (8), ~13 for small integers (12). On an H200 (clock counters read inside the
#    kernel, 8192 normal scores, in the attention) a sweep took ~0.8 us, ~0.58 of it the
#    block-wide reduction of its counts; the kernel ends with its slowest query head (~5.6
#    sweeps): ~0.2 us loading the scores, 0.58 their moments, ~4.5 the search, ~2.0 the
#    compaction, ~7.9 in all; alone (with its launch) it took 8.6 us (notes/kernels_gpu.md).
#
#    Long caches (n > SELECT_SPLIT = 8192): one program per query head over 32768 scores counts
#    4x the scores of 8192 in every sweep, and past MAX_SELECT_IN_REGISTERS it re-reads them from
#    L2 for every sweep. So the select runs twice: first on each of SELECT_PARTS = 8 parts of the
#    row (8x the programs, each over n / 8 scores), then on the 8 kt listed candidates. The kt
#    largest of the row are among the kt largest of their parts, so the result is the same list.
# ------------------------------------------------------------------------------------------


def prepare_spark_kv_gpu(k, v, r):
    """Split a KV cache for Spark attention decoding: k, v [B, Hkv, n, hd] ->
    (k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]), contiguous copies: the score
    kernel streams k1 (r values per token) without the other hd - r between them. Views work as
    well (the kernels read any row strides): generate_gpu passes k[..., :r] and k[..., r:] of one
    key cache, which on an H200 at hd 256 cost no measurable time against the copies."""
    _check_inputs("prepare_spark_kv_gpu", False, k=k, v=v)  # (any strides: we copy)
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"prepare_spark_kv_gpu: expected k and v [B, Hkv, n, hd], got {_shapes(k=k, v=v)}")
    spark._check_int("r", r, 1, k.shape[-1] - 1)
    return k[..., :r].contiguous(), k[..., r:].contiguous(), v.contiguous()


def _check_decode(where, q, caches, lengths):
    """q [B, H, 1, hd] or [B, H, hd]; caches {name: (tensor, width)} [B, Hkv, n, width]. -> (B, H, Hkv, n, hd)"""
    _check_inputs(where, q=q, **{name: t for name, (t, _) in caches.items()})
    if not (q.dim() == 3 or (q.dim() == 4 and q.shape[2] == 1)):
        raise ValueError(f"{where}: q must be [B, H, 1, hd] or [B, H, hd] (one new token per sequence), got {tuple(q.shape)}")
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    first = next(iter(caches.values()))[0]
    Hkv, n = (first.shape[1], first.shape[2]) if first.dim() == 4 else (0, 0)
    for name, (t, width) in caches.items():
        if t.dim() != 4 or tuple(t.shape) != (B, Hkv, n, width):
            raise ValueError(f"{where}: with q {tuple(q.shape)} expected {name} [B, Hkv, n, {width}] = "
                             f"{(B, Hkv, n, width)}; got {tuple(t.shape)}")
    if Hkv == 0 or H % Hkv != 0 or n == 0 or B == 0:
        raise ValueError(f"{where}: need B >= 1, H ({H}) a multiple of Hkv ({Hkv}) and a cache of n >= 1 tokens "
                         f"(n = {n})")
    # (compiled by Triton 3.6 for an H200, the split kernel's tiles at 2048-byte rows need 296-297 KB
    # of shared memory, of the 227 KB a program has; at 1024 bytes 149 KB)
    if hd * q.element_size() > 1024:
        raise ValueError(f"{where}: q's head size hd = {hd} in {q.dtype}: the decoding kernels take rows of at most "
                         f"1024 bytes (hd <= 256 in float32, 512 in bfloat16 or float16)")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
                or tuple(lengths.shape) != (B,) or lengths.device != q.device:
            raise ValueError(f"{where}: lengths must be an int32 or int64 tensor [B] = [{B}] on q's device "
                             f"{q.device}, got {getattr(lengths, 'dtype', type(lengths).__name__)} "
                             f"{tuple(getattr(lengths, 'shape', ()))}")
        # the values without a host read (a GPU would wait): a device-side check, which raises at
        # once on the CPU and at the next synchronisation on a GPU; the kernels clamp as well, so
        # nothing past the cache is read before that error surfaces
        torch._assert_async(((lengths >= 1) & (lengths <= n)).all(), f"{where}: every lengths[b] must be in [1, n = {n}]")
    return B, H, Hkv, n, hd


def _split(n, groups):
    """Tokens per split CH (a power of two >= MIN_SPLIT) and the number of splits, so that about
    TARGET_PROGRAMS programs cover `groups` KV heads x the cache (shapes only, no data)."""
    want = max(1, TARGET_PROGRAMS // max(1, groups))  # splits per KV head
    CH = max(MIN_SPLIT, ATTN_BN, triton.next_power_of_2(triton.cdiv(n, want)))
    return CH, triton.cdiv(n, CH)


def _len_args(lengths, q):
    """(pointer, HAS_LEN) for the kernels: int32 lengths on the device, or q as an unused pointer."""
    if lengths is None:
        return q, False
    return (lengths if lengths.dtype == torch.int32 else lengths.to(torch.int32)), True


@jit
def _visible(Len, b, N, HAS_LEN: tl.constexpr):
    """Tokens of sequence b's cache its query sees: lengths[b] clamped to [1, n], or n."""
    if HAS_LEN:
        return tl.minimum(tl.maximum(tl.load(Len + b), 1), N)
    else:
        # a 0-d int32 tensor even when N == 1, which the compiler specializes into a Python constant
        return tl.zeros((), tl.int32) + N


# One program per (split of CH tokens, sequence b, unit j): unit j is KV head j (dense) or the
# group in slot j of heads[b] (HAS_HEADS). Its G query heads are the rows of one tl.dot, so the
# chunk of K and V is read once for all of them.
#     g = heads[b, j] (clamped into [0, Hkv)) or j
#     m = -inf; l = 0; acc = 0                                # per query head of g
#     for each tile of BN visible tokens in the split:
#         s = q K_tile^T / sqrt(hd);  m' = max(m, max s)
#         l = l e^(m - m') + sum e^(s - m');  acc = acc e^(m - m') + e^(s - m') V_tile;  m = m'
#     store (m, l, acc) at partial rows (b NU + j) G + i  (an empty split: m = -inf, l = 0, acc = 0)
@jit
def _attn_split_kernel(
    Q,  # pointer to q [B, H, hd]: element [b, h, c] at Q + b * stride_qb + h * stride_qh + c
    K,  # pointer to k [B, Hkv, n, hd]: element [b, g, t, c] at K + b * stride_kb + g * stride_kh + t * stride_kt + c
    V,  # pointer to v [B, Hkv, n, hd]: element [b, g, t, c] at V + b * stride_vb + g * stride_vh + t * stride_vt + c
    Len,  # pointer to lengths [B] int32 (read when HAS_LEN)
    Heads,  # pointer to heads [B, HT] int32/int64: [b, j] at Heads + b * stride_hb + j * stride_hj (HAS_HEADS)
    Mp,  # pointer to the partial maxima [B NU G, NCH] float32 (written)
    Lp,  # pointer to the partial sums [B NU G, NCH] float32 (written)
    Accp,  # pointer to the partial outputs [B NU G, NCH, hd] float32 (written)
    stride_qb, stride_qh,  # elements between consecutive batches, heads of q
    stride_kb, stride_kh, stride_kt,  # between consecutive batches, KV heads, tokens of k
    stride_vb, stride_vh, stride_vt,  # the same for v
    stride_hb, stride_hj,  # between consecutive sequences, slots of heads
    H,  # query heads
    G,  # query heads per KV head
    NU,  # units per sequence: Hkv, or HT with a table
    N,  # cache capacity n
    NCH,  # splits per unit
    scale,  # 1 / sqrt(hd)
    HD: tl.constexpr,  # hd
    HDP: tl.constexpr,  # hd padded to a power of two >= 16
    GP: tl.constexpr,  # G padded to a power of two >= 16
    CH: tl.constexpr,  # tokens per split
    BN: tl.constexpr,  # keys per tile
    HAS_LEN: tl.constexpr,  # lengths given
    HAS_HEADS: tl.constexpr,  # a table of groups given (Polar); else unit j is KV head j
    PREC: tl.constexpr,  # "ieee" or "tf32" (kernels_gpu._dot)
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    c, bj = tl.program_id(0), tl.program_id(1)  # split, b * NU + unit
    Hkv = H // G
    b, j = bj // NU, bj % NU
    if HAS_HEADS:
        # the group in slot j, clamped so that a bad entry reads a real group (the merge flags it)
        kvh = tl.load(Heads + b.to(tl.int64) * stride_hb + j * stride_hj).to(tl.int32)
        kvh = tl.minimum(tl.maximum(kvh, 0), Hkv - 1)
    else:
        kvh = j
    n_b = _visible(Len, b, N, HAS_LEN)
    g = tl.arange(0, GP)
    gm = g < G
    h = kvh * G + g  # [GP] the query heads of this KV head
    cols = tl.arange(0, HDP)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + cols[None, :],
                mask=gm[:, None] & (cols < HD)[None, :], other=0.0)  # [GP, HDP]
    Kh = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh  # k[b, kvh, 0, 0]
    Vh = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    m = tl.full((GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HDP), tl.float32)
    for t0 in range(c * CH, tl.minimum((c + 1) * CH, n_b), BN):
        t = t0 + tl.arange(0, BN)
        # s = q K^T / sqrt(hd), -inf past the visible tokens (every tile has one visible key: m' is finite)
        s = _scores(q, _load_tile(Kh, t, n_b, stride_kt, 0, HD, HDP), scale, PREC)  # [GP, BN]
        s = tl.where((t < n_b)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max (0 at the first tile)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        vt = _load_tile(Vh, t, n_b, stride_vt, 0, HD, HDP)  # [BN, HDP]
        # acc = acc e^(m - m') + p V   (p in V's dtype for the tensor cores, as flash attention)
        acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None], PREC)
        m = m_new
    row = (bj.to(tl.int64) * G + g) * NCH + c  # [GP] partial rows (b NU + j) G + i (dense: b H + h), split c
    tl.store(Mp + row, m, mask=gm)
    tl.store(Lp + row, l_sum, mask=gm)
    tl.store(Accp + row[:, None] * HD + cols[None, :], acc, mask=gm[:, None] & (cols < HD)[None, :])


# The merge, one program per output head (b, h): the partials of its splits (or list chunks)
# are rescaled to their common max and added, in split order. With a table, the partials are
# those of h's slot, and a head whose group is not in the table gets 0.
#     j = slot of h // G in heads[b] (or none); partials of row (b HT + j) G + h % G (dense: b H + h)
#     M = max_c m_c;  out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c    (0 when no slot)
#     NaN in every head of b when heads[b] has an entry outside [0, Hkv) or a repeat
@jit
def _decode_merge_kernel(
    Mp,  # pointer to the partial maxima [rows, NCH] float32 (-inf: an empty split)
    Lp,  # pointer to the partial sums [rows, NCH] float32
    Accp,  # pointer to the partial outputs [rows, NCH, hd] float32
    Out,  # pointer to out [B, H, hd]: element [b, h, c] at Out + (b H + h) hd + c (written, q's dtype)
    Heads,  # pointer to heads [B, HT]: element [b, j] at Heads + b * stride_hb + j * stride_hj (HAS_HEADS)
    stride_hb, stride_hj,  # elements between consecutive sequences, slots of heads
    NCH,  # partials per query head
    H,  # query heads
    G,  # query heads per KV head
    HT,  # slots per sequence in heads
    HD: tl.constexpr,  # hd
    HDP: tl.constexpr,  # hd padded to a power of two
    CB: tl.constexpr,  # partials merged at once
    HTP: tl.constexpr,  # HT padded to a power of two >= 16
    HAS_HEADS: tl.constexpr,  # a table given (Polar): partial rows by slot, 0 for heads not kept
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    bh = tl.program_id(0)  # b * H + h
    if HAS_HEADS:
        b, h = bh // H, bh % H
        jj = tl.arange(0, HTP)
        jm = jj < HT
        groups = tl.load(Heads + b.to(tl.int64) * stride_hb + jj * stride_hj, mask=jm, other=-1)  # [HTP] heads[b]
        j = tl.max(tl.where(jm & (groups == h // G), jj, -1), axis=0)  # h's slot; -1: its group is not kept
        sel = j >= 0
        nch = tl.where(sel, NCH, 0)  # partials to merge: none for a head not kept
        base = ((b.to(tl.int64) * HT + tl.maximum(j, 0)) * G + h % G) * NCH
        # an invalid row: an entry outside [0, Hkv), or an entry equal to an earlier one
        bad = tl.sum((jm & ((groups < 0) | (groups >= H // G))).to(tl.int32), axis=0)
        rep = (groups[:, None] == groups[None, :]) & (jj[:, None] < jj[None, :]) & jm[None, :]  # [HTP, HTP]
        bad += tl.sum(tl.sum(rep.to(tl.int32), axis=1), axis=0)
    else:
        sel = bh >= 0  # (always true)
        nch = NCH
        base = bh.to(tl.int64) * NCH
    cc = tl.arange(0, CB)
    cols = tl.arange(0, HDP)
    # M = max_c m_c
    mx = tl.full((), float("-inf"), tl.float32)
    for c0 in range(0, NCH, CB):
        mx = tl.maximum(mx, tl.max(tl.load(Mp + base + c0 + cc, mask=c0 + cc < nch, other=float("-inf")),
                                   axis=0))
    mx = tl.where(sel, mx, 0.0)  # a head not kept has no partials: 0 keeps its sums at 0, not NaN
    # out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c   (in split order: the same bits every run)
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((HDP,), tl.float32)
    for c0 in range(0, NCH, CB):
        cm = c0 + cc < nch
        sc = tl.exp(tl.load(Mp + base + c0 + cc, mask=cm, other=float("-inf")) - mx)  # [CB] 0 for empty splits
        l_sum += tl.sum(sc * tl.load(Lp + base + c0 + cc, mask=cm, other=0.0), axis=0)
        part = tl.load(Accp + (base + c0 + cc)[:, None] * HD + cols[None, :], mask=cm[:, None] & (cols < HD)[None, :],
                       other=0.0)
        acc += tl.sum(sc[:, None] * part, axis=0)
    out = acc / tl.where(sel, l_sum, 1.0)  # a head not kept: 0 / 1 = 0 exactly
    if HAS_HEADS:
        out = tl.where(bad > 0, float("nan"), out)
    tl.store(Out + bh.to(tl.int64) * HD + cols, out.to(Out.dtype.element_ty), mask=cols < HD)


def _merge(mp, lp, accp, B, H, hd, dtype, heads=None, G=1):
    """Launch the merge on partials [B H, NCH, ...], or [B HT G, NCH, ...] with heads [B, HT] (G
    query heads per group). -> out [B, H, hd] in dtype"""
    out = torch.empty(B, H, hd, dtype=dtype, device=mp.device)
    tab = mp if heads is None else heads  # (without a table: a pointer the kernel never reads)
    HT = 1 if heads is None else heads.shape[1]
    _decode_merge_kernel[(B * H,)](mp, lp, accp, out, tab, tab.stride(0), tab.stride(1), mp.shape[1], H, G, HT,
                                   HD=hd, HDP=_pad16(hd), CB=16, HTP=_pad16(HT),
                                   HAS_HEADS=heads is not None, num_warps=4, **_pdl(mp, last=True))
    return out


def _flash_decode(q, k, v, lengths, heads):
    """Split-KV flash decoding of every KV group (heads None) or of the groups in heads [B, HT]
    (the others' query heads 0), arguments already checked. -> q's shape"""
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, n = k.shape[1], k.shape[2]
    qv = q.reshape(B, H, hd)
    G = H // Hkv
    NU = Hkv if heads is None else heads.shape[1]  # groups computed per sequence
    CH, NCH = _split(n, B * NU)
    f32 = torch.float32
    mp = torch.empty(B * NU * G, NCH, dtype=f32, device=q.device)
    lp = torch.empty(B * NU * G, NCH, dtype=f32, device=q.device)
    accp = torch.empty(B * NU * G, NCH, hd, dtype=f32, device=q.device)
    lens, has_len = _len_args(lengths, q)
    tab = qv if heads is None else heads  # (without a table: a pointer the kernel never reads)
    _attn_split_kernel[(NCH, B * NU)](
        qv, k, v, lens, tab, mp, lp, accp, qv.stride(0), qv.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), tab.stride(0), tab.stride(1), H, G, NU, n, NCH, 1.0 / math.sqrt(hd),
        HD=hd, HDP=_pad16(hd), GP=_pad16(G), CH=CH, BN=min(ATTN_BN, CH), HAS_LEN=has_len,
        HAS_HEADS=heads is not None, PREC=_precision(q), num_warps=4, **_pdl(q))
    return _merge(mp, lp, accp, B, H, hd, q.dtype, heads, G).view(q.shape)


@torch.no_grad()
def attention_decode_gpu(q, k, v, *, lengths=None):
    """Dense attention of one new token per sequence over its cache (flash-decoding in Triton);
    computes spark.attention_np with T = 1.   q [B, H, 1, hd] or [B, H, hd], k v [B, Hkv, n, hd]
    (views into bigger buffers are read in place when their last axis is contiguous) -> q's shape.
    lengths: optional int32/int64 tensor [B] on the device, the tokens each query sees.
    """
    _check_inputs("attention_decode_gpu", q=q)
    hd = q.shape[-1]
    _check_decode("attention_decode_gpu", q, {"k": (k, hd), "v": (v, hd)}, lengths)
    return _flash_decode(q, k, v, lengths, None)


# Spark pass 1, one program per (split, KV head), as the dense split kernel but reading only the
# first r columns (k1) and storing the scores instead of using them:
#     for each tile of BN visible tokens:  S[query head, tokens] = q[:, :r] k1_tile^T / sqrt(r)
@jit
def _spark_scores_kernel(
    Q,  # pointer to q [B, H, hd]: element [b, h, c] at Q + b * stride_qb + h * stride_qh + c (columns < r read)
    K1,  # pointer to k1 [B, Hkv, n, r]: element [b, g, t, c] at K1 + b * stride_kb + g * stride_kh + t * stride_kt + c
    S,  # pointer to the scores [B H, n] float32, contiguous (written for the visible tokens)
    Len,  # pointer to lengths [B] int32 (read when HAS_LEN)
    stride_qb, stride_qh,  # elements between consecutive batches, heads of q
    stride_kb, stride_kh, stride_kt,  # between consecutive batches, KV heads, tokens of k1
    H,  # query heads
    G,  # query heads per KV head
    N,  # cache capacity n
    scale1,  # 1 / sqrt(r)
    R: tl.constexpr,  # r
    R1: tl.constexpr,  # r padded to a power of two >= 16
    GP: tl.constexpr,  # G padded likewise
    CH: tl.constexpr,  # tokens per split
    BN: tl.constexpr,  # keys per tile
    HAS_LEN: tl.constexpr,  # lengths given
    PREC: tl.constexpr,  # "ieee" or "tf32" (kernels_gpu._dot)
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    c, bg = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    b, kvh = bg // Hkv, bg % Hkv
    n_b = _visible(Len, b, N, HAS_LEN)
    g = tl.arange(0, GP)
    gm = g < G
    h = kvh * G + g
    cols = tl.arange(0, R1)
    q1 = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + cols[None, :],
                 mask=gm[:, None] & (cols < R)[None, :], other=0.0)  # [GP, R1]
    Kh = K1 + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    S_rows = S + (b * H + h).to(tl.int64)[:, None] * N  # [GP, 1] each query head's score row
    for t0 in range(c * CH, tl.minimum((c + 1) * CH, n_b), BN):
        t = t0 + tl.arange(0, BN)
        # s_j = q[:r] . K1_j / sqrt(r) for the G query heads at once (one read of the tile)
        s = _scores(q1, _load_tile(Kh, t, n_b, stride_kt, 0, R, R1), scale1, PREC)  # [GP, BN]
        tl.store(S_rows + t[None, :], s, mask=gm[:, None] & (t < n_b)[None, :])


@jit
def _add3(a1, a2, a3, b1, b2, b3):
    return a1 + b1, a2 + b2, a3 + b3


@jit
def _ge(s, c, ASM: tl.constexpr):
    """1.0 where s >= c, else 0.0 (float32; NaN: 0.0). ASM: PTX's set.ge, one instruction a score.
    Written as tl.where, LLVM packs two of the three candidates' compare results into integer
    bit masks and unpacks them again: a sweep took 638 instructions a thread (sm_90a, 8192
    scores, 8 warps, Triton 3.9), 351 with set.ge. The interpreter cannot run PTX."""
    if ASM:
        return tl.inline_asm_elementwise("set.ge.f32.f32 $0, $1, $2;", "=f,f,f", [s, c + tl.zeros_like(s)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.where(s >= c, 1.0, 0.0)


@jit
def _select_counts(s, c1, c2, c3, ASM: tl.constexpr):
    """How many of s are >= each candidate (float32 sums: exact up to 2^24 scores), as one
    three-operand reduction: one round of shared memory and barriers instead of three."""
    return tl.reduce((_ge(s, c1, ASM), _ge(s, c2, ASM), _ge(s, c3, ASM)), 0, _add3)


@jit
def _max_add_add(a0, a1, a2, b0, b1, b2):
    return tl.maximum(a0, b0), a1 + b1, a2 + b2


@jit
def _key_of_float(x):
    """The order key of float32 x (_float_of_key's inverse) as a uint32: the search's interval
    arithmetic in 32-bit integers (with int64 keys, each min, max and compare of its scalar chain
    was three instructions)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ -1, b ^ ~0x7FFFFFFF).to(tl.uint32, bitcast=True)  # (~0x7FFFFFFF: the sign bit)


@jit
def _normal_quantile_upper(p):
    """z with P(N(0, 1) > z) = p, for 0 < p < 1, to about 4.5e-4 (Abramowitz and Stegun 26.2.23):
    only a first guess for the search, which is exact whatever the guess. In the kernel, not
    normal_icdf on the host, because p = kt / n depends on lengths, which live on the device."""
    t = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.minimum(p, 1.0 - p), 1e-30)))  # (p = 1 when nothing is searched)
    z = t - (2.515517 + t * (0.802853 + t * 0.010328)) / (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)))
    return tl.where(p <= 0.5, z, -z)


@jit
def _cumsum_rows(x, N: tl.constexpr, W: tl.constexpr):
    """tl.cumsum(x, 0) of x [N] (integers), computed as N / W rows of W entries: a cumsum along
    each row plus the exclusive cumsum of the row sums. Same values; on an H200 it took 2 us less
    than one scan over 8192 entries, and 13 us less over 32768 (compacted in 4 chunks)."""
    if N <= W:
        return tl.cumsum(x, axis=0)
    else:
        x2 = tl.reshape(x, (N // W, W))
        rows = tl.sum(x2, axis=1)
        return tl.reshape((tl.cumsum(rows, axis=0) - rows)[:, None] + tl.cumsum(x2, axis=1), (N,))


@jit
def _scores_chunk(row, start, cols, n_b, s_all, ONE_BLOCK: tl.constexpr):
    """Scores start .. start + BLOCK of a row, -inf past n_b: the registers' copy s_all when the
    whole row is held (ONE_BLOCK), else a load (from L2: the row was just written)."""
    if ONE_BLOCK:
        return s_all
    else:
        return tl.load(row + start + cols, mask=start + cols < n_b, other=float("-inf"))


@jit
def _compact_list(row, s_all, n_b, v, quota, Idx, Ssel, Pos, P0, P1, first, CBLOCK: tl.constexpr, HELD: tl.constexpr,
                  HAS_POS: tl.constexpr, TIES: tl.constexpr, ASM: tl.constexpr):
    """The select's list: every visible score s > v, and (TIES) the first quota of the s == v in
    position order, else (exactly kt scores >= v) every s >= v; each at list position = running
    count of keeps, with its token position (its Pos entry when HAS_POS) and its score; only
    list positions P0 .. P1 - 1 are written (a program that attends writes its own). Scores in
    chunks of CBLOCK (HELD: s_all holds the row; else re-read from L1 / L2: two cumsums over
    32768 scores in registers spilled). TIES is a separate copy of the loop: in one loop with a
    runtime branch, the compiled code did both cases' work (2796 instructions a thread at 8192
    scores, 1501 for the case without ties).   -> the count of keeps"""
    ccols = tl.arange(0, CBLOCK)
    ties = tl.zeros((), tl.int32)
    kept = tl.zeros((), tl.int32)
    for start in range(0, n_b, CBLOCK):
        if HELD:
            s = s_all
        else:
            s = tl.load(row + start + ccols, mask=start + ccols < n_b, other=float("-inf"))
        valid = start + ccols < n_b
        if TIES:
            tie = valid & (s == v)
            rank = ties + _cumsum_rows(tie.to(tl.int32), CBLOCK, 32)  # 1-based rank among the ties so far
            keep = valid & ((s > v) | (tie & (rank <= quota)))
            ties += tl.sum(tie.to(tl.int32), axis=0)
        else:
            keep = valid & (s >= v)
        pos = kept + _cumsum_rows(keep.to(tl.int32), CBLOCK, 32) - 1
        in_list = keep & (pos >= P0) & (pos < P1)  # (pos < kt always, by construction: P1 <= KT guards the list's end)
        if HAS_POS:
            where = tl.load(Pos + start + ccols, mask=in_list, other=0)
        else:
            where = first + start + ccols
        # (as inline PTX stores, _scatter_store: with tl.store, Triton 3.6 passed positions and
        # values through shared memory first, and the select took 1.3 us longer on an H200)
        _scatter_store(Idx + tl.zeros_like(pos), pos, where, in_list, not ASM)
        _scatter_store(Ssel.to(tl.pointer_type(tl.int32)) + tl.zeros_like(pos), pos, s.to(tl.int32, bitcast=True), in_list, not ASM)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    return kept


# Spark pass 3, for E listed tokens of one query head:
#     j = list[e0 .. e0 + E);  e_j = exp(s_j - m);  g_j = softplus(q[r:] . K2_j / sqrt(hd - r))
#     store (m, l = sum e_j, acc = sum e_j g_j V_j)      (the merge kernel sums these partials)
# One query row, so the products are plain multiply-and-sum on the CUDA cores (a tl.dot would
# pad it to 16 rows). The listed rows are the only K2 and V rows any Spark kernel reads.
@jit
def _attend_list(Q, K2, V, Idx, Ssel, e0, kt, m, b, h, kvh, Mp, Lp, Accp, prow, stride_qb, stride_qh, stride_2b,
                 stride_2h, stride_2t, stride_vb, stride_vh, stride_vt, scale2, HD: tl.constexpr, R: tl.constexpr,
                 R2: tl.constexpr, HDP: tl.constexpr, E: tl.constexpr):
    """Entries e0 .. e0 + E - 1 (those below kt) of a query head's list (Idx, Ssel: its row) ->
    partial prow of Mp, Lp, Accp. b, h, kvh: the sequence, query head and KV head."""
    e = e0 + tl.arange(0, E)
    em = e < kt  # past kt (a short cache, or the last chunk): nothing is read
    j = tl.load(Idx + e, mask=em, other=0).to(tl.int64)  # [E] token positions
    s = tl.load(Ssel + e, mask=em, other=float("-inf"))
    c2 = tl.arange(0, R2)
    cv = tl.arange(0, HDP)
    q2 = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + R + c2, mask=c2 < HD - R,
                 other=0.0).to(tl.float32)  # [R2]
    k2 = tl.load(K2 + b.to(tl.int64) * stride_2b + kvh.to(tl.int64) * stride_2h + j[:, None] * stride_2t + c2[None, :],
                 mask=em[:, None] & (c2 < HD - R)[None, :], other=0.0).to(tl.float32)  # [E, R2]: kept rows only
    # (V's rows loaded before the gates are computed: written after them, the load was issued
    # after them too, a second round trip to memory)
    vt = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + j[:, None] * stride_vt + cv[None, :],
                 mask=em[:, None] & (cv < HD)[None, :], other=0.0).to(tl.float32)  # [E, HDP]: kept rows only
    # w_j = e^(s_j - m) softplus(q[r:] . K2_j / sqrt(hd - r))
    ew = tl.where(em, tl.exp(s - m), 0.0)
    w = ew * _softplus(tl.sum(k2 * q2[None, :], axis=1) * scale2, "ieee")  # (tl.log: a few gates a program)
    tl.store(Mp + prow, m)
    tl.store(Lp + prow, tl.sum(ew, axis=0))
    # acc = sum_j w_j V_j
    tl.store(Accp + prow * HD + cv, tl.sum(w[:, None] * vt, axis=0), mask=cv < HD)


# Spark pass 2, one program per (part of L scores, query head) (the section's pseudo-code).
# Everything it reads is its part of the head's row of S (4 L bytes, just written, so in L2);
# everything it writes is the list of the part's kt positions and scores, its max and kt. The
# sweeps of the search run on registers. Caches longer than SELECT_SPLIT run it twice (the
# section header): FILL (the first pass) pads each part's list to KT entries; HAS_POS (the
# second) reads those lists as its row, counts as tokens only their kept entries, and maps a
# kept candidate back to its token position.
# ATTEND (the attention's last pass, when there are few query heads): one program per (E
# listed tokens, query head) instead, the row one part. Each of a head's NCH programs runs the
# same select (they run side by side on their own SMs, so the copies cost no time), writes only
# its E entries of the list, and then does pass 3 for them (_attend_list): no gather kernel
# and no round trip of the list between kernels (on an H200 the attention took 1.0-1.8 us less
# at batch 1). With more query heads the copies would queue for SMs (at 4 sequences of 8 heads
# the attention took 58 us against 35), so past ATTEND_PROGRAMS programs _spark_gather_kernel
# does pass 3 after the select instead (notes/kernels_gpu.md).
@jit
def _spark_select_kernel(
    S,  # pointer to the scores [B H, N] float32 (entries of the visible tokens)
    Idx,  # pointer to the kept lists [B H, NP, KT] int32 (written: the first kt entries, ascending positions)
    Ssel,  # pointer to their scores [B H, NP, KT] float32 (written)
    Mx,  # pointer to each list's max score [B H, NP] float32 (written)
    Kt,  # pointer to each list's kept count kt [B H, NP] int32 (written)
    Len,  # pointer to lengths [B] int32 (read when HAS_LEN)
    Pos,  # pointer to the positions of the scores [B H, N] int32 (read when HAS_POS)
    Cnt,  # pointer to the first pass's kept counts [B H, NPREV] int32 (read when HAS_POS)
    H,  # query heads
    N,  # row length of S: cache capacity n, or the candidates of the first pass
    L,  # scores per part (N for one part)
    KT,  # list length, min(k_top, L)
    k_top,  # tokens kept per query at most
    NPREV,  # the first pass's parts (HAS_POS)
    PP: tl.constexpr,  # NPREV padded to a power of two (HAS_POS; else 1)
    KTP: tl.constexpr,  # KT padded to a power of two (FILL; else 1)
    BLOCK: tl.constexpr,  # scores held at once (a power of two)
    ONE_BLOCK: tl.constexpr,  # all L scores in registers (else chunks re-read from L2 every sweep)
    CBLOCK: tl.constexpr,  # scores compacted at once (<= BLOCK; smaller: chunks re-read from L2 once)
    HAS_LEN: tl.constexpr,  # lengths given
    HAS_POS: tl.constexpr,  # positions given
    FILL: tl.constexpr,  # list entries past kt written (position 0, score -inf, or NaN for a NaN part)
    FIT: tl.constexpr,  # sweeps 1 .. FIT - 1 may place their candidates by the fit (FIT_STEPS; >= 1: sweep 0 is the guess)
    ASM: tl.constexpr,  # the sweeps' compares and the list's stores in PTX (_ge, _scatter_store; not in the interpreter)
    # (ATTEND only; otherwise never read)
    Q,  # pointer to q [B, H, hd]: element [b, h, c] at Q + b * stride_qb + h * stride_qh + c (columns >= r read)
    K2,  # pointer to k2 [B, Hkv, n, hd - r]: element [b, g, t, c] at K2 + b * stride_2b + g * stride_2h + t * stride_2t + c
    V,  # pointer to v [B, Hkv, n, hd]: element [b, g, t, c] at V + b * stride_vb + g * stride_vh + t * stride_vt + c
    Mp,  # pointer to the partial maxima [B H, NCH] float32 (written: every chunk gets the head's max)
    Lp,  # pointer to the partial sums [B H, NCH] float32 (written)
    Accp,  # pointer to the partial outputs [B H, NCH, hd] float32 (written)
    stride_qb, stride_qh,  # elements between consecutive batches, heads of q
    stride_2b, stride_2h, stride_2t,  # between consecutive batches, KV heads, tokens of k2
    stride_vb, stride_vh, stride_vt,  # the same for v
    G,  # query heads per KV head
    NCH,  # programs per query head, cdiv(KT, E)
    scale2,  # 1 / sqrt(hd - r)
    HD: tl.constexpr,  # hd
    R: tl.constexpr,  # r
    R2: tl.constexpr,  # hd - r padded to a power of two >= 16
    HDP: tl.constexpr,  # hd padded likewise
    E: tl.constexpr,  # listed tokens per program
    ATTEND: tl.constexpr,  # attend to the listed tokens (above)
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    if ATTEND:  # program (c, bh): the whole row, list positions c E .. c E + E - 1
        part, bh, c = 0, tl.program_id(1), tl.program_id(0)
        NP = 1
        P0 = c * E
        P1 = tl.minimum(P0 + E, KT)
    else:  # program (part, bh): the part's whole list
        part, bh = tl.program_id(0), tl.program_id(1)
        NP = tl.num_programs(0)
        P0 = 0
        P1 = KT
    first = part * L  # the part's first score
    n_b = tl.minimum(tl.maximum(_visible(Len, bh // H, N, HAS_LEN) - first, 0), L)  # its visible scores
    if HAS_POS:  # the tokens among the candidates: the first pass's kept entries, not its padding
        pp = tl.arange(0, PP)
        n_tok = tl.sum(tl.load(Cnt + bh * NPREV + pp, mask=pp < NPREV, other=0), axis=0)
    else:
        n_tok = n_b
    kt = tl.minimum(n_tok, k_top)
    ktf = kt.to(tl.float32)
    need = n_tok > k_top  # else every visible token is kept
    row = S + bh.to(tl.int64) * N + first
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        s_all = tl.load(row + cols, mask=cols < n_b, other=float("-inf"))  # [BLOCK]
    else:
        s_all = tl.zeros((BLOCK,), tl.float32)  # (unused: every sweep loads its chunks)
    # m = max_j s_j and the sums of s_j and s_j^2 over the visible scores, in one reduction (plain
    # sums, not _row_stats_in_registers' centred passes: a first guess needs no accuracy, and
    # every reduction here is a round of barriers)
    m = tl.full((), float("-inf"), tl.float32)
    s1 = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    for start in range(0, n_b, BLOCK):
        s = _scores_chunk(row, start, cols, n_b, s_all, ONE_BLOCK)
        sv = tl.where((start + cols < n_b) & (s != float("-inf")), s, 0.0)  # (-inf: a first pass's padding)
        a0, a1, a2 = tl.reduce((s, sv, sv * sv), 0, _max_add_add)
        m = tl.maximum(m, a0)
        s1 += a1
        s2 += a2
    # the search (section header): lo, hi order keys (uint32) with
    # count(s >= float(lo)) = n_lo >= kt > count(s >= float(hi)); padding (-inf) never counts
    nf = n_b.to(tl.float32)
    nd = tl.maximum(nf, 1.0)  # (a first pass's part past every visible token has none)
    mu = s1 / nd
    sd = tl.sqrt(tl.maximum(s2 / nd - mu * mu, 0.0))
    z = _normal_quantile_upper(ktf / nd)  # mean + z std: the kt-th largest of normal scores
    lo = tl.full((), 0x007FFFFF, tl.uint32)  # the key of -inf: every visible score is >= it
    n_lo = nf
    hi = _key_of_float(m)
    hi = tl.maximum(hi, hi + 1)  # (+1, except for the largest key, a NaN's: no score is >= a NaN)
    n_hi = tl.zeros((), tl.float32)  # count(s >= float(hi)): none above the max
    fit = tl.zeros((), tl.int32)  # 1: the last sweep's candidates came from the fit (below)
    m_prev = nf  # scores inside the interval before the last sweep
    go = need & (n_lo != ktf) & (hi - lo > 1)
    for step in range(FIT + 16):  # (quarter points end any interval of 32-bit keys in 16 sweeps)
        if go:
            mm = n_lo - n_hi  # scores in [lo, hi) (>= 1)
            # the fit may place this sweep's candidates, unless it placed the last sweep's and that left
            # more than a quarter of the interval's scores (then quarter points, once)
            may_fit = (step < FIT) & ((fit == 0) | (4.0 * mm <= m_prev))
            if step == 0:
                # the statistical guess and half a std either side
                c1 = _key_of_float(mu + sd * (z - 0.5))
                c2 = _key_of_float(mu + sd * z)
                c3 = _key_of_float(mu + sd * (z + 0.5))
            elif may_fit & (lo == 0x007FFFFF):
                # every candidate so far had fewer than kt scores above it (the guess was too
                # high: a few huge scores inflate the std): step down from hi by 0.5, 1.5, 4.5 std
                fhi = _float_of_key(hi.to(tl.int32, bitcast=True))
                c1 = _key_of_float(fhi - 4.5 * sd)
                c2 = _key_of_float(fhi - 1.5 * sd)
                c3 = _key_of_float(fhi - 0.5 * sd)
            elif may_fit:
                # the fit: if the mm scores of the interval were spread evenly over its values, the
                # kt-th largest would sit a fraction (a + 1/2) / (mm + 1) of the way down from hi,
                # a = kt - n_hi; the candidates are that point and one binomial std either side
                a = ktf - n_hi
                frac = (a + 0.5) / (mm + 1.0)
                spread = tl.sqrt(tl.maximum(a, 1.0) * tl.maximum(mm - a, 1.0) / mm) / (mm + 1.0)
                flo, fhi = _float_of_key(lo.to(tl.int32, bitcast=True)), _float_of_key(hi.to(tl.int32, bitcast=True))
                c1 = _key_of_float(fhi - (fhi - flo) * tl.minimum(frac + spread, 1.0))
                c2 = _key_of_float(fhi - (fhi - flo) * frac)
                c3 = _key_of_float(fhi - (fhi - flo) * tl.maximum(frac - spread, 0.0))
            else:  # the interval's quarter points
                c1 = lo + ((hi - lo) >> 2)
                c2 = lo + ((hi - lo) >> 1)
                c3 = hi - ((hi - lo + 3) >> 2)  # lo + floor(3 (hi - lo) / 4), without overflow
            fit = ((step > 0) & may_fit).to(tl.int32)
            m_prev = mm
            c1 = tl.minimum(tl.maximum(c1, lo + 1), hi - 1)  # strictly inside, in order
            c2 = tl.minimum(tl.maximum(c2, c1), hi - 1)
            c3 = tl.minimum(tl.maximum(c3, c2), hi - 1)
            n1 = tl.zeros((), tl.float32)
            n2 = tl.zeros((), tl.float32)
            n3 = tl.zeros((), tl.float32)
            f1, f2, f3 = _float_of_key(c1.to(tl.int32, bitcast=True)), _float_of_key(c2.to(tl.int32, bitcast=True)), _float_of_key(c3.to(tl.int32, bitcast=True))
            if ONE_BLOCK:  # (not the loop below: its one pass was still a loop, 7 % more instructions)
                n1, n2, n3 = _select_counts(s_all, f1, f2, f3, ASM)
            else:
                for start in range(0, n_b, BLOCK):
                    s = _scores_chunk(row, start, cols, n_b, s_all, ONE_BLOCK)
                    a1, a2, a3 = _select_counts(s, f1, f2, f3, ASM)
                    n1 += a1
                    n2 += a2
                    n3 += a3
            # lo: the largest candidate with >= kt scores at or above it; hi: the smallest with fewer
            n_lo = tl.where(n3 >= ktf, n3, tl.where(n2 >= ktf, n2, tl.where(n1 >= ktf, n1, n_lo)))
            lo = tl.where(n3 >= ktf, c3, tl.where(n2 >= ktf, c2, tl.where(n1 >= ktf, c1, lo)))
            n_hi = tl.where(n1 < ktf, n1, tl.where(n2 < ktf, n2, tl.where(n3 < ktf, n3, n_hi)))
            hi = tl.where(n1 < ktf, c1, tl.where(n2 < ktf, c2, tl.where(n3 < ktf, c3, hi)))
            go = need & (n_lo != ktf) & (hi - lo > 1)
    # Exactly kt scores >= t0 (the usual end, or no search): keep those. Otherwise hi = lo + 1,
    # so t0 = v is the kt-th largest value itself, held by several scores: keep s > v, then the
    # first kt - count(s > v) of the s == v in position order. No search: every finite score
    # (t0 the lowest float, so a first pass's -inf padding is not kept).
    t0 = tl.where(need, _float_of_key(lo.to(tl.int32, bitcast=True)), -3.4028234663852886e38)
    exact = (n_lo == ktf) | (not need)
    v = t0
    quota = kt
    if not exact:
        v = tl.full((), float("inf"), tl.float32)
        for start in range(0, n_b, BLOCK):
            s = _scores_chunk(row, start, cols, n_b, s_all, ONE_BLOCK)
            v = tl.minimum(v, tl.min(tl.where((s >= t0) & (start + cols < n_b), s, float("inf")), axis=0))
        n_gt = tl.zeros((), tl.int32)
        for start in range(0, n_b, BLOCK):
            s = _scores_chunk(row, start, cols, n_b, s_all, ONE_BLOCK)
            n_gt += tl.sum(((s > v) & (start + cols < n_b)).to(tl.int32), axis=0)
        quota = kt - n_gt
    # compaction: list position = running count of keeps (_compact_list), as two copies of its
    # loop: one where exactly kt scores clear v, and one with the tie pass's second cumsum
    lst = bh * NP + part  # this program's list
    out = lst.to(tl.int64) * KT
    pos_row = Pos + bh.to(tl.int64) * N + first
    if exact:
        kept = _compact_list(row, s_all, n_b, v, quota, Idx + out, Ssel + out, pos_row, P0, P1, first,
                             CBLOCK, ONE_BLOCK and CBLOCK == BLOCK, HAS_POS, False, ASM)
    else:
        kept = _compact_list(row, s_all, n_b, v, quota, Idx + out, Ssel + out, pos_row, P0, P1, first,
                             CBLOCK, ONE_BLOCK and CBLOCK == BLOCK, HAS_POS, True, ASM)
    # the entries listed: kt by construction (fewer only if scores were NaN, and then no
    # unwritten entry is read)
    kept = tl.minimum(kept, KT)
    if ATTEND:
        tl.debug_barrier()  # (this program's list entries, stored by its other threads, are visible)
        b, h = bh // H, bh % H
        _attend_list(Q, K2, V, Idx + out, Ssel + out, P0, kept, m, b, h, h // G, Mp, Lp, Accp, bh.to(tl.int64) * NCH + c,
                     stride_qb, stride_qh, stride_2b, stride_2h, stride_2t, stride_vb, stride_vh, stride_vt, scale2, HD,
                     R, R2, HDP, E)
    else:
        tl.store(Mx + lst, m)
        tl.store(Kt + lst, kept)
    if FILL:
        # the rest of the list, for the second pass: token 0 (any valid row) with score -inf, which
        # no kept token's weight e^(s - m) notices; NaN when the part's scores were NaN, so that a
        # NaN query head stays NaN through both passes
        e = tl.arange(0, KTP)
        pad = tl.where(s1 == s1, float("-inf"), float("nan"))
        tl.store(Idx + out + e, 0, mask=(e >= kept) & (e < KT))
        tl.store(Ssel + out + e, tl.zeros((KTP,), tl.float32) + pad, mask=(e >= kept) & (e < KT))


# Spark pass 3 as its own kernel, one program per (E listed tokens, query head), after the select
# (many query heads: the ATTEND comment above).
@jit
def _spark_gather_kernel(
    Idx,  # pointer to the kept lists [B H, KT] int32 (select kernel)
    Ssel,  # pointer to the kept scores [B H, KT] float32
    Mx,  # pointer to the max scores [B H] float32
    Kt,  # pointer to the kept counts [B H] int32
    H,  # query heads
    KT,  # row length of the lists
    # as the select kernel's ATTEND arguments:
    Q, K2, V, Mp, Lp, Accp, stride_qb, stride_qh, stride_2b, stride_2h, stride_2t, stride_vb, stride_vh, stride_vt,
    G, NCH, scale2, HD: tl.constexpr, R: tl.constexpr, R2: tl.constexpr, HDP: tl.constexpr, E: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lst = bh.to(tl.int64) * KT
    _attend_list(Q, K2, V, Idx + lst, Ssel + lst, c * E, tl.load(Kt + bh), tl.load(Mx + bh), b, h, h // G, Mp, Lp, Accp,
                 bh.to(tl.int64) * NCH + c, stride_qb, stride_qh, stride_2b, stride_2h, stride_2t, stride_vb,
                 stride_vh, stride_vt, scale2, HD, R, R2, HDP, E)


def _select_warps(block):
    """Warps of a select program holding `block` scores. On an H200 (one program alone, 8 query
    heads of normal scores, us): 2048 scores 5.0-5.1 with 4 warps, 5.5-5.7 with 8, 7.0 with 2;
    4096: 7.2-7.5 with 8, 7.6-7.8 with 4, 11.3-11.6 with 2; 8192: 10.2-10.4 with 8, 11.3-11.5
    with 16, 11.9 with 4. Up to 32768 scores in registers need 16 (64 a thread)."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _select_pass(S, k_top, H, lens, has_len, parts, prev=None, attend=None):
    """One launch of the select kernel over scores S [B H, N], each row in `parts` parts of
    cdiv(N, parts) scores (parts > 1: lists padded to KT, FILL), or (prev: the first pass's idx,
    kt and parts) over the first pass's lists. -> idx int32 [B H, parts KT], scores float32
    [B H, parts KT], max [B H parts], kt int32 [B H parts]; KT = min(k_top, part). attend: the
    kernel's ATTEND arguments (one part; then the list and the merge's partials are written, not
    max and kt)."""
    (BH, N), dev = S.shape, S.device
    L = triton.cdiv(N, parts)
    KT = min(k_top, L)
    idx = torch.empty(BH, parts * KT, dtype=torch.int32, device=dev)
    ssel = torch.empty(BH, parts * KT, dtype=torch.float32, device=dev)
    mx = torch.empty(BH * parts, dtype=torch.float32, device=dev)
    kt = torch.empty(BH * parts, dtype=torch.int32, device=dev)
    one = triton.next_power_of_2(L) <= MAX_SELECT_IN_REGISTERS
    block = triton.next_power_of_2(L) if one else SELECT_CHUNK
    pos, cnt, nprev = prev if prev is not None else (S, S, 1)  # (without prev: pointers never read)
    if attend is None:  # (pointers and sizes never read; NCH is the grid's first axis, so parts)
        attend = dict(Q=S, K2=S, V=S, Mp=S, Lp=S, Accp=S, stride_qb=0, stride_qh=0, stride_2b=0, stride_2h=0,
                      stride_2t=0, stride_vb=0, stride_vh=0, stride_vt=0, G=1, NCH=parts, scale2=1.0, HD=1, R=1,
                      R2=1, HDP=1, E=1, ATTEND=False)
    else:
        attend = dict(attend, ATTEND=True)
    _spark_select_kernel[(attend["NCH"], BH)](S, idx, ssel, mx, kt, lens, pos, cnt, H, N, L, KT, k_top, nprev,
                                              PP=triton.next_power_of_2(nprev), KTP=triton.next_power_of_2(KT) if parts > 1 else 1,
                                              BLOCK=block, ONE_BLOCK=one, CBLOCK=min(block, COMPACT_CHUNK), HAS_LEN=has_len,
                                              HAS_POS=prev is not None, FILL=parts > 1, FIT=max(FIT_STEPS, 1), ASM=S.is_cuda,
                                              **attend, num_warps=_select_warps(block), **_pdl(S))
    return idx, ssel, mx, kt


def _spark_select(S, k_top, H, lens, has_len, attend=None):
    """The select on scores S [B H, n] float32 (entries past each sequence's length ignored).
    -> idx int32 [B H, KT] (kept positions, ascending; the first kt of each row written), their
    scores float32 [B H, KT], each row's max [B H] and kt [B H] int32; KT = min(k_top, n).

    A cache longer than SELECT_SPLIT is selected in two passes: the kt largest of each of
    SELECT_PARTS parts of the row (in parallel, one program each), then the kt largest of those
    parts' lists. Exact: a token among the kt largest of the row is among the kt largest of its
    part. Ties stay in position order (the lists are in part order and ascending within a part).
    A part with fewer than kt visible tokens pads its list (score -inf); the second pass counts
    as tokens only the lists' kept entries, so a sequence with fewer than k_top visible tokens
    keeps them all and nothing else, as in one pass. Two passes only when the first pass's lists
    hold at most half the row (else one pass over about as many candidates costs less). On an
    H200 (8 query heads, kt 256): 32768 tokens 37 us against 49 in one pass, 65536 tokens 51
    against 178 (notes/kernels_gpu.md). attend (the attention's arguments, _spark_decode): the
    last pass also attends to the kept tokens and writes the merge's partials; its list is
    written as without it (each program writes its own entries), its max and kt are not."""
    n = S.shape[1]
    parts = SELECT_PARTS if n > SELECT_SPLIT else 1
    if parts == 1 or 2 * parts * min(k_top, triton.cdiv(n, parts)) > n:
        return _select_pass(S, k_top, H, lens, has_len, 1, attend=attend)
    idx, ssel, _, kt = _select_pass(S, k_top, H, lens, has_len, parts)
    return _select_pass(ssel, k_top, H, lens, False, 1, prev=(idx, kt, parts), attend=attend)


def _spark_decode(q, k1, k2, v, k_top, r, lengths):
    """spark_attention_decode_gpu's three kernels (the select twice past SELECT_SPLIT tokens; a
    gather kernel after it past ATTEND_PROGRAMS programs), arguments already checked. -> q's shape"""
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, n = k1.shape[1], k1.shape[2]
    qv = q.reshape(B, H, hd)
    G = H // Hkv
    dev, f32 = q.device, torch.float32
    lens, has_len = _len_args(lengths, q)
    prec = _precision(q)
    # 1. scores, the cache split over the SMs
    CH, NS = _split(n, B * Hkv)
    S = torch.empty(B * H, n, dtype=f32, device=dev)
    _spark_scores_kernel[(NS, B * Hkv)](
        qv, k1, S, lens, qv.stride(0), qv.stride(1), k1.stride(0), k1.stride(1), k1.stride(2), H, G, n,
        1.0 / math.sqrt(r), R=r, R1=_pad16(r), GP=_pad16(G), CH=CH, BN=min(ATTN_BN, CH), HAS_LEN=has_len, PREC=prec,
        num_warps=4, **_pdl(q))
    # 2. the selection (past SELECT_SPLIT tokens a first pass selects each part of the row:
    # _spark_select), and K2 and V of the kept tokens, GATHER_E per program: by the select's
    # programs themselves when they are few, else by a gather kernel; 3. the merge
    KT = min(k_top, n)  # (the last pass's list length, in both cases)
    NCH = triton.cdiv(KT, GATHER_E)
    mp = torch.empty(B * H, NCH, dtype=f32, device=dev)
    lp = torch.empty(B * H, NCH, dtype=f32, device=dev)
    accp = torch.empty(B * H, NCH, hd, dtype=f32, device=dev)
    attend = dict(Q=qv, K2=k2, V=v, Mp=mp, Lp=lp, Accp=accp, stride_qb=qv.stride(0), stride_qh=qv.stride(1),
                  stride_2b=k2.stride(0), stride_2h=k2.stride(1), stride_2t=k2.stride(2), stride_vb=v.stride(0),
                  stride_vh=v.stride(1), stride_vt=v.stride(2), G=G, NCH=NCH, scale2=1.0 / math.sqrt(hd - r), HD=hd,
                  R=r, R2=_pad16(hd - r), HDP=_pad16(hd), E=GATHER_E)
    if B * H * NCH <= ATTEND_PROGRAMS:
        _spark_select(S, k_top, H, lens, has_len, attend=attend)
    else:
        idx, ssel, mx, kt = _spark_select(S, k_top, H, lens, has_len)
        _spark_gather_kernel[(NCH, B * H)](idx, ssel, mx, kt, H, KT, **attend, num_warps=4, **_pdl(q))
    return _merge(mp, lp, accp, B, H, hd, q.dtype).view(q.shape)


@torch.no_grad()
def spark_attention_decode_gpu(q, k1, k2, v, k_top, r, *, lengths=None):
    """Spark attention for one new token per sequence in Triton; computes
    spark.spark_attention_np(q, k, v, k_top, r) with T = 1, where k = cat(k1, k2) on the last axis.

    q [B, H, 1, hd] or [B, H, hd]; k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]
    (prepare_spark_kv_gpu, or views into bigger buffers with a contiguous last axis) -> q's shape.
    A query that sees at most k_top tokens attends to all of them. Exactly min(k_top, visible)
    tokens per query head (ties: lowest positions first; module docstring). lengths: optional
    int32/int64 tensor [B] on the device, the tokens each query sees.
    """
    where = "spark_attention_decode_gpu"
    _check_inputs(where, q=q)
    hd = q.shape[-1]
    spark._check_int("r", r, 1, hd - 1)
    spark._check_int("k_top", k_top, 1)
    _check_decode(where, q, {"k1": (k1, r), "k2": (k2, hd - r), "v": (v, hd)}, lengths)
    return _spark_decode(q, k1, k2, v, k_top, r, lengths)


# ------------------------------------------------------------------------------------------
# 7d. Decoding a spark.GPT with these kernels inside a CUDA graph: generate_gpu
#
#    The loop is spark.decode_loop, GPT.generate's (same sampling, same random numbers, same
#    window rebuild past block_size); we hand it our prefill and our step. Why a graph: a decode
#    step of a 26-layer model launches ~10 kernels per layer; launched from Python each costs
#    several us of host time, more than many of the kernels take. Captured once, a step is one
#    graph launch. A graph replays fixed pointers and shapes, so:
#    - the KV cache is a static buffer of block_size tokens per layer (k and v its two halves;
#      Spark attention reads k as its two views k[..., :r] and k[..., r:]), written in place at
#      the new position (one index_copy_ with the position as a device tensor), and the kernels
#      launch block_size rows' worth of programs with `lengths` = n + 1 telling them how many
#      tokens are real;
#    - the new token and its position are static device tensors, refilled before each replay;
#    - the logits are a static output, cloned for the caller (the next replay overwrites them).
#    The prefill (the prompt, and the rebuild when the window slides) runs the model's own
#    forward (GPT._run) eagerly and copies its caches into the static buffers.
#    FFNs: SparkFFN -> spark_ffn_decode_gpu (weights re-laid once), GatedFFN -> spark.gated_ffn
#    (cuBLAS GEMVs), the other kinds -> their module (dense compute in torch). Each residual add
#    and the LayerNorm after it run as one kernel (_add_layernorm), in both models.
# ------------------------------------------------------------------------------------------


# The residual add and the LayerNorm after it, one kernel (torch runs them as two, ~3.4 us each
# at one token on an H200, four per layer). One program per row of d values:
#     x' = bf16(x + a)                    (the residual stream, rounded as the model's x + a is)
#     h = (x' - mean x') / sqrt(var x' + eps) w + b        (float32 sums; nn.LayerNorm's formula)
# As a decode kernel it launches with PDL: the kernel after it (our FFN's moments kernel, or a GEMV)
# is placed while it runs.
@jit
def _add_layernorm_kernel(
    X,  # pointer to x [B, d], contiguous (read)
    A,  # pointer to a [B, d], contiguous (read when HAS_A)
    W,  # pointer to the LayerNorm's weight [d]
    Bias,  # pointer to its bias [d] (read when HAS_BIAS)
    Xo,  # pointer to x' [B, d] (written when HAS_A)
    Ho,  # pointer to h [B, d] (written)
    D,  # d
    eps,  # the LayerNorm's epsilon
    DP: tl.constexpr,  # d padded to a power of two
    HAS_A: tl.constexpr,  # a given (else h = LayerNorm(x))
    HAS_BIAS: tl.constexpr,  # the LayerNorm has a bias
    PDL: tl.constexpr,  # programmatic dependent launch (_pdl)
):
    _wait_previous(PDL)
    row = tl.program_id(0).to(tl.int64) * D
    c = tl.arange(0, DP)
    m = c < D
    BF16: tl.constexpr = Ho.dtype.element_ty == tl.bfloat16  # (rounded by _bf16_round: the interpreter's
    # float32 -> bf16 conversion truncates, the GPU's rounds to nearest even)
    x = tl.load(X + row + c, mask=m, other=0.0).to(tl.float32)
    if HAS_A:
        x = x + tl.load(A + row + c, mask=m, other=0.0).to(tl.float32)
        x = (_bf16_round(x) if BF16 else x).to(Xo.dtype.element_ty)
        tl.store(Xo + row + c, x, mask=m)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(m, x - mean, 0.0)
    h = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps) * tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(Bias + c, mask=m, other=0.0).to(tl.float32)
    tl.store(Ho + row + c, (_bf16_round(h) if BF16 else h).to(Ho.dtype.element_ty), mask=m)


def _add_layernorm(x, a, ln):
    """(x + a, ln(x + a)) for x, a [B, d] (a None: (x, ln(x))), ln an nn.LayerNorm."""
    x, a = x.contiguous(), None if a is None else a.contiguous()  # (no copy when they already are)
    h = torch.empty_like(x)
    xo = x if a is None else torch.empty_like(x)
    bias = ln.bias if ln.bias is not None else ln.weight  # (without a bias: a pointer never read)
    _add_layernorm_kernel[(x.shape[0],)](x, x if a is None else a, ln.weight, bias, xo, h, x.shape[1], ln.eps,
                                         DP=triton.next_power_of_2(x.shape[1]), HAS_A=a is not None,
                                         HAS_BIAS=ln.bias is not None, num_warps=4, **_pdl(x))
    return xo, h


# Each layer's FFN as a function of h [B, d]: prepared once, when the decoder is built, so that
# the graph captures only the kernels (no re-layout per step).
def _ffn_kernel_gpu(ffn):
    """The decode function of one layer's FFN module, its weights re-laid once: h [B, d] -> [B, d]."""
    if isinstance(ffn, spark.SparkFFN):
        w, k, r = prepare_spark_ffn_gpu(ffn.K1, ffn.K2, ffn.V), ffn.k, ffn.r
        return lambda h: spark_ffn_decode_gpu(h, *w, k, r)
    if isinstance(ffn, spark.GatedFFN):
        return lambda h: spark.gated_ffn(h, ffn.Wg, ffn.Wu, ffn.Wd, ffn.act)
    return ffn


def _linear(x, w, b):
    """x [B, in] @ w [in, out] (+ b [out])."""
    return x @ w if b is None else torch.addmm(b, x, w)


class _GraphDecoder:
    """Static buffers of one model at batch B, and (with graph=True) the CUDA graph of one step."""

    @torch.no_grad()  # (the re-laid weights are copies, not something autograd should track)
    def __init__(self, model, B, graph):
        c, w = model.config, model.wte.weight
        self.model, self.use_graph, self.graph, self.logits = model, graph, None, None
        self.layers = []
        for blk in model.blocks:
            att = blk.attn
            is_spark = isinstance(att, spark.SparkAttention)
            # k, v [B, Hkv, block_size, hd], zero beyond what prefill and steps write: the two halves
            # of one buffer, so that the new token's key and value are one write (one kernel, not
            # two). Spark attention reads k as two views, k[..., :r] and k[..., r:] (each a
            # contiguous run of every row: 256 of 512 bytes per token at the Gemma shapes, which a
            # GPU reads at full speed in 32-byte sectors), as dense attention reads k whole.
            kv = torch.zeros(B, 2, att.Hkv, c.block_size, att.hd, dtype=w.dtype, device=w.device)
            bufs = {"kv": kv, "k": kv[:, 0], "v": kv[:, 1]}
            # The attention projections as [in, out] matrices, q, k and v side by side: one GEMV instead
            # of three, and the layout cuBLAS reads at full speed for one token (through nn.Linear's
            # [out, in] weights an H200 ran these four GEMVs at ~0.8 TB/s: 37 of a dense layer's ~140 us).
            # The price: a second copy of these weights, (H + 2 Hkv) hd d + H hd d values per layer.
            lins = (att.q_proj, att.k_proj, att.v_proj)
            proj = {"w_qkv": torch.cat([m.weight for m in lins]).t().contiguous(),  # [d, (H + 2 Hkv) hd]
                    "b_qkv": None if att.q_proj.bias is None else torch.cat([m.bias for m in lins]),
                    "w_o": att.o_proj.weight.t().contiguous(), "b_o": att.o_proj.bias}  # [H hd, d]
            self.layers.append({"blk": blk, "spark": is_spark, "ffn": _ffn_kernel_gpu(blk.ffn), **proj, **bufs})
        self.tok = torch.zeros(B, dtype=torch.long, device=w.device)  # [B] the new token
        self.pos = torch.zeros(1, dtype=torch.long, device=w.device)  # [1] its position n
        self.lengths = torch.ones(B, dtype=torch.int32, device=w.device)  # [B] n + 1 visible tokens

    @torch.no_grad()
    def prefill(self, window):
        """window [B, T] through the model's own forward; its caches copied into ours. -> logits [B, V]"""
        caches = [{} for _ in self.layers]
        logits = self.model._run(window, caches)[:, -1]  # fills caches[i]["k"], ["v"] [B, Hkv, T, hd]
        T = window.shape[1]
        for layer, cache in zip(self.layers, caches):
            for name in ("k", "v"):
                layer[name][:, :, :T].copy_(cache[name])
        return logits

    def _step(self):
        """One decode step on the static buffers (the body the graph captures). -> logits [B, V]"""
        model, B = self.model, self.tok.shape[0]
        lns = [ln for layer in self.layers for ln in (layer["blk"].ln_1, layer["blk"].ln_2)] + [model.ln_f]
        # x: the residual stream [B, d]; h: the LayerNorm of it that the next sublayer reads
        x, h = _add_layernorm(model.wte(self.tok) + model.wpe(self.pos), None, lns[0])
        for i, layer in enumerate(self.layers):
            blk, att = layer["blk"], layer["blk"].attn
            qkv = _linear(h, layer["w_qkv"], layer["b_qkv"])  # [B, (H + 2 Hkv) hd]
            q = qkv[:, :att.H * att.hd].view(B, att.H, att.hd)
            # the new token's key and value, at position n of the cache, in place
            layer["kv"].index_copy_(3, self.pos, qkv[:, att.H * att.hd:].view(B, 2, att.Hkv, 1, att.hd))
            # the kernels without their argument checks: these are the decoder's own buffers, and
            # the device-side check of lengths would add four small kernels to every layer
            if layer["spark"]:
                kc = layer["k"]
                o = _spark_decode(q, kc[..., :att.r], kc[..., att.r:], layer["v"], att.k_top, att.r, self.lengths)
            else:
                o = _flash_decode(q, layer["k"], layer["v"], self.lengths, None)  # [B, H, hd]
            x, h = _add_layernorm(x, _linear(o.reshape(B, -1), layer["w_o"], layer["b_o"]), lns[2 * i + 1])
            x, h = _add_layernorm(x, layer["ffn"](h), lns[2 * i + 2])  # (the last: ln_f)
        return h @ model.wte.weight.T  # [B, V]

    @torch.no_grad()  # (also when called directly, as the benchmark does: nothing for autograd to record)
    def step(self, tok, n):
        """tok [B, 1] at position n (n tokens cached). -> logits [B, V] (a fresh tensor)"""
        if not 0 <= n < self.model.config.block_size:  # (the kernels' lengths are not checked on the device)
            raise ValueError(f"step: position n must be in [0, block_size = {self.model.config.block_size}), got {n}")
        # the step's inputs go into the static tensors the graph reads (three small device writes;
        # the host never waits for the GPU)
        self.tok.copy_(tok[:, 0])
        self.pos.fill_(n)
        self.lengths.fill_(n + 1)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            # warm-up on a side stream (compiles the Triton kernels; CUDA graphs want it), then capture.
            # The warm-up writes the same cache row the replay writes: the step is idempotent.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits.clone()


@torch.no_grad()
def generate_gpu(model, idx, max_new_tokens, temperature=1.0, top_k=None, *, return_logits=False, graph=None):
    """spark.GPT.generate with the GPU decode kernels, one CUDA graph replay per token:
    idx [B, T] -> [B, T + max_new_tokens] (and the logits each token was drawn from, [B, new, V]).

    Same arguments and the same loop (spark.decode_loop) as GPT.generate, so with the same torch
    seed it returns the same tokens, up to float rounding deciding a near-tie (the kernels sum in
    another order; greedy decoding is the robust comparison). temperature 0 = greedy.
    graph: capture the step in a CUDA graph (default: on CUDA; the interpreter runs it eagerly).
    Memory: besides a static KV cache of block_size tokens per layer, a second copy of the
    attention projections re-laid for one-token GEMVs (736 MB at Gemma-2 2B shapes).
    """
    spark.check_decoder_args("generate_gpu", model, idx, max_new_tokens, temperature, top_k)
    _check_inputs("generate_gpu", model=model.wte.weight)
    if idx.device != model.wte.weight.device:
        raise ValueError(f"generate_gpu: idx must be on the model's device {model.wte.weight.device}, got {idx.device}")
    on_cuda = model.wte.weight.is_cuda
    if graph and not on_cuda:
        raise ValueError("generate_gpu: graph=True needs a model on a CUDA device")
    dec = _GraphDecoder(model, idx.shape[0], on_cuda if graph is None else graph)
    return spark.decode_loop(dec.prefill, dec.step, idx, max_new_tokens, temperature, top_k, model.config.block_size,
                             return_logits)


# ------------------------------------------------------------------------------------------
# 7e. Polar selective head attention decode (arXiv 2505.14884, selective head attention;
#    notes/papers.md, "Other systems"). Reference: spark.polar_attention_np with T = 1.
#
#    Section 7c's flash-decoding over a table of kept groups instead of every group:
#        heads [B, HT]: the KV groups sequence b keeps (int32 or int64, any order, distinct)
#        _attn_split_kernel, one program per (split c, sequence b, slot j):
#            g = heads[b, j];  (m, l, acc) of the G query heads of g over split c of K[b, g], V[b, g]
#            -> partial row (b HT + j) G + i, i < G      (dense: j = g, NU = Hkv: row b H + h)
#        _decode_merge_kernel, one program per output head (b, h):
#            j = the slot with heads[b, j] == h // G, if any
#            out[b, h] = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c   if there is one, else 0
#    The merge runs over all B H output heads so that it also writes the skipped heads' zeros
#    (no memset, no scatter: one launch); each program finds its slot by comparing its group
#    with the HT entries of its sequence (one load of HT <= Hkv integers).
#
#    Bytes: 2 n hd per kept group (its K and V, read once for its G query heads, tl.dot with G
#    padded to GP = 16 rows), vs 2 n hd per group dense; plus float32 partials, 2 (hd + 2) per kept
#    query head and split, written and read. At B 16, H = Hkv 32, n 2048, hd 128, bf16, HT 16:
#    268 MB of cache vs 537 MB (the 2x byte limit), partials 0.27 MB. FLOPs: 4 n hd per kept
#    query head. Splits: _split(n, B HT), about TARGET_PROGRAMS programs over the kept groups.
#
#    Buffers: the partials (B HT G NCH (hd + 2) floats) and out are torch.empty with sizes from
#    the shapes alone. In a CUDA graph (how decoding runs: kernels_gpu.generate_gpu) they are
#    allocated once, at capture, and every replay reuses those addresses; in eager calls torch's
#    caching allocator hands back the same blocks (no cudaMalloc after the first call).
#
#    Bad tables. Shapes, dtype and device are checked on the host. The values (every entry in
#    [0, Hkv), none repeated within a sequence: the router's top-h_top never repeats, and a repeat
#    would compute a group twice while keeping fewer than h_top) cannot be read on a GPU without
#    a host synchronisation, which this section never does. So: a CPU table (the interpreter) is
#    checked on the host, an error naming heads; on a GPU the merge kernel checks each sequence's
#    row and writes NaN over every head of a sequence whose row is invalid (loud, no sync, works
#    inside a graph); the split kernel clamps an entry into [0, Hkv), so nothing is read outside
#    the cache.
# ------------------------------------------------------------------------------------------


def _check_heads(where, heads, B, Hkv, device):
    """heads: an int32/int64 tensor [B, HT] with 1 <= HT <= Hkv on q's device; a CPU table's values
    too (in [0, Hkv), no repeat within a row). A GPU table's values are the merge kernel's to flag."""
    if not isinstance(heads, torch.Tensor) or heads.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: heads must be an int32 or int64 tensor [B, h_top] of KV-group indices, got "
                        f"{getattr(heads, 'dtype', type(heads).__name__)}")
    if heads.dim() != 2 or heads.shape[0] != B or not 1 <= heads.shape[1] <= Hkv:
        raise ValueError(f"{where}: heads must be [B, h_top] = [{B}, h_top] with 1 <= h_top <= Hkv = {Hkv}, "
                         f"got {tuple(heads.shape)}")
    if heads.device != device:
        raise ValueError(f"{where}: heads must be on q's device {device}, got {heads.device}")
    if heads.device.type != "cpu":
        return  # (reading the values would make the host wait for the GPU: module comment, "Bad tables")
    out = ((heads < 0) | (heads >= Hkv)).any(1)
    if out.any():
        b = int(out.nonzero()[0])
        raise ValueError(f"{where}: heads must hold KV-group indices in [0, Hkv = {Hkv}); sequence {b} has "
                         f"{heads[b].tolist()}")
    s = heads.sort(dim=1).values
    rep = (s[:, 1:] == s[:, :-1]).any(1)
    if rep.any():
        b = int(rep.nonzero()[0])
        raise ValueError(f"{where}: heads must not repeat a KV group within a sequence (a top-h_top "
                         f"selection never does); sequence {b} has {heads[b].tolist()}")


@torch.no_grad()
def polar_attention_decode_gpu(q, k, v, heads, *, lengths=None):
    """Selective head attention of one new token per sequence (Polar Sparsity, arXiv 2505.14884),
    split-KV flash decoding over the kept KV groups only; computes spark.polar_attention_np with
    T = 1 and router logits whose h_top largest entries of sequence b are heads[b].

    q [B, H, 1, hd] or [B, H, hd], k v [B, Hkv, n, hd] (views with a contiguous last axis are read
    in place), heads [B, h_top] int32 or int64 on q's device: the KV groups sequence b keeps (with
    Hkv = H these are heads; under grouped-query attention each serves its G = H / Hkv query
    heads), any order, distinct, 1 <= h_top <= Hkv -> q's shape, the query heads of the other
    groups exactly 0. lengths: optional int32/int64 tensor [B], the tokens each query sees
    (in [1, n], checked on the device). A GPU table with an entry outside [0, Hkv) or a repeat gives NaN in every
    head of its sequence (no host synchronisation; a CPU table raises; section comment above).
    """
    where = "polar_attention_decode_gpu"
    _check_inputs(where, q=q)
    hd = q.shape[-1]
    B, H, Hkv, n, hd = _check_decode(where, q, {"k": (k, hd), "v": (v, hd)}, lengths)
    _check_heads(where, heads, B, Hkv, q.device)
    return _flash_decode(q, k, v, lengths, heads)


# ------------------------------------------------------------------------------------------
# 8. The benchmark: python kernels_gpu.py [--json PATH] [--quick] [--only topk|train_step|twell|decode|polar]
#    (CUDA only)
#
#    For each shape (bf16 rows, k = 8 % of D) every kernel is first checked against its
#    reference on the benchmark's own input (a wrong kernel is not timed: the run fails), then
#    timed inside a CUDA graph (triton.testing.do_bench_cudagraph: many calls captured back to
#    back, the median over replays), both sides alike. A graph takes the host out of the timing:
#    timed from Python, a backward through autograd spends 50-100 us of host time per call, and
#    that showed up as 1.2-1.9x slower kernels in some runs (after torch.compile had run in the
#    process). There is no L2 flush between calls; every tensor here is 196-268 MB against the
#    H200's 60 MB of L2, so a call finds at most the tail of the previous one's output in cache,
#    never its own input. Baselines in the same run:
#    exact top-k (torch.topk + scatter), eager torch (topk.statistical_topk), torch.compile of
#    it (when it compiles; the error is reported otherwise), and for the backward the torch
#    autograd backward of topk.statistical_topk. The floor is a device copy (x.clone(): one
#    read, one write) scaled to the bytes each operation must move; limit = t_baseline / t_floor
#    is the best speedup any kernel could show, fraction_of_limit = t_floor / t. A row above
#    100 % means the floor is not a bound for it: it is printed as such, never clamped.
# ------------------------------------------------------------------------------------------


def _check(name, got, ref, atol, rtol, rows=None):
    """Fail unless |got - ref| <= atol + rtol |ref| (NaN where ref is NaN) on `rows` (bool [R], all by default).
    bf16 outputs against float64 references: tests/test_kernels_gpu.py's tolerances (one bf16 ulp)."""
    got, ref = got.float().reshape(ref.shape[0], -1), ref.float().reshape(ref.shape[0], -1)
    if rows is not None:
        got, ref = got[rows], ref[rows]
    err = (got - ref).abs()
    bad = ~((err <= atol + rtol * ref.abs()) | (got.isnan() & ref.isnan()))
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} entries differ from the reference, max error "
                             f"{float(err.nan_to_num(math.inf).max()):.3g} (allowed {atol} + {rtol} |ref|); a wrong kernel is not timed")


def _rows_off_theta(x, k):
    """bool [R]: rows with no entry within float32 rounding of theta. An entry that close may
    survive on one side and not the other (its gradient then differs by g_j, and so does S):
    gradient checks skip those few rows (bf16 inputs sit on a coarse grid, so it happens)."""
    x64 = x.double()
    theta = statistical_threshold(x64, k)  # [R, 1] float64
    std = x64.std(dim=-1, keepdim=True, unbiased=False)
    return ((x64 - theta).abs() > 1e-5 * (theta.abs() + std)).all(dim=-1)


def _ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def _records(name, ours_ms, floor_ms, baselines):
    """One row per baseline {label: ms or error text}."""
    recs = []
    for label, t in baselines.items():
        if isinstance(t, str):
            print(f"  {name}: baseline {label} skipped: {t}")
            continue
        recs.append({"name": name, "baseline": label, "baseline_ms": t, "ms": ours_ms, "speedup": t / ours_ms,
                     "limit": t / floor_ms, "fraction_of_limit": floor_ms / ours_ms, "floor_ms": floor_ms,
                     "not_a_bound": floor_ms > ours_ms})
    return recs


def _time_or_error(fn, ref=None):
    """Time fn, or return its error text: torch.compile compiles at the first call, and may fail
    there. With ref, fn's result is checked first (as our kernels are): a wrong baseline is not timed."""
    try:
        if ref is not None:
            _check("this baseline", fn(), ref, 2e-5, 2.0**-8)
        return _ms(fn)
    except Exception as e:  # noqa: BLE001 (reported next to the table, not hidden)
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def bench_shape(R, D, density=0.08, dtype=torch.bfloat16):
    """Every kernel at [R, D], k = density * D: checked, then timed against its baselines."""
    k = max(1, round(density * D))
    q = normal_icdf(1.0 - k / D)
    shape = f"{R}x{D}/{str(dtype).removeprefix('torch.')}/k{k}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, g, u = (torch.randn(R, D, device="cuda", generator=gen).to(dtype) for _ in range(3))
    el = x.element_size()
    t_copy = _ms(lambda: x.clone())  # 1 read + 1 write of R D elements
    floor = lambda tensors: t_copy * tensors / 2  # noqa: E731  the copy's rate, for `tensors` passes of R D elements
    print(f"[{shape}] copy {t_copy * 1e3:.1f} us = {2 * R * D * el / t_copy / 1e9:.2f} TB/s")
    ok = _rows_off_theta(x, k)  # rows whose survivors cannot flip with rounding
    recs = []

    # Backward times: a CUDA graph cannot start from a forward recorded outside it (autograd runs
    # the backward on the forward's stream), so we time forward + backward in one graph and
    # subtract the forward's own time, for ours and every baseline alike.
    def bwd_ms(fwd, inputs, fwd_ms):
        return _ms(lambda: torch.autograd.grad(fwd(*inputs), inputs, g)) - fwd_ms

    def checked_bwd_ms(fwd, inputs, fwd_ms, refs):
        """bwd_ms of a baseline whose gradients are checked first; its error text if it fails."""
        if isinstance(fwd_ms, str):
            return fwd_ms
        try:
            for got_b, ref_b in zip(torch.autograd.grad(fwd(*inputs), inputs, g), refs):
                _check("this baseline's gradient", got_b, ref_b, 2e-5, 2.0**-8, ok)
            return bwd_ms(fwd, inputs, fwd_ms)
        except Exception as e:  # noqa: BLE001 (reported next to the table)
            return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"

    # --- statistical top-k, forward and backward -------------------------------------------
    ref = statistical_topk(x.double(), k)
    _check("stat_topk_fwd", statistical_topk_gpu(x, k), ref, 2e-5, 2.0**-8)
    cstat = torch.compile(statistical_topk, dynamic=False)  # compiled at its first call (inside _time_or_error)
    ours, eager = _ms(lambda: statistical_topk_gpu(x, k)), _ms(lambda: statistical_topk(x, k))
    compiled = _time_or_error(lambda: cstat(x, k), ref)
    recs += _records(f"stat_topk_fwd/{shape}", ours, floor(2), {
        "exact top-k (torch.topk + scatter)": _ms(lambda: exact_topk(x, k)),
        "eager torch (topk.statistical_topk)": eager, "torch.compile(topk.statistical_topk)": compiled})
    xr = x.detach().requires_grad_()
    _, mean, std = _stat_topk_fwd(x, q, 0.0, True)
    # the analytic gradient in float64, from the same statistics
    ref = statistical_topk_grad(g.double(), x.double(), mean.double()[:, None], std.double()[:, None], q)
    _check("stat_topk_bwd", torch.autograd.grad(statistical_topk_gpu(xr, k), xr, g)[0], ref, 2e-5, 2.0**-8, ok)
    recs += _records(f"stat_topk_bwd/{shape}", bwd_ms(lambda x: statistical_topk_gpu(x, k), [xr], ours), floor(3), {
        "eager torch autograd (topk.statistical_topk backward)": bwd_ms(lambda x: statistical_topk(x, k), [xr], eager),
        "torch.compile(topk.statistical_topk) backward": checked_bwd_ms(lambda x: cstat(x, k), [xr], compiled, [ref])})

    # --- fused gelu(statistical_topk(p)) * u, forward and backward ---------------------------
    ref = gelu_topk_mul(x.double(), u.double(), k)
    _check("gelu_topk_mul fwd", gelu_topk_mul_gpu(x, u, k), ref, 2e-5, 2.0**-8)
    cfused = torch.compile(gelu_topk_mul, dynamic=False)
    # the unfused Triton version: our top-k kernel, then torch's gelu and product (t stored, read back)
    unfused = lambda p, u: F.gelu(statistical_topk_gpu(p, k), approximate="tanh") * u  # noqa: E731
    ours, unf = _ms(lambda: gelu_topk_mul_gpu(x, u, k)), _ms(lambda: unfused(x, u))
    eager, compiled = _ms(lambda: gelu_topk_mul(x, u, k)), _time_or_error(lambda: cfused(x, u, k), ref)
    recs += _records(f"gelu_topk_mul/fwd/{shape}", ours, floor(3), {
        "statistical_topk_gpu, then torch gelu and *": unf, "eager torch (gelu_topk_mul)": eager,
        "torch.compile(gelu_topk_mul)": compiled})
    pr, ur = x.detach().requires_grad_(), u.detach().requires_grad_()
    p64, u64 = x.double().requires_grad_(), u.double().requires_grad_()
    ref = torch.autograd.grad(gelu_topk_mul(p64, u64, k), (p64, u64), g.double())
    got = torch.autograd.grad(gelu_topk_mul_gpu(pr, ur, k), (pr, ur), g)
    _check("gelu_topk_mul bwd dp", got[0], ref[0], 2e-5, 2.0**-8, ok)
    _check("gelu_topk_mul bwd du", got[1], ref[1], 2e-5, 2.0**-8, ok)
    recs += _records(f"gelu_topk_mul/bwd/{shape}", bwd_ms(lambda p, u: gelu_topk_mul_gpu(p, u, k), [pr, ur], ours),
                     floor(5), {"statistical_topk_gpu, then torch gelu and * (backward)": bwd_ms(unfused, [pr, ur], unf),
                                "eager torch autograd (gelu_topk_mul backward)":
                                bwd_ms(lambda p, u: gelu_topk_mul(p, u, k), [pr, ur], eager),
                                "torch.compile(gelu_topk_mul) backward":
                                checked_bwd_ms(lambda p, u: cfused(p, u, k), [pr, ur], compiled, ref)})
    return recs


# Training steps of a whole model. Sparse training computes every layer densely and masks it, so a
# sparse step does the dense step's FLOPs plus the selection: the question is how little that adds.
# The model is train_tiny.py's --preset gpt2-small (12 layers, d 768, 12 heads of 64, context
# 1024; the character vocabulary of its Shakespeare corpus, 84), one training step = forward and
# backward under bf16 autocast, gradient clipping and AdamW, as train_tiny.py runs it. Dense
# attention is SDPA (flash attention); the statistical top-k FFNs and Spark attention run this
# file's kernels (spark.TRITON). Every variant is first checked against its torch path (loss and
# gradients with spark.TRITON off), then timed in interleaved rounds, so that a change in clocks or
# a neighbour's load hits all of them alike. The floor: the step's matmul FLOPs,
#     6 N + 6 L d T  per token   (N weights in matmuls; causal attention: 2 matmuls of d T / 2, x 3)
# at the rate a large bf16 matmul reaches on this GPU (measured in the same run), so
# fraction_of_limit is the model FLOPs utilisation.
TRAIN_VARIANTS = ("dense/dense", "stat_topk/dense", "spark/dense", "spark/spark", "topk/dense")


def _train_step_check(config, batch):
    """Loss and gradients of one step with the Triton kernels equal those of the torch path, in
    float32: under bf16 autocast the torch path's scores are bf16 matmul outputs, whose ties and
    roundings select other keys than the kernels' float32 scores, so bf16 would compare roundings."""
    import spark

    torch.manual_seed(0)
    model = spark.GPT(config).cuda()
    x = torch.randint(config.vocab_size, (batch, config.block_size), device="cuda")
    grads = []
    for use_triton in (True, False):
        spark.TRITON = use_triton
        model.zero_grad(set_to_none=True)
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        grads.append([loss.detach().float()] + [p.grad.float() for p in model.parameters()])
    spark.TRITON = True
    # float32 sums in another order: an entry within rounding of a threshold may fall on the other
    # side, which moves a gradient by far less than 1 % of its norm (a wrong kernel: O(1)).
    for i, (a, b) in enumerate(zip(*grads)):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not rel < 0.01:
            raise AssertionError(f"train step {config.ffn}/{config.attn}: tensor {i} differs by {rel:.3f} "
                                 f"(relative norm) between the Triton and the torch path; not timed")


def bench_train_step(batch=32, rounds=5, steps=3, variants=TRAIN_VARIANTS, **over):
    """train_step/<variant> rows: ms per training step against dense/dense, and its MFU. The batch is
    the preset's 32 x 1024 tokens: at 8 x 1024 a dense step (~20-30 ms on an H200) is short enough
    for the host's kernel launches to show, and the sparse variants launch a few more per layer."""
    import dataclasses
    import spark
    from train_tiny import GRAD_CLIP, PRESETS, make_optimizer

    preset = {k: v for k, v in PRESETS["gpt2-small"].items() if k in spark.GPTConfig.__dataclass_fields__}
    base = spark.GPTConfig(vocab_size=84, **{**preset, **over})
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / (_ms(lambda: a @ a) * 1e-3)  # FLOP/s of a large bf16 matmul here
    runs = {}
    for name in variants:
        ffn, attn = name.split("/")
        config = dataclasses.replace(base, ffn=ffn, attn=attn)
        _train_step_check(config, 2)
        torch.manual_seed(0)
        model = spark.GPT(config).cuda()
        runs[name] = (model, make_optimizer(model, 1e-4), [])
    x = torch.randint(base.vocab_size, (batch, base.block_size), device="cuda")

    def step(model, opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, torch.roll(x, -1, dims=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()

    for r in range(rounds + 1):  # round 0 warms up (autotuning, compilation, allocator)
        for model, opt, times in runs.values():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(model, opt)
            end.record()
            end.synchronize()
            if r:
                times.append(start.elapsed_time(end) / steps)
    ms = {name: sorted(t)[len(t) // 2] for name, (_, _, t) in runs.items()}
    c, T = base, base.block_size
    n_mm = spark.count_params(c) - c.block_size * c.d_model  # weights in matmuls (the tied embedding as the head)
    floor_ms = batch * T * (6 * n_mm + 6 * c.n_layer * c.n_head * c.hd * T) / peak * 1e3
    shape = f"gpt2-small/B{batch}xT{T}/bf16"
    print(f"[train_step {shape}] bf16 matmul rate {peak / 1e12:.0f} TFLOP/s; ms per step: "
          + ", ".join(f"{n} {t:.2f}" for n, t in ms.items()))
    return [r for name in variants if name != "dense/dense"
            for r in _records(f"train_step/{name}/{shape}", ms[name], floor_ms, {"dense/dense (SDPA flash)": ms["dense/dense"]})]


# ------------------------------------------------------------------------------------------
# The TwELL rows: twell_ffn/... and twell_memory/... (CUDA only)
#
# 131072 tokens (64 x 2048), d 2048, f 5632, bf16, against the dense ReLU-gated FFN in eager
# torch (three cuBLAS matmuls, relu and a product) in the same run. Every TwELL result is
# checked against the dense FFN before it is timed (a wrong kernel is not timed: the run fails).
#
# Inputs like a trained L1 model's gate (we have no trained 1.5B model here; notes/papers.md,
# "L1-induced sparsity (Sakana)" reports ~29 nonzeros of 5632 per token). The gate of token t,
# neuron j is built as
#     z_tj = n_tj + b_t - theta - delta_j
#     n_tj = x_t[:d-2] . Wg[:d-2, j] ~ N(0, 1)   (x ~ N(0, 1), Wg ~ N(0, 1 / (d - 2)))
#     b_t ~ 0.4 Exp(1)        a per-token bias, heavy-tailed: most tokens have a few nonzeros, some hundreds
#     delta_j ~ N(0, 0.6^2)   a per-neuron offset: some neurons fire far more often than others
# carried by the last two input dimensions (x[:, d-2] = b_t - theta with Wg[d-2] = 1, x[:, d-1] = 1
# with Wg[d-1] = -delta). theta is set so that the mean count is f (1 - zeros): at 99.5 % zeros
# (28 per token) a simulation of this model gives median 12, 99th percentile ~350, and ~0.5 % of
# tokens with a tile over the 31 slots of C = 8 (the hybrid route). The run prints the measured
# histogram. Wu ~ N(0, 1/d), Wd ~ N(0, 1/f).
# ------------------------------------------------------------------------------------------


def _l1_like_gate(M, d, f, zeros, gen):
    """x [M, d], Wg [d, f] bf16 on the GPU whose gate relu(x Wg) is `zeros` zero on average (model above)."""
    b = 0.4 * torch.empty(M, device="cuda").exponential_(generator=gen)  # [M] per-token bias
    delta = 0.6 * torch.randn(f, device="cuda", generator=gen)  # [f] per-neuron offset
    # theta by bisection on the expected count, sum_j P(N(0, 1) > theta + delta_j - b_t), over 4096 tokens
    bs, lo, hi = b[:4096].double(), -10.0, 10.0
    for _ in range(40):
        theta = (lo + hi) / 2
        nnz = torch.special.ndtr(bs[:, None] - theta - delta.double()[None, :]).sum(1).mean()
        lo, hi = (theta, hi) if nnz > f * (1 - zeros) else (lo, theta)
    x = torch.randn(M, d, device="cuda", generator=gen)
    Wg = torch.randn(d, f, device="cuda", generator=gen) / math.sqrt(d - 2)
    x[:, d - 2], Wg[d - 2] = b - theta, 1.0
    x[:, d - 1], Wg[d - 1] = 1.0, -delta
    return x.bfloat16(), Wg.bfloat16()


def _dense_ffn(x, Wg, Wu, Wd):
    """The baseline: the ReLU-gated FFN in eager torch, y = (relu(x Wg) * (x Wu)) Wd (cuBLAS), bf16."""
    return (F.relu(x @ Wg) * (x @ Wu)) @ Wd


def _check_ffn(name, y, x, Wg, Wu, Wd):
    """Fail unless y is the dense FFN within what differently ordered float32 sums allow:
    |y - y_dense| <= 2^-5 sum_j |h_j Wd[j, i]| + 2^-7 |y_dense| per entry (g, u and h may each
    round one bf16 ulp, 2^-7 relative, apart; y as well). A dropped or doubled entry moves y_i by
    a whole term of that sum, far more than 1/32 of it for a row with a few dozen terms."""
    g, u = F.relu(x @ Wg), x @ Wu
    ref = ((g * u) @ Wd).float()
    bound = (g * u).abs().float() @ Wd.abs().float() * 2.0**-5 + ref.abs() * 2.0**-7
    bad = ~((y.float() - ref).abs() <= bound)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} entries of {y.numel()} differ from the dense FFN beyond "
                             "2^-5 sum|h Wd| + 2^-7 |y|; a wrong kernel is not timed")


def _peak_mb(fn):
    """MiB allocated by one call at its peak, above what was allocated before it (its output included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _count_histogram(counts, f):
    """Print the per-token nonzero counts as a histogram on powers of two."""
    edges = [0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, f + 1]
    c = counts.float()
    print(f"  nonzeros per token: mean {c.mean():.1f}, median {c.median():.0f}, 99th percentile "
          f"{c.quantile(0.99):.0f}, max {c.max():.0f} (of f = {f})")
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = int(((counts >= lo) & (counts < hi)).sum())
        label = f"{lo}" if hi == lo + 1 else f"{lo}..{hi - 1}"
        print(f"    {label:>12}: {k:>7} tokens {100 * k / counts.numel():6.2f} %  {'#' * round(60 * k / counts.numel())}")


def _tune(name, cfg, options, fn):
    """Time fn under each option (a dict merged into the module's cfg dict); keep the fastest."""
    base, times = dict(cfg), {}
    for opt in options:
        cfg.update(opt)
        try:
            times[tuple(opt.items())] = _ms(fn)
        except Exception as e:  # noqa: BLE001 (an option the GPU cannot run is reported, not fatal)
            print(f"  {name} {opt}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}")
        cfg.clear()
        cfg.update(base)
    if not times:  # none ran: keep the defaults
        return
    best = min(times, key=times.get)
    cfg.update(dict(best))
    print(f"  {name}: " + ", ".join(f"{dict(k)} {t:.3f} ms" for k, t in times.items()) + f" -> {dict(best)}")


def _main_point_rows(x, Wg, Wu, WuT, Wd, counts, run, t_dense, t_gate, shape):
    """At 99.5 % zeros, C = 8: the words against spark.twell_pack, the producer and consumer
    alone, packed and peak memory, and decode-sized calls."""
    M, d, f = x.shape[0], x.shape[1], Wg.shape[1]
    recs = []
    # words: the producer against spark.twell_pack of cuBLAS's gate, on 4096 rows. Both round the
    # same float32 value to bf16, but the two matmuls sum in other orders: an entry within float32
    # rounding of a bf16 boundary (or of 0) may differ, so we require 99 % identical, not 100 %.
    packed, over = twell_gate_pack_gpu(x[:4096], Wg)
    ref, ref_over = spark.twell_pack(F.relu(x[:4096] @ Wg))
    same = float((packed.view(torch.int32) == ref.view(torch.int32)).float().mean())
    same_over = float((over == ref_over).float().mean())
    print(f"  producer vs spark.twell_pack (4096 rows): {100 * same:.3f} % of words, {100 * same_over:.2f} % of flags identical")
    if same < 0.99 or same_over < 0.99:
        raise AssertionError("the producer's words differ from spark.twell_pack's beyond rounding; not timed")
    packed, over = twell_gate_pack_gpu(x, Wg)
    stat = torch.cat([over.int(), over.new_zeros(3, dtype=torch.int32)])  # its counter grows each call: unused here
    p32 = packed.view(torch.int32)
    recs += _records(f"twell_ffn/producer/{shape}", _ms(lambda: twell_gate_pack_gpu(x, Wg)), t_gate,
                     {"cuBLAS relu(x @ Wg) (dense g)": _ms(lambda: F.relu(x @ Wg))})
    g = F.relu(x @ Wg)  # the consumer's dense counterpart starts from a given g
    # the consumer's floor: a device copy moving its memory bytes (x read, y written, and the words
    # it reads: nT count words a row and the entries of the rows without overflow); its weight rows
    # come from L2 (all of Wu and Wd fits) and are not counted, so this bounds it loosely
    words_read = M * _check_tile(f, 256, 8)[0] + int(counts[~over].sum())
    buf = torch.empty((2 * x.numel() * 2 + 4 * words_read) // 2, dtype=torch.uint8, device=x.device)
    recs += _records(f"twell_ffn/consumer/{shape}", _ms(lambda: _consume(x, p32, stat, WuT, Wd, 256, 8, 0)),
                     _ms(lambda: buf.clone()), {"cuBLAS (g * (x @ Wu)) @ Wd, g given": _ms(lambda: (g * (x @ Wu)) @ Wd)})
    del g
    # memory: the packed gate against dense bf16 g (by construction C / 2 = 4x), and the peak of each call
    mb_packed, mb_dense = packed.numel() * 4 / 2**20, M * f * 2 / 2**20
    peak_ours, peak_dense = _peak_mb(run), _peak_mb(lambda: _dense_ffn(x, Wg, Wu, Wd))
    print(f"  memory: packed g {mb_packed:.0f} MiB vs dense bf16 g {mb_dense:.0f} MiB; peak of the call "
          f"{peak_ours:.0f} MiB (TwELL) vs {peak_dense:.0f} MiB (dense), outputs included")
    # the table prints these in its microsecond columns (ms x 1000): ms fields hold MiB / 1000, so "us" reads MiB
    recs += _records(f"twell_memory/packed_g_MiB/{shape}", mb_packed / 1000, mb_packed / 1000, {"dense bf16 g": mb_dense / 1000})
    recs += _records(f"twell_memory/peak_of_call_MiB/{shape}", peak_ours / 1000, peak_ours / 1000,
                     {"dense FFN (eager torch)": peak_dense / 1000})
    # decode: the first m tokens (their counts printed); default cap (= m: every row could overflow)
    for m in (1, 2, 4, 8, 16, 32, 64):
        xm = x[:m].contiguous()
        _check_ffn(f"twell_ffn_gpu decode M={m}", twell_ffn_gpu(xm, Wg, Wu, Wd, WuT=WuT), xm, Wg, Wu, Wd)
        torch.cuda.synchronize()
        recs += _records(f"twell_ffn/decode/M{m}/{d}x{f}/bf16", _ms(lambda: twell_ffn_gpu(xm, Wg, Wu, Wd, WuT=WuT)),
                         _ms(lambda: xm @ Wg), {"dense ReLU-gated FFN (eager torch, cuBLAS)": _ms(lambda: _dense_ffn(xm, Wg, Wu, Wd))})
    print(f"  decode tokens' nonzeros (first 64): {counts[:64].tolist()}")
    return recs


def bench_twell(quick=False, tune=True):
    """twell_ffn/... and twell_memory/... records (for kernels_gpu._records and _print_table)."""
    M, d, f = (4 * 2048 if quick else 64 * 2048), 2048, 5632
    gen = torch.Generator(device="cuda").manual_seed(0)
    Wu = (torch.randn(d, f, device="cuda", generator=gen) / math.sqrt(d)).bfloat16()
    Wd = (torch.randn(f, d, device="cuda", generator=gen) / math.sqrt(f)).bfloat16()
    recs, shape = [], f"{M}x{d}x{f}/bf16"
    print(f"[twell {shape}] gate model: see _l1_like_gate")
    for zeros in (0.995, 0.99, 0.98, 0.95):
        x, Wg = _l1_like_gate(M, d, f, zeros, gen)
        Wg, WuT, Wd = prepare_twell_gpu(Wg, Wu, Wd)
        counts = (F.relu(x @ Wg) != 0).sum(1)  # [M] nonzeros per token, from the dense gate
        t_dense = _ms(lambda: _dense_ffn(x, Wg, Wu, Wd))
        t_gate = _ms(lambda: x @ Wg)  # the gate matmul TwELL cannot skip: the floor
        for C in ((8,) if zeros > 0.985 else (8, 4)):
            # the producer alone first, so that cap holds every overflowing row (more would be an error)
            n_over = int(twell_gate_pack_gpu(x, Wg, 256, C)[1].sum())
            cap = max(min(M, max(CAP_MIN, -(-M // CAP_DIV))), -(-n_over * 5 // 4))
            run = lambda: twell_ffn_gpu(x, Wg, Wu, Wd, 256, C, cap=cap, WuT=WuT)  # noqa: E731
            print(f"  zeros {100 * zeros:.1f} %, C = {C}: {n_over} tokens overflow ({100 * n_over / M:.2f} %), cap {cap}")
            if zeros == 0.995 and C == 8:
                _count_histogram(counts, f)
                if tune and not quick:
                    _tune("producer", PRODUCE_CFG, [dict(BK=32, num_stages=n) for n in (4, 5)] + [dict(BK=64, num_stages=n) for n in (3, 4)],
                          lambda: twell_gate_pack_gpu(x, Wg))
                    _tune("consumer", CONSUME_CFG, [dict(E=e, num_warps=w) for e in (2, 4, 8) for w in (2, 4, 8)], run)
            _check_ffn(f"twell_ffn_gpu zeros {zeros} C {C}", run(), x, Wg, Wu, Wd)
            torch.cuda.synchronize()  # a failed device-side check would surface here, before any timing
            name = f"twell_ffn/{shape}/zeros{100 * zeros:.1f}/C{C}"
            recs += _records(name, _ms(run), t_gate, {"dense ReLU-gated FFN (eager torch, cuBLAS)": t_dense})
            if zeros == 0.995 and C == 8:
                recs += _main_point_rows(x, Wg, Wu, WuT, Wd, counts, run, t_dense, t_gate, shape)
    return recs


# ------------------------------------------------------------------------------------------
# The decode rows: bench_decode(quick=False)   (CUDA only)
#
#    Every kernel is checked against its reference (float64 torch on the same bf16 values) on
#    the benchmark's own inputs before it is timed; a wrong kernel fails the run. Then baseline
#    and ours are timed in CUDA graphs (triton.testing.do_bench_cudagraph, median), on 8 copies
#    of the weights or caches taken in turn: one copy of a layer's FFN is 127 MB and a 32K-token
#    cache 134 MB, against 60 MB of L2, so no call finds its bytes in cache from the last one
#    (a decoding model streams the other layers' weights between two visits of a layer).
#    Each row: ms, speedup, and the byte limit: t_baseline x bytes_ours / bytes_baseline (the
#    speedup if ours streamed its bytes as fast as the baseline streams its own), with both
#    sides' TB/s. Shapes: Gemma-2 2B (arXiv 2408.00118), spark.gemma2_2b_config.
# ------------------------------------------------------------------------------------------

COPIES = 8


def _cycled(fn, copies):
    """A function calling fn(copy) on the next copy each time: a graph captured from n calls
    holds calls on every copy in turn."""
    it = itertools.cycle(copies)
    return lambda: fn(*next(it))


def _byte_records(name, ours_ms, bytes_ours, baselines):
    """_records rows with the byte limit and TB/s. baselines {label: (ms, bytes)}."""
    recs = []
    for label, (t, nbytes) in baselines.items():
        for rec in _records(name, ours_ms, t * bytes_ours / nbytes, {label: t}):
            rec.update(bytes=bytes_ours, baseline_bytes=nbytes, TBps=bytes_ours / ours_ms / 1e9,
                       baseline_TBps=nbytes / t / 1e9)
            print(f"  {name} vs {label}: {t * 1e3:.1f} us ({nbytes / 1e6:.1f} MB, {rec['baseline_TBps']:.2f} TB/s) -> "
                  f"{ours_ms * 1e3:.1f} us ({bytes_ours / 1e6:.1f} MB, {rec['TBps']:.2f} TB/s): "
                  f"{rec['speedup']:.2f}x, byte limit {rec['limit']:.2f}x")
            recs.append(rec)
    return recs


def _randn(gen, *shape, std=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, device="cuda", generator=gen) * std).to(dtype)


def bench_spark_ffn_decode(M, d=2304, f_gated=9216, r=1024, density=0.08, dtype=torch.bfloat16):
    """Spark FFN decode (f = 1.5 f_gated) vs the dense GeGLU of equal parameters, M tokens."""
    f = round(1.5 * f_gated)
    k = max(1, round(density * f))
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = [tuple(_randn(gen, a, b, std=a ** -0.5, dtype=dtype) for a, b in ((d, f_gated), (d, f_gated), (f_gated, d)))
             for _ in range(COPIES)]
    sparse = [prepare_spark_ffn_gpu(_randn(gen, r, f, std=r ** -0.5, dtype=dtype),
                                    _randn(gen, d - r, f, std=(d - r) ** -0.5, dtype=dtype),
                                    _randn(gen, f, d, std=f ** -0.5, dtype=dtype)) for _ in range(COPIES)]
    x = _randn(gen, M, d, dtype=dtype)
    K1, K2t, V = sparse[0]
    ref = spark.spark_ffn(x.double(), K1.double(), K2t.double().t(), V.double(), k, r)
    # bf16 output and bf16 a before the V product: one bf16 rounding each (2^-9), against float64
    _check(f"spark_ffn_decode/M{M}", spark_ffn_decode_gpu(x, K1, K2t, V, k, r), ref,
           2.0**-7 * float(ref.abs().max()), 2.0**-7)
    # The baseline: the dense GeGLU of equal parameters (3 d f_gated = 2 d f) as torch runs it,
    # three cuBLAS GEMVs and two elementwise kernels, in a CUDA graph like ours. It reads
    # 3 d f_gated weights; ours r f + m (2 d - r), m the survivors gathered (their union at M > 1),
    # and the moments.
    gated = lambda x, Wg, Wu, Wd: (F.gelu(x @ Wg, approximate="tanh") * (x @ Wu)) @ Wd  # noqa: E731
    t_dense = _ms(_cycled(lambda *w: gated(x, *w), dense))
    t_ours = _ms(_cycled(lambda *w: spark_ffn_decode_gpu(x, *w, k, r), sparse))
    # neurons actually gathered: the union of the M tokens' survivors; and p's moments, float32:
    # R's upper triangle and mu
    m = float((statistical_topk(x.double()[:, :r] @ K1.double(), k) > 0).any(0).sum())
    el = x.element_size()
    bytes_ours, bytes_dense = (r * f + m * (2 * d - r)) * el + 4 * (r * (r + 1) // 2 + r), 3 * d * f_gated * el
    return _byte_records(f"spark_ffn_decode/d{d}_f{f}_r{r}_k{k}/M{M}", t_ours, bytes_ours,
                         {f"dense GeGLU f {f_gated} (torch, CUDA graph)": (t_dense, bytes_dense)})


def bench_spark_attention_decode(n, H=8, Hkv=4, hd=256, k_top=256, r=128, dtype=torch.bfloat16):
    """Spark attention decode vs SDPA and vs our dense flash-decoding, batch 1, one new token."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = [(_randn(gen, 1, Hkv, n, hd, dtype=dtype), _randn(gen, 1, Hkv, n, hd, dtype=dtype)) for _ in range(COPIES)]
    split = [prepare_spark_kv_gpu(k, v, r) for k, v in kv]
    q = _randn(gen, 1, H, 1, hd, dtype=dtype)
    k0, v0 = kv[0]
    ref = spark.attention(q.double(), k0.double(), v0.double())
    _check(f"attention_decode n{n}", attention_decode_gpu(q, k0, v0), ref, 2.0**-7 * float(ref.abs().max()), 2.0**-7)
    ref = spark.spark_attention(q.double(), k0.double(), v0.double(), k_top, r)
    _check(f"spark_attention_decode n{n}", spark_attention_decode_gpu(q, *split[0], k_top, r), ref,
           2.0**-7 * float(ref.abs().max()), 2.0**-7)
    # Two baselines over the same caches: torch's SDPA (dense, its own decode kernel choice) and our
    # dense flash-decoding, which shares the Spark kernels' split, merge and launch count: the
    # honest measure of what the sparsity itself buys.
    sdpa = lambda k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    t_sdpa, t_flash = _ms(_cycled(sdpa, kv)), _ms(_cycled(lambda k, v: attention_decode_gpu(q, k, v), kv))
    t_ours = _ms(_cycled(lambda k1, k2, v: spark_attention_decode_gpu(q, k1, k2, v, k_top, r), split))
    el, kt, G = q.element_size(), min(k_top, n), H // Hkv
    dense_bytes = 2 * Hkv * n * hd * el
    ours_bytes = Hkv * (n * r + min(n, G * kt) * (2 * hd - r)) * el  # count_costs' worst case (union of G selections)
    return _byte_records(f"spark_attention_decode/n{n}_H{H}_Hkv{Hkv}_hd{hd}_k{k_top}_r{r}", t_ours, ours_bytes,
                         {"SDPA (torch, dense)": (t_sdpa, dense_bytes),
                          "attention_decode_gpu (ours, dense flash-decoding)": (t_flash, dense_bytes)})


# The whole-model rows are checked in two ways before anything is timed: the token-for-token
# comparison below (a small float32 model: exact greedy agreement is meaningful there), and
# finite logits from the Gemma-shaped model itself (its bf16 greedy tokens may legitimately
# differ from GPT.generate's at a near-tie, so they are not compared).
def _model_check(tiny):
    """generate_gpu's greedy tokens equal GPT.generate's on train_tiny's model (float32, 2-D
    weights at 10x the init scale so that greedy decoding has no near-ties), a whole window."""
    torch.manual_seed(0)
    model = spark.GPT(tiny).cuda().eval()
    for p in model.parameters():
        p.data.mul_(10.0 if p.dim() == 2 else 1.0)
    idx = torch.zeros(2, 3, dtype=torch.long, device="cuda")
    new = tiny.block_size  # past block_size: the window slides and prefill rebuilds
    if not torch.equal(model.generate(idx, new, temperature=0), generate_gpu(model, idx, new, temperature=0)):
        raise AssertionError(f"decode_model: generate_gpu's greedy tokens differ from GPT.generate's ({tiny.ffn}/"
                             f"{tiny.attn}); not timed")


def bench_decode_model(n_ctx=8192, n_layer=26, dtype=torch.bfloat16):
    """Tokens per second of a Gemma-2-2B-shaped spark.GPT (random weights, batch 1, n_ctx - 1
    cached tokens + the new one), Spark FFN and attention vs the dense model of equal parameters,
    both decoded by generate_gpu's graph step."""
    for ffn, attn in (("spark", "spark"), ("dense", "dense")):
        _model_check(spark.GPTConfig(ffn=ffn, attn=attn))
    ms, costs = {}, {}
    for kind in ("dense", "spark"):
        cfg = spark.gemma2_2b_config(ffn=kind, attn=kind, n_layer=n_layer, block_size=n_ctx)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = spark.GPT(cfg).to(dtype).eval()
        # the decoder's static cache is filled with random keys and values (their values do not
        # change what a step reads), then one step at position n_ctx - 1 captures the graph
        dec = _GraphDecoder(model, 1, True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for layer in dec.layers:  # random cache contents: a full window, as after a long prompt
            for name in ("k", "v"):
                layer[name].copy_(_randn(gen, *layer[name].shape, dtype=dtype))
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        logits = dec.step(tok, n_ctx - 1)  # captures the graph; one replay
        if not torch.isfinite(logits).all():
            raise AssertionError(f"decode_model {kind}: non-finite logits; not timed")
        # one replay = one token through all layers and the LM head; do_bench flushes L2 between
        # replays (irrelevant here: a step streams GBs of weights)
        ms[kind] = triton.testing.do_bench(dec.graph.replay, rep=500, return_mode="median")
        costs[kind] = spark.count_costs(cfg, n_ctx)
        del model, dec
        torch.cuda.empty_cache()
    name = f"decode_model/gemma2-2b_L{n_layer}/n{n_ctx}/B1/{str(dtype).removeprefix('torch.')}"
    recs = _byte_records(name, ms["spark"], costs["spark"]["decode_bytes"],
                         {"dense model (generate_gpu: cuBLAS GEMVs + attention_decode_gpu)":
                          (ms["dense"], costs["dense"]["decode_bytes"])})
    for rec in recs:
        rec.update(tokens_per_s=1e3 / ms["spark"], baseline_tokens_per_s=1e3 / ms["dense"])
    print(f"  {name}: {1e3 / ms['dense']:.0f} -> {1e3 / ms['spark']:.0f} tokens/s; count_costs byte limit "
          f"{costs['dense']['decode_bytes'] / costs['spark']['decode_bytes']:.2f}x")
    return recs


def bench_decode(quick=False):
    """All decode rows: spark_ffn_decode/..., spark_attention_decode/..., decode_model/... (CUDA only).

    FFN at batch 1, 2, 4, 8; attention at n = 1024 .. 32768; the whole model at context 8192.
    quick: fewer shapes and a 4-layer model at context 2048 (a smoke run; its numbers mean little).
    """
    if triton is None or not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU and triton; tests/test_kernels_gpu_decode.py runs the kernels in the interpreter")
        return []
    recs = [r for M in ((1, 4) if quick else (1, 2, 4, 8)) for r in bench_spark_ffn_decode(M)]
    recs += [r for n in ((1024, 8192) if quick else (1024, 2048, 4096, 8192, 16384, 32768))
             for r in bench_spark_attention_decode(n)]
    recs += bench_decode_model(**(dict(n_layer=4, n_ctx=2048) if quick else {}))
    return recs


# ------------------------------------------------------------------------------------------
# Benchmark (CUDA only): polar_attention_decode/... rows, as kernels_gpu's bench_decode.
#    Shape: batch 16, H = Hkv = 32 heads, 2048 cached tokens, hd 128, bf16 (a 7B-class layer's
#    attention in decode), each sequence keeping its own random h_top groups. Baselines over the
#    same caches: our kernel with the table of every group (what the table alone buys), our dense
#    attention_decode_gpu (no table: what looking the table up costs), and torch's SDPA over
#    every head (q [B, H, 1, hd]). CUDA graphs (_ms), caches cycled over COPIES copies (each
#    537 MB, far above the 50 MB L2). Byte limit: Hkv / h_top (the kept fraction of the cache);
#    SDPA itself on a contiguous half of the heads measured 1.92x (notes/papers.md, "Other systems").
# ------------------------------------------------------------------------------------------


def bench_polar_decode(B=16, H=32, Hkv=32, n=2048, hd=128, keeps=(0.25, 0.5, 0.75, 1.0), dtype=torch.bfloat16):
    """Rows polar_attention_decode/B.._H.._Hkv.._n.._hd.._dtype/keepP for each kept fraction in keeps,
    each checked against spark.polar_attention (float64) before it is timed."""
    if triton is None or not torch.cuda.is_available():
        print("bench_polar_decode needs a CUDA GPU and triton; tests/test_kernels_gpu_polar.py runs the kernels in the "
              "interpreter")
        return []
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = [(_randn(gen, B, Hkv, n, hd, dtype=dtype), _randn(gen, B, Hkv, n, hd, dtype=dtype)) for _ in range(COPIES)]
    q = _randn(gen, B, H, 1, hd, dtype=dtype)
    every = torch.arange(Hkv, dtype=torch.int32, device="cuda").repeat(B, 1)  # [B, Hkv] the table of all groups
    sdpa = lambda k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hkv)  # noqa: E731
    el = q.element_size()
    shape = f"B{B}_H{H}_Hkv{Hkv}_n{n}_hd{hd}_{str(dtype).removeprefix('torch.')}"
    dense_bytes = 2 * B * Hkv * n * hd * el  # K and V of every group
    base = {"polar_attention_decode_gpu, every group (ours)":
            (_ms(_cycled(lambda k, v: polar_attention_decode_gpu(q, k, v, every), kv)), dense_bytes),
            "attention_decode_gpu (ours, dense, no table)":
            (_ms(_cycled(lambda k, v: attention_decode_gpu(q, k, v), kv)), dense_bytes),
            "SDPA every head (torch)": (_ms(_cycled(sdpa, kv)), dense_bytes)}
    recs = []
    for keep in keeps:
        HT = max(1, round(keep * Hkv))
        # a random set of HT groups per sequence and per copy (a router's choice differs by sequence)
        tables = [torch.rand(B, Hkv, generator=gen, device="cuda").argsort(dim=1)[:, :HT].int() for _ in range(COPIES)]
        k0, v0 = kv[0]
        logits = torch.zeros(B, 1, Hkv, dtype=torch.float64, device="cuda").scatter_(2, tables[0][:, None].long(), 1.0)
        ref = spark.polar_attention(q.double(), k0.double(), v0.double(), logits, HT)
        # bf16: p rounded to bf16 before the product with V (2^-9 of sum p |v|) and out stored in bf16
        _check(f"polar_attention_decode keep {HT}/{Hkv}", polar_attention_decode_gpu(q, k0, v0, tables[0]), ref,
               2.0**-7 * float(v0.abs().max()), 2.0**-7)
        del ref, logits
        polar = lambda k, v, hs: polar_attention_decode_gpu(q, k, v, hs)  # noqa: E731
        t = _ms(_cycled(polar, [(*c, hs) for c, hs in zip(kv, tables)]))
        name = f"polar_attention_decode/{shape}/keep{round(100 * HT / Hkv)}"
        for rec in _byte_records(name, t, 2 * B * HT * n * hd * el, base):
            recs.append({**rec, "keep": HT / Hkv, "h_top": HT})
    return recs


def plot_polar(records, path):
    """The speedup of polar_attention_decode over each baseline against the fraction of KV groups
    kept (the rows of bench_polar_decode), with the byte limit Hkv / h_top; writes path."""
    from matplotlib.figure import Figure  # (no pyplot: nothing is shown, so no GUI backend is needed)

    rows = [r for r in records if r["name"].startswith("polar_attention_decode/")]
    ax = Figure(figsize=(7, 4), layout="tight").subplots()
    for label in dict.fromkeys(r["baseline"] for r in rows):  # (in first-seen order)
        x, s = zip(*sorted((100 * r["keep"], r["speedup"]) for r in rows if r["baseline"] == label))
        ax.plot(x, s, marker="o", ms=4, label=f"vs {label}")
    x, lim = zip(*sorted({(100 * r["keep"], r["limit"]) for r in rows}))
    ax.plot(x, lim, ls="--", color="0.4", label="byte limit (cache bytes read)")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    ax.set(title=f"Polar decode, {rows[0]['name'].split('/')[1]}{gpu}", xlabel="KV groups kept per sequence (%)",
           ylabel="speedup (x)", xticks=x, ylim=(0, None))
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    return path


def _print_table(recs):
    print(f"\n{'kernel':<46} {'baseline':<52} {'base us':>9} {'ours us':>9} {'speedup':>8} {'limit':>7} {'of limit':>9}")
    for r in recs:
        limit = "NOT A BOUND" if r["not_a_bound"] else f"{r['limit']:.2f}x"
        print(f"{r['name']:<46} {r['baseline']:<52} {r['baseline_ms'] * 1e3:>9.1f} {r['ms'] * 1e3:>9.1f} "
              f"{r['speedup']:>7.2f}x {limit:>7} {r['fraction_of_limit']:>8.0%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="kernels_gpu.py's kernels against their baselines: time, speedup, limit.")
    ap.add_argument("--json", metavar="PATH", help="also write the table as a JSON list of records")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run; its numbers mean little)")
    ap.add_argument("--only", choices=("topk", "train_step", "twell", "decode", "polar"), help="one part of the benchmark")
    args = ap.parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        print("kernels_gpu.py: the benchmark needs a CUDA GPU and triton; none here "
              "(tests/test_kernels_gpu.py runs the kernels in Triton's interpreter)")
        return []
    shapes = [(1024, 16384), (2048, 3000)] if args.quick else [(8192, 16384), (8192, 13824), (32768, 3000), (2048, 65536)]
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"machine: {', '.join(f'{k} {v}' for k, v in machine.items())}, bf16 rows, k = 8 % of D")
    recs = [r for R, D in shapes for r in bench_shape(R, D)] if args.only in (None, "topk") else []
    if args.only in (None, "train_step"):
        recs += bench_train_step(**(dict(batch=2, n_layer=2, block_size=256, attn_k=64) if args.quick else {}))
    if args.only in (None, "twell"):
        recs += bench_twell(quick=args.quick)
    if args.only in (None, "decode"):
        recs += bench_decode(quick=args.quick)
    if args.only in (None, "polar"):
        polar = bench_polar_decode(**(dict(B=4, n=512) if args.quick else {}))
        recs += polar
        if not args.quick:  # (a smoke run's numbers do not replace the figure)
            plot_polar(polar, os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes", "figures", "polar_decode.png"))
    _print_table(recs)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump([{**r, **machine} for r in recs], fh, indent=1)
    return recs


if __name__ == "__main__":
    main()
