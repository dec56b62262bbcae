"""Running a sweep: the grid of `fnlm train --sweep`, per-run logs and checkpoints, resumption.

    fnlm train --train-data T.npy --val-data V.npy --out runs/lr --sweep lr=1e-4,3e-4,1e-3 --sweep seed=0,1
    fnlm train --out runs/lr --resume                       # continue every run of the sweep

    runs/lr/sweep.json                  {"model", "train" (the base), "axes", "stream", "runs"}
    runs/lr/learning_curves.png         every run's train and validation loss
    runs/lr/lr=0.0001_seed=0/...        an ordinary run directory (config.json, log.jsonl,
                                        checkpoints/, loss_curve.png): `fnlm generate` and
                                        `fnlm train --resume` take it like any single run

The step itself is fnlm.sweep's; a diverged run's log says where it diverged.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import eval_batches, gather_windows, load_tokens, resolve_device, sample_starts
from .loop import CHECKPOINTS, RunLog, latest_checkpoint, plot_losses, read_log, save_run_config
from .model import init_params
from .progress import Progress
from .sweep import make_sweep_step, stack
from .train import eval_result, make_loss_fn, make_optimizer, parse_autocast
from .tree import tree_map, unflatten

# TrainConfig fields a sweep may vary. All but the seed are tensors inside the step; the seed
# chooses the initial parameters and, with the per-run stream, the batches.
AXES: dict[str, type] = {"lr": float, "min_lr": float, "warmup_steps": int, "cosine_steps": int,
                         "weight_decay": float, "max_grad_norm": float, "seed": int}
STREAMS = ("per-run", "same")
SWEEP_FILE = "sweep.json"
Axis = tuple[tuple[str, ...], list[tuple[Any, ...]]]  # (names, one value tuple per point)


# --- the grid ----------------------------------------------------------------------------------


def parse_axis(text: str) -> Axis:
    """"lr=1e-4,3e-4" -> (("lr",), [(1e-4,), (3e-4,)]). Joint values: "lr:min_lr=1e-3:1e-4,3e-3:3e-4"
    varies lr and min_lr together (two runs, not four)."""
    names_text, sep, values_text = text.partition("=")
    names = tuple(name.strip().replace("-", "_") for name in names_text.split(":"))
    if not sep or not all(names) or not values_text.strip():
        raise ValueError(f"--sweep {text!r}: expected NAME=V1,V2,... (or NAME1:NAME2=A1:B1,A2:B2)")
    for name in names:
        if name not in AXES:
            raise ValueError(f"--sweep {text!r}: cannot sweep {name!r}; sweepable: {', '.join(AXES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--sweep {text!r}: a name appears twice")
    points = []
    for point in values_text.split(","):
        parts = point.strip().split(":")
        if len(parts) != len(names):
            raise ValueError(f"--sweep {text!r}: {point!r} has {len(parts)} values for {len(names)} names")
        try:
            points.append(tuple(_number(AXES[name], part) for name, part in zip(names, parts)))
        except ValueError as error:
            raise ValueError(f"--sweep {text!r}: {error}") from None
    if len(set(points)) != len(points):
        raise ValueError(f"--sweep {text!r}: a value appears twice")
    return names, points


def grid(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """The product of the axes (the first varies slowest): one {name: value} dict per run."""
    seen = [name for names, _ in axes for name in names]
    twice = sorted({name for name in seen if seen.count(name) > 1})
    if twice:
        raise ValueError(f"--sweep: {twice} given in more than one axis")
    return [
        {name: value for (names, _), point in zip(axes, points) for name, value in zip(names, point)}
        for points in itertools.product(*(points for _, points in axes))
    ]


def run_name(overrides: dict[str, Any]) -> str:
    """{"lr": 0.0003, "seed": 1} -> "lr=0.0003_seed=1" (a directory name)."""
    return "_".join(f"{name}={value:g}" for name, value in overrides.items()) or "run"


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


# --- the run loop ------------------------------------------------------------------------------


class SweepRun(NamedTuple):
    name: str
    overrides: dict[str, Any]
    config: TrainConfig  # the base with the overrides: what a single `fnlm train` of this run would use
    dir: Path


class RunSummary(NamedTuple):
    step: int  # steps this run took (fewer than the sweep's when it diverged)
    train_loss: float | None  # the mean over its last log window
    val_loss: float | None
    checkpoint: Path | None
    diverged_at: int | None  # the step whose loss or gradient norm was not finite


class SweepResult(NamedTuple):
    step: int
    interrupted: bool
    runs: dict[str, RunSummary]

    def summary(self) -> dict[str, Any]:
        runs = {name: {key: str(value) if isinstance(value, Path) else value for key, value in run._asdict().items()}
                for name, run in self.runs.items()}
        return {"step": self.step, "interrupted": self.interrupted, "runs": runs}


def sweep_runs(base: TrainConfig, axes: Sequence[Axis], out_dir: str | Path) -> list[SweepRun]:
    """The grid's runs, each with its TrainConfig, checked by building its optimizer."""
    runs = []
    for overrides in grid(axes):
        name = run_name(overrides)
        try:
            config = dataclasses.replace(base, **overrides)
            make_optimizer(config)  # the ranges (min_lr <= lr, warm-up <= cosine steps, ...)
        except (ValueError, TypeError) as error:
            raise ValueError(f"sweep run {name}: {error}") from None
        runs.append(SweepRun(name, overrides, config, Path(out_dir) / name))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep runs share a directory name: {names}")
    return runs


def train_sweep(
    model_cfg: ModelConfig,
    base: TrainConfig,
    axes: Sequence[Axis],
    out_dir: str | Path,
    *,
    stream: str = "per-run",
    resume: bool = False,
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> SweepResult:
    """Train the grid of `axes` over `base` as one vmapped program into out_dir/<run name>/.

    stream "per-run": each run draws its batches from its own seed, as its single run would (runs
    that share a seed share one batch); "same": every run draws from base.seed's stream, so seeds
    vary only the initial parameters. `resume` continues every run from its newest checkpoint.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a sweep runs in one process on one device; launch it without torchrun")
    if stream not in STREAMS:
        raise ValueError(f"sweep stream must be one of {STREAMS}, got {stream!r}")
    if not axes:
        raise ValueError("a sweep needs at least one axis (--sweep NAME=V1,V2,...)")
    out_dir = Path(out_dir)
    runs = sweep_runs(base, axes, out_dir)
    if not resume:
        for run in runs:
            if latest_checkpoint(run.dir) is not None:
                raise FileExistsError(f"{run.dir} already holds checkpoints: pass --resume, or choose another --out")
        save_sweep_config(out_dir, model_cfg, base, axes, stream, runs)
    sweep = _Sweep(model_cfg, base, runs, out_dir, resolve_device(base.device), stream, resume)
    return sweep.fit(show_progress, should_stop)


class _Sweep:
    """The stacked state of K runs between steps, their samplers and the sums of the log window."""

    def __init__(self, model_cfg: ModelConfig, base: TrainConfig, runs: list[SweepRun], out_dir: Path,
                 device: torch.device, stream: str, resume: bool) -> None:
        if not base.train_data:
            raise ValueError("TrainConfig.train_data is required: a token file (.npy, or raw uint16 binary)")
        self.model_cfg, self.cfg, self.runs, self.out_dir, self.device = model_cfg, base, runs, out_dir, device
        self.train_tokens = load_tokens(base.train_data, vocab_size=model_cfg.vocab_size, dtype=base.data_dtype)
        self.val_tokens = (
            load_tokens(base.val_data, vocab_size=model_cfg.vocab_size, dtype=base.data_dtype) if base.val_data else None
        )
        swept = sorted({name for run in runs for name in run.overrides} - {"seed"})
        self.hparams = {
            name: torch.tensor([float(getattr(run.config, "decay_steps" if name == "cosine_steps" else name))
                                for run in runs], dtype=torch.float32, device=device)
            for name in swept
        }
        seeds = [base.seed if stream == "same" else run.config.seed for run in runs]
        self.shared_batch = len(set(seeds)) == 1
        self.generators = [torch.Generator().manual_seed(seed) for seed in (seeds[:1] if self.shared_batch else seeds)]
        self._start_or_resume(resume)

        amp = parse_autocast(base.autocast)
        self.sweep_step = make_sweep_step(
            model_cfg, base, shared_batch=self.shared_batch,
            autocast_dtype=amp, device_type=device.type, compile=base.compile,
        )
        eval_loss = torch.func.vmap(make_loss_fn(model_cfg, autocast_dtype=amp, device_type=device.type),
                                    in_dims=(0, None, None))
        self.eval_loss = torch.compile(eval_loss) if base.compile else eval_loss
        self.tokens_per_step = base.batch_size * model_cfg.context_length  # per run
        self.last_train: list[float | None] = [None] * len(runs)
        self.last_val: list[float | None] = [None] * len(runs)
        self.checkpoints: list[Path | None] = [latest_checkpoint(run.dir) if resume else None for run in runs]
        self.start = time.perf_counter()
        self._new_window()

    def _start_or_resume(self, resume: bool) -> None:
        """Stacked params and optimizer state, alive flags, the samplers' states and the step:
        fresh, or from every run's newest checkpoint (a diverged run's is its last good state)."""
        runs, device = self.runs, self.device
        optimizers = [make_optimizer(run.config) for run in runs]
        k = len(runs)
        self.died_at = [None] * k  # host copy: the step each run diverged at, once logged
        if not resume:
            params = [init_params(self.model_cfg, seed=run.config.seed, device=device) for run in runs]
            states = [optimizer.init(p) for optimizer, p in zip(optimizers, params)]
            self.step, self.wall_before = 0, 0.0
        else:
            params, states, steps, rngs, walls = [], [], [], [], []
            for run, optimizer in zip(runs, optimizers):
                latest = latest_checkpoint(run.dir)
                if latest is None:
                    raise FileNotFoundError(f"nothing to resume: no checkpoint in {run.dir / CHECKPOINTS}")
                ckpt = load_checkpoint(latest, map_location=device)
                if ckpt.model_config != self.model_cfg:
                    raise ValueError(f"{latest} holds a different model config: {ckpt.model_config}")
                params.append(ckpt.params)
                states.append(unflatten(ckpt.opt_state, like=optimizer.init(ckpt.params)))
                diverged = ckpt.extra.get("diverged_at")
                self.died_at[len(steps)] = diverged
                steps.append(None if diverged is not None else ckpt.step)
                rngs.append(ckpt.rng)
                walls.append(ckpt.extra.get("wall_s", 0.0))
            alive_steps = {s for s in steps if s is not None}
            if len(alive_steps) > 1:
                raise ValueError(f"cannot resume: the runs' newest checkpoints are at different steps {sorted(alive_steps)}")
            self.step = alive_steps.pop() if alive_steps else max(d - 1 for d in self.died_at)
            first = next((i for i, s in enumerate(steps) if s is not None), 0)
            for i, generator in enumerate(self.generators):
                generator.set_state(rngs[first if self.shared_batch else i].cpu())
            self.wall_before = walls[first]
        # On resume, each log drops the records past its checkpoint (steps that will run again).
        self.logs = [RunLog(run.dir / "log.jsonl", keep_until=self.step if died is None else died)
                     for run, died in zip(runs, self.died_at)]
        self.params, self.opt_state = stack(params), stack(states)
        self.alive = torch.tensor([d is None for d in self.died_at], device=device)
        self.died_tensor = torch.tensor([-1 if d is None else d for d in self.died_at], device=device)
        self.saved_step = self.step if resume else None

    def fit(self, show_progress: bool, should_stop: Callable[[], bool]) -> SweepResult:
        cfg = self.cfg
        interrupted = False
        self.progress = Progress(f"sweep of {len(self.runs)}", total=cfg.steps - self.step, unit=" steps",
                                 enabled=show_progress)
        with self.progress:
            while self.step < cfg.steps and not all(d is not None for d in self.died_at):
                if should_stop():
                    interrupted = True
                    if self.window_steps:
                        self._log_window()
                    break
                self._train_one_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log_window()
                paused = time.perf_counter()
                if self.val_tokens is not None and cfg.eval_every and (
                    self.step % cfg.eval_every == 0 or self.step == cfg.steps
                ):
                    self._validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._save()
                self.window_start += time.perf_counter() - paused
        self._record_divergences()
        if self.saved_step != self.step:
            self._save()
        for run in self.runs:
            plot_losses(run.dir / "log.jsonl", run.dir / "loss_curve.png")
        plot_sweep([run.dir for run in self.runs], self.out_dir / "learning_curves.png")
        summaries = {
            run.name: RunSummary(self.step if died is None else died - 1, train, val, checkpoint, died)
            for run, died, train, val, checkpoint in zip(
                self.runs, self.died_at, self.last_train, self.last_val, self.checkpoints)
        }
        return SweepResult(self.step, interrupted, summaries)

    def _train_one_step(self) -> None:
        context, batch = self.model_cfg.context_length, self.cfg.batch_size
        starts = torch.cat([sample_starts(len(self.train_tokens), batch, context, generator=g) for g in self.generators])
        x, y = gather_windows(self.train_tokens, starts, context, self.device)  # (K B, T), or (B, T) shared
        if not self.shared_batch:
            x, y = x.unflatten(0, (len(self.runs), batch)), y.unflatten(0, (len(self.runs), batch))
        self.params, self.opt_state, metrics = self.sweep_step(self.params, self.opt_state, self.hparams, self.alive, x, y)
        self.step += 1
        self.died_tensor = torch.where(self.alive & ~metrics.alive, self.step, self.died_tensor)
        self.alive = metrics.alive
        self.last_lr = metrics.lr
        took = metrics.alive.unsqueeze(1)
        self.window_sums = self.window_sums + torch.where(took, torch.stack([metrics.loss, metrics.grad_norm], 1), 0.0)
        self.window_counts = self.window_counts + metrics.alive  # no host sync per step
        self.window_steps += 1
        self.progress.update(1)

    def _new_window(self) -> None:
        k = len(self.runs)
        self.window_sums = torch.zeros(k, 2, device=self.device)  # per run: sums of (loss, grad norm)
        self.window_counts = torch.zeros(k, dtype=torch.long, device=self.device)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def _record_divergences(self) -> None:
        """Log and checkpoint the runs that diverged since the last look: the partial window of
        their finite steps, a "diverged" record, and their frozen (last finite) state."""
        died = self.died_tensor.tolist()
        new = [k for k, step in enumerate(died) if step >= 0 and self.died_at[k] is None]
        if not new:
            return
        sums, counts = self.window_sums.tolist(), self.window_counts.tolist()
        seconds = time.perf_counter() - self.window_start
        for k in new:
            step, log = died[k], self.logs[k]
            if counts[k]:
                self._write_train_record(k, step - 1, sums[k], counts[k], seconds)
            log.write(step=step, tokens=step * self.tokens_per_step, wall_s=self._wall(), diverged=True,
                      message=f"non-finite loss or gradient norm at step {step}: parameters and optimizer state "
                              f"frozen at step {step - 1}; the other runs go on")
            self.died_at[k] = step
            self._save_run(k, step - 1, extra={"diverged_at": step})
        self.window_sums[new] = 0.0
        self.window_counts[new] = 0

    def _log_window(self) -> None:
        self._record_divergences()
        sums, counts = self.window_sums.tolist(), self.window_counts.tolist()  # the window's one sync
        seconds = time.perf_counter() - self.window_start
        for k, died in enumerate(self.died_at):
            if died is None and counts[k]:
                self._write_train_record(k, self.step, sums[k], counts[k], seconds)
        alive = [self.last_train[k] for k, died in enumerate(self.died_at) if died is None and self.last_train[k] is not None]
        self.progress.update(0, best=f"{min(alive):.4f}" if alive else "-",
                             alive=f"{len(alive)}/{len(self.runs)}")
        self._new_window()

    def _write_train_record(self, k: int, step: int, sums: list[float], count: int, seconds: float) -> None:
        mean_loss, mean_norm = sums[0] / count, sums[1] / count
        self.logs[k].write(step=step, tokens=step * self.tokens_per_step, wall_s=self._wall(),
                           lr=self.last_lr[k].item(), train_loss=mean_loss, grad_norm=mean_norm,
                           tokens_per_s=count * self.tokens_per_step / seconds,
                           sweep_tokens_per_s=self.window_steps * len(self.runs) * self.tokens_per_step / seconds)
        self.last_train[k] = mean_loss

    def _validate(self) -> None:
        self._record_divergences()
        batches = eval_batches(self.val_tokens, self.cfg.batch_size, self.model_cfg.context_length, self.device,
                               max_batches=self.cfg.eval_batches)
        sums, tokens = torch.zeros(len(self.runs), device=self.device), 0
        with torch.no_grad():
            for x, y in batches:
                sums = sums + self.eval_loss(self.params, x, y) * y.numel()
                tokens += y.numel()
        for k, total in enumerate(sums.tolist()):
            if self.died_at[k] is None:
                result = eval_result(torch.tensor([total, float(tokens)]))
                self.logs[k].write(step=self.step, tokens=self.step * self.tokens_per_step, wall_s=self._wall(),
                                   val_loss=result.loss, val_perplexity=result.perplexity)
                self.last_val[k] = result.loss

    def _save(self) -> None:
        self._record_divergences()
        self.saved_step = self.step
        for k, died in enumerate(self.died_at):
            if died is None:
                self._save_run(k, self.step)

    def _save_run(self, k: int, step: int, extra: dict[str, Any] | None = None) -> None:
        run = self.runs[k]
        params, opt_state = (tree_map(lambda leaf: leaf[k].to("cpu", copy=True), tree)
                             for tree in (self.params, self.opt_state))
        folder = run.dir / CHECKPOINTS
        path = folder / f"step_{step:07d}.pt"
        generator = self.generators[0 if self.shared_batch else k]
        save_checkpoint(path, model_config=self.model_cfg, params=params, step=step, opt_state=opt_state,
                        rng=generator.get_state(), train_config=run.config.to_dict(),
                        extra={"wall_s": self._wall(), "sweep": str(self.out_dir)} | (extra or {}))
        for old in sorted(folder.glob("step_*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        self.checkpoints[k] = path

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start


# --- files -------------------------------------------------------------------------------------


def save_sweep_config(out_dir: Path, model_cfg: ModelConfig, base: TrainConfig, axes: Sequence[Axis], stream: str,
                      runs: list[SweepRun]) -> None:
    """out_dir/sweep.json, and every run's config.json as its single run would write it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {"model": model_cfg.to_dict(), "train": base.to_dict(), "stream": stream,
              "axes": [{"names": list(names), "values": [list(point) for point in points]} for names, points in axes],
              "runs": {run.name: run.overrides for run in runs}}
    (out_dir / SWEEP_FILE).write_text(json.dumps(values, indent=2) + "\n")
    for run in runs:
        save_run_config(run.dir, model_cfg, run.config)


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def load_sweep_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig, list[Axis], str]:
    values = json.loads((Path(out_dir) / SWEEP_FILE).read_text())
    axes = [(tuple(axis["names"]), [tuple(point) for point in axis["values"]]) for axis in values["axes"]]
    return ModelConfig.from_dict(values["model"]), TrainConfig.from_dict(values["train"]), axes, values["stream"]


def plot_sweep(run_dirs: Sequence[Path], png_path: Path) -> Path | None:
    """Every run's train loss (solid) and validation loss (dots) against steps, one colour per
    run; a diverged run ends in an x. Skipped without matplotlib, like fnlm.loop.plot_losses."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("learning curves skipped: matplotlib is not installed (uv sync --extra plot)", file=sys.stderr)
        return None
    figure, axis = plt.subplots(figsize=(9, 5))
    first_losses = []
    for index, run_dir in enumerate(run_dirs):
        records = read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").exists() else []
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

