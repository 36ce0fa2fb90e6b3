"""Tests for the TwELL format (Sakana AI, arXiv 2603.23198; notes/papers.md, "TwELL"; notes/twell.md):
twell_pack / twell_unpack / twell_ffn in NumPy and torch.

What is checked, and against what:
- The layout itself, on a matrix small enough to write its words by hand (layout_by_hand), and
  the bf16 rounding on float32 bit patterns chosen by hand: exact ties between two bf16 values,
  one bit either side, a mantissa carry into the exponent, the largest floats (bf16 inf),
  subnormals, -0.
- Round trip: unpack(pack(h)) equals torch's own bf16 rounding of h (an implementation that
  shares nothing with our NumPy bit arithmetic) on every row without overflow, and is all NaN on
  the others; the overflow flag equals a count of nonzeros per tile done separately.
- NumPy and torch give bit-identical packed words and flags, on random and adversarial rows.
- twell_ffn_np / twell_ffn against the dense relu_l1_ffn_np, two ways (tolerances below).

Tolerances.
- Exact (0): packed words, flags, unpacked values (bf16 values are exact in float32), and the
  bf16 torch twell_ffn against relu_l1_ffn (the same operations on the same bf16 values).
- float64, "F64" (atol 1e-12, rtol 1e-10): twell_ffn_np against the dense FFN fed the g that
  TwELL holds (torch's bf16 g on rows without overflow, the exact g on the others): the same
  products summed in another order, ~1e-16 relative per operation on sums of ~600 terms.
- Against relu_l1_ffn_np itself the difference is the bf16 rounding of g: bf16 keeps 8
  significant bits, so |bf16(g) - g| <= 2^-8 |g| (unit roundoff; the float32 step before it adds
  2^-24), and |y_i - y_ref_i| <= (2^-8 + 2^-23) sum_j |g_j u_j Wd[j, i]|, which we check per entry
  (plus 1e-12 for float64 summation; plus 1e-5 relative to that sum for float32 inputs, where
  x Wg itself is rounded to float32 before bf16). A dropped or doubled entry moves y by a whole
  term, ~1/10 of that sum here, far outside the bound.
"""

import numpy as np
import pytest
import torch

from conftest import assert_close, run_in_cuda_graph
from spark import relu_l1_ffn, relu_l1_ffn_np, twell_ffn, twell_ffn_np, twell_pack, twell_pack_np, twell_unpack, twell_unpack_np

F64 = dict(atol=1e-12, rtol=1e-10)
NAN = 0x7FC0 << 16  # an entry's high half in an overflowing slot: bf16 NaN


def bf16_torch(h):
    """torch's round-to-nearest-even bf16 of h (through float32), as float32 NumPy."""
    return torch.from_numpy(np.asarray(h, np.float32)).bfloat16().float().numpy()


def words(t):
    """A torch uint32 tensor as a NumPy uint32 array (through int32: the same bits)."""
    return t.view(torch.int32).numpy().view(np.uint32)


def as_torch(p):
    """A NumPy uint32 array as a torch uint32 tensor (torch.from_numpy has no uint32 path in every version)."""
    return torch.from_numpy(p.view(np.int32)).view(torch.uint32)


def pack_both(h, tile, C):
    """Pack with NumPy and torch, check they are bit-identical (and torch deterministic); -> NumPy's."""
    p, o = twell_pack_np(h, tile, C)
    # the NumPy loop and the torch cumsum + scatter share no code but the argument checks
    ht = torch.from_numpy(np.asarray(h))
    pt, ot = twell_pack(ht, tile, C)
    assert_close(f"packed np vs torch tile={tile} C={C}", words(pt), p, 0, 0)
    assert_close("overflow np vs torch", ot, o, 0, 0)
    # deterministic: the scatter's only colliding writes go to the spare word, which is dropped
    assert_close("torch packs the same twice", words(twell_pack(ht, tile, C)[0]), p, 0, 0)
    return p, o


def check_round_trip(h, tile, C):
    """pack -> unpack in both versions: torch's bf16 of h on rows without overflow, NaN rows
    elsewhere; the flag against a separate count of nonzeros per tile. -> overflow flags."""
    M, f = h.shape
    p, o = pack_both(h, tile, C)
    hb = bf16_torch(h)  # what TwELL holds: torch's bf16 of h
    # the flag, recomputed: nonzeros per (row, tile) of the zero-padded bf16 h, against the capacity
    nT = -(-f // tile)
    per_tile = (np.pad(hb, ((0, 0), (0, nT * tile - f))).reshape(M, nT, tile) != 0).sum(-1)  # [M, nT]
    assert_close("overflow = a tile with more than tile/C - 1 nonzeros", o, (per_tile > tile // C - 1).any(-1), 0, 0)
    # each version unpacks NumPy's words (which equal torch's, checked above)
    for name, g in (("np", twell_unpack_np(p, f, tile, C)), ("torch", twell_unpack(as_torch(p), f, tile, C))):
        # bf16 values are exact in float32: the comparison is exact
        assert_close(f"round trip {name}", g[~o], hb[~o], 0, 0)
        assert np.isnan(np.asarray(g)[o]).all(), f"{name}: an overflowing row must come back all NaN"
    return o


def sparse_gate(M, f, density, seed=0):
    """Random h [M, f] >= 0 with about `density` nonzeros (float32)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random((M, f)) < density, rng.exponential(size=(M, f)), 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# The layout and the rounding, by hand
# ------------------------------------------------------------------------------------------


def test_layout_by_hand():
    """C = 2, tile = 8: slots of W = 4 words (capacity 3); f = 20: tiles [0, 8), [8, 16) and a
    narrower last tile [16, 20), whose slot still has 4 words. Each packed row reads
        | n | j|v<<16 | j|v<<16 | j|v<<16 | n | ... (tile 1) | n | ... (tile 2) |
    Row 0 is ordinary, row 1 overflows in tile 0 (4 nonzeros > 3), row 2 is empty."""
    h = np.zeros((3, 20), np.float32)
    h[0, [1, 5, 8, 19]] = [1.0, 2.0, 0.5, 3.0]  # bf16 0x3F80, 0x4000, 0x3F00, 0x4040
    h[1, [0, 2, 4, 6]] = 1.0  # 4 nonzeros in tile 0: overflow
    h[1, 9] = 2.0  # tile 1 of the overflowing row is packed as usual
    want = np.array([
        [2, 1 | 0x3F80 << 16, 5 | 0x4000 << 16, 0, 1, 8 | 0x3F00 << 16, 0, 0, 1, 19 | 0x4040 << 16, 0, 0],
        [3, 0 | NAN, 2 | NAN, 4 | NAN, 1, 9 | 0x4000 << 16, 0, 0, 0, 0, 0, 0],  # first 3 columns, valued NaN
        [0] * 12,
    ], np.uint32)
    p, o = pack_both(h, 8, 2)
    assert_close("packed words", p, want, 0, 0)
    assert_close("overflow", o, np.array([False, True, False]), 0, 0)
    # unpacking: row 0 back exactly (its values are bf16 already), row 1 all NaN, row 2 zeros
    check_round_trip(h, 8, 2)


# float32 bits -> bf16 bits, round to nearest even (0: not stored)
TIES = [
    (0x3F808000, 0x3F80),  # exactly halfway, lower neighbour even: stays
    (0x3F818000, 0x3F82),  # exactly halfway, lower neighbour odd: up to the even one
    (0x3F807FFF, 0x3F80),  # just below halfway: down
    (0x3F808001, 0x3F81),  # just above halfway: up
    (0x3FFF8000, 0x4000),  # halfway, odd, all mantissa bits set: the carry makes 2.0
    (0x3FFFFFFF, 0x4000),  # 1.99999988 -> 2.0
    (0x7F7F8000, 0x7F80),  # halfway below the largest float32: bf16 inf
    (0x7F7FFFFF, 0x7F80),  # the largest float32: bf16 inf
    (0x7F7F7FFF, 0x7F7F),  # the largest that stays finite
    (0x00018000, 0x0002),  # subnormal, halfway, odd: up
    (0x00008000, 0),  # subnormal, halfway, even: 0, not stored
    (0x00000001, 0),  # the smallest subnormal: 0, not stored
    (0x80000000, 0),  # -0: not stored
]


def test_bf16_rounding_ties_by_hand():
    """Each float32 in its own column (C = 2, tile = 32: capacity 15 >= 13 entries)."""
    h = np.array([[b for b, _ in TIES]], np.uint32).view(np.float32)  # [1, 13], column j = case j
    # pack_both also checks these against torch's own rounding (bit-identical packing)
    p, o = pack_both(h, 32, 2)
    # expected: the cases whose bf16 is nonzero, in column order, word = j | bf16 << 16
    kept = [(j, r) for j, (_, r) in enumerate(TIES) if r]
    want = np.zeros((1, 16), np.uint32)
    want[0, 0] = len(kept)
    want[0, 1 : 1 + len(kept)] = [j | r << 16 for j, r in kept]
    assert_close("bf16 bits of the tie cases", p, want, 0, 0)
    assert not o[0]
    check_round_trip(h, 32, 2)  # the unpacked values are torch's bf16 rounding too


# ------------------------------------------------------------------------------------------
# Round trip and bit-identical packing on random and adversarial rows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,f,tile,C,density", [
    (37, 600, 256, 8, 0.05), (37, 600, 256, 4, 0.1), (37, 600, 64, 2, 0.2), (37, 600, 16, 8, 0.01),
    (1, 600, 256, 8, 0.05), (4, 256, 256, 8, 0.05), (3, 1, 16, 8, 0.5), (5, 600, 1024, 8, 0.01), (0, 600, 256, 8, 0.1),
])
def test_round_trip(M, f, tile, C, density):
    """Random gates, f not a multiple of tile (600 = 2 x 256 + 88), one narrow tile (f = 1,
    tile 1024 > f), M = 1 and M = 0; float32 and float64 inputs pack alike. The densities put
    the average tile well below its capacity, so most rows fit; where some overflow, the round
    trip checks that those (and only those) come back NaN."""
    h = sparse_gate(M, f, density)
    o = check_round_trip(h, tile, C)
    if (M, f, tile) == (37, 600, 16):
        assert o.any() and not o.all()  # capacity 1: both kinds of row occur
    # float64 input is rounded to float32 first, then to bf16 (h is float32 here: no double rounding)
    p32, _ = twell_pack_np(h, tile, C)
    assert_close("float64 input packs as its float32", pack_both(h.astype(np.float64), tile, C)[0], p32, 0, 0)


def test_torch_bf16_input():
    """A bf16 tensor packs as the float32 array of its values."""
    hb = torch.from_numpy(sparse_gate(37, 600, 0.05)).bfloat16()
    assert_close("bf16 vs float32 input", words(twell_pack(hb)[0]), twell_pack_np(hb.float().numpy())[0], 0, 0)


@pytest.mark.parametrize("C", [8, 4, 2])
def test_adversarial_rows(C):
    """40 nonzeros in one tile, a full row, an empty row, a full last (narrow) tile only, at each C:
    capacity 31 (C = 8), 63 (C = 4), 127 (C = 2) entries per tile of 256. What an overflowing slot
    holds is the format's choice (spark.py, above twell_pack_np): count = capacity, its first columns, valued NaN."""
    f, W = 600, 256 // C
    h = sparse_gate(5, f, 0.02)
    h[0, 256:296] = 1.5  # 40 nonzeros in tile 1: overflow at C = 8 (capacity 31) only
    h[1] = 1.0  # every entry nonzero: 256 > capacity 127 at every C
    h[2] = 0.0  # empty
    h[3] = 0.0
    h[3, 512:] = 2.0  # 88 nonzeros in the narrow last tile: overflow at C = 8 and 4, not C = 2
    p, o = pack_both(h, 256, C)
    assert_close("flags", o[:4], np.array([C == 8, True, False, C != 2]), 0, 0)
    if C == 8:  # the overflowing slot: count = capacity, the first 31 columns, valued NaN
        assert_close("overflowing slot", p[0, W : 2 * W], np.r_[31, (256 + np.arange(31)) | NAN].astype(np.uint32), 0, 0)
    # no count word above the capacity, anywhere: a consumer trusting the counts stays in its slot
    assert (p[:, ::W] <= W - 1).all(), "a count above the capacity"
    assert_close("empty row", p[2], np.zeros(3 * W, np.uint32), 0, 0)
    check_round_trip(h, 256, C)


def test_all_rows_overflow():
    """Half the entries nonzero: every row overflows, every row unpacks to NaN."""
    h = sparse_gate(6, 600, 0.5)
    assert check_round_trip(h, 256, 8).all()


def test_f_65536():
    """The largest f: column 65535 is 0xFFFF in the low 16 bits."""
    h = np.zeros((1, 65536), np.float32)
    h[0, [0, 65535]] = [1.0, 2.0]
    p, o = pack_both(h, 256, 8)
    assert p[0, 255 * 32] == 1 and p[0, 255 * 32 + 1] == 0xFFFF | 0x4000 << 16
    check_round_trip(h, 256, 8)


# ------------------------------------------------------------------------------------------
# The FFN, with the hybrid routing
# ------------------------------------------------------------------------------------------


def ffn_inputs(M=37, d=72, f=600, scales=(0.0, 1.0, 1.0, 1.0, 8.0), seed=0):
    """x [M, d], Wg Wu [d, f], Wd [f, d] float64 with a sparse gate: x[:, 0] = 1 and Wg[0] = -2.5
    act as a bias, so g = relu(s z - 2.5) with z ~ N(0, 1) and s the row's scale: s = 0 gives an
    empty row, s = 1 about 0.6 % nonzeros (~1.6 per tile), s = 8 about 38 % (overflow)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, d)) * np.resize(np.array(scales), M)[:, None] / np.sqrt(d - 1)
    x[:, 0] = 1.0
    Wg, Wu = rng.standard_normal((d, f)), rng.standard_normal((d, f))
    Wg[0] = -2.5
    return x, Wg, Wu, rng.standard_normal((f, d)) / np.sqrt(f)


def check_bf16_bound(name, y, x, Wg, Wu, Wd, rel32=0.0):
    """|y - relu_l1_ffn_np| <= (2^-8 + 2^-23 + rel32) sum_j |g_j u_j Wd[j]| + 1e-12 (docstring)."""
    y_ref = relu_l1_ffn_np(x, Wg, Wu, Wd)[0]
    terms = np.abs(np.maximum(x @ Wg, 0) * (x @ Wu)) @ np.abs(Wd)  # [M, d]
    excess = np.abs(np.asarray(y, np.float64) - y_ref) - ((2.0**-8 + 2.0**-23 + rel32) * terms + 1e-12)
    assert_close(f"{name}: error beyond the bf16 bound", np.maximum(excess, 0), np.zeros_like(excess), 0, 0)


@pytest.mark.parametrize("tile,C", [(256, 8), (256, 4), (64, 8), (16, 2)])
def test_ffn_against_dense(tile, C):
    """M = 37, d = 72, f = 600: empty, sparse and overflowing rows in one call.

    Three references: the dense FFN fed the g that TwELL holds (float64 tolerance: this pins the
    routing and every stored entry), relu_l1_ffn_np itself (the bf16 bound), and, for torch,
    twell_ffn_np (float64) or the bf16 bound again (float32 inputs).
    """
    x, Wg, Wu, Wd = ffn_inputs()
    g = np.maximum(x @ Wg, 0)
    o = twell_pack_np(g, tile, C)[1]
    if (tile, C) == (256, 8):
        assert o.any() and not o.all()  # both routes taken
    # the dense FFN fed what TwELL holds: bf16 g (torch's rounding) where no overflow, exact g where it does
    g_held = np.where(o[:, None], g, bf16_torch(g))
    y_held = (g_held * (x @ Wu)) @ Wd
    y_np = twell_ffn_np(x, Wg, Wu, Wd, tile, C)
    assert_close("twell_ffn_np vs dense with the held g", y_np, y_held, **F64)
    # rows 0, 5, 10, ... have scale 0 (ffn_inputs): no stored entry, y exactly 0
    assert_close("empty rows give 0", y_np[::5], np.zeros_like(y_np[::5]), 0, 0)
    # the hybrid route: overflowing rows never read the packed words (they hold NaN), exact g
    assert_close("overflowing rows are the dense FFN", y_np[o], relu_l1_ffn_np(x[o], Wg, Wu, Wd)[0], **F64)
    check_bf16_bound("twell_ffn_np", y_np, x, Wg, Wu, Wd)
    # torch in float64: the same g bits (bit-identical packing), a different summation order
    T = [torch.from_numpy(a) for a in (x, Wg, Wu, Wd)]
    assert_close("twell_ffn float64 vs twell_ffn_np", twell_ffn(*T, tile, C), y_np, **F64)
    # float32 inputs: g is rounded to float32 before bf16 (the extra relative slack, docstring)
    y32 = twell_ffn(*(t.float() for t in T), tile, C)
    check_bf16_bound("twell_ffn float32", y32.double().numpy(), *(t.float().double().numpy() for t in T), rel32=1e-5)


def test_ffn_bf16_equals_relu_l1_ffn():
    """bf16 inputs: g is already bf16, so TwELL holds it exactly and twell_ffn is relu_l1_ffn, bit for bit."""
    T = [torch.from_numpy(a).bfloat16() for a in ffn_inputs()]
    assert_close("twell_ffn bf16 vs relu_l1_ffn bf16", twell_ffn(*T), relu_l1_ffn(*T)[0], 0, 0)


def test_ffn_all_rows_overflow_and_leading_dims():
    """Every row dense (scale 8 everywhere), x [B, T, d]; and one token (M = 1).

    With every row overflowing, twell_ffn is the dense FFN with the exact g: float64 tolerance
    against relu_l1_ffn_np, no bf16 term at all.
    """
    x, Wg, Wu, Wd = ffn_inputs(M=12, scales=(8.0,))
    assert twell_pack_np(np.maximum(x @ Wg, 0))[1].all()
    x3 = x.reshape(3, 4, -1)
    for y in (twell_ffn_np(x3, Wg, Wu, Wd), twell_ffn(*(torch.from_numpy(a) for a in (x3, Wg, Wu, Wd)))):
        assert_close("all rows dense", y, relu_l1_ffn_np(x3, Wg, Wu, Wd)[0], **F64)
    x1, Wg, Wu, Wd = ffn_inputs(M=1, scales=(1.0,))
    T = [torch.from_numpy(a) for a in (x1[0], Wg, Wu, Wd)]  # x [d]: one token, no leading axis
    assert_close("M = 1", twell_ffn(*T), twell_ffn_np(x1[0], Wg, Wu, Wd), **F64)
    check_bf16_bound("M = 1", twell_ffn_np(x1, Wg, Wu, Wd), x1, Wg, Wu, Wd)


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,shape,err,match", [
    (dict(C=3), (2, 600), ValueError, r"C must be one of \(2, 4, 8\)"),
    (dict(C=8.0), (2, 600), TypeError, "C must be an int"),
    (dict(tile=24), (2, 600), ValueError, "tile must be a power of two"),
    (dict(tile=8, C=8), (2, 600), ValueError, r"tile must be in \[16, 65536\]"),
    (dict(), (2, 65537), ValueError, r"f must be in \[1, 65536\]"),
    (dict(), (2, 0), ValueError, r"f must be in \[1, 65536\]"),
    (dict(), (600,), ValueError, r"h must be a float"),
])
def test_bad_arguments(kw, shape, err, match):
    """The format's arguments, checked alike by both versions (one helper): the message names each."""
    for pack, h in ((twell_pack_np, np.zeros(shape, np.float32)), (twell_pack, torch.zeros(shape))):
        with pytest.raises(err, match=match):
            pack(h, **kw)


def test_bad_dtypes_and_shapes():
    """Wrong dtype or shape of h, of packed (the width must be nT W for the f, tile, C given), and of
    the FFN weights (spark's own check)."""
    with pytest.raises(ValueError, match="h must be a float array"):
        twell_pack_np(np.zeros((2, 600), np.int32))
    with pytest.raises(ValueError, match="h must be a float tensor"):
        twell_pack(torch.zeros(2, 600, dtype=torch.int32))
    p, _ = twell_pack_np(np.zeros((2, 600), np.float32))  # [2, 96]
    for bad in (p.astype(np.int32), p[:, :-1], p[0]):
        with pytest.raises(ValueError, match=r"packed must be a uint32 array \[M, 96\]"):
            twell_unpack_np(bad, 600)
    pt = torch.from_numpy(p.view(np.int32))
    for bad in (pt, pt.view(torch.uint32)[:, :-1]):
        with pytest.raises(ValueError, match=r"packed must be a uint32 tensor \[M, 96\]"):
            twell_unpack(bad, 600)
    with pytest.raises(ValueError, match="gated FFN shapes"):
        twell_ffn_np(np.zeros((2, 8)), np.zeros((8, 600)), np.zeros((8, 600)), np.zeros((600, 7)))
    with pytest.raises(ValueError, match="gated FFN shapes"):
        twell_ffn(torch.zeros(2, 8), torch.zeros(8, 600), torch.zeros(8, 600), torch.zeros(600, 7))


@pytest.mark.parametrize("value", [-1.0, -1e-30, np.nan, np.inf, -np.inf])
def test_h_must_be_relu_output(value):
    """Negative, NaN or infinite gates: ValueError in NumPy (naming the entry), RuntimeError from
    torch._assert_async in torch (on a GPU a device-side assert)."""
    h = sparse_gate(3, 600, 0.05)
    h[1, 7] = value
    with pytest.raises(ValueError, match=r"h must be finite and >= 0 \(ReLU outputs\), got h\[1, 7\]"):
        twell_pack_np(h)
    with pytest.raises(RuntimeError, match=r"h must be finite and >= 0"):
        twell_pack(torch.from_numpy(h))


def test_unpack_refuses_what_pack_never_writes():
    """A count above the capacity (what a producer that keeps the true count of an overflowing
    tile leaves), a column outside its tile, columns out of order, a column >= f."""
    p, _ = twell_pack_np(sparse_gate(2, 600, 0.05))  # C = 8: slots of 32 words, capacity 31
    q = p.copy()
    q[0, 32] = 40  # the count of tile 1 in row 0
    with pytest.raises(ValueError, match=r"packed\[0\] tile 1 is not a TwELL slot: count 40 \(capacity 31\)"):
        twell_unpack_np(q, 600)
    with pytest.raises(RuntimeError, match="count above the capacity"):
        twell_unpack(as_torch(q), 600)
    q = p.copy()
    q[1, 64:67] = [2, 5 | 0x3F80 << 16, 600 | 0x3F80 << 16]  # tile 2 holds [512, 600): 5 is outside
    with pytest.raises(ValueError, match=r"packed\[1\] tile 2 is not a TwELL slot.*within \[512, 600\)"):
        twell_unpack_np(q, 600)
    q[1, 65] = 599 | 0x3F80 << 16  # 599 then 600: increasing, but 600 >= f
    with pytest.raises(ValueError, match=r"packed\[1\] tile 2"):
        twell_unpack_np(q, 600)
    with pytest.raises(RuntimeError, match="a column >= f"):
        twell_unpack(as_torch(q), 600)
    q[1, 64:67] = [2, 599 | 0x3F80 << 16, 513 | 0x3F80 << 16]  # decreasing
    with pytest.raises(ValueError, match=r"packed\[1\] tile 2"):
        twell_unpack_np(q, 600)


# ------------------------------------------------------------------------------------------
# GPU: no host synchronisation, and the same words as on the CPU
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_no_host_sync():
    """twell_pack, twell_unpack and twell_ffn captured in one CUDA graph (a capture fails on any
    host synchronisation); the words match NumPy's bit for bit, y matches the float64 reference
    within the bf16 bound (inputs bf16-exact, so only g's rounding and float32 sums differ)."""
    x, Wg, Wu, Wd = (torch.from_numpy(a).float().bfloat16().float().cuda() for a in ffn_inputs())
    g = torch.relu(x @ Wg)

    def step():
        p, o = twell_pack(g)
        return p, o, twell_unpack(p, g.shape[1]), twell_ffn(x, Wg, Wu, Wd)

    p, o, gu, y = run_in_cuda_graph(step)
    p_np, o_np = twell_pack_np(g.cpu().numpy())
    assert_close("packed cuda vs np", words(p.cpu()), p_np, 0, 0)
    assert_close("overflow cuda vs np", o.cpu(), o_np, 0, 0)
    assert_close("unpack cuda vs np", gu.cpu(), twell_unpack_np(p_np, g.shape[1]), 0, 0)
    x, Wg, Wu, Wd = (t.cpu().double().numpy() for t in (x, Wg, Wu, Wd))
    check_bf16_bound("twell_ffn cuda", y.cpu().double().numpy(), x, Wg, Wu, Wd, rel32=1e-5)
