"""Tests for spark.py, section 4b: Terraformer's sparse FFN, LTE, Polar selective head attention.

Tolerances. Torch and NumPy do the same float64 arithmetic in a different order (a dense
product times a 0/1 mask against a gather of the selected columns; SDPA against a loop), so they
differ by a few ulps of O(1) outputs: F64 = atol 1e-12, rtol 1e-10 (as tests/test_spark.py). A
wrong selection (another neuron, expert or head) moves an output by 1e-2 or more. Selections
compare scores computed in two orders: only scores within ~1e-16 of each other (or of eta)
could flip, which random float64 data practically never gives.

The modules are built directly here; tests/test_spark.py runs them inside GPT through GPTConfig.
"""

import math

import numpy as np
import pytest
import torch

from conftest import assert_close
from spark import LteFFN, PolarAttention, TerraformerFFN, lte_ffn, lte_ffn_np, polar_attention, polar_attention_np
from spark import polar_keep, terraformer_ffn, terraformer_ffn_np, terraformer_width
from spark import GPT, GatedFFN, GPTConfig, attention_np, gated_ffn_np, relu_np

F64 = dict(atol=1e-12, rtol=1e-10)


def t64(*arrays):
    """NumPy float64 arrays as torch tensors (sharing memory; nothing here writes to them)."""
    return [torch.from_numpy(a) for a in arrays]


def np64(t):
    """A tensor (detached) as a float64 NumPy array, for the references."""
    return t.detach().numpy().astype(np.float64)


def _rng(*seed):
    """A generator seeded by the case's shape: each case its own data, the same on every run."""
    return np.random.default_rng(list(seed))


# ------------------------------------------------------------------------------------------
# Terraformer
# ------------------------------------------------------------------------------------------

# (d, f, r, block, leading shape): block not dividing f (37 = 4 * 8 + 5: a last block of 5;
# 21 = 2 * 8 + 5), one block holding every neuron (block = f), block 1 (every neuron its own
# block: the dense ReLU FFN), two leading axes, a single token, no tokens.
TERRA_SHAPES = [(13, 37, 4, 8, (5,)), (7, 9, 3, 9, (2, 3)), (10, 21, 1, 8, (1,)), (6, 11, 2, 1, (3,)),
                (6, 11, 5, 4, (0,))]


def _terra(d, f, r, lead):
    """x [*lead, d], W1 [d, f], W2 [f, d], M1 [d, r], M2 [r, f], and a Gumbel(0, 1) draw [*lead, f]."""
    g = _rng(d, f, r)
    w = lambda *s: g.standard_normal(s) / math.sqrt(s[0])  # noqa: E731  fan-in scaled: O(1) outputs
    return g.standard_normal(lead + (d,)), w(d, f), w(f, d), w(d, r), w(r, f), g.gumbel(size=lead + (f,))


@pytest.mark.parametrize("d,f,r,block,lead", TERRA_SHAPES)
def test_terraformer_matches_numpy(d, f, r, block, lead):
    """terraformer_ffn (dense product times the one-hot mask) equals terraformer_ffn_np (a gather
    of the chosen columns), without noise (inference) and with noise (a training draw)."""
    x, W1, W2, M1, M2, g = _terra(d, f, r, lead)
    # 0.1 g is what the module draws in training (tau = 0.1); it moves the argmax of some blocks,
    # so the noisy case checks that both sides add the noise before choosing, not after.
    for noise in (None, 0.1 * g):
        ref = terraformer_ffn_np(x, W1, W2, M1, M2, block, noise)
        got = terraformer_ffn(*t64(x, W1, W2, M1, M2), block, None if noise is None else torch.from_numpy(noise))
        assert_close(f"terraformer d={d} f={f} block={block} noise={noise is not None}", got, ref, **F64)


def test_terraformer_one_neuron_per_block_and_the_controller_chooses():
    """Exactly one neuron per block may be nonzero, the last (narrower) block included, and it is
    the block's argmax of x M1 M2; block 1 is the dense ReLU FFN."""
    d, f, r, block = 13, 37, 4, 8
    x, W1, W2, M1, M2, _ = _terra(d, f, r, (50,))
    _, h = terraformer_ffn(*t64(x, W1, W2, M1, M2), block, return_act=True)
    c = x @ M1 @ M2  # [50, f]
    for j in range(0, f, block):  # blocks [0, 8), ..., [32, 37)
        nz = (h[:, j:j + block] != 0).sum(1)
        assert (nz <= 1).all()  # relu may zero the winner: at most one
        win = torch.from_numpy(c[:, j:j + block].argmax(1))
        on = nz == 1
        assert (h[on, j:j + block].abs().argmax(1) == win[on]).all()
    assert (h != 0).sum() > 50  # most winners are positive: the test saw real selections
    # block = 1: every neuron is a block, so nothing is dropped: y = relu(x W1) W2
    assert_close("terraformer block 1", terraformer_ffn_np(x, W1, W2, M1, M2, 1), relu_np(x @ W1) @ W2, **F64)


def test_terraformer_straight_through_gradient():
    """The mask's value is the one-hot exactly (training = inference forward) while M1 and M2 get
    the gradient of the per-block softmax (the straight-through estimator)."""
    # An independent check of the estimator: the gradient M1 gets through the module must be the
    # gradient of the soft surrogate sum_j p_j relu(x W1)_j dL/dh_j with dL/dh held fixed, i.e.
    # the one-hot replaced by the per-block softmax p in the backward pass only.
    d, f, r, block = 6, 12, 3, 4
    x, W1, W2, M1, M2, _ = _terra(d, f, r, (7,))
    X, A, Bm, C, D = t64(x, W1, W2, M1, M2)
    C.requires_grad_(True)
    y = terraformer_ffn(X, A, Bm, C, D, block)
    y.square().sum().backward()
    # by hand: dL/dm = relu(x W1) * (dL/dh), through p = softmax(c) per block (the identity on m)
    C2 = C.detach().clone().requires_grad_(True)
    c = (X @ C2 @ D).view(7, f // block, block)
    p = torch.softmax(c, -1).reshape(7, f)
    hard = torch.nn.functional.one_hot(c.argmax(-1), block).reshape(7, f).double()
    dL_dh = (2 * (torch.relu(X @ A) * hard) @ Bm @ Bm.T).detach()
    (p * torch.relu(X @ A) * dL_dh).sum().backward()
    assert_close("terraformer dL/dM1", C.grad, C2.grad, **F64)


def test_terraformer_width_matches_geglu_parameters():
    """terraformer_width gives 2 d f + r (d + f) within half a block's parameters, block (2 d + r) / 2,
    of a GeGLU's 3 d d_ff (whole blocks): under 1 % at the tiny default and at Gemma-2 2B's shapes
    (the paper's rank 64, blocks of 32); 3.6 % at the tiny odd size 33 x 70 with blocks of 7."""
    cases = [(128, 512, 16, 16, 1), (2304, 9216, 64, 32, 1), (33, 70, 5, 7, 4), (128, 512, 32, 32, 2)]
    for d, d_ff, r, block, pct in cases:
        f = terraformer_width(d, d_ff, r, block)
        assert f % block == 0
        excess = 2 * d * f + r * (d + f) - 3 * d * d_ff
        assert abs(excess) <= block * (2 * d + r) / 2 and abs(excess) < pct / 100 * 3 * d * d_ff, (d, d_ff, r, block, f)
    assert terraformer_width(128, 512, 16, 16) == 720  # +0.65 %, the controller is 6.9 % of it
    m = TerraformerFFN(128, 720, 16, 16)
    assert sum(p.numel() for p in m.parameters()) == 2 * 128 * 720 + 16 * (128 + 720) == 197888


# ------------------------------------------------------------------------------------------
# LTE
# ------------------------------------------------------------------------------------------

# (d, f, E, leading shape): E not dividing f (37 = 5 experts of 8, 8, 7, 7, 7), one expert,
# one neuron per expert, two leading axes, no tokens.
LTE_SHAPES = [(13, 37, 5, (9,)), (7, 9, 1, (2, 3)), (10, 6, 6, (4,)), (6, 11, 3, (0,))]


def _lte(d, f, E, lead):
    """x [*lead, d], Wg and Wu [d, f], Wd [f, d], Wr [d, E]."""
    g = _rng(d, f, E, 1)
    w = lambda *s: g.standard_normal(s) / math.sqrt(s[0])  # noqa: E731
    # Wr unscaled: router logits of O(3), scores spread over (0, 1), experts both on and off
    return g.standard_normal(lead + (d,)), w(d, f), w(d, f), w(f, d), g.standard_normal((d, E))


@pytest.mark.parametrize("d,f,E,lead", LTE_SHAPES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # eff of zero tokens: NumPy's mean of nothing, NaN on both sides
def test_lte_matches_numpy(d, f, E, lead):
    """lte_ffn (dense product times the expert mask) equals lte_ffn_np (active experts' columns
    only), y and the efficiency term, for eta = 0, 0.5 and 0.9."""
    x, Wg, Wu, Wd, Wr = _lte(d, f, E, lead)
    # eta 0: every expert runs (a sigmoid is > 0); 0.5: the paper's threshold, about half run;
    # 0.9: few run, and tokens with no expert at all give y = 0 on both sides.
    for eta in (0.0, 0.5, 0.9):
        y_ref, eff_ref = lte_ffn_np(x, Wg, Wu, Wd, Wr, E, eta)
        y, eff = lte_ffn(*t64(x, Wg, Wu, Wd, Wr), E, eta)
        assert_close(f"lte y d={d} f={f} E={E} eta={eta}", y, y_ref, **F64)
        assert_close(f"lte eff d={d} f={f} E={E} eta={eta}", eff, np.float64(eff_ref), **F64)


def test_lte_experts_are_contiguous_and_thresholded():
    """Each active expert is a contiguous run of neurons (8, 8, 7, 7, 7 of 37), all on or all off,
    on exactly when sigmoid(x Wr) > eta; eta = 0 is the dense GeGLU."""
    d, f, E = 13, 37, 5
    x, Wg, Wu, Wd, Wr = _lte(d, f, E, (40,))
    y, eff, a = lte_ffn(*t64(x, Wg, Wu, Wd, Wr), E, 0.5, return_act=True)
    s = 1 / (1 + np.exp(-(x @ Wr)))
    bounds = [0, 8, 16, 23, 30, 37]
    for i in range(E):
        on = (a[:, bounds[i]:bounds[i + 1]] != 0).any(1).numpy()
        assert (on == (s[:, i] > 0.5)).all()
    assert 0.2 < (a != 0).double().mean() < 0.8  # some experts on, some off
    dense = gated_ffn_np(x, Wg, Wu, Wd, "gelu")
    assert_close("lte eta 0 = GeGLU", lte_ffn_np(x, Wg, Wu, Wd, Wr, E, 0.0)[0], dense, **F64)


def test_lte_straight_through_router_gradient():
    """The router's gradient is the soft routing's: d/dWr of sum_i s_i E_i(x) (value: the threshold's)."""
    # As for Terraformer: the surrogate sum_i s_i E_i(x) written out by hand, with experts of 3
    # neurons; its gradient in Wr must be the straight-through one the module's router gets.
    d, f, E = 7, 12, 4
    x, Wg, Wu, Wd, Wr = _lte(d, f, E, (5,))
    X, G, U, D, R = t64(x, Wg, Wu, Wd, Wr)
    R.requires_grad_(True)
    y, _ = lte_ffn(X, G, U, D, R, E, 0.5)
    (y * torch.arange(d)).sum().backward()
    # by hand: dL/ds_i = <dL/dy, E_i(x)>, E_i(x) = (gelu(x Wg_I) * (x Wu_I)) Wd_I
    R2 = R.detach().clone().requires_grad_(True)
    s = torch.sigmoid(X @ R2)  # [5, E]
    h = torch.nn.functional.gelu(X @ G, approximate="tanh") * (X @ U)  # [5, f]
    Ei = torch.stack([h[:, 3 * i:3 * i + 3] @ D[3 * i:3 * i + 3] for i in range(E)], 1)  # [5, E, d]
    (s * (Ei @ torch.arange(d).double())).sum().backward()
    assert_close("lte dL/dWr", R.grad, R2.grad, **F64)


def test_lte_parameters():
    """3 d f + d E: the router is 1 % over the GeGLU at d 128, f 512, 16 experts of 32."""
    m, dense = LteFFN(128, 512, 16), GatedFFN(128, 512)
    n, n0 = (sum(p.numel() for p in mod.parameters()) for mod in (m, dense))
    assert n - n0 == 128 * 16 and (n - n0) / n0 < 0.011


# ------------------------------------------------------------------------------------------
# Polar selective head attention
# ------------------------------------------------------------------------------------------

# (B, H, Hkv, T, S, hd): GQA without a cache, odd T and hd; MHA with a cache (S > T); decode
# (T = 1) under GQA; multi-query (Hkv = 1: one group); a cache and GQA with G = 3.
POLAR_SHAPES = [(2, 4, 2, 7, 7, 5), (1, 3, 3, 5, 9, 4), (3, 4, 2, 1, 6, 3), (2, 2, 1, 5, 5, 6), (2, 6, 2, 3, 8, 7)]


def _polar(B, H, Hkv, T, S, hd, seed=0):
    """Seeded float64 q [B, H, T, hd], k and v [B, Hkv, S, hd] (unit variance: O(1) scores), and the generator."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, t, hd, dtype=torch.float64, generator=g) for n, t in ((H, T), (Hkv, S), (Hkv, S)))
    return q, k, v, g


@pytest.mark.parametrize("B,H,Hkv,T,S,hd", POLAR_SHAPES)
def test_polar_matches_numpy(B, H, Hkv, T, S, hd):
    """polar_attention (all heads, masked) equals polar_attention_np (selected heads only), routing
    heads (Hr = H) and KV groups (Hr = Hkv), every h_top; h_top = Hr is dense attention."""
    q, k, v, g = _polar(B, H, Hkv, T, S, hd)
    # Routing heads under GQA (Hr = H > Hkv) and routing groups (Hr = Hkv) select differently;
    # with Hkv = H the two are the same case. Every h_top from 1 to Hr, the last one keeping all.
    for Hr in sorted({H, Hkv}):
        logits = torch.randn(B, T, Hr, dtype=torch.float64, generator=g)
        for h_top in range(1, Hr + 1):
            ref = polar_attention_np(np64(q), np64(k), np64(v), np64(logits), h_top)
            assert_close(f"polar Hr={Hr} h_top={h_top}", polar_attention(q, k, v, logits, h_top), ref, **F64)
        assert_close(f"polar Hr={Hr} all kept", ref, attention_np(np64(q), np64(k), np64(v)), **F64)


def test_polar_zeroes_exactly_the_unselected_heads():
    """Under GQA routing (Hr = Hkv) a token keeps the G heads of its h_top highest-logit groups, the
    others are exactly 0, and the kept heads equal plain attention."""
    B, H, Hkv, T, hd = 2, 6, 3, 5, 4
    q, k, v, g = _polar(B, H, Hkv, T, T, hd)
    logits = torch.randn(B, T, Hkv, dtype=torch.float64, generator=g)
    out, dense = polar_attention(q, k, v, logits, 2, return_dense=True)
    keep = polar_keep(logits, 2).repeat_interleave(2, -1).transpose(1, 2).bool()  # [B, H, T]
    assert (keep.sum(1) == 4).all()  # 2 groups of G = 2 heads per token
    assert (out[~keep] == 0).all() and (out[keep] != 0).all()
    assert_close("polar kept heads", out[keep], dense[keep], **F64)
    assert_close("polar dense", dense, attention_np(np64(q), np64(k), np64(v)), **F64)


# ------------------------------------------------------------------------------------------
# Modules: causality, gradients, decode with a cache
# ------------------------------------------------------------------------------------------


def _modules():
    """One small module of each kind, seeded: d 16; Terraformer f 24 in blocks of 5 (the last of
    4), rank 4; LTE f 24 in 5 experts; Polar 4 heads in 2 KV groups of 2, keeping 1 group."""
    torch.manual_seed(0)
    return {"terraformer": TerraformerFFN(16, 24, 5, 4), "lte": LteFFN(16, 24, 5),
            "polar": PolarAttention(16, 4, 2, 4, 1)}


@pytest.mark.parametrize("name", ["terraformer", "lte", "polar"])
def test_modules_are_causal(name):
    """Changing (and inflating) the input at positions >= t changes no output before t (eval mode,
    float64), and does change later ones."""
    # The FFNs act on each token alone; Polar routes each token on its own x_t and attends
    # causally. A routing that pooled the sequence (one choice per sequence, from the mean of
    # its tokens, say) would let a future token change earlier selections and fail here.
    m = _modules()[name].double().eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    base = m(x)
    for t in (1, 6, 10):
        x2 = x.clone()
        x2[:, t:] = 10 * torch.randn(2, 11 - t, 16, dtype=torch.float64)
        out = m(x2)
        assert_close(f"{name} outputs before {t}", out[:, :t], base[:, :t], **F64)
        assert (out[:, t:] - base[:, t:]).abs().max() > 1e-3


def test_polar_decode_with_cache_equals_full_forward():
    """Token by token against a KV cache (routing each new token alone) gives the full forward's outputs."""
    # A prefill of 4 tokens, then one token at a time: the cache must hold K and V of every
    # group, also of groups a token skipped, since a later token may select them.
    m = _modules()["polar"].double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full, cache = m(x), {}
    steps = [m(x[:, :4], cache)] + [m(x[:, i:i + 1], cache) for i in range(4, 9)]
    assert_close("polar cached decode", torch.cat(steps, 1), full, **F64)


@pytest.mark.parametrize("name", ["terraformer", "lte", "polar"])
def test_modules_train_every_parameter(name):
    """In training mode, the output plus the module's own loss term (LTE's efficiency term, Polar's
    router loss) give every parameter a nonzero gradient: the controllers and routers included."""
    # float32 and training mode: the path GPT trains on (Terraformer draws its Gumbel noise).
    # y^2 is a stand-in for the model's loss; the router loss and the efficiency term are the
    # only paths to Polar's router and the main push on LTE's, so they are added as GPT will.
    m = _modules()[name].train()
    y = m(torch.randn(3, 7, 16))
    loss = y.square().mean() + {"terraformer": 0, "lte": m.last_eff if name == "lte" else 0,
                                "polar": m.last_aux if name == "polar" else 0}[name]
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient in {n}"
    if name == "terraformer":  # at most one active neuron per block of 5 (24 = 4 blocks of 5 + 4)
        assert ((m.last_act != 0).sum(-1) <= 5).all()


def test_polar_router_loss_trains_router_only_and_learns_the_targets():
    """The router loss reaches the router and nothing else (it reads x.detach(), targets detached),
    and minimising it teaches the router the groups of largest output norm."""
    torch.manual_seed(0)
    m = PolarAttention(16, 4, 4, 4, 2).double()
    x = torch.randn(4, 12, 16, dtype=torch.float64, requires_grad=True)
    m(x)
    m.last_aux.backward()
    assert x.grad is None or x.grad.abs().sum() == 0
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("router"))
    x = x.detach()

    @torch.no_grad()
    def agreement():  # fraction of (token, head) keep/drop decisions the router gets right
        _, dense = polar_attention(*m._qkv(x, None), m.router(x), 2, return_dense=True)
        target = polar_keep(dense.square().sum(-1).transpose(1, 2), 2)  # [B, T, H] (Hkv = H: groups are heads)
        return float((polar_keep(m.router(x), 2) == target).double().mean())

    before = agreement()
    opt = torch.optim.Adam(m.router.parameters(), lr=0.05)
    for _ in range(300):  # the attention weights stay fixed: a fixed classification problem
        opt.zero_grad()
        m(x)
        m.last_aux.backward()
        opt.step()
    # Chance is 0.5 (2 of 4 kept). A linear router on x_t alone cannot be perfect: a head's output
    # norm depends on the earlier tokens it attends to. Measured: 0.51 -> 0.83 (0.84 at 1000 steps).
    assert before < 0.6 and agreement() > 0.75, (before, agreement())
    assert m.last_density == 0.5


def test_polar_router_parameters():
    """The router adds (d + 1) Hkv parameters to Attention's: 258 at d 128 with 2 KV heads (0.4 %)."""
    m = PolarAttention(128, 4, 2, 32, 1)
    n = sum(p.numel() for p in m.parameters())
    n_attn = 128 * 32 * (2 * 4 + 2 * 2)
    assert n - n_attn == 129 * 2 and (n - n_attn) / n_attn < 0.006


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    """Each bad argument gets a ValueError (TypeError for a non-integer count) naming it, in the
    NumPy reference and in the torch version alike."""
    # Terraformer: block 0 and block > f, a transposed M2, noise of the wrong width.
    x, W1, W2, M1, M2, g = _terra(6, 10, 2, (3,))
    with pytest.raises(ValueError, match="block"):
        terraformer_ffn_np(x, W1, W2, M1, M2, 0)
    with pytest.raises(ValueError, match="block"):
        terraformer_ffn(*t64(x, W1, W2, M1, M2), 11)  # more than f
    with pytest.raises(ValueError, match="M2"):
        terraformer_ffn_np(x, W1, W2, M1, M2.T, 2)
    with pytest.raises(ValueError, match="noise"):
        terraformer_ffn(*t64(x, W1, W2, M1, M2), 2, torch.zeros(3, 9, dtype=torch.float64))
    # LTE: more experts than neurons, Wr for the wrong expert count, eta outside [0, 1), a bool.
    x, Wg, Wu, Wd, Wr = _lte(6, 10, 3, (2,))
    for bad, word in (((Wr, 11, 0.5), "n_experts"), ((Wr, 2, 0.5), "Wr"), ((Wr, 3, 1.0), "eta"),
                      ((Wr, 3, -0.1), "eta"), ((Wr, 3, True), "eta")):
        with pytest.raises(ValueError, match=word):
            lte_ffn_np(x, Wg, Wu, Wd, *bad)
        with pytest.raises(ValueError, match=word):
            lte_ffn(*t64(x, Wg, Wu, Wd), torch.from_numpy(bad[0]), *bad[1:])
    with pytest.raises(TypeError, match="n_experts"):
        LteFFN(6, 10, 2.5)
    # Polar: a router width that is neither H nor Hkv, the wrong T, h_top above Hr and h_top 0.
    q, k, v, _ = _polar(2, 4, 2, 5, 5, 3)
    for logits, h_top, word in ((torch.zeros(2, 5, 3), 1, "router_logits"), (torch.zeros(2, 4, 4), 1, "router_logits"),
                                (torch.zeros(2, 5, 2), 3, "h_top"), (torch.zeros(2, 5, 4), 0, "h_top")):
        with pytest.raises(ValueError, match=word):
            polar_attention(q, k, v, logits, h_top)
        with pytest.raises(ValueError, match=word):
            polar_attention_np(np64(q), np64(k), np64(v), logits.numpy(), h_top)
    with pytest.raises(ValueError, match="h_top"):
        PolarAttention(16, 4, 2, 4, 3)  # 3 of 2 KV groups


def test_the_kernel_decoders_refuse_polar_models():
    """kernels_cpu.generate_cpu (and kernels_gpu.generate_gpu, through the same check) decode dense
    and Spark attention only: a Polar model is an error naming the layer, not a silent dense decode."""
    import kernels_cpu  # (only this test needs it)

    model = GPT(GPTConfig(ffn="dense", attn="polar")).eval()
    with pytest.raises(ValueError, match="Polar attention has no decoder"):
        kernels_cpu.generate_cpu(model, torch.zeros(1, 3, dtype=torch.long), 2)
