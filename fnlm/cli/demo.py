"""`fnlm demo`: the whole pipeline on the bundled TinyStories sample, in minutes, on a CPU or a GPU.

    fnlm demo                          # runs/demo-YYYYMMDD-HHMMSS/; CUDA if there is one, else the CPU
    fnlm demo --device cpu             # the CPU size even where there is a GPU

1. unpack the bundled sample (fnlm/assets/tinystories, CDLA-Sharing-1.0) into RUN/data/
2. train a byte-level BPE tokenizer on the training text         -> RUN/tokenizer/
3. tokenize the training and validation text                      -> RUN/data/*.npy
4. train a Transformer LM, with a live progress line              -> RUN/model/ (log, checkpoints, loss_curve.png)
5. sample a story from the checkpoint with the lowest validation loss, print that loss, and the
   longest passage the story shares word for word with the training text    -> RUN/demo.json

The sample is small (0.57M training tokens), so a model trained long enough memorises it: the demo
sizes training in passes over the training tokens, validates as it goes, and writes the story with
the checkpoint that validated best. Every run gets a new folder; nothing of an earlier run is
overwritten.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple, TextIO

from ..config import ModelConfig

ASSETS = Path(__file__).parents[1] / "assets" / "tinystories"  # fnlm/assets
SPECIAL_TOKENS = ["<|endoftext|>"]
VOCAB_SIZE = 2048  # both sizes share the tokenizer, so their validation losses compare
HASH_BASE = 0x100000001B3  # odd (invertible mod 2**64): the base of the word n-gram hashes


class DemoSize(NamedTuple):
    """A model and how long to train it, in passes over the training tokens (steps follow from the data)."""

    model: ModelConfig
    epochs: float
    batch_size: int
    lr: float
    evals: int  # validations over the run, each followed by a checkpoint: the best one writes the story
    autocast: str = "none"
    muon_lr: float | None = None  # Muon for the hidden matrices at this rate (AdamW at lr beside it), else AdamW alone


SIZES = {
    # The CPU size: Muon beside AdamW reaches in 5.5 passes the validation loss AdamW alone reached
    # in 7 (2.878 vs 2.891: docs/results/demo_cpu_muon_trial.txt), which brings the demo under 5
    # minutes on two idle cores (AdamW's 7 passes took 6 min 10 s: docs/results/demo_cpu_idle.txt).
    "tiny": DemoSize(ModelConfig(vocab_size=VOCAB_SIZE, context_length=128, d_model=128, num_layers=3, num_heads=4,
                                 d_ff=352), epochs=5.5, batch_size=16, lr=3e-3, evals=8, muon_lr=8e-3),
    # The GPU size (what `--device auto` picks on CUDA): twice the width, one more layer, the same
    # data, batches and passes as the CPU size; chosen on one H200 among the CPU size and this one at
    # lr 2e-3 / 3e-3 (validation 2.896, 2.850, 2.823: docs/results/demo_gpu_sizes_h200.log).
    "small": DemoSize(ModelConfig(vocab_size=VOCAB_SIZE, context_length=128, d_model=256, num_layers=4, num_heads=4,
                                  d_ff=688), epochs=7.0, batch_size=16, lr=3e-3, evals=8),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="tokenizer, training and a story on the bundled TinyStories sample",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the run folder (default runs/)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda, else mps, else cpu), cpu, cuda or mps")
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="model size (default: small on CUDA, tiny elsewhere)")
    parser.add_argument("--steps", type=int, help="training steps (default: the size's passes over the data)")
    parser.add_argument("--seed", type=int, default=0, help="init, batches and sampling (default 0)")
    parser.add_argument("--prompt", default="Once upon a time", help="the story's first words")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..data import resolve_device
    from ..run import read_log, train
    from ..run.folder import LOG, checkpoints
    from ..run.process import keep_freed_memory
    from ..tokenizer import Tokenizer, train_bpe
    from ..tokenizer.encode_file import encode_file
    from .generate import generate_samples

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = resolve_device(args.device)
    size = SIZES[args.size or default_size(device.type)]
    model_cfg = size.model
    if device.type == "cpu":
        keep_freed_memory()  # see fnlm.run.process: spares an eager CPU step its page faults
    run = new_run_dir(args.out)
    print(f"fnlm demo: writing into {run}/", flush=True)
    started = time.perf_counter()

    train_text, valid_text = unpack_sample(run / "data")
    stage("1/4 training a BPE tokenizer", f"vocab {model_cfg.vocab_size}, {train_text.stat().st_size / 1e6:.1f} MB of stories")
    vocab, merges = train_bpe(train_text, model_cfg.vocab_size, SPECIAL_TOKENS, progress=not args.no_progress)
    tokenizer = Tokenizer(vocab, merges, SPECIAL_TOKENS)
    tokenizer.save(run / "tokenizer")

    stage("2/4 tokenizing", "train and validation text -> uint16 .npy")
    splits, counts = {}, {}
    for text in (train_text, valid_text):
        splits[text.stem] = run / "data" / f"{text.stem}.npy"
        counts[text.stem] = encode_file(tokenizer, text, splits[text.stem], num_workers=1, progress=False)
        print(f"  {text.name}: {counts[text.stem]:,} tokens")

    tokens_per_step = size.batch_size * model_cfg.context_length
    steps = args.steps or steps_for_epochs(size.epochs, counts["train"], tokens_per_step)
    eval_every = max(1, steps // size.evals)
    train_cfg = TrainConfig(
        train_data=str(splits["train"]), val_data=str(splits["valid"]), batch_size=size.batch_size,
        steps=steps, lr=size.lr, min_lr=size.lr / 10, warmup_steps=max(1, steps // 20),
        **({} if size.muon_lr is None else {"optimizer": "muon", "muon_lr": size.muon_lr}),
        eval_every=eval_every, eval_batches=20, checkpoint_every=eval_every, keep_checkpoints=steps // eval_every + 1,
        seed=args.seed, device=str(device), autocast=size.autocast if device.type == "cuda" else "none",
    )
    stage("3/4 training the language model",
          f"{model_cfg.num_layers} layers x d_model {model_cfg.d_model}, {steps} steps of {size.batch_size} x "
          f"{model_cfg.context_length} tokens ({steps * tokens_per_step / counts['train']:.1f} passes over the "
          f"training tokens) on {device}, {train_cfg.optimizer}")
    result = train(model_cfg, train_cfg, run / "model", show_progress=not args.no_progress)
    saved = checkpoints(run / "model")
    best = best_validation(read_log(run / "model" / LOG), saved)
    if best is None:
        print("fnlm demo: training stopped before a validated checkpoint was written", file=sys.stderr)
        return 1
    best_step, best_loss = best
    for step, path in saved.items():  # keep the story's checkpoint and the last one
        if step not in (best_step, result.step):
            path.unlink()

    stage("4/4 a story from the model", f"checkpoint of step {best_step}, prompt {args.prompt!r}, "
          "temperature 0.8, top-p 0.95")
    print()
    story = io.StringIO()
    generate_samples(saved[best_step], run / "tokenizer", args.prompt, max_new_tokens=256, temperature=0.8,
                     top_p=0.95, seed=args.seed, eos=SPECIAL_TOKENS[0], device=str(device),
                     out=Tee(sys.stdout, story), notes=sys.stderr)
    print()

    span = longest_shared_span(story.getvalue(), train_text.read_text(encoding="utf-8"))
    eval_tokens = min(train_cfg.eval_batches * size.batch_size * model_cfg.context_length, counts["valid"])
    print(f"validation loss {best_loss:.3f}, perplexity {math.exp(best_loss):.1f} (on {eval_tokens:,} held-out "
          f"tokens) at step {best_step} of {result.step}: the checkpoint that wrote the story")
    print(f"longest passage of the story found in the training text: {len(span.split())} of "
          f"{len(story.getvalue().split())} words: {span!r}")
    seconds = time.perf_counter() - started
    (run / "demo.json").write_text(json.dumps({
        "device": str(device), "size": args.size or default_size(device.type), "model": model_cfg.to_dict(),
        "train_tokens": counts["train"], "steps": result.step, "epochs": result.step * tokens_per_step / counts["train"],
        "story_step": best_step, "val_loss": best_loss, "val_tokens": eval_tokens, "train_loss": result.train_loss,
        "final_val_loss": result.val_loss, "longest_shared_words": len(span.split()), "longest_shared_span": span,
        "story": story.getvalue(), "seconds": seconds,
    }, indent=1) + "\n")
    print(f"loss curve  {run / 'model' / 'loss_curve.png'}")
    print(f"checkpoint  {saved[best_step]}")
    print(f"tokenizer   {run / 'tokenizer'}")
    print(f"summary     {run / 'demo.json'}")
    print(f"done in {seconds:.0f} s")
    return 0


def default_size(device_type: str) -> str:
    """The GPU size on CUDA, the CPU size anywhere else."""
    return "small" if device_type == "cuda" else "tiny"


def steps_for_epochs(epochs: float, train_tokens: int, tokens_per_step: int) -> int:
    """The steps that read `epochs` times the training tokens (at least one)."""
    return max(1, math.ceil(epochs * train_tokens / tokens_per_step))


def best_validation(records: list[dict], checkpoints: dict[int, Path]) -> tuple[int, float] | None:
    """(step, validation loss) of the lowest finite validation loss among the steps with a
    checkpoint (the earliest on a tie); None when no checkpointed step was validated."""
    validated = [(record["val_loss"], record["step"]) for record in records
                 if record.get("val_loss") is not None and math.isfinite(record["val_loss"])
                 and record["step"] in checkpoints]
    if not validated:
        return None
    loss, step = min(validated)
    return step, loss


def longest_shared_span(text: str, corpus: str) -> str:
    """The longest run of consecutive words of `text` that occurs word for word in `corpus`.

    Words are split at whitespace (punctuation stays attached), so "time," and "time" differ.
    Every word n-gram is hashed (polynomial, mod 2**64) in one vectorised pass over the corpus;
    the length is found by doubling, then bisection, since any part of a shared span is shared.
    So a corpus of N words and an answer of k words cost O(N log N log k): about a second for the
    2 MB training text.
    Returns "" when no word of `text` is in `corpus`.
    """
    import numpy as np

    words, corpus_words = text.split(), corpus.split()
    index = {word: i for i, word in enumerate(dict.fromkeys(corpus_words))}
    corpus_ids = np.fromiter((index[word] for word in corpus_words), np.uint64, len(corpus_words))
    unseen = len(index)  # a word not in the corpus gets an id of its own that matches nothing
    text_ids = np.array([index.get(word, unseen + i) for i, word in enumerate(words)], dtype=np.uint64)

    def start_of_shared(n: int) -> int | None:
        """A position in `words` whose n words occur in the corpus, or None."""
        text_hashes, corpus_hashes = ngram_hashes(text_ids, n), ngram_hashes(corpus_ids, n)
        if not len(corpus_hashes):
            return None
        known = np.sort(corpus_hashes)  # sort + searchsorted: np.isin is far slower for a few needles
        found = known[np.minimum(np.searchsorted(known, text_hashes), len(known) - 1)] == text_hashes
        for i in np.flatnonzero(found):
            for j in np.flatnonzero(corpus_hashes == text_hashes[i]):  # rule out hash collisions
                if corpus_words[j:j + n] == words[i:i + n]:
                    return int(i)
        return None

    best_len, best_start, high = 0, 0, 1
    while high <= len(words) and (start := start_of_shared(high)) is not None:  # double while shared
        best_len, best_start, high = high, start, 2 * high
    high = min(high, len(words) + 1)  # high is not shared (or past the end); best_len is
    while high - best_len > 1:
        middle = (best_len + high) // 2
        start = start_of_shared(middle)
        if start is None:
            high = middle
        else:
            best_len, best_start = middle, start
    return " ".join(words[best_start:best_start + best_len])


def ngram_hashes(ids, n: int):
    """The hash sum_j ids[p + j] * B**j (mod 2**64) of every n-gram: (N,) uint64 -> (max(N - n + 1, 0),) uint64.

    From prefix sums of ids[q] * B**q, each window's difference divided by B**p (B is odd, hence
    invertible mod 2**64): one O(N) pass whatever n is. uint64 arithmetic wraps, which is the mod.
    """
    import numpy as np

    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)

    def powers(base: int):  # base**0, base**1, ... base**(N-1), mod 2**64
        factors = np.full(len(ids), base, dtype=np.uint64)
        factors[0] = 1
        return np.cumprod(factors, dtype=np.uint64)

    prefix = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(ids * powers(HASH_BASE), dtype=np.uint64)])
    return (prefix[n:n + count] - prefix[:count]) * powers(pow(HASH_BASE, -1, 2**64))[:count]


class Tee:
    """A text stream that writes to several: the story goes to the terminal and is kept."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def new_run_dir(parent: Path) -> Path:
    """parent/demo-YYYYMMDD-HHMMSS, with a -2, -3... suffix if that exists: never an old run's folder."""
    stamp = time.strftime("demo-%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run.mkdir(parents=True)
            return run
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a new folder name under {parent}")


def unpack_sample(folder: Path) -> tuple[Path, Path]:
    """The bundled train/valid stories, gunzipped into folder/, with their license notice."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "NOTICE.md", folder / "NOTICE.md")
    paths = []
    for split in ("train", "valid"):
        path = folder / f"{split}.txt"
        with gzip.open(ASSETS / f"{split}.txt.gz", "rb") as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target)
        paths.append(path)
    return paths[0], paths[1]


def stage(title: str, detail: str) -> None:
    print(f"\n== {title}: {detail}", flush=True)
