"""The run folder: what one run writes, and the lock that keeps it to one process.

    run_dir/config.json                 {"model": ModelConfig, "train": TrainConfig}, as last run
    run_dir/log.jsonl                   one JSON record per log / validation / divergence event
    run_dir/checkpoints/step_0001000.pt the newest `keep_checkpoints` checkpoints
    run_dir/loss_curve.png              loss against steps and against wall-clock time
    run_dir/.lock                       held (fcntl.flock) while a process trains into the folder
    run_dir/tokenizer/                  a run made by import_hf (a Llama folder) also holds its tokenizer

A sweep's folder holds one such folder per run, plus sweep.json and learning_curves.png
(fnlm.run.sweep). Every reader names the file at fault: a config that does not parse is a
ValueError naming it, a missing one a FileNotFoundError naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import ModelConfig, TrainConfig
from ..files import new_folder, read_json, write_json

CONFIG, LOG, CHECKPOINTS, LOCK, PLOT = "config.json", "log.jsonl", "checkpoints", ".lock", "loss_curve.png"


# --- config ------------------------------------------------------------------------------------


def save_run_config(run_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    write_json(Path(run_dir) / CONFIG, {"model": model_cfg.to_dict(), "train": cfg.to_dict()})


def load_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run folder (nothing to resume)")
    return configs_from(read_json(path), path)


def configs_from(values: Any, path: Path) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) from a {"model": ..., "train": ...} value read from `path`."""
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict) or not isinstance(
            values.get("train"), dict):
        raise ValueError(f"{path}: expected an object with 'model' and 'train' objects")
    try:
        return ModelConfig.from_dict(values["model"]), TrainConfig.from_dict(values["train"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}.pt"


def checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> path of the run folder's checkpoints (checkpoint_path's names), oldest first."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINTS).glob("step_*.pt"):
        digits = path.stem.removeprefix("step_")
        if digits.isdecimal():  # not isdigit(): int() cannot read "²"
            found[int(digits)] = path
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return next(reversed(checkpoints(run_dir).values()), None)


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list(checkpoints(run_dir).values())[:-keep]:
        old.unlink()


# --- the log -----------------------------------------------------------------------------------


class RunLog:
    """Append-only JSON lines; on resume, records after the checkpoint's step are dropped first
    (they belong to steps that will be run again)."""

    def __init__(self, path: Path, *, keep_until: int, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [record for record in read_log(path) if record["step"] <= keep_until]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


# --- the lock ----------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(folders: Sequence[Path]) -> Iterator[None]:
    """Hold an exclusive lock on each folder (created if needed) for the with-block.

    The lock is fcntl.flock on folder/.lock: the kernel drops it when the process ends, however
    it ends, so a lock file left by a dead process blocks nothing. A folder another process
    holds is a BlockingIOError naming it, raised at once.
    """
    with contextlib.ExitStack() as stack:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            file = stack.enter_context(open(folder / LOCK, "a+"))
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                raise BlockingIOError(
                    f"{folder} is in use: {holder} is training into it (lock {folder / LOCK}); "
                    "wait for it to finish, or choose another --out"
                ) from None
            file.seek(0)
            file.truncate()
            file.write(f"process {os.getpid()}\n")
            file.flush()
        yield


# --- plots -------------------------------------------------------------------------------------


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, or None without matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(run_dir: Path) -> Path | None:
    """run_dir/loss_curve.png: train and validation loss against steps and wall-clock time.

    matplotlib is an optional extra (`uv sync --extra plot`): without it the plot is skipped
    with a message.
    """
    plt = _pyplot()
    if plt is None:
        print("loss curve skipped: matplotlib is not installed (uv sync --extra plot)", file=sys.stderr)
        return None
    log = Path(run_dir) / LOG
    records = read_log(log) if log.exists() else []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, x_key, label in ((axes[0], "step", "step"), (axes[1], "wall_s", "wall-clock seconds")):
        for key, name in (("train_loss", "train"), ("val_loss", "validation")):
            points = [(r[x_key], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), label=name, marker="." if key == "val_loss" else None)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(Path(run_dir) / PLOT, dpi=120)
    plt.close(figure)
    return Path(run_dir) / PLOT


def plot_sweep(run_dirs: Sequence[Path], png_path: Path) -> Path | None:
    """Every run's train loss (solid) and validation loss (dots) against steps, one colour per
    run; a diverged run ends in an x. Skipped without matplotlib, like plot_losses."""
    plt = _pyplot()
    if plt is None:
        print("learning curves skipped: matplotlib is not installed (uv sync --extra plot)", file=sys.stderr)
        return None
    figure, axis = plt.subplots(figsize=(9, 5))
    first_losses = []
    for index, run_dir in enumerate(run_dirs):
        records = read_log(run_dir / LOG) if (run_dir / LOG).exists() else []
        colour = f"C{index % 10}"
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        diverged = [r["step"] for r in records if r.get("diverged")]
        label = Path(run_dir).name + (f" (diverged at step {diverged[0]})" if diverged else "")
        if train:
            axis.plot(*zip(*train), color=colour, label=label)
            first_losses.append(train[0][1])
            if diverged:
                axis.plot([train[-1][0]], [train[-1][1]], "x", color=colour, markersize=9)
        if val:
            axis.plot(*zip(*val), ".", linestyle=":", color=colour, label=None if train else label)
    finite = [loss for loss in first_losses if math.isfinite(loss)]
    axis.set_yscale("log")  # losses a decade apart stay readable side by side
    if finite:
        axis.set_ylim(top=max(finite) * 1.05)  # a blown-up run must not flatten the others
    axis.set_xlabel("step")
    axis.set_ylabel("loss (solid: train, dotted: validation)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0) -> Path:
    """A LlamaForCausalLM folder (fnlm.hf.read_hf_folder) as the run folder `out`, ready for
    `fnlm generate` and, once the "train" table of its config.json names the data and the
    schedule, for fine-tuning with `fnlm train --out OUT --resume` (the checkpoint records no
    training config, so any schedule is accepted at step 0):

        out/config.json                    {"model": ModelConfig, "train": TrainConfig defaults}
        out/checkpoints/step_0000000.pt    the weights at step 0, a fresh optimizer state
        out/tokenizer/                     vocab.json, merges.txt, special_tokens.json

    The folder appears whole or not at all. Returns the checkpoint's path."""
    import torch

    from ..checkpoint import save_checkpoint
    from ..hf import read_hf_folder
    from ..train import make_optimizer

    cfg, params, tokenizer = read_hf_folder(hf_dir)
    train_cfg = TrainConfig(seed=seed)
    with new_folder(out) as staging:
        save_run_config(staging, cfg, train_cfg)
        tokenizer.save(staging / "tokenizer")
        save_checkpoint(checkpoint_path(staging, 0), model_config=cfg, params=params, step=0,
                        opt_state=make_optimizer(train_cfg).init(params),
                        rng=torch.Generator().manual_seed(seed).get_state(), extra={"imported_from": str(hf_dir)})
    return checkpoint_path(Path(out), 0)
