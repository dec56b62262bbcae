"""Print the numbers docs/experiments.md and docs/writeup.md derive from the committed experiment files.

    uv run python scripts/experiment_facts.py

Reads docs/experiments/summary.json (one line per run of scripts/experiments.py, written by its
`report` from the run logs), the vmapped learning-rate sweep's logs in docs/experiments/sweep_lr/,
docs/tokenizer/tokenizer_experiments.json (token counts) and scripts/experiments.py (the run
table). Parameters are counted on fnlm's own parameter tree. Every run is a single seed (0).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from accounting import param_count  # noqa: E402
from experiments import MAIN, TINYSTORIES_MODEL  # noqa: E402

from fnlm.config import ModelConfig  # noqa: E402
from fnlm.run import read_log  # noqa: E402

DOCS = ROOT / "docs"


def main() -> None:
    summary = json.loads((DOCS / "experiments" / "summary.json").read_text())["runs"]
    encoded = json.loads((DOCS / "tokenizer" / "tokenizer_experiments.json").read_text())["d_encode"]
    ts_train, en_all = encoded["ts_train"]["tokens"], encoded["en_all"]["tokens"]

    ts_params = param_count(ModelConfig(**TINYSTORIES_MODEL))
    main_params = param_count(ModelConfig(**{**TINYSTORIES_MODEL, "vocab_size": MAIN["vocab_size"]}))
    print(f"parameters: TinyStories model {ts_params:,}; main experiment (32K vocabulary) {main_params:,} "
          f"({main_params / ts_params:.2f}x)")

    ts_tokens, main_tokens = summary["lr_0.001"]["tokens"], summary["main_en"]["tokens"]
    print(f"TinyStories runs: {ts_tokens:,} tokens = {ts_tokens / ts_train:.2f} passes over the "
          f"{ts_train:,} training tokens")
    print(f"main experiment: {main_tokens:,} tokens = {main_tokens / ts_tokens:.1f}x a TinyStories run's, "
          f"{main_tokens / en_all:.2f} passes over the whole stand-in ({en_all:,} tokens, valid included); "
          f"the stand-in has {en_all / ts_train:.1f}x the TinyStories training tokens")
    print(f"main experiment: final validation loss {summary['main_en']['final_val_loss']:.3f} (perplexity "
          f"{math.exp(summary['main_en']['final_val_loss']):.1f}), {summary['main_en']['wall_seconds']:.0f} s")

    sweep = DOCS / "experiments" / "sweep_lr"
    base = read_log(sweep / "lr=0.001_min_lr=0.0001" / "log.jsonl")
    print("vmapped sweep, lr 1e-3, validation loss by step:",
          ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in base if "val_loss" in r))
    print("vmapped sweep, lr 1e-3, training loss (10-step mean) by step:",
          ", ".join(f"{r['step']}: {r['train_loss']:.2f}" for r in base if "train_loss" in r and r["step"] % 50 == 0))
    for run, settle in (("lr=1_min_lr=0.1", 10.0), ("lr=3_min_lr=0.3", 20.0)):
        records = read_log(sweep / run / "log.jsonl")
        train = [r for r in records if "train_loss" in r]
        config = json.loads((sweep / run / "config.json").read_text())["train"]
        peak = max(train, key=lambda r: r["train_loss"])
        end_of_warmup = next(r for r in train if r["step"] > config["warmup_steps"])
        settled = next(r for r in train if r["step"] > peak["step"] and r["train_loss"] < settle)
        finite = all(math.isfinite(r[key]) for r in records for key in ("train_loss", "val_loss") if key in r)
        val = [r["val_loss"] for r in records if "val_loss" in r]
        print(f"{run}: warm-up {config['warmup_steps']} steps; training loss (10-step means) {train[0]['train_loss']:.1f} "
              f"at step {train[0]['step']}, {end_of_warmup['train_loss']:.1f} at step {end_of_warmup['step']}, "
              f"peak {peak['train_loss']:.1f} at step {peak['step']} (lr {peak['lr']:.3g}); first below {settle:g} at "
              f"step {settled['step']} (lr {settled['lr']:.3g}); final train {train[-1]['train_loss']:.2f}, final "
              f"validation {val[-1]:.3f}; every loss finite: {finite}")


if __name__ == "__main__":
    main()
