"""A training run: data, steps, validation, logs, checkpoints and resumption, in a run directory.

    run_dir/config.json                 {"model": ModelConfig, "train": TrainConfig}
    run_dir/log.jsonl                   one JSON record per log / validation event
    run_dir/checkpoints/step_0001000.pt the newest `keep_checkpoints` checkpoints
    run_dir/loss_curve.png              loss against steps and against wall-clock time

`train` resumes exactly: parameters, optimizer state, the sampler's generator and the step come
back from the newest checkpoint, so N steps in one go equal N/2 + N/2 steps with a restart in
between. Under torchrun every process draws the same global batch and keeps its own rows.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import eval_batches, gather_windows, load_tokens, resolve_device, sample_starts
from .model import init_params
from .progress import Progress
from .tree import unflatten
from .train import eval_result, evaluate, make_loss_fn, make_optimizer, make_schedule, make_train_step, parse_autocast

CHECKPOINTS = "checkpoints"


class RunResult(NamedTuple):
    step: int
    interrupted: bool  # stopped early by should_stop (Ctrl-C); a checkpoint holds the last step
    train_loss: float | None  # the mean over the last log window
    val_loss: float | None
    checkpoint: Path | None


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Train into `run_dir`, or continue its newest checkpoint when `resume`. `should_stop` is
    asked before every step (at log boundaries when distributed); True ends the run early with
    a checkpoint of the last completed step."""
    device = resolve_device(cfg.device)
    with distributed.joined(device.type) as world:
        if device.type == "cuda" and world.size > 1:
            device = torch.device("cuda", world.local_rank)
        return _Run(model_cfg, cfg, Path(run_dir), device, world, resume).fit(show_progress, should_stop)


class _Run:
    """The state of a run between steps: params, optimizer state, step, the sampler's generator,
    and the sums of the current log window."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, device: torch.device,
                 world: distributed.World, resume: bool) -> None:
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world.size}")
        if not cfg.train_data:
            raise ValueError("TrainConfig.train_data is required: a token file (.npy, or raw uint16 binary)")
        self.model_cfg, self.cfg, self.run_dir, self.device, self.world = model_cfg, cfg, run_dir, device, world
        self.train_tokens = load_tokens(cfg.train_data, vocab_size=model_cfg.vocab_size, dtype=cfg.data_dtype)
        self.val_tokens = (
            load_tokens(cfg.val_data, vocab_size=model_cfg.vocab_size, dtype=cfg.data_dtype) if cfg.val_data else None
        )
        optimizer = make_optimizer(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.params, self.opt_state, self.step, self.wall_before = _start_or_resume(
            run_dir, model_cfg, cfg, optimizer, self.generator, device, resume, world
        )
        self.saved_step = self.step if resume else None
        self.log = RunLog(run_dir / "log.jsonl", keep_until=self.step, enabled=world.is_main)

        amp = parse_autocast(cfg.autocast)
        self.train_step = make_train_step(
            model_cfg, optimizer, schedule=make_schedule(cfg), autocast_dtype=amp, device_type=device.type, compile=cfg.compile,
            grad_sync=distributed.all_reduce_mean if world.size > 1 else None,
        )
        eval_loss = make_loss_fn(model_cfg, autocast_dtype=amp, device_type=device.type)
        self.eval_loss = torch.compile(eval_loss) if cfg.compile else eval_loss
        per_rank = cfg.batch_size // world.size
        self.rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)  # this process's share
        self.tokens_per_step = cfg.batch_size * model_cfg.context_length
        self.start = time.perf_counter()
        self._new_window()

    def fit(self, show_progress: bool, should_stop: Callable[[], bool]) -> RunResult:
        cfg, world = self.cfg, self.world
        train_loss = val_loss = checkpoint = None
        interrupted = False
        self.progress = Progress("train", total=cfg.steps - self.step, unit=" steps",
                                 enabled=show_progress and world.is_main)
        with self.progress:
            while self.step < cfg.steps:
                stop = should_stop()
                if world.size > 1:  # agree at log boundaries only, to spare a sync per step
                    stop = self.step % cfg.log_every == 0 and distributed.any_rank(stop, self.device)
                if stop:
                    interrupted = True
                    train_loss = self._log_window() if self.window_steps else train_loss
                    break
                self._train_one_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    train_loss = self._log_window()
                paused = time.perf_counter()
                if self.val_tokens is not None and cfg.eval_every and (
                    self.step % cfg.eval_every == 0 or self.step == cfg.steps
                ):
                    val_loss = self._validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    checkpoint = self._save()
                self.window_start += time.perf_counter() - paused  # validation and saves are not training time
        if self.saved_step != self.step:
            checkpoint = self._save()
        if world.is_main:
            plot_losses(self.run_dir / "log.jsonl", self.run_dir / "loss_curve.png")
        return RunResult(self.step, interrupted, train_loss, val_loss, checkpoint)

    def _train_one_step(self) -> None:
        context = self.model_cfg.context_length
        starts = sample_starts(len(self.train_tokens), self.cfg.batch_size, context, generator=self.generator)
        x, y = gather_windows(self.train_tokens, starts[self.rows], context, self.device)
        self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, x, y)
        self.step += 1
        self.window_sums = self.window_sums + torch.stack(metrics)  # no host sync per step
        self.last_lr = metrics.lr
        self.window_steps += 1
        self.progress.update(1)

    def _new_window(self) -> None:
        self.window_sums = torch.zeros(3, device=self.device)  # sums of (loss, grad norm, lr)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def _log_window(self) -> float:
        mean_loss, mean_norm, _ = (self.window_sums / self.window_steps).tolist()  # the window's one sync
        seconds = time.perf_counter() - self.window_start
        lr = self.last_lr.item()  # the rate of the step just taken, as the step reported it
        self.log.write(step=self.step, tokens=self.step * self.tokens_per_step, wall_s=self._wall(), lr=lr,
                       train_loss=mean_loss, grad_norm=mean_norm,
                       tokens_per_s=self.window_steps * self.tokens_per_step / seconds)
        self.progress.update(0, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        self._new_window()
        return mean_loss

    def _validate(self) -> float:
        world = self.world
        batches = eval_batches(self.val_tokens, self.cfg.batch_size // world.size, self.model_cfg.context_length,
                               self.device, max_batches=self.cfg.eval_batches, shard=(world.rank, world.size))
        sums = evaluate(self.eval_loss, self.params, batches)
        result = eval_result(distributed.sum_over_ranks(sums) if world.size > 1 else sums)
        self.log.write(step=self.step, tokens=self.step * self.tokens_per_step, wall_s=self._wall(),
                       val_loss=result.loss, val_perplexity=result.perplexity)
        return result.loss

    def _save(self) -> Path | None:
        self.saved_step = self.step
        if not self.world.is_main:
            return None
        folder = self.run_dir / CHECKPOINTS
        path = folder / f"step_{self.step:07d}.pt"
        save_checkpoint(path, model_config=self.model_cfg, params=self.params, step=self.step,
                        opt_state=self.opt_state, rng=self.generator.get_state(), train_config=self.cfg.to_dict(),
                        extra={"wall_s": self._wall()})
        for old in sorted(folder.glob("step_*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start


def _start_or_resume(run_dir, model_cfg, cfg, optimizer, generator, device, resume, world):
    """(params, opt_state, step, wall-clock seconds so far): fresh, or from the newest checkpoint
    (which also restores `generator`). Refuses to start over a run that has checkpoints."""
    latest = latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume, or choose another --out")
        if world.is_main:
            save_run_config(run_dir, model_cfg, cfg)
        params = init_params(model_cfg, seed=cfg.seed, device=device)
        return params, optimizer.init(params), 0, 0.0
    if latest is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {run_dir / CHECKPOINTS}")
    ckpt = load_checkpoint(latest, map_location=device)
    if ckpt.model_config != model_cfg:
        raise ValueError(f"{latest} holds a different model config: {ckpt.model_config}")
    generator.set_state(ckpt.rng.cpu())
    opt_state = unflatten(ckpt.opt_state, like=optimizer.init(ckpt.params))
    return ckpt.params, opt_state, ckpt.step, ckpt.extra.get("wall_s", 0.0)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINTS).glob("step_*.pt"))
    return found[-1] if found else None


def save_run_config(run_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}, indent=2)
    (run_dir / "config.json").write_text(text + "\n")


def load_run_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    values = json.loads((Path(run_dir) / "config.json").read_text())
    return ModelConfig.from_dict(values["model"]), TrainConfig.from_dict(values["train"])


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


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Train and validation loss against steps and against wall-clock time, as a PNG.

    matplotlib is an optional extra (`uv sync --extra plot`): without it the plot is skipped
    with a message.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve skipped: matplotlib is not installed (uv sync --extra plot)", file=sys.stderr)
        return None
    records = read_log(log_path) if Path(log_path).exists() else []
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
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path
