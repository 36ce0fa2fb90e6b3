"""kernels_cpu.py: sparse decoding that is really faster on a CPU, measured against dense.

The Spark Transformer (You et al. 2025, arXiv 2506.06644) reports decoding up to 1.79x faster on
a 16-core CPU with kernels that are not public. This file turns the sparsity of spark.py into
wall time on a laptop-class CPU with PyTorch eager operations, plus one optional fused loop in
C for the two FFN decoders (section 3b: what eager ops cannot express), and measures it.
Each fast path names the NumPy reference it must match (spark.py, topk.py) and keeps its
argument names; tests/test_kernels_cpu.py checks every one of them against its reference.

What a reader learns here
- Decoding one token is memory-bound: a [d, f] weight matrix is read once per token and each
  weight is used for one multiply-add, so time = bytes read / memory bandwidth. A sparse layer
  is faster exactly by the factor of bytes it does *not* read, no more (the "byte limit").
- To read only the neurons that fire, each neuron's weights must be one contiguous row; we
  re-lay the matrices once (`prepare_*`, like loading a checkpoint) so every gather reads rows.
- On 2 shared cores the fixed costs matter as much as the bytes: each eager op costs 5-50 us,
  a big intermediate allocation costs page faults, an op that wakes the second thread costs a
  barrier. We count them and keep the op count small; where ~10 small ops remain per token
  (the FFN decoders' gather loop), one C call on torch's own threads replaces them.

The kernels, small to large
1. statistical_topk_cpu       fast statistical top-k over rows (training / prefill shapes),
                              matches topk.statistical_topk(_np)
2. spark_ffn_decode_cpu       Spark FFN, one token or a few (union of survivors),
                              matches spark.spark_ffn_np; weights from prepare_spark_ffn_cpu
3. relu_ffn_decode_cpu        ReLU-gated FFN of an L1-sparse model (Sakana, arXiv 2603.23198),
                              matches the y of spark.relu_l1_ffn_np; weights from prepare_relu_ffn_cpu
3b. the fused loop            both FFN decoders' per-neuron work in one C function (fused=,
                              fused_status()); the eager path stays, for reading and as fallback
4. spark_attention_decode_cpu one query per head against a KV cache split at r,
                              matches spark.spark_attention_np with T = 1; cache from prepare_spark_kv_cpu
5. generate_cpu               decode a spark.GPT with these kernels, same tokens as GPT.generate
6. `python kernels_cpu.py [--json PATH]`: the benchmark, dense vs sparse in one run.

Dimension letters (every shape comment below uses them)
    d    model width                     f    FFN width (neurons)
    r    predictor slice: the first r of d (FFN) or of hd (attention)
    k    FFN neurons kept per token (target; the statistical threshold keeps about k)
    m    neurons actually gathered (survivors of one token, or their union over M tokens)
    M    tokens in one call (1 when decoding one sequence, B when decoding a batch)
    B    batch size        H, Hkv   query heads, key/value heads (G = H // Hkv query heads share one)
    hd   head size         n        cached tokens        kt   tokens kept per query (k_top)
    D    row length in top-k         R    rows in top-k

Conventions: row vectors, y = x @ W with W [in, out] (as spark.py); float32 unless said.
GELU is the tanh approximation (spark.py, Gemma).
"""

import argparse
import functools
import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from topk import check_k, normal_icdf, statistical_topk_grad

# ------------------------------------------------------------------------------------------
# 0. Small helpers: argument checks and the row-table view of a KV cache
# ------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float64)  # the decode kernels' dtypes (see _check_tensors)

# torch warns once per process that sparse CSR tensors are "beta" the first time one is built.
# We use one only as an index pattern for sampled_addmm (_gather_dot); we take that one warning
# here, silently, so that it does not surface in the middle of a decode loop.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), size=(1, 1),
                            check_invariants=False)


def _check_tensors(where, **tensors):
    """Every argument must be a CPU tensor of one dtype, float32 or float64.

    Why not bf16: on this machine torch 2.13's bf16 matrix-vector product ran at ~4 GB/s against
    ~15 GB/s for float32 (MKL has no fast bf16 GEMV path here), so bf16 weights would halve the
    bytes and still be 2x slower. float64 is allowed so that tests can compare tightly.
    """
    dtype = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{where}: {name} must be on the CPU, got device {t.device}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} must be float32 or float64, got {t.dtype}")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise TypeError(f"{where}: all tensors must share one dtype, got {name} {t.dtype} "
                            f"and {next(iter(tensors))} {dtype}")
    return dtype


@functools.lru_cache(maxsize=256)
def _q(k, D):
    """Q(1 - k/D), cached: NormalDist().inv_cdf costs ~5 us, and a decode loop asks again and again."""
    return normal_icdf(1.0 - k / D)


def _shape(t):
    return tuple(t.shape)


def _row_table(t):
    """View a cache tensor [B, Hkv, n, w] as a table of rows [R, w] plus row offsets [B, Hkv].

    Row (b, h, j) of the cache is row base[b, h] + j of the table. This lets one index_select /
    embedding_bag gather rows from every (batch, head) at once, and it works on a view into a
    bigger preallocated buffer (generate_cpu's cache is [B, Hkv, capacity, w], we pass [:, :, :n])
    without copying: we only need each row to be contiguous and the batch and head strides to
    be whole rows. Anything else is copied once (contiguous()).
    """
    B, Hkv, n, w = t.shape
    s0, s1, s2, s3 = t.stride()
    if not (s3 == 1 and s2 == w and s1 % w == 0 and s0 % w == 0):
        t = t.contiguous()
        s0, s1, s2, s3 = t.stride()
    base = [[b * (s0 // w) + h * (s1 // w) for h in range(Hkv)] for b in range(B)]  # [B][Hkv] python ints
    R = max(max(row) for row in base) + n if t.numel() else 0  # one past the last row we may index
    table = torch.as_strided(t, (R, w), (w, 1), t.storage_offset())  # [R, w], shares memory with t
    return table, base


def _relayout(t):
    """A contiguous copy of t in memory backed by 2 MB pages where the OS allows it.

    Gathering scattered rows touches a new 4 KB page every few KB, and each first touch of a
    page costs a TLB miss (a page-table walk, itself often a cache miss after a 50 MB stream).
    Linux backs anonymous memory with 2 MB "transparent huge pages" when asked to
    (madvise(MADV_HUGEPAGE); this machine's policy is "madvise"), which removes almost all of
    those misses. torch's allocator does not ask, so we map the memory ourselves (Python's mmap)
    and let torch view it (torch.frombuffer keeps the mapping alive as long as the tensor).
    Measured here: the 1106-row K2 gather 0.92 -> 0.81 ms, the predictor GEMV 3.58 -> 3.28 ms.
    Where the platform has no MADV_HUGEPAGE (macOS, Windows) this is a plain contiguous copy.
    """
    t = t.detach()
    nbytes = t.numel() * t.element_size()
    huge = 2 << 20
    if nbytes < huge or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.contiguous()  # small: ordinary memory (may share it with t)
    buf = mmap.mmap(-1, nbytes + huge)  # anonymous, private; one spare huge page for alignment
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # not allowed here: ordinary pages, still correct
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # [nbytes + huge] shares the mapping
    start = (-raw.data_ptr()) % huge  # first 2 MB boundary
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


# ------------------------------------------------------------------------------------------
# 1. Statistical top-k over rows (Spark §statistical top-k; topk.py has the references)
#
#    theta = mean(z) + std(z) * Q(1 - k/D)   per row z of length D (population std)
#    out   = z - theta where z > theta, else fill    (soft=True; soft=False keeps z)
#
#    Plain version (what topk.statistical_topk does, eager torch):
#        mean, var = var_mean(x)            # pass 1 over x (DRAM)
#        theta = mean + sqrt(var) * Q       # tiny
#        out = where(x > theta, x - theta, fill)   # passes 2-4: compare, subtract, select;
#                                                  # each reads or writes R*D values in DRAM
#    At [2048, 16384] float32 x is 128 MB, far bigger than the caches, so every pass is a trip
#    to DRAM. The least any version must move is one read of x and one write of out. Ours walks
#    the rows in blocks of 4 MB (32 rows of 16384), which stay in the L2/L3 caches: a block is
#    read from DRAM once, every pass runs on it while it is in cache, and its result is written
#    back once. Per block (pseudo-code; c, m, n are per row):
#        c = x - x[0]                       # DRAM read; centred on the first entry (see below)
#        m = mean(c);  n2 = sum(c^2) / D    # two reductions, in cache
#        theta_c = m + sqrt(n2 - m^2) * Q   # 32 numbers, on the host
#        out = max(c - theta_c, 0)          # two in-place passes, in cache; written back once
#    Five eager ops per block, ~160 in all. Measured here at [2048, 16384]: the DRAM pass alone
#    costs about one copy of x (~10 ms), the four in-cache passes ~8 ms more. Section 3b has the
#    same computation as one C loop over rows (stat_topk_rows: float32, soft, fill 0), which
#    statistical_topk_cpu takes by default when it is built (fused=None).
#
#    Numerics. Centring on the first entry (as topk.py does) gives a constant row c = 0 exactly,
#    so std = 0, theta = its value and no survivor, as the reference defines it. We take the
#    variance in one pass as E[c^2] - m^2 (float32 sums, float64 arithmetic on the 32 results);
#    c is centred near the row mean (x[0] is a typical entry), so the cancellation costs little:
#    theta lands within ~1e-6 standard deviations of the float64 reference's (a two-pass version
#    is ~10 % slower here). An entry that close to theta may fall on the other side than in the
#    reference, and then differs from it by |x - theta| ~ 1e-6 std. float64 input is computed in
#    float64 throughout; float16/bfloat16 rows are upcast to float32 block by block.
# ------------------------------------------------------------------------------------------

_BLOCK_BYTES = 4 << 20  # 4 MiB per block: the best of 1, 2, 3, 4, 6, 8, 16 MiB measured here
#                         (smaller blocks pay more per-op overhead, larger ones fall out of L2)


def statistical_topk_cpu(x, k, fill=0.0, soft=True, *, out=None, fused=None):
    """Fast CPU version of topk.statistical_topk (reference: topk.statistical_topk_np).

    x [..., D] float32/float64/float16/bfloat16 CPU tensor -> [..., D], dtype of x.
    Same arguments and edge cases as topk.statistical_topk: k == D returns x itself; a constant
    row has theta = its value and no survivors; a row containing NaN comes out all NaN.
    `out` (optional: contiguous, x's shape and dtype) receives the result. Reusing one buffer
    saves allocating a new tensor per call, which for 128 MB costs more than the top-k itself
    here (~35 ms of page faults). out=x computes in place (x is overwritten), which saves the
    cache-line reads a write to fresh memory costs (~3 ms at [2048, 16384]).
    Differentiable: with autograd on it runs the same forward and an analytic backward (the
    gradient through the threshold included, as topk.statistical_topk); out= is refused then.
    fused: None = the C row loop of section 3b for float32 rows with soft=True, fill=0 when it
    is built, else the eager blocks; True = the C loop or an error; False = the eager blocks.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"statistical_topk_cpu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"statistical_topk_cpu: x must be on the CPU, got device {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"statistical_topk_cpu: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("statistical_topk_cpu: x must have at least one axis (rows are the last), got a scalar")
    D = x.shape[-1]
    check_k(k, D)
    if k == D:
        return x  # as topk: nothing is thresholded
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype \
                or not out.is_contiguous() or out.device.type != "cpu":
            got = f"{out.dtype} {_shape(out)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"statistical_topk_cpu: out must be a contiguous CPU tensor of shape {_shape(x)} "
                             f"and dtype {x.dtype}, got {got}")
        if out.data_ptr() == x.data_ptr() and not x.is_contiguous():
            raise ValueError("statistical_topk_cpu: out=x (in place) needs a contiguous x")
    _check_fused("statistical_topk_cpu", fused)
    if fused and not (x.dtype == torch.float32 and soft and fill == 0.0):
        raise ValueError("statistical_topk_cpu: fused=True but the C loop handles float32 rows with soft=True, "
                         f"fill=0 only; got {x.dtype}, soft={soft}, fill={fill}")
    if fused and _fused_lib() is None:
        raise ValueError(f"statistical_topk_cpu: fused=True but {fused_status()}")
    if torch.is_grad_enabled() and x.requires_grad:
        if out is not None:
            raise ValueError("statistical_topk_cpu: out= is not supported when x requires grad")
        return _StatTopkFn.apply(x, k, float(fill), bool(soft), fused)
    y, _ = _stat_topk_forward(x, k, fill, soft, out, fused=fused)
    return y


def _stat_topk_forward(x, k, fill, soft, out=None, want_stats=False, fused=None):
    """The blocked forward. Returns (y [..., D], (mean, std) [R, 1] float64 arrays or None)."""
    D = x.shape[-1]
    q = _q(k, D)  # Q(1 - k/D): 1.405 at k = 8 %
    rows = x.reshape(-1, D)  # [R, D] (a copy only if x is not viewable as rows)
    R = rows.shape[0]
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype)
    y2 = y.view(-1, D)  # [R, D]
    lib = None
    if fused is not False and x.dtype == torch.float32 and soft and fill == 0.0:
        lib = _fused_lib()
    if lib is not None and R > 0:
        rows = rows.contiguous()  # (a no-op for the usual contiguous x, so out=x stays in place)
        stats = (np.empty((R, 1)), np.empty((R, 1))) if want_stats else None
        lib.stat_topk_rows(rows.data_ptr(), y2.data_ptr(), R, D, q, *(
            (stats[0].ctypes.data, stats[1].ctypes.data) if want_stats else (None, None)))
        return y, stats
    sdt = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least
    fast = soft and fill == 0.0  # max(x - theta, 0): two in-place passes per block
    direct = fast and y.dtype == sdt  # compute straight into the output block
    bs = max(1, _BLOCK_BYTES // (D * 4))  # rows per block
    work = None if direct else torch.empty(min(bs, max(R, 1)), D, dtype=sdt)  # [bs, D] scratch
    stats = (np.empty((R, 1)), np.empty((R, 1))) if want_stats else None
    fill_t = torch.tensor(fill, dtype=sdt)
    for s in range(0, R, bs):
        xb = rows[s:s + bs]  # [b, D] read from DRAM once, by the first op below
        b = xb.shape[0]
        cb = y2[s:s + bs] if direct else work[:b]  # [b, D] in cache from here on
        x0 = xb[:, :1].to(sdt, copy=True)  # [b, 1] a copy: cb may be xb itself (out=x)
        torch.sub(xb, x0, out=cb)  # [b, D] c = x - x0
        m = cb.mean(dim=-1, keepdim=True).numpy().astype(np.float64)  # [b, 1] mean(c)
        n = torch.linalg.vector_norm(cb, dim=-1, keepdim=True).numpy().astype(np.float64)  # [b, 1] ||c||
        std = np.sqrt(np.maximum(n * n / D - m * m, 0.0))  # [b, 1] population std
        # theta - x0 = mean(c) + std * Q(1 - k/D)
        tc = torch.from_numpy((m + std * q).astype(np.float64 if sdt == torch.float64 else np.float32))  # [b, 1]
        if want_stats:
            stats[0][s:s + b] = x0.double().numpy() + m
            stats[1][s:s + b] = std
        if fast:
            cb.sub_(tc).clamp_min_(0.0)  # out = max(c - (theta - x0), 0) = max(x - theta, 0); NaN stays NaN
            if not direct:
                y2[s:s + bs].copy_(cb)  # float16/bfloat16: one rounding into the output
        else:
            keep = cb > tc  # [b, D] x > theta
            val = cb.sub_(tc) if soft else xb  # [b, D] survivors: x - theta, or x itself
            yb = y2[s:s + bs]
            torch.where(keep, val, fill_t, out=cb if soft or yb.dtype != sdt else yb)
            if soft or yb.dtype != sdt:
                yb.copy_(cb)
            nan_rows = np.flatnonzero(np.isnan(m[:, 0]))  # a row with NaN comes out all NaN (topk.py)
            if nan_rows.size:
                yb[torch.from_numpy(nan_rows)] = math.nan
    return y, stats


class _StatTopkFn(torch.autograd.Function):
    """Autograd for statistical_topk_cpu: the blocked forward, an analytic backward.

    soft: y_i = (x_i - theta) m_i with m_i = [x_i > theta], theta = mu + Q sigma, so
        dtheta/dx_j = 1/D + Q (x_j - mu) / (D sigma)
        dL/dx_j = g_j m_j - (sum_i g_i m_i) dtheta/dx_j
    hard (soft=False): y_i = x_i m_i, dL/dx_j = g_j m_j (the mask is piecewise constant).
    A constant row (sigma = 0) has no survivors, so sum_i g_i m_i = 0 and the gradient is 0.
    """

    @staticmethod
    def forward(ctx, x, k, fill, soft, fused=None):
        y, (mean, std) = _stat_topk_forward(x.detach(), k, fill, soft, want_stats=True, fused=fused)
        sdt = torch.promote_types(x.dtype, torch.float32)
        ctx.save_for_backward(x, torch.from_numpy(mean).to(sdt), torch.from_numpy(std).to(sdt))
        ctx.k, ctx.soft = k, soft
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, std = ctx.saved_tensors
        D = x.shape[-1]
        q = _q(ctx.k, D)
        z = x.reshape(-1, D).to(mean.dtype)  # [R, D]
        gz = g.reshape(-1, D).to(mean.dtype)  # [R, D]
        gx = statistical_topk_grad(gz, z, mean, std, q, ctx.soft)  # [R, D], derivation in topk.py
        return gx.reshape(x.shape).to(x.dtype), None, None, None, None


# ------------------------------------------------------------------------------------------
# 2. Spark FFN decode (Spark §FFN; REFERENCE.md §3). Reference: spark.spark_ffn_np.
#
#    p = x[:r] K1                  K1 [r, f]       dense: every token needs all f predictions
#    u = x[r:] K2                  K2 [d-r, f]     needed for the survivors only
#    a = gelu(statistical_topk(p, k)) * u
#    y = a V                       V  [f, d]       needed for the survivors only
#
#    Plain-Python pseudo-code of the decode kernel (one token):
#        p = [dot(x[:r], K1[:, j]) for j in range(f)]            # r*f weights: all of K1
#        theta = mean(p) + std(p) * Q(1 - k/f)
#        y = [0] * d
#        for j in range(f):
#            if p[j] > theta:                                     # ~k of the f neurons
#                a_j = gelu(p[j] - theta) * dot(x[r:], K2[:, j])  # d-r weights: column j of K2
#                y += a_j * V[j]                                  # d weights: row j of V
#    Bytes read (weights): r f + m (d - r) + m d  versus 3 d f_gated for the dense gated FFN of
#    the same parameter count (f = 1.5 f_gated): 18.1 M vs 63.7 M values at Gemma-2 2B shapes,
#    the 3.52x byte limit.
#
#    Layout. Column j of K2 is strided in memory ([d-r, f] row-major), so we store K2 transposed,
#    K2t [f, d-r]: neuron j is one contiguous row of 5 KB, which the hardware prefetcher streams.
#    V [f, d] already has a row per neuron. K1 stays [r, f]: `x[:r] @ K1` streams K1 front to
#    back (the fastest GEMV form we measured here, ~15 GB/s vs ~13 GB/s for the transposed one).
#
#    A few tokens at once (a batch of M sequences): the predictor is one [M, r] x [r, f] product
#    (K1 still read once), each token keeps its own survivors, and we gather the *union* of the
#    survivors: a token's non-survivors among them get a = gelu(0) * u = 0, so the result is
#    exactly the per-token one. The union grows with M (Polar Sparsity, REFERENCE.md §8): at 4
#    tokens it is 3.6x one token's, and with MKL's slow [4, r] x [r, f] product for the predictor
#    this path is slower than dense (0.7x, notes/kernels_cpu.md). It is correct, not fast.
# ------------------------------------------------------------------------------------------


def prepare_spark_ffn_cpu(K1, K2, V):
    """Re-lay Spark FFN weights for decoding, once (like loading a checkpoint).

    K1 [r, f], K2 [d-r, f], V [f, d] (spark.SparkFFN's parameters) ->
    (K1 [r, f], K2t [f, d-r], V [f, d]), contiguous, detached, in the order
    spark_ffn_decode_cpu takes them. K2t costs one copy of K2 (the original can be dropped).
    """
    _check_tensors("prepare_spark_ffn_cpu", K1=K1, K2=K2, V=V)
    if K1.dim() != 2 or K2.dim() != 2 or V.dim() != 2 or K2.shape[1] != K1.shape[1] or V.shape != (
            K1.shape[1], K1.shape[0] + K2.shape[0]):
        raise ValueError(f"prepare_spark_ffn_cpu: expected K1 [r, f], K2 [d-r, f], V [f, d]; got K1 {_shape(K1)}, "
                         f"K2 {_shape(K2)}, V {_shape(V)}")
    return _relayout(K1), _relayout(K2.t()), _relayout(V)


def _threshold_rows_np(P, k):
    """theta per row of P [M, f] -> [M, 1] float64, as topk.statistical_threshold_np computes it.

    The rows are short (13824 values, 55 KB), so we leave torch here: a NumPy reduction on them
    costs a few us, an eager torch op 10-80 us (var_mean on one short row took ~85 us). Like the
    reference we centre each row on its first entry in float64 (a constant row gets std = 0
    exactly, so no survivor), and take the population std. No BLAS call (np.dot): NumPy's
    OpenBLAS starts its own threads, which then spin on our 2 cores while torch's threads need
    them (that alone made the next gather 1.5x slower here).
    """
    c = P.astype(np.float64)  # [M, f]
    z0 = c[:, :1].copy()  # [M, 1]
    c -= z0  # [M, f] centred on the first entry
    mc = c.mean(axis=-1, keepdims=True)  # [M, 1]
    c -= mc  # [M, f] centred on the mean
    var = np.square(c, out=c).mean(axis=-1, keepdims=True)  # [M, 1] population variance
    theta = z0 + mc + np.sqrt(var) * _q(k, P.shape[-1])  # [M, 1]
    if np.isnan(theta).any():
        raise ValueError("spark_ffn_decode_cpu: the predictor scores p = x[:r] K1 contain NaN "
                         f"(in {int(np.isnan(theta).sum())} of {P.shape[0]} tokens); check x and K1")
    return theta


def _survivors_np(P, theta):
    """keep = P > theta for float32 P and float64 theta, without converting P to float64.

    For a float32 p, p > theta  <=>  p > t, where t is the largest float32 <= theta (there is no
    float32 strictly between t and theta). So one float32 comparison decides exactly as the
    reference's float64 one does.
    """
    if P.dtype == np.float64:
        return P > theta
    t = theta.astype(np.float32)  # [M, 1] rounded to nearest
    t = np.where(t.astype(np.float64) > theta, np.nextafter(t, np.float32(-np.inf)), t)  # round down
    return P > t


@torch.no_grad()
def spark_ffn_decode_cpu(x, K1, K2t, V, k, r, *, fused=None):
    """Spark FFN for decoding; must match spark.spark_ffn_np(x, K1, K2, V, k, r).

    x [d] or [M, d] (any leading shape), K1 [r, f], K2t [f, d-r], V [f, d] from
    prepare_spark_ffn_cpu (K2t is K2 transposed) -> y, x's shape. k: target survivors per token
    (statistical top-k), r: predictor slice. k == f thresholds nothing (as topk.py: the input
    is returned unchanged), so every neuron is used with a = gelu(p) * u (dense, eager, whatever
    fused says once fused= is valid for the call).
    fused: None = the fused C loop of section 3b for one float32 token when it is built, else
    eager PyTorch; True = the fused loop or an error; False = eager PyTorch.
    """
    _check_tensors("spark_ffn_decode_cpu", x=x, K1=K1, K2t=K2t, V=V)
    if x.dim() == 0:
        raise ValueError("spark_ffn_decode_cpu: x must be [..., d], got a scalar")
    d = x.shape[-1]
    if K1.dim() != 2 or V.dim() != 2:
        raise ValueError(f"spark_ffn_decode_cpu: K1 must be [r, f] and V [f, d]; got K1 {_shape(K1)}, V {_shape(V)}")
    f = V.shape[0]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d - 1:
        raise ValueError(f"spark_ffn_decode_cpu: r must be an int in [1, d-1] = [1, {d - 1}], got {r!r}")
    if K1.shape != (r, f) or K2t.shape != (f, d - r) or V.shape != (f, d):
        raise ValueError(f"spark_ffn_decode_cpu: with d={d}, r={r}, f={f} expected K1 [r, f] = {(r, f)}, "
                         f"K2t [f, d-r] = {(f, d - r)} (K2 transposed: use prepare_spark_ffn_cpu), V [f, d] = {(f, d)}; "
                         f"got K1 {_shape(K1)}, K2t {_shape(K2t)}, V {_shape(V)}")
    check_k(k, f)
    X = x.reshape(-1, d)  # [M, d]
    M = X.shape[0]
    if M == 0:
        return x.new_zeros(x.shape)
    # p = x[:r] K1: the dense predictor, the one full read of a matrix (r f values)
    P = X[:, :r] @ K1  # [M, f]
    lib = _use_fused(fused, "spark_ffn_decode_cpu", M, x, K1, K2t, V)  # (checks fused= for every k)
    if k == f:
        # statistical_topk with k == D returns p unchanged: every neuron, no shift (topk.py)
        A = F.gelu(P, approximate="tanh") * (X[:, r:] @ K2t.t())  # [M, f]
        return (A @ V).reshape(x.shape)  # [..., d]
    if lib is not None:
        # threshold, survivors, K2 dot products, gelu and the V rows in one call (section 3b)
        X = X.contiguous()
        x2 = X[0, r:]  # [d-r] contiguous (a row slice)
        y, idx, z = X.new_empty(d), torch.empty(f, dtype=torch.int64), X.new_empty(f)  # scratch: idx, z
        acc = X.new_empty(torch.get_num_threads(), d)  # [threads, d] one partial sum per thread
        m = lib.spark_ffn_tail(P.data_ptr(), f, _q(k, f), x2.data_ptr(), d - r, K2t.data_ptr(), V.data_ptr(), d,
                               y.data_ptr(), idx.data_ptr(), z.data_ptr(), acc.data_ptr(), acc.shape[0])
        if m < 0:
            raise ValueError("spark_ffn_decode_cpu: the predictor scores p = x[:r] K1 contain NaN or inf "
                             "(their threshold is NaN); check x and K1")
        return y.reshape(x.shape)  # [..., d]
    # theta = mean(p) + std(p) Q(1 - k/f); survivors p > theta (host arrays: small, see above)
    Pn = P.numpy()  # [M, f] shares memory with P
    theta = _threshold_rows_np(Pn, k)  # [M, 1] float64
    keep = _survivors_np(Pn, theta)  # [M, f] bool
    if M == 1:
        idx = np.flatnonzero(keep[0])  # [m] survivors
        if idx.shape[0] == 0:
            return x.new_zeros(x.shape)  # nothing fired: y = 0 (gelu(0) = 0)
        # statistical_topk(p) = p - theta on the survivors (soft threshold), in float64 as the reference
        Z = (Pn[0, idx] - theta[0]).astype(Pn.dtype)  # [m]
        idx_t = torch.from_numpy(idx)  # [m] int64
        u = _gather_dot(K2t, idx_t, X[0, r:])  # [m]  u = x[r:] K2 for the survivors only (m (d-r) values)
        # a = gelu(topk(p)) * u: short vectors, NumPy arithmetic (~1 us an op vs 10-20 us in torch)
        a = F.gelu(torch.from_numpy(Z), approximate="tanh").numpy() * u.numpy()  # [m]
        # y = a V over the m gathered rows of V (m d values)
        return _gather_rows_matmul(torch.from_numpy(a)[None], idx_t, V).reshape(x.shape)  # [..., d]
    # Several tokens: the union of their survivors; a token's non-survivors in it get 0.
    idx = np.flatnonzero(keep.any(axis=0))  # [m]
    if idx.shape[0] == 0:
        return x.new_zeros(x.shape)
    Z = np.where(keep[:, idx], Pn[:, idx] - theta, 0.0).astype(Pn.dtype)  # [M, m]
    idx_t = torch.from_numpy(idx)
    U = X[:, r:] @ K2t.index_select(0, idx_t).t()  # [M, m] gather the rows once for all M tokens
    A = F.gelu(torch.from_numpy(Z), approximate="tanh") * U  # [M, m] a = gelu(topk(p)) * u
    return _gather_rows_matmul(A, idx_t, V).reshape(x.shape)  # [..., d]


_SMALL_GATHER_BYTES = 2 << 20  # below this, _gather_dot copies the rows (see there)


def _gather_dot(W, idx, x, parts=4):
    """u_j = W[idx_j] . x for the m rows idx of W:  W [f, w], idx [m], x [w] -> u [m].

    The obvious `W.index_select(0, idx) @ x` first copies the m rows (a write and a second read
    of m w values). torch.sparse.sampled_addmm computes (A @ B) only at the nonzeros of a sparse
    CSR pattern C; with A = x, B = W^T (a view: column j of B is row j of W, contiguous) and C
    marking the m gathered neurons it computes exactly the m dot products, reading each row
    once, copying nothing. It parallelises over the rows of C, so we spread the m neurons over
    `parts` rows (all with the same x) to keep both cores busy. Measured here: the Spark FFN's
    K2 gather (1106 rows of 5 KB) 0.9 ms, vs 1.3 ms for index_select + mv. Building the pattern
    costs ~0.2 ms, though, so for a small gather (under 2 MB: the 56 rows of 8 KB of the ReLU
    FFN at 1 % nonzero) the copy is cheaper: 0.19 ms vs 0.39 ms.
    """
    m = idx.shape[0]
    if m * W.shape[1] * W.element_size() < _SMALL_GATHER_BYTES:
        return W.index_select(0, idx) @ x  # [m]
    parts = max(1, min(parts, m))
    crow = (torch.arange(parts + 1) * m) // parts  # [parts + 1] row boundaries of the pattern
    C = torch.sparse_csr_tensor(crow, idx, torch.zeros(m, dtype=W.dtype), size=(parts, W.shape[0]),
                                check_invariants=False)  # [parts, f], m nonzeros (values unused: beta = 0)
    return torch.sparse.sampled_addmm(C, x.expand(parts, -1), W.t(), beta=0.0).values()  # [m]


def _gather_rows_matmul(A, idx, W, bags=8):
    """Y = A @ W[idx]:  A [M, m], idx [m], W [f, w] -> [M, w], reading only the m rows of W.

    One token (M = 1): torch's embedding_bag with per_sample_weights computes sum_j a_j W[idx_j]
    without writing the gathered [m, w] matrix anywhere (and its kernel, FBGEMM's, prefetches
    the next rows while it adds the current one). It parallelises over bags, so we cut the m
    rows into `bags` bags (8 measured best here: 0.70 ms for the 1106 V rows of 9 KB, vs 1.5 ms
    with one bag and 2.6 ms for index_select + vector-matrix product) and add the partial sums.
    Several tokens: gather the rows once, then one [M, m] x [m, w] product.
    """
    M, m = A.shape
    if M == 1:
        bags = max(1, min(bags, m))
        offsets = torch.from_numpy((np.arange(bags) * m) // bags)  # [bags] start of each bag
        return F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=A[0]).sum(0, keepdim=True)  # [1, w]
    return A @ W.index_select(0, idx)  # [M, w]


# ------------------------------------------------------------------------------------------
# 3. ReLU-gated FFN decode for an L1-sparse model (Sakana, arXiv 2603.23198; REFERENCE.md §6).
#    Reference: the y of spark.relu_l1_ffn_np(x, Wg, Wu, Wd).
#
#    h = relu(x Wg) * (x Wu);  y = h Wd
#
#    Pseudo-code (one token):
#        g = [dot(x, Wg[:, j]) for j in range(f)]       # d f weights: the gate stays dense
#        y = [0] * d
#        for j in range(f):
#            if g[j] > 0:                                # 0.5-1 % of neurons after L1 training
#                h_j = g[j] * dot(x, Wu[:, j])           # d weights: column j of Wu
#                y += h_j * Wd[j]                        # d weights: row j of Wd
#    Bytes: d f + 2 m d vs 3 d f: at 1 % nonzero the limit is 3 / (1 + 0.02) = 2.94x, because
#    the gate is read in full. Layout: Wu transposed to Wut [f, d] (a row per neuron), Wg and Wd
#    as they are (x @ Wg streams Wg; Wd already has a row per neuron).
# ------------------------------------------------------------------------------------------


def prepare_relu_ffn_cpu(Wg, Wu, Wd):
    """Re-lay a ReLU-gated FFN for sparse decoding, once.

    Wg, Wu [d, f], Wd [f, d] -> (Wg [d, f], Wut [f, d], Wd [f, d]), contiguous and detached, in
    the order relu_ffn_decode_cpu takes them.
    """
    _check_tensors("prepare_relu_ffn_cpu", Wg=Wg, Wu=Wu, Wd=Wd)
    if Wg.dim() != 2 or Wg.shape != Wu.shape or Wd.shape != (Wg.shape[1], Wg.shape[0]):
        raise ValueError(f"prepare_relu_ffn_cpu: expected Wg and Wu [d, f], Wd [f, d]; got Wg {_shape(Wg)}, "
                         f"Wu {_shape(Wu)}, Wd {_shape(Wd)}")
    return _relayout(Wg), _relayout(Wu.t()), _relayout(Wd)


@torch.no_grad()
def relu_ffn_decode_cpu(x, Wg, Wut, Wd, *, fused=None):
    """ReLU-gated FFN for decoding; must match y of spark.relu_l1_ffn_np(x, Wg, Wu, Wd).

    x [d] or [M, d] (any leading shape), Wg [d, f], Wut [f, d] (Wu transposed), Wd [f, d] from
    prepare_relu_ffn_cpu -> y, x's shape. Several tokens gather the union of their nonzero
    neurons (a token's zero neurons in it contribute relu(g) = 0). fused: as in
    spark_ffn_decode_cpu (None = the fused C loop for one float32 token when it is built).
    """
    _check_tensors("relu_ffn_decode_cpu", x=x, Wg=Wg, Wut=Wut, Wd=Wd)
    if x.dim() == 0:
        raise ValueError("relu_ffn_decode_cpu: x must be [..., d], got a scalar")
    d = x.shape[-1]
    if Wg.dim() != 2 or Wg.shape[0] != d or Wut.shape != (Wg.shape[1], d) or Wd.shape != (Wg.shape[1], d):
        raise ValueError(f"relu_ffn_decode_cpu: with x [..., d={d}] expected Wg [d, f], Wut [f, d] (Wu transposed: "
                         f"use prepare_relu_ffn_cpu), Wd [f, d]; got Wg {_shape(Wg)}, Wut {_shape(Wut)}, Wd {_shape(Wd)}")
    X = x.reshape(-1, d)  # [M, d]
    if X.shape[0] == 0:
        return x.new_zeros(x.shape)
    G = X @ Wg  # [M, f] the dense gate: all of Wg
    lib = _use_fused(fused, "relu_ffn_decode_cpu", X.shape[0], x, Wg, Wut, Wd)
    if lib is not None:
        # survivors g > 0, their Wu dot products and Wd rows in one call (section 3b)
        X = X.contiguous()
        f = Wg.shape[1]
        y, idx, gs = X.new_empty(d), torch.empty(f, dtype=torch.int64), X.new_empty(f)  # scratch: idx, gs
        acc = X.new_empty(torch.get_num_threads(), d)  # [threads, d]
        m = lib.relu_ffn_tail(G.data_ptr(), f, X.data_ptr(), d, Wut.data_ptr(), Wd.data_ptr(), y.data_ptr(),
                              idx.data_ptr(), gs.data_ptr(), acc.data_ptr(), acc.shape[0])
        if m < 0:
            raise ValueError("relu_ffn_decode_cpu: the gate x Wg contains NaN; check x and Wg")
        return y.reshape(x.shape)  # [..., d]
    Gn = G.numpy()
    # Neurons with g > 0 (relu(g) != 0). We select with ~(g <= 0), which also catches NaN, and
    # check the few selected values for NaN instead of scanning all f (a NaN gate is bad input).
    # The vectors from here on are short (m values), so we do their arithmetic in NumPy: ~1 us
    # an op, where each eager torch op costs 10-20 us (measured: 0.3 ms saved per call here).
    pos = ~(Gn <= 0.0)  # [M, f]
    idx = np.flatnonzero(pos[0] if X.shape[0] == 1 else pos.any(axis=0))  # [m]
    if idx.shape[0] == 0:
        return x.new_zeros(x.shape)
    gsel = Gn[:, idx]  # [M, m]
    if np.isnan(gsel).any():
        raise ValueError("relu_ffn_decode_cpu: the gate x Wg contains NaN; check x and Wg")
    idx_t = torch.from_numpy(idx)  # [m]
    # u = x Wu for the m gathered neurons (rows of Wut)
    U = _gather_dot(Wut, idx_t, X[0])[None] if X.shape[0] == 1 else X @ Wut.index_select(0, idx_t).t()  # [M, m]
    Hm = torch.from_numpy(np.maximum(gsel, 0.0) * U.numpy())  # [M, m] h = relu(g) * u
    return _gather_rows_matmul(Hm, idx_t, Wd).reshape(x.shape)  # [..., d]


# ------------------------------------------------------------------------------------------
# 3b. The fused loop: the two FFN decoders' tails in one C function (optional, Linux + a C compiler)
#
#    The eager paths above reach ~75-80 % of their byte limit. What they lose (measured in
#    notes/kernels_cpu.md): ~10 small ops after the big GEMV, each paying 10-60 us of cold caches
#    and a thread wake-up, and the K2 rows streaming at ~8 GB/s through sampled_addmm, which does
#    not prefetch the next row. No PyTorch op computes "gather a row, dot it, scale another row,
#    accumulate" for one neuron at a time, so here is that loop, ~60 lines of C:
#
#        # after the dense part (Spark: p = x[:r] K1;  ReLU: g = x Wg), one call does
#        survivors j (Spark: p_j > theta, theta from mean and std in float64;  ReLU: g_j > 0)
#        split the survivors between the threads; each thread t, for its survivors j:
#            prefetch the rows of the survivor PF places ahead      # hides the row-start latency
#            u  = dot(W1[j], x1)                                     # Spark: K2t, x[r:];  ReLU: Wut, x
#            a  = act(s_j) * u                                       # Spark: gelu(p_j - theta);  ReLU: g_j
#            acc_t += a * W2[j]                                      # Spark: V;  ReLU: Wd
#        y = sum over threads of acc_t
#
#    It runs on torch's own OpenMP threads: the torch wheel ships libgomp.so.1 and the loader
#    reuses an already loaded library of the same soname, so our `#pragma omp parallel` starts no
#    second thread pool to fight torch's for the 2 cores (a pthread of our own did: slower than one
#    thread). The source is compiled once per machine with the system C compiler (`cc`, or $CC)
#    into ~/.cache/spark (or $SPARK_CACHE) and loaded with ctypes; float32 and one token only.
#    Without a compiler, on another OS, or with SPARK_NO_FUSED=1, the eager path runs instead,
#    with the same results to rounding (tested). `fused_status()` says which one you have.
#
#    The same library holds stat_topk_rows, section 1's statistical top-k for float32 rows in
#    the soft fill-0 case, one row at a time (read once from DRAM, second pass from L2): at
#    [2048, 16384] 12.2 ms into a buffer and 7.0 ms in place, vs 23.1 / 15.9 ms for the eager
#    blocks (whose ~160 small ops cost as much as the DRAM traffic; benchmark run in
#    notes/kernels_cpu.md).
# ------------------------------------------------------------------------------------------

_FUSED_C = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

/* Prefetch the rows of the survivor PF places ahead, into L2 (locality hint 2: prefetcht1).
   Measured on the benchmark's Spark FFN tail (1108 survivors, 15.9 MB of rows, 2 threads):
   no prefetch 1.40 ms; PF 2-16 into L2 0.99-1.05 ms (~16 GB/s); the same with the
   non-temporal hint (0) 1.36-1.46 ms and into L1 (3) 1.44-1.61 ms. */
#define PF 4

static inline float dot_f32(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32(float a, const float *x, float *y, long n) { /* y += a x */
#pragma omp simd
    for (long i = 0; i < n; i++) y[i] += a * x[i];
}

static inline void prefetch_row(const float *row, long n) { /* one hint per 64-byte cache line */
    const char *p = (const char *)row;
    for (long b = 0; b < n * (long)sizeof(float); b += 64) __builtin_prefetch(p + b, 0, 2);
}

static inline float gelu_tanh(float z) {
    return 0.5f * z * (1.0f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
}

/* y [d] = sum_j act(s_j) * dot(W1[idx_j], x1) * W2[idx_j] over the m survivors.
   W1 [f, w1], W2 [f, d] row-major; acc [acc_rows, d] scratch, one row per thread (at most
   acc_rows threads); act = gelu (Spark) or identity. */
static void gather_fused(const int64_t *idx, const float *s, long m, const float *x1, long w1,
                         const float *W1, const float *W2, long d, float *y, float *acc, int acc_rows, int gelu) {
    int nt = omp_get_max_threads(); /* torch.get_num_threads(): the same OpenMP runtime */
    if (nt > acc_rows) nt = acc_rows;
    if (nt > m) nt = (int)m;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long lo = m * t / T, hi = m * (t + 1) / T; /* this thread's survivors */
        float *mine = acc + (long)t * d;
        memset(mine, 0, sizeof(float) * d);
        for (long j = lo; j < hi; j++) {
            if (j + PF < hi) {
                prefetch_row(W1 + idx[j + PF] * w1, w1);
                prefetch_row(W2 + idx[j + PF] * d, d);
            }
            float u = dot_f32(W1 + idx[j] * w1, x1, w1);
            axpy_f32((gelu ? gelu_tanh(s[j]) : s[j]) * u, W2 + idx[j] * d, mine, d);
        }
#pragma omp barrier
#pragma omp for
        for (long i = 0; i < d; i++) { /* y = sum of the threads' partial sums */
            float v = 0.0f;
            for (int k = 0; k < T; k++) v += acc[(long)k * d + i];
            y[i] = v;
        }
    }
}

/* Spark FFN after the predictor: p [f] = x[:r] K1. theta as topk.statistical_threshold_np
   (float64, centred on p[0], population std), survivors p_j > theta, a_j = gelu(p_j - theta) u_j.
   Returns m, or -1 if theta is NaN (NaN or inf in p). idx [f], z [f], acc [acc_rows, d]: scratch. */
long spark_ffn_tail(const float *p, long f, double q, const float *x2, long w2, const float *K2t,
                    const float *V, long d, float *y, int64_t *idx, float *z, float *acc, int acc_rows) {
    double z0 = p[0], s = 0.0, ss = 0.0;
    for (long i = 0; i < f; i++) s += (double)p[i] - z0;
    double mc = s / f; /* mean of p - p[0] */
    for (long i = 0; i < f; i++) { double c = (double)p[i] - z0 - mc; ss += c * c; }
    double theta = z0 + mc + sqrt(ss / f) * q;
    if (isnan(theta)) return -1;
    long m = 0;
    for (long i = 0; i < f; i++)
        if ((double)p[i] > theta) { idx[m] = i; z[m] = (float)((double)p[i] - theta); m++; }
    if (m == 0) { memset(y, 0, sizeof(float) * d); return 0; }
    gather_fused(idx, z, m, x2, w2, K2t, V, d, y, acc, acc_rows, 1);
    return m;
}

/* ReLU-gated FFN after the gate: g [f] = x Wg. Survivors g_j > 0, h_j = g_j (x . Wut[j]).
   Returns m, or -1 if g contains NaN. idx [f], gs [f], acc [acc_rows, d]: scratch. */
long relu_ffn_tail(const float *g, long f, const float *x, long d, const float *Wut, const float *Wd,
                   float *y, int64_t *idx, float *gs, float *acc, int acc_rows) {
    long m = 0;
    for (long i = 0; i < f; i++) {
        float v = g[i];
        if (v != v) return -1;
        if (v > 0.0f) { idx[m] = i; gs[m] = v; m++; }
    }
    if (m == 0) { memset(y, 0, sizeof(float) * d); return 0; }
    gather_fused(idx, gs, m, x, d, Wut, Wd, d, y, acc, acc_rows, 0);
    return m;
}

/* Statistical top-k over rows, the soft fill-0 case of section 1, one row at a time:
   y[i] = max(c - theta_c, 0) with c = x[i] - x[i][0] (float32, as the eager blocks), theta_c =
   mean(c) + std(c) Q, the sums of c and c^2 in float64. A row (64 KB at D = 16384) is read
   from DRAM by the first pass and is still in L2 for the second, so x is read once and y
   written once. x == y (in place) is allowed. mean, std [R] float64 (the row's own mean and
   population std, for the backward) or NULL. A row with NaN: theta NaN, the row all NaN. */
void stat_topk_rows(const float *x, float *y, long R, long D, double q, double *mean, double *std) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < R; i++) {
        const float *xr = x + i * D;
        float *yr = y + i * D;
        float x0 = xr[0];
        double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s, ss)
        for (long j = 0; j < D; j++) { double c = (double)(xr[j] - x0); s += c; ss += c * c; }
        double m = s / D, var = ss / D - m * m; /* one-pass variance, on values centred near the mean */
        double sd = isnan(var) ? var : sqrt(var > 0.0 ? var : 0.0);
        float tc = (float)(m + sd * q);
#pragma omp simd
        for (long j = 0; j < D; j++) {
            float v = (xr[j] - x0) - tc;
            yr[j] = v < 0.0f ? 0.0f : v; /* NaN stays NaN (NaN < 0 is false) */
        }
        if (mean) { mean[i] = (double)x0 + m; std[i] = sd; }
    }
}
"""

_FUSED = {"lib": None, "status": None}  # filled on first use by _fused_lib()


def _fused_lib():
    """The compiled fused loop (a ctypes library), or None; builds it on first use.

    The .so is named by a hash of the source, the compiler command and the CPU model (it is built
    with -march=native), written to a temporary name and renamed, so concurrent builds and a
    shared home directory on different machines are both safe. The reason for a None is kept in
    fused_status().
    """
    if _FUSED["status"] is not None:
        return _FUSED["lib"]
    import ctypes
    import hashlib
    import shutil
    import tempfile

    def give_up(why):
        _FUSED["status"] = f"eager PyTorch (fused loop unavailable: {why})"
        return None

    if os.environ.get("SPARK_NO_FUSED"):
        return give_up("SPARK_NO_FUSED is set")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return give_up(f"only built on Linux x86_64/aarch64, this is {platform.system()} {platform.machine()}")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return give_up(f"no C compiler {cc!r} on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    key = hashlib.sha256("\n".join([_FUSED_C, cc, " ".join(flags), _machine()["cpu"]]).encode()).hexdigest()[:16]
    cache = os.environ.get("SPARK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "spark"))
    path = os.path.join(cache, f"kernels_cpu_fused_{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, so = os.path.join(tmp, "fused.c"), os.path.join(tmp, "fused.so")
                with open(src, "w") as fh:
                    fh.write(_FUSED_C)
                res = subprocess.run([cc, *flags, src, "-o", so, "-lm"], capture_output=True, text=True, timeout=120)
                if res.returncode != 0:
                    return give_up(f"{cc} failed: {res.stderr.strip()[-300:]}")
                os.replace(so, path)  # atomic: another process sees the old state or the whole file
        except (OSError, subprocess.SubprocessError) as e:
            return give_up(f"build failed: {e}")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return give_up(f"cannot load {path}: {e}")
    P, L = ctypes.c_void_p, ctypes.c_long
    lib.spark_ffn_tail.argtypes = [P, L, ctypes.c_double, P, L, P, P, L, P, P, P, P, ctypes.c_int]
    lib.spark_ffn_tail.restype = L
    lib.relu_ffn_tail.argtypes = [P, L, P, L, P, P, P, P, P, P, ctypes.c_int]
    lib.relu_ffn_tail.restype = L
    lib.stat_topk_rows.argtypes = [P, P, L, L, ctypes.c_double, P, P]
    lib.stat_topk_rows.restype = None
    _FUSED.update(lib=lib, status=f"fused C loop ({path})")
    return lib


def fused_status():
    """Which path the FFN decoders take for one float32 token: the fused C loop (and where its
    library is) or eager PyTorch (and why)."""
    _fused_lib()
    return _FUSED["status"]


def _check_fused(where, fused):
    """The `fused` argument of every kernel: None (automatic), True or False, nothing else."""
    if fused is not None and fused is not True and fused is not False:
        raise ValueError(f"{where}: fused must be None (automatic), True or False, got {fused!r}")


def _use_fused(fused, where, M, x, *weights):
    """Which path a call takes: fused=None -> the fused loop when it is built and the call is one
    it handles (M = 1 token, float32, contiguous weights as prepare_* makes them), else eager;
    True -> the fused loop or a clear error; False -> eager. Returns the library or None.
    The C code indexes each weight as a packed row-major array from data_ptr(), so a strided
    view (K2.t() passed as K2t, an expanded tensor) must never reach it: it would read the wrong
    numbers, or past the end of the storage."""
    _check_fused(where, fused)
    if fused is False:
        return None
    fits = M == 1 and all(t.dtype == torch.float32 for t in (x, *weights))
    packed = all(t.is_contiguous() for t in weights)
    if fused is None:
        return _fused_lib() if fits and packed else None
    if not fits:
        raise ValueError(f"{where}: fused=True but the fused loop handles one float32 token only; "
                         f"got {M} tokens of {x.dtype}")
    if not packed:
        raise ValueError(f"{where}: fused=True needs contiguous weights (use the prepare_* function); got strides "
                         f"{[tuple(t.stride()) for t in weights]} for shapes {[_shape(t) for t in weights]}")
    lib = _fused_lib()
    if lib is None:
        raise ValueError(f"{where}: fused=True but {fused_status()}")
    return lib


# ------------------------------------------------------------------------------------------
# 4. Spark attention decode (Spark §attention; REFERENCE.md §4). Reference:
#    spark.spark_attention_np(q, k, v, k_top, r) with T = 1 (the new token sees all n keys).
#
#    For one query q [hd] of head h, over the n cached keys K_j, values V_j of its KV head:
#        s_j = q[:r] . K_j[:r] / sqrt(r)                     every j: reads n r values
#        keep the kt = min(k_top, n) largest s_j (exact top-k, spark.py's choice)
#        w_j = softmax(s)_j * softplus(q[r:] . K_j[r:] / sqrt(hd - r))   kept j only
#        out = sum_j w_j V_j                                 kept j only
#    Bytes per head: n r + kt (hd - r) + kt hd vs 2 n hd for dense attention: at n = 8192,
#    hd = 256, r = 128, kt = 256 that is 1.15 M vs 4.19 M values, the 3.6x limit.
#
#    Layout: the cache is kept split at r, k1 [B, Hkv, n, r] and k2 [B, Hkv, n, hd - r], so that
#    the score pass streams k1 contiguously instead of reading half of every 1 KB key row
#    (a strided read drags whole cache lines and defeats the prefetcher); a decoder appends each
#    new key to both halves (generate_cpu does). Grouped-query heads: each of the G query heads
#    of a KV head picks its own kt tokens (spark.py's choice), so the K2/V rows read are the
#    union of G selections, up to G kt rows.
# ------------------------------------------------------------------------------------------


def prepare_spark_kv_cpu(k, v, r):
    """Split a KV cache for Spark attention decoding: k, v [B, Hkv, n, hd] ->
    (k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]), contiguous copies."""
    _check_tensors("prepare_spark_kv_cpu", k=k, v=v)
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"prepare_spark_kv_cpu: expected k and v [B, Hkv, n, hd], got k {_shape(k)}, v {_shape(v)}")
    hd = k.shape[-1]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hd - 1:
        raise ValueError(f"prepare_spark_kv_cpu: r must be an int in [1, hd-1] = [1, {hd - 1}], got {r!r}")
    return _relayout(k[..., :r]), _relayout(k[..., r:]), _relayout(v)


@torch.no_grad()
def spark_attention_decode_cpu(q, k1, k2, v, k_top, r):
    """Spark attention for one new token; must match spark.spark_attention_np(q, k, v, k_top, r)
    with T = 1, where k = cat(k1, k2) on the last axis.

    q [B, H, 1, hd] (or [B, H, hd]); k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]
    (prepare_spark_kv_cpu, or views into a bigger buffer with whole-row strides) -> q's shape.
    With n <= k_top the query attends to all n keys (no top-k), as the reference.
    """
    _check_tensors("spark_attention_decode_cpu", q=q, k1=k1, k2=k2, v=v)
    q4 = q.dim() == 4
    if not (q.dim() == 3 or (q4 and q.shape[2] == 1)):
        raise ValueError(f"spark_attention_decode_cpu: q must be [B, H, 1, hd] or [B, H, hd] (one new token), got {_shape(q)}")
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    if k1.dim() != 4 or k2.dim() != 4 or v.dim() != 4:
        raise ValueError(f"spark_attention_decode_cpu: k1, k2, v must be [B, Hkv, n, *]; got {_shape(k1)}, {_shape(k2)}, {_shape(v)}")
    Hkv, n = k1.shape[1], k1.shape[2]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hd - 1:
        raise ValueError(f"spark_attention_decode_cpu: r must be an int in [1, hd-1] = [1, {hd - 1}], got {r!r}")
    if k1.shape != (B, Hkv, n, r) or k2.shape != (B, Hkv, n, hd - r) or v.shape != (B, Hkv, n, hd):
        raise ValueError(f"spark_attention_decode_cpu: with q {_shape(q)} and r={r} expected k1 [B, Hkv, n, r], "
                         f"k2 [B, Hkv, n, hd-r], v [B, Hkv, n, hd]; got k1 {_shape(k1)}, k2 {_shape(k2)}, v {_shape(v)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"spark_attention_decode_cpu: H ({H}) must be a multiple of Hkv ({Hkv})")
    if n == 0:
        raise ValueError("spark_attention_decode_cpu: the cache is empty (n = 0); the new token's own key must be in it")
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        raise ValueError(f"spark_attention_decode_cpu: k_top must be an int >= 1, got {k_top!r}")
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, hd)  # [B, Hkv, G, hd]
    # s_j = q[:r] . K1_j / sqrt(r) for every cached j.
    # k1 @ q1^T ([n, r] x [r, G] per head) streams k1 at ~26 GB/s here; the same product written
    # q1 @ k1^T ([G, r] x [r, n]) ran at ~11 GB/s (MKL treats a transposed right operand badly).
    # The 1/sqrt(r) scale is positive, so it does not change which scores are the largest: we
    # apply it to the kt kept scores only.
    s = (k1 @ qg[..., :r].transpose(-1, -2)).transpose(-1, -2)  # [B, Hkv, G, n] q[:r] . K1_j: reads all of k1
    kt = min(k_top, n)
    if kt < n:
        vals, idx = torch.topk(s, kt, dim=-1, sorted=False)  # [B, Hkv, G, kt] each (exact top-k)
    else:
        vals, idx = s, torch.arange(n).expand(B, Hkv, G, n)  # every key is kept
    vals = vals * (1.0 / math.sqrt(r))  # [B, Hkv, G, kt] s_j = q[:r] . K1_j / sqrt(r)
    # Flat row numbers of the kept tokens in the k2 / v tables (one gather for every head).
    t2, base2 = _row_table(k2)  # [R, hd - r], [B][Hkv]
    tv, basev = _row_table(v)  # [R', hd], [B][Hkv]
    rows2 = (torch.tensor(base2)[:, :, None, None] + idx).reshape(-1)  # [B H kt]
    rowsv = rows2 if basev == base2 else (torch.tensor(basev)[:, :, None, None] + idx).reshape(-1)  # [B H kt]
    K2s = t2.index_select(0, rows2).view(B, Hkv, G, kt, hd - r)  # [B, Hkv, G, kt, hd - r]: kt rows per head
    # w_j = softmax(s)_j * softplus(q[r:] . K2_j / sqrt(hd - r))
    q2 = qg[..., r:] * (1.0 / math.sqrt(hd - r))  # [B, Hkv, G, hd - r]
    gate = F.softplus((K2s * q2[..., None, :]).sum(-1))  # [B, Hkv, G, kt] (a multiply-sum beat a batched GEMV here)
    w = torch.softmax(vals, dim=-1) * gate  # [B, Hkv, G, kt]
    # out = sum_j w_j V_j: one bag of kt rows per (batch, head), parallel over the B H bags
    offsets = torch.arange(0, B * H * kt, kt)  # [B H]
    out = F.embedding_bag(rowsv, tv, offsets, mode="sum", per_sample_weights=w.reshape(-1))  # [B H, hd]
    return out.view(B, H, 1, hd) if q4 else out.view(B, H, hd)


# ------------------------------------------------------------------------------------------
# 5. Dense baselines, as fast as we could make them (the benchmark's denominators)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def gated_ffn_decode_cpu(x, Wg, Wu, Wd, act="gelu"):
    """Dense gated FFN, spark.gated_ffn_np(x, Wg, Wu, Wd, act): three GEMVs on the weights as
    stored ([d, f] row-major: `x @ W` streams W front to back, the fastest form measured here)."""
    _check_tensors("gated_ffn_decode_cpu", x=x, Wg=Wg, Wu=Wu, Wd=Wd)
    a = F.gelu(x @ Wg, approximate="tanh") if act == "gelu" else F.relu(x @ Wg)  # [..., f]
    return (a * (x @ Wu)) @ Wd  # [..., d]


@torch.no_grad()
def attention_decode_cpu(q, k, v):
    """Dense attention of one new token over the whole cache; must match spark.attention_np
    with T = 1.   q [B, H, 1, hd] (or [B, H, hd]), k v [B, Hkv, n, hd] -> q's shape.

    Two GEMVs per head, s = K q / sqrt(hd) and out = softmax(s) V: 8.2 ms here at n = 8192, 8
    heads of 256, against 11.5 ms for torch's scaled_dot_product_attention (its CPU flash kernel
    is built for many queries; with one it does not stream the cache at full speed). We take
    the faster one as the baseline, so the speedups below are not inflated by a slow dense path.
    """
    _check_tensors("attention_decode_cpu", q=q, k=k, v=v)
    q4 = q.dim() == 4
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd or H % k.shape[1] != 0 \
            or not (q.dim() == 3 or (q4 and q.shape[2] == 1)):
        raise ValueError(f"attention_decode_cpu: expected q [B, H, 1, hd], k and v [B, Hkv, n, hd] with H % Hkv == 0; "
                         f"got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, hd) * (1.0 / math.sqrt(hd))  # [B, Hkv, G, hd]
    s = k @ qg.transpose(-1, -2)  # [B, Hkv, n, G]: reads all of k
    p = torch.softmax(s, dim=-2)  # [B, Hkv, n, G] over the n keys
    out = p.transpose(-1, -2) @ v  # [B, Hkv, G, hd]: reads all of v
    return out.view(B, H, 1, hd) if q4 else out.view(B, H, hd)


# ------------------------------------------------------------------------------------------
# 6. Decoding a spark.GPT with these kernels: generate_cpu
#
#    Same loop as spark.GPT.generate (prefill, then one token at a time against a KV cache,
#    the same sampling code, the same random numbers), with three differences that make it fast:
#    - the weights are re-laid once (prepare_*), and each layer's FFN runs its decode kernel:
#      SparkFFN -> spark_ffn_decode_cpu, ReluL1FFN -> relu_ffn_decode_cpu, GatedFFN -> the
#      dense GEMVs; TopkFFN (exact / statistical top-k on the gate) runs its own module
#      (a sparse kernel for it would be relu_ffn_decode_cpu with another selection rule);
#    - the KV cache is preallocated for block_size tokens and written in place (GPT.generate
#      concatenates, which copies the whole cache every token), and for Spark attention it is
#      split at r (k1, k2, v), so spark_attention_decode_cpu reads k1 contiguously;
#    - a token is a [B, d] row through the layers, no [B, 1, d] bookkeeping.
#    The prefill (the prompt, and the rebuild when the window slides past block_size, as in
#    GPT.generate) runs the model's own blocks and then copies their caches into ours.
# ------------------------------------------------------------------------------------------


def _prepare_model(model):
    """Per layer: which FFN kernel and attention kernel to run, with re-laid weights."""
    import spark  # here, not at the top: the kernels above do not need the model code

    layers = []
    for blk in model.blocks:
        ffn, att = blk.ffn, blk.attn
        if isinstance(ffn, spark.SparkFFN):
            f_kind, f_args = "spark", (prepare_spark_ffn_cpu(ffn.K1, ffn.K2, ffn.V), ffn.k, ffn.r)
        elif isinstance(ffn, spark.ReluL1FFN):
            f_kind, f_args = "relu", (prepare_relu_ffn_cpu(ffn.Wg, ffn.Wu, ffn.Wd),)
        elif isinstance(ffn, spark.GatedFFN):
            f_kind, f_args = "dense", ((ffn.Wg.detach(), ffn.Wu.detach(), ffn.Wd.detach()), ffn.act)
        else:  # TopkFFN: its own (dense-compute) forward
            f_kind, f_args = "module", ()
        a_kind = "spark" if isinstance(att, spark.SparkAttention) else "dense"
        layers.append({"blk": blk, "ffn": f_kind, "ffn_args": f_args, "attn": a_kind})
    return layers


def _run_ffn(layer, h):
    """h [B, d] -> [B, d] with the layer's decode kernel."""
    kind, args = layer["ffn"], layer["ffn_args"]
    if kind == "spark":
        (K1, K2t, V), k, r = args
        return spark_ffn_decode_cpu(h, K1, K2t, V, k, r)
    if kind == "relu":
        return relu_ffn_decode_cpu(h, *args[0])
    if kind == "dense":
        (Wg, Wu, Wd), act = args
        return gated_ffn_decode_cpu(h, Wg, Wu, Wd, act)
    return layer["blk"].ffn(h)


def _prefill(model, layers, idx):
    """Run the prompt idx [B, T] through the model's own blocks; fill our caches. -> logits [B, V]"""
    B, T = idx.shape
    cap = model.config.block_size
    caches = [{} for _ in layers]
    x = model.drop(model.wte(idx) + model.wpe(torch.arange(T)))  # [B, T, d]
    for layer, cache in zip(layers, caches):
        x = layer["blk"](x, cache)  # [B, T, d]; fills cache["k"], cache["v"] [B, Hkv, T, hd]
    for layer, cache in zip(layers, caches):
        k, v = cache["k"], cache["v"]  # [B, Hkv, T, hd]
        Hkv, hd = k.shape[1], k.shape[3]
        if layer["attn"] == "spark":
            r = layer["blk"].attn.r
            layer["k1"] = k.new_empty(B, Hkv, cap, r)  # [B, Hkv, cap, r]
            layer["k2"] = k.new_empty(B, Hkv, cap, hd - r)  # [B, Hkv, cap, hd - r]
            layer["k1"][:, :, :T] = k[..., :r]
            layer["k2"][:, :, :T] = k[..., r:]
        else:
            layer["k"] = k.new_empty(B, Hkv, cap, hd)
            layer["k"][:, :, :T] = k
        layer["v"] = v.new_empty(B, Hkv, cap, hd)
        layer["v"][:, :, :T] = v
    return model.ln_f(x[:, -1]) @ model.wte.weight.T  # [B, V]


def _decode_step(model, layers, tok, n):
    """One new token tok [B] at position n (n tokens cached) through every layer. -> logits [B, V]"""
    B = tok.shape[0]
    x = model.wte(tok) + model.wpe.weight[n]  # [B, d]
    for layer in layers:
        blk = layer["blk"]
        att = blk.attn
        H, Hkv, hd = att.H, att.Hkv, att.hd
        h = blk.ln_1(x)  # [B, d]
        q = att.q_proj(h).view(B, H, hd)  # [B, H, hd]
        k = att.k_proj(h).view(B, Hkv, hd)  # [B, Hkv, hd]
        layer["v"][:, :, n] = att.v_proj(h).view(B, Hkv, hd)
        v = layer["v"][:, :, :n + 1]  # [B, Hkv, n + 1, hd] a view, no copy
        if layer["attn"] == "spark":
            r = att.r
            layer["k1"][:, :, n] = k[..., :r]
            layer["k2"][:, :, n] = k[..., r:]
            o = spark_attention_decode_cpu(q, layer["k1"][:, :, :n + 1], layer["k2"][:, :, :n + 1], v, att.k_top, r)
        else:
            layer["k"][:, :, n] = k
            o = attention_decode_cpu(q[:, :, None], layer["k"][:, :, :n + 1], v)[:, :, 0]  # [B, H, hd]
        x = x + att.o_proj(o.reshape(B, H * hd))  # [B, d]
        x = x + _run_ffn(layer, blk.ln_2(x))  # [B, d]
    return model.ln_f(x) @ model.wte.weight.T  # [B, V]


@torch.no_grad()
def generate_cpu(model, idx, max_new_tokens, temperature=1.0, top_k=None, *, return_logits=False):
    """spark.GPT.generate with the CPU decode kernels: idx [B, T] -> [B, T + max_new_tokens].

    Same arguments, same sampling code and random-number use as GPT.generate, so with the same
    torch seed it returns the same tokens (up to float rounding deciding a near-tie, which the
    different order of additions in the kernels can do; greedy decoding of a trained model is
    the robust comparison). temperature 0 = greedy. return_logits: also the logits each new
    token was drawn from, [B, max_new_tokens, V]. The model must be in eval mode if it has dropout.
    """
    import spark

    if not isinstance(model, spark.GPT):
        raise TypeError(f"generate_cpu: model must be a spark.GPT, got {type(model).__name__}")
    c = model.config
    if model.training and c.dropout > 0:
        raise ValueError("generate_cpu: the model is in training mode with dropout; call model.eval() first")
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
        raise TypeError(f"generate_cpu: idx must be an int64 tensor [B, T], got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.shape[1] == 0 or idx.shape[0] == 0:
        raise ValueError(f"generate_cpu: idx must hold at least one token per row, got shape {_shape(idx)}")
    if int(idx.min()) < 0 or int(idx.max()) >= c.vocab_size:
        raise ValueError(f"generate_cpu: idx must hold token ids in [0, {c.vocab_size}), "
                         f"got min {int(idx.min())}, max {int(idx.max())}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate_cpu: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature < math.inf:
        raise ValueError(f"generate_cpu: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= c.vocab_size):
        raise ValueError(f"generate_cpu: top_k must be None or an int in [1, {c.vocab_size}], got {top_k!r}")
    for p in model.parameters():
        if p.device.type != "cpu" or p.dtype not in _FLOATS:
            raise TypeError(f"generate_cpu: the model must be on the CPU in float32/float64, got {p.device} {p.dtype}")
        break
    idx = idx.long()
    bs = c.block_size
    layers = _prepare_model(model)
    logits = _prefill(model, layers, idx[:, -bs:])  # [B, V]
    n = min(idx.shape[1], bs)  # tokens in the cache
    all_logits = []
    for step in range(max_new_tokens):
        all_logits.append(logits)
        nxt = spark.sample_next(logits, temperature, top_k)  # [B, 1] the same sampling as GPT.generate
        idx = torch.cat([idx, nxt], dim=1)  # [B, T + step + 1]
        if step == max_new_tokens - 1:
            break
        if n < bs:
            logits = _decode_step(model, layers, nxt[:, 0], n)  # one token against the cache
            n += 1
        else:
            logits = _prefill(model, layers, idx[:, -bs:])  # the window slid: rebuild
            n = bs
    if return_logits:
        out = torch.stack(all_logits, dim=1) if all_logits else logits.new_zeros(idx.shape[0], 0, c.vocab_size)
        return idx, out
    return idx


# ------------------------------------------------------------------------------------------
# 7. The benchmark: python kernels_cpu.py [--json PATH] [--reps N] [--no-plot] [--quick]
#
#    For each kernel, the dense baseline and the sparse path run in the same process on the
#    same inputs, interleaved rep by rep (so a burst of load from another process hits both),
#    each rep timed alone after reading a 64 MB buffer that evicts the caches: a decoding
#    model streams every other layer's weights between two visits of a layer, so nothing of
#    this layer is in cache when it comes back. We rotate through 16 inputs, so the gathered
#    rows change from rep to rep. Reported: median ms, speedup, effective GB/s (bytes the
#    kernel must read / time), and the byte limit (dense bytes / sparse bytes): the speedup a
#    sparse kernel would reach if both sides streamed at the same GB/s.
# ------------------------------------------------------------------------------------------

_FLUSH = None


def _flush():
    """Read 64 MB (twice the L3 of this machine) so no kernel finds its data in cache."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(16 * 1024 * 1024)  # 64 MB float32
    _FLUSH.sum()  # reads only: no dirty lines left to write back during the next timing


def _time_interleaved(fns, inputs, reps, warmup=3):
    """fns: {name: fn(input)}. Runs each fn once per rep, in turn, on the rep's input, after a
    cache flush. -> {name: median seconds}."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        inp = inputs[i % len(inputs)]
        for name, fn in fns.items():
            _flush()
            t0 = time.perf_counter()
            fn(inp)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _machine():
    """A line naming the machine: CPU model (lscpu), cores, torch version and threads."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _cpu_busy():
    """(busy seconds of all CPUs, stolen seconds, our own CPU seconds) so far, from /proc/stat
    (Linux; zeros elsewhere). Busy minus ours = what other processes used while we measured;
    steal = time the hypervisor gave our virtual CPUs to someone else."""
    mine = sum(os.times()[:2])
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz, mine
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0, mine


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _record(name, t_base, t_sparse, bytes_base, bytes_sparse, **extra):
    limit = bytes_base / bytes_sparse
    speedup = t_base / t_sparse
    rec = {"name": name, "baseline_ms": t_base * 1e3, "ms": t_sparse * 1e3, "speedup": speedup, "limit": limit,
           "fraction_of_limit": speedup / limit, "baseline_GBps": bytes_base / t_base / 1e9,
           "GBps": bytes_sparse / t_sparse / 1e9, "baseline_MB": bytes_base / 1e6, "MB": bytes_sparse / 1e6}
    rec.update(extra)
    return rec


def _randn(*shape, std=1.0, gen=None):
    return torch.randn(*shape, generator=gen) * std


# --- the cases ----------------------------------------------------------------------------


def bench_spark_ffn(d=2304, f_gated=9216, r=1024, density=0.08, M=1, reps=40, gen=None):
    """Spark FFN (f = 1.5 f_gated) vs the dense GeGLU of the same parameter count."""
    f = round(1.5 * f_gated)
    k = max(1, round(density * f))
    # the dense weights get the same 2 MB pages as the sparse ones (_relayout): a fair baseline
    Wg = _relayout(_randn(d, f_gated, std=d ** -0.5, gen=gen))
    Wu = _relayout(_randn(d, f_gated, std=d ** -0.5, gen=gen))
    Wd = _relayout(_randn(f_gated, d, std=f_gated ** -0.5, gen=gen))
    K1, K2t, V = prepare_spark_ffn_cpu(_randn(r, f, std=r ** -0.5, gen=gen), _randn(d - r, f, std=(d - r) ** -0.5, gen=gen),
                                       _randn(f, d, std=f ** -0.5, gen=gen))
    xs = [_randn(M, d, gen=gen) for _ in range(16)]
    # neurons actually gathered (the statistical top-k keeps *about* k; with M > 1 their union)
    m = statistics.mean(int(np.flatnonzero(_survivors_np(P, _threshold_rows_np(P, k)).any(axis=0)).shape[0])
                        for P in ((x[:, :r] @ K1).numpy() for x in xs))
    fns = {"dense": lambda x: gated_ffn_decode_cpu(x, Wg, Wu, Wd, "gelu"),
           "eager": lambda x: spark_ffn_decode_cpu(x, K1, K2t, V, k, r, fused=False)}
    if M == 1 and _fused_lib() is not None:
        fns["fused"] = lambda x: spark_ffn_decode_cpu(x, K1, K2t, V, k, r, fused=True)
    if M > 1:
        # For a few tokens MKL's [M, d] x [d, f] product runs at ~9 GB/s here, while the same
        # product on transposed weights, W^T [f, d] x x^T, streams at ~13 GB/s: the dense side
        # gets that layout too, and we keep whichever dense form is faster in this run.
        WgT, WuT, WdT = _relayout(Wg.t()), _relayout(Wu.t()), _relayout(Wd.t())
        fns["dense_t"] = lambda x: (WdT @ (F.gelu(WgT @ x.t(), approximate="tanh") * (WuT @ x.t()))).t()
    t = _time_interleaved(fns, xs, reps)
    t_dense = min(t["dense"], t.get("dense_t", math.inf))
    bytes_dense = 3 * d * f_gated * 4
    bytes_sparse = (r * f + m * (d - r) + m * d) * 4
    return [_record(f"spark_ffn_decode/d{d}_f{f}_r{r}_k{k}/M{M}/{path}", t_dense, t[path], bytes_dense, bytes_sparse,
                    baseline=f"dense GeGLU, gated f {f_gated} (equal params)", density=m / f, k=k, gathered=m, M=M,
                    path=path) for path in ("eager", "fused") if path in t]  # one record per path


def bench_relu_ffn(d=2048, f=5632, density=0.01, M=1, reps=40, gen=None):
    """ReLU-gated FFN at a given fraction of nonzero activations vs the same FFN computed densely.

    To get the density of a trained L1 model from random weights we put a constant 1 in input
    coordinate 0 and -Q(1 - density) in row 0 of Wg: a gate bias in disguise, so each gate
    pre-activation is ~N(-Q(1-density), 1) and a fraction `density` of them is positive.
    """
    scale = (d - 1) ** -0.5
    Wg = _randn(d, f, std=scale, gen=gen)
    Wg[0] = -normal_icdf(1.0 - density)
    Wu, Wd = _randn(d, f, std=scale, gen=gen), _randn(f, d, std=f ** -0.5, gen=gen)
    Wg_p, Wut, Wd_p = prepare_relu_ffn_cpu(Wg, Wu, Wd)
    Wg, Wu, Wd = _relayout(Wg), _relayout(Wu), _relayout(Wd)  # dense side: same 2 MB pages
    xs = []
    for _ in range(16):
        x = _randn(M, d, gen=gen)
        x[:, 0] = 1.0
        xs.append(x)
    m = statistics.mean(int(((x @ Wg) > 0).any(dim=0).sum()) for x in xs)
    fns = {"dense": lambda x: gated_ffn_decode_cpu(x, Wg, Wu, Wd, "relu"),
           "eager": lambda x: relu_ffn_decode_cpu(x, Wg_p, Wut, Wd_p, fused=False)}
    if M == 1 and _fused_lib() is not None:
        fns["fused"] = lambda x: relu_ffn_decode_cpu(x, Wg_p, Wut, Wd_p, fused=True)
    t = _time_interleaved(fns, xs, reps)
    bytes_dense = 3 * d * f * 4
    bytes_sparse = (d * f + 2 * m * d) * 4
    return [_record(f"relu_ffn_decode/d{d}_f{f}/nonzero{density:.2%}/M{M}/{path}", t["dense"], t[path], bytes_dense,
                    bytes_sparse, baseline="dense ReLU-gated FFN", density=m / f, gathered=m, M=M, path=path)
            for path in ("eager", "fused") if path in t]  # one record per path


def bench_spark_attention(n=8192, H=8, hd=256, k_top=256, r=128, reps=40, gen=None):
    """Spark attention decode vs dense attention (SDPA) over the same cache, one new token."""
    B, Hkv = 1, H
    k = _relayout(_randn(B, Hkv, n, hd, gen=gen))
    v = _relayout(_randn(B, Hkv, n, hd, gen=gen))
    k1, k2, vv = prepare_spark_kv_cpu(k, v, r)
    qs = [_randn(B, H, 1, hd, gen=gen) for _ in range(16)]
    t = _time_interleaved({"dense": lambda q: attention_decode_cpu(q, k, v),
                           "sparse": lambda q: spark_attention_decode_cpu(q, k1, k2, vv, k_top, r)}, qs, reps)
    kt = min(k_top, n)
    bytes_dense = 2 * Hkv * n * hd * 4
    bytes_sparse = H * (n * r + kt * (hd - r) + kt * hd) * 4
    return _record(f"spark_attention_decode/n{n}_H{H}_hd{hd}_k{k_top}_r{r}", t["dense"], t["sparse"], bytes_dense,
                   bytes_sparse, baseline="dense attention, SDPA", density=kt / n, n=n)


def bench_statistical_topk(R=2048, D=16384, density=0.08, reps=7, gen=None):
    """Statistical top-k (blocked) vs exact top-k (torch.topk + scatter) over [R, D] float32 rows.

    Three pairs, each side given the same output handling: both allocate their result; both
    write into a buffer allocated once (out=); both overwrite their input (in place; the input
    is restored, untimed, before each rep). The limit is not a byte ratio here: exact top-k is a
    selection, bound by compute, so we give t_exact / t_copy, the speedup of a kernel that only
    moved its bytes (one read of x, one write of the result) at the copy speed of this run.
    """
    k = max(1, round(density * D))
    src = _randn(R, D, gen=gen)
    x = torch.empty(R, D)
    out = torch.empty(R, D)
    vals, inds = torch.empty(R, k), torch.empty(R, k, dtype=torch.long)

    def exact(x):
        val, ind = torch.topk(x, k, dim=-1, sorted=False)  # [R, k]
        return torch.zeros_like(x).scatter_(-1, ind, val)  # [R, D]

    def exact_out(x):
        torch.topk(x, k, dim=-1, sorted=False, out=(vals, inds))
        return out.zero_().scatter_(-1, inds, vals)

    def exact_inplace(x):
        torch.topk(x, k, dim=-1, sorted=False, out=(vals, inds))
        return x.zero_().scatter_(-1, inds, vals)

    import topk as topk_mod

    fns = {"exact": exact, "stat": lambda x: statistical_topk_cpu(x, k, fused=False),
           "exact_out": exact_out, "stat_out": lambda x: statistical_topk_cpu(x, k, out=out, fused=False),
           "exact_inplace": exact_inplace, "stat_inplace": lambda x: statistical_topk_cpu(x, k, out=x, fused=False),
           "eager": lambda x: topk_mod.statistical_topk(x, k), "copy": lambda x: out.copy_(x)}
    pairs = [("exact", "stat", "allocating"), ("exact_out", "stat_out", "out= buffer"),
             ("exact_inplace", "stat_inplace", "in place (out=x)")]
    if _fused_lib() is not None:  # the C row loop of section 3b, same three output modes
        fns.update({"fused": lambda x: statistical_topk_cpu(x, k, fused=True),
                    "fused_out": lambda x: statistical_topk_cpu(x, k, out=out, fused=True),
                    "fused_inplace": lambda x: statistical_topk_cpu(x, k, out=x, fused=True)})
        pairs += [("exact", "fused", "allocating, fused"), ("exact_out", "fused_out", "out= buffer, fused"),
                  ("exact_inplace", "fused_inplace", "in place (out=x), fused")]
    times = {name: [] for name in fns}
    for i in range(1 + reps):
        for name, fn in fns.items():
            x.copy_(src)  # untimed: every variant starts from the same input
            _flush()
            t0 = time.perf_counter()
            fn(x)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    t = {name: statistics.median(ts) for name, ts in times.items()}
    nbytes = 2 * R * D * 4  # one read + one write
    recs = []
    for base, name, label in pairs + [("exact", "eager", "topk.statistical_topk, eager, allocating")]:
        limit = t[base] / t["copy"]
        speedup = t[base] / t[name]
        recs.append({"name": f"statistical_topk/{R}x{D}_k{k}/{label}", "baseline_ms": t[base] * 1e3,
                     "ms": t[name] * 1e3, "speedup": speedup, "limit": limit, "fraction_of_limit": speedup / limit,
                     "baseline": "exact top-k: torch.topk + scatter, same output handling",
                     "GBps": nbytes / t[name] / 1e9, "copy_ms": t["copy"] * 1e3,
                     "copy_GBps": nbytes / t["copy"] / 1e9, "k": k})
    return recs


def bench_read_bandwidth(reps=10):
    """What one stream can read here: sum over 256 MB (GB/s)."""
    a = torch.ones(64 * 1024 * 1024)
    ts = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(ts[2:]) / 1e9


# --- the table, the figure, main ----------------------------------------------------------


def _print_table(recs):
    hdr = (f"{'kernel':<62} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'limit':>6} {'of limit':>8} "
           f"{'dense GB/s':>10} {'sparse GB/s':>11} {'others':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in recs:
        print(f"{r['name']:<62} {r['baseline_ms']:>9.2f} {r['ms']:>9.2f} {r['speedup']:>7.2f}x {r['limit']:>5.2f}x "
              f"{r['fraction_of_limit']:>8.0%} {r.get('baseline_GBps', float('nan')):>10.1f} {r['GBps']:>11.1f} "
              f"{r.get('others_cores', float('nan')):>6.2f}")


def _measured(fn, *args, **kw):
    """Run a bench_* function; add to its record(s) how many cores other processes and the
    hypervisor (steal) took meanwhile: above ~0.05 the timings were taken under load."""
    b0, s0, m0 = _cpu_busy()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    wall = time.perf_counter() - t0
    b1, s1, m1 = _cpu_busy()
    others = max(0.0, (b1 - b0) - (m1 - m0)) / wall
    for r in out if isinstance(out, list) else [out]:
        r["others_cores"] = others
        r["steal_cores"] = (s1 - s0) / wall
    return out


def _plot(sweeps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (label, recs) in enumerate(sweeps.items()):
        xs = [r["density"] for r in recs]
        ax.plot(xs, [r["speedup"] for r in recs], "o-", color=f"C{i}", label=f"{label}: measured")
        ax.plot(xs, [r["limit"] for r in recs], "--", color=f"C{i}", alpha=0.6, label=f"{label}: byte limit")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax.yaxis.set_major_locator(FixedLocator([0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("density: fraction of FFN neurons (or cached tokens) read in full")
    ax.set_ylabel("speedup of the sparse path over dense")
    ax.set_title("Sparse decode on the CPU: speedup vs density (below 1 the sparse path stops paying)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Dense vs sparse CPU decode kernels: time, speedup, GB/s, byte limit.")
    ap.add_argument("--json", metavar="PATH", help="also write the table as a JSON list of records")
    ap.add_argument("--reps", type=int, default=40, help="timed repetitions per kernel (median is reported)")
    ap.add_argument("--no-plot", action="store_true", help="skip the density sweep and its figure")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and no sweep (a smoke run)")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else args.reps
    gen = torch.Generator().manual_seed(0)
    mach = _machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['threads']} threads), "
          f"float32, load average {_loadavg():.2f}")
    print(f"FFN decoders (one float32 token): {fused_status()}")
    bw = bench_read_bandwidth()
    print(f"read bandwidth (sum over 256 MB): {bw:.1f} GB/s")
    print("'others': cores used by other processes + stolen by the hypervisor while a row was measured "
          "(of 2; above ~0.05 that row was taken under load)\n")
    recs = [*_measured(bench_spark_ffn, reps=reps, gen=gen),
            *_measured(bench_spark_ffn, M=4, reps=reps, gen=gen),
            *_measured(bench_relu_ffn, density=0.01, reps=reps, gen=gen),
            *_measured(bench_relu_ffn, density=0.005, reps=reps, gen=gen)]
    for n in (1024, 4096, 8192):
        recs.append(_measured(bench_spark_attention, n=n, reps=reps, gen=gen))
    recs.extend(_measured(bench_statistical_topk, reps=3 if args.quick else 7, gen=gen))
    for r in recs:
        r["others_cores"] += r.pop("steal_cores")
    _print_table(recs)
    if not args.no_plot and not args.quick:
        sweep_reps = max(5, reps // 3)
        path = "fused" if _fused_lib() is not None else "eager"  # the FFNs' default path; [-1] is its record
        sweeps = {
            f"Spark FFN ({path})": [_measured(bench_spark_ffn, density=p, reps=sweep_reps, gen=gen)[-1]
                                    for p in (0.01, 0.03, 0.08, 0.2, 0.4, 0.7)],
            f"ReLU FFN ({path})": [_measured(bench_relu_ffn, density=p, reps=sweep_reps, gen=gen)[-1]
                                   for p in (0.005, 0.01, 0.03, 0.1, 0.3, 0.6)],
            "Spark attention n=8192": [_measured(bench_spark_attention, k_top=kt, reps=sweep_reps, gen=gen)
                                       for kt in (64, 256, 1024, 2048, 4096, 6144)],
        }
        print("\ndensity sweep (the figure):")
        for rs in sweeps.values():
            for r in rs:
                r["others_cores"] += r.pop("steal_cores")
                r["sweep"] = True
        _print_table([r for rs in sweeps.values() for r in rs])
        recs.extend(r for rs in sweeps.values() for r in rs)
        _plot(sweeps, os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes", "figures",
                                   "kernels_cpu_speedup_vs_density.png"))
    for r in recs:
        r.update({"machine": mach["cpu"], "torch": mach["torch"], "threads": mach["threads"], "read_GBps": bw})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(recs, fh, indent=1)
        print(f"wrote {args.json}")
    return recs


if __name__ == "__main__":
    main()
