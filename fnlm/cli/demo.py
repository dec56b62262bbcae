"""`fnlm demo`: the whole pipeline on the bundled TinyStories sample, on a CPU, in minutes.

    fnlm demo                              # runs/demo-YYYYMMDD-HHMMSS/
    fnlm demo --size small --device cuda   # a bigger model where there is a GPU

1. unpack the bundled sample (fnlm/assets/tinystories, CDLA-Sharing-1.0) into RUN/data/
2. train a byte-level BPE tokenizer on the training text         -> RUN/tokenizer/
3. tokenize the training and validation text                      -> RUN/data/*.npy
4. train a Transformer LM, with a live progress line              -> RUN/model/ (log, checkpoint, loss_curve.png)
5. print the validation loss and perplexity, and a story sampled from the model

Every run gets a new folder; nothing of an earlier run is overwritten.
"""

from __future__ import annotations

import argparse
import gzip
import math
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

from ..config import ModelConfig

ASSETS = Path(__file__).parents[1] / "assets" / "tinystories"  # fnlm/assets
SPECIAL_TOKENS = ["<|endoftext|>"]


class DemoSize(NamedTuple):
    """A model and how long to train it."""

    model: ModelConfig
    steps: int
    batch_size: int
    lr: float


SIZES = {
    # About 5 minutes of training on two idle CPU cores.
    "tiny": DemoSize(ModelConfig(vocab_size=2048, context_length=128, d_model=128, num_layers=3, num_heads=4,
                                 d_ff=352), steps=2000, batch_size=16, lr=3e-3),
    # The handout's TinyStories model, for a GPU.
    "small": DemoSize(ModelConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16,
                                  d_ff=1344), steps=1500, batch_size=64, lr=1e-3),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="tokenizer, training and a story on the bundled TinyStories sample",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the run folder (default runs/)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default tiny: CPU minutes)")
    parser.add_argument("--steps", type=int, help="training steps (default: the size's)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--seed", type=int, default=0, help="init, batches and sampling (default 0)")
    parser.add_argument("--prompt", default="Once upon a time", help="the story's first words")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from .generate import generate_samples
    from ..run import train
    from ..tokenizer import Tokenizer, train_bpe
    from ..tokenizer.encode_file import encode_file
    from ..run.process import keep_freed_memory

    size = SIZES[args.size]
    if args.steps is not None:
        size = size._replace(steps=args.steps)
    model_cfg = size.model
    if args.device == "cpu":
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
    splits = {}
    for text in (train_text, valid_text):
        splits[text.stem] = run / "data" / f"{text.stem}.npy"
        count = encode_file(tokenizer, text, splits[text.stem], num_workers=1, progress=False)
        print(f"  {text.name}: {count:,} tokens")

    train_cfg = TrainConfig(
        train_data=str(splits["train"]), val_data=str(splits["valid"]), batch_size=size.batch_size,
        steps=size.steps, lr=size.lr, min_lr=size.lr / 10, warmup_steps=max(1, size.steps // 20),
        eval_every=max(1, size.steps // 6), eval_batches=20, checkpoint_every=0, keep_checkpoints=1,
        seed=args.seed, device=args.device,
    )
    stage("3/4 training the language model",
          f"{model_cfg.num_layers} layers x d_model {model_cfg.d_model}, {size.steps} steps of "
          f"{size.batch_size} x {model_cfg.context_length} tokens on {args.device}")
    result = train(model_cfg, train_cfg, run / "model", show_progress=not args.no_progress)
    if result.checkpoint is None:
        print("fnlm demo: training stopped before a checkpoint was written", file=sys.stderr)
        return 1

    stage("4/4 a story from the model", f"prompt {args.prompt!r}, temperature 0.8, top-p 0.95")
    print()
    sample = argparse.Namespace(
        checkpoint=result.checkpoint, tokenizer=run / "tokenizer", prompt=args.prompt, max_new_tokens=256,
        temperature=0.8, top_p=0.95, seed=args.seed, num_samples=1, eos=SPECIAL_TOKENS[0], device=args.device,
    )
    generate_samples(sample, out=sys.stdout, notes=sys.stderr)
    print()

    eval_tokens = train_cfg.eval_batches * size.batch_size * model_cfg.context_length
    print(f"validation loss {result.val_loss:.3f}, perplexity {math.exp(result.val_loss):.1f} "
          f"(on {eval_tokens:,} held-out tokens) after {result.step} steps")
    print(f"loss curve  {run / 'model' / 'loss_curve.png'}")
    print(f"checkpoint  {result.checkpoint}")
    print(f"tokenizer   {run / 'tokenizer'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


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
