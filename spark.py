"""spark.py: every sparse layer of the papers, in NumPy and PyTorch, and one tiny GPT that switches between them.

Keep this file open beside the papers. Each layer comes three times, smallest first:
a plain NumPy reference (forward only, loops where loops are clearer), the same math as a
PyTorch function (vectorised, differentiable, the training path), and a module holding the
weights under the same names. At the end a small GPT (nanoGPT's layout) whose FFN and attention
can be any of them, a KV-cache `generate`, and `count_costs`, the FLOPs and bytes arithmetic
behind the papers' speed-up claims (`python spark.py` prints the table).

Papers (formulas, settings and numbers digested in notes/papers.md, cited by section heading)
- Spark Transformer (You et al. 2025, arXiv 2506.06644): statistical top-k, the predictor-split
  FFN (`spark_ffn`; notes/papers.md, "Spark FFN") and the predictor-split sparse attention
  (`spark_attention`; "Spark attention").
- The Lazy Neuron Phenomenon (Li et al., ICLR 2023, arXiv 2210.06313): the Top-k Transformer,
  exact top-k on the FFN activations (`topk_ffn`, method "exact"; "Exact top-k (Lazy Neuron)").
- Gemma 3n's MLP (statistical top-k on the gate of a GeGLU, Hugging Face `Gemma3nTextMLP`):
  `topk_ffn`, method "statistical" ("Statistical top-k (Spark)").
- Sparser, Faster, Lighter Transformer LMs (Sakana AI, arXiv 2603.23198): ReLU-gated FFN
  trained with an L1 penalty on its activations (`relu_l1_ffn`; "L1-induced sparsity (Sakana)"),
  and its TwELL format for the sparse gate (`twell_pack`, `twell_ffn`; "TwELL").
- Section 4b, more ways to skip work ("Other systems"): Terraformer's sparse FFN (arXiv
  2111.12763), LTE (arXiv 2402.06126), Polar Sparsity's head router (arXiv 2505.14884) and
  D2DMoE (arXiv 2310.04361), a conversion of a trained ReLU model into experts.
- Gated FFNs, GeGLU (Shazeer 2020, arXiv 2002.05202); grouped-query attention (Ainslie et al.
  2023, arXiv 2305.13245); Gemma 2 shapes (arXiv 2408.00118); nanoGPT (karpathy) for the GPT.

The operators themselves (exact_topk, statistical_topk and their NumPy references) live in
topk.py; this file only uses them.

Dimension letters (every shape comment below uses them)
    B    batch size                      T    tokens in this call (queries)
    S    keys visible to the call (S = T without a cache, S = cached + T with one)
    d    model width (d_model)           f    FFN width (Spark uses 1.5x the gated width)
    k    FFN entries kept per token      r    predictor slice: first r of d (FFN) or of hd (attention)
    H    query heads                     Hkv  key/value heads (grouped-query: H % Hkv == 0)
    G    query heads per KV head, H // Hkv
    hd   head size                       kt   attention: tokens kept per query (k_top)
    n    cached tokens a decoded token attends to (cost accounting)
    V    vocabulary size                 L    layers

Conventions: row vectors (y = x @ W, W is [in, out]). GELU is the tanh approximation (Gemma's).
Learned absolute position embeddings and pre-LayerNorm blocks (nanoGPT), not Gemma's RoPE and
RMSNorm: nothing in the sparse layers depends on that choice, and absolute positions keep the
KV cache trivial.

Where the sources are silent we choose, say so at the line, and test the property (the list:
notes/papers.md, "Our choices where the papers are silent"; notes/spark.md):
- Spark attention scales: softmax over q[:r].K1 / sqrt(r); gate softplus(q[r:].K2 / sqrt(hd - r)).
- Spark attention selects with an *exact* top-k over keys: a cap of kt tokens per query and
  head; a query that sees fewer than kt tokens attends to all of them.
- Future tokens are masked *before* the top-k, so the top-k runs over visible tokens only.
- Grouped-query heads: every query head selects its own kt tokens among its KV head's keys.
- FFN k = max(1, round(density * f)).
"""

import dataclasses
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from topk import check_k, exact_topk, exact_topk_np, statistical_topk, statistical_topk_np

FFN_KINDS = ("dense", "relu", "topk", "stat_topk", "spark", "relu_l1", "terraformer", "lte")  # "dense" = GeGLU, "relu" = ReLU-gated
ATTN_KINDS = ("dense", "spark", "polar")

# ------------------------------------------------------------------------------------------
# 0. Activations and argument checks
# ------------------------------------------------------------------------------------------


def gelu_np(z):
    """GELU, tanh approximation:  0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).   [...] -> [...]

    gelu(0) = 0 exactly, which is why zeroing an entry before the GELU removes it (top-k FFNs).
    """
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def relu_np(z):
    """ReLU: max(z, 0).   [...] -> [...]"""
    return np.maximum(z, 0.0)


def softplus_np(z):
    """softplus(z) = log(1 + e^z), computed without overflow."""
    return np.logaddexp(0.0, z)


def softmax_np(s):
    """Softmax over the last axis; -inf entries get weight 0 (a row must have one finite entry)."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_int(name, value, lo, hi=None):
    """ValueError/TypeError unless value is an int in [lo, hi] (hi None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")


def _check_choice(name, value, choices):
    """ValueError unless value is one of choices (act, method, ffn, attn)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_ffn_weights(x, Wg, Wu, Wd):
    """Shapes of a gated FFN: x [..., d], Wg and Wu [d, f], Wd [f, d]."""
    if Wg.ndim != 2 or Wg.shape[0] != x.shape[-1] or Wg.shape != Wu.shape or Wd.shape != Wg.shape[::-1]:
        raise ValueError(
            f"gated FFN shapes: expected x [..., d], Wg and Wu [d, f], Wd [f, d]; got x {tuple(x.shape)}, "
            f"Wg {tuple(Wg.shape)}, Wu {tuple(Wu.shape)}, Wd {tuple(Wd.shape)}"
        )


def _check_spark_ffn(x, K1, K2, V, r):
    """Shapes of a Spark FFN: x [..., d], K1 [r, f], K2 [d - r, f], V [f, d], 1 <= r <= d - 1."""
    d, f = x.shape[-1], V.shape[0]
    if not 1 <= r <= d - 1 or tuple(K1.shape) != (r, f) or tuple(K2.shape) != (d - r, f) or tuple(V.shape) != (f, d):
        raise ValueError(f"spark FFN shapes: expected 1 <= r <= d-1, K1 [r, f], K2 [d-r, f], V [f, d] with d={d}, "
                         f"r={r}; got K1 {tuple(K1.shape)}, K2 {tuple(K2.shape)}, V {tuple(V.shape)}")


def _check_attn_shapes(q, k, v):
    """q [B, H, T, hd], k and v [B, Hkv, S, hd] with H % Hkv == 0 and S >= T."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention expects q [B, H, T, hd], k and v [B, Hkv, S, hd]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, hd = q.shape
    if k.shape[0] != B or k.shape[3] != hd or k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: need the same B and hd, "
                         f"and H ({H}) divisible by Hkv ({k.shape[1]})")
    if k.shape[2] < T:
        raise ValueError(f"fewer keys than queries: S = {k.shape[2]} < T = {T} (with a KV cache S >= T)")


# ------------------------------------------------------------------------------------------
# 1. FFN layers -- NumPy references (forward only)
#    A token x [d] -> y [d]; any leading shape [..., d] works, tokens are independent.
# ------------------------------------------------------------------------------------------


def gated_ffn_np(x, Wg, Wu, Wd, act):
    """Dense gated FFN: GeGLU for act="gelu", ReLU-gated for "relu" (Shazeer 2020).

    x [..., d], Wg Wu [d, f], Wd [f, d] -> y [..., d]
    """
    _check_ffn_weights(x, Wg, Wu, Wd)
    _check_choice("act", act, ("gelu", "relu"))
    g = x @ Wg  # [..., f] gate pre-activation
    u = x @ Wu  # [..., f] up projection
    # a = act(g) * u
    a = (gelu_np(g) if act == "gelu" else relu_np(g)) * u  # [..., f]
    # y = a Wd
    return a @ Wd  # [..., d]


def topk_ffn_np(x, Wg, Wu, Wd, k, method):
    """Gated FFN with top-k on the gate pre-activation (Top-k Transformer; Gemma 3n).

    method "exact":       topk keeps the k largest g of each token, the others 0 (gelu(0) = 0).
    method "statistical": topk = max(g - theta, 0), theta = mean(g) + std(g) Q(1 - k/f)
                          (Spark's statistical top-k; exactly Gemma 3n's `_gaussian_topk`).
    x [..., d] -> y [..., d]
    """
    _check_ffn_weights(x, Wg, Wu, Wd)
    _check_choice("method", method, ("exact", "statistical"))
    g = x @ Wg  # [..., f]
    u = x @ Wu  # [..., f]
    # t = topk(g, k)
    t = exact_topk_np(g, k) if method == "exact" else statistical_topk_np(g, k)  # [..., f] about k nonzeros
    # a = gelu(t) * u
    a = gelu_np(t) * u  # [..., f], zero wherever t is zero
    return a @ Wd  # [..., d]


def spark_ffn_np(x, K1, K2, V, k, r):
    """Spark FFN: the first r input dims predict which of the f neurons fire (notes/papers.md, "Spark FFN").

    K1 [r, f] is the predictor (dense, cheap: r < d); K2 [d - r, f] and V [f, d] are needed
    only for the survivors. Two matrices of d x f instead of three, so at equal parameters f is
    1.5x the gated width.   x [..., d] -> y [..., d]
    """
    _check_spark_ffn(x, K1, K2, V, r)
    # p = x[:r] K1
    p = x[..., :r] @ K1  # [..., f]  predictor scores
    # u = x[r:] K2
    u = x[..., r:] @ K2  # [..., f]  the rest of the "gate * up" product
    # t = statistical_topk(p, k) = max(p - theta, 0)
    t = statistical_topk_np(p, k)  # [..., f], about k nonzeros
    # a = gelu(t) * u
    a = gelu_np(t) * u  # [..., f]
    # y = a V
    return a @ V  # [..., d]


def relu_l1_ffn_np(x, Wg, Wu, Wd):
    """ReLU-gated FFN and its L1 term (Sakana; notes/papers.md, "L1-induced sparsity (Sakana)").

    x [..., d] -> (y [..., d], l1 scalar). The training loss adds lambda * (l1 averaged over layers).
    """
    _check_ffn_weights(x, Wg, Wu, Wd)
    # h = relu(x Wg) * (x Wu)
    h = relu_np(x @ Wg) * (x @ Wu)  # [..., f]
    # l1 = mean over tokens of sum over f of |h|
    l1 = np.abs(h).sum(axis=-1).mean()
    return h @ Wd, l1  # [..., d], scalar


# TwELL, tile-wise ELLPACK (Sakana AI, arXiv 2603.23198, its TwELL format; notes/papers.md,
# "TwELL"; drawn in notes/twell.md): how their GPU kernels hand the gate g = relu(x Wg) [M, f]
# from the gate matmul to the fused up/down projection, so that the dense g is never stored.
# The f columns form tiles of `tile`; each (row, tile) owns a slot of W = tile / C uint32 words:
#     word 0        n, how many entries the slot holds, 0 <= n <= W - 1 (the capacity)
#     words 1..n    one nonzero each, in increasing column order:
#                   bits 0-15 the global column j, bits 16-31 the bf16 bits of g_j
#     words n+1..   0
# packed is [M, nT W] uint32, nT = ceil(f / tile): 4 W = 4 tile / C bytes per tile against the
# 2 tile bytes of dense bf16 g, so C / 2 times smaller (4x at C = 8).
# Choices where the paper is silent (each one tested):
# - f <= 65536 (a 16-bit column index); C in {2, 4, 8}; tile a power of two >= 2 C (room for a
#   count and one entry; powers of two are what GPU kernels tile by). When f % tile != 0 the
#   last tile is narrower (f mod tile columns) and its slot still has W words.
# - Values: float32 -> bf16 rounded to nearest even (float64 input is rounded to float32 first,
#   in NumPy and torch alike). An entry is stored when its bf16 value is nonzero: -0 and float32
#   up to 2^-134 (they round to 0) are not; a float32 from 3.396e38 on rounds to bf16 inf.
# - g must be finite and >= 0, as a ReLU output is: anything else is an error (NaN has no bf16
#   bits that both versions agree on; a negative value means the input is not a ReLU gate).
# - Overflow (a tile with more than W - 1 nonzeros) flags its row. That tile's slot holds
#   n = W - 1 and its first W - 1 columns, each with the value NaN (bf16 bits 0x7FC0): no count
#   exceeds the capacity, nothing spills into the next slot, and a consumer that ignores the flag
#   gets a NaN row, never a plausible wrong one. twell_unpack returns such rows all NaN;
#   twell_ffn computes them densely with the exact g (the paper's hybrid routing).
BF16_NAN = 0x7FC0  # the bf16 bits of the NaN that marks an overflowing slot (torch's NaN)


def _twell_sizes(f, tile, C):
    """Check the format's arguments f, tile, C -> (nT tiles per row, W words per slot)."""
    _check_int("C", C, 2, 8)
    _check_choice("C", C, (2, 4, 8))
    _check_int("f", f, 1, 65536)  # a column index has 16 bits
    _check_int("tile", tile, 2 * C, 65536)
    if tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 2 C = {2 * C}, got {tile}")
    return -(-f // tile), tile // C  # ceil(f / tile), W


def _check_twell_array(name, a, ok, expected):
    """ValueError naming the argument unless ok (its rank, dtype and width were checked by the caller)."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got shape {tuple(a.shape)} dtype {a.dtype}")


def twell_pack_np(h, tile=256, C=8):
    """TwELL packing (format above).   h [M, f] -> (packed uint32 [M, nT W], overflow bool [M])

    h: gate activations relu(x Wg), any float dtype, finite and >= 0. A loop over (row, tile),
    the plainest form; twell_pack is the vectorised version, bit for bit the same.
    """
    h = np.asarray(h)
    _check_twell_array("h", h, h.ndim == 2 and h.dtype.kind == "f", "a float array [M, f]")
    (M, f), (nT, W) = h.shape, _twell_sizes(h.shape[1], tile, C)
    h32 = h.astype(np.float32)
    bad = np.argwhere(~((h32 >= 0) & (h32 < np.inf)))  # 0 <= h < inf fails for NaN, inf, h < 0
    if len(bad):
        i = tuple(bad[0].tolist())
        raise ValueError(f"h must be finite and >= 0 (ReLU outputs), got h{list(i)} = {h32[i]}")
    # bf16 bits, round to nearest even: add 0x7FFF plus the lowest kept bit (bit 16), keep the top
    # 16 bits; a mantissa carry runs into the exponent by itself (0 <= h < inf: no wrap past 2^32)
    b = h32.view(np.uint32)  # [M, f] float32 bits
    hb = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # [M, f] bf16 bits
    packed, overflow = np.zeros((M, nT * W), np.uint32), np.zeros(M, bool)
    for m in range(M):
        for t in range(nT):
            # the tile's nonzero global columns, increasing (& 0x7FFF: the sign bit of -0 does not count)
            j = t * tile + np.flatnonzero(hb[m, t * tile : (t + 1) * tile] & 0x7FFF)
            v = hb[m, j]  # their bf16 bits
            if len(j) > W - 1:  # overflow: flag the row; keep W - 1 columns, each valued NaN
                overflow[m], j, v = True, j[: W - 1], np.full(W - 1, BF16_NAN, np.uint32)
            # word 0 = n;  word k = j | bf16 << 16 for k = 1..n
            packed[m, t * W] = len(j)
            packed[m, t * W + 1 : t * W + 1 + len(j)] = j | (v << 16)
    return packed, overflow


def twell_unpack_np(packed, f, tile=256, C=8):
    """Inverse of twell_pack_np.   packed uint32 [M, nT W] -> g float32 [M, f] (bf16 values)

    Rows that overflowed come back all NaN. A slot that is not one twell_pack_np writes (count
    above the capacity, a column outside its tile or not increasing) is an error.
    """
    packed = np.asarray(packed)
    nT, W = _twell_sizes(f, tile, C)
    ok = packed.ndim == 2 and packed.dtype == np.uint32 and packed.shape[1] == nT * W
    _check_twell_array("packed", packed, ok, f"a uint32 array [M, {nT * W}] (f={f}, tile={tile}, C={C})")
    g = np.zeros((packed.shape[0], f), np.float32)
    for m in range(packed.shape[0]):
        for t in range(nT):
            n = int(packed[m, t * W])  # word 0
            e = packed[m, t * W + 1 : (t + 1) * W][:n]  # words 1..n (at most the slot's)
            j = e & 0xFFFF  # [n] global columns
            if n > W - 1 or (j // tile != t).any() or (j >= f).any() or (np.diff(j.astype(np.int64)) <= 0).any():
                raise ValueError(f"packed[{m}] tile {t} is not a TwELL slot: count {n} (capacity {W - 1}), "
                                 f"columns {j.tolist()} (must increase within [{t * tile}, {min(f, (t + 1) * tile)}))")
            # the bf16 bits are the high half of a float32: clear the low 16 bits (the column)
            g[m, j] = (e & 0xFFFF0000).view(np.float32)
    # only an overflowing slot holds NaN (valid data is finite): mark its whole row
    g[np.isnan(g).any(axis=1)] = np.nan
    return g


def twell_ffn_np(x, Wg, Wu, Wd, tile=256, C=8):
    """ReLU-gated FFN through TwELL, with the hybrid routing.   x [..., d] -> y [..., d]

    The gate g = relu(x Wg) is packed; a row without overflow reads its stored entries only,
    y = sum_j g_j (x . Wu[:, j]) Wd[j] (bf16 g_j); an overflowing row takes the dense FFN with
    the exact g. So y = relu_l1_ffn_np(x, Wg, Wu, Wd)[0] up to the bf16 rounding of g. A NaN or
    inf gate (from non-finite x or weights) is twell_pack_np's error, not a NaN row.
    """
    _check_ffn_weights(x, Wg, Wu, Wd)
    xs = x.reshape(-1, x.shape[-1])  # [M, d]
    packed, overflow = twell_pack_np(relu_np(xs @ Wg), tile, C)  # the gate, dense only here
    y = np.zeros(xs.shape, np.result_type(xs, Wd, np.float32))  # [M, d]
    for m in range(len(xs)):
        if overflow[m]:  # hybrid routing: the dense ReLU-gated FFN for this row
            y[m] = relu_l1_ffn_np(xs[m], Wg, Wu, Wd)[0]
            continue
        # the n entries of the row: words 1..count of each slot
        e = np.concatenate([packed[m, s + 1 : s + 1 + packed[m, s]] for s in range(0, packed.shape[1], tile // C)])
        j, g = e & 0xFFFF, (e & 0xFFFF0000).view(np.float32)  # [n] columns, [n] bf16 values
        # y = sum_j g_j (x . Wu[:, j]) Wd[j]: n columns of Wu and n rows of Wd read, not f
        y[m] = (g * (xs[m] @ Wu[:, j])) @ Wd[j]
    return y.reshape(x.shape)


# ------------------------------------------------------------------------------------------
# 2. Attention -- NumPy references (loops over batch, head and query: the plainest form)
#    q [B, H, T, hd], k and v [B, Hkv, S, hd], S >= T. Query i sits at position S - T + i,
#    so with a KV cache (S > T) the T new tokens are the last T positions. Causal: query i
#    sees keys 0 .. S - T + i. Grouped-query: query head h reads KV head h // G, G = H // Hkv.
# ------------------------------------------------------------------------------------------


def attention_np(q, k, v, causal=True):
    """Multi-head (grouped-query) softmax attention: softmax(q k^T / sqrt(hd)) v.   -> [B, H, T, hd]"""
    _check_attn_shapes(q, k, v)
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = np.zeros_like(q)  # [B, H, T, hd]
    for b in range(B):
        for h in range(H):
            kv = h // G  # the KV head this query head shares
            for i in range(T):
                n = S - T + i + 1 if causal else S  # keys visible to query i
                s = k[b, kv, :n] @ q[b, h, i] / math.sqrt(hd)  # [n]
                out[b, h, i] = softmax_np(s) @ v[b, kv, :n]  # [hd]
    return out


def spark_attention_np(q, k, v, k_top, r, causal=True):
    """Spark attention (notes/papers.md, "Spark attention").   -> [B, H, T, hd]

    The key vector is split by dimension: K1 = first r dims (the predictor), K2 = the rest.
    For one query q over its visible keys j:
        s_j = q[:r] . K1_j / sqrt(r)                       (scale: our choice, see below)
        keep the kt = min(k_top, visible) largest s_j, the others -inf   (exact top-k: a cap)
        w_j = softmax(s)_j * softplus(q[r:] . K2_j / sqrt(hd - r))
        out = sum_j w_j V_j              (w does not sum to 1: the softplus gate rescales it)
    Choices (the sources are silent): each scale is 1/sqrt(number of dims in its dot product),
    the usual attention scale, so both arguments have unit variance for unit-variance q and K
    (and softplus starts in its curved region, softplus(0) = ln 2); future keys are removed
    before the top-k; each query head selects its own tokens.
    """
    _check_attn_shapes(q, k, v)
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_int("k_top", k_top, 1)
    _check_int("r", r, 1, hd - 1)
    G = H // Hkv
    out = np.zeros_like(q)  # [B, H, T, hd]
    for b in range(B):
        for h in range(H):
            kv = h // G
            for i in range(T):
                n = S - T + i + 1 if causal else S  # visible keys (future ones never enter the top-k)
                K, Vv, qi = k[b, kv, :n], v[b, kv, :n], q[b, h, i]  # [n, hd], [n, hd], [hd]
                s = K[:, :r] @ qi[:r] / math.sqrt(r)  # [n] predictor scores
                s = exact_topk_np(s, min(k_top, n), fill=-np.inf)  # [n], at most k_top finite
                gate = softplus_np(K[:, r:] @ qi[r:] / math.sqrt(hd - r))  # [n]
                out[b, h, i] = (softmax_np(s) * gate) @ Vv  # [hd]
    return out


# ------------------------------------------------------------------------------------------
# 3. The same layers in PyTorch (the training path). Each must match its *_np reference;
#    tests/test_spark.py compares them in float64. `return_act=True` also returns the
#    sparse activation (the top-k output, or the product a / h), so modules can count its nonzeros.
# ------------------------------------------------------------------------------------------


def gated_ffn(x, Wg, Wu, Wd, act, *, return_act=False):
    """Torch version of gated_ffn_np.   x [..., d] -> y [..., d]"""
    _check_ffn_weights(x, Wg, Wu, Wd)
    _check_choice("act", act, ("gelu", "relu"))
    g = x @ Wg  # [..., f]
    u = x @ Wu  # [..., f]
    # a = act(g) * u
    a = (F.gelu(g, approximate="tanh") if act == "gelu" else F.relu(g)) * u  # [..., f]
    # y = a Wd
    y = a @ Wd  # [..., d]
    return (y, a) if return_act else y


# One switch, TRITON: on a CUDA tensor (not float64; triton needed) the statistical top-k FFNs compute
# a = gelu(statistical_topk(p, k)) * u in kernels_gpu.py's fused Triton pass, forward and backward
# (p and u read once, the sparse t never stored), and SparkAttention trains (S == T, no dropout,
# heads of at most kernels_gpu.MAX_HEAD_BYTES) with kernels_gpu.spark_attention_gpu; everywhere
# else, and with TRITON = False, the torch ops below. Both match the NumPy references
# (tests/test_kernels_gpu*.py: tolerances).
TRITON = True


def _gelu_topk_mul(g, u, k, method):
    """a = gelu(topk(g, k)) * u.   g, u [..., f] -> [..., f]; a = 0 wherever topk dropped g (gelu(0) = 0),
    so its nonzeros are the kept neurons (up to an exact 0 in u), which the modules count."""
    if method == "statistical" and TRITON and g.is_cuda and g.dtype != torch.float64:
        import kernels_gpu  # here, not at the top: only GPU runs need it (it imports spark back, at its top)

        return kernels_gpu.gelu_topk_mul_gpu(g, u, k)  # [..., f]
    # t = topk(g, k): torch.topk + scatter (O(f log k) per token), or mean, std, one threshold (linear)
    t = exact_topk(g, k) if method == "exact" else statistical_topk(g, k)  # [..., f]
    # a = gelu(t) * u
    return F.gelu(t, approximate="tanh") * u  # [..., f]


def topk_ffn(x, Wg, Wu, Wd, k, method, *, return_act=False):
    """Torch version of topk_ffn_np.   x [..., d] -> y [..., d]"""
    _check_ffn_weights(x, Wg, Wu, Wd)
    _check_choice("method", method, ("exact", "statistical"))
    g = x @ Wg  # [..., f]
    u = x @ Wu  # [..., f]
    # a = gelu(topk(g, k)) * u
    a = _gelu_topk_mul(g, u, k, method)  # [..., f]
    y = a @ Wd  # [..., d]
    return (y, a) if return_act else y


def spark_ffn(x, K1, K2, V, k, r, *, return_act=False):
    """Torch version of spark_ffn_np.   x [..., d] -> y [..., d]

    In training we compute u = x[r:] K2 for all f neurons and multiply by the sparse gate; only
    a decode kernel (kernels_cpu.py) skips the columns of K2 and rows of V that the gate zeroes.
    """
    _check_spark_ffn(x, K1, K2, V, r)
    # One split, not two slices: its backward is one cat, not two zero-filled [..., d] gradients
    x1, x2 = x.split([r, x.shape[-1] - r], dim=-1)  # [..., r], [..., d - r]
    # p = x[:r] K1,  u = x[r:] K2
    p, u = x1 @ K1, x2 @ K2  # [..., f], [..., f]
    # t = statistical_topk(p, k) = max(p - theta, 0);  a = gelu(t) * u
    a = _gelu_topk_mul(p, u, k, "statistical")  # [..., f]
    # y = a V
    y = a @ V  # [..., d]
    return (y, a) if return_act else y


def relu_l1_ffn(x, Wg, Wu, Wd, *, return_act=False):
    """Torch version of relu_l1_ffn_np.   x [..., d] -> (y [..., d], l1 scalar tensor with gradient)"""
    _check_ffn_weights(x, Wg, Wu, Wd)
    # h = relu(x Wg) * (x Wu)
    h = F.relu(x @ Wg) * (x @ Wu)  # [..., f]
    # l1 = mean over tokens of sum over f of |h|
    l1 = h.abs().sum(dim=-1).mean()
    y = h @ Wd  # [..., d]
    return (y, l1, h) if return_act else (y, l1)


def twell_pack(h, tile=256, C=8):
    """Torch version of twell_pack_np, bit-identical.   h [M, f] -> (packed uint32 [M, nT W], overflow bool [M])

    Vectorised and deterministic, with no host synchronisation: a cumsum over each tile's
    nonzero mask numbers its nonzeros 1, 2, ... from the left, the slot word each one goes to;
    one scatter writes them. The value check is torch._assert_async: on the CPU it raises at
    once, on a GPU it is a device-side assert (the stream fails; the host never waits).
    """
    _check_twell_array("h", h, h.ndim == 2 and h.is_floating_point(), "a float tensor [M, f]")
    (M, f), (nT, W) = h.shape, _twell_sizes(h.shape[1], tile, C)
    torch._assert_async(((h >= 0) & (h < math.inf)).all(), "h must be finite and >= 0 (ReLU outputs)")
    # bf16 through float32 (as in NumPy), zero-padded to nT whole tiles
    hb = F.pad(h.float().to(torch.bfloat16), (0, nT * tile - f)).view(M, nT, tile)  # [M, nT, tile]
    bits = hb.view(torch.int16).long() & 0xFFFF  # [M, nT, tile] bf16 bits
    nz = hb != 0  # stored: bf16 value nonzero (-0 == 0)
    pos = nz.cumsum(-1)  # [M, nT, tile] k at the k-th nonzero of a tile: its slot word
    count = pos[..., -1]  # [M, nT] nonzeros per tile
    over = count > W - 1  # [M, nT] overflowing tiles (their entries are valued NaN)
    # word = j | bf16 << 16, j the global column
    j = torch.arange(nT * tile, device=h.device).view(nT, tile)  # [nT, tile]
    word = j | (torch.where(over[..., None], BF16_NAN, bits) << 16)  # [M, nT, tile]
    # zeros and entries past the capacity go to a spare word W, dropped after the scatter
    dst = torch.where(nz & (pos < W), pos, W)  # [M, nT, tile] slot word of each column
    packed = torch.zeros(M, nT, W + 1, dtype=torch.long, device=h.device).scatter_(2, dst, word)
    packed[..., 0] = count.clamp(max=W - 1)  # word 0: n, never above the capacity
    # words < 2^31 (h >= 0: no sign bit), so int32 holds them and its bits are the uint32 ones
    return packed[..., :W].reshape(M, nT * W).int().view(torch.uint32), over.any(-1)


def twell_unpack(packed, f, tile=256, C=8):
    """Torch version of twell_unpack_np.   packed uint32 [M, nT W] -> g float32 [M, f], overflowed rows NaN

    Checks, by torch._assert_async, only what would write out of place (a count above the capacity,
    a column >= f); twell_unpack_np also checks that the columns increase within their tile.
    """
    nT, W = _twell_sizes(f, tile, C)
    ok = packed.ndim == 2 and packed.dtype == torch.uint32 and packed.shape[1] == nT * W
    _check_twell_array("packed", packed, ok, f"a uint32 tensor [M, {nT * W}] (f={f}, tile={tile}, C={C})")
    M = packed.shape[0]
    p = packed.view(torch.int32).view(M, nT, W)  # [M, nT, W] the same bits as int32
    n, e = p[..., :1], p[..., 1:]  # [M, nT, 1] counts, [M, nT, W - 1] entries
    held, j = torch.arange(1, W, device=p.device) <= n, e & 0xFFFF  # [M, nT, W - 1] words 1..n, columns
    ok = (n >= 0) & (n <= W - 1) & (~held | (j < f))
    torch._assert_async(ok.all(), "packed: a count above the capacity tile/C - 1, or a column >= f")
    # column j (spare column f for the words not held), value = the high half as a float32
    dst = torch.where(held, j, f).view(M, nT * (W - 1)).long()  # [M, nT (W - 1)]
    v = (e & -65536).view(torch.float32).reshape(M, nT * (W - 1))  # -65536 = 0xFFFF0000 in int32
    g = torch.zeros(M, f + 1, device=p.device).scatter_(1, dst, v)[:, :f]  # [M, f]
    return torch.where(g.isnan().any(1, keepdim=True), math.nan, g)


def twell_ffn(x, Wg, Wu, Wd, tile=256, C=8):
    """Torch version of twell_ffn_np, no host synchronisation.   x [..., d] -> y [..., d]

    Fixed shapes: every row's gate goes through pack and unpack, and torch.where picks per row
    the unpacked bf16 g or, where the row overflows, the exact g (hybrid routing); then one dense
    product, the plainest form of y = sum_j g_j (x . Wu[:, j]) Wd[j]. No gradient reaches Wg
    through the packed rows (train with relu_l1_ffn).
    """
    _check_ffn_weights(x, Wg, Wu, Wd)
    xs = x.reshape(-1, x.shape[-1])  # [M, d]
    g = F.relu(xs @ Wg)  # [M, f]
    packed, overflow = twell_pack(g, tile, C)
    gq = twell_unpack(packed, g.shape[1], tile, C).to(g.dtype)  # [M, f] bf16 values; NaN rows where overflow
    # h = g~ * (x Wu), g~ = exact g on overflowing rows, bf16 g from the words elsewhere
    h = torch.where(overflow[:, None], g, gq) * (xs @ Wu)  # [M, f]
    # y = h Wd
    return (h @ Wd).reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _causal_bias(T, S, G, dtype, device):
    """Additive causal mask: 0 where key j is visible to query i (j <= S - T + i), -inf in its
    future; repeated for G query heads stacked along the rows.   -> [G T, S] float"""
    i, j = torch.arange(T, device=device)[:, None], torch.arange(S, device=device)[None, :]  # [T, 1], [1, S]
    return torch.zeros(T, S, dtype=dtype, device=device).masked_fill(j > S - T + i, -math.inf).repeat(G, 1)


def attention(q, k, v, causal=True, *, dropout_p=0.0):
    """Torch version of attention_np, via scaled_dot_product_attention.   -> [B, H, T, hd]

    With a cache (S > T) the causal mask is aligned to the bottom right: query i sees keys
    0 .. S - T + i. SDPA's own is_causal is top-left aligned, so we pass a mask then.
    """
    _check_attn_shapes(q, k, v)
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or T == 1:  # one new token sees the whole cache: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    mask = _causal_bias(T, S, 1, q.dtype, q.device)  # [T, S] 0 / -inf
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def spark_attention(q, k, v, k_top, r, causal=True, *, dropout_p=0.0, return_kept=False):
    """Torch version of spark_attention_np.   q [B, H, T, hd], k v [B, Hkv, S, hd] -> [B, H, T, hd]

    Two paths with the same math:
    - training / prefill (T > 1 or S <= k_top): all [T, S] scores, future masked to -inf,
      exact top-k over the last axis as a threshold (keep s >= the kt-th largest), a softmax
      over the kept keys, times the softplus gate. O(T S) memory per head: fine at our sizes;
      a long-context implementation would tile it.
    - decode (T == 1 and S > k_top): scores against K1 of every cached token, torch.topk for
      the kt indices, then gather only those kt rows of K2 and V -- the computation a sparse
      decode kernel does, and what generate() runs one token at a time.
    Grouped-query heads: we view q as [B, Hkv, G, T, hd] so each KV head broadcasts to its G
    query heads without copying K and V; each of the G heads picks its own tokens.
    return_kept: also return the number of (query, key) pairs that got weight (a 0-d tensor).
    """
    _check_attn_shapes(q, k, v)
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_int("k_top", k_top, 1)
    _check_int("r", r, 1, hd - 1)
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, T, hd)  # [B, Hkv, G, T, hd]
    kg, vg = k[:, :, None], v[:, :, None]  # [B, Hkv, 1, S, hd]
    if T == 1 and S > k_top:
        # --- decode path: touch K2 and V of kt tokens only -------------------------------
        # s_j = q[:r] . K1_j / sqrt(r) for every cached j (one query at the last position sees all S)
        s = (qg[..., :r] @ kg[..., :r].transpose(-1, -2)) / math.sqrt(r)  # [B, Hkv, G, 1, S]
        top = torch.topk(s, k_top, dim=-1)  # values, indices [B, Hkv, G, 1, kt]
        idx = top.indices.transpose(-1, -2)  # [B, Hkv, G, kt, 1]
        k_sel = kg.expand(B, Hkv, G, S, hd).gather(3, idx.expand(B, Hkv, G, k_top, hd))  # [B, Hkv, G, kt, hd]
        v_sel = vg.expand(B, Hkv, G, S, hd).gather(3, idx.expand(B, Hkv, G, k_top, hd))  # [B, Hkv, G, kt, hd]
        # w_j = softmax(s)_j * softplus(q[r:] . K2_j / sqrt(hd - r)) over the kt selected j only
        gate = F.softplus((qg[..., r:] @ k_sel[..., r:].transpose(-1, -2)) / math.sqrt(hd - r))  # [B, Hkv, G, 1, kt]
        w = torch.softmax(top.values, dim=-1) * gate  # [B, Hkv, G, 1, kt]
        w = F.dropout(w, dropout_p) if dropout_p > 0 else w
        out = (w @ v_sel).reshape(B, H, 1, hd)  # [B, H, 1, hd]
        return (out, torch.tensor(B * H * k_top, device=q.device)) if return_kept else out
    # --- training / prefill path: every (query, key) pair, masked -------------------------
    # The G query heads of a KV head become G T rows, so every product is a plain batched matmul
    # on [B, Hkv] (no broadcast over G); the scales go on the narrow q slices, not on [.., S].
    # Masks are float and added in place: on the CPU a bool op costs 5-10x a float op, and each
    # new [.., S] tensor costs an allocation (measured, 2-core AMD EPYC VM, torch 2.13 CPU).
    qf = q.reshape(B, Hkv, G * T, hd)  # [B, Hkv, G T, hd]
    s = (qf[..., :r] * (1 / math.sqrt(r))) @ k[..., :r].transpose(-1, -2)  # [B, Hkv, G T, S]
    if causal:
        # Mask BEFORE the top-k: a future key must never take one of the kt places.
        s.add_(_causal_bias(T, S, G, s.dtype, s.device))  # future scores -> -inf
    # Exact top-k over keys (a cap of kt tokens) as a threshold: keep s >= the kt-th largest
    # visible score. Queries i < lo see at most kt keys and keep all of them; their threshold is
    # the lowest float, which drops only the -inf (future) scores.
    # Ties: every score equal to the kt-th is kept (the reference keeps exactly kt; which of a
    # tie survives is implementation-defined there anyway).
    lo = min(T, max(0, k_top - S + T)) if causal else (T if k_top >= S else 0)  # first row seeing > kt keys
    thr = s.new_full((B, Hkv, G, T, 1), torch.finfo(s.dtype).min)  # [B, Hkv, G, T, 1]
    top = torch.topk(s.detach().view(B, Hkv, G, T, S)[..., lo:, :], min(k_top, S), dim=-1, sorted=False)
    thr[..., lo:, :] = top.values.amin(-1, keepdim=True)  # kt-th largest score of each row
    keep = torch.ge(s.detach(), thr.view(B, Hkv, G * T, 1), out=torch.empty_like(s))  # [B, Hkv, G T, S] 1.0 / 0.0
    # softmax over the kept keys: e = exp(s - max) * keep, p = e / sum(e). The max is a constant
    # for the gradient (softmax does not depend on it). exp of an argument below ~-87 (float32
    # underflow, -inf included) takes a slow path here (4-10x), so it is clamped at -80: a kept
    # key that far below the max weighs e^-80 instead of less, invisible next to the max's 1.
    e = torch.exp(s.sub_(s.detach().amax(-1, keepdim=True)).clamp(min=-80.0)) * keep  # [B, Hkv, G T, S]
    gate = F.softplus((qf[..., r:] * (1 / math.sqrt(hd - r))) @ k[..., r:].transpose(-1, -2))  # [B, Hkv, G T, S]
    w = F.dropout(e * gate, dropout_p) if dropout_p > 0 else e * gate  # [B, Hkv, G T, S]
    # out = (p * gate) V = ((e * gate) V) / sum(e): dividing after the matmul touches hd, not S, columns
    out = ((w @ v) / e.sum(-1, keepdim=True)).reshape(B, H, T, hd)  # [B, Hkv, G T, hd] -> [B, H, T, hd]
    return (out, keep.sum()) if return_kept else out


# ------------------------------------------------------------------------------------------
# 4. Modules: the weights, under the references' names, plus the density of the last forward.
#    FFN weights are plain [in, out] Parameters (row-vector convention) so that a test can
#    hand module.Wg straight to gated_ffn_np. FFNs have no biases (the references have none).
#    An FFN keeps its last sparse activation `last_act` (detached; backward holds it anyway) and
#    GPT.stats() counts its nonzeros only when asked: counting costs ~0.3 ms a layer per step
#    (2-core AMD EPYC VM). Attention keeps `last_density`, a detached 0-d tensor (no host sync).
# ------------------------------------------------------------------------------------------


def _param(*shape, std=0.02):
    return nn.Parameter(torch.randn(*shape) * std)


class GatedFFN(nn.Module):
    """Dense gated FFN (gated_ffn), act "gelu" (GeGLU) or "relu". Wg, Wu [d, f], Wd [f, d]: 3 d f parameters."""

    def __init__(self, d, f, act="gelu"):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("f", f, 1)
        _check_choice("act", act, ("gelu", "relu"))
        self.act = act
        self.Wg, self.Wu, self.Wd = _param(d, f), _param(d, f), _param(f, d)
        self.last_act = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, a = gated_ffn(x, self.Wg, self.Wu, self.Wd, self.act, return_act=True)
        self.last_act = a.detach()
        return y


class TopkFFN(nn.Module):
    """Gated FFN with exact or statistical top-k on the gate (topk_ffn). Same parameters as GatedFFN."""

    def __init__(self, d, f, k, method="statistical"):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("f", f, 1)
        check_k(k, f)
        _check_choice("method", method, ("exact", "statistical"))
        self.k, self.method = k, method
        self.Wg, self.Wu, self.Wd = _param(d, f), _param(d, f), _param(f, d)
        self.last_act = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, a = topk_ffn(x, self.Wg, self.Wu, self.Wd, self.k, self.method, return_act=True)
        self.last_act = a.detach()  # a = gelu(topk) * u: zero where topk dropped a neuron
        return y


class SparkFFN(nn.Module):
    """Spark FFN (spark_ffn). Parameters K1 [r, f], K2 [d - r, f], V [f, d]: 2 d f parameters,
    so GPT gives it f = 1.5 x the gated width to match GatedFFN's 3 d f."""

    def __init__(self, d, f, k, r):
        super().__init__()
        _check_int("d", d, 2)
        _check_int("f", f, 1)
        check_k(k, f)
        _check_int("r", r, 1, d - 1)
        self.k, self.r = k, r
        self.K1, self.K2, self.V = _param(r, f), _param(d - r, f), _param(f, d)
        self.last_act = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, a = spark_ffn(x, self.K1, self.K2, self.V, self.k, self.r, return_act=True)
        self.last_act = a.detach()  # a = gelu(topk) * u: zero where topk dropped a neuron
        return y


class ReluL1FFN(nn.Module):
    """ReLU-gated FFN trained with an L1 penalty (relu_l1_ffn). Same parameters as GatedFFN.

    forward returns y only; the L1 term of the last forward (with its graph, so the loss can
    backpropagate through it) is left in `self.last_l1` for GPT.forward to add to the loss.
    """

    def __init__(self, d, f):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("f", f, 1)
        self.Wg, self.Wu, self.Wd = _param(d, f), _param(d, f), _param(f, d)
        self.last_act = None
        self.last_l1 = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, self.last_l1, h = relu_l1_ffn(x, self.Wg, self.Wu, self.Wd, return_act=True)
        self.last_act = h.detach()
        return y


class Attention(nn.Module):
    """Causal grouped-query self-attention (attention). q_proj [d -> H hd], k_proj and v_proj
    [d -> Hkv hd], o_proj [H hd -> d] (nn.Linear: weight is [out, in], so x @ weight.T).

    forward(x, cache=None): x [B, T, d] -> [B, T, d]. With a cache (a dict, filled in place,
    one per layer) the new keys/values are appended to cache["k"], cache["v"] [B, Hkv, S, hd]
    and the T new queries attend to everything cached so far.
    """

    def __init__(self, d, n_head, n_kv_head, head_dim, bias=False, dropout=0.0):
        super().__init__()
        _check_int("n_head", n_head, 1)
        _check_int("n_kv_head", n_kv_head, 1)
        _check_int("head_dim", head_dim, 1)
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head})")
        self.H, self.Hkv, self.hd, self.dropout = n_head, n_kv_head, head_dim, dropout
        self.q_proj = nn.Linear(d, n_head * head_dim, bias=bias)
        self.k_proj = nn.Linear(d, n_kv_head * head_dim, bias=bias)
        self.v_proj = nn.Linear(d, n_kv_head * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, d, bias=bias)
        self.resid_drop = nn.Dropout(dropout)
        self.last_density = None

    def _qkv(self, x, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # [B, Hkv, S, hd]
                v = torch.cat([cache["v"], v], dim=2)  # [B, Hkv, S, hd]
            cache["k"], cache["v"] = k, v
        return q, k, v

    def _mix(self, q, k, v):
        self.last_density = 1.0  # dense attention weighs every visible key
        return attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x, cache=None):  # [B, T, d] -> [B, T, d]
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cache)
        o = self._mix(q, k, v)  # [B, H, T, hd]
        o = o.transpose(1, 2).reshape(B, T, self.H * self.hd)  # [B, T, H hd]
        return self.resid_drop(self.o_proj(o))  # [B, T, d]


class SparkAttention(Attention):
    """Spark attention (spark_attention): the same parameters as Attention (the predictor K1 is
    the first r dims of every key, not a new matrix), so dense and Spark models have equal counts.
    last_density = attended (query, key) pairs / visible pairs of the last forward."""

    def __init__(self, d, n_head, n_kv_head, head_dim, k_top, r, bias=False, dropout=0.0):
        super().__init__(d, n_head, n_kv_head, head_dim, bias=bias, dropout=dropout)
        _check_int("k_top", k_top, 1)
        _check_int("r", r, 1, head_dim - 1)
        self.k_top, self.r = k_top, r

    def _mix(self, q, k, v):
        B, H, T, _ = q.shape
        S = k.shape[2]
        p = self.dropout if self.training else 0.0
        gpu = TRITON and q.is_cuda and q.dtype != torch.float64 and S == T and p == 0.0
        if gpu:
            import kernels_gpu  # (as in _gelu_topk_mul) two Triton passes; no [T, S] tensor is stored

            # longer heads (hd > 128 in float32) take the torch path: the kernels' tiles would not
            # fit in a GPU's shared memory
            gpu = q.shape[-1] * q.element_size() <= kernels_gpu.MAX_HEAD_BYTES
        if gpu:
            out, kept = kernels_gpu.spark_attention_gpu(q, k, v, self.k_top, self.r)
        else:
            out, kept = spark_attention(q, k, v, self.k_top, self.r, causal=True, dropout_p=p, return_kept=True)
        visible = B * H * (T * (S - T) + T * (T + 1) // 2)  # sum over queries of S - T + i + 1
        self.last_density = kept.detach() / visible
        return out


# ------------------------------------------------------------------------------------------
# 4b. More ways to skip work, each a NumPy reference, a torch function and a module
# (notes/papers.md, "Other systems", digests the four papers.)
#
# - Terraformer's sparse FFN ("Sparse is Enough in Scaling Transformers", Jaszczur et al., NeurIPS
#   2021, arXiv 2111.12763, its sparse feedforward layer): a low-rank controller picks ONE neuron
#   in every block of `block` neurons; decoding reads only those columns and rows.
# - LTE ("Learn To be Efficient", Zheng et al., NeurIPS 2024, arXiv 2402.06126: its expert
#   grouping, sigmoid routing and two-stage training): FFN neurons in experts, a sigmoid router
#   with a threshold, and an efficiency loss that pushes the routing scores down.
# - Polar Sparsity (Shrestha et al., NeurIPS 2025, arXiv 2505.14884, its selective head
#   attention): a router per layer keeps h_top heads (KV groups under grouped-query attention);
#   the others output 0. Its point: head sparsity survives batching, FFN sparsity does not.
# - D2DMoE ("Exploiting Activation Sparsity with Dense to Dynamic-k Mixture-of-Experts
#   Conversion", Szatkowski et al., NeurIPS 2024, arXiv 2310.04361): a trained ReLU FFN split
#   into experts, a router predicting each expert's output norm, a per-token number of experts
#   (last in this section; its conversion of a whole GPT is section 6b).
#
# Dimension letters as above, plus
#     M    tokens, all leading axes flattened       r    Terraformer controller rank
#     nb   Terraformer blocks, ceil(f / block)      E    LTE experts
#     Hr   Polar routed units: H (heads) or Hkv (KV groups); U = H // Hr query heads per unit
#
# Where the papers are silent we choose, say so at the line, and test it:
# - Terraformer: the FFN is the paper's two-matrix ReLU form y = (relu(x W1) * onehot) W2, and f
#   is chosen so that 2 d f + r (d + f) is the 3 d d_ff of a GeGLU (terraformer_width); when block
#   does not divide f the last block is narrower; the controller has no bias; training noise and
#   straight-through gradient as below (terraformer_ffn).
# - LTE: contiguous experts (sizes differ by at most one); the two stages folded into one
#   (lte_ffn); an expert runs when its score is strictly above eta.
# - Polar: routing per query token (a decode step has one token per sequence: the paper's [B,
#   h_top] table); KV groups under grouped-query attention; the router's recipe in PolarAttention.
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Terraformer's sparse FFN (arXiv 2111.12763; notes/papers.md, "Other systems")
# ------------------------------------------------------------------------------------------


def _check_terraformer(x, W1, W2, M1, M2, block, noise):
    """x [..., d], W1 [d, f], W2 [f, d], M1 [d, r], M2 [r, f], 1 <= block <= f, noise None or [..., f]."""
    d, f, r = x.shape[-1], W1.shape[-1], M1.shape[-1]
    if W1.shape != (d, f) or W2.shape != (f, d) or M1.shape != (d, r) or M2.shape != (r, f) or f == 0:
        raise ValueError(f"terraformer shapes: expected x [..., d], W1 [d, f], W2 [f, d], M1 [d, r], M2 [r, f]; got "
                         f"x {tuple(x.shape)}, W1 {tuple(W1.shape)}, W2 {tuple(W2.shape)}, M1 {tuple(M1.shape)}, "
                         f"M2 {tuple(M2.shape)}")
    _check_int("block", block, 1, f)
    if noise is not None and noise.shape != x.shape[:-1] + (f,):
        raise ValueError(f"noise must be [..., f] = {tuple(x.shape[:-1]) + (f,)}, got {tuple(noise.shape)}")
    return f, -(-f // block)  # f, nb = ceil(f / block)


def terraformer_width(d, d_ff, rank, block):
    """f of a Terraformer FFN with the parameters of a GeGLU of width d_ff: the whole number of
    blocks nearest to 2 d f + r (d + f) = 3 d d_ff (at least one). The controller's r (d + f)
    is paid for by a narrower f: d 128, d_ff 512, r 16, block 16 -> f 720, +0.65 % parameters."""
    return block * max(1, round((3 * d * d_ff - rank * d) / ((2 * d + rank) * block)))


def terraformer_ffn_np(x, W1, W2, M1, M2, block, noise=None):
    """Terraformer's sparse FFN at inference: one neuron per block, only its weights read.

    The controller scores the f neurons through a rank-r bottleneck, c = x M1 M2; neurons
    [j block, (j+1) block) form block j and only its highest-scoring neuron j* fires:
        y = sum_j relu(x . W1[:, j*]) W2[j*]          (nb columns of W1, nb rows of W2 read)
    noise (training, [..., f]) is added to c before the choice; ties go to the lower index.
    x [..., d] -> y [..., d]
    """
    f, nb = _check_terraformer(x, W1, W2, M1, M2, block, noise)
    xs = x.reshape(-1, x.shape[-1])  # [M, d]
    # c = x M1 M2 (+ noise): r (d + f) multiply-adds, the controller's cost
    c = xs @ M1 @ M2 + (0 if noise is None else noise.reshape(-1, f))  # [M, f]
    # a narrower last block is padded with -inf, which never wins
    c = np.pad(c, ((0, 0), (0, nb * block - f)), constant_values=-np.inf).reshape(len(xs), nb, block)
    # j* = j block + argmax over the block of c
    idx = c.argmax(-1) + np.arange(nb) * block  # [M, nb] global column of each block's winner
    # h_j* = relu(x . W1[:, j*])
    h = relu_np(np.einsum("md,dmn->mn", xs, W1[:, idx]))  # [M, nb]
    # y = sum_j h_j* W2[j*]
    return np.einsum("mn,mnd->md", h, W2[idx]).reshape(x.shape)  # [..., d]


def terraformer_ffn(x, W1, W2, M1, M2, block, noise=None, *, return_act=False):
    """Torch version of terraformer_ffn_np, the training form.   x [..., d] -> y [..., d]

    All f neurons are computed and multiplied by the one-hot mask m (a decode kernel reads the
    nb chosen ones only). Straight-through: m = onehot + p - p.detach(), p = softmax(c) within
    each block, so the forward value is the one-hot exactly and the controller learns from the
    softmax's gradient. The module passes noise = tau g, g ~ Gumbel(0, 1), tau = 0.1: the paper
    is silent on the temperature; 0.1, and the noise scaled by tau rather than the logits divided
    by it, follow the authors' released code (trax, SparseFF). That code also trains a share of
    the batches on the soft mask p; we never do, so training runs exactly the inference forward.
    A chosen neuron with x . W1[:, j*] <= 0 outputs 0 and teaches the controller nothing
    (dL/dm_j = relu(x W1)_j dL/dh_j): the achieved density is below 1 / block (a 600-step run
    of the tiny GPT: ~30 % of the chosen neurons fired).
    return_act: also h = relu(x W1) * m [..., f], nonzero in at most one neuron per block.
    """
    f, nb = _check_terraformer(x, W1, W2, M1, M2, block, noise)
    # c = x M1 M2, padded to whole blocks with -inf: [..., nb, block]
    c = F.pad((x @ M1) @ M2, (0, nb * block - f), value=-math.inf).unflatten(-1, (nb, block))
    z = c if noise is None else c + F.pad(noise, (0, nb * block - f)).unflatten(-1, (nb, block))
    # m = onehot(argmax z) + p - p.detach(), p = softmax(c) per block
    # (a softmax over a last axis of 8 ran 6x slower forward and backward on the CPU than the same
    # softmax over the transposed view, whose reduction runs across contiguous blocks: 2-core AMD
    # EPYC VM, torch 2.13, [12, 64, 91, 8]: 7.3 ms against 1.1 ms)
    p = torch.softmax(c.transpose(-1, -2), dim=-2).transpose(-1, -2)  # [..., nb, block]
    m = (F.one_hot(z.argmax(-1), block).to(p.dtype) + p - p.detach()).flatten(-2)[..., :f]  # [..., f]
    # h = relu(x W1) * m;  y = h W2
    h = F.relu(x @ W1) * m  # [..., f]
    return (h @ W2, h) if return_act else h @ W2


class TerraformerFFN(nn.Module):
    """Terraformer's sparse FFN (terraformer_ffn). W1 [d, f], W2 [f, d], controller M1 [d, rank],
    M2 [rank, f]: 2 d f + rank (d + f) parameters (GPT picks f with terraformer_width). In
    training mode each forward draws fresh Gumbel noise (scale tau) for the choice."""

    def __init__(self, d, f, block, rank, tau=0.1):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("f", f, 1)
        _check_int("block", block, 1, f)
        _check_int("rank", rank, 1)
        self.block, self.tau = block, tau
        self.W1, self.W2, self.M1, self.M2 = _param(d, f), _param(f, d), _param(d, rank), _param(rank, f)
        self.last_act = None

    def forward(self, x):  # [..., d] -> [..., d]
        noise = None
        if self.training:  # g = -log(-log u), u clamped so that g stays finite
            u = torch.rand(x.shape[:-1] + self.W2.shape[:1], dtype=x.dtype, device=x.device).clamp(1e-6, 1 - 1e-6)
            noise = -self.tau * torch.log(-torch.log(u))  # [..., f]
        y, h = terraformer_ffn(x, self.W1, self.W2, self.M1, self.M2, self.block, noise, return_act=True)
        self.last_act = h.detach()
        return y


# ------------------------------------------------------------------------------------------
# LTE, Learn To be Efficient (arXiv 2402.06126; notes/papers.md, "Other systems")
# ------------------------------------------------------------------------------------------


def _check_lte(x, Wg, Wu, Wd, Wr, n_experts, eta):
    """A gated FFN's shapes, 1 <= n_experts <= f, Wr [d, n_experts], 0 <= eta < 1."""
    _check_ffn_weights(x, Wg, Wu, Wd)
    _check_int("n_experts", n_experts, 1, Wg.shape[1])
    if Wr.shape != (x.shape[-1], n_experts):
        raise ValueError(f"Wr must be [d, n_experts] = {(x.shape[-1], n_experts)}, got {tuple(Wr.shape)}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be a number in [0, 1) (a sigmoid score threshold), got {eta!r}")


def lte_ffn_np(x, Wg, Wu, Wd, Wr, n_experts, eta):
    """LTE's FFN at inference, on a GELU-gated FFN.   x [..., d] -> (y [..., d], eff scalar)

    Neurons form n_experts contiguous experts I_i (sizes differ by at most one: the paper
    clusters a trained model's neurons, a model trained from scratch has no grouping to find).
        s = sigmoid(x Wr)                                   [..., E] independent scores
        y = sum over i with s_i > eta of (gelu(x Wg_I) * (x Wu_I)) Wd_I    (active experts only)
        eff = mean of s over tokens and experts             (the efficiency loss)
    """
    _check_lte(x, Wg, Wu, Wd, Wr, n_experts, eta)
    xs = x.reshape(-1, x.shape[-1])  # [M, d]
    # s = sigmoid(x Wr), as 0.5 (1 + tanh(z / 2)): no overflow for large |z|
    s = 0.5 * (1.0 + np.tanh(xs @ Wr / 2))  # [M, E]
    experts = np.array_split(np.arange(Wg.shape[1]), n_experts)  # E index arrays, contiguous
    y = np.zeros(xs.shape, np.result_type(xs, Wd))  # [M, d]
    for m in range(len(xs)):
        cols = np.concatenate([experts[i] for i in np.flatnonzero(s[m] > eta)] + [np.zeros(0, int)])
        # y = (gelu(x Wg_I) * (x Wu_I)) Wd_I over I, the neurons of the active experts
        y[m] = (gelu_np(xs[m] @ Wg[:, cols]) * (xs[m] @ Wu[:, cols])) @ Wd[cols]
    return y.reshape(x.shape), s.mean()


def lte_ffn(x, Wg, Wu, Wd, Wr, n_experts, eta, *, return_act=False):
    """Torch version of lte_ffn_np.   x [..., d] -> (y [..., d], eff scalar tensor with gradient)

    The paper trains in two stages: first soft routing, y = sum_i s_i E_i(x), with the
    efficiency loss; then a hard threshold, 1{s_i > eta}, with the router frozen. We fold them
    into one stage, a straight-through mask: m = 1{s > eta} + s - s.detach() has the value of
    the threshold (training runs the inference forward) and the gradient of the soft routing,
    so router and model train together with no stage switch. The paper's separability loss
    (scores away from eta) has no job left and is left out.
    return_act: also a = gelu(x Wg) * (x Wu) * m [..., f], zero outside the active experts.
    """
    _check_lte(x, Wg, Wu, Wd, Wr, n_experts, eta)
    f = Wg.shape[1]
    s = torch.sigmoid(x @ Wr)  # [..., E]
    m = (s > eta).to(s.dtype) + s - s.detach()  # [..., E] value 0/1, gradient ds
    # expert of each neuron: f // E + 1 neurons for the first f % E experts, f // E for the rest
    sizes = torch.tensor([f // n_experts + (i < f % n_experts) for i in range(n_experts)], device=x.device)
    # a = gelu(x Wg) * (x Wu) * m[expert(n)]
    a = F.gelu(x @ Wg, approximate="tanh") * (x @ Wu) * m[..., torch.repeat_interleave(sizes)]  # [..., f]
    return (a @ Wd, s.mean(), a) if return_act else (a @ Wd, s.mean())


class LteFFN(nn.Module):
    """LTE on a GELU-gated FFN (lte_ffn). Wg, Wu [d, f], Wd [f, d], router Wr [d, n_experts]:
    3 d f + d E parameters (E = f / 32 experts of the paper's 32 neurons: +1 %). The efficiency
    term of the last forward is left in `last_eff` (with its graph) for GPT.forward to add to
    the loss, weighted, as relu_l1's L1 term is."""

    def __init__(self, d, f, n_experts, eta=0.5):
        super().__init__()
        _check_int("d", d, 1)
        _check_int("f", f, 1)
        _check_int("n_experts", n_experts, 1, f)
        self.n_experts, self.eta = n_experts, eta
        self.Wg, self.Wu, self.Wd, self.Wr = _param(d, f), _param(d, f), _param(f, d), _param(d, n_experts)
        self.last_act = self.last_eff = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, self.last_eff, a = lte_ffn(x, self.Wg, self.Wu, self.Wd, self.Wr, self.n_experts, self.eta, return_act=True)
        self.last_act = a.detach()
        return y


# ------------------------------------------------------------------------------------------
# Polar Sparsity: selective head attention (arXiv 2505.14884; notes/papers.md, "Other systems")
# ------------------------------------------------------------------------------------------


def _check_polar(q, k, v, router_logits, h_top):
    """Attention shapes, router_logits [B, T, Hr] with Hr = H or Hkv, 1 <= h_top <= Hr -> U = H // Hr."""
    _check_attn_shapes(q, k, v)
    (B, H, T, _), Hkv = q.shape, k.shape[1]
    if router_logits.ndim != 3 or tuple(router_logits.shape[:2]) != (B, T) or router_logits.shape[2] not in (H, Hkv):
        raise ValueError(f"router_logits must be [B, T, H] (heads) or [B, T, Hkv] (KV groups) with B={B}, T={T}, "
                         f"H={H}, Hkv={Hkv}; got {tuple(router_logits.shape)}")
    _check_int("h_top", h_top, 1, router_logits.shape[2])
    return H // router_logits.shape[2]


def polar_attention_np(q, k, v, router_logits, h_top):
    """Selective head attention, causal, only the selected units computed.   -> [B, H, T, hd]

    q [B, H, T, hd], k v [B, Hkv, S, hd] (query i at position S - T + i), router_logits
    [B, T, Hr]. Each query token keeps the h_top units with the largest logits (ties: the lower
    index); a unit is a query head (Hr = H) or a KV group, its G query heads (Hr = Hkv: K and V
    of a group are read once for all of its heads, what a decode kernel wants). The heads of the
    other units output 0; the output projection then multiplies zeros (a kernel skips those rows).
    """
    U = _check_polar(q, k, v, router_logits, h_top)
    B, H, T, hd = q.shape
    S, G = k.shape[2], H // k.shape[1]
    out = np.zeros_like(q)  # [B, H, T, hd], 0 for every unselected head
    for b in range(B):
        for i in range(T):
            n = S - T + i + 1  # keys visible to query i
            for u in np.argsort(-router_logits[b, i], kind="stable")[:h_top]:  # the selected units
                for h in range(u * U, (u + 1) * U):  # their query heads
                    s = k[b, h // G, :n] @ q[b, h, i] / math.sqrt(hd)  # [n]
                    out[b, h, i] = softmax_np(s) @ v[b, h // G, :n]  # [hd]
    return out


def polar_keep(scores, h_top):
    """1.0 at the h_top largest scores of each row, else 0.0.   [..., Hr] -> [..., Hr]"""
    return torch.zeros_like(scores).scatter_(-1, torch.topk(scores, h_top, dim=-1).indices, 1.0)


def polar_attention(q, k, v, router_logits, h_top, *, dropout_p=0.0, return_dense=False):
    """Torch version of polar_attention_np, the training form.   -> [B, H, T, hd]

    Every head is computed (SDPA) and the unselected ones multiplied by 0: training needs all
    of them for the router's targets (PolarAttention); the split-KV decode kernel computes only
    the selected ones. No gradient reaches router_logits through the hard selection.
    return_dense: also every head's output before the selection, [B, H, T, hd].
    """
    U = _check_polar(q, k, v, router_logits, h_top)
    o = attention(q, k, v, causal=True, dropout_p=dropout_p)  # [B, H, T, hd]
    keep = polar_keep(router_logits.detach(), h_top).repeat_interleave(U, dim=-1)  # [B, T, H]
    out = o * keep.transpose(1, 2)[..., None].to(o.dtype)  # [B, H, T, hd]
    return (out, o) if return_dense else out


class PolarAttention(Attention):
    """Attention with a head router (polar_attention): Attention's weights plus router
    Linear(d, Hkv) with bias, (d + 1) Hkv parameters: it routes KV groups, h_top of Hkv per
    token (heads when Hkv = H, as the paper's multi-head models; groups under GQA, as its GQA
    kernel). K and V of every group are still computed and cached for every token (QKV stay
    dense): a group skipped at token t may be picked at t + 1 and needs t's keys.

    The router's recipe (the paper trains it on a frozen dense model to predict the heads with
    the largest outputs; we train both at once): target = 1 for the h_top groups whose G heads'
    outputs have the largest norm (all heads are computed anyway), 0 for the others, detached;
    `last_aux` = binary cross-entropy of the router's logits against it, which GPT.forward adds
    to the loss, weighted. The router reads x.detach(), so that loss trains the router only;
    the model trains through whichever heads the router keeps (in training as at inference).
    last_density = kept heads / H = h_top / Hkv.
    """

    def __init__(self, d, n_head, n_kv_head, head_dim, h_top, bias=False, dropout=0.0):
        super().__init__(d, n_head, n_kv_head, head_dim, bias=bias, dropout=dropout)
        _check_int("h_top", h_top, 1, n_kv_head)
        self.h_top = h_top
        self.router = nn.Linear(d, n_kv_head)  # bias: a group may be worth keeping for every token
        self.last_aux = None

    def forward(self, x, cache=None):  # [B, T, d] -> [B, T, d]
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cache)
        logits = self.router(x.detach())  # [B, T, Hkv]
        p = self.dropout if self.training else 0.0
        o, dense = polar_attention(q, k, v, logits, self.h_top, dropout_p=p, return_dense=True)
        # target: the h_top groups of largest output norm, sum over their G heads and hd of o^2
        norm2 = dense.detach().unflatten(1, (self.Hkv, -1)).square().sum((2, 4)).transpose(1, 2)  # [B, T, Hkv]
        self.last_aux = F.binary_cross_entropy_with_logits(logits, polar_keep(norm2, self.h_top))
        self.last_density = self.h_top / self.Hkv
        o = o.transpose(1, 2).reshape(B, T, self.H * self.hd)  # [B, T, H hd]
        return self.resid_drop(self.o_proj(o))  # [B, T, d]


# ------------------------------------------------------------------------------------------
# D2DMoE, Dense to Dynamic-k MoE (arXiv 2310.04361; notes/papers.md, "Other systems")
# ------------------------------------------------------------------------------------------
# Not a new pretraining but a conversion of a trained ReLU-gated FFN, y = (relu(x Wg) * (x Wu)) Wd:
#   1. group its f neurons into E experts of neurons that fire together (the paper's expert
#      clustering, after MoEfication);
#   2. train a small router to predict the norm of each expert's output, a regression with an
#      MSE loss (its expert norm prediction: no softmax, no top-k during training);
#   3. at inference run only the experts whose predicted norm is at least tau times the largest
#      one (its dynamic-k expert selection): a token with many active neurons gets many experts.
# The paper's first step, fine-tuning the dense model with a sparsity regulariser, is what
# ffn="relu_l1" (Sakana's L1) trains from the start: "relu" and "relu_l1" models both convert.
#
# Dimension letters as above, plus  E experts,  R router hidden width,  N sample tokens.
#
# Where the paper is silent (or we simplify), we choose:
# - groups is an int array [f], the expert of each neuron; experts need not be contiguous (a
#   kernel would permute the neurons once so that each expert is a slice; the math does not care).
# - Clustering: the paper clusters the first layer's weight vectors (MoEfication's balanced
#   k-means); we cluster what "fire together" means directly, the 0/1 patterns relu(x Wg) > 0 of
#   the neurons over N sample tokens, with a balanced k-means (sizes differ by at most one) whose
#   assignment is greedy, started from the neurons sorted by firing rate: deterministic, no seed.
# - Router: n = max(relu(x Wr1) Wr2, 0), two layers without biases (as our FFNs), R = d // 4
#   (+2.3 % parameters at d 128, f 512, E 16). Trained on the raw relu(x Wr1) Wr2 (a clamp would
#   stop the gradient of a negative guess); the clamp at 0 (a norm is never negative) makes
#   tau = 0 run every expert, the dense FFN exactly.
# - The executed experts' outputs are summed unweighted: the router only selects.
# - Adam, lr 1e-2, 300 steps of 1024 sample tokens, on the norms divided by their RMS (folded back
#   into Wr2 after); the samples are all collected from the dense model before any layer is
#   converted (each router sees its layer's dense inputs).
# - A token whose predictions are all <= 0 runs every expert (0 >= tau 0): the safe side; with the
#   scaling above, 0-6 % of the tokens of an L1-sparse tiny GPT's layers, none of a plain ReLU one.
# ------------------------------------------------------------------------------------------


def _check_d2dmoe(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau):
    """A gated FFN's shapes, Wr1 [d, R], Wr2 [R, E], groups int [f] in [0, E), 0 <= tau <= 1 -> E."""
    _check_ffn_weights(x, Wg, Wu, Wd)
    d, f, E = x.shape[-1], Wg.shape[1], Wr2.shape[-1]
    if Wr1.ndim != 2 or Wr2.ndim != 2 or Wr1.shape[0] != d or Wr2.shape[0] != Wr1.shape[1] or 0 in Wr2.shape:
        raise ValueError(f"router shapes: expected Wr1 [d, R], Wr2 [R, E] with d={d}, R, E >= 1; got "
                         f"Wr1 {tuple(Wr1.shape)}, Wr2 {tuple(Wr2.shape)}")
    if not isinstance(groups, (np.ndarray, torch.Tensor)) or groups.shape != (f,) or "int" not in str(groups.dtype) \
            or (f and not 0 <= int(groups.min()) <= int(groups.max()) < E):
        raise ValueError(f"groups must be an int array [f] = [{f}] of expert ids in [0, E) = [0, {E}), got "
                         f"{getattr(groups, 'dtype', type(groups).__name__)} {tuple(getattr(groups, 'shape', ()))}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1] (a fraction of the largest predicted norm), got {tau!r}")
    return E


def d2dmoe_ffn_np(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau):
    """D2DMoE's FFN at inference.   x [..., d] -> (y [..., d], keep [..., E] bool: the executed experts)

        n    = max(relu(x Wr1) Wr2, 0)                     [..., E] predicted expert output norms
        keep = n_e >= tau max_e n_e                        dynamic-k: at least one expert per token
        y    = sum over e with keep_e of (relu(x Wg_e) * (x Wu_e)) Wd_e     (only their neurons)
    Wg_e is Wg's columns, Wd_e Wd's rows, of the neurons i with groups[i] = e.
    """
    E = _check_d2dmoe(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau)
    xs = x.reshape(-1, x.shape[-1])  # [M, d]
    # n = max(relu(x Wr1) Wr2, 0)
    n = np.maximum(relu_np(xs @ Wr1) @ Wr2, 0.0)  # [M, E]
    # keep_e = n_e >= tau max_e n_e
    keep = n >= tau * n.max(-1, keepdims=True)  # [M, E]
    y = np.zeros(xs.shape, np.result_type(xs, Wd))  # [M, d]
    for m in range(len(xs)):
        cols = np.flatnonzero(keep[m][groups])  # the neurons of this token's executed experts
        # y = (relu(x Wg_I) * (x Wu_I)) Wd_I over I, those neurons
        y[m] = (relu_np(xs[m] @ Wg[:, cols]) * (xs[m] @ Wu[:, cols])) @ Wd[cols]
    return y.reshape(x.shape), keep.reshape(x.shape[:-1] + (E,))


def d2dmoe_ffn(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau, *, return_act=False):
    """Torch version of d2dmoe_ffn_np.   x [..., d] -> (y [..., d], keep [..., E] bool)

    Every neuron is computed and multiplied by the 0/1 mask of its expert (a kernel would read the
    executed experts' columns and rows only); no host sync. At tau = 0 the mask is all ones and
    the result is gated_ffn(..., "relu") bit for bit. No gradient reaches Wr1, Wr2 through the
    hard selection: the router learns by regression (d2dmoe_convert).
    return_act: also a = relu(x Wg) * (x Wu) * mask [..., f], zero outside the executed experts.
    """
    _check_d2dmoe(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau)
    # n = max(relu(x Wr1) Wr2, 0);  keep_e = n_e >= tau max_e n_e
    n = (F.relu(x @ Wr1) @ Wr2).detach().clamp_min(0.0)  # [..., E]
    keep = n >= tau * n.amax(-1, keepdim=True)  # [..., E]
    # a = relu(x Wg) * (x Wu) * keep[expert(i)];  y = a Wd
    a = F.relu(x @ Wg) * (x @ Wu) * keep[..., groups].to(x.dtype)  # [..., f]
    return (a @ Wd, keep, a) if return_act else (a @ Wd, keep)


class D2DMoEFFN(nn.Module):
    """A converted ReLU-gated FFN (d2dmoe_ffn): Wg, Wu [d, f], Wd [f, d], router Wr1 [d, R],
    Wr2 [R, E], and the buffer groups [f] (int64, saved with the weights): 3 d f + R (d + E)
    parameters. tau is a plain attribute, changed freely after conversion (the trade-off knob).
    After a forward: last_act (as the other FFNs) and last_keep [..., E], the executed experts."""

    def __init__(self, d, f, n_experts, hidden, tau=0.0):
        super().__init__()
        for name, value, hi in (("d", d, None), ("f", f, None), ("n_experts", n_experts, f), ("hidden", hidden, None)):
            _check_int(name, value, 1, hi)
        self.tau = tau
        self.Wg, self.Wu, self.Wd = _param(d, f), _param(d, f), _param(f, d)
        # router: fan-in scaled, so that relu(x Wr1) Wr2 starts O(|x|)
        self.Wr1, self.Wr2 = _param(d, hidden, std=d**-0.5), _param(hidden, n_experts, std=hidden**-0.5)
        # contiguous experts until d2dmoe_convert clusters (sizes differ by at most one)
        self.register_buffer("groups", torch.arange(f) * n_experts // f)
        self.last_act = self.last_keep = None

    def forward(self, x):  # [..., d] -> [..., d]
        y, keep, a = d2dmoe_ffn(x, self.Wg, self.Wu, self.Wd, self.groups, self.Wr1, self.Wr2, self.tau,
                                return_act=True)
        self.last_act, self.last_keep = a.detach(), keep
        return y


def d2dmoe_cluster(active, n_experts, iters=10):
    """Balanced k-means of the f neurons' activation patterns.   active [f, N] -> groups [f] int64

    Each neuron is a point, its 0/1 pattern over N tokens (1: it fired). Expert e holds
    f // E + (e < f % E) neurons. Start: neurons sorted by firing rate, cut into E runs. Then
    repeat: centroid c_e = mean pattern of expert e; assign greedily, the (neuron, expert) pairs
    taken in order of |p - c_e|^2, a pair accepted while the neuron is free and the expert not
    full; `iters` times. (The exact balanced assignment is a min-cost matching; the greedy one
    approximates it and need not settle: on the tiny GPT's layers 240-290 of 512 neurons move in
    the first pass, 2-18 in the tenth.)
    """
    f = active.shape[0]
    _check_int("n_experts", n_experts, 1, f)
    P = active.astype(np.float64)  # [f, N]
    cap = np.array([f // n_experts + (e < f % n_experts) for e in range(n_experts)])  # [E] sizes
    groups = np.empty(f, np.int64)
    groups[np.argsort(-P.mean(1), kind="stable")] = np.repeat(np.arange(n_experts), cap)  # [f]
    for _ in range(iters):
        C = np.stack([P[groups == e].mean(0) for e in range(n_experts)])  # [E, N] centroids
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 for every (neuron, expert) pair
        dist = (P * P).sum(1)[:, None] - 2 * P @ C.T + (C * C).sum(1)[None]  # [f, E]
        groups, room = np.full(f, -1), cap.copy()
        order = np.unravel_index(np.argsort(dist, axis=None, kind="stable"), dist.shape)  # pairs, nearest first
        for i, e in zip(order[0].tolist(), order[1].tolist()):
            if groups[i] < 0 and room[e] > 0:  # the nearest pair left whose neuron is free, expert not full
                groups[i], room[e] = e, room[e] - 1
    return groups


def d2dmoe_expert_norms(x, Wg, Wu, Wd, groups, n_experts):
    """The regression target: |(relu(x Wg_e) * (x Wu_e)) Wd_e|_2 of every expert.   x [N, d] -> [N, E]"""
    a = F.relu(x @ Wg) * (x @ Wu)  # [N, f]
    return torch.stack([(a[:, groups == e] @ Wd[groups == e]).norm(dim=-1) for e in range(n_experts)], -1)


def d2dmoe_convert(ffn, x_samples, n_experts, *, hidden=None, steps=300, lr=1e-2, tau=0.0, seed=0):
    """A trained ReLU-gated FFN (GatedFFN act "relu", or ReluL1FFN) -> D2DMoEFFN.   x_samples [..., d]

    Cluster the neurons on their firing over x_samples (d2dmoe_cluster), then train the router
    (R = hidden, default d // 4) to regress every expert's output norm: MSE, Adam, `steps` steps
    of 1024 samples drawn with `seed`. The FFN weights are copied unchanged.
    """
    if not (isinstance(ffn, GatedFFN) and ffn.act == "relu" or isinstance(ffn, ReluL1FFN)):
        raise TypeError(f"ffn must be a ReLU-gated FFN (GatedFFN act 'relu', or ReluL1FFN), got {ffn!r}")
    d, f = ffn.Wg.shape
    if not isinstance(x_samples, torch.Tensor) or x_samples.shape[-1:] != (d,) or x_samples.numel() == 0:
        raise ValueError(f"x_samples must be a tensor [..., d] = [..., {d}] with at least one token, got "
                         f"{tuple(getattr(x_samples, 'shape', ()))}")
    _check_int("steps", steps, 0)
    moe = D2DMoEFFN(d, f, n_experts, max(1, d // 4) if hidden is None else hidden, tau).to(ffn.Wg)
    x = x_samples.detach().reshape(-1, d).to(ffn.Wg)  # [N, d]
    with torch.no_grad():
        moe.Wg.copy_(ffn.Wg), moe.Wu.copy_(ffn.Wu), moe.Wd.copy_(ffn.Wd)
        moe.groups.copy_(torch.from_numpy(d2dmoe_cluster((x @ ffn.Wg > 0).T.cpu().numpy(), n_experts)))
        target = d2dmoe_expert_norms(x, ffn.Wg, ffn.Wu, ffn.Wd, moe.groups, n_experts)  # [N, E]
        # regress target / s, s its root mean square, then fold s into Wr2: the fan-in scaled router
        # starts O(1) as the scaled target is (an L1-sparse layer's norms are ~1e-2: unscaled, Adam
        # drove every prediction below 0, and the clamp then runs every expert)
        s = target.square().mean().sqrt().clamp_min(1e-30)
        gen = torch.Generator().manual_seed(seed)  # the router's init and minibatches: same seed, same router
        for w in (moe.Wr1, moe.Wr2):
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[0]))
    opt = torch.optim.Adam([moe.Wr1, moe.Wr2], lr=lr)
    for _ in range(steps):
        rows = torch.randint(len(x), (min(len(x), 1024),), generator=gen).to(x.device)  # a minibatch
        with torch.enable_grad():  # (also when called under no_grad)
            # loss = mean over tokens and experts of (relu(x Wr1) Wr2 - n_e(x) / s)^2
            loss = F.mse_loss(F.relu(x[rows] @ moe.Wr1) @ moe.Wr2, target[rows] / s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        moe.Wr2.mul_(s)  # predictions in the units of the norms again
    return moe


# ------------------------------------------------------------------------------------------
# 5. The configuration, the GPT, and the decode loop
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GPTConfig:
    """Everything that defines a model; plain values only, so asdict() round-trips.

    Defaults: the tiny model `python train_tiny.py` trains (nanoGPT's laptop sizes: 4 layers,
    4 heads, d 128, context 64), Spark FFN and Spark attention. train_tiny.py sets vocab_size
    from its tokenizer (84 is the character set of its Shakespeare corpus). Why density 0.2,
    kt 32 and l1 5e-3 rather than the papers' values: notes/papers.md, "Our choices where the
    papers are silent".
    """

    vocab_size: int = 84  # V: token ids 0 .. V-1
    block_size: int = 64  # longest context in tokens (learned position embeddings)
    n_layer: int = 4  # L: Transformer blocks
    n_head: int = 4  # H: query heads
    n_kv_head: int = 2  # Hkv: key/value heads; H % Hkv == 0 (2 of 4, as Gemma-2 2B's 4 of 8)
    d_model: int = 128  # d: residual stream width
    d_ff: int = 512  # f: GATED FFN width (4 d, Gemma-2's ratio); ffn="spark" uses round(1.5 * d_ff)
    ffn: str = "spark"  # one of FFN_KINDS
    ffn_density: float = 0.2  # k / f for topk, stat_topk and spark, in (0, 1] (Spark: 8 %)
    ffn_r: int | None = None  # r: predictor dims of the Spark FFN, in [1, d-1]; None -> d // 2
    attn: str = "spark"  # one of ATTN_KINDS
    attn_k: int = 32  # kt: tokens each query attends to at most (Spark: 256 of 8192; here 32 of 64)
    attn_r: int | None = None  # r: predictor dims of Spark attention, in [1, hd-1]; None -> hd // 2
    head_dim: int | None = None  # hd; None -> d_model // n_head (Gemma-2 2B needs 256 != 2304 / 8)
    l1: float = 5e-3  # lambda of ffn="relu_l1" (Sakana: 2e-5 at 1.5B)
    terra_block: int = 8  # Terraformer: neurons per block, one fires (paper: 32)
    terra_rank: int = 16  # Terraformer: controller rank (paper: 64)
    lte_experts: int | None = None  # LTE: experts E; None -> max(1, d_ff // 32), the paper's 32 neurons each
    lte_eta: float = 0.5  # LTE: an expert runs when sigmoid(x Wr) > eta (the paper's 0.5)
    lte_eff: float = 1e-2  # LTE: weight of the efficiency loss
    polar_top: int | None = None  # Polar: KV groups (heads when Hkv = H) kept per token; None -> max(1, Hkv // 2)
    polar_aux: float = 1.0  # Polar: weight of the router's loss (it trains the router only)
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = False  # biases in LayerNorms and attention projections (FFNs never have them)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "attn_k"):
            _check_int(name, getattr(self, name), 1)
        _check_choice("ffn", self.ffn, FFN_KINDS)
        _check_choice("attn", self.attn, ATTN_KINDS)
        if isinstance(self.ffn_density, bool) or not isinstance(self.ffn_density, (int, float)) \
                or not 0.0 < self.ffn_density <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"ffn_density must be a number in (0, 1], got {self.ffn_density!r}")
        if self.head_dim is None:
            if self.d_model % self.n_head != 0:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) "
                                 f"unless head_dim is given")
        else:
            _check_int("head_dim", self.head_dim, 1)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.ffn_r is not None:
            _check_int("ffn_r", self.ffn_r, 1, self.d_model - 1)
        elif self.ffn == "spark" and self.d_model < 2:
            raise ValueError("ffn='spark' needs d_model >= 2 (r in [1, d-1])")
        if self.attn_r is not None:
            _check_int("attn_r", self.attn_r, 1, self.hd - 1)
        elif self.attn == "spark" and self.hd < 2:
            raise ValueError(f"attn='spark' needs a head size >= 2 (r in [1, hd-1]), got {self.hd}")
        for name in ("l1", "lte_eff", "polar_aux"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _check_int("terra_block", self.terra_block, 1)
        _check_int("terra_rank", self.terra_rank, 1)
        if self.lte_experts is not None:
            _check_int("lte_experts", self.lte_experts, 1, self.d_ff)
        if isinstance(self.lte_eta, bool) or not isinstance(self.lte_eta, (int, float)) or not 0.0 <= self.lte_eta < 1.0:
            raise ValueError(f"lte_eta must be a number in [0, 1), got {self.lte_eta!r}")
        if self.polar_top is not None:
            _check_int("polar_top", self.polar_top, 1, self.n_kv_head)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {self.bias!r}")
        check_k(self.ffn_k, self.ffn_width)

    # Derived sizes (properties, not fields, so asdict() gives back exactly what was passed).
    @property
    def hd(self):
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def ffn_width(self):
        """f of this variant: d_ff, or round(1.5 d_ff) for Spark (two matrices instead of three), or
        Terraformer's width of equal parameters (terraformer_width)."""
        if self.ffn == "terraformer":
            return terraformer_width(self.d_model, self.d_ff, self.terra_rank, self.terra_block)
        return round(1.5 * self.d_ff) if self.ffn == "spark" else self.d_ff

    @property
    def ffn_k(self):
        """k = max(1, round(density * f)): at 8 % of 13824 that is 1106, as in the paper."""
        return max(1, round(self.ffn_density * self.ffn_width))

    @property
    def ffn_r_(self):
        return self.ffn_r if self.ffn_r is not None else self.d_model // 2

    @property
    def attn_r_(self):
        return self.attn_r if self.attn_r is not None else self.hd // 2

    @property
    def lte_experts_(self):
        return self.lte_experts or max(1, self.d_ff // 32)

    @property
    def polar_top_(self):
        return self.polar_top or max(1, self.n_kv_head // 2)


def make_ffn(c):
    """The FFN module of a config (all variants have 3 d f parameters, Spark up to rounding)."""
    if c.ffn in ("dense", "relu"):
        return GatedFFN(c.d_model, c.d_ff, "gelu" if c.ffn == "dense" else "relu")
    if c.ffn in ("topk", "stat_topk"):
        return TopkFFN(c.d_model, c.d_ff, c.ffn_k, "exact" if c.ffn == "topk" else "statistical")
    if c.ffn == "spark":
        return SparkFFN(c.d_model, c.ffn_width, c.ffn_k, c.ffn_r_)
    if c.ffn == "terraformer":
        return TerraformerFFN(c.d_model, c.ffn_width, c.terra_block, c.terra_rank)
    if c.ffn == "lte":
        return LteFFN(c.d_model, c.d_ff, c.lte_experts_, c.lte_eta)
    return ReluL1FFN(c.d_model, c.d_ff)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + ffn(ln(x)).   [B, T, d] -> [B, T, d]"""

    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, bias=c.bias)
        if c.attn == "spark":
            self.attn = SparkAttention(c.d_model, c.n_head, c.n_kv_head, c.hd, c.attn_k, c.attn_r_, c.bias, c.dropout)
        elif c.attn == "polar":
            self.attn = PolarAttention(c.d_model, c.n_head, c.n_kv_head, c.hd, c.polar_top_, c.bias, c.dropout)
        else:
            self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.hd, c.bias, c.dropout)
        self.ln_2 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.ffn = make_ffn(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.drop(self.ffn(self.ln_2(x)))


def sample_next(logits, temperature, top_k):
    """Draw the next token from logits [B, V] -> [B, 1] (int64).

    temperature 0 = greedy (argmax); otherwise softmax(logits / temperature), restricted to the
    top_k most likely tokens when top_k is given (nanoGPT's sampling).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # [B, 1]
    lg = logits / temperature  # [B, V]
    if top_k is not None:
        kth = torch.topk(lg, top_k, dim=-1).values[:, -1:]  # [B, 1] the top_k-th largest logit
        lg = lg.masked_fill(lg < kth, -math.inf)
    return torch.multinomial(torch.softmax(lg, dim=-1), 1)  # [B, 1]


def _check_idx(idx, V):
    """Token ids: an int64/int32 tensor [B, T], B and T >= 1, every id in [0, V)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
        raise TypeError(f"idx must be an int64 or int32 tensor [B, T], got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx must hold at least one token in at least one row, got shape {tuple(idx.shape)}")
    if idx.min() < 0 or idx.max() >= V:
        raise ValueError(f"idx must hold token ids in [0, {V}), got min {int(idx.min())}, max {int(idx.max())}")


def check_generate_args(config, idx, max_new_tokens, temperature, top_k):
    """The arguments of a decoder (GPT.generate, kernels_cpu.generate_cpu); errors name the argument."""
    _check_idx(idx, config.vocab_size)
    _check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        _check_int("top_k", top_k, 1, config.vocab_size)


def decode_loop(prefill, step, idx, max_new_tokens, temperature, top_k, block_size, return_logits=False):
    """Append max_new_tokens sampled tokens to idx [B, T] -> [B, T + max_new_tokens].

    prefill(window [B, T'], T' <= block_size) -> logits [B, V] of the last position; it (re)builds
    the caches from scratch. step(tok [B, 1], n) -> logits [B, V] runs one new token at position n
    against the n cached tokens. While the cache has room we step; when it is full we do what
    nanoGPT does, condition on the last block_size tokens, which with absolute positions means
    prefilling them again. return_logits: also the logits each new token was drawn from, [B, new, V].
    """
    logits = prefill(idx[:, -block_size:])  # [B, V]
    n = min(idx.shape[1], block_size)  # tokens in the cache
    drawn_from = []
    for i in range(max_new_tokens):
        drawn_from.append(logits)
        nxt = sample_next(logits, temperature, top_k)  # [B, 1]
        idx = torch.cat([idx, nxt], dim=1)  # [B, T + i + 1]
        if i == max_new_tokens - 1:
            break
        if n < block_size:
            logits = step(nxt, n)  # one token against the cache
            n += 1
        else:
            logits = prefill(idx[:, -block_size:])  # the window slid: rebuild
    if not return_logits:
        return idx
    if not drawn_from:
        return idx, logits.new_zeros(idx.shape[0], 0, logits.shape[-1])
    return idx, torch.stack(drawn_from, dim=1)  # [B, new, V]


class GPT(nn.Module):
    """A small GPT whose FFN and attention are chosen by GPTConfig.ffn / .attn.

    model(idx, targets=None) -> (logits [B, T, V], loss or None)
    loss = cross-entropy (targets -1 are ignored) + l1 * mean over layers of the L1 term (relu_l1),
    + lte_eff * mean efficiency term (lte), + polar_aux * mean router loss (polar).
    """

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)  # [V, d], tied with the output head
        self.wpe = nn.Embedding(c.block_size, c.d_model)  # [block_size, d]
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model, bias=c.bias)
        # nanoGPT's initialisation: N(0, 0.02) everywhere (the FFN Parameters already are), zero
        # biases, and the projections that write into the residual stream scaled by 1/sqrt(2 L)
        # so the stream's variance does not grow with depth.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        out_std = 0.02 / math.sqrt(2 * c.n_layer)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.o_proj.weight, std=out_std)
            nn.init.normal_(getattr(blk.ffn, {"spark": "V", "terraformer": "W2"}.get(c.ffn, "Wd")), std=out_std)

    def num_params(self):
        """Parameter count (the tied embedding once)."""
        return sum(p.numel() for p in self.parameters())

    def _run(self, idx, caches=None):
        """idx [B, T] -> logits [B, T, V]. With caches (one dict per layer) positions continue
        after the cached tokens and the caches are extended."""
        B, T = idx.shape
        start = caches[0]["k"].shape[2] if caches is not None and "k" in caches[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # [T]
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, d]
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])  # [B, T, d]
        return self.ln_f(x) @ self.wte.weight.T  # [B, T, V]  (tied output head)

    def forward(self, idx, targets=None):
        _check_idx(idx, self.config.vocab_size)
        logits = self._run(idx)  # [B, T, V]
        if targets is None:
            return logits, None
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
            raise ValueError(f"targets must be a tensor of idx's shape {tuple(idx.shape)}, "
                             f"got {tuple(getattr(targets, 'shape', ()))}")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        if self.config.ffn == "relu_l1":
            # Sakana: loss = CE + lambda * (sum_f |h| averaged over tokens, then over layers)
            l1 = torch.stack([blk.ffn.last_l1 for blk in self.blocks]).mean()
            loss = loss + self.config.l1 * l1
        # LTE's efficiency term and Polar's router loss join the loss the same way (mean over layers)
        if self.config.ffn == "lte":
            loss = loss + self.config.lte_eff * torch.stack([blk.ffn.last_eff for blk in self.blocks]).mean()
        if self.config.attn == "polar":
            loss = loss + self.config.polar_aux * torch.stack([blk.attn.last_aux for blk in self.blocks]).mean()
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, *, return_logits=False):
        """Append max_new_tokens sampled tokens to idx [B, T] -> [B, T + max_new_tokens] (decode_loop).

        Each new token runs one query through every layer against the KV cache (for Spark
        attention: the decode path, K2 and V of kt tokens only). temperature 0 = greedy.
        Call model.eval() first if the model has dropout.
        """
        check_generate_args(self.config, idx, max_new_tokens, temperature, top_k)
        caches = []

        def prefill(window):  # [B, T'] -> [B, V], fresh caches
            caches[:] = [{} for _ in self.blocks]
            return self._run(window, caches)[:, -1]

        def step(tok, n):  # [B, 1] at position n -> [B, V]
            return self._run(tok, caches)[:, -1]

        return decode_loop(prefill, step, idx, max_new_tokens, temperature, top_k, self.config.block_size,
                           return_logits)

    def stats(self):
        """Per layer, the achieved densities of the last forward (host floats; syncs here, not in forward).

        ffn_density: fraction of FFN activations that are nonzero (what a sparse kernel would use).
        attn_density: fraction of visible (query, key) pairs that got weight (1.0 for dense).
        """
        def frac(a):  # nonzero fraction of the last FFN activation
            return None if a is None else float(torch.count_nonzero(a) / a.numel())

        return {"ffn_density": [frac(b.ffn.last_act) for b in self.blocks],
                "attn_density": [None if b.attn.last_density is None else float(b.attn.last_density) for b in self.blocks]}


def check_decoder_args(where, model, idx, max_new_tokens, temperature, top_k):
    """What a decoder outside GPT (kernels_cpu.generate_cpu, kernels_gpu.generate_gpu) checks
    first: a spark.GPT, not training with dropout, without Polar attention, and check_generate_args's
    arguments."""
    if not isinstance(model, GPT):
        raise TypeError(f"{where}: model must be a spark.GPT, got {type(model).__name__}")
    check_generate_args(model.config, idx, max_new_tokens, temperature, top_k)
    if model.training and model.config.dropout > 0:
        raise ValueError(f"{where}: model is in training mode with dropout; call model.eval() first")
    if model.config.attn == "polar":  # (the kernel decoders know dense and Spark attention only)
        raise ValueError(f"{where}: Polar attention has no decoder here; use model.generate")


# ------------------------------------------------------------------------------------------
# 6. Cost accounting: per-token FLOPs and bytes read when decoding one token
#    (notes/papers.md, "Spark FFN", "Spark attention", "Spark's headline results"). Counted:
#    matmuls (a multiply-add = 2 FLOPs) and the weights and KV entries a decode step must read.
#    Not counted: norms, activations, softmax, the top-k itself (all O(f) or O(n) elementwise,
#    small beside the matmuls) and the embedding lookup.
# ------------------------------------------------------------------------------------------


def count_params(c):
    """Parameters of GPT(c), by arithmetic (so we can count Gemma-2 2B without building it)."""
    d, hd = c.d_model, c.hd
    ln = d * (2 if c.bias else 1)
    attn = d * hd * (2 * c.n_head + 2 * c.n_kv_head) + (hd * (c.n_head + 2 * c.n_kv_head) + d if c.bias else 0)
    attn += (d + 1) * c.n_kv_head if c.attn == "polar" else 0  # its router
    ffn = (2 if c.ffn in ("spark", "terraformer") else 3) * d * c.ffn_width
    ffn += {"terraformer": c.terra_rank * (d + c.ffn_width), "lte": d * c.lte_experts_}.get(c.ffn, 0)  # controller, router
    return c.vocab_size * d + c.block_size * d + c.n_layer * (2 * ln + attn + ffn) + ln


def count_costs(c, n_ctx, bytes_per_el=2, relu_l1_density=None):
    """Costs of decoding one token that attends to n_ctx tokens (itself included).

    Returns a dict of per-token numbers: FLOPs (ffn, attention projections, attention mixing,
    per layer and for the whole model with and without the LM head) and bytes read (weights,
    KV cache). bytes_per_el: 2 for bf16 (ratios do not depend on it).
    What a sparse variant is credited with (the decode kernels of notes/papers.md, "Spark FFN" and
    "Spark attention"):
      topk / stat_topk: gate dense (d f), then up and down for k neurons only (2 k d)
      spark FFN:        predictor dense (r f), then K2 and V for k neurons only (k (d-r) + k d)
      relu_l1:          like topk at the density you measured (relu_l1_density); None -> dense
      terraformer:      the controller (r (d + f)), then one column of W1 and one row of W2 per block
      lte:              counted dense plus its router (its density is only known after training)
      spark attention:  K1 of all n tokens (n r), then K2 and V of the kt kept tokens
      polar attention:  q, k, v and the router dense; mixing and o_proj for the kept heads only
    With grouped-query heads the G query heads of a KV head pick their tokens independently,
    so the K2/V rows a KV head must read are the union of G selections: we count the worst
    case, min(n, G kt) rows ("kv_bytes"), and give the best case, kt rows, as "kv_bytes_best".
    """
    if not isinstance(c, GPTConfig):
        raise TypeError(f"c must be a GPTConfig, got {type(c).__name__}")
    _check_int("n_ctx", n_ctx, 1)
    d, f, hd, H, Hkv, L, n = c.d_model, c.ffn_width, c.hd, c.n_head, c.n_kv_head, c.n_layer, n_ctx
    G = H // Hkv
    # --- FFN: weight elements read per token (= multiply-adds) -------------------------------
    if c.ffn in ("dense", "relu"):
        ffn_w = 3 * d * f  # Wg, Wu, Wd
    elif c.ffn in ("topk", "stat_topk"):
        ffn_w = d * f + 2 * c.ffn_k * d  # all of Wg; k columns of Wu, k rows of Wd
    elif c.ffn == "spark":
        r, k = c.ffn_r_, c.ffn_k
        ffn_w = r * f + k * (d - r) + k * d  # K1 dense; k columns of K2, k rows of V
    elif c.ffn == "terraformer":
        ffn_w = c.terra_rank * (d + f) + 2 * d * -(-f // c.terra_block)  # M1, M2; a W1 column, a W2 row per block
    elif c.ffn == "lte":
        ffn_w = 3 * d * f + d * c.lte_experts_  # all experts, and the router Wr
    else:  # relu_l1
        if relu_l1_density is None:
            ffn_w = 3 * d * f
        else:
            if not 0.0 < relu_l1_density <= 1.0:
                raise ValueError(f"relu_l1_density must be in (0, 1], got {relu_l1_density}")
            ffn_w = d * f + 2 * round(relu_l1_density * f) * d
    # --- attention projections: q, k, v, o -----------------------------------------------------
    proj_w = d * hd * (2 * H + 2 * Hkv)
    if c.attn == "polar":  # kept heads Hk: o_proj reads their rows only; the router reads d Hkv
        Hk = c.polar_top_ * G
        proj_w = d * hd * (H + 2 * Hkv + Hk) + d * Hkv
    # --- attention mixing: scores and weighted sum over the cache --------------------------------
    if c.attn == "dense":
        mix_flops = H * (2 * n * hd + 2 * n * hd)  # q.K_j and sum_j w_j V_j for n keys, per head
        kv_el = kv_el_best = Hkv * 2 * n * hd  # K and V of every cached token, per KV head
    elif c.attn == "polar":
        mix_flops = Hk * 4 * n * hd  # dense attention for the kept heads only
        kv_el = kv_el_best = c.polar_top_ * 2 * n * hd  # K and V of the kept KV groups
    else:
        r, kt = c.attn_r_, min(c.attn_k, n)
        mix_flops = H * (2 * n * r + 2 * kt * (hd - r) + 2 * kt * hd)  # K1 scores; K2 gate and V for kt
        kv_el = Hkv * (n * r + min(n, G * kt) * (2 * hd - r))  # K1 all; K2 and V of the union
        kv_el_best = Hkv * (n * r + kt * (2 * hd - r))  # all G heads chose the same kt tokens
    layer_flops = 2 * ffn_w + 2 * proj_w + mix_flops
    head_flops = 2 * d * c.vocab_size  # logits (tied embedding)
    weight_el = L * (ffn_w + proj_w) + c.vocab_size * d
    return {
        "n_ctx": n,
        "ffn_flops": 2 * ffn_w,  # per layer
        "attn_proj_flops": 2 * proj_w,  # per layer
        "attn_mix_flops": mix_flops,  # per layer
        "layer_flops": layer_flops,  # per layer
        "lm_head_flops": head_flops,
        "layers_flops": L * layer_flops,  # whole model without the LM head
        "total_flops": L * layer_flops + head_flops,
        "ffn_weight_bytes": L * ffn_w * bytes_per_el,
        "weight_bytes": weight_el * bytes_per_el,  # incl. attention projections and LM head
        "kv_bytes": L * kv_el * bytes_per_el,  # worst case over GQA unions
        "kv_bytes_best": L * kv_el_best * bytes_per_el,
        "decode_bytes": (weight_el + L * kv_el) * bytes_per_el,
        "params": count_params(c),
    }


# ------------------------------------------------------------------------------------------
# 6b. D2DMoE on a whole trained GPT (section 4b has the layer): convert every FFN, then measure
#     the loss against the compute each tau leaves (train_tiny.py --d2dmoe prints it for a checkpoint)
# ------------------------------------------------------------------------------------------


def _windows(tokens, n, T, gen):
    """n random windows of T + 1 tokens of a 1-D token stream -> inputs [n, T], targets [n, T]."""
    w = tokens[torch.randint(len(tokens) - T, (n,), generator=gen)[:, None] + torch.arange(T + 1)]  # [n, T + 1]
    return w[:, :-1], w[:, 1:]


def _check_gpt(model, tokens):
    """A GPT whose FFNs are ReLU-gated or converted, and a 1-D int token stream longer than its context."""
    if not isinstance(model, GPT) or model.config.ffn not in ("relu", "relu_l1"):
        raise ValueError(f"model must be a spark.GPT with ffn 'relu' or 'relu_l1', got "
                         f"{type(model).__name__} {getattr(getattr(model, 'config', None), 'ffn', '')!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point() \
            or len(tokens) <= model.config.block_size:
        raise ValueError(f"tokens must be a 1-D int tensor longer than block_size {model.config.block_size}, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")


@torch.no_grad()
def d2dmoe_convert_gpt(model, tokens, n_experts, *, batches=8, batch_size=16, seed=0, **convert_args):
    """Convert every FFN of a trained spark.GPT (ffn "relu" or "relu_l1") in place; returns the model.

    Forward hooks collect each FFN's inputs over batches x batch_size random windows of tokens
    (the training split, [N]); every layer is then converted (d2dmoe_convert) from its dense
    inputs. model.config is left as it is (GPTConfig has no D2DMoE kind): evaluate with
    model(idx) and the cross-entropy of its logits, as d2dmoe_tradeoff does.
    """
    _check_gpt(model, tokens)
    model.eval()
    inputs = [[] for _ in model.blocks]  # per layer, the [B, T, d] inputs of its FFN
    hooks = [b.ffn.register_forward_hook(lambda m, args, out, i=i: inputs[i].append(args[0]))
             for i, b in enumerate(model.blocks)]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        model(_windows(tokens, batch_size, model.config.block_size, gen)[0].to(model.wte.weight.device))
    for h in hooks:
        h.remove()
    for b, xs in zip(model.blocks, inputs):
        b.ffn = d2dmoe_convert(b.ffn, torch.cat(xs), n_experts, seed=seed, **convert_args)
    return model


@torch.no_grad()
def d2dmoe_tradeoff(model, tokens, taus=(0.0, 0.1, 0.3, 0.5), *, batches=8, batch_size=16, seed=1):
    """For every tau: validation loss and compute of a converted GPT.   tokens: the val split [N]

    Returns one dict per tau: loss (mean cross-entropy, nats/token, over the same windows for
    every tau), executed (fraction of the FFN neurons in executed experts, over tokens and
    layers: what a D2DMoE kernel computes), experts (executed per token), nonzero (fraction of
    nonzero activations, GPT.stats), flops (FFN multiply-adds per token, the router's included,
    over the dense FFN's 3 d f). Every layer's tau is left at the last value.
    """
    _check_gpt(model, tokens)
    ffns = [b.ffn for b in model.blocks]
    if not all(isinstance(m, D2DMoEFFN) for m in ffns):
        raise ValueError("model has FFNs that are not D2DMoEFFN: run d2dmoe_convert_gpt first")
    # the router's multiply-adds per token, d R + R E, over the dense FFN's 3 d f
    router = np.mean([(m.Wr1.numel() + m.Wr2.numel()) / (3 * m.Wg.numel()) for m in ffns])
    model.eval()
    rows = []
    for tau in taus:
        gen, acc = torch.Generator().manual_seed(seed), []
        for m in ffns:
            m.tau = tau
        for _ in range(batches):
            x, y = (t.to(model.wte.weight.device) for t in _windows(tokens, batch_size, model.config.block_size, gen))
            loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
            # executed neurons per token = keep [..., E] @ expert sizes [E]; means over tokens, then layers
            ex = [(m.last_keep.float() @ m.groups.bincount(minlength=m.Wr2.shape[1]).float()).mean().item()
                  / len(m.groups) for m in ffns]
            k = [m.last_keep.sum(-1).float().mean().item() for m in ffns]
            acc.append([loss, np.mean(ex), np.mean(k), np.mean(model.stats()["ffn_density"])])
        loss, ex, k, nz = np.mean(acc, axis=0)
        rows.append(dict(tau=tau, loss=loss, executed=ex, experts=k, nonzero=nz, flops=ex + router))
    return rows


def gemma2_2b_config(**over):
    """Gemma-2 2B shapes (arXiv 2408.00118): d 2304, 26 layers, 8 heads / 4 KV heads of 256,
    gated f 9216, vocabulary 256000, context 8192; Spark settings of the paper."""
    kw = dict(vocab_size=256000, block_size=8192, n_layer=26, n_head=8, n_kv_head=4, head_dim=256, d_model=2304,
              d_ff=9216, ffn="dense", ffn_density=0.08, ffn_r=1024, attn="dense", attn_k=256, attn_r=128)
    return GPTConfig(**{**kw, **over})


def cost_table(c, n_ctxs):
    """Rows comparing config c made dense (GeGLU, softmax attention) with c made Spark (FFN and attention)."""
    dense = dataclasses.replace(c, ffn="dense", attn="dense")
    spark = dataclasses.replace(c, ffn="spark", attn="spark")
    rows = []
    for n in n_ctxs:
        a, b = count_costs(dense, n), count_costs(spark, n)
        rows.append({"n_ctx": n, "dense": a, "spark": b,
                     "ffn_ratio": a["ffn_flops"] / b["ffn_flops"],
                     "attn_ratio": a["attn_mix_flops"] / b["attn_mix_flops"],
                     "layers_ratio": a["layers_flops"] / b["layers_flops"],
                     "total_ratio": a["total_flops"] / b["total_flops"],
                     "bytes_ratio": a["decode_bytes"] / b["decode_bytes"],
                     "bytes_ratio_best": a["decode_bytes"] / (b["decode_bytes"] - b["kv_bytes"] + b["kv_bytes_best"]),
                     "kv_ratio": a["kv_bytes"] / b["kv_bytes"]})
    return dense, spark, rows


def _si(x):
    """x with an SI prefix, 3 digits: 2.12e6 -> '2.12M' (the first unit x reaches, else none)."""
    units = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
    return next((f"{x / u:.3g}{s}" for u, s in units if abs(x) >= u), f"{x:.3g}")


def print_cost_table(name, c, n_ctxs):
    dense, spark, rows = cost_table(c, n_ctxs)
    print(f"== {name}: d {c.d_model}, {c.n_layer} layers, {c.n_head} heads / {c.n_kv_head} KV heads of {c.hd}, "
          f"vocab {c.vocab_size} ==")
    print(f"dense: gated FFN f {c.d_ff}, full attention | Spark: FFN f {spark.ffn_width}, r {spark.ffn_r_}, "
          f"k {spark.ffn_k} ({spark.ffn_k / spark.ffn_width:.1%}); attention kt {spark.attn_k}, r {spark.attn_r_}")
    pd, ps = count_params(dense), count_params(spark)
    print(f"parameters: dense {_si(pd)}, Spark {_si(ps)} (Spark/dense {ps / pd:.5f})")
    fw_d, fw_s = rows[0]["dense"]["ffn_flops"] / 2, rows[0]["spark"]["ffn_flops"] / 2
    print(f"FFN per token and layer: {_si(2 * fw_d)} vs {_si(2 * fw_s)} FLOPs, {_si(fw_d)} vs {_si(fw_s)} weights read "
          f"-> {rows[0]['ffn_ratio']:.2f}x fewer (FLOPs and bytes)")
    print("per decoded token (FLOPs: 2 per multiply-add; bytes: bf16 weights + KV cache read; "
          "Spark KV: worst case over GQA unions, best case in brackets)")
    hdr = (f"{'n_ctx':>6} | {'attn mix ratio':>14} | {'FLOPs dense':>11} {'Spark':>7} {'ratio':>6} | "
           f"{'no LM head':>10} | {'bytes dense':>11} {'Spark':>7} {'ratio':>6} {'(best)':>7} | {'KV ratio':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for row in rows:
        a, b = row["dense"], row["spark"]
        print(f"{row['n_ctx']:>6} | {row['attn_ratio']:>13.2f}x | {_si(a['total_flops']):>11} {_si(b['total_flops']):>7} "
              f"{row['total_ratio']:>5.2f}x | {row['layers_ratio']:>9.2f}x | {_si(a['decode_bytes']) + 'B':>11} "
              f"{_si(b['decode_bytes']) + 'B':>7} {row['bytes_ratio']:>5.2f}x {'(' + format(row['bytes_ratio_best'], '.2f') + 'x)':>7} | "
              f"{row['kv_ratio']:>7.2f}x")
    # A training or prefill sequence of N tokens has one token at every position 1..N: its mean
    # cost per token is the sum over positions divided by N (the ideal sparse count; our torch
    # training path computes every pair and masks, see spark_attention).
    N = c.block_size
    ratio = {key: sum(count_costs(dense, n)[key] for n in range(1, N + 1)) /
             sum(count_costs(spark, n)[key] for n in range(1, N + 1)) for key in ("total_flops", "layers_flops")}
    print(f"mean over the {N} positions of one {N}-token sequence (training / prefill): FLOPs "
          f"{ratio['total_flops']:.2f}x fewer, {ratio['layers_flops']:.2f}x without the LM head\n")


def main(argv=None):
    import argparse

    argparse.ArgumentParser(description="Dense vs Spark costs per decoded token (count_costs).").parse_args(argv)
    print('Dense vs Spark, cost per decoded token (count_costs in spark.py; notes/papers.md, "Spark FFN")\n')
    print_cost_table("Gemma-2 2B shapes", gemma2_2b_config(), [256, 1024, 2048, 4096, 8192])
    print_cost_table("the tiny default (the model python train_tiny.py trains)", GPTConfig(), [8, 16, 32, 64])
    print("Paper: 2.5x fewer FLOPs (8 % FFN, <= 256 tokens); FFN weight-byte limit at Gemma-2 2B shapes: 3.52x.")


if __name__ == "__main__":
    main()
