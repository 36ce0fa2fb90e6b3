"""Tests for spark.py: every torch layer against its NumPy reference, and the GPT's properties.

Tolerances. The torch functions and the NumPy references do the same arithmetic in float64 in a
different order (BLAS blocking, fused softmax), so they differ by a few ulps of the largest
intermediate: we allow atol 1e-12 and rtol 1e-10 on outputs of size ~1, about 1e4 ulps of
margin. A wrong mask, scale or selection moves outputs by far more than that (1e-3 and up).
Statistical top-k compares each entry with a threshold computed in a different order; an entry
that flips sits within ~1e-16 of theta and, the threshold being soft, contributes ~1e-16.
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
from spark import (
    GPT,
    Attention,
    GatedFFN,
    GPTConfig,
    ReluL1FFN,
    SparkAttention,
    SparkFFN,
    TopkFFN,
    attention,
    attention_np,
    count_costs,
    count_params,
    gated_ffn,
    gated_ffn_np,
    relu_l1_ffn,
    relu_l1_ffn_np,
    spark_attention,
    spark_attention_np,
    spark_ffn,
    spark_ffn_np,
    topk_ffn,
    topk_ffn_np,
)

F64 = dict(atol=1e-12, rtol=1e-10)  # float64 vs float64 reference (module docstring)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Our tensors are tiny: one thread is as fast, and on a shared 2-core machine a second
    OpenMP thread waiting for a busy core made this file 30x slower (1.5 s -> 54 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def np64(t):
    return t.detach().numpy().astype(np.float64)


def tiny(**over):
    """A very small config for behaviour tests: 2 layers, d 32, hd 8, kt 5 (< most sequence lengths)."""
    kw = dict(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, attn_k=5)
    kw.update(over)
    return GPTConfig(**kw)


def model64(**over):
    torch.manual_seed(0)
    return GPT(tiny(**over)).double().eval()


ALL_VARIANTS = [(ffn, attn) for ffn in spark.FFN_KINDS for attn in spark.ATTN_KINDS]


# ------------------------------------------------------------------------------------------
# FFN functions and modules vs NumPy, float64, awkward shapes
# ------------------------------------------------------------------------------------------

# (d, f, leading shape): odd d, f not a multiple of 8, one token, batch x tokens, no tokens
FFN_SHAPES = [(13, 37, (5,)), (7, 9, (2, 3)), (16, 1, (4,)), (10, 21, (1,)), (6, 11, (0,))]


def _ffn_weights(d, f):
    rng = np.random.default_rng(d * 100 + f)
    x = lambda *s: rng.standard_normal(s)  # noqa: E731
    return x(d, f) / math.sqrt(d), x(d, f) / math.sqrt(d), x(f, d) / math.sqrt(f)


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gated_ffn_matches_numpy(d, f, lead, act):
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    ref = gated_ffn_np(x, Wg, Wu, Wd, act)
    got = gated_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)), act)
    assert_close(f"gated_ffn {act} d={d} f={f}", got, ref, **F64)


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
@pytest.mark.parametrize("method", ["exact", "statistical"])
def test_topk_ffn_matches_numpy(d, f, lead, method):
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    for k in sorted({1, max(1, f // 3), f}):  # k = 1, a middle k, k = f (no sparsity)
        ref = topk_ffn_np(x, Wg, Wu, Wd, k, method)
        got = topk_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)), k, method)
        assert_close(f"topk_ffn {method} d={d} f={f} k={k}", got, ref, **F64)
    if f > 1 and lead[0] > 0:
        # k < f must really sparsify: y differs from the dense GeGLU
        dense = gated_ffn_np(x, Wg, Wu, Wd, "gelu")
        assert np.abs(topk_ffn_np(x, Wg, Wu, Wd, 1, method) - dense).max() > 1e-3


@pytest.mark.parametrize("d,f,lead", FFN_SHAPES)
def test_spark_ffn_matches_numpy(d, f, lead):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(lead + (d,))
    for r in sorted({1, d // 2, d - 1}):
        K1, K2, V = rng.standard_normal((r, f)), rng.standard_normal((d - r, f)), rng.standard_normal((f, d))
        for k in sorted({1, max(1, f // 3), f}):
            ref = spark_ffn_np(x, K1, K2, V, k, r)
            got = spark_ffn(*(torch.from_numpy(a) for a in (x, K1, K2, V)), k, r)
            assert_close(f"spark_ffn d={d} f={f} r={r} k={k}", got, ref, **F64)


@pytest.mark.parametrize("d,f,lead", [s for s in FFN_SHAPES if s[2][0] > 0])
def test_relu_l1_ffn_matches_numpy(d, f, lead):
    Wg, Wu, Wd = _ffn_weights(d, f)
    x = np.random.standard_normal(lead + (d,))
    y_ref, l1_ref = relu_l1_ffn_np(x, Wg, Wu, Wd)
    y, l1 = relu_l1_ffn(*(torch.from_numpy(a) for a in (x, Wg, Wu, Wd)))
    assert_close("relu_l1 y", y, y_ref, **F64)
    assert_close("relu_l1 l1", l1, np.float64(l1_ref), **F64)
    # the L1 term by its definition: mean over tokens of sum over f of |relu(g) * u|
    h = np.maximum(x @ Wg, 0) * (x @ Wu)
    assert_close("relu_l1 l1 definition", l1, np.abs(h).reshape(-1, f).sum(1).mean(), **F64)


def test_ffn_modules_match_numpy_with_their_own_weights():
    d, f, k, r = 11, 29, 5, 4
    x = torch.randn(3, 7, d, dtype=torch.float64)  # batch > 1
    xn = np64(x)
    m = GatedFFN(d, f, "gelu").double()
    assert_close("GatedFFN", m(x), gated_ffn_np(xn, np64(m.Wg), np64(m.Wu), np64(m.Wd), "gelu"), **F64)
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

# (B, H, Hkv, T, S, hd, k_top, r): below / above k_top, a KV cache (S > T), decode (T = 1) with
# S > k_top (the gather path) and S <= k_top, multi-query (Hkv = 1), odd hd, r = 1 and r = hd - 1.
ATTN_SHAPES = [
    (2, 6, 3, 7, 7, 10, 3, 4),
    (1, 4, 1, 5, 12, 9, 4, 1),
    (2, 2, 2, 1, 9, 8, 3, 7),
    (3, 4, 2, 1, 2, 6, 5, 3),
    (1, 3, 3, 11, 11, 5, 20, 2),
    (2, 2, 1, 6, 6, 4, 1, 2),
    (2, 4, 2, 13, 17, 7, 6, 3),
]


def _qkv(B, H, Hkv, T, S, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hkv, S, hd, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hkv, S, hd, dtype=torch.float64, generator=g)
    return q, k, v


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy(shape, causal):
    B, H, Hkv, T, S, hd, _, _ = shape
    q, k, v = _qkv(B, H, Hkv, T, S, hd)
    assert_close(f"attention {shape} causal={causal}", attention(q, k, v, causal),
                 attention_np(np64(q), np64(k), np64(v), causal), **F64)


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_spark_attention_matches_numpy(shape, causal):
    B, H, Hkv, T, S, hd, k_top, r = shape
    q, k, v = _qkv(B, H, Hkv, T, S, hd)
    assert_close(f"spark_attention {shape} causal={causal}", spark_attention(q, k, v, k_top, r, causal),
                 spark_attention_np(np64(q), np64(k), np64(v), k_top, r, causal), **F64)


def test_spark_attention_with_all_keys_kept_is_not_plain_attention():
    # Guards against a reference that silently became dense softmax attention: the softplus gate
    # and the split scale must change the output even when every key is kept.
    q, k, v = _qkv(1, 2, 2, 6, 6, 8)
    a = attention_np(np64(q), np64(k), np64(v))
    b = spark_attention_np(np64(q), np64(k), np64(v), k_top=6, r=4)
    assert np.abs(a - b).max() > 1e-2


def test_spark_attention_selects_top_visible_keys_per_query_head():
    """The [choice]s of REFERENCE.md §4, read off the attention weights.

    With V = identity (hd = S) the output row of query i IS its weight vector w_i. We check:
    future keys get weight 0; a query with >= kt visible keys weighs exactly kt of them, one
    with fewer weighs all; the weighted keys are the kt largest q[:r].K1 among the visible ones,
    chosen per query head (two heads sharing a KV head pick different sets).
    """
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
    B, T, _ = x.shape
    lin = lambda mod, a: a @ np64(mod.weight).T + (np64(mod.bias) if mod.bias is not None else 0)  # noqa: E731
    q = lin(m.q_proj, x).reshape(B, T, m.H, m.hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    k = lin(m.k_proj, x).reshape(B, T, m.Hkv, m.hd).transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
    v = lin(m.v_proj, x).reshape(B, T, m.Hkv, m.hd).transpose(0, 2, 1, 3)
    o = attention_np(q, k, v) if spark_kt is None else spark_attention_np(q, k, v, spark_kt, m.r)
    return lin(m.o_proj, o.transpose(0, 2, 1, 3).reshape(B, T, m.H * m.hd))  # [B, T, d]


@pytest.mark.parametrize("bias", [False, True])
def test_attention_modules_match_numpy(bias):
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
    B, H, Hkv, T, hd = 2, 4, 2, 12, 6
    q, k, v = _qkv(B, H, Hkv, T, T, hd)
    run = (lambda q, k, v: attention(q, k, v)) if fn == "attention" else (lambda q, k, v: spark_attention(q, k, v, 3, 2))
    base = run(q, k, v)
    for t in (1, 4, 11):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for a in (q2, k2, v2):
            a[:, :, t:] = 100 * torch.randn_like(a[:, :, t:])  # large: they would win every top-k
        out = run(q2, k2, v2)
        assert_close(f"{fn} outputs before {t}", out[:, :, :t], base[:, :, :t], **F64)
        assert (out[:, :, t:] - base[:, :, t:]).abs().max() > 1e-3  # the perturbation did reach later outputs


@pytest.mark.parametrize("ffn,attn", ALL_VARIANTS)
def test_gpt_is_causal(ffn, attn):
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
    m = model64(ffn=ffn, attn=attn)
    prompt = torch.randint(0, 50, (3, 4))
    out, logits = m.generate(prompt, 14, temperature=1.0, return_logits=True)  # 4 + 14 <= block 24
    assert out.shape == (3, 18) and logits.shape == (3, 14, 50)
    assert torch.equal(out[:, :4], prompt)
    if attn == "spark":
        # The last forward decoded one query against 17 cached keys: it weighed kt = 5 of them.
        assert m.stats()["attn_density"] == pytest.approx([5 / 17] * 2)
    full, _ = m(out[:, :-1])  # [3, 17, V]: position t predicts token t + 1
    assert_close(f"{ffn}/{attn} cached vs full logits", logits, full[:, 3:], **F64)


def test_generate_past_block_size_conditions_on_the_last_block():
    m = model64(ffn="spark", attn="spark", block_size=9)
    prompt = torch.randint(0, 50, (2, 5))
    out, logits = m.generate(prompt, 12, temperature=0.0, return_logits=True)  # 17 tokens > block 9
    for j in range(12):
        ctx = out[:, : 5 + j][:, -9:]  # what nanoGPT conditions on
        full, _ = m(ctx)
        assert_close(f"step {j} logits", logits[:, j], full[:, -1], **F64)
        assert torch.equal(out[:, 5 + j], logits[:, j].argmax(-1))  # temperature 0 = greedy


def test_generate_top_k_samples_only_among_top_k():
    m = model64()
    prompt = torch.randint(0, 50, (4, 3))
    out, logits = m.generate(prompt, 6, temperature=1.3, top_k=2, return_logits=True)
    top2 = torch.topk(logits, 2, dim=-1).indices  # [4, 6, 2]
    assert (top2 == out[:, 3:, None]).any(-1).all()


def test_generate_zero_tokens_and_bad_arguments():
    m = model64()
    prompt = torch.randint(0, 50, (1, 3))
    assert torch.equal(m.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(prompt, 2, top_k=51)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(prompt, -1)
    with pytest.raises(TypeError, match="idx"):
        m.generate(prompt.float(), 2)


def test_forward_rejects_bad_idx():
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
    torch.manual_seed(0)
    m = GPT(tiny(ffn=ffn, attn=attn, bias=True))
    idx = torch.randint(0, 50, (2, 16))
    _, loss = m(idx, torch.roll(idx, -1, 1))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert not missing, f"{ffn}/{attn}: no gradient reached {missing}"
    if ffn == "spark":  # the predictor in particular
        assert all((blk.ffn.K1.grad != 0).any() for blk in m.blocks)


def test_relu_l1_loss_is_ce_plus_lambda_times_layer_mean():
    lam = 0.37  # large, so the L1 part is far above float64 noise
    m = model64(ffn="relu_l1", l1=lam)
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
    idx = torch.randint(0, 50, (2, 20))
    m = model64()  # dense GeGLU: GELU is nonzero almost everywhere; dense attention weighs all
    m(idx)
    st = m.stats()
    assert st["ffn_density"] == [1.0, 1.0] and st["attn_density"] == [1.0, 1.0]
    m = model64(ffn="topk", ffn_density=0.25)  # exact: k = round(0.25 * 48) = 12 per token
    m(idx)
    assert m.stats()["ffn_density"] == pytest.approx([12 / 48] * 2)
    m = model64(ffn="spark", attn="spark", d_ff=400, ffn_density=0.1)  # statistical: about k
    m(idx)
    st = m.stats()
    assert all(0.05 < x < 0.15 for x in st["ffn_density"]), st
    kept = sum(min(5, i + 1) for i in range(20)) / sum(i + 1 for i in range(20))  # kt = 5 of visible
    assert st["attn_density"] == pytest.approx([kept] * 2)
    assert GPT(tiny()).stats() == {"ffn_density": [None, None], "attn_density": [None, None]}


# ------------------------------------------------------------------------------------------
# Configuration: equal parameters, round trip, bad values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [GPTConfig(), tiny(), tiny(d_ff=37, d_model=30, n_head=3, n_kv_head=1)])
def test_parameter_counts_equal_across_variants(base):
    counts = {}
    shapes = {}
    for ffn, attn in ALL_VARIANTS:
        m = GPT(dataclasses.replace(base, ffn=ffn, attn=attn))
        counts[ffn, attn] = m.num_params()
        # outside the FFNs every parameter has the same name and shape
        shapes[ffn, attn] = {n: p.shape for n, p in m.named_parameters() if ".ffn." not in n}
    dense = counts["dense", "dense"]
    for key, n in counts.items():
        assert abs(n - dense) / dense < 0.01, f"{key}: {n} parameters vs dense {dense}"
        if key[0] != "spark":
            assert n == dense, key
        assert shapes[key] == shapes["dense", "dense"], key
    assert base.d_ff % 2 == 1 or counts["spark", "spark"] == dense  # 1.5 f is exact for even f


@pytest.mark.parametrize("c", [GPTConfig(), tiny(bias=True), tiny(ffn="spark", head_dim=6, attn="spark"),
                               tiny(ffn="relu_l1", n_kv_head=1)])
def test_count_params_matches_the_model(c):
    assert count_params(c) == GPT(c).num_params()


def test_config_round_trips_and_defaults():
    c = GPTConfig(ffn="spark", attn="spark", ffn_r=10, head_dim=40)
    assert GPTConfig(**dataclasses.asdict(c)) == c
    d = GPTConfig()
    assert d.ffn_r_ == d.d_model // 2 and d.attn_r_ == d.hd // 2 == 16
    assert dataclasses.replace(d, ffn="spark").ffn_width == 768
    assert dataclasses.replace(d, ffn="spark").ffn_k == round(0.08 * 768)


@pytest.mark.parametrize("kw,word", [
    (dict(ffn="moe"), "ffn"),
    (dict(attn="sparse"), "attn"),
    (dict(act="swish"), "act"),
    (dict(ffn_density=0.0), "ffn_density"),
    (dict(ffn_density=1.01), "ffn_density"),
    (dict(ffn_density=-0.1), "ffn_density"),
    (dict(ffn_density=float("nan")), "ffn_density"),
    (dict(ffn_r=0), "ffn_r"),
    (dict(ffn_r=32), "ffn_r"),  # r = d: nothing left for K2
    (dict(attn_r=0), "attn_r"),
    (dict(attn_r=8), "attn_r"),  # r = hd
    (dict(d_model=30), "d_model"),  # 30 heads of 4 do not divide
    (dict(n_kv_head=3), "n_kv_head"),  # 4 query heads in groups of 3
    (dict(attn_k=0), "attn_k"),
    (dict(n_layer=0), "n_layer"),
    (dict(l1=-1.0), "l1"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises_value_error(kw, word):
    with pytest.raises(ValueError, match=word):
        tiny(**kw)


def test_bad_types_and_module_arguments():
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
    g = spark.gemma2_2b_config()
    dense, sp = count_costs(g, 8192), count_costs(dataclasses.replace(g, ffn="spark", attn="spark"), 8192)
    # REFERENCE.md §3: r f + k (d - r) + k d weights vs 3 d f_gated: 18.1 M vs 63.7 M, 3.52x
    assert sp["ffn_flops"] == 2 * (1024 * 13824 + 1106 * (2304 - 1024) + 1106 * 2304)
    assert dense["ffn_flops"] == 2 * 3 * 2304 * 9216
    assert round(dense["ffn_flops"] / sp["ffn_flops"], 2) == 3.52
    # REFERENCE.md §4, one head without GQA sharing: 2 n hd vs n r + k (hd - r) + k hd
    mha = dict(n_head=8, n_kv_head=8)
    kd = count_costs(spark.gemma2_2b_config(**mha), 8192)["kv_bytes"]
    ks = count_costs(spark.gemma2_2b_config(attn="spark", **mha), 8192)["kv_bytes"]
    assert kd / ks == pytest.approx((2 * 8192 * 256) / (8192 * 128 + 256 * 128 + 256 * 256))
    # Spark attention over n <= kt tokens costs exactly what dense attention does
    t = spark.GPTConfig()
    assert count_costs(dataclasses.replace(t, attn="spark"), 16)["attn_mix_flops"] == count_costs(t, 16)["attn_mix_flops"]
    # parameters: Gemma-2 2B is 2.61 B; ours adds 8192 x 2304 learned positions (19 M)
    assert count_params(g) == pytest.approx(2.614e9 + 8192 * 2304, rel=2e-3)
    with pytest.raises(ValueError, match="n_ctx"):
        count_costs(g, 0)


def test_main_prints_the_cost_table():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        spark.main([])
    text = buf.getvalue()
    assert "Gemma-2 2B" in text and "tiny default config" in text
    assert "3.52x fewer" in text
