"""Learning-rate schedules: pure functions of a step tensor, so a compiled step never recompiles
for a new learning rate. `schedule_value` is the float view for logs and adapters."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import hyperparameter

Schedule = Callable[[Tensor], Tensor]  # step (0-d, integer or float) -> learning rate (0-d float)


def warmup_cosine_schedule(
    max_lr: float | Tensor, min_lr: float | Tensor, warmup_steps: int | Tensor, cosine_steps: int | Tensor
) -> Schedule:
    """The handout's schedule (section 4.4), with t counted from 0:

        t < warmup_steps                  max_lr * t / warmup_steps
        warmup_steps <= t <= cosine_steps  min_lr + (1 + cos(pi (t - Tw) / (Tc - Tw))) / 2 * (max_lr - min_lr)
        t > cosine_steps                  min_lr

    Computed in float32, or float64 for a float64 step; no Python branch on the step. Any
    argument may be a 0-d tensor instead (a sweep's per-run value under vmap, fnlm.sweep); tensors
    are taken as given, so check their values as numbers first.
    """
    max_lr = hyperparameter("max_lr", max_lr, "> 0", lambda v: v > 0, tensor_ok=True)
    per_run = isinstance(max_lr, Tensor)  # a value that only vmap sees: no bound to check here
    min_lr = hyperparameter("min_lr", min_lr, ">= 0" if per_run else f"in [0, max_lr={max_lr}]",
                            lambda v: 0 <= v and (per_run or v <= max_lr), tensor_ok=True)
    warmup_steps = _steps("warmup_steps", warmup_steps, 0)
    cosine_steps = _steps("cosine_steps", cosine_steps, warmup_steps)

    def schedule(step: Tensor) -> Tensor:
        t = step.to(torch.promote_types(step.dtype, torch.float32))
        warmup = t * (max_lr / _at_least_one(warmup_steps))
        # Clamping the progress to [0, 1] makes the cosine branch min_lr after cosine_steps.
        progress = ((t - warmup_steps) / _at_least_one(cosine_steps - warmup_steps)).clamp(0.0, 1.0)
        cosine = min_lr + 0.5 * (max_lr - min_lr) * (1.0 + torch.cos(math.pi * progress))
        return torch.where(t < warmup_steps, warmup, cosine)

    return schedule


def schedule_value(schedule: Schedule, step: int) -> float:
    """The learning rate at `step` as a Python float, computed in float64."""
    return float(schedule(torch.tensor(step, dtype=torch.float64)))


def _steps(name: str, value: object, minimum: int | Tensor) -> int | Tensor:
    if isinstance(value, Tensor):  # a per-run value under vmap: checked by the caller
        if value.ndim != 0:
            raise TypeError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not isinstance(minimum, Tensor) and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _at_least_one(steps: int | Tensor) -> int | Tensor:
    return steps.clamp_min(1) if isinstance(steps, Tensor) else max(steps, 1)
