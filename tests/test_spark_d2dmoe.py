"""Tests for D2DMoE (arXiv 2310.04361; spark.py, section 4b, and train_tiny.py --d2dmoe): the layer against its NumPy reference, tau = 0 as the dense
ReLU FFN, the clustering, the router's regression, and the conversion of a small trained GPT.

Tolerances. Torch and NumPy do the same float64 arithmetic in a different order (a dense product
times a 0/1 mask against a gather of the executed neurons), so outputs of size O(1) differ by a
few ulps: F64 = atol 1e-12, rtol 1e-10 (as tests/test_spark.py). A wrong selection moves an output
by 1e-2 or more. The selections compare router outputs computed in two orders: only norms within
~1e-16 of tau times the largest could flip, which random float64 data practically never gives, so
the executed experts are compared exactly.
"""

import math

import numpy as np
import pytest
import torch

from conftest import assert_close
from spark import (D2DMoEFFN, GatedFFN, ReluL1FFN, d2dmoe_cluster, d2dmoe_convert, d2dmoe_convert_gpt,
                   d2dmoe_expert_norms, d2dmoe_ffn, d2dmoe_ffn_np, d2dmoe_tradeoff, gated_ffn, gated_ffn_np)
import spark
import train_tiny as tt

F64 = dict(atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------
# The layer: NumPy reference, torch version, module
# ------------------------------------------------------------------------------------------

def _case(d, f, E, R, lead):
    """x [*lead, d], Wg Wu [d, f], Wd [f, d], Wr1 [d, R], Wr2 [R, E] (fan-in scaled: O(1) outputs), and
    groups [f] of random expert ids (some experts may be empty: the function does not mind)."""
    g = np.random.default_rng([d, f, E, R])
    w = lambda *s: g.standard_normal(s) / math.sqrt(s[0])  # noqa: E731
    return g.standard_normal(lead + (d,)), w(d, f), w(d, f), w(f, d), g.integers(0, E, f), w(d, R), w(R, E)


# (d, f, E, R, leading shape, tau): E not dividing f, one expert per neuron (E = f), a single
# expert (E = 1: always executed), a router of width 1, no tokens, tau 0 and tau 1.
SHAPES = [(13, 37, 5, 7, (5,), 0.3), (7, 9, 9, 3, (2, 3), 0.5), (10, 21, 1, 4, (1,), 0.7),
          (6, 11, 4, 1, (3,), 1.0), (6, 11, 4, 2, (0,), 0.2), (5, 8, 3, 6, (4,), 0.0)]


@pytest.mark.parametrize("d,f,E,R,lead,tau", SHAPES)
def test_torch_matches_numpy(d, f, E, R, lead, tau):
    """d2dmoe_ffn against d2dmoe_ffn_np in float64: y to F64, the executed experts exactly; the
    module gives the same from its Parameters."""
    x, Wg, Wu, Wd, groups, Wr1, Wr2 = _case(d, f, E, R, lead)
    y_ref, keep_ref = d2dmoe_ffn_np(x, Wg, Wu, Wd, groups, Wr1, Wr2, tau)
    # the same arrays as tensors (groups stays int64: it indexes the expert mask)
    t = [torch.from_numpy(a) for a in (x, Wg, Wu, Wd, groups, Wr1, Wr2)]
    y, keep = d2dmoe_ffn(*t, tau)
    assert_close("y", y, y_ref, **F64)
    assert_close("keep", keep, keep_ref, 0, 0)
    if len(x.reshape(-1, d)):  # dynamic-k: at least one expert (the largest), at most E
        assert keep_ref.sum(-1).min() >= 1
    # the module holds the same arrays under the same names (groups as a buffer)
    m = D2DMoEFFN(d, f, E, R, tau).double()
    with torch.no_grad():
        for name, a in zip(("Wg", "Wu", "Wd", "groups", "Wr1", "Wr2"), t[1:]):
            getattr(m, name).copy_(a)
    assert_close("module y", m(t[0]), y_ref, **F64)


def test_tau_zero_is_the_dense_relu_ffn():
    """tau = 0 runs every expert: the NumPy reference equals gated_ffn_np(act relu) to F64 (gathers
    sum in another order), the torch version equals gated_ffn(act relu) bit for bit (a * 1 = a)."""
    x, Wg, Wu, Wd, groups, Wr1, Wr2 = _case(12, 40, 6, 5, (3, 7))
    Wr2[:, 2] = -Wr2[:, 2] - 1.0  # an expert whose predicted norm is clamped at 0: it runs all the same
    y_np, keep = d2dmoe_ffn_np(x, Wg, Wu, Wd, groups, Wr1, Wr2, 0.0)
    assert keep.all()
    assert_close("np tau 0", y_np, gated_ffn_np(x, Wg, Wu, Wd, "relu"), **F64)
    t = [torch.from_numpy(a) for a in (x, Wg, Wu, Wd, groups, Wr1, Wr2)]
    assert torch.equal(d2dmoe_ffn(*t, 0.0)[0], gated_ffn(*t[:4], "relu"))


# ------------------------------------------------------------------------------------------
# The conversion: clustering and router
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("f,E,N", [(37, 5, 50), (64, 8, 200), (9, 9, 10), (10, 1, 5), (7, 3, 1)])
def test_clustering_is_a_balanced_partition(f, E, N):
    """Every neuron in exactly one expert, sizes f // E or f // E + 1 (the first f % E experts),
    and the same groups twice (deterministic)."""
    # every neuron fires on a random 30 % of the tokens: no structure, so only the balance is tested
    active = np.random.default_rng([f, E]).random((f, N)) < 0.3
    groups = d2dmoe_cluster(active, E)
    assert groups.shape == (f,) and groups.dtype == np.int64 and 0 <= groups.min() and groups.max() < E
    # a partition (every neuron once: groups is one id per neuron) with the balanced sizes
    assert np.bincount(groups, minlength=E).tolist() == [f // E + (e < f % E) for e in range(E)]
    assert np.array_equal(groups, d2dmoe_cluster(active, E))


def test_clustering_finds_neurons_that_fire_together():
    """Planted structure: 6 groups of 8 neurons, each group firing on its own random third of the
    tokens (with 5 % of the bits flipped), shuffled. The clustering puts each planted group in one
    expert: the partitions agree up to relabelling."""
    g = np.random.default_rng(0)
    planted = g.permutation(np.repeat(np.arange(6), 8))  # [48] the true group of each neuron
    fires = g.random((6, 300)) < 1 / 3  # [6, N] when each group fires
    active = fires[planted] ^ (g.random((48, 300)) < 0.05)  # [48, N]
    groups = d2dmoe_cluster(active, 6)
    # each planted group lands in a single expert (6 groups of 8 in 6 experts of 8: a bijection)
    assert all(len(set(groups[planted == p])) == 1 for p in range(6)), groups


def test_router_predicts_norms_better_than_a_constant():
    """A random ReLU FFN with fan-in scaled weights (O(1) norms), 4096 Gaussian sample tokens, a
    router of width 16, 300 steps: on 1024 fresh tokens its MSE is below 0.6 of the best constant's
    (each expert's mean norm on the samples); a run gave 0.38. (Random weights are the hard case:
    on the layers of trained tiny GPTs, relu and relu_l1, it was 0.02-0.12.) ReluL1FFN converts the same way."""
    torch.manual_seed(0)
    d, f, E = 16, 64, 8
    ffn = GatedFFN(d, f, "relu")
    with torch.no_grad():
        for w in (ffn.Wg, ffn.Wu, ffn.Wd):
            w.copy_(torch.randn(w.shape) / math.sqrt(w.shape[0]))
    x, x_new = torch.randn(4096, d), torch.randn(1024, d)  # the samples the router learns from; fresh tokens
    moe = d2dmoe_convert(ffn, x, E, hidden=16)
    with torch.no_grad():
        truth = d2dmoe_expert_norms(x_new, moe.Wg, moe.Wu, moe.Wd, moe.groups, E)  # [1024, E]
        const = d2dmoe_expert_norms(x, moe.Wg, moe.Wu, moe.Wd, moe.groups, E).mean(0)  # [E]
        pred = torch.relu(x_new @ moe.Wr1) @ moe.Wr2  # [1024, E]
    # MSE over tokens and experts: the router's raw prediction, and the best constant's
    mse, mse_const = ((pred - truth) ** 2).mean().item(), ((const - truth) ** 2).mean().item()
    assert mse < 0.6 * mse_const, (mse, mse_const)
    l1 = ReluL1FFN(d, f)
    assert torch.equal(d2dmoe_convert(l1, x[:64], E, steps=2)(x[:5]), l1(x[:5]))  # (tau 0: exact)


def test_module_gradients_and_density():
    """The FFN weights get gradients (fine-tuning after conversion is possible), the router none
    (it learns by regression only); last_act is zero outside the executed experts."""
    torch.manual_seed(0)
    m = D2DMoEFFN(8, 24, 6, 4, tau=0.5)
    x = torch.randn(3, 5, 8)
    m(x).square().sum().backward()  # any scalar of the output
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.Wg, m.Wu, m.Wd))
    assert m.Wr1.grad is None and m.Wr2.grad is None
    assert m.last_keep.shape == (3, 5, 6) and not m.last_keep.all()
    # tau 0.5 skips some experts; their neurons' activations are exact zeros (GPT.stats counts them out)
    assert (m.last_act[~m.last_keep[..., m.groups]] == 0).all()


# ------------------------------------------------------------------------------------------
# A whole GPT, its trade-off, and train_tiny.py --d2dmoe
# ------------------------------------------------------------------------------------------

def test_conversion_of_a_trained_gpt_and_train_tiny_d2dmoe(tmp_path, monkeypatch, capsys):
    """A 2-layer ReLU GPT trained 30 steps on a small text: converted, it gives the model's logits
    exactly at tau 0; the trade-off runs every expert at tau 0 and fewer as tau grows;
    train_tiny.py --d2dmoe reads the checkpoint and prints the table."""
    monkeypatch.chdir(tmp_path)  # (nothing lands in the repository)
    # ~7 k characters of a learnable pattern, and train_tiny's flags for a model of ~4 ms steps
    rng = np.random.default_rng(0)
    who, what = ["the king", "a fool", "my lord", "the queen"], ["speaks", "laughs", "weeps", "sings"]
    (tmp_path / "t.txt").write_text("".join(f"{who[rng.integers(4)]} {what[rng.integers(4)]}.\n" for _ in range(300)))
    argv = ["--data", str(tmp_path / "t.txt"), "--ffn", "relu", "--attn", "dense", "--n-layer", "2", "--n-head", "2",
            "--n-kv-head", "1", "--d-model", "32", "--d-ff", "64", "--block-size", "16", "--batch-size", "8",
            "--lr", "1e-2", "--warmup", "2", "--max-steps", "30", "--eval-interval", "30", "--eval-iters", "1",
            "--final-eval-iters", "1", "--out", str(tmp_path / "ck")]
    res = tt.train(tt.build_parser().parse_args(argv))
    model, data = res["model"].eval(), tt.prepare_data(tt.build_parser().parse_args(argv))
    idx = data["val"][:48].view(3, 16)  # three windows of the validation split
    # tau 0 (the conversion's default) runs every expert: a * 1 = a, so the logits are bit-identical
    with torch.no_grad():
        before = model(idx)[0]
        d2dmoe_convert_gpt(model, data["train"], 4, batches=2, batch_size=8, steps=30)
        assert torch.equal(model(idx)[0], before)
    # the trade-off: all neurons at tau 0, fewer (never more) as tau grows, at least one expert at tau 1
    rows = d2dmoe_tradeoff(model, data["val"], (0.0, 0.2, 0.5, 1.0), batches=2)
    assert rows[0]["executed"] == 1.0 and rows[0]["experts"] == 4 and rows[-1]["experts"] >= 1
    assert all(a["executed"] >= b["executed"] for a, b in zip(rows, rows[1:])) and rows[-1]["executed"] < 1
    assert all(np.isfinite(r["loss"]) for r in rows)
    # train_tiny.py --d2dmoe reads the checkpoint train() wrote and prints one row per tau
    out = tt.main(["--d2dmoe", "--out", str(tmp_path / "ck")])
    assert [r["tau"] for r in out["rows"]] == list(tt.D2DMOE_TAUS) and out["table"] in capsys.readouterr().out
    assert "| 0.0 |" in out["table"] and "+0.00 %" in out["table"]


# ------------------------------------------------------------------------------------------
# Bad input: clear errors that name the argument
# ------------------------------------------------------------------------------------------

def _arrays():
    """A valid case (d 6, f 10, E 3, R 4, two tokens) that each bad-input case spoils in one place."""
    return _case(6, 10, 3, 4, (2,))


# (the one argument changed, what the error must say): groups of the wrong length, an expert id
# out of range, float ids, a plain list; router matrices that do not fit d or each other; a
# gated FFN that does not fit; tau out of [0, 1], or a bool.
@pytest.mark.parametrize("change, match", [
    (dict(groups=np.zeros(9, np.int64)), "groups must be an int array"),
    (dict(groups=np.full(10, 3)), r"expert ids in \[0, E\)"),
    (dict(groups=np.zeros(10)), "groups must be an int array"),
    (dict(groups=list(range(10))), "groups must be an int array"),
    (dict(Wr1=np.zeros((5, 4))), "router shapes"),
    (dict(Wr2=np.zeros((3, 3))), "router shapes"),
    (dict(Wd=np.zeros((10, 5))), "gated FFN shapes"),
    (dict(tau=1.5), "tau must be a number in"),
    (dict(tau=-0.1), "tau must be a number in"),
    (dict(tau=True), "tau must be a number in"),
])
@pytest.mark.parametrize("fn", ["np", "torch"])
def test_bad_layer_input(change, match, fn):
    """Wrong shapes, dtypes and tau: a ValueError naming the argument, from both versions."""
    args = dict(zip(("x", "Wg", "Wu", "Wd", "groups", "Wr1", "Wr2"), _arrays()), tau=0.5)
    args.update(change)
    if fn == "torch":
        args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        (d2dmoe_ffn_np if fn == "np" else d2dmoe_ffn)(**args)


def test_bad_conversion_input():
    """Conversions refuse what they cannot convert, naming the argument."""
    x = torch.randn(20, 8)
    # one FFN: a GELU FFN has no exact zeros to group, samples must have the FFN's width, E <= f
    with pytest.raises(TypeError, match="ReLU-gated FFN"):
        d2dmoe_convert(GatedFFN(8, 16, "gelu"), x, 4)
    with pytest.raises(ValueError, match=r"x_samples must be a tensor \[..., d\]"):
        d2dmoe_convert(GatedFFN(8, 16, "relu"), torch.randn(20, 7), 4)
    with pytest.raises(ValueError, match="n_experts must be in"):
        d2dmoe_convert(GatedFFN(8, 16, "relu"), x, 17)
    # a whole GPT: a GeGLU model is refused, so are tokens that are too few, floats, or 2-D; a trade-off
    # needs the converted model
    c = dict(n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=16, block_size=8, vocab_size=10, attn="dense")
    with pytest.raises(ValueError, match="ffn 'relu' or 'relu_l1'"):
        d2dmoe_convert_gpt(spark.GPT(spark.GPTConfig(ffn="dense", **c)), torch.arange(20) % 10, 4)
    relu = spark.GPT(spark.GPTConfig(ffn="relu", **c))
    for tokens in (torch.arange(8), torch.rand(20), torch.zeros(2, 20, dtype=torch.long)):
        with pytest.raises(ValueError, match="tokens must be a 1-D int tensor"):
            d2dmoe_convert_gpt(relu, tokens, 4)
    with pytest.raises(ValueError, match="run d2dmoe_convert_gpt first"):
        d2dmoe_tradeoff(relu, torch.arange(20) % 10)
