"""A run's state between steps, started fresh or resumed from its checkpoints.

One type for a single run and for a sweep: a sweep's trees are stacked (every leaf (K, ...)),
its samplers are one generator shared by every run or one per run, and `diverged_at` is the
one record of which runs stopped where. A single run is K = 1 with plain trees.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint
from ..config import ModelConfig, TrainConfig
from ..model import init_params
from ..optim import OptState
from ..train import make_optimizer
from ..tree import PyTree, unflatten
from .folder import CHECKPOINTS, latest_checkpoint

NOT_DIVERGED = -1
# What may differ between a run and its checkpoint's train config on resume: how the run
# proceeds (freely), its learning-rate schedule (decay_steps: cosine_steps or else steps) only
# when the caller accepts it; anything else would change what the run computes.
RUNTIME_FIELDS = frozenset(
    {"device", "compile", "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"}
)
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "decay_steps", "schedule", "decay_fraction", "muon_lr")
DATA_FIELDS = ("train_data", "val_data")


class Run(NamedTuple):
    name: str  # "" for a single run; a sweep's run folder name
    config: TrainConfig  # what a single `fnlm train` of this run uses
    dir: Path


@dataclass
class RunState:
    """Everything a run continues from. Shape legend: K runs (1 for a single run)."""

    params: PyTree  # a sweep's stacked: every leaf (K, ...)
    opt_state: OptState  # likewise
    step: int  # steps completed by every run still training
    generators: list[torch.Generator]  # the batch samplers: one for all runs, or one per run
    wall_s: float  # training seconds spent before this process took over
    diverged_at: Tensor  # (K,) int64 on the device: the step whose loss or gradient norm was first not finite, else -1

    def generator(self, k: int) -> torch.Generator:
        return self.generators[0 if len(self.generators) == 1 else k]


class Start(NamedTuple):
    """Per-run pieces of a start, before the caller stacks (sweep) or unwraps (single run) them."""

    params: list[PyTree]
    opt_states: list[OptState]
    step: int
    wall_s: float
    diverged_at: list[int | None]
    rescheduled: list[dict[str, list]]  # per run: {field: [old, new]} of an accepted schedule change
    checkpoints: list[Path | None]


def fresh(model_cfg: ModelConfig, runs: Sequence[Run], device: torch.device) -> Start:
    """Initial parameters and optimizer states; refuses folders that already hold checkpoints."""
    for run in runs:
        if latest_checkpoint(run.dir) is not None:
            raise FileExistsError(f"{run.dir} already holds checkpoints: pass --resume, or choose another --out")
    params = [init_params(model_cfg, seed=run.config.seed, device=device) for run in runs]
    states = [make_optimizer(run.config).init(p) for run, p in zip(runs, params)]
    k = len(runs)
    return Start(params, states, 0, 0.0, [None] * k, [{}] * k, [None] * k)


def resume(model_cfg: ModelConfig, runs: Sequence[Run], generators: list[torch.Generator], device: torch.device,
           *, reschedule: bool) -> Start:
    """Every run's newest checkpoint (a diverged run's is its last finite state); restores the
    generators (a shared one from the first run still training). A run whose learning-rate
    schedule would change is refused unless `reschedule`."""
    params, states, steps, walls, diverged, rescheduled, checkpoints, rngs = [], [], [], [], [], [], [], []
    for run in runs:
        latest = latest_checkpoint(run.dir)
        if latest is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {run.dir / CHECKPOINTS}")
        ckpt = load_checkpoint(latest, map_location=device)
        if ckpt.model_config != model_cfg:
            raise ValueError(f"{latest} holds a different model config: {ckpt.model_config}")
        if ckpt.rng is None or ckpt.opt_state is None:
            raise ValueError(f"{latest} holds no optimizer or sampler state: it cannot be resumed")
        rescheduled.append(schedule_change(ckpt.train_config, run, reschedule))
        params.append(ckpt.params)
        try:
            states.append(unflatten(ckpt.opt_state, like=make_optimizer(run.config).init(ckpt.params)))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{latest}: its optimizer state does not fit this run's optimizer: {error}") from None
        diverged.append(ckpt.extra.get("diverged_at"))
        steps.append(ckpt.step)
        walls.append(ckpt.extra.get("wall_s", 0.0))
        rngs.append(ckpt.rng)
        checkpoints.append(latest)
    training = [k for k, died in enumerate(diverged) if died is None]
    common = {steps[k] for k in training}
    if len(common) > 1:
        raise ValueError(f"cannot resume: the runs' newest checkpoints are at different steps {sorted(common)}")
    step = common.pop() if common else max(died - 1 for died in diverged)
    first = training[0] if training else 0
    for k, generator in enumerate(generators):
        generator.set_state(rngs[first if len(generators) == 1 else k].cpu())
    return Start(params, states, step, walls[first], diverged, rescheduled, checkpoints)


def schedule_change(saved: dict | None, run: Run, reschedule: bool) -> dict[str, list]:
    """What resuming `run` changes against its checkpoint's train config `saved`: {field: [old,
    new]} of its learning-rate schedule, accepted only with `reschedule`. Runtime settings may
    change freely; any other setting (what the run computes) is refused, as is a schedule change
    without `reschedule`, with a ValueError saying how to continue."""
    if saved is None:  # an imported model: any schedule from step 0
        return {}
    old, new = TrainConfig.from_dict(saved), run.config
    where = f"{run.dir}: " if run.name else ""
    fixed = [field.name for field in dataclasses.fields(TrainConfig)
             if field.name not in RUNTIME_FIELDS.union(SCHEDULE_FIELDS, {"cosine_steps"})
             and not (field.name in DATA_FIELDS and not getattr(old, field.name))]  # data for an import
    changed = {name: [getattr(old, name), getattr(new, name)] for name in fixed
               if _setting(old, name) != _setting(new, name)}
    if changed:
        raise ValueError(f"{where}resuming would change what the run computes ({_described(changed)}); "
                         f"only {', '.join(sorted(RUNTIME_FIELDS))} may change, and the schedule with --reschedule")
    changes = {name: [getattr(old, name), getattr(new, name)] for name in SCHEDULE_FIELDS
               if getattr(old, name) != getattr(new, name)}
    if not changes or reschedule:
        return changes
    if list(changes) == ["decay_steps"] and old.cosine_steps is None and new.cosine_steps is None:
        raise ValueError(
            f"{where}resuming with steps={new.steps} would stretch the cosine schedule from {old.decay_steps} "
            f"to {new.decay_steps} steps (cosine_steps defaults to steps), so the learning rate would jump: "
            f"pass --cosine-steps {old.decay_steps} to keep the schedule, or --reschedule to accept the new one"
        )
    raise ValueError(f"{where}resuming would change the learning-rate schedule ({_described(changes)}): "
                     "pass --reschedule to accept the change")


def _setting(cfg: TrainConfig, name: str) -> object:
    """A setting as it acts: a data path as the absolute path it names."""
    value = getattr(cfg, name)
    return os.path.abspath(value) if name in DATA_FIELDS and value else value


def _described(changes: dict[str, list]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
