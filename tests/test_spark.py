"""Tests for spark.py: every torch layer against its NumPy reference, and the GPT's properties.

Tolerances. The torch functions and the NumPy references do the same arithmetic in float64 in a
different order (BLAS blocking, fused softmax), so they differ by a few ulps of the largest
intermediate: we allow atol 1e-12 and rtol 1e-10 on outputs of size ~1, about 1e4 ulps of
margin. A wrong mask, scale or selection moves outputs by far more than that (1e-3 and up).
Statistical top-k compares each entry with a threshold computed in a different order; an entry
that flips sits within ~1e-16 of theta and, the threshold being soft, contributes ~1e-16.
(tests/conftest.py runs every test with one torch thread and fixed seeds.)

Independent checks. A NumPy reference written from the same reading of a paper would share a
misreading with the torch code, so several tests check a property instead of a second copy of
the formula: with V = I an attention output row *is* its weight vector, so we can read off which
keys were kept; a KV-cache decode must give the logits of a plain forward without a cache; a
fake model with one-hot logits traces decode_loop's calls; the L1 loss term is recomputed from
each layer's real input (forward hooks); count_costs is checked against arithmetic written out
by hand.
"""

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from conftest import assert_close
import spark
from spark import GPT, Attention, GatedFFN, GPTConfig, ReluL1FFN, SparkAttention, SparkFFN, TopkFFN
from spark import attention, attention_np, count_costs, count_params, gated_ffn, gated_ffn_np, relu_l1_ffn
from spark import relu_l1_ffn_np, spark_attention, spark_attention_np, spark_ffn, spark_ffn_np, topk_ffn, topk_ffn_np

F64 = dict(atol=1e-12, rtol=1e-10)  # float64 vs float64 reference (module docstring)


def np64(t):
    """A tensor as a float64 NumPy array (for the references)."""
    return t.detach().numpy().astype(np.float64)


def tiny(**over):
    """A very small config for behaviour tests: 2 layers, d 32, hd 8, kt 5 (< most sequence lengths),
    dense FFN and attention unless overridden, density 8 %."""
    kw = dict(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, ffn="dense",
              ffn_density=0.08, attn="dense", attn_k=5, l1=3e-4)
    kw.update(over)
    return GPTConfig(**kw)


def model64(**over):
    """tiny(**over) in float64, eval mode, seeded weights."""
    torch.manual_seed(0)
    return GPT(tiny(**over)).double().eval()


ALL_VARIANTS = [(ffn, attn) for ffn in spark.FFN_KINDS for attn in spark.ATTN_KINDS]


# ------------------------------------------------------------------------------------------
# FFN functions and modules vs NumPy, float64, awkward shapes
# ------------------------------------------------------------------------------------------

# (d, f, leading shape). Odd d and f = 37, 9, 21, 11 (not multiples of 8) keep the matmuls off
# their tidy blocked sizes; f = 1 makes k = f for every k, the path where top-k keeps everything;
# (2, 3) carries two leading axes through; (1,) is a single token; (0,) is a call with no
# tokens, which must give an empty [0, d] result rather than an error from a reduction over
# nothing.
FFN_SHAPES = [(13, 37, (5,)), (7, 9, (2, 3)), (16, 1, (4,)), (10, 21, (1,)), (6, 11, (0,))]


def _ffn_weights(d, f):
    """Wg, Wu [d, f] and Wd [f, d], scaled by 1/sqrt(fan-in) so that outputs are O(1)."""
    # seeded by the shape: each case has its own weights, and a rerun has the same ones
    rng = np.random.default_rng(d * 100 + f)
    x = lambda *s: rng.standard_normal(s)  # noqa: E731
    return x(d, f) / math.sqrt(d), x(d, f) / math.sqrt(d), x(f, d) / math.sqrt(f)


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gated_ffn_matches_numpy(d, f, lead, act):
    """gated_ffn (GeGLU and ReLU-gated) equals gated_ffn_np in float64 at awkward shapes, zero tokens included."""
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    # F64 is the right scale: each output is two short sums of O(1) products, rounded ~1e-16
    # each. It also pins the GELU: the erf GELU and the tanh approximation we use differ by up
    # to 5e-4 per activation, so a torch side using F.gelu's default (erf) fails by far.
    ref = gated_ffn_np(x, Wg, Wu, Wd, act)
    got = gated_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)), act)
    assert_close(f"gated_ffn {act} d={d} f={f}", got, ref, **F64)


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
@pytest.mark.parametrize("method", ["exact", "statistical"])
def test_topk_ffn_matches_numpy(d, f, lead, method):
    """topk_ffn equals topk_ffn_np (exact and statistical) for k = 1, a middle k and k = f, and
    k < f really changes the output (the top-k is not silently skipped)."""
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    # k = 1 is the sparsest case, k = f takes the k == D early return of topk.py (nothing is
    # dropped), a middle k is the ordinary case. Exact: random float64 gates have no ties, so
    # both sides keep the same set. Statistical: theta is computed in two orders, and a gate
    # within ~1e-16 of it may survive on one side only; the soft threshold makes that entry
    # ~1e-16 either way, inside F64.
    for k in sorted({1, max(1, f // 3), f}):  # k = 1, a middle k, k = f (no sparsity)
        ref = topk_ffn_np(x, Wg, Wu, Wd, k, method)
        got = topk_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)), k, method)
        assert_close(f"topk_ffn {method} d={d} f={f} k={k}", got, ref, **F64)
    # A reference and a torch version that both forgot the top-k would agree with each other;
    # against the dense GeGLU, keeping 1 of f gates moves y by 0.4 or more here, far above the
    # 1e-3 bar.
    # Skipped where there is nothing to drop (f = 1) or nothing to compare (no tokens).
    if f > 1 and lead[0] > 0:
        # k < f must really sparsify: y differs from the dense GeGLU
        dense = gated_ffn_np(x, Wg, Wu, Wd, "gelu")
        assert np.abs(topk_ffn_np(x, Wg, Wu, Wd, 1, method) - dense).max() > 1e-3


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
def test_spark_ffn_matches_numpy(d, f, lead):
    """spark_ffn equals spark_ffn_np for r = 1, d/2, d - 1 and k = 1, a middle k, f."""
    # r = 1 leaves the predictor one dimension, r = d - 1 leaves K2 one, d // 2 is our default.
    # Unscaled N(0, 1) weights make outputs up to ~60: rtol 1e-10 scales with them, and float64
    # rounding of sums this short stays ~1e-15 relative.
    rng = np.random.default_rng(7)
    x = rng.standard_normal(lead + (d,))
    for r in sorted({1, d // 2, d - 1}):
        K1, K2, V = rng.standard_normal((r, f)), rng.standard_normal((d - r, f)), rng.standard_normal((f, d))
        for k in sorted({1, max(1, f // 3), f}):
            ref = spark_ffn_np(x, K1, K2, V, k, r)
            got = spark_ffn(*(torch.from_numpy(a) for a in (x, K1, K2, V)), k, r)
            assert_close(f"spark_ffn d={d} f={f} r={r} k={k}", got, ref, **F64)


# No zero-token case: the L1 term is a mean over tokens, undefined (NaN) when there are none.
@pytest.mark.parametrize("d,f,lead", [s for s in FFN_SHAPES if s[2][0] > 0])
def test_relu_l1_ffn_matches_numpy(d, f, lead):
    """relu_l1_ffn equals relu_l1_ffn_np, y and the L1 term, and the L1 term is its definition."""
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    y_ref, l1_ref = relu_l1_ffn_np(x, Wg, Wu, Wd)
    y, l1 = relu_l1_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)))
    assert_close("relu_l1 y", y, y_ref, **F64)
    assert_close("relu_l1 l1", l1, np.float64(l1_ref), **F64)
    # the L1 term by its definition: mean over tokens of sum over f of |relu(g) * u|. The two
    # functions above could share a slip (a sum over tokens where the paper means a mean, say);
    # this one line, written from the formula, would not share it.
    h = np.maximum(x @ Wg, 0) * (x @ Wu)
    assert_close("relu_l1 l1 definition", l1, np.abs(h).reshape(-1, f).sum(1).mean(), **F64)


def test_ffn_modules_match_numpy_with_their_own_weights():
    """Every FFN module, run on a batch, equals its NumPy reference fed the module's own parameters."""
    # The function tests pass weights by hand; this one proves that each module hands its own
    # Parameters to the function in the right roles (Wg and Wu swapped, or K1 given K2's rows,
    # would pass every test above and fail here), and that a [B, T, d] batch goes through.
    d, f, k, r = 11, 29, 5, 4
    x = torch.randn(3, 7, d, dtype=torch.float64)  # batch > 1
    xn = np64(x)
    for act in ("gelu", "relu"):
        m = GatedFFN(d, f, act).double()
        assert_close(f"GatedFFN {act}", m(x), gated_ffn_np(xn, np64(m.Wg), np64(m.Wu), np64(m.Wd), act), **F64)
    for method in ("exact", "statistical"):
        m = TopkFFN(d, f, k, method).double()
        assert_close(f"TopkFFN {method}", m(x), topk_ffn_np(xn, np64(m.Wg), np64(m.Wu), np64(m.Wd), k, method), **F64)
    m = SparkFFN(d, f, k, r).double()
    assert_close("SparkFFN", m(x), spark_ffn_np(xn, np64(m.K1), np64(m.K2), np64(m.V), k, r), **F64)
    m = ReluL1FFN(d, f).double()
    y_ref, l1_ref = relu_l1_ffn_np(xn, np64(m.Wg), np64(m.Wu), np64(m.Wd))
    assert_close("ReluL1FFN y", m(x), y_ref, **F64)
    assert_close("ReluL1FFN l1", m.last_l1, np.float64(l1_ref), **F64)


# ------------------------------------------------------------------------------------------
# Attention functions and modules vs NumPy
# ------------------------------------------------------------------------------------------

# (B, H, Hkv, T, S, hd, k_top, r), one line per case:
#   grouped-query (G = 2), no cache, k_top below T
#   multi-query (Hkv = 1) with a KV cache (S > T), odd hd, r = 1
#   decode (T = 1) with S > k_top: spark_attention's gather path; r = hd - 1
#   decode with S <= k_top: every cached key kept
#   k_top above every visible count: the top-k keeps all; odd hd
#   k_top = 1: one key per query
#   a cache and GQA at once, odd hd
# Between them they reach every branch: `attention` calls SDPA with is_causal (T == S), with an
# explicit bottom-right mask (S > T) and with no mask (T == 1); `spark_attention` takes its gather
# path (T == 1, S > kt) and its masked path, with the top-k cutting (kt < visible) or not.
ATTN_SHAPES = [(2, 6, 3, 7, 7, 10, 3, 4), (1, 4, 1, 5, 12, 9, 4, 1), (2, 2, 2, 1, 9, 8, 3, 7), (3, 4, 2, 1, 2, 6, 5, 3),
               (1, 3, 3, 11, 11, 5, 20, 2), (2, 2, 1, 6, 6, 4, 1, 2), (2, 4, 2, 13, 17, 7, 6, 3)]


def _qkv(B, H, Hkv, T, S, hd, seed=0):
    """Seeded float64 q [B, H, T, hd], k and v [B, Hkv, S, hd]."""
    # Unit-variance entries make q.k / sqrt(hd) O(1): the softmax weights are neither one-hot
    # nor uniform, so a wrong scale or a wrong mask moves the output far outside F64.
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hkv, S, hd, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hkv, S, hd, dtype=torch.float64, generator=g)
    return q, k, v


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy(shape, causal):
    """attention (SDPA) equals attention_np: causal or not, with a KV cache (S > T), decode, GQA."""
    B, H, Hkv, T, S, hd, _, _ = shape
    q, k, v = _qkv(B, H, Hkv, T, S, hd)
    # causal=False with a cache: every query sees all S keys. F64: a softmax over at most 17
    # O(1) scores, fused in SDPA and looped in NumPy, differs by a few ulps.
    assert_close(f"attention {shape} causal={causal}", attention(q, k, v, causal),
                 attention_np(np64(q), np64(k), np64(v), causal), **F64)


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_spark_attention_matches_numpy(shape, causal):
    """spark_attention equals spark_attention_np on both of its paths (training and decode)."""
    B, H, Hkv, T, S, hd, k_top, r = shape
    q, k, v = _qkv(B, H, Hkv, T, S, hd)
    # The key selection is an exact top-k on scores computed in two orders. Only scores within
    # ~1e-16 of each other could swap ranks, which random float64 scores practically never are:
    # both sides keep the same keys, and what remains is F64 rounding.
    assert_close(f"spark_attention {shape} causal={causal}", spark_attention(q, k, v, k_top, r, causal),
                 spark_attention_np(np64(q), np64(k), np64(v), k_top, r, causal), **F64)


def test_spark_attention_with_all_keys_kept_is_not_plain_attention():
    """Even with every key kept, the softplus gate and the split scale change the output: a
    reference that silently became dense softmax attention would fail here."""
    # k_top = 6 = T: nothing is dropped. The gate softplus(.) is ln 2 ~ 0.69 at 0 and varies
    # with the scores, so the weights do not sum to 1; with the other scales (1/sqrt(r) for the
    # softmax) the output moves by O(1) here, a hundred times the 1e-2 bar.
    q, k, v = _qkv(1, 2, 2, 6, 6, 8)
    a = attention_np(np64(q), np64(k), np64(v))
    b = spark_attention_np(np64(q), np64(k), np64(v), k_top=6, r=4)
    assert np.abs(a - b).max() > 1e-2


def test_spark_attention_selects_top_visible_keys_per_query_head():
    """Our choices for Spark attention (notes/papers.md, "Our choices where the papers are silent"),
    read off the attention weights.

    With V = identity (hd = S) the output row of query i IS its weight vector w_i. We check:
    future keys get weight 0; a query with >= kt visible keys weighs exactly kt of them, one
    with fewer weighs all; the weighted keys are the kt largest q[:r].K1 among the visible ones,
    chosen per query head (two heads sharing a KV head pick different sets).
    """
    # hd = S = 10 so that V can be the identity; H = 2 query heads share Hkv = 1 KV head; kt = 4
    # is below most queries' visible counts (query i sees i + 1 keys) but not the first three.
    # A kept key never gets weight exactly 0 (softmax and softplus are both > 0), so the nonzero
    # entries of w[h, i] are exactly the kept set.
    B, H, Hkv, S, r, kt = 1, 2, 1, 10, 3, 4
    q, k, _ = _qkv(B, H, Hkv, S, S, S, seed=3)
    v = torch.eye(S, dtype=torch.float64)[None, None]  # [1, 1, S, S]
    w = spark_attention(q, k, v, kt, r).numpy()[0]  # [H, T, S]: w[h, i, j]
    scores = np.einsum("htd,sd->hts", np64(q)[0, :, :, :r], np64(k)[0, 0, :, :r])  # [H, T, S]
    sets = {}
    for h in range(H):
        for i in range(S):
            nz = set(np.flatnonzero(w[h, i]).tolist())
            assert all(j <= i for j in nz), f"head {h} query {i} weighs future keys {sorted(nz)}"
            assert len(nz) == min(kt, i + 1), f"head {h} query {i}: {len(nz)} keys weighed, expected {min(kt, i + 1)}"
            best = set(np.argsort(-scores[h, i, : i + 1])[: min(kt, i + 1)].tolist())
            assert nz == best, f"head {h} query {i}: weighed {sorted(nz)}, top-{kt} visible scores are {sorted(best)}"
            sets[h, i] = nz
    assert any(sets[0, i] != sets[1, i] for i in range(S)), "the two query heads never chose differently"


def _module_attention_np(m, x, spark_kt=None):
    """Attention module forward in NumPy: projections, heads, attention_np/spark_attention_np, merge."""
    # Written from the module's weights alone: nn.Linear stores weight as [out, in], so x W^T + b;
    # heads are split as [B, T, H, hd] then transposed, so reshaping straight to [B, H, T, hd]
    # (a classic slip) would mix tokens and heads and fail the comparison.
    B, T, _ = x.shape
    lin = lambda mod, a: a @ np64(mod.weight).T + (np64(mod.bias) if mod.bias is not None else 0)  # noqa: E731
    q = lin(m.q_proj, x).reshape(B, T, m.H, m.hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    k = lin(m.k_proj, x).reshape(B, T, m.Hkv, m.hd).transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    v = lin(m.v_proj, x).reshape(B, T, m.Hkv, m.hd).transpose(0, 2, 1, 3)
    o = attention_np(q, k, v) if spark_kt is None else spark_attention_np(q, k, v, spark_kt, m.r)
    return lin(m.o_proj, o.transpose(0, 2, 1, 3).reshape(B, T, m.H * m.hd))  # [B, T, d]


@pytest.mark.parametrize("bias", [False, True])
def test_attention_modules_match_numpy(bias):
    """Attention and SparkAttention modules equal projections + the NumPy references (biases
    included), and SparkAttention loads dense Attention's state dict: the same parameters."""
    # H hd = 15 != d = 11: a projection sized d x d by mistake would not even run. One KV head
    # serves all three query heads (multi-query).
    d, H, Hkv, hd = 11, 3, 1, 5  # odd d, head size that does not divide d (head_dim given)
    x = torch.randn(2, 9, d, dtype=torch.float64)
    m = Attention(d, H, Hkv, hd, bias=bias).double()
    if bias:  # nonzero biases so that a forgotten bias would show
        for p in (m.q_proj.bias, m.k_proj.bias, m.v_proj.bias, m.o_proj.bias):
            torch.nn.init.normal_(p)
    assert_close("Attention module", m(x), _module_attention_np(m, np64(x)), **F64)
    s = SparkAttention(d, H, Hkv, hd, k_top=4, r=2, bias=bias).double()
    s.load_state_dict(m.state_dict())  # the same parameter names and shapes as dense attention
    assert_close("SparkAttention module", s(x), _module_attention_np(s, np64(x), spark_kt=4), **F64)


# ------------------------------------------------------------------------------------------
# Causality: no future token ever changes an earlier output
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["attention", "spark_attention"])
def test_attention_functions_are_causal(fn):
    """Changing (and inflating) q, k, v at positions >= t changes no output before t, and does change later ones."""
    B, H, Hkv, T, hd = 2, 4, 2, 12, 6
    q, k, v = _qkv(B, H, Hkv, T, T, hd)
    run = (lambda q, k, v: attention(q, k, v)) if fn == "attention" else (lambda q, k, v: spark_attention(q, k, v, 3, 2))
    base = run(q, k, v)
    # t = 1: only the first output is protected; t = 11: only the last position changes. Keys
    # 100x larger than the rest would take every top-k place if the mask were applied after the
    # top-k instead of before, which is the ordering bug this test exists for.
    for t in (1, 4, 11):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for a in (q2, k2, v2):
            a[:, :, t:] = 100 * torch.randn_like(a[:, :, t:])  # large: they would win every top-k
        out = run(q2, k2, v2)
        assert_close(f"{fn} outputs before {t}", out[:, :, :t], base[:, :, :t], **F64)
        assert (out[:, :, t:] - base[:, :, t:]).abs().max() > 1e-3  # the perturbation did reach later outputs


@pytest.mark.parametrize("ffn,attn", ALL_VARIANTS)
def test_gpt_is_causal(ffn, attn):
    """For every FFN x attention variant, future tokens do not change earlier logits (float64)."""
    # The FFNs act on each token alone, so they are causal unless a row statistic is taken over
    # the wrong axis (mean and std of statistical top-k over tokens instead of over f, say):
    # that leaks the future into every position, and only a whole-model test sees it.
    m = model64(ffn=ffn, attn=attn)
    idx = torch.randint(0, 50, (2, 20))
    base, _ = m(idx)
    for t in (3, 12):
        idx2 = idx.clone()
        idx2[:, t:] = torch.randint(0, 50, (2, 20 - t))
        out, _ = m(idx2)
        assert_close(f"{ffn}/{attn} logits before {t}", out[:, :t], base[:, :t], **F64)


# ------------------------------------------------------------------------------------------
# KV-cache generation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,attn", ALL_VARIANTS)
def test_generate_with_cache_equals_full_forward(ffn, attn):
    """The KV-cache decode (Spark attention: the gather path) gives the logits of a full forward,
    for every variant; the last decode step weighed exactly kt of its keys."""
    m = model64(ffn=ffn, attn=attn)
    prompt = torch.randint(0, 50, (3, 4))
    out, logits = m.generate(prompt, 14, temperature=1.0, return_logits=True)  # 4 + 14 <= block 24
    assert out.shape == (3, 18) and logits.shape == (3, 14, 50)
    assert torch.equal(out[:, :4], prompt)
    if attn == "spark":
        # The last forward decoded one query against 17 cached keys: it weighed kt = 5 of them.
        assert m.stats()["attn_density"] == pytest.approx([5 / 17] * 2)
    # A plain forward over the whole sequence, no cache: the reference for every decoded position.
    # It shares no code path with the decode: T = 17 queries through SDPA's causal mask and
    # spark_attention's masked path, against one query at a time through the gather path. The
    # logits are below 1 in size after two float64 layers, so F64 holds.
    full, _ = m(out[:, :-1])  # [3, 17, V]: position t predicts token t + 1
    assert_close(f"{ffn}/{attn} cached vs full logits", logits, full[:, 3:], **F64)


def test_generate_past_block_size_conditions_on_the_last_block():
    """Past block_size the window slides (nanoGPT): every new token's logits equal a full forward
    over the last block_size tokens, and temperature 0 takes their argmax."""
    # block 9 with a 5-token prompt: 4 cached steps, then 8 tokens each drawn after a re-prefill
    m = model64(ffn="spark", attn="spark", block_size=9)
    prompt = torch.randint(0, 50, (2, 5))
    out, logits = m.generate(prompt, 12, temperature=0.0, return_logits=True)  # 17 tokens > block 9
    for j in range(12):
        ctx = out[:, : 5 + j][:, -9:]  # what nanoGPT conditions on
        full, _ = m(ctx)
        assert_close(f"step {j} logits", logits[:, j], full[:, -1], **F64)
        assert torch.equal(out[:, 5 + j], logits[:, j].argmax(-1))  # temperature 0 = greedy
    assert torch.equal(m.generate(prompt, 12, temperature=0.0), out)  # return_logits changes nothing else


def test_decode_loop_calls_prefill_and_step_as_documented():
    """decode_loop with a fake model: prefill on the last block_size tokens, then step(tok, n) at
    positions n = T', T' + 1, ... while the cache has room, then prefill on the slid window for
    every further token; the logits returned are those the tokens were drawn from."""
    V, bs = 7, 4
    calls = []

    def logits_for(value):  # greedy picks value % V
        return torch.nn.functional.one_hot(torch.tensor([value % V]), V).double()

    def prefill(window):
        calls.append(("prefill", window.tolist()))
        return logits_for(int(window.sum()))

    def step(tok, n):
        calls.append(("step", tok.tolist(), n))
        return logits_for(n)

    # The expected trace: the prompt [5, 1, 2] fits (T' = 3 < 4), prefill -> token (5+1+2) % 7 = 1.
    # The cache holds 3 tokens, so step(1, n = 3) -> token 3. Now 4 tokens fill the cache, so
    # each further token prefills the last 4: [1, 2, 1, 3] -> 0, [2, 1, 3, 0] -> 6. The last
    # token drawn needs no forward after it.
    idx = torch.tensor([[5, 1, 2]])
    out, lg = spark.decode_loop(prefill, step, idx, 4, 0.0, None, bs, return_logits=True)
    assert calls == [("prefill", [[5, 1, 2]]), ("step", [[1]], 3), ("prefill", [[1, 2, 1, 3]]),
                     ("prefill", [[2, 1, 3, 0]])]
    assert out.tolist() == [[5, 1, 2, 1, 3, 0, 6]] and lg.shape == (1, 4, V)
    assert torch.equal(lg.argmax(-1), out[:, 3:])
    # No new tokens: one prefill on the last block_size tokens, the prompt back, and [B, 0, V] logits.
    calls.clear()
    out, lg = spark.decode_loop(prefill, step, torch.tensor([[1, 2, 3, 4, 5, 6]]), 0, 1.0, None, bs, True)
    assert calls == [("prefill", [[3, 4, 5, 6]])] and out.shape == (1, 6) and lg.shape == (1, 0, V)


def test_generate_top_k_samples_only_among_top_k():
    """top_k = 2: every sampled token is one of the two most likely under the logits it was drawn from."""
    # An untrained model has nearly uniform logits over 50 tokens, and temperature 1.3 flattens
    # them further: without the top_k restriction each of the 24 draws would land outside the
    # top 2 with probability ~0.96, so the check cannot pass by luck.
    m = model64()
    prompt = torch.randint(0, 50, (4, 3))
    out, logits = m.generate(prompt, 6, temperature=1.3, top_k=2, return_logits=True)
    top2 = torch.topk(logits, 2, dim=-1).indices  # [4, 6, 2]
    assert (top2 == out[:, 3:, None]).any(-1).all()


def test_generate_zero_tokens_and_bad_arguments():
    """max_new_tokens = 0 returns the prompt; every bad argument raises an error naming it."""
    m = model64()
    prompt = torch.randint(0, 50, (1, 3))
    assert torch.equal(m.generate(prompt, 0), prompt)
    # (override, error type, word the message must contain). A wrong type is a TypeError, a value
    # out of range a ValueError; NaN, inf and bool temperatures are refused, not sampled with.
    # idx: float ids, a 1-D tensor, no rows, no tokens, ids >= V, ids < 0.
    cases = [
        (dict(temperature=-1.0), ValueError, "temperature"), (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(temperature=math.inf), ValueError, "temperature"), (dict(temperature=True), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"), (dict(top_k=51), ValueError, "top_k"), (dict(top_k=2.0), TypeError, "top_k"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"), (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(idx=prompt.float()), TypeError, "idx"), (dict(idx=prompt[0]), TypeError, "idx"),
        (dict(idx=prompt[:0]), ValueError, "idx"), (dict(idx=prompt[:, :0]), ValueError, "idx"),
        (dict(idx=prompt + 50), ValueError, "idx"), (dict(idx=prompt * 0 - 1), ValueError, "idx"),
    ]
    for over, err, word in cases:  # the shared check, and GPT.generate that calls it
        args = dict(idx=prompt, max_new_tokens=2, temperature=1.0, top_k=None) | over
        with pytest.raises(err, match=word):
            spark.check_generate_args(m.config, **args)
        with pytest.raises(err, match=word):
            m.generate(**args)
    assert m.generate(prompt.int(), 2).shape == (1, 5)  # int32 ids are fine


def test_forward_rejects_bad_idx():
    """forward: too long, out-of-range ids, wrong rank and mismatched targets are errors naming the argument."""
    # 25 tokens against block_size 24; id 50 = V is the first id out of range; a 1-D idx has
    # no batch axis; targets one token longer than idx would misalign the loss.
    m = model64()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.full((1, 3), 50, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# Training: gradients, the L1 loss, densities
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,attn", ALL_VARIANTS)
def test_gradients_reach_every_parameter(ffn, attn):
    """One backward reaches every parameter of every variant (the Spark predictor K1 included)."""
    # float32, as in training: this test asks whether gradients arrive, not how precise they are.
    # K1 reaches the loss only through statistical top-k's backward, theta included.
    torch.manual_seed(0)
    m = GPT(tiny(ffn=ffn, attn=attn, bias=True))
    idx = torch.randint(0, 50, (2, 16))
    _, loss = m(idx, torch.roll(idx, -1, 1))
    loss.backward()
    # bias=True so the biases are checked too; an all-zero gradient counts as missing (a detached
    # branch would give zeros, not None, once another path touches the parameter)
    missing = [n for n, p in m.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert not missing, f"{ffn}/{attn}: no gradient reached {missing}"
    if ffn == "spark":  # the predictor in particular
        assert all((blk.ffn.K1.grad != 0).any() for blk in m.blocks)


def test_relu_l1_loss_is_ce_plus_lambda_times_layer_mean():
    """relu_l1 loss = cross-entropy + lambda * the layers' mean L1 term, recomputed in NumPy from each layer's input."""
    lam = 0.37  # large, so the L1 part is far above float64 noise
    m = model64(ffn="relu_l1", l1=lam)
    # The hooks record what each FFN really received (the output of its block's ln_2), so the
    # NumPy recomputation needs none of the model's code before the FFN.
    seen = []
    hooks = [blk.ffn.register_forward_hook(lambda mod, inp, out: seen.append(np64(inp[0]))) for blk in m.blocks]
    idx = torch.randint(0, 50, (2, 10))
    logits, loss = m(idx, idx)
    for h in hooks:
        h.remove()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1))
    l1 = [relu_l1_ffn_np(x, np64(b.ffn.Wg), np64(b.ffn.Wu), np64(b.ffn.Wd))[1] for x, b in zip(seen, m.blocks)]
    assert_close("loss - CE", loss - ce, lam * np.mean(l1), **F64)
    assert lam * np.mean(l1) > 1e-3


def test_stats_report_densities():
    """stats() reports the achieved FFN and attention densities of the last forward, per layer."""
    idx = torch.randint(0, 50, (2, 20))
    m = model64()  # dense GeGLU: GELU is nonzero almost everywhere; dense attention weighs all
    m(idx)
    st = m.stats()
    assert st["ffn_density"] == [1.0, 1.0] and st["attn_density"] == [1.0, 1.0]
    m = model64(ffn="relu")  # dense ReLU-gated: about half the gates are below zero at initialisation
    m(idx)
    assert all(0.3 < x < 0.7 for x in m.stats()["ffn_density"]), m.stats()
    m = model64(ffn="topk", ffn_density=0.25)  # exact: k = round(0.25 * 48) = 12 per token
    m(idx)
    assert m.stats()["ffn_density"] == pytest.approx([12 / 48] * 2)
    m = model64(ffn="spark", attn="spark", d_ff=400, ffn_density=0.1)  # statistical: about k
    m(idx)
    st = m.stats()
    assert all(0.05 < x < 0.15 for x in st["ffn_density"]), st
    # query i sees i + 1 keys and keeps min(kt, i + 1) of them; the density is the ratio of sums
    kept = sum(min(5, i + 1) for i in range(20)) / sum(i + 1 for i in range(20))  # kt = 5 of visible
    assert st["attn_density"] == pytest.approx([kept] * 2)
    assert GPT(tiny()).stats() == {"ffn_density": [None, None], "attn_density": [None, None]}


# ------------------------------------------------------------------------------------------
# Configuration: equal parameters, round trip, bad values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [GPTConfig(), tiny(), tiny(d_ff=37, d_model=30, n_head=3, n_kv_head=1)])
def test_parameter_counts_equal_across_variants(base):
    """Every variant has the dense model's parameter count (Spark within 1 %, exactly for even d_ff), and
    everything outside the FFNs has the same names and shapes."""
    # A Spark FFN has 2 d f' parameters with f' = round(1.5 f), against 3 d f for the others: equal
    # for even f. The third base has d_ff = 37: f' = round(55.5) = 56, so 112 d vs 111 d, one
    # part in 111 of the FFN, under 1 % of the model; it also has 3 heads and a single KV head.
    counts = {}
    shapes = {}
    for ffn, attn in ALL_VARIANTS:
        m = GPT(dataclasses.replace(base, ffn=ffn, attn=attn))
        counts[ffn, attn] = m.num_params()
        # outside the FFNs every parameter has the same name and shape
        shapes[ffn, attn] = {n: p.shape for n, p in m.named_parameters() if ".ffn." not in n}
    dense = counts["dense", "dense"]
    for key, n in counts.items():
        # section 4b's systems add a router or controller (Polar, LTE: under 1.2 % here) or round
        # Terraformer's f to whole blocks of equal parameters (within 3.2 % at these tiny sizes,
        # 0.4 % at the default config's): "within a few per cent", and exact for the others
        extra = key[0] in ("terraformer", "lte") or key[1] == "polar"
        assert abs(n - dense) / dense < (0.035 if extra else 0.01), f"{key}: {n} parameters vs dense {dense}"
        if key[0] not in ("spark", "terraformer", "lte") and key[1] != "polar":
            assert n == dense, key
        if key[1] != "polar":  # (Polar's router sits in the attention)
            assert shapes[key] == shapes["dense", "dense"], key
    assert base.d_ff % 2 == 1 or counts["spark", "spark"] == dense  # 1.5 f is exact for even f


@pytest.mark.parametrize("c", [GPTConfig(), tiny(bias=True), tiny(ffn="spark", head_dim=6, attn="spark"),
                               tiny(ffn="relu_l1", n_kv_head=1)])
def test_count_params_matches_the_model(c):
    """count_params (arithmetic, used for Gemma-2 2B) equals the built model's count."""
    # The configs reach each term of the formula: biases in LayerNorms and projections, a head
    # size with H hd != d, the Spark FFN's 1.5x width, a single KV head.
    assert count_params(c) == GPT(c).num_params()


def test_default_config_is_the_documented_tiny_model_and_round_trips():
    """GPTConfig() is the model `python train_tiny.py` trains (the values its docstring and
    notes/papers.md state); derived sizes follow; asdict() round-trips."""
    d = GPTConfig()
    assert dataclasses.asdict(d) == dict(
        vocab_size=84, block_size=64, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=512, ffn="spark",
        ffn_density=0.2, ffn_r=None, attn="spark", attn_k=32, attn_r=None, head_dim=None, l1=5e-3, terra_block=8,
        terra_rank=16, lte_experts=None, lte_eta=0.5, lte_eff=1e-2, polar_top=None, polar_aux=1.0, dropout=0.0,
        bias=False)
    assert d.hd == 32 and d.ffn_r_ == 64 and d.attn_r_ == 16
    assert d.ffn_width == 768 and d.ffn_k == round(0.2 * 768) == 154  # Spark: f = 1.5 x 512
    assert dataclasses.replace(d, ffn="relu").ffn_width == 512
    assert d.lte_experts_ == 16 and d.polar_top_ == 1  # 512 / 32 experts; half of the 2 KV groups
    c = GPTConfig(ffn="relu", attn="dense", ffn_r=10, head_dim=40)
    assert GPTConfig(**dataclasses.asdict(c)) == c


# Unknown kinds ("gelu": the activation is part of the kind, "dense" = GeGLU or "relu"); a
# density outside (0, 1], NaN included; r = 0, r = d (nothing left for K2), r = hd; a d_model
# that 4 heads do not divide; 4 query heads in groups of 3; zero sizes; l1 < 0; dropout 1.
@pytest.mark.parametrize("kw,word", [
    (dict(ffn="moe"), "ffn"), (dict(attn="sparse"), "attn"), (dict(ffn="gelu"), "ffn"),
    (dict(ffn_density=0.0), "ffn_density"), (dict(ffn_density=1.01), "ffn_density"),
    (dict(ffn_density=-0.1), "ffn_density"), (dict(ffn_density=float("nan")), "ffn_density"),
    (dict(ffn_r=0), "ffn_r"), (dict(ffn_r=32), "ffn_r"), (dict(attn_r=0), "attn_r"), (dict(attn_r=8), "attn_r"),
    (dict(d_model=30), "d_model"), (dict(n_kv_head=3), "n_kv_head"), (dict(attn_k=0), "attn_k"),
    (dict(n_layer=0), "n_layer"), (dict(l1=-1.0), "l1"), (dict(dropout=1.0), "dropout"),
    # section 4b's fields: a block or rank of 0, more experts than neurons, eta outside [0, 1),
    # negative loss weights, more kept KV groups than there are (tiny() has 2)
    (dict(terra_block=0), "terra_block"), (dict(terra_rank=0), "terra_rank"), (dict(lte_experts=49), "lte_experts"),
    (dict(lte_eta=1.0), "lte_eta"), (dict(lte_eff=-1.0), "lte_eff"), (dict(polar_aux=float("inf")), "polar_aux"),
    (dict(polar_top=3), "polar_top"),
])
def test_bad_config_raises_value_error(kw, word):
    """Each bad config value is a ValueError naming the field."""
    with pytest.raises(ValueError, match=word):
        tiny(**kw)


def test_bad_types_and_module_arguments():
    """Wrong types and shapes in the config, the modules and the functions are errors naming what is wrong."""
    # Each call gets one thing wrong, so the message can only name that thing: a float head
    # count, a dict for a config, sizes out of range in the modules, 3 query heads over 2 KV heads,
    # more queries (T = 5) than keys (S = 4), and an x whose width does not match W's rows.
    with pytest.raises(TypeError, match="n_head"):
        tiny(n_head=4.0)
    with pytest.raises(TypeError, match="config"):
        GPT({"ffn": "dense"})
    with pytest.raises(ValueError, match="k"):
        SparkFFN(8, 10, 11, 3)  # k > f
    with pytest.raises(ValueError, match="r"):
        SparkFFN(8, 10, 2, 8)  # r = d
    with pytest.raises(ValueError, match="method"):
        TopkFFN(8, 10, 2, "approximate")
    with pytest.raises(ValueError, match="act"):
        GatedFFN(8, 10, "swish")
    with pytest.raises(ValueError, match="act"):
        gated_ffn_np(np.ones((2, 8)), np.ones((8, 10)), np.ones((8, 10)), np.ones((10, 8)), "swish")
    with pytest.raises(ValueError, match="n_kv_head"):
        Attention(8, 4, 3, 2)
    with pytest.raises(ValueError, match="r"):
        SparkAttention(8, 2, 2, 4, k_top=3, r=4)
    q, k, v = _qkv(1, 3, 2, 4, 4, 6)
    with pytest.raises(ValueError, match="divisible"):
        spark_attention(q, k, v, 2, 3)
    q, k, v = _qkv(1, 2, 2, 5, 4, 6)
    with pytest.raises(ValueError, match="S = 4 < T = 5"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="shapes"):
        gated_ffn(torch.randn(3, 5), torch.randn(4, 7), torch.randn(4, 7), torch.randn(7, 4), "gelu")


# ------------------------------------------------------------------------------------------
# Cost accounting
# ------------------------------------------------------------------------------------------


def test_count_costs_reproduces_the_reference_arithmetic():
    """count_costs reproduces the Spark FFN's 3.52x byte limit and the attention KV formula of
    notes/papers.md ("Spark FFN", "Spark attention") at Gemma-2 2B shapes."""
    # Gemma-2 2B: d 2304, gated f 9216, so Spark's f = 1.5 x 9216 = 13824, r = 1024 and
    # k = round(0.08 x 13824) = 1106. The formulas below are written out from notes/papers.md
    # rather than taken from spark.py, so a slip in count_costs cannot cancel itself here.
    g = spark.gemma2_2b_config()
    dense, sp = count_costs(g, 8192), count_costs(dataclasses.replace(g, ffn="spark", attn="spark"), 8192)
    # r f + k (d - r) + k d weights vs 3 d f_gated: 18.1 M vs 63.7 M, 3.52x
    assert sp["ffn_flops"] == 2 * (1024 * 13824 + 1106 * (2304 - 1024) + 1106 * 2304)
    assert dense["ffn_flops"] == 2 * 3 * 2304 * 9216
    assert round(dense["ffn_flops"] / sp["ffn_flops"], 2) == 3.52
    # one head without GQA sharing: 2 n hd vs n r + k (hd - r) + k hd
    mha = dict(n_head=8, n_kv_head=8)
    kd = count_costs(spark.gemma2_2b_config(**mha), 8192)["kv_bytes"]
    ks = count_costs(spark.gemma2_2b_config(attn="spark", **mha), 8192)["kv_bytes"]
    assert kd / ks == pytest.approx((2 * 8192 * 256) / (8192 * 128 + 256 * 128 + 256 * 256))
    # Spark attention over n <= kt tokens costs exactly what dense attention does (kt = 32 here)
    t = spark.GPTConfig()
    assert count_costs(t, 32)["attn_mix_flops"] == count_costs(dataclasses.replace(t, attn="dense"), 32)["attn_mix_flops"]
    assert count_costs(t, 33)["attn_mix_flops"] < count_costs(dataclasses.replace(t, attn="dense"), 33)["attn_mix_flops"]
    # the dense ReLU-gated FFN costs what the GeGLU does
    assert count_costs(dataclasses.replace(g, ffn="relu"), 8192) == dense
    # parameters: Gemma-2 2B is 2.61 B; ours adds 8192 x 2304 learned positions (19 M)
    assert count_params(g) == pytest.approx(2.614e9 + 8192 * 2304, rel=2e-3)
    with pytest.raises(ValueError, match="n_ctx"):
        count_costs(g, 0)


def test_main_prints_the_cost_table():
    """`python spark.py` prints the Gemma-2 2B table (3.52x FFN ratio) and the tiny default's (2.50x at 20 %)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        spark.main([])
    text = buf.getvalue()
    # The tiny default: f = 768, k = 154 and r = 64 give 64 x 768 + 154 x 64 + 154 x 128 =
    # 78,720 weights read against 3 x 128 x 512 = 196,608 for the GeGLU, 2.50x fewer.
    assert "Gemma-2 2B" in text and "the tiny default (the model python train_tiny.py trains)" in text
    assert "3.52x fewer" in text and "k 154 (20.1%)" in text and "2.50x fewer" in text
    with pytest.raises(SystemExit):  # an unknown flag (--bench, say) is an error, not ignored
        spark.main(["--bench"])


@pytest.mark.gpu
@pytest.mark.parametrize("ffn, attn", [("stat_topk", "dense"), ("spark", "dense"), ("spark", "spark")])
def test_gpt_on_cuda_with_triton_matches_the_torch_path(ffn, attn, monkeypatch):
    """spark.TRITON switches the statistical FFNs to kernels_gpu's fused Triton pass on CUDA, and
    Spark attention to kernels_gpu.spark_attention_gpu (whose scores, summed in another order, may
    put a key tied within rounding with the kt-th on the other side: the same small effect).
    The loss and every gradient must match the torch ops' within float32 rounding: the kernel
    keeps its statistics in float32 like topk.statistical_topk, but sums in another order, so
    an entry within ~1e-6 of theta may fall on the other side; on 1e5 activations that moves
    the loss by well under 1e-4 (relative) and a gradient entry by under 1e-3 of the largest."""
    torch.manual_seed(0)
    model = spark.GPT(spark.GPTConfig(ffn=ffn, attn=attn)).cuda()
    idx = torch.randint(0, 84, (4, 64), device="cuda")
    results = []
    for use in (False, True):
        monkeypatch.setattr(spark, "TRITON", use)
        model.zero_grad()
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert_close("loss", l1, l0, atol=0.0, rtol=1e-4)
    for a, b in zip(g1, g0):
        assert_close("gradient", a, b, atol=1e-3 * float(b.abs().max()), rtol=1e-3)
