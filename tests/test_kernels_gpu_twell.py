"""Tests for the TwELL Triton kernels (kernels_gpu.py; Sakana AI, arXiv 2603.23198, its TwELL format;
notes/papers.md, "TwELL"): the producer, the consumer and twell_ffn_gpu with its hybrid route.

Where this runs: without CUDA (CI, laptops) tests/conftest.py sets TRITON_INTERPRET=1 and the
kernels run in Triton's interpreter on CPU tensors, at M = 37 (and 1), d = 72, f = 600, tile 256,
64 and 32 (f is a multiple of none: the last tile is narrow); on a GPU the same tests run
compiled kernels, and the `gpu` test adds a shape like the benchmark's.

Exactness, and the tolerance otherwise.
- The kernels sum in float32 in another order than torch's matmuls; each rounding to bf16 (g, u,
  h = g u, y) is then the same operation on a possibly different float32 value. To compare bit
  for bit we use inputs whose float32 sums are exact whatever their order (int_problem: small
  integers, |partial sums| far below 2^24), so that both sides round the same exact values:
  the producer's words equal spark.twell_pack's, and y equals spark.twell_ffn's and the dense
  FFN's, exactly. Some gates there are 256 + an odd number, ties between two bf16 values: they
  catch a rounding that truncates (as the interpreter's own float32 -> bf16 conversion does).
- On random inputs (randn_problem) a float32 sum near a bf16 boundary may round one ulp (up
  to 2^-7 relative) apart in g, u, h and y. So per entry |y - y_ref| <= 2^-5 S_i + 2^-7 |y_ref_i|,
  S_i = sum_j |h_j Wd[j, i]|: three ulps of each term, and one of y. A dropped or doubled entry
  moves y_i by a whole term, ~S_i / 10 at the ~15 nonzeros per row used, outside the bound.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, assert_close
import kernels_gpu as tg
from kernels_gpu import prepare_twell_gpu, twell_consume_gpu, twell_ffn_gpu, twell_gate_pack_gpu
from spark import relu_l1_ffn, twell_ffn, twell_pack

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the CPU runs the kernels in Triton's interpreter
needs_triton = pytest.mark.skipif(tg.triton is None, reason="needs triton (none on this platform)")
pytestmark = needs_triton
B = 8  # the gate's offset in int_problem: g = x Wg - B x[:, 0]


@pytest.fixture(autouse=True)
def _interpreter_settings(monkeypatch):
    """In the interpreter, 16 entries per consumer step instead of 4 (or 8 for few rows): the same
    code, fewer steps."""
    if not HAS_CUDA:
        monkeypatch.setitem(tg.CONSUME_CFG, "E", 16)
        monkeypatch.setattr(tg, "CONSUME_FEW_ROWS", 0)


def words(p):
    """uint32 words as int32 (the same bits), on the CPU, for exact comparison (torch compares
    uint32 tensors in few ops, int32 ones in all)."""
    return p.view(torch.int32).cpu()


def int_problem(M, d=72, f=600, seed=0, special=True):
    """x [M, d], Wg, Wu [d, f], Wd [f, d] bf16 holding small integers (and fractions 1/2, 1/4): every float32 sum exact.

    Gate g = relu(x Wg) with x[:, 0] in {1, 0.5, 0.25} times Wg[0] = -B: rows with a higher
    offset have fewer nonzeros, so some rows overflow tile 256 at C = 8 and some do not. With
    `special`, rows 0..3 are: empty (g = 0), every entry nonzero, 40 nonzeros in columns
    256..295 (one tile of 256, and of 64), and ties: g = 256 + odd at 10 columns.
    """
    gen = torch.Generator().manual_seed(seed)
    # columns 4.. of x: -1, 0, 1, each row keeping a random 40..100 % of them (some rows denser)
    x = torch.randint(-1, 2, (M, d), generator=gen).float()
    x[:, 4:] *= torch.rand(M, d - 4, generator=gen) < torch.rand(M, 1, generator=gen) * 0.6 + 0.4
    # columns 0..3 steer the gate: 0 is the offset (times Wg[0] = -B), 1..3 select special columns
    x[:, :4] = 0
    x[:, 0] = torch.tensor([1.0, 1.0, 0.5, 0.25])[torch.randint(0, 4, (M,), generator=gen)]
    # g = x[4:] . Wg[4:, j] - B x[:, 0]: a sum of ~20 terms of +-1 (std ~4) minus B, 2 B or 4 B
    # over 4, positive for a few per cent to a third of the columns, depending on the row
    Wg = torch.randint(-1, 2, (d, f), generator=gen).float()
    Wg[0], Wg[1:4] = -B, 0
    Wg[1, 256:296] = 2 * B  # the 40 columns of row 2
    ties = torch.tensor([5, 77, 130, 200, 300, 333, 450, 513, 590, f - 1])
    Wg[2, ties], Wg[3, ties] = 256 + B, torch.arange(1, 20, 2).float()  # g = 256 + 1, 3, ..., 19
    if special and M >= 4:
        x[:4] = 0
        x[0, 0] = 1  # g = -B everywhere: empty row
        x[1, 0] = -1  # g = +B everywhere: every entry nonzero
        x[2, :2] = 1  # g = B on columns 256..295, -B elsewhere
        x[3, 0] = x[3, 2] = x[3, 3] = 1  # g = 256 + odd on the tie columns, -B elsewhere
    # u up to a few hundred and h = g u up to a few thousand: both round to bf16 (8 significant
    # bits); |y| and every partial sum stay below 600 * 15 * 300 * 3 < 2^24, exact in float32
    Wu = torch.randint(-31, 32, (d, f), generator=gen).float()
    Wd = torch.randint(-3, 4, (f, d), generator=gen).float()
    return tuple(t.bfloat16().to(DEVICE) for t in (x, Wg, Wu, Wd))


def randn_problem(M, d=72, f=600, seed=0):
    """Random bf16 inputs with about 2.5 % of the gate nonzero (x[:, 0] = 1 times Wg[0] = -2)."""
    gen = torch.Generator().manual_seed(seed)
    # g = x[1:] . Wg[1:, j] - 2 with x[1:] . Wg[1:, j] ~ N(0, 1): P(g > 0) = 2.3 %, ~14 of 600
    x = torch.randn(M, d, generator=gen)
    x[:, 0] = 1
    Wg = torch.randn(d, f, generator=gen) / d**0.5
    Wg[0] = -2
    Wu = torch.randn(d, f, generator=gen) / d**0.5
    Wd = torch.randn(f, d, generator=gen) / f**0.5
    return tuple(t.bfloat16().to(DEVICE) for t in (x, Wg, Wu, Wd))


def dense_bound(x, Wg, Wu, Wd):
    """Per entry 2^-5 sum_j |h_j Wd[j, i]| + 2^-7 |y_ref| (module docstring), float64 -> (y_ref, bound)."""
    # float64 from the same bf16 inputs: the exact FFN, against which both roundings are bounded
    x64, Wg64, Wu64, Wd64 = (t.double().cpu() for t in (x, Wg, Wu, Wd))
    h = F.relu(x64 @ Wg64) * (x64 @ Wu64)
    y = h @ Wd64
    return y, 2.0**-5 * (h.abs() @ Wd64.abs()) + 2.0**-7 * y.abs()


def assert_within(name, got, ref, bound):
    """Fail unless |got - ref| <= bound entrywise (float64), naming the worst entry."""
    err = (got.double().cpu() - ref).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} entries outside the bound; worst excess "
                           f"{float((err - bound).max()):.3g} at {tuple(int(i) for i in (err - bound).argmax(keepdim=True).tolist())}")


# ------------------------------------------------------------------------------------------
# The producer: bit-identical words and flags
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,C", [(256, 8), (256, 4), (64, 8), (32, 2)])
@pytest.mark.parametrize("M", [37, 1])
def test_producer_words_bit_identical(M, tile, C):
    """Words and flags equal spark.twell_pack of torch's gate, bit for bit: every C, a narrow last
    tile (600 = 2 x 256 + 88 = 9 x 64 + 24), tile 32 (the smallest the producer takes), M = 1;
    the rows of int_problem overflow or not, and the special rows are all there (M = 37)."""
    x, Wg, _, _ = int_problem(M)
    packed, over = twell_gate_pack_gpu(x, Wg, tile, C)
    ref, ref_over = twell_pack(F.relu(x @ Wg).cpu(), tile, C)  # torch's bf16 matmul: exact sums, RNE
    assert packed.dtype == torch.uint32 and packed.shape == ref.shape
    assert_close(f"words tile={tile} C={C}", words(packed), words(ref), 0, 0)
    assert_close("overflow flags", over.cpu(), ref_over, 0, 0)
    if M == 37 and (tile, C) == (256, 8):  # the data covers both kinds of row
        assert ref_over.any() and not ref_over.all()
    if M == 37 and (tile, C) == (256, 4):  # 40 nonzeros fit 63 slots; the all-nonzero row does not
        assert not ref_over[2] and ref_over[1]


@pytest.mark.parametrize("BM,off32", [(16, 2**31), (32, 2**31), (32, 1), (64, 1)])
def test_producer_several_row_blocks(BM, off32, monkeypatch):
    """Row tiles smaller than M = 37: each persistent program walks several (row block, tile) pairs,
    and the last row block is partial; off32 = 1 takes the int64 word offsets that a packed tensor
    of 2^31 words or more needs. Same words and flags as spark.twell_pack."""
    monkeypatch.setitem(tg.PRODUCE_CFG, "BM", BM)
    monkeypatch.setattr(tg, "OFF32_WORDS", off32)
    x, Wg, _, _ = int_problem(37)
    packed, over = twell_gate_pack_gpu(x, Wg, 256, 8)
    ref, ref_over = twell_pack(F.relu(x @ Wg).cpu(), 256, 8)
    assert_close("words, several row blocks", words(packed), words(ref), 0, 0)
    assert_close("overflow flags", over.cpu(), ref_over, 0, 0)


@pytest.mark.parametrize("tile,C", [(256, 8), (32, 2)])
def test_producer_writes_every_count_and_entry(tile, C, monkeypatch):
    """packed is zeroed first (the words after a slot's entries stay 0) and the producer writes every
    count word and entry: allocated with a sentinel instead of zeros, exactly the words after the
    entries must keep it."""
    x, Wg, _, _ = int_problem(37)
    ref, ref_over = twell_pack(F.relu(x @ Wg).cpu(), tile, C)
    real_zeros, sentinel = torch.zeros, 0x5A5A5A5A

    def sentinel_zeros(*args, **kwargs):  # packed is the only 2-D int32 tensor the producer allocates
        t = real_zeros(*args, **kwargs)
        return t.fill_(sentinel) if t.dtype == torch.int32 and t.dim() == 2 else t

    monkeypatch.setattr(torch, "zeros", sentinel_zeros)
    packed, over = twell_gate_pack_gpu(x, Wg, tile, C)
    monkeypatch.undo()
    W = tile // C
    slots = words(ref).view(37, -1, W)
    after = torch.arange(W) > slots[..., :1]  # [37, nT, W] the words after each slot's entries
    expected = torch.where(after, torch.tensor(sentinel, dtype=torch.int32), slots).view(37, -1)
    assert after.any()
    assert_close(f"words tile={tile} C={C}, sentinel-filled", words(packed), expected, 0, 0)
    assert_close("overflow flags", over.cpu(), ref_over, 0, 0)


def test_producer_rounds_to_nearest_even():
    """Row 3's gates are 256 + odd: exact ties between two bf16 values, rounded to the even one."""
    x, Wg, _, _ = int_problem(4)
    packed, _ = twell_gate_pack_gpu(x[3:4], Wg, 256, 8)
    w = words(packed)[0].view(3, 32)  # 3 slots of 32 words
    entries = torch.cat([w[t, 1 : 1 + w[t, 0]] for t in range(3)])
    cols = (entries & 0xFFFF).tolist()
    vals = (entries & -65536).view(torch.float32).tolist()
    assert cols == [5, 77, 130, 200, 300, 333, 450, 513, 590, 599]
    # 257 -> 256, 259 -> 260, 261 -> 260, 263 -> 264, ...: the bf16 grid is 2 apart here, ties to even
    assert vals == [256.0, 260.0, 260.0, 264.0, 264.0, 268.0, 268.0, 272.0, 272.0, 276.0]


# ------------------------------------------------------------------------------------------
# The consumer: reads any producer's words
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,C", [(256, 8), (64, 4), (16, 2)])
def test_consumer_reads_spark_words(tile, C, monkeypatch):
    """Fed spark.twell_pack's words (the format is the contract between producer and consumer,
    so the consumer must read any producer's): rows without overflow equal spark.twell_ffn
    exactly, the others are NaN (the consumer alone has no dense route). With 4 entries per step
    a row's entries span several steps and steps span tiles; with 4 count words at a time the
    three tiles of f = 600 take a loop of two chunks. Tile 16 is below the producer's smallest: the
    consumer reads any tile of the format."""
    x, Wg, Wu, Wd = int_problem(37)
    packed, over = twell_pack(F.relu(x @ Wg), tile, C)
    _, WuT, _ = prepare_twell_gpu(Wg, Wu, Wd)
    ref = twell_ffn(x, Wg, Wu, Wd, tile, C)
    monkeypatch.setattr(tg, "CONSUME_FEW_ROWS", 0)  # CONSUME_CFG for these 37 rows, on a GPU too
    for E, ntb in ((16, 64), (4, 4)):  # also 4 entries per step and count words read 4 tiles at a time
        monkeypatch.setitem(tg.CONSUME_CFG, "E", E)
        monkeypatch.setattr(tg, "CONSUME_NTB_MAX", ntb)
        y = twell_consume_gpu(x, packed, over, WuT, Wd, tile, C)
        assert_close(f"consumer E={E} NTB<={ntb}", y[~over].cpu(), ref[~over].cpu(), 0, 0)
        assert y[over].isnan().all()
        if tile != 256:
            break  # the interpreter is slow; (256, 8) covers both settings


# ------------------------------------------------------------------------------------------
# twell_ffn_gpu: the whole FFN, hybrid route included
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,C", [(256, 8), (256, 4), (64, 8)])
def test_twell_ffn_exact(tile, C):
    """Exact sums: equal to spark.twell_ffn and to the dense bf16 FFN (relu_l1_ffn), bit for bit,
    on every row: those read from the words and those the hybrid route computes densely (the
    default cap, 37 here, holds them all). The empty row gives exactly 0."""
    x, Wg, Wu, Wd = int_problem(37)
    y = twell_ffn_gpu(x, Wg, Wu, Wd, tile, C)
    # every overflowing row went through the dense kernels, every other one through the words
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert_close("twell_ffn_gpu vs spark.twell_ffn", y.cpu(), twell_ffn(x, Wg, Wu, Wd, tile, C).cpu(), 0, 0)
    assert_close("twell_ffn_gpu vs the dense FFN", y.cpu(), relu_l1_ffn(x, Wg, Wu, Wd)[0].cpu(), 0, 0)
    assert_close("empty row", y[0].cpu(), torch.zeros(72), 0, 0)


def test_consumer_weights_at_an_odd_element(monkeypatch):
    """WuT and Wd as views starting one bf16 into their storage (2 bytes past a 4-byte boundary):
    the consumer reads pairs of columns as 32-bit words, so such weights must reach its kernel
    copied to an aligned place (on a GPU a misaligned read faults; the interpreter would not
    notice, so the test looks at the pointers the kernel gets), and the result equals the
    aligned call's."""
    x, Wg, Wu, Wd = int_problem(37)
    Wg_, WuT, Wd_ = prepare_twell_gpu(Wg, Wu, Wd)
    odd = [torch.empty(w.numel() + 1, dtype=w.dtype, device=w.device)[1:].view(w.shape) for w in (WuT, Wd_)]
    for o, w in zip(odd, (WuT, Wd_)):
        o.copy_(w)
        assert o.data_ptr() % 4 == 2 and o.is_contiguous()
    kernel, seen = tg._twell_consume_kernel, []

    class Spy:  # kernel[grid](...) as the launch writes it; records WuT's and Wd's addresses
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.extend([args[1].data_ptr(), args[2].data_ptr()])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tg, "_twell_consume_kernel", Spy())
    y = twell_ffn_gpu(x, Wg_, Wu, odd[1], 256, 8, WuT=odd[0])
    assert seen and all(p % 4 == 0 for p in seen), f"the consumer got weights at {[p % 4 for p in seen]} bytes past 4"
    assert_close("weights at an odd element", y.cpu(), twell_ffn_gpu(x, Wg_, Wu, Wd_, 256, 8, WuT=WuT).cpu(), 0, 0)


def test_twell_ffn_odd_width():
    """An odd d (71): the consumer reads its weight rows one bf16 at a time, not as 32-bit pairs
    (_pairs' other branch); still exact against spark.twell_ffn and the dense FFN.

    The references run torch's bf16 matmuls, which on a GPU may sum in bf16 pieces by default
    (on an H200, x @ Wu at d = 71 differed from the exact sums in 3 of 37 rows, ours in none):
    they are asked for float32 sums here, so that exact means exact."""
    x, Wg, Wu, Wd = int_problem(37, d=71)
    y = twell_ffn_gpu(x, Wg, Wu, Wd, 256, 8)
    saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        ref, dense = twell_ffn(x, Wg, Wu, Wd, 256, 8), relu_l1_ffn(x, Wg, Wu, Wd)[0]
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = saved
    assert_close("odd d vs spark.twell_ffn", y.cpu(), ref.cpu(), 0, 0)
    assert_close("odd d vs the dense FFN", y.cpu(), dense.cpu(), 0, 0)


def test_twell_ffn_random_within_bound():
    """Random bf16 inputs, a leading batch axis, a prepared WuT: within the bound of the docstring."""
    x, Wg, Wu, Wd = randn_problem(37)
    Wg_, WuT, Wd_ = prepare_twell_gpu(Wg, Wu, Wd)
    # random gates put nonzeros anywhere, so some rows overflow their C slots and go through
    # the dense route: the bound covers both routes, and two calls must give the same bits
    # (no atomics, a fixed order of sums)
    y = twell_ffn_gpu(x.view(1, 37, 72), Wg_, Wu, Wd_, 256, 8, WuT=WuT)
    assert y.shape == (1, 37, 72)
    ref, bound = dense_bound(x, Wg, Wu, Wd)
    assert_within("twell_ffn_gpu vs float64 dense FFN", y[0], ref, bound)
    assert_within("spark.twell_ffn vs float64 dense FFN (the bound holds for torch too)", twell_ffn(x, Wg, Wu, Wd), ref, bound)
    assert_close("deterministic", twell_ffn_gpu(x.view(1, 37, 72), Wg_, Wu, Wd_, 256, 8, WuT=WuT).cpu(), y.cpu(), 0, 0)


def test_adversarial_rows():
    """M = 1 (decode) on each special row, at C = 8 (40 nonzeros overflow 31 slots) and C = 4
    (they fit 63): exact against the dense FFN. Then all 37 rows overflowing, with the default
    cap = M (for M < 64): the hybrid route computes every row."""
    x, Wg, Wu, Wd = int_problem(4)
    for m, what in enumerate(("empty", "every entry nonzero", "40 nonzeros in one tile", "ties")):
        for C in (8, 4):
            y = twell_ffn_gpu(x[m : m + 1], Wg, Wu, Wd, 256, C)
            assert_close(f"M = 1, {what}, C = {C}", y.cpu(), relu_l1_ffn(x[m : m + 1], Wg, Wu, Wd)[0].cpu(), 0, 0)
    # 37 different random rows, each with the offset flipped to +B
    x_all = int_problem(37, special=False)[0].clone()
    x_all[:, 0] = -1  # g = B + (a sum of ~20 terms of +-1): nearly every gate positive, every row overflows
    assert twell_pack(F.relu(x_all @ Wg).cpu())[1].all()
    y = twell_ffn_gpu(x_all, Wg, Wu, Wd)
    assert_close("all rows overflowing", y.cpu(), relu_l1_ffn(x_all, Wg, Wu, Wd)[0].cpu(), 0, 0)


def test_more_overflowing_rows_than_cap_is_an_error():
    """One row more than cap overflows: an error naming cap, not a dropped row. On the CPU
    torch._assert_async raises at once; on a GPU at the next synchronisation (pytest.raises
    around the call and a y.cpu() would be the GPU form; the CUDA context is lost after it, so
    the GPU run of this test needs the interpreter's path: it is skipped there)."""
    if HAS_CUDA:
        pytest.skip("a device-side assert would leave the CUDA context unusable for the other tests")
    x, Wg, Wu, Wd = int_problem(4)
    # int_problem's row 1 has every gate nonzero, far more than the 31 slots a tile of 256
    # holds at C = 8, so a batch of copies of it is a batch of overflowing rows
    x_all = x[1:2].expand(37, 72).contiguous()  # every row overflows
    # 37 overflowing rows, room for 36; then one overflowing row, room for none
    with pytest.raises(RuntimeError, match="more rows overflowed a tile than cap = 36"):
        twell_ffn_gpu(x_all, Wg, Wu, Wd, cap=36)
    with pytest.raises(RuntimeError, match="cap = 0"):
        twell_ffn_gpu(x[1:2], Wg, Wu, Wd, cap=0)
    # cap = 0 is fine when nothing overflows (row 0 is empty, row 3 has 10 entries)
    y = twell_ffn_gpu(x[[0, 3]], Wg, Wu, Wd, cap=0)
    assert_close("cap = 0, no overflow", y.cpu(), relu_l1_ffn(x[[0, 3]], Wg, Wu, Wd)[0].cpu(), 0, 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, inside the interpreter, meets the inf
def test_non_finite_gate_is_an_error():
    """An inf in x makes gates inf or NaN (inf - inf): an error, as in spark.twell_pack."""
    if HAS_CUDA:
        pytest.skip("a device-side assert would leave the CUDA context unusable for the other tests")
    x, Wg, Wu, Wd = int_problem(4)
    x = x.clone()
    # x[3, 5] = inf meets Wg[5, j] = 1, 0, -1: gates +inf, NaN (inf * 0) and -inf (a ReLU's 0)
    x[3, 5] = float("inf")
    with pytest.raises(RuntimeError, match="NaN or \\+inf gate"):
        twell_ffn_gpu(x, Wg, Wu, Wd)
    with pytest.raises(RuntimeError, match="NaN or \\+inf gate"):
        twell_gate_pack_gpu(x, Wg)


def test_bad_input():
    """Every wrong argument gets an error that names it and says what was expected."""
    x, Wg, Wu, Wd = int_problem(4)
    with pytest.raises(ValueError, match="x must be a bfloat16"):
        twell_ffn_gpu(x.float(), Wg, Wu, Wd)
    with pytest.raises(ValueError, match="x must be a bfloat16 .* d = Wg.shape\\[0\\] = 72"):
        twell_ffn_gpu(x[:, :70], Wg, Wu, Wd)
    with pytest.raises(TypeError, match="Wg must be a bfloat16"):
        twell_ffn_gpu(x, Wg.float(), Wu, Wd)
    with pytest.raises(ValueError, match="Wd \\[f, d\\]"):
        twell_ffn_gpu(x, Wg, Wu, Wd[:, :70])
    with pytest.raises(ValueError, match="WuT must be \\[600, 72\\]"):
        twell_ffn_gpu(x, Wg, Wu, Wd, WuT=Wu)
    with pytest.raises(ValueError, match="C must be one of"):
        twell_ffn_gpu(x, Wg, Wu, Wd, C=3)
    with pytest.raises(ValueError, match="tile must be a power of two"):
        twell_ffn_gpu(x, Wg, Wu, Wd, tile=96)
    with pytest.raises(ValueError, match="tile must be in \\[32, 256\\]"):
        twell_ffn_gpu(x, Wg, Wu, Wd, tile=512)
    with pytest.raises(ValueError, match="tile must be in \\[32, 256\\]"):  # a valid format, below the producer's halves
        twell_gate_pack_gpu(x, Wg, tile=16, C=2)
    with pytest.raises(ValueError, match="cap must be in"):
        twell_ffn_gpu(x, Wg, Wu, Wd, cap=-1)
    big = torch.zeros(16, 65537, dtype=torch.bfloat16, device=DEVICE)  # f > 65536: a column needs 17 bits
    with pytest.raises(ValueError, match="f must be in \\[1, 65536\\]"):
        twell_ffn_gpu(torch.zeros(1, 16, dtype=torch.bfloat16, device=DEVICE), big, big, big.t())
    # the consumer alone takes TwELL words as spark.twell_pack returns them: uint32 and bool
    packed, over = twell_gate_pack_gpu(x, Wg)
    WuT = prepare_twell_gpu(Wg, Wu, Wd)[1]
    with pytest.raises(ValueError, match="packed must be a uint32 tensor"):
        twell_consume_gpu(x, packed.view(torch.int32), over, WuT, Wd)
    with pytest.raises(ValueError, match="overflow must be a bool tensor"):
        twell_consume_gpu(x, packed, over.int(), WuT, Wd)
    if not HAS_CUDA:  # a device-side assert on a GPU (see above)
        bad = packed.view(torch.int32).clone()
        bad[0, 0] = 32  # a count above the capacity 31, as the authors' producer leaves on overflow
        with pytest.raises(RuntimeError, match="count above the capacity"):
            twell_consume_gpu(x, bad.view(torch.uint32), over, WuT, Wd)


@pytest.mark.gpu
def test_benchmark_like_shape_on_gpu():
    """d 2048, f 5632, 4096 tokens of the benchmark's gate model: within the bound; words ~ spark's."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, Wg = tg._l1_like_gate(4096, 2048, 5632, 0.995, gen)
    Wu = (torch.randn(2048, 5632, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    Wd = (torch.randn(5632, 2048, device="cuda", generator=gen) / 5632**0.5).bfloat16()
    # the benchmark's own check: the bound of the module docstring, against cuBLAS's FFN
    y = twell_ffn_gpu(x, Wg, Wu, Wd)
    tg._check_ffn("twell_ffn_gpu at the benchmark's shape", y, x, Wg, Wu, Wd)
    packed, over = twell_gate_pack_gpu(x, Wg)
    ref, ref_over = twell_pack(F.relu(x @ Wg))
    # cuBLAS and the producer sum in other orders: a few entries may round one bf16 ulp apart
    assert (words(packed) == words(ref)).float().mean() > 0.99
    assert (over == ref_over).float().mean() > 0.99
