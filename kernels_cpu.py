"""kernels_cpu.py: sparse decoding that is really faster on a CPU, measured against dense.

The Spark Transformer (arXiv 2506.06644, "Spark's headline results" in notes/papers.md) reports
decoding up to 1.79x faster on a 16-core CPU with kernels that are not public. This file turns
the sparsity of spark.py into wall time on a laptop-class CPU and measures it. As in llm.c's
kernel files, each kernel comes in versions, the simplest first, and each version must compute
what its NumPy reference computes (same argument names, same order; tests/test_kernels_cpu.py
checks every version against it, and the benchmark checks again before it times anything).

The kernels and their versions
    statistical_topk_cpu(x, k, fill, soft)     reference: topk.statistical_topk_np
        version 1: topk.statistical_topk itself (eager PyTorch, differentiable, any dtype).
        version 2: one C loop over rows (float32, soft, fill 0): each row is read from DRAM once,
                   its statistics and its output computed while it sits in L2.
        teaches: a memory-bound op is as fast as its trips to DRAM; eager ops make one per pass.
    spark_ffn_decode_cpu(x, K1, K2t, V, k, r)  reference: spark.spark_ffn_np
        version 1: eager PyTorch for the big reads (a GEMV, a gather of K2 rows, a weighted sum
                   of V rows with embedding_bag), NumPy for the short vectors.
        version 2: the predictor GEMV in PyTorch, then one C call: threshold, survivors, and per
                   survivor "dot a row, scale another row, accumulate", with prefetch.
        teaches: decoding is memory-bound, a sparse layer wins by the bytes it does not read, and
                 only if each neuron's weights are one contiguous row (prepare_spark_ffn_cpu).
    relu_ffn_decode_cpu(x, Wg, Wut, Wd)        reference: y of spark.relu_l1_ffn_np (Sakana)
        version 1 / version 2: as the Spark FFN, with survivors g > 0 of a dense gate.
    spark_attention_decode_cpu(q, k1, k2, v, k_top, r)   reference: spark.spark_attention_np, T = 1
        version 1 only: exact top-k of the predictor scores, gathers of the kept rows.
    gated_ffn_decode_cpu, attention_decode_cpu: the dense baselines (spark.gated_ffn_np,
        spark.attention_np), as fast as we could make them.
    generate_cpu(model, idx, ...): decode a spark.GPT with these kernels (spark.decode_loop).

One switch picks the version: FUSED (on unless the environment sets SPARK_NO_FUSED) takes
version 2 wherever it applies (one float32 token, packed weights; float32 soft fill-0 rows for
the top-k) and the C library could be built; everything else, and every call without a C
compiler, runs version 1. fused_status() says which runs and why.
`python kernels_cpu.py [--json PATH] [--reps N | --quick]` is the benchmark: dense vs sparse in one run.

Dimension letters (every shape comment below uses them)
    d    model width                     f    FFN width (neurons)
    r    predictor slice: the first r of d (FFN) or of hd (attention)
    k    FFN neurons kept per token (target; the statistical threshold keeps about k)
    m    neurons actually gathered (survivors of one token, or their union over M tokens)
    M    tokens in one call          B    batch size        H, Hkv   query heads, key/value heads
    G    query heads per KV head     hd   head size         n        cached tokens
    kt   tokens kept per query (k_top)          D, R   row length and rows of a top-k

Conventions: row vectors, y = x @ W with W [in, out] (as spark.py); float32 unless said; GELU is
the tanh approximation. Numbers quoted in comments were measured on a 2-core AMD EPYC VM
(torch 2.13 CPU) unless said; notes/kernels_cpu.md has the tables and the other machines.
"""

# the kernels
import functools
import math
import mmap
import os
import warnings
# the benchmark
import argparse
import json
import time
# building and loading the C loop
import ctypes
import hashlib
import platform
import shutil
import subprocess
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import spark
from topk import check_k, exact_topk_np, normal_icdf, statistical_threshold_np, statistical_topk, statistical_topk_np

# The switch: version 2 (the fused C loop) wherever it applies. Tests flip it with monkeypatch.
FUSED = not os.environ.get("SPARK_NO_FUSED")

# ------------------------------------------------------------------------------------------
# 0. Argument checks, 2 MB pages, the row-table view of a KV cache
# ------------------------------------------------------------------------------------------


def _check_tensors(where, **tensors):
    """Every argument must be a CPU tensor of one dtype, float32 or float64.

    Why not bf16: torch 2.13's bf16 matrix-vector product ran at ~4 GB/s against ~15 GB/s for
    float32 on the AMD EPYC VM (no fast bf16 GEMV path there), so bf16 weights would halve the
    bytes and still be 2x slower. float64 is allowed so that tests can compare tightly.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{where}: {name} must be a float32 or float64 torch.Tensor on the CPU, got {got}")
    if len({t.dtype for t in tensors.values()}) > 1:
        raise TypeError(f"{where}: tensors must share one dtype, got {', '.join(f'{n} {t.dtype}' for n, t in tensors.items())}")


def _check_int(where, name, value, lo, hi=math.inf):
    """An int in [lo, hi] (not a bool), or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{where}: {name} must be an int in [{lo}, {hi}], got {value!r}")


def _shapes(**tensors):
    """"K1 (3, 4), V (4, 5)": the shapes an error message reports."""
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())


# _q(k, D) = Q(1 - k/D), cached: NormalDist().inv_cdf costs ~5 us, and a decode loop asks again and again
_q = functools.lru_cache(maxsize=256)(lambda k, D: normal_icdf(1.0 - k / D))


def _relayout(t):
    """A contiguous copy of t in memory backed by 2 MB pages where the OS allows it.

    Gathering scattered rows touches a new 4 KB page every few KB, and each first touch costs a
    TLB miss (a page-table walk, itself often a cache miss after a 50 MB stream). Linux backs
    anonymous memory with 2 MB "transparent huge pages" when asked (madvise(MADV_HUGEPAGE)),
    which removes almost all of those misses. torch's allocator does not ask, so we map the
    memory ourselves (Python's mmap) and let torch view it (torch.frombuffer keeps the mapping
    alive as long as the tensor). Measured: the 1106-row K2 gather 0.92 -> 0.81 ms, the
    predictor GEMV 3.58 -> 3.28 ms. Without MADV_HUGEPAGE (macOS, Windows): a plain copy.
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
    return raw[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)


def _row_table(t):
    """View a cache tensor [B, Hkv, n, w] as a table of rows [R, w] plus row offsets [B][Hkv].

    Row (b, h, j) of the cache is row base[b][h] + j of the table. One index_select /
    embedding_bag then gathers rows from every (batch, head) at once, also on a view into a
    bigger preallocated buffer (generate_cpu's cache is [B, Hkv, capacity, w], we pass
    [:, :, :n]) without copying: each row must be contiguous and the batch and head strides whole
    rows. Anything else is copied once (contiguous()).
    """
    B, Hkv, n, w = t.shape
    if not (t.stride(3) == 1 and t.stride(2) == w and t.stride(1) % w == 0 and t.stride(0) % w == 0):
        t = t.contiguous()
    s0, s1 = t.stride(0), t.stride(1)  # whole rows: multiples of w
    base = [[b * (s0 // w) + h * (s1 // w) for h in range(Hkv)] for b in range(B)]  # [B][Hkv] python ints
    R = max(max(row) for row in base) + n if t.numel() else 0  # one past the last row we may index
    return torch.as_strided(t, (R, w), (w, 1), t.storage_offset()), base  # [R, w] shares memory with t


# ------------------------------------------------------------------------------------------
# 1. Spark FFN decode (Spark Transformer, arXiv 2506.06644; notes/papers.md, "Spark FFN").
#    Reference: spark.spark_ffn_np.
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
#    back (the fastest GEMV form we measured, ~15 GB/s vs ~13 GB/s for the transposed one).
#
#    A few tokens at once (M sequences): the predictor is one [M, r] x [r, f] product (K1 still
#    read once), each token keeps its own survivors, and we gather their *union*: a token's
#    non-survivors in it get a = gelu(0) * u = 0, so each token gets exactly its own result. The
#    union grows with M (Polar Sparsity, notes/papers.md, "Other systems"): at 4 tokens it is
#    3.6x one token's, and the benchmark finds this path slower than dense. Correct, not fast.
# ------------------------------------------------------------------------------------------


def prepare_spark_ffn_cpu(K1, K2, V):
    """Re-lay Spark FFN weights for decoding, once (like loading a checkpoint).

    K1 [r, f], K2 [d-r, f], V [f, d] (spark.SparkFFN's parameters) -> (K1 [r, f], K2t [f, d-r],
    V [f, d]), contiguous, detached, on 2 MB pages, in the order spark_ffn_decode_cpu takes them.
    """
    _check_tensors("prepare_spark_ffn_cpu", K1=K1, K2=K2, V=V)
    if K1.dim() != 2 or K2.dim() != 2 or K2.shape[1] != K1.shape[1] or V.shape != (K1.shape[1], K1.shape[0] + K2.shape[0]):
        raise ValueError(f"prepare_spark_ffn_cpu: expected K1 [r, f], K2 [d-r, f], V [f, d]; got {_shapes(K1=K1, K2=K2, V=V)}")
    return _relayout(K1), _relayout(K2.t()), _relayout(V)


def _gather_rows_matmul(A, idx, W, bags=8):
    """Y = A @ W[idx]:  A [M, m], idx [m], W [f, w] -> [M, w], reading only the m rows of W.

    One token (M = 1): torch's embedding_bag with per_sample_weights computes sum_j a_j W[idx_j]
    without writing the gathered [m, w] matrix anywhere (and its kernel prefetches the next rows
    while it adds the current one). It parallelises over bags, so we cut the m rows into `bags`
    bags (8 measured best) and add the partial sums. Measured for the 1106 V rows of 9 KB: 0.63 ms,
    vs 1.07 ms for index_select + vector-matrix product (and 1.5 ms with one bag, measured earlier).
    Several tokens: gather the rows once, then one [M, m] x [m, w] product.
    """
    M, m = A.shape
    if M == 1:
        bags = max(1, min(bags, m))
        offsets = torch.from_numpy((np.arange(bags) * m) // bags)  # [bags] start of each bag
        return F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=A[0]).sum(0, keepdim=True)  # [1, w]
    return A @ W.index_select(0, idx)  # [M, w]


def _spark_ffn_v1(X, K1, K2t, V, k, r):
    """Version 1 of spark_ffn_decode_cpu: X [M, d] -> [M, d], eager PyTorch + NumPy.

    The vectors after the predictor are short (f = 13824 scores, m ~ 1100 survivors), so their
    arithmetic runs in NumPy: ~1-10 us an op, where each eager torch op costs 10-80 us (one
    var_mean on a 13824-value row took ~85 us).
    """
    f = V.shape[0]
    P = X[:, :r] @ K1  # [M, f] p = x[:r] K1: the dense predictor, the one full read of a matrix
    if k == f:  # statistical_topk with k == D returns p unchanged: every neuron, no shift (topk.py)
        return (F.gelu(P, approximate="tanh") * (X[:, r:] @ K2t.t())) @ V  # [M, d]
    Pn = P.numpy()  # [M, f] shares memory with P
    theta = statistical_threshold_np(Pn, k)  # [M, 1] float64: mean(p) + std(p) Q(1 - k/f)
    # survivors p > theta, decided in float64 as in the reference; written ~(p <= theta) so that a
    # NaN theta (NaN in K1) keeps every neuron and its NaN reaches y, as in the reference
    keep = ~(Pn <= theta)  # [M, f]
    idx = np.flatnonzero(keep.any(axis=0))  # [m] survivors of any token (one token: its own; m = 0: y = 0)
    # statistical_topk(p) = p - theta on the survivors (soft threshold), 0 elsewhere
    Z = np.where(keep[:, idx], Pn[:, idx] - theta, 0.0).astype(Pn.dtype)  # [M, m]
    idx_t = torch.from_numpy(idx)  # [m] int64
    # u = x[r:] K2 for the gathered neurons only: m rows of K2t (m (d-r) values), copied by the
    # gather. (torch.sparse.sampled_addmm computes the m dot products without the copy; on
    # torch 2.13 it saved 0.06 of 0.69 ms: not worth a sparse tensor.)
    U = (K2t.index_select(0, idx_t) @ X[:, r:].T).T  # [M, m]
    A = torch.from_numpy(spark.gelu_np(Z) * U.numpy())  # [M, m] a = gelu(topk(p)) * u
    return _gather_rows_matmul(A, idx_t, V)  # [M, d] y = a V over the m gathered rows of V


# ------------------------------------------------------------------------------------------
# 2. ReLU-gated FFN decode for an L1-sparse model (Sakana AI, arXiv 2603.23198;
#    notes/papers.md, "L1-induced sparsity (Sakana)"). Reference: the y of spark.relu_l1_ffn_np.
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
    """Re-lay a ReLU-gated FFN for sparse decoding, once: Wg, Wu [d, f], Wd [f, d] ->
    (Wg [d, f], Wut [f, d], Wd [f, d]), contiguous and detached, in relu_ffn_decode_cpu's order."""
    _check_tensors("prepare_relu_ffn_cpu", Wg=Wg, Wu=Wu, Wd=Wd)
    if Wg.dim() != 2 or Wg.shape != Wu.shape or Wd.shape != (Wg.shape[1], Wg.shape[0]):
        raise ValueError(f"prepare_relu_ffn_cpu: expected Wg and Wu [d, f], Wd [f, d]; got {_shapes(Wg=Wg, Wu=Wu, Wd=Wd)}")
    return _relayout(Wg), _relayout(Wu.t()), _relayout(Wd)


def _relu_ffn_v1(X, Wg, Wut, Wd):
    """Version 1 of relu_ffn_decode_cpu: X [M, d] -> [M, d], eager PyTorch + NumPy."""
    Gn = (X @ Wg).numpy()  # [M, f] the dense gate: all of Wg
    # neurons with g > 0 in any token; ~(g <= 0) also keeps a NaN gate, whose NaN then reaches y
    idx = np.flatnonzero((~(Gn <= 0.0)).any(axis=0))  # [m] (m = 0: y = 0)
    idx_t = torch.from_numpy(idx)  # [m]
    # u = x Wu for the m gathered neurons (rows of Wut)
    U = (Wut.index_select(0, idx_t) @ X.T).T  # [M, m]
    Hm = torch.from_numpy(spark.relu_np(Gn[:, idx]) * U.numpy())  # [M, m] h = relu(g) * u
    return _gather_rows_matmul(Hm, idx_t, Wd)  # [M, d]


# ------------------------------------------------------------------------------------------
# 3. Spark attention decode (Spark Transformer, arXiv 2506.06644; notes/papers.md, "Spark
#    attention"). Reference: spark.spark_attention_np(q, k, v, k_top, r) with T = 1.
#
#    For one query q [hd] of head h, over the n cached keys K_j, values V_j of its KV head:
#        s_j = q[:r] . K_j[:r] / sqrt(r)                     every j: reads n r values
#        keep the kt = min(k_top, n) largest s_j (exact top-k, spark.py's choice)
#        w_j = softmax(s)_j * softplus(q[r:] . K_j[r:] / sqrt(hd - r))   kept j only
#        out = sum_j w_j V_j                                 kept j only
#    Bytes per head: n r + kt (hd - r) + kt hd vs 2 n hd for dense attention: at n = 8192,
#    hd = 256, r = 128, kt = 256 that is 1.15 M vs 4.19 M values, the 3.66x limit.
#
#    Layout: the cache is kept split at r, k1 [B, Hkv, n, r] and k2 [B, Hkv, n, hd - r], so that
#    the score pass streams k1 contiguously instead of reading half of every 1 KB key row
#    (a strided read drags whole cache lines and defeats the prefetcher); a decoder appends each
#    new key to both halves (generate_cpu does). Grouped-query heads: each of the G query heads
#    of a KV head picks its own kt tokens (spark.py's choice), so the K2/V rows read are the
#    union of G selections, up to G kt rows. One version: the gathers already stream their rows
#    (embedding_bag), and what is left is the exact top-k over n scores.
# ------------------------------------------------------------------------------------------


def prepare_spark_kv_cpu(k, v, r):
    """Split a KV cache for Spark attention decoding: k, v [B, Hkv, n, hd] ->
    (k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]), contiguous copies."""
    _check_tensors("prepare_spark_kv_cpu", k=k, v=v)
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"prepare_spark_kv_cpu: expected k and v [B, Hkv, n, hd], got {_shapes(k=k, v=v)}")
    _check_int("prepare_spark_kv_cpu", "r", r, 1, k.shape[-1] - 1)
    return _relayout(k[..., :r]), _relayout(k[..., r:]), _relayout(v)


@torch.no_grad()
def spark_attention_decode_cpu(q, k1, k2, v, k_top, r):
    """Spark attention for one new token; computes spark.spark_attention_np(q, k, v, k_top, r)
    with T = 1, where k = cat(k1, k2) on the last axis.

    q [B, H, 1, hd] (or [B, H, hd]); k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd - r], v [B, Hkv, n, hd]
    (prepare_spark_kv_cpu, or views into a bigger buffer with whole-row strides) -> q's shape.
    With n <= k_top the query attends to all n keys (no top-k), as the reference.
    """
    where = "spark_attention_decode_cpu"
    _check_tensors(where, q=q, k1=k1, k2=k2, v=v)
    if not (q.dim() == 3 or (q.dim() == 4 and q.shape[2] == 1)) or k1.dim() != 4:
        raise ValueError(f"{where}: q must be [B, H, 1, hd] or [B, H, hd] (one new token), "
                         f"k1 [B, Hkv, n, r]; got {_shapes(q=q, k1=k1)}")
    (B, H, hd), (Hkv, n) = (q.shape[0], q.shape[1], q.shape[-1]), k1.shape[1:3]
    _check_int(where, "r", r, 1, hd - 1)
    _check_int(where, "k_top", k_top, 1)
    if k1.shape != (B, Hkv, n, r) or k2.shape != (B, Hkv, n, hd - r) or v.shape != (B, Hkv, n, hd):
        raise ValueError(f"{where}: with q {tuple(q.shape)} and r={r} expected k1 [B, Hkv, n, r], k2 [B, Hkv, n, hd-r], "
                         f"v [B, Hkv, n, hd]; got {_shapes(k1=k1, k2=k2, v=v)}")
    if Hkv == 0 or H % Hkv != 0 or n == 0:
        raise ValueError(f"{where}: H ({H}) must be a multiple of Hkv ({Hkv}), and the cache must hold the new "
                         f"token's own key (n = {n})")
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, hd)  # [B, Hkv, G, hd]
    # s_j = q[:r] . K1_j for every cached j. k1 @ q1^T ([n, r] x [r, G] per head) streams k1 at
    # ~26 GB/s; the same product written q1 @ k1^T ran at ~11 GB/s (MKL treats a transposed
    # right operand badly). 1/sqrt(r) > 0 does not change the order: we scale the kept scores only.
    s = (k1 @ qg[..., :r].transpose(-1, -2)).transpose(-1, -2)  # [B, Hkv, G, n]: reads all of k1
    kt = min(k_top, n)  # n <= k_top: every key is kept (a top-k of all n, in some order)
    vals, idx = torch.topk(s, kt, dim=-1, sorted=False)  # [B, Hkv, G, kt] each (exact top-k)
    vals = vals * (1.0 / math.sqrt(r))  # [B, Hkv, G, kt] s_j = q[:r] . K1_j / sqrt(r)
    # flat row numbers of the kept tokens in the k2 / v tables (one gather for every head)
    t2, base2 = _row_table(k2)  # [R, hd - r], [B][Hkv]
    tv, basev = _row_table(v)  # [R', hd], [B][Hkv]
    rows2 = (torch.tensor(base2)[:, :, None, None] + idx).reshape(-1)  # [B H kt]
    rowsv = rows2 if basev == base2 else (torch.tensor(basev)[:, :, None, None] + idx).reshape(-1)  # [B H kt]
    K2s = t2.index_select(0, rows2).view(B, Hkv, G, kt, hd - r)  # [B, Hkv, G, kt, hd - r]: kt rows per head
    # w_j = softmax(s)_j * softplus(q[r:] . K2_j / sqrt(hd - r))
    q2 = qg[..., r:] * (1.0 / math.sqrt(hd - r))  # [B, Hkv, G, hd - r]
    gate = F.softplus((K2s * q2[..., None, :]).sum(-1))  # [B, Hkv, G, kt] (a multiply-sum beat a batched GEMV)
    w = torch.softmax(vals, dim=-1) * gate  # [B, Hkv, G, kt]
    # out = sum_j w_j V_j: one bag of kt rows per (batch, head), parallel over the B H bags
    offsets = torch.arange(0, B * H * kt, kt)  # [B H]
    return F.embedding_bag(rowsv, tv, offsets, mode="sum", per_sample_weights=w.reshape(-1)).view(q.shape)  # [B H, hd]


# ------------------------------------------------------------------------------------------
# 4. Dense baselines, as fast as we could make them (the benchmark's denominators)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def gated_ffn_decode_cpu(x, Wg, Wu, Wd, act="gelu"):
    """Dense gated FFN, spark.gated_ffn_np(x, Wg, Wu, Wd, act): three GEMVs on the weights as
    stored ([d, f] row-major: `x @ W` streams W front to back, the fastest form measured)."""
    _check_tensors("gated_ffn_decode_cpu", x=x, Wg=Wg, Wu=Wu, Wd=Wd)
    a = F.gelu(x @ Wg, approximate="tanh") if act == "gelu" else F.relu(x @ Wg)  # [..., f]
    return (a * (x @ Wu)) @ Wd  # [..., d]


@torch.no_grad()
def attention_decode_cpu(q, k, v):
    """Dense attention of one new token over the whole cache; computes spark.attention_np with
    T = 1.   q [B, H, 1, hd] (or [B, H, hd]), k v [B, Hkv, n, hd] -> q's shape.

    Two GEMVs per head, s = K q / sqrt(hd) and out = softmax(s) V: 8.2 ms at n = 8192, 8 heads of
    256, against 11.5 ms for torch's scaled_dot_product_attention (its CPU flash kernel is built
    for many queries). We take the faster one as the baseline, so speedups are not inflated.
    """
    _check_tensors("attention_decode_cpu", q=q, k=k, v=v)
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd or H % k.shape[1] != 0 \
            or not (q.dim() == 3 or (q.dim() == 4 and q.shape[2] == 1)):
        raise ValueError(f"attention_decode_cpu: expected q [B, H, 1, hd], k and v [B, Hkv, n, hd] with H % Hkv == 0; "
                         f"got {_shapes(q=q, k=k, v=v)}")
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, hd) * (1.0 / math.sqrt(hd))  # [B, Hkv, G, hd]
    s = k @ qg.transpose(-1, -2)  # [B, Hkv, n, G]: reads all of k
    p = torch.softmax(s, dim=-2)  # [B, Hkv, n, G] over the n keys
    return (p.transpose(-1, -2) @ v).view(q.shape)  # [B, Hkv, G, hd]: reads all of v


# ------------------------------------------------------------------------------------------
# 5. Version 2: one C loop for the FFN tails and for the statistical top-k rows (Linux with a
#    C compiler)
#
#    The FFN tails. Version 1 of the FFN decoders reaches ~75-80 % of its byte limit. What it
#    loses (measured): ~10 small ops after the big GEMV, each paying 10-60 us of cold caches and a
#    thread wake-up, and a copy of the gathered K2 rows before their dot products, with nothing
#    prefetching the next row. No PyTorch op computes "gather a row, dot it, scale another row,
#    accumulate" for one neuron at a time, so here is that loop in C (gather_fused):
#
#        # after the dense part (Spark: p = x[:r] K1;  ReLU: g = x Wg), one call does
#        survivors j (Spark: p_j > theta;  ReLU: g_j > 0)
#        split the survivors between the threads; each thread t, for its survivors j:
#            prefetch the rows of the survivor PF places ahead      # hides the row-start latency
#            u  = dot(W1[j], x1)                                     # Spark: K2t, x[r:];  ReLU: Wut, x
#            a  = act(s_j) * u                                       # Spark: gelu(p_j - theta);  ReLU: g_j
#            acc_t += a * W2[j]                                      # Spark: V;  ReLU: Wd
#        y = sum over threads of acc_t                               # acc [threads, d]; y is acc[0]
#
#    Prefetch: the rows of the survivor PF = 4 places ahead, into L2 (locality hint 2). Measured on
#    the Spark FFN tail (1108 survivors, 15.9 MB of rows, 2 threads): no prefetch 1.40 ms; PF 2-16
#    into L2 0.99-1.05 ms (~16 GB/s); the non-temporal hint (0) 1.36-1.46 ms; into L1 (3) 1.44-1.61.
#
#    The statistical top-k rows (Spark Transformer, arXiv 2506.06644, statistical top-k;
#    notes/papers.md, "Statistical top-k (Spark)"), per row z of length D (population std):
#        theta = mean(z) + std(z) * Q(1 - k/D)
#        out   = z - theta where z > theta, else fill    (soft=True; soft=False keeps z)
#    Version 1 is topk.statistical_topk (the training path): a mean, a norm, a subtract and a
#    clamp, each a pass over R*D values. At [2048, 16384] float32 x is 128 MB, far bigger than the
#    caches, so each pass is a trip to DRAM (56-61 ms allocating, in the benchmark). The least any
#    version must move is one read of x and one write of out; version 2 (stat_topk_rows) reads
#    each 64 KB row from DRAM once, sums it, and writes the result on a second pass that finds
#    the row still in L2:
#        for each row z (rows split between the threads):
#            s, ss = sum(c), sum(c^2)  with c = z - z[0]     # pass 1: DRAM
#            theta = z[0] + s/D + sqrt(ss/D - (s/D)^2) * Q    # float64
#            out = max(z - theta, 0)                          # pass 2: L2, one write
#    statistical_topk_cpu (section 6) takes it for float32, soft, fill 0 without autograd.
#
#    One threshold function, row_theta, serves both the FFN tail and the top-k rows: theta as
#    topk.statistical_threshold_np defines it (float64, centred on the row's first entry,
#    population std), taken in ONE pass (sums of c and c^2, c = z - z[0], var = E[c^2] - E[c]^2)
#    rather than the reference's two. Why: for the top-k rows a second statistics pass is a third
#    pass over the row, measured ~20 % slower in place; in float64 the one-pass form loses about
#    log10((mean - z[0])^2 / var) of its 16 digits, and z[0] is a typical entry of its row: theta
#    agreed with the reference to 1e-16..1e-15 relative on ordinary rows of 16384, 2e-12 with a
#    first entry 10^4 std from the mean (measured). A row holding NaN or +-inf gets theta = NaN
#    and comes out all NaN (the FFN tails return -1 and the caller writes the NaN row).
#
#    Top-k output: out = max(c - tc, 0) in float32, c = z - z[0], with tc = theta - z[0] rounded
#    *down* to a float32: there is no float32 between tc and theta - z[0], so c > tc decides as
#    the reference's float64 comparison does for that c. c itself is exact in float32 when z and
#    z[0] are within a factor 2 of each other, else rounded once, so an entry within one rounding
#    of theta may fall on the other side, with a value of that size. In place (x == y) is
#    allowed: each entry is read before it is written.
#
#    It runs on torch's own OpenMP threads: the torch wheel ships libgomp.so.1 and the loader
#    reuses an already loaded library of the same soname, so our `#pragma omp parallel` starts no
#    second thread pool (a pthread of our own fought torch's spinning workers for the 2 cores and
#    was slower than one thread).
# ------------------------------------------------------------------------------------------

_FUSED_C = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>
#define PF 4
static double row_theta(const float *z, long D, double q) { /* one row z [D], q = Q(1 - k/D); ONE pass: why above */
    double z0 = z[0]; /* we sum c = z - z0, the row centred on its first entry */
    double s = 0.0, ss = 0.0; /* sum of c, sum of c^2 */
#pragma omp simd reduction(+ : s, ss)
    for (long i = 0; i < D; i++) {
        double c = (double)z[i] - z0;
        s += c;
        ss += c * c;
    }
    double mean_c = s / D; /* E[c] = mean(z) - z0 */
    double var = ss / D - mean_c * mean_c; /* population variance E[c^2] - E[c]^2 (< 0 only by rounding) */
    /* theta = mean + std * Q(1 - k/D) */
    double theta = z0 + mean_c + sqrt(var > 0.0 ? var : 0.0) * q;
    return isfinite(theta) ? theta : NAN; /* a row holding NaN or +-inf: NaN */
}
static inline void prefetch_row(const float *row, long n) { /* one hint per 64-byte line, into L2 */
    for (long b = 0; b < n * (long)sizeof(float); b += 64) __builtin_prefetch((const char *)row + b, 0, 2);
}
static inline float gelu_tanh(float z) { /* gelu(z) = z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) */
    return 0.5f * z * (1.0f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
}
static void gather_fused(const int64_t *idx, const float *s, long m, const float *x1, long w1,
                         const float *W1, const float *W2, long d, float *acc, int acc_rows, int gelu) {
    int nt = omp_get_max_threads(); /* torch.get_num_threads(): the same OpenMP runtime */
    nt = nt < acc_rows ? nt : acc_rows;
    nt = nt < m ? nt : (m > 0 ? (int)m : 1); /* m = 0: one thread writes y = acc[0] = 0 */
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long lo = m * t / T, hi = m * (t + 1) / T; /* this thread's survivors */
        float *mine = acc + (long)t * d;
        for (long i = 0; i < d; i++) mine[i] = 0.0f;
        for (long j = lo; j < hi; j++) {
            if (j + PF < hi) {
                prefetch_row(W1 + idx[j + PF] * w1, w1);
                prefetch_row(W2 + idx[j + PF] * d, d);
            }
            const float *u_row = W1 + idx[j] * w1, *row = W2 + idx[j] * d;
            float u = 0.0f, z = s[j];
#pragma omp simd reduction(+ : u)
            for (long i = 0; i < w1; i++) u += u_row[i] * x1[i];
            float a = (gelu ? gelu_tanh(z) : z) * u; /* Spark: gelu(p_j - theta) u;  ReLU: g_j u */
#pragma omp simd
            for (long i = 0; i < d; i++) mine[i] += a * row[i]; /* acc_t += a W2[j] */
        }
#pragma omp barrier
#pragma omp for
        for (long i = 0; i < d; i++) /* y = acc[0] += the other threads' partial sums */
            for (int k = 1; k < T; k++) acc[i] += acc[(long)k * d + i];
    }
}
long spark_ffn_tail(const float *p, long f, double q, const float *x2, long w2, const float *K2t,
                    const float *V, long d, int64_t *idx, float *z, float *acc, int acc_rows) {
    double theta = row_theta(p, f, q);
    long m = 0;
    if (isnan(theta)) return -1; /* NaN or +-inf in x[:r] (or K1) */
    for (long i = 0; i < w2; i++) if (!isfinite(x2[i])) return -1; /* in x[r:] */
    for (long i = 0; i < f; i++)
        if ((double)p[i] > theta) { idx[m] = i; z[m] = (float)((double)p[i] - theta); m++; }
    gather_fused(idx, z, m, x2, w2, K2t, V, d, acc, acc_rows, 1);
    return m;
}
long relu_ffn_tail(const float *g, long f, const float *x, long d, const float *Wut, const float *Wd,
                   int64_t *idx, float *gs, float *acc, int acc_rows) {
    long m = 0;
    for (long i = 0; i < d; i++) if (!isfinite(x[i])) return -1; /* NaN or +-inf in x */
    for (long i = 0; i < f; i++) {
        if (g[i] != g[i]) return -1; /* NaN in Wg */
        if (g[i] > 0.0f) { idx[m] = i; gs[m] = g[i]; m++; }
    }
    gather_fused(idx, gs, m, x, d, Wut, Wd, d, acc, acc_rows, 0);
    return m;
}
void stat_topk_rows(const float *x, float *y, long R, long D, double q) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < R; i++) {
        const float *xr = x + i * D;
        float *yr = y + i * D, x0 = xr[0];
        double t = row_theta(xr, D, q) - x0;
        float tc = (float)t;
        if ((double)tc > t) tc = nextafterf(tc, -INFINITY);
#pragma omp simd
        for (long j = 0; j < D; j++) {
            float v = (xr[j] - x0) - tc;
            yr[j] = v < 0.0f ? 0.0f : v; /* NaN stays NaN */
        }
    }
}
"""

_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]

# Loading the library safely. A shared library runs with our rights the moment it is loaded,
# so we load only a file that nobody else could have written: the cache directory and the .so
# must be ours and writable by us alone, and so must every directory above the cache up to
# $HOME (or up to / for a $SPARK_CACHE outside HOME), where root's directories and sticky ones
# (/tmp) are fine as ancestors. Otherwise we build in a fresh private temporary directory
# (mkdtemp: mode 0700), load from there and delete it. -march=native compiles for this CPU's
# features, so the file name hashes the CPU's flags along with the source and the compiler.


def _cpu_id():
    """The CPU's model name and feature flags (what -march=native compiles for), from /proc/cpuinfo."""
    if not os.path.exists("/proc/cpuinfo"):  # not Linux
        return [platform.processor()]
    with open("/proc/cpuinfo") as fh:
        lines = fh.read().split("\n\n")[0].splitlines()  # the first processor
    return [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]


def _cache_key(cc):
    """16 hex digits naming the library: source, compiler and flags, the CPU's features."""
    return hashlib.sha256("\n".join([_FUSED_C, cc, *_CFLAGS, platform.machine(), *_cpu_id()]).encode()).hexdigest()[:16]


def _not_private(path):
    """None if path (the cache directory, or the library in it) is ours alone, else why: we, and
    only we, must be able to write it and every directory above it up to $HOME (or up to / for a
    path outside HOME), where a directory above may also be root's, and writable by all if sticky."""
    path, home = os.path.realpath(path), os.path.realpath(os.path.expanduser("~"))
    top = home if os.path.commonpath([path, home]) == home else "/"  # the last directory we check
    p = path
    while True:
        st = os.stat(p)
        owner_ok = st.st_uid == os.getuid() or (p != path and st.st_uid == 0)  # ours (root's: above path only)
        others_write = st.st_mode & 0o022  # the group- and world-write bits (stat.S_IWGRP | stat.S_IWOTH)
        sticky_above = p != path and st.st_mode & 0o1000  # the sticky bit (stat.S_ISVTX), as /tmp: allowed above
        if not owner_ok or (others_write and not sticky_above):
            return f"{p} (mode {st.st_mode & 0o7777:o}, owner uid {st.st_uid}) is not ours alone"
        if p in (top, "/"):
            return None
        p = os.path.dirname(p)


def _compile(cc, path):
    """Compile _FUSED_C (fed on stdin) into path, via a temporary name beside it. -> None, or the compiler's error."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        res = subprocess.run([cc, *_CFLAGS, "-x", "c", "-", "-o", tmp, "-lm"], input=_FUSED_C, capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:  # all of its message: the first error is the one that matters
            return (res.stderr + res.stdout).strip() or f"exit status {res.returncode}"
        os.replace(tmp, path)  # atomic: a concurrent process sees no file or the whole file
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _build_and_load(cc, cache):
    """Build (once per cache key) and load the fused library. -> (ctypes library or None, status)."""
    v1 = "version 1 (eager PyTorch) everywhere"
    if platform.system() != "Linux":  # (the safety checks below use POSIX owners and modes)
        return None, f"{v1}: the C loop is built on Linux only, this is {platform.system()}"
    if shutil.which(cc) is None:
        return None, f"{v1}: no C compiler {cc!r} on PATH (set CC)"
    path = os.path.join(cache, f"kernels_cpu_fused_{_cache_key(cc)}.so")
    try:
        os.makedirs(cache, 0o700, exist_ok=True)
        why = _not_private(path if os.path.exists(path) else cache)
    except OSError as e:
        why = f"{cache} cannot be used: {e}"
    private = tempfile.mkdtemp(prefix="spark-fused-") if why else None  # mode 0700
    try:
        path = os.path.join(private, "fused.so") if private else path
        err = _compile(cc, path) if private or not os.path.exists(path) else None
        if err:
            warnings.warn(f"kernels_cpu: the C compiler {cc!r} could not build the fused loop, so version 1 "
                          f"(eager PyTorch) runs instead. The compiler said:\n{err}", RuntimeWarning, stacklevel=2)
            return None, f"{v1}: {cc} failed: {next((s for s in err.splitlines() if 'error' in s), err.splitlines()[0])}"
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"{v1}: cannot load {path}: {e}"
    finally:
        if private:
            shutil.rmtree(private, ignore_errors=True)  # the loaded library stays mapped
    P, L, Dbl, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int  # pointers go as data_ptr() ints
    for fn, args, res in (("spark_ffn_tail", [P, L, Dbl, P, L, P, P, L, P, P, P, I], L),
                          ("relu_ffn_tail", [P, L, P, L, P, P, P, P, P, I], L), ("stat_topk_rows", [P, P, L, L, Dbl], None)):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, res
    return lib, f"version 2 (fused C loop) where it applies: {f'built privately, as {why}' if private else path}"


_LIB = {}  # {"lib", "status"}: the first _lib() call with FUSED on fills it


def _lib():
    """The fused library if FUSED is on and it could be built, else None."""
    if FUSED and not _LIB:
        cache = os.environ.get("SPARK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spark")
        _LIB["lib"], _LIB["status"] = _build_and_load(os.environ.get("CC", "cc"), cache)
    return _LIB["lib"] if FUSED else None


def fused_status():
    """Which version runs where version 2 could apply, and why (where its library is, or why not)."""
    if not FUSED:
        return "version 1 (eager PyTorch) everywhere: kernels_cpu.FUSED is off (SPARK_NO_FUSED sets it off at import)"
    _lib()
    return _LIB["status"]


# ------------------------------------------------------------------------------------------
# 6. The public kernels: argument checks, then the version the switch and the call allow.
#
#    Non-finite input (as the references): a token whose x holds NaN or +-inf gets an all-NaN
#    output row in spark_ffn_np and relu_l1_ffn_np (its theta, or the u = x Wu of every neuron,
#    is NaN or +-inf, and 0 * inf = NaN spreads through y). We give it that row without computing
#    it: no exception, no warning, the other tokens untouched. NaN or inf in the *weights* is
#    another matter: a sparse kernel never reads the rows it skips, so it cannot see them.
# ------------------------------------------------------------------------------------------


def _per_token(fn, x, *weights):
    """y = fn(X [M, d], *weights) for the tokens of x [..., d] (version 1); non-finite tokens -> NaN
    rows. The check is NumPy's (~6 us): a torch reduction and mask cost ~50 us here, 1 % of a call."""
    X = x.reshape(-1, x.shape[-1])  # [M, d] (M = 0 is fine: nothing survives, y is empty)
    bad = ~np.isfinite(X.detach().numpy()).all(axis=-1)  # [M]
    if not bad.any():
        return fn(X, *weights).reshape(x.shape)
    bad = torch.from_numpy(bad)[:, None]  # [M, 1]
    return fn(X.masked_fill(bad, 0.0), *weights).masked_fill_(bad, math.nan).reshape(x.shape)


def _v2_applies(x, *weights):
    """Version 2 runs for one float32 token with packed weights (and FUSED on, the library built).
    The C code indexes each weight as a packed row-major array from data_ptr(), so a strided view
    (K2.t() passed as K2t, an expanded tensor) must never reach it: it takes version 1."""
    fits = x.numel() == x.shape[-1] and x.dtype == torch.float32 and all(w.is_contiguous() for w in weights)
    return fits and _lib() is not None


def _tail(name, X, f, *args):
    """Call the C tail `name`(*args, idx, s, acc, threads) after the dense GEMV: -> y [1, d]
    (all NaN when it returns -1: x holds NaN or +-inf, or theta or a gate is NaN). The caller
    keeps every tensor behind args alive."""
    idx = torch.empty(f, dtype=torch.int64)  # [f]: the m survivors' neuron numbers (first m entries)
    s = X.new_empty(f)  # [f]: their activations s_j (first m entries)
    acc = X.new_empty(torch.get_num_threads(), X.shape[1])  # [threads, d]: one partial y per thread
    m = getattr(_lib(), name)(*args, idx.data_ptr(), s.data_ptr(), acc.data_ptr(), acc.shape[0])
    return acc[:1].fill_(math.nan) if m < 0 else acc[:1]  # y [1, d]: the C loop adds the other rows into row 0


def _spark_ffn_v2(X, K1, K2t, V, k, r):
    """Version 2 of spark_ffn_decode_cpu: X [1, d] float32 -> [1, d]; the GEMV in torch, the rest in C."""
    f, d = V.shape
    P, x2 = X[:, :r] @ K1, X[0, r:].contiguous()  # [1, f] the dense predictor, [d-r]
    return _tail("spark_ffn_tail", X, f, P.data_ptr(), f, _q(k, f), x2.data_ptr(), d - r, K2t.data_ptr(), V.data_ptr(), d)


def _relu_ffn_v2(X, Wg, Wut, Wd):
    """Version 2 of relu_ffn_decode_cpu: X [1, d] float32 -> [1, d]; the gate GEMV in torch, the rest in C."""
    f, d = Wut.shape
    G, X = X @ Wg, X.contiguous()  # [1, f] the dense gate, [1, d]
    return _tail("relu_ffn_tail", X, f, G.data_ptr(), f, X.data_ptr(), d, Wut.data_ptr(), Wd.data_ptr())


def statistical_topk_cpu(x, k, fill=0.0, soft=True, *, out=None):
    """statistical_topk_np(x, k, fill, soft) for a CPU tensor x [..., D] -> [..., D], x's dtype.

    Version 2 (the C row loop) for float32 with soft=True, fill=0 when autograd is not recording
    x; version 1 (topk.statistical_topk: any float dtype, differentiable) otherwise. Same edge
    cases as topk: k == D returns x itself; a constant row has no survivor; a row holding NaN or
    +-inf comes out all NaN. out (optional: contiguous, x's shape and dtype) receives the result:
    reusing one buffer saves a fresh 128 MB tensor's page faults (~35 ms at [2048, 16384]); out=x
    works in place (x is overwritten), which saves the write-allocate reads of fresh memory.
    """
    grad = isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad
    if out is not None and isinstance(x, torch.Tensor):  # (x not a tensor: version 1 says so)
        if grad:
            raise ValueError("statistical_topk_cpu: out is not supported when x requires grad")
        like_x = isinstance(out, torch.Tensor) and (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device)
        if not like_x or not out.is_contiguous():
            raise ValueError(f"statistical_topk_cpu: out must be a contiguous tensor of x's shape, dtype and device, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
    plain = soft is True and isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0
    if not (plain and not grad and isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() and _lib() is not None):
        y = statistical_topk(x, k, fill, soft)  # version 1 (it checks x, k, fill and soft as topk does)
        return y if out is None else out.copy_(y)
    D = x.shape[-1]
    check_k(k, D)
    if k == D:
        return x if out is None else out.copy_(x)  # as topk: nothing is thresholded
    rows = x.reshape(-1, D).contiguous()  # [R, D] (no copy for a contiguous x, so out=x stays in place)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype)
    _lib().stat_topk_rows(rows.data_ptr(), y.data_ptr(), rows.shape[0], D, _q(k, D))  # R = 0: no row is touched
    return y


@torch.no_grad()
def spark_ffn_decode_cpu(x, K1, K2t, V, k, r):
    """Spark FFN for decoding; computes spark.spark_ffn_np(x, K1, K2, V, k, r).

    x [d] or [M, d] (any leading shape), K1 [r, f], K2t [f, d-r], V [f, d] from
    prepare_spark_ffn_cpu (K2t is K2 transposed) -> y, x's shape. k: target survivors per token
    (statistical top-k), r: predictor slice. k == f thresholds nothing (as topk: every neuron,
    a = gelu(p) * u), in version 1. Several tokens gather the union of their survivors (version 1).
    """
    _check_tensors("spark_ffn_decode_cpu", x=x, K1=K1, K2t=K2t, V=V)
    if x.dim() == 0 or K1.dim() != 2 or V.dim() != 2:
        raise ValueError(f"spark_ffn_decode_cpu: expected x [..., d], K1 [r, f], V [f, d]; got {_shapes(x=x, K1=K1, V=V)}")
    d, f = x.shape[-1], V.shape[0]
    _check_int("spark_ffn_decode_cpu", "r", r, 1, d - 1)
    if K1.shape != (r, f) or K2t.shape != (f, d - r) or V.shape != (f, d):
        raise ValueError(f"spark_ffn_decode_cpu: with x [..., d={d}], r={r}, f={f} expected K1 [r, f] = {(r, f)}, "
                         f"K2t [f, d-r] = {(f, d - r)} (K2 transposed: use prepare_spark_ffn_cpu), V [f, d] = {(f, d)}; "
                         f"got {_shapes(K1=K1, K2t=K2t, V=V)}")
    check_k(k, f)
    if k < f and _v2_applies(x, K1, K2t, V):  # (k == f: version 1, as topk returns p unchanged)
        return _spark_ffn_v2(x.reshape(1, -1), K1, K2t, V, k, r).reshape(x.shape)
    return _per_token(_spark_ffn_v1, x, K1, K2t, V, k, r)


@torch.no_grad()
def relu_ffn_decode_cpu(x, Wg, Wut, Wd):
    """ReLU-gated FFN for decoding; computes the y of spark.relu_l1_ffn_np(x, Wg, Wu, Wd).

    x [d] or [M, d] (any leading shape), Wg [d, f], Wut [f, d] (Wu transposed), Wd [f, d] from
    prepare_relu_ffn_cpu -> y, x's shape. Several tokens gather the union of their nonzero
    neurons (a token's zero neurons in it contribute relu(g) = 0).
    """
    _check_tensors("relu_ffn_decode_cpu", x=x, Wg=Wg, Wut=Wut, Wd=Wd)
    d = x.shape[-1] if x.dim() else -1
    if Wg.dim() != 2 or Wg.shape[0] != d or Wut.shape != (Wg.shape[1], d) or Wd.shape != (Wg.shape[1], d):
        raise ValueError(f"relu_ffn_decode_cpu: with x [..., d={d}] expected Wg [d, f], Wut [f, d] (Wu transposed: "
                         f"use prepare_relu_ffn_cpu), Wd [f, d]; got {_shapes(Wg=Wg, Wut=Wut, Wd=Wd)}")
    if _v2_applies(x, Wg, Wut, Wd):
        return _relu_ffn_v2(x.reshape(1, -1), Wg, Wut, Wd).reshape(x.shape)
    return _per_token(_relu_ffn_v1, x, Wg, Wut, Wd)


# ------------------------------------------------------------------------------------------
# 7. Decoding a spark.GPT with these kernels: generate_cpu
#
#    The loop is spark.decode_loop, the one GPT.generate runs (same sampling, same random
#    numbers, same window rebuild past block_size); we hand it our prefill and our step:
#    - the weights are re-laid once (prepare_*), and each layer's FFN runs its decode kernel:
#      SparkFFN -> spark_ffn_decode_cpu, ReluL1FFN -> relu_ffn_decode_cpu, GatedFFN -> the
#      dense GEMVs; TopkFFN (exact / statistical top-k on the gate) runs its own module;
#    - the KV cache is preallocated for block_size tokens and written in place (GPT.generate
#      concatenates, which copies the whole cache every token), and for Spark attention it is
#      split at r (k1, k2, v), so spark_attention_decode_cpu reads k1 contiguously;
#    - a token is a [B, d] row through the layers, no [B, 1, d] bookkeeping.
#    The prefill (the prompt, and the rebuild when the window slides) runs the model's own
#    forward (GPT._run with caches) and copies its caches into ours.
# ------------------------------------------------------------------------------------------


def _ffn_kernel(ffn):
    """The decode kernel of one layer's FFN module, its weights re-laid once: h [B, d] -> [B, d]."""
    if isinstance(ffn, spark.SparkFFN):
        w, k, r = prepare_spark_ffn_cpu(ffn.K1, ffn.K2, ffn.V), ffn.k, ffn.r
        return lambda h: spark_ffn_decode_cpu(h, *w, k, r)
    if isinstance(ffn, spark.ReluL1FFN):
        w = prepare_relu_ffn_cpu(ffn.Wg, ffn.Wu, ffn.Wd)
        return lambda h: relu_ffn_decode_cpu(h, *w)
    if isinstance(ffn, spark.GatedFFN):
        return lambda h: gated_ffn_decode_cpu(h, ffn.Wg, ffn.Wu, ffn.Wd, ffn.act)  # (no_grad: no detach needed)
    return ffn  # TopkFFN: its own (dense-compute) forward


def _key_parts(layer, k):
    """What a layer caches of keys k [..., hd]: k itself, or (Spark attention) its two halves at r."""
    r = layer["blk"].attn.r if layer["spark"] else None
    return {"k1": k[..., :r], "k2": k[..., r:]} if layer["spark"] else {"k": k}


def _prefill(model, layers, idx):
    """Run the window idx [B, T] through the model's own forward; fill our caches. -> logits [B, V]"""
    caches = [{} for _ in layers]
    logits = model._run(idx, caches)[:, -1]  # [B, V]; fills caches[i]["k"], ["v"] [B, Hkv, T, hd]
    for layer, cache in zip(layers, caches):
        for name, t in {**_key_parts(layer, cache["k"]), "v": cache["v"]}.items():  # t [B, Hkv, T, w]
            layer[name] = t.new_empty(*t.shape[:2], model.config.block_size, t.shape[3])  # [B, Hkv, block_size, w]
            layer[name][:, :, :idx.shape[1]] = t
    return logits


def _decode_step(model, layers, tok, n):
    """One new token tok [B] at position n (n tokens cached) through every layer. -> logits [B, V]"""
    B = tok.shape[0]
    x = model.wte(tok) + model.wpe.weight[n]  # [B, d]
    for layer in layers:
        blk, att = layer["blk"], layer["blk"].attn
        h = blk.ln_1(x)  # [B, d]
        q = att.q_proj(h).view(B, att.H, att.hd)  # [B, H, hd]
        new = {**_key_parts(layer, att.k_proj(h).view(B, att.Hkv, att.hd)), "v": att.v_proj(h).view(B, att.Hkv, att.hd)}
        for name, t in new.items():
            layer[name][:, :, n] = t  # written in place into the preallocated cache
        c = {name: layer[name][:, :, :n + 1] for name in new}  # [B, Hkv, n + 1, w] views, no copy
        o = (spark_attention_decode_cpu(q, c["k1"], c["k2"], c["v"], att.k_top, att.r) if layer["spark"]
             else attention_decode_cpu(q, c["k"], c["v"]))  # [B, H, hd]
        x = x + att.o_proj(o.reshape(B, -1))  # [B, d]
        x = x + layer["ffn"](blk.ln_2(x))  # [B, d]
    return model.ln_f(x) @ model.wte.weight.T  # [B, V]


@torch.no_grad()
def generate_cpu(model, idx, max_new_tokens, temperature=1.0, top_k=None, *, return_logits=False):
    """spark.GPT.generate with the CPU decode kernels: idx [B, T] -> [B, T + max_new_tokens].

    Same arguments and the same loop (spark.decode_loop) as GPT.generate, so with the same torch
    seed it returns the same tokens (up to float rounding deciding a near-tie, which the kernels'
    order of additions can do; greedy decoding is the robust comparison). temperature 0 = greedy.
    return_logits: also the logits each new token was drawn from, [B, max_new_tokens, V].
    """
    spark.check_decoder_args("generate_cpu", model, idx, max_new_tokens, temperature, top_k)
    _check_tensors("generate_cpu", model=model.wte.weight)
    # per layer: its block, its FFN kernel, whether its attention is Spark's (and, once filled, its caches)
    layers = [{"blk": b, "ffn": _ffn_kernel(b.ffn), "spark": isinstance(b.attn, spark.SparkAttention)} for b in model.blocks]
    return spark.decode_loop(lambda window: _prefill(model, layers, window),
                             lambda tok, n: _decode_step(model, layers, tok[:, 0], n),
                             idx, max_new_tokens, temperature, top_k, model.config.block_size, return_logits)


# ------------------------------------------------------------------------------------------
# 8. The benchmark: python kernels_cpu.py [--json PATH] [--reps N | --quick]
#
#    Every version is first checked against its NumPy reference on the benchmark's own input (a
#    wrong kernel is not timed: the run fails). Then, per kernel, the baseline and the versions
#    run in the same process on the same inputs, interleaved rep by rep (a burst of load from
#    another process hits all of them), each rep timed alone after reading a 64 MB buffer that
#    evicts the caches: a decoding model streams every other layer's weights between two visits
#    of a layer, so nothing of this layer is in cache when it comes back. We rotate through 16
#    inputs, so the gathered rows change from rep to rep. Reported: median ms, speedup, GB/s
#    (bytes the kernel must move / time), and the limit, a bound: t_baseline / t_floor, where
#    t_floor is the best time of simpler work over the same memory. Decoders: the version's bytes
#    read at the speed of the dense baseline's *best* rep, i.e. the byte ratio (dense bytes /
#    sparse bytes: 3.52x for the Spark FFN) times the baseline's median/best (a few % when the
#    machine is quiet). Top-k, a selection rather than a stream: the best rep of a simpler pass
#    doing part of any version's work (see bench_statistical_topk). "of limit" = speedup / limit
#    = t_floor / t. A median that beats its floor (of limit > 100 %) proves that floor is not a
#    bound: the table then prints NOT A BOUND in place of the limit, never a normal row.
# ------------------------------------------------------------------------------------------

def _time_interleaved(fns, inputs, reps, warmup=3, before=lambda: None):
    """fns {name: fn(input)}: each rep runs every fn once, in turn, on the rep's input, after
    before() (untimed) and a cache flush. -> {name: [seconds of each timed rep]}"""
    # 64 MB, twice the 32 MB L3 of the AMD EPYC VM: reading it evicts every kernel's data. Reads
    # only (.sum()): no dirty lines are left to write back during the next timing.
    flush = torch.ones(16 << 20)
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            before()
            flush.sum()
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times[name].append(time.perf_counter() - t0)
    return {name: t[warmup:] for name, t in times.items()}  # the warm-up reps dropped


def _check(name, got, ref, atol=1e-4, rtol=1e-3):
    """Fail unless got matches its NumPy reference (the tests' float32 tolerance): not timed then."""
    err = np.abs(got.double().numpy() - ref)
    if not (err <= atol + rtol * np.abs(ref)).all():
        raise AssertionError(f"{name}: differs from its NumPy reference by up to {np.nanmax(err):.3g} "
                             f"(allowed {atol} + {rtol} |ref|); a wrong kernel is not timed")


def _record(name, base, ours, floor, **extra):
    """A table row from the seconds of each rep of the baseline and of ours, and the floor (s).
    not_a_bound: our median beat the floor, so that floor is no bound (section 8's header)."""
    t_base, t = np.median(base), np.median(ours)
    return {"name": name, "baseline_ms": t_base * 1e3, "ms": t * 1e3, "speedup": t_base / t, "limit": floor and t_base / floor,
            "fraction_of_limit": floor and floor / t, "not_a_bound": bool(floor and floor > t), **extra}


def _decode_record(name, base, ours, bytes_base, bytes_ours, **extra):
    """A decoder's row: its floor is its bytes read at the speed of the baseline's best rep."""
    return _record(name, base, ours, min(base) * bytes_ours / bytes_base, byte_ratio=bytes_base / bytes_ours,
                   baseline_GBps=bytes_base / np.median(base) / 1e9, GBps=bytes_ours / np.median(ours) / 1e9, **extra)


def _randn(*shape, std=1.0, gen=None):
    return torch.randn(*shape, generator=gen) * std


# In the tables, "v1" rows time the version-1 function itself (_spark_ffn_v1, ... behind the
# same non-finite-token guard; the public function adds its argument checks, a few us) and "v2"
# rows the public function, which takes version 2 there.


def bench_spark_ffn(d=2304, f_gated=9216, r=1024, density=0.08, M=1, reps=40, gen=None):
    """Spark FFN (f = 1.5 f_gated) vs the dense GeGLU of the same parameter count."""
    f = round(1.5 * f_gated)
    k = max(1, round(density * f))
    # the dense weights get the same 2 MB pages as the sparse ones (_relayout): a fair baseline
    Wg, Wu, Wd = (_relayout(_randn(a, b, std=a ** -0.5, gen=gen)) for a, b in ((d, f_gated), (d, f_gated), (f_gated, d)))
    K1, K2t, V = prepare_spark_ffn_cpu(_randn(r, f, std=r ** -0.5, gen=gen), _randn(d - r, f, std=(d - r) ** -0.5, gen=gen),
                                       _randn(f, d, std=f ** -0.5, gen=gen))
    xs = [_randn(M, d, gen=gen) for _ in range(16)]
    fns = {"dense": lambda x: gated_ffn_decode_cpu(x, Wg, Wu, Wd, "gelu"),
           "v1": lambda x: _per_token(_spark_ffn_v1, x, K1, K2t, V, k, r)}
    if M == 1 and _lib() is not None:
        fns["v2"] = lambda x: spark_ffn_decode_cpu(x, K1, K2t, V, k, r)
    if M > 1:
        # For a few tokens MKL's [M, d] x [d, f] product runs at ~9 GB/s, while the same product
        # on transposed weights, W^T [f, d] x x^T, streams at ~13 GB/s: the dense side gets that
        # layout too, and we keep whichever dense form is faster in this run.
        WgT, WuT, WdT = _relayout(Wg.t()), _relayout(Wu.t()), _relayout(Wd.t())
        fns["dense_t"] = lambda x: (WdT @ (F.gelu(WgT @ x.t(), approximate="tanh") * (WuT @ x.t()))).t()
    x0 = xs[0].numpy()  # the references in float32 NumPy (theta in float64): no copy of the weights
    for name, fn in fns.items():
        ref = (spark.spark_ffn_np(x0, K1.numpy(), K2t.numpy().T, V.numpy(), k, r) if name[0] == "v"
               else spark.gated_ffn_np(x0, Wg.numpy(), Wu.numpy(), Wd.numpy(), "gelu"))
        _check(f"spark_ffn_decode {name}", fn(xs[0]), ref)
    # neurons actually gathered (the statistical top-k keeps *about* k; with M > 1 their union)
    m = np.mean([(P > statistical_threshold_np(P, k)).any(axis=0).sum() for P in ((x[:, :r] @ K1).numpy() for x in xs)])
    ts = _time_interleaved(fns, xs, reps)
    dense = min((ts[n] for n in ("dense", "dense_t") if n in ts), key=np.median)  # the faster dense form
    return [_decode_record(f"spark_ffn_decode/d{d}_f{f}_r{r}_k{k}/M{M}/{v}", dense, ts[v], 3 * d * f_gated * 4,
                           (r * f + m * (d - r) + m * d) * 4, baseline=f"dense GeGLU, gated f {f_gated} (equal params)",
                           density=m / f, k=k, gathered=m, M=M, version=v) for v in ("v1", "v2") if v in ts]


def bench_relu_ffn(d=2048, f=5632, density=0.01, reps=40, gen=None):
    """ReLU-gated FFN at a given fraction of nonzero activations vs the same FFN computed densely.

    To get the density of a trained L1 model from random weights we put a constant 1 in input
    coordinate 0 and -Q(1 - density) in row 0 of Wg: a gate bias in disguise, so each gate
    pre-activation is ~N(-Q(1-density), 1) and a fraction `density` of them is positive.
    """
    Wg, Wu = _randn(d, f, std=(d - 1) ** -0.5, gen=gen), _randn(d, f, std=(d - 1) ** -0.5, gen=gen)
    Wg[0] = -normal_icdf(1.0 - density)
    Wd = _randn(f, d, std=f ** -0.5, gen=gen)
    Wg_p, Wut, Wd_p = prepare_relu_ffn_cpu(Wg, Wu, Wd)
    Wg, Wu, Wd = _relayout(Wg), _relayout(Wu), _relayout(Wd)  # dense side: same 2 MB pages
    xs = [torch.cat([torch.ones(1, 1), _randn(1, d - 1, gen=gen)], dim=1) for _ in range(16)]  # [1, d]
    fns = {"dense": lambda x: gated_ffn_decode_cpu(x, Wg, Wu, Wd, "relu"),
           "v1": lambda x: _per_token(_relu_ffn_v1, x, Wg_p, Wut, Wd_p)}
    if _lib() is not None:
        fns["v2"] = lambda x: relu_ffn_decode_cpu(x, Wg_p, Wut, Wd_p)
    x0, w = xs[0].numpy(), (Wg.numpy(), Wu.numpy(), Wd.numpy())
    for name, fn in fns.items():
        ref = spark.relu_l1_ffn_np(x0, *w)[0] if name[0] == "v" else spark.gated_ffn_np(x0, *w, "relu")
        _check(f"relu_ffn_decode {name}", fn(xs[0]), ref)
    m = np.mean([int(((x @ Wg) > 0).sum()) for x in xs])
    ts = _time_interleaved(fns, xs, reps)
    return [_decode_record(f"relu_ffn_decode/d{d}_f{f}/nonzero{density:.2%}/M1/{v}", ts["dense"], ts[v], 3 * d * f * 4,
                           (d * f + 2 * m * d) * 4, baseline="dense ReLU-gated FFN", density=m / f, gathered=m, version=v)
            for v in ("v1", "v2") if v in ts]


def bench_spark_attention(n=8192, H=8, hd=256, k_top=256, r=128, reps=40, gen=None):
    """Spark attention decode vs dense attention over the same cache, one new token."""
    k, v = _relayout(_randn(1, H, n, hd, gen=gen)), _relayout(_randn(1, H, n, hd, gen=gen))
    k1, k2, vv = prepare_spark_kv_cpu(k, v, r)
    qs = [_randn(1, H, 1, hd, gen=gen) for _ in range(16)]
    fns = {"dense": lambda q: attention_decode_cpu(q, k, v),
           "sparse": lambda q: spark_attention_decode_cpu(q, k1, k2, vv, k_top, r)}
    q0, k0, v0 = qs[0].numpy(), k.numpy(), v.numpy()
    _check("attention_decode", fns["dense"](qs[0]), spark.attention_np(q0, k0, v0))
    _check("spark_attention_decode", fns["sparse"](qs[0]), spark.spark_attention_np(q0, k0, v0, k_top, r))
    ts, kt = _time_interleaved(fns, qs, reps), min(k_top, n)
    return _decode_record(f"spark_attention_decode/n{n}_H{H}_hd{hd}_k{k_top}_r{r}", ts["dense"], ts["sparse"],
                          2 * H * n * hd * 4, H * (n * r + kt * (hd - r) + kt * hd) * 4,
                          baseline="dense attention (two GEMVs)", density=kt / n, n=n)


def bench_statistical_topk(R=2048, D=16384, density=0.08, reps=7, gen=None):
    """Statistical top-k (versions 1 and 2) vs exact top-k (torch.topk + scatter), [R, D] float32.

    Each pair gives both sides the same output handling: both allocate their result, both write
    into a buffer allocated once (out=), or both overwrite their input (in place; the input is
    restored, untimed, before each rep). Version 1 (topk.statistical_topk) only allocates.
    A row's limit is t_exact / t_floor, t_floor the best rep of a pass doing part of what any
    version must do in that mode: fill a fresh tensor (allocating), copy x into the buffer
    (out=), read x (in place: its writes come on top). An in-place pass (x.neg_()) would be the
    tighter floor, but our C loop ran as fast as it (98-102 % in repeated runs): not a bound.
    """
    k = max(1, round(density * D))
    src, x, out = _randn(R, D, gen=gen), torch.empty(R, D), torch.empty(R, D)
    vals, inds = torch.empty(R, k), torch.empty(R, k, dtype=torch.long)

    def exact(x, y=None):  # y: where the result goes (None: new tensors, as an allocating op)
        val, ind = torch.topk(x, k, dim=-1, sorted=False, out=None if y is None else (vals, inds))  # [R, k]
        return (torch.zeros_like(x) if y is None else y.zero_()).scatter_(-1, ind, val)  # [R, D]

    fns = {"exact": exact, "exact_out": lambda x: exact(x, out), "exact_inplace": lambda x: exact(x, x),
           "v1": lambda x: statistical_topk(x, k), "floor": lambda x: torch.empty_like(x).fill_(1.0),
           "floor_out": lambda x: out.copy_(x), "floor_inplace": lambda x: x.sum()}
    if _lib() is not None:
        fns.update({"v2": lambda x: statistical_topk_cpu(x, k), "v2_out": lambda x: statistical_topk_cpu(x, k, out=out),
                    "v2_inplace": lambda x: statistical_topk_cpu(x, k, out=x)})
    every16 = slice(None, None, 16)  # the references on every 16th row (the kernels treat rows alone)
    ref_stat, ref_exact = (f(src[every16].numpy(), k) for f in (statistical_topk_np, exact_topk_np))
    for name, fn in fns.items():
        if not name.startswith("floor"):
            _check(f"statistical_topk {name}", fn(x.copy_(src))[every16], ref_exact if name[0] == "e" else ref_stat, 1e-5, 1e-5)
    ts = _time_interleaved(fns, [x], reps, warmup=1, before=lambda: x.copy_(src))
    return [_record(f"statistical_topk/{R}x{D}_k{k}/{v[:2]} {label}", ts["exact" + v[2:]], ts[v], min(ts["floor" + v[2:]]),
                    GBps=2 * R * D * 4 / np.median(ts[v]) / 1e9, k=k, baseline="exact top-k (torch.topk + scatter), same output")
            for v, label in (("v1", "allocating"), ("v2", "allocating"), ("v2_out", "out= buffer"),
                             ("v2_inplace", "in place")) if v in ts]


def bench_decode_model(new=63, reps=5):
    """generate_cpu vs GPT.generate on spark.GPTConfig() (the model train_tiny.py trains), random
    weights (2-D ones at 10x the init scale, so greedy decoding has no near-ties), one prompt
    token and `new` greedy tokens: with block_size 64 every one is a cached decode step."""
    torch.manual_seed(0)
    model = spark.GPT(spark.GPTConfig()).eval()
    for p in model.parameters():
        p.data.mul_(10.0 if p.dim() == 2 else 1.0)
    fns = {"generate": lambda i: model.generate(i, new, temperature=0),
           "generate_cpu": lambda i: generate_cpu(model, i, new, temperature=0)}
    idx = torch.zeros(1, 1, dtype=torch.long)
    if not torch.equal(fns["generate"](idx), fns["generate_cpu"](idx)):
        raise AssertionError("decode_model: generate_cpu's greedy tokens differ from GPT.generate's; not timed")
    ts = {name: [t / new for t in times] for name, times in _time_interleaved(fns, [idx], reps, warmup=1).items()}
    return _record(f"decode_model/GPTConfig() {model.config.ffn}/{model.config.attn}, {new} tokens", ts["generate"],
                   ts["generate_cpu"], None, baseline="GPT.generate")  # ms per token; no byte limit: all fixed costs


def _print_table(recs):
    hdr = (f"{'kernel':<58} {'base ms':>8} {'ours ms':>8} {'speedup':>8} {'limit':>6} {'of limit':>8} "
           f"{'base GB/s':>9} {'ours GB/s':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in recs:
        lim = f"{r['limit']:>5.2f}x {r['fraction_of_limit']:>8.0%}" if r["limit"] else f"{'-':>6} {'-':>8}"
        lim = f"{'NOT A BOUND':>15}" if r["not_a_bound"] else lim  # never printed as a result
        gbps = "".join(f" {r[key]:>9.1f}" if key in r else f" {'-':>9}" for key in ("baseline_GBps", "GBps"))
        print(f"{r['name']:<58} {r['baseline_ms']:>8.2f} {r['ms']:>8.2f} {r['speedup']:>7.2f}x {lim}{gbps}")


def _reps(text):
    """--reps: an int >= 1 (argparse reports this error under the argument's name)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return int(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Dense vs sparse CPU decode kernels: time, speedup, GB/s, limit.")
    ap.add_argument("--json", metavar="PATH", help="also write the table as a JSON list of records")
    how_long = ap.add_mutually_exclusive_group()  # --reps N or --quick, not both
    how_long.add_argument("--reps", type=_reps, default=40, help="timed repetitions per kernel (median is reported)")
    how_long.add_argument("--quick", action="store_true", help="5 repetitions (a smoke run)")
    args = ap.parse_args(argv)
    if args.json:  # its folder made and the file opened now: a path we cannot write fails before the benchmark
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        args.json = open(args.json, "w")
    reps, gen = 5 if args.quick else args.reps, torch.Generator().manual_seed(0)
    cpu = next((line.split(":")[1].strip() for line in _cpu_id() if line.startswith("model name")), platform.machine())
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"machine: {', '.join(f'{k} {v}' for k, v in machine.items())}, float32\nkernels: {fused_status()}\n")
    recs = [*bench_spark_ffn(reps=reps, gen=gen), *bench_spark_ffn(M=4, reps=reps, gen=gen),
            *bench_relu_ffn(density=0.01, reps=reps, gen=gen), *bench_relu_ffn(density=0.005, reps=reps, gen=gen),
            *(bench_spark_attention(n=n, reps=reps, gen=gen) for n in (1024, 4096, 8192)),
            *bench_statistical_topk(reps=3 if args.quick else 7, gen=gen), bench_decode_model(reps=2 if args.quick else 5)]
    _print_table(recs)
    print(f"decode_model: {1e3 / recs[-1]['baseline_ms']:.0f} tokens/s with GPT.generate, "
          f"{1e3 / recs[-1]['ms']:.0f} with generate_cpu")
    if args.json:
        with args.json as fh:
            json.dump([{**r, **machine} for r in recs], fh, indent=1)
    return recs


if __name__ == "__main__":
    main()
