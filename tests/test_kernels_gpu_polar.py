"""Tests for the Polar selective head attention decode kernel (kernels_gpu.py, section 7e) against
spark.polar_attention_np, and for its generalised split and merge kernels against kernels_gpu's.

Where this runs: without CUDA tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run in
Triton's interpreter on CPU tensors, at small awkward shapes: caches of 1, 37 and 100 tokens in
splits of 16 (1, 3 and 7 splits, the last partial); hd 16 and 24 (24 pads to 32); h_top = 1 and
h_top = Hkv; grouped-query heads (H 4, Hkv 2) and H = Hkv; batch 3 with a different table per
sequence, in no particular order; lengths. The `gpu` tests add CUDA graph capture and bf16.

Reference: spark.polar_attention_np(q, k, v, router_logits, h_top) with T = 1 (the query sees
the whole cache, or its first lengths[b] tokens: the reference then runs on the truncated
cache) and router logits [B, 1, Hkv] that are 1 at heads[b] and 0 elsewhere, so that its top
h_top (ties: lower index, but there are none across the 1 / 0 boundary) are exactly the table.

Tolerances: float32, as tests/test_kernels_gpu_decode.py's dense decode: sums of at most a few
hundred float32 terms of O(1) products (scores, softmax, the weighted sum of V), a few float32
ulps, atol = rtol = 1e-5. Heads whose group is not kept must be exactly 0, and the generalised
kernels must give kernels_gpu's dense and Spark results bit for bit (atol = rtol = 0).
"""

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, assert_close, run_in_cuda_graph
import kernels_gpu as pg
import kernels_gpu as dg
import spark

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the CPU runs the kernels in Triton's interpreter
pytestmark = pytest.mark.skipif(dg.triton is None, reason="needs triton (none on this platform)")


@pytest.fixture(autouse=True)
def _small_launches(monkeypatch):
    """Splits of 16 cache tokens at these sizes (both modules: _split reads kernels_gpu's settings)."""
    for mod in (dg, pg):
        monkeypatch.setattr(mod, "ATTN_BN", 16)
    monkeypatch.setattr(dg, "MIN_SPLIT", 16)
    monkeypatch.setattr(dg, "TARGET_PROGRAMS", 8)


def rand(*shape, dtype=torch.float32):
    """Drawn in float64 and rounded: the reference gets exactly the kernel's values."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(DEVICE)


def np64(t):
    """A tensor's values as a float64 NumPy array (exact for float32 and bf16), for the reference."""
    return t.detach().cpu().double().numpy()


def kv_case(B, H, Hkv, n, hd, dtype=torch.float32):
    """q [B, H, 1, hd] and a cache k, v [B, Hkv, n, hd] of standard normal values on DEVICE."""
    return rand(B, H, 1, hd, dtype=dtype), rand(B, Hkv, n, hd, dtype=dtype), rand(B, Hkv, n, hd, dtype=dtype)


def random_tables(B, Hkv, HT, dtype=torch.int32):
    """heads [B, HT]: HT distinct groups per sequence, drawn independently, in random order."""
    return torch.stack([torch.randperm(Hkv)[:HT] for _ in range(B)]).to(DEVICE, dtype)


def reference(q, k, v, heads, lengths=None):
    """spark.polar_attention_np with T = 1, per sequence (on its first lengths[b] tokens), with
    router logits 1 at heads[b] and 0 elsewhere. -> [B, H, 1, hd] float64"""
    B, Hkv, n = k.shape[0], k.shape[1], k.shape[2]
    out = []
    # one sequence at a time: each has its own table and its own number of visible tokens
    for b in range(B):
        L = n if lengths is None else min(max(int(lengths[b]), 1), n)  # (the kernel clamps to [1, n])
        # router logits [1, T = 1, Hkv]: 1 at the kept groups, so the top h_top are exactly heads[b]
        logits = np.zeros((1, 1, Hkv))
        logits[0, 0, heads[b].cpu().numpy()] = 1.0
        out.append(spark.polar_attention_np(np64(q[b:b + 1]).reshape(1, q.shape[1], 1, -1), np64(k[b:b + 1, :, :L]),
                                            np64(v[b:b + 1, :, :L]), logits, heads.shape[1]))
    return np.concatenate(out)


def kept_mask(heads, H, Hkv):
    """bool [B, H]: the query heads whose group is in the table."""
    G = H // Hkv
    m = torch.zeros(heads.shape[0], Hkv, dtype=torch.bool)  # [B, Hkv] kept groups
    m[torch.arange(heads.shape[0])[:, None], heads.cpu().long()] = True
    return m.repeat_interleave(G, dim=1)  # group g serves query heads g G .. g G + G - 1


# (B, H, Hkv, n, hd, h_top): n = 1, 37 (3 splits), 100 (7 splits); hd 24 pads to 32; h_top = 1 and
# Hkv; grouped-query (G = 2) and H = Hkv; batch 3 (a different table per sequence)
CASES = [
    (1, 2, 2, 1, 16, 1),  # one cached token, one group of two
    (3, 4, 2, 37, 24, 1),  # grouped-query, h_top = 1, hd 24
    (3, 4, 2, 100, 16, 2),  # grouped-query, h_top = Hkv
    (3, 4, 4, 37, 16, 4),  # H = Hkv, every head kept
    (3, 4, 4, 100, 24, 2),  # H = Hkv, half the heads
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}n{}hd{}top{}".format(*c))
def test_polar_decode_matches_reference(case):
    """Against polar_attention_np; heads not kept exactly 0; q [B, H, hd] works as [B, H, 1, hd]."""
    B, H, Hkv, n, hd, HT = case
    q, k, v = kv_case(B, H, Hkv, n, hd)
    heads = random_tables(B, Hkv, HT)
    out = pg.polar_attention_decode_gpu(q, k, v, heads)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close("out", out, reference(q, k, v, heads), 1e-5, 1e-5)
    # the skipped heads are written by the merge as 0 / 1: exactly 0, not merely small
    off = ~kept_mask(heads, H, Hkv)
    assert (out[:, :, 0][off] == 0).all(), "a head whose group is not kept must output exactly 0"
    # an int64 table (what torch.topk returns) is read as it is: the same bits as the int32 one
    out3 = pg.polar_attention_decode_gpu(q[:, :, 0], k, v, heads.long())
    assert out3.shape == q[:, :, 0].shape
    assert_close("q [B, H, hd], int64 heads", out3, out[:, :, 0], 0.0, 0.0)


def test_polar_decode_tables_differ_per_sequence():
    """Three sequences with the same q and cache but different tables: each gets its own heads."""
    q, k, v = kv_case(1, 4, 4, 37, 16)
    # batch stride 0: every sequence reads the same values in place (only the last axis must be contiguous)
    q, k, v = q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)
    # three different tables, overlapping, unsorted: a kernel that used one table for the whole
    # batch, or assumed ascending order, would put the outputs on the wrong heads
    heads = torch.tensor([[0, 2], [3, 1], [1, 0]], dtype=torch.int32, device=DEVICE)
    out = pg.polar_attention_decode_gpu(q, k, v, heads)
    assert_close("out", out, reference(q, k, v, heads), 1e-5, 1e-5)
    assert (out[:, :, 0][~kept_mask(heads, 4, 4)] == 0).all() and (out[:, :, 0][kept_mask(heads, 4, 4)] != 0).all()


def test_polar_decode_lengths():
    """lengths [B] (int32 and int64): each sequence sees its first lengths[b] tokens; values past
    the cache or below 1 are an error (as in attention_decode_gpu)."""
    B, H, Hkv, n, hd = 3, 4, 2, 50, 16
    q, k, v = kv_case(B, H, Hkv, n, hd)
    heads = random_tables(B, Hkv, 1)
    # sequence 2 sees one token (a single split with a single key)
    for lengths in (torch.tensor([9, 41, 1], dtype=torch.int32, device=DEVICE),
                    torch.tensor([50, 2, 17], dtype=torch.int64, device=DEVICE)):
        out = pg.polar_attention_decode_gpu(q, k, v, heads, lengths=lengths)
        assert_close(f"out, lengths {lengths.tolist()}", out, reference(q, k, v, heads, lengths), 1e-5, 1e-5)
    if DEVICE == "cpu":  # (a device-side check: on a GPU it would fail the process's CUDA context)
        with pytest.raises(RuntimeError, match="lengths"):  # past the cache, and 0
            pg.polar_attention_decode_gpu(q, k, v, heads, lengths=torch.tensor([n + 7, 0, 17], device=DEVICE))


def test_every_group_equals_dense_bitwise():
    """A table of every group (shuffled) gives kernels_gpu.attention_decode_gpu's bits: the same
    programs with the same splits, only their group read from the table."""
    q, k, v = kv_case(3, 4, 2, 100, 24)
    lengths = torch.tensor([100, 33, 64], dtype=torch.int32, device=DEVICE)
    # NU = Hkv either way, so both launches split the cache alike and merge in the same order
    out = pg.polar_attention_decode_gpu(q, k, v, random_tables(3, 2, 2), lengths=lengths)
    assert_close("every group vs dense", out, dg.attention_decode_gpu(q, k, v, lengths=lengths), 0.0, 0.0)


def test_generalised_kernels_are_drop_in(monkeypatch):
    """Without a table the generalised kernels give kernels_gpu's results bit for bit: dense
    decode (both split and merge) and Spark attention decode (through the merge)."""
    q, k, v = kv_case(2, 4, 2, 37, 24)
    lengths = torch.tensor([37, 20], dtype=torch.int32, device=DEVICE)
    assert_close("dense", pg.attention_decode_gpu(q, k, v, lengths=lengths),
                 dg.attention_decode_gpu(q, k, v, lengths=lengths), 0.0, 0.0)
    # Spark attention's gather partials go through _merge too: swap in the generalised one
    split = dg.prepare_spark_kv_gpu(k, v, 5)
    before = dg.spark_attention_decode_gpu(q, *split, 10, 5, lengths=lengths)
    monkeypatch.setattr(dg, "_merge", pg._merge)
    assert_close("spark, generalised merge", dg.spark_attention_decode_gpu(q, *split, 10, 5, lengths=lengths),
                 before, 0.0, 0.0)


def test_bad_table_on_device_gives_nan():
    """What a GPU table with an invalid row gets (no host check there): NaN in every head of that
    sequence, the other sequences unaffected. Run here by calling past the host check."""
    q, k, v = kv_case(3, 4, 4, 20, 16)
    good = torch.tensor([[0, 1], [2, 3], [3, 0]], dtype=torch.int32, device=DEVICE)
    ref = pg.polar_attention_decode_gpu(q, k, v, good)
    # past Hkv, negative, a repeat: the split kernel clamps 4 to 3 and -1 to 0 (real groups, so
    # nothing outside the cache is read); the merge kernel sees the row and writes NaN
    for bad_row in ([1, 4], [-1, 2], [2, 2]):
        heads = good.clone()
        heads[1] = torch.tensor(bad_row, dtype=torch.int32)
        out = pg._flash_decode(q, k, v, None, heads)  # (the launcher: no host check of the values)
        assert out[1].isnan().all(), f"row {bad_row}: sequence 1 must be all NaN"
        assert_close(f"row {bad_row}: the other sequences", out[[0, 2]], ref[[0, 2]], 0.0, 0.0)


def test_polar_decode_bad_input():
    """Each bad argument gets an error naming it: heads of a wrong dtype, rank, batch, h_top 0 or
    above Hkv, entries outside [0, Hkv), a repeated group; and the cache checks of the dense kernel."""
    q, k, v = kv_case(2, 4, 2, 20, 16)
    call = lambda heads, **kw: pg.polar_attention_decode_gpu(q, k, v, heads, **kw)  # noqa: E731
    i32 = dict(dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="heads must be an int32 or int64 tensor"):
        call(torch.zeros(2, 1, device=DEVICE))  # float
    with pytest.raises(TypeError, match="heads must be an int32 or int64 tensor"):
        call([[0], [1]])  # a list, not a tensor
    with pytest.raises(TypeError, match="heads must be an int32 or int64 tensor"):
        call(torch.zeros(2, 1, dtype=torch.int16, device=DEVICE))
    for shape in ((2,), (3, 1), (2, 0), (2, 3)):  # rank 1, wrong batch, h_top 0, h_top > Hkv
        with pytest.raises(ValueError, match=r"heads must be \[B, h_top\] = \[2, h_top\] with 1 <= h_top"):
            call(torch.zeros(shape, **i32))
    # bad values: an error on the CPU; on a GPU (where reading them would make the host wait) the
    # merge kernel fills every head of the bad sequence with NaN and leaves the others finite
    for table, b, match in (([[0], [2]], 1, r"heads must hold KV-group indices in \[0, Hkv = 2\); sequence 1 has \[2\]"),
                            ([[-1], [0]], 0, "heads must hold KV-group indices"),
                            ([[1, 1], [0, 1]], 0, r"heads must not repeat a KV group.*sequence 0 has \[1, 1\]")):
        if DEVICE == "cpu":
            with pytest.raises(ValueError, match=match):
                call(torch.tensor(table, **i32))
        else:
            out = call(torch.tensor(table, **i32))
            assert torch.isnan(out[b]).all() and torch.isfinite(out[1 - b]).all()
    # q, k, v and lengths go through the dense decode's checks (the same messages)
    with pytest.raises(ValueError, match="expected v"):
        pg.polar_attention_decode_gpu(q, k, v[:, :, :10], torch.zeros(2, 1, **i32))
    with pytest.raises(TypeError, match="v must have q's dtype"):
        pg.polar_attention_decode_gpu(q, k, v.to(torch.bfloat16), torch.zeros(2, 1, **i32))
    with pytest.raises(ValueError, match="lengths must be"):
        call(torch.zeros(2, 1, **i32), lengths=torch.ones(3, **i32))


# ------------------------------------------------------------------------------------------
# GPU only: no host synchronisation (CUDA graph capture), bf16, the device's view of a bad table
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_polar_decode_in_cuda_graph_and_bf16():
    """Captured in a CUDA graph (fails on any host sync) it gives the eager bits; bf16 against
    float64 on the same values: p rounded to bf16 before the product with V (2^-9 of sum p |v|)
    and out stored in bf16, atol = 2^-7 max|v|, rtol = 2^-7 (as the dense decode's bf16 test)."""
    q, k, v = kv_case(3, 8, 4, 300, 64, torch.bfloat16)
    heads = random_tables(3, 4, 2)
    lengths = torch.tensor([300, 120, 7], dtype=torch.int32, device="cuda")
    fn = lambda: pg.polar_attention_decode_gpu(q, k, v, heads, lengths=lengths)  # noqa: E731
    out = fn()
    # deterministic (no atomics, merge in split order): the replay gives the eager bits
    assert_close("in a graph", run_in_cuda_graph(fn), out, 0.0, 0.0)
    assert_close("bf16", out, reference(q, k, v, heads, lengths), 2.0**-7 * float(v.abs().max()), 2.0**-7)
    assert (out[:, :, 0][~kept_mask(heads, 8, 4)] == 0).all()
    bad = heads.clone()
    bad[0, 1] = 9  # not checked on the GPU (no sync): NaN over sequence 0
    assert pg.polar_attention_decode_gpu(q, k, v, bad)[0].isnan().all()
