"""The run loop, one for a single run and a sweep: data, steps, validation, logs, checkpoints,
divergence and exact resumption, in run folders (fnlm.run.folder).

    result = train(model_cfg, train_cfg, "runs/ts")                  # fnlm.train's step
    result = train_sweep(model_cfg, base, [parse_axis("lr=1e-3,3e-3")], "runs/lr")  # fnlm.sweep's

A single run is the loop over one run with fnlm.train's step (data parallel under torchrun:
every process draws the same global batch and keeps its rows); a sweep is the loop over K runs
with fnlm.sweep's vmapped step. Resume is exact: parameters, optimizer state, samplers and the
step come back from the newest checkpoints, so N steps in one go equal N/2 + N/2 with a restart.
Non-finite losses are watched without a host sync per step (a device-side record, read at log
boundaries and before every save): a sweep freezes the run and goes on; a single run stops
with DivergedError, keeping its finite checkpoints and writing no other.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import distributed
from ..checkpoint import save_checkpoint
from ..config import ModelConfig, TrainConfig
from ..data import eval_batches, gather_windows, load_tokens, resolve_device, sample_starts
from ..progress import Progress
from ..sweep import make_sweep_step, run_of, stack
from ..train import eval_result, evaluate, make_loss_fn, make_optimizer, make_schedule, make_train_step, parse_autocast
from ..tree import PyTree, foreach, tree_leaves
from . import state as run_state
from .folder import LOG, RunLog, checkpoint_path, locked, plot_losses, plot_sweep, rotate_checkpoints, save_run_config
from .state import NOT_DIVERGED, Run, RunState
from .sweep import STREAMS, Axis, save_sweep_config, sweep_runs


class DivergedError(ValueError):
    """A single run's loss or gradient norm turned non-finite: it stopped, its finite checkpoints kept."""


class RunSummary(NamedTuple):
    step: int  # steps this run took (fewer than the sweep's when it diverged)
    train_loss: float | None  # the mean over its last log window
    val_loss: float | None
    checkpoint: Path | None
    diverged_at: int | None  # the step whose loss or gradient norm was not finite


class RunResult(NamedTuple):
    step: int
    interrupted: bool  # stopped early by should_stop (Ctrl-C, SIGTERM); a checkpoint holds the last step
    train_loss: float | None  # the mean over the last log window
    val_loss: float | None
    checkpoint: Path | None


class SweepResult(NamedTuple):
    step: int
    interrupted: bool
    runs: dict[str, RunSummary]

    def summary(self) -> dict[str, Any]:
        runs = {name: {key: str(value) if isinstance(value, Path) else value for key, value in run._asdict().items()}
                for name, run in self.runs.items()}
        return {"step": self.step, "interrupted": self.interrupted, "runs": runs}


def never() -> bool:
    return False


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
          reschedule: bool = False, show_progress: bool = True, should_stop: Callable[[], bool] = never) -> RunResult:
    """Train into `run_dir`, or continue its newest checkpoint when `resume` (`reschedule`
    accepts a changed learning-rate schedule). `should_stop` is asked before every step (at log
    boundaries when distributed); True ends the run early with a checkpoint of the last step."""
    cfg = with_absolute_paths(cfg)
    device = resolve_device(cfg.device)
    with distributed.joined(device.type) as world:
        if device.type == "cuda" and world.size > 1:
            device = torch.device("cuda", world.local_rank)
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world.size}")
        data = _Data(model_cfg, cfg)
        run = Run("", cfg, Path(run_dir))
        with locked([run.dir] if world.is_main else []):
            generators = [torch.Generator().manual_seed(cfg.seed)]
            start = _start(model_cfg, [run], generators, device, resume, reschedule, world.is_main)
            amp = parse_autocast(cfg.autocast)
            step = make_train_step(model_cfg, make_optimizer(cfg), schedule=make_schedule(cfg), autocast_dtype=amp,
                                   device_type=device.type, compile=cfg.compiles(device.type),
                                   grad_sync=distributed.all_reduce_mean if world.size > 1 else None)

            def run_step(params, opt_state, alive, x, y):
                params, opt_state, metrics = step(params, opt_state, x, y)
                took = torch.isfinite(metrics.loss) & torch.isfinite(metrics.grad_norm)
                return params, opt_state, torch.stack(metrics).unsqueeze(0), took.reshape(1)

            state = RunState(start.params[0], start.opt_states[0], start.step, generators, start.wall_s,
                             _diverged_tensor(start.diverged_at, device))
            loop = _Loop(model_cfg, cfg, [run], state, data, device, world, run_step,
                         _compiled(make_loss_fn(model_cfg, autocast_dtype=amp, device_type=device.type), cfg, device),
                         lambda tree, k: tree, start.checkpoints, sweep_dir=None)
            interrupted = loop.fit(show_progress, should_stop)
    summary = loop.summaries()[0]
    if summary.diverged_at is not None:
        kept = f"the newest checkpoint is {summary.checkpoint}" if summary.checkpoint else "no checkpoint was saved"
        raise DivergedError(
            f"training diverged: the loss or gradient norm was not finite at step {summary.diverged_at} "
            f"(lr {cfg.lr}: too high?); stopped, and {kept} (every saved checkpoint is finite)")
    return RunResult(state.step, interrupted, summary.train_loss, summary.val_loss, summary.checkpoint)


def train_sweep(model_cfg: ModelConfig, base: TrainConfig, axes: Sequence[Axis], out_dir: str | Path, *,
                stream: str = "per-run", resume: bool = False, reschedule: bool = False, show_progress: bool = True,
                should_stop: Callable[[], bool] = never) -> SweepResult:
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
    base, out_dir = with_absolute_paths(base), Path(out_dir)
    sweep_list = sweep_runs(base, axes, out_dir)
    runs = [Run(run.name, run.config, run.dir) for run in sweep_list]
    device = resolve_device(base.device)
    data = _Data(model_cfg, base)
    with locked([out_dir] + [run.dir for run in runs]):
        seeds = [base.seed if stream == "same" else run.config.seed for run in runs]
        shared_batch = len(set(seeds)) == 1
        generators = [torch.Generator().manual_seed(seed) for seed in (seeds[:1] if shared_batch else seeds)]
        start = _start(model_cfg, runs, generators, device, resume, reschedule, True)
        save_sweep_config(out_dir, model_cfg, base, axes, stream, sweep_list)  # after the checks: what runs now
        swept = sorted({name for run in sweep_list for name in run.overrides} - {"seed"})
        hparams = {name: torch.tensor([float(getattr(run.config, "decay_steps" if name == "cosine_steps" else name))
                                       for run in runs], dtype=torch.float32, device=device) for name in swept}
        amp = parse_autocast(base.autocast)
        step = make_sweep_step(model_cfg, base, shared_batch=shared_batch, autocast_dtype=amp,
                               device_type=device.type, compile=base.compiles(device.type))

        def run_step(params, opt_state, alive, x, y):
            params, opt_state, metrics = step(params, opt_state, hparams, alive, x, y)
            return params, opt_state, torch.stack([metrics.loss, metrics.grad_norm, metrics.lr], 1), metrics.alive

        def run_tree(tree: PyTree, k: int) -> PyTree:  # for a checkpoint: on the CPU, not the whole stack
            return run_of(tree, k, device="cpu")

        state = RunState(stack(start.params), stack(start.opt_states), start.step, generators, start.wall_s,
                         _diverged_tensor(start.diverged_at, device))
        eval_loss = torch.func.vmap(make_loss_fn(model_cfg, autocast_dtype=amp, device_type=device.type),
                                    in_dims=(0, None, None))
        loop = _Loop(model_cfg, base, runs, state, data, device, distributed.World(0, 1, 0), run_step,
                     _compiled(eval_loss, base, device), run_tree, start.checkpoints, sweep_dir=out_dir)
        interrupted = loop.fit(show_progress, should_stop)
        plot_sweep([run.dir for run in runs], out_dir / "learning_curves.png")
    return SweepResult(state.step, interrupted, dict(zip((run.name for run in runs), loop.summaries())))


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with absolute data paths, so that a resume from another folder finds the same files."""
    return dataclasses.replace(cfg, train_data=cfg.train_data and os.path.abspath(cfg.train_data),
                               val_data=cfg.val_data and os.path.abspath(cfg.val_data))


class _Data:
    """The token arrays, every file checked (readable, long enough, ids in the vocabulary) before step 1."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
        if not cfg.train_data:
            raise ValueError("TrainConfig.train_data is required: a token file (.npy, or raw uint16 binary)")
        check = dict(vocab_size=model_cfg.vocab_size, dtype=cfg.data_dtype, context_length=model_cfg.context_length)
        self.train = load_tokens(cfg.train_data, **check)
        self.val = load_tokens(cfg.val_data, **check) if cfg.val_data else None


def _start(model_cfg, runs, generators, device, resume, reschedule, write) -> run_state.Start:
    start = (run_state.resume(model_cfg, runs, generators, device, reschedule=reschedule) if resume
             else run_state.fresh(model_cfg, runs, device))
    if write:  # config.json says what the run is now: steps, an accepted new schedule
        for run, changes, died in zip(runs, start.rescheduled, start.diverged_at):
            save_run_config(run.dir, model_cfg, run.config)
            if changes and died is None:
                RunLog(run.dir / LOG, keep_until=start.step).write(step=start.step, reschedule=changes)
    return start


def _diverged_tensor(diverged_at: list[int | None], device: torch.device) -> Tensor:
    return torch.tensor([NOT_DIVERGED if d is None else d for d in diverged_at], device=device)


def _compiled(fn: Callable, cfg: TrainConfig, device: torch.device) -> Callable:
    return torch.compile(fn) if cfg.compiles(device.type) else fn


class _Loop:
    """Steps K runs (K = 1: a single run) and keeps their logs, validation and checkpoints.

    step(params, opt_state, alive (K,), x, y) -> (params, opt_state, metrics (K, 3) [loss,
    grad norm, lr], took (K,) bool); eval_loss(params, x, y) -> 0-d or (K,); run_tree(tree, k)
    -> run k's tree, for its checkpoint.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, runs: list[Run], state: RunState, data: _Data,
                 device: torch.device, world: distributed.World, step: Callable, eval_loss: Callable,
                 run_tree: Callable[[PyTree, int], PyTree], checkpoints: list[Path | None], *,
                 sweep_dir: Path | None) -> None:
        self.model_cfg, self.cfg, self.runs, self.state, self.data = model_cfg, cfg, runs, state, data
        self.device, self.world, self.step_fn, self.eval_loss, self.run_tree = device, world, step, eval_loss, run_tree
        self.sweep_dir = sweep_dir
        self.died_at: list[int | None] = [None if d < 0 else d for d in state.diverged_at.tolist()]  # host copy
        # On resume, each log drops the records past its checkpoint (steps that will run again).
        self.logs = [RunLog(run.dir / LOG, keep_until=state.step if died is None else died, enabled=world.is_main)
                     for run, died in zip(runs, self.died_at)]
        self.checkpoints = list(checkpoints)
        self.saved_step = state.step if any(checkpoints) else None
        self.last_train: list[float | None] = [None] * len(runs)
        self.last_val: list[float | None] = [None] * len(runs)
        per_rank = cfg.batch_size // world.size
        self.rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)  # this process's share
        self.tokens_per_step = cfg.batch_size * model_cfg.context_length  # per run
        self.start = time.perf_counter()
        self._new_window()

    def fit(self, show_progress: bool, should_stop: Callable[[], bool]) -> bool:
        """Train to cfg.steps, or until every run diverged or should_stop; True if stopped."""
        cfg, world, k = self.cfg, self.world, len(self.runs)
        interrupted = False
        label = "train" if self.sweep_dir is None else f"sweep of {k}"
        self.progress = Progress(label, total=cfg.steps - self.state.step, unit=" steps",
                                 enabled=show_progress and world.is_main)
        with self.progress:
            while self.state.step < cfg.steps and None in self.died_at:
                stop = should_stop()
                if world.size > 1:  # agree at log boundaries only, to spare a sync per step
                    stop = self.state.step % cfg.log_every == 0 and distributed.any_rank(stop, self.device)
                if stop:
                    interrupted = True
                    if self.window_steps:
                        self._log_window()
                    break
                self._train_one_step()
                step = self.state.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log_window()
                paused = time.perf_counter()
                if self.data.val is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    self._validate()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save()
                self.window_start += time.perf_counter() - paused  # validation and saves are not training time
        self._record_divergences()
        if self.saved_step != self.state.step:
            self._save()
        if world.is_main:
            for run in self.runs:
                plot_losses(run.dir)
        return interrupted

    def summaries(self) -> list[RunSummary]:
        return [RunSummary(self.state.step if died is None else died - 1, train, val, checkpoint, died)
                for died, train, val, checkpoint in zip(self.died_at, self.last_train, self.last_val, self.checkpoints)]

    def _train_one_step(self) -> None:
        state, context, batch = self.state, self.model_cfg.context_length, self.cfg.batch_size
        starts = torch.cat([sample_starts(len(self.data.train), batch, context, generator=g)[self.rows]
                            for g in state.generators])
        x, y = gather_windows(self.data.train, starts, context, self.device)  # (G b, T): G samplers, b rows each
        if len(state.generators) > 1:
            x, y = x.unflatten(0, (len(state.generators), -1)), y.unflatten(0, (len(state.generators), -1))
        alive = state.diverged_at < 0
        state.params, state.opt_state, metrics, took = self.step_fn(state.params, state.opt_state, alive, x, y)
        state.step += 1
        state.diverged_at = torch.where(alive & ~took, state.step, state.diverged_at)  # no host sync per step
        self.window_sums = self.window_sums + torch.where(took.unsqueeze(1), metrics[:, :2], 0.0)
        self.window_counts = self.window_counts + took
        self.window_lr = torch.where(took, metrics[:, 2], self.window_lr)
        self.window_steps += 1
        self.progress.update(1)

    def _new_window(self) -> None:
        k = len(self.runs)
        self.window_sums = torch.zeros(k, 2, device=self.device)  # per run: sums of (loss, grad norm)
        self.window_counts = torch.zeros(k, dtype=torch.long, device=self.device)
        self.window_lr = torch.zeros(k, device=self.device)  # each run's latest rate, as its step reported it
        self.window_steps, self.window_start = 0, time.perf_counter()

    def _window_totals(self) -> tuple[list[list[float]], list[int], list[float]]:
        """Per run: the window's (loss, grad norm) sums, steps taken and latest rate, in one device read.
        The counts travel as float32 beside the sums: exact up to 2**24 steps a window."""
        rows = torch.cat([self.window_sums, self.window_counts.unsqueeze(1), self.window_lr.unsqueeze(1)], 1).tolist()
        return [row[:2] for row in rows], [int(row[2]) for row in rows], [row[3] for row in rows]

    def _record_divergences(self) -> None:
        """Log (and, in a sweep, checkpoint at their frozen last finite state) the runs that
        diverged since the last look: their finite steps' partial window and a "diverged" record."""
        died = self.state.diverged_at.tolist()
        new = [k for k, step in enumerate(died) if step >= 0 and self.died_at[k] is None]
        if not new:
            return
        sums, counts, lrs = self._window_totals()
        seconds = time.perf_counter() - self.window_start
        for k in new:
            step = died[k]
            if counts[k]:
                self._write_train_record(k, step - 1, sums[k], counts[k], lrs[k], seconds)
            then = ("parameters and optimizer state frozen at step {}; the other runs go on" if self.sweep_dir
                    else "the run stops; nothing after step {} is saved").format(step - 1)
            self.logs[k].write(step=step, tokens=step * self.tokens_per_step, wall_s=self._wall(), diverged=True,
                               message=f"non-finite loss or gradient norm at step {step}: {then}")
            self.died_at[k] = step
            if self.sweep_dir is not None:  # the sweep step kept the run's last finite state
                self._save_run(k, step - 1, extra={"diverged_at": step})
        self.window_sums[new] = 0.0
        self.window_counts[new] = 0

    def _log_window(self) -> None:
        self._record_divergences()
        sums, counts, lrs = self._window_totals()
        seconds = time.perf_counter() - self.window_start
        for k, died in enumerate(self.died_at):
            if died is None and counts[k]:
                self._write_train_record(k, self.state.step, sums[k], counts[k], lrs[k], seconds)
        if self.sweep_dir is None:
            if self.last_train[0] is not None:
                self.progress.update(0, loss=f"{self.last_train[0]:.4f}", lr=f"{lrs[0]:.2e}")
        else:
            alive = [loss for loss, died in zip(self.last_train, self.died_at) if died is None and loss is not None]
            self.progress.update(0, best=f"{min(alive):.4f}" if alive else "-", alive=f"{len(alive)}/{len(self.runs)}")
        self._new_window()

    def _write_train_record(self, k: int, step: int, sums: list[float], count: int, lr: float, seconds: float) -> None:
        mean_loss, mean_norm = sums[0] / count, sums[1] / count
        record = dict(step=step, tokens=step * self.tokens_per_step, wall_s=self._wall(), lr=lr, train_loss=mean_loss,
                      grad_norm=mean_norm, tokens_per_s=count * self.tokens_per_step / seconds)
        if self.sweep_dir is not None:
            record["sweep_tokens_per_s"] = self.window_steps * len(self.runs) * self.tokens_per_step / seconds
        self.logs[k].write(**record)
        self.last_train[k] = mean_loss

    def _validate(self) -> None:
        self._record_divergences()
        world, step = self.world, self.state.step
        batches = eval_batches(self.data.val, self.cfg.batch_size // world.size, self.model_cfg.context_length,
                               self.device, max_batches=self.cfg.eval_batches, shard=(world.rank, world.size))
        sums = evaluate(self.eval_loss, self.state.params, batches).reshape(-1, 2)  # (K, 2)
        if world.size > 1:
            sums = distributed.sum_over_ranks(sums)
        for k, run_sums in enumerate(sums.cpu()):
            if self.died_at[k] is None:
                result = eval_result(run_sums)
                self.logs[k].write(step=step, tokens=step * self.tokens_per_step, wall_s=self._wall(),
                                   val_loss=result.loss, val_perplexity=result.perplexity)
                self.last_val[k] = result.loss

    def _save(self) -> None:
        """Checkpoint every run still training, after checking that its state is finite."""
        self._record_divergences()
        if self.sweep_dir is None and None in self.died_at and not _all_finite(self.state.params):
            # The last update overflowed the parameters (their loss comes only with the next step).
            self.state.diverged_at.fill_(self.state.step + 1)
            self._record_divergences()
        self.saved_step = self.state.step
        for k, died in enumerate(self.died_at):
            if died is None:
                self._save_run(k, self.state.step)

    def _save_run(self, k: int, step: int, extra: dict[str, Any] | None = None) -> None:
        if not self.world.is_main:
            return
        run, state = self.runs[k], self.state
        path = checkpoint_path(run.dir, step)
        sweep = {} if self.sweep_dir is None else {"sweep": str(self.sweep_dir)}
        save_checkpoint(path, model_config=self.model_cfg, params=self.run_tree(state.params, k), step=step,
                        opt_state=self.run_tree(state.opt_state, k), rng=state.generator(k).get_state(),
                        train_config=run.config.to_dict(), extra={"wall_s": self._wall()} | sweep | (extra or {}))
        rotate_checkpoints(run.dir, self.cfg.keep_checkpoints)
        self.checkpoints[k] = path

    def _wall(self) -> float:
        return self.state.wall_s + time.perf_counter() - self.start


def _all_finite(tree: PyTree) -> bool:
    """Whether every value of the tree is finite, in one sync (the largest |value| of each leaf)."""
    return bool(torch.isfinite(torch.stack(foreach("norm", tree_leaves(tree), float("inf")))).all())
