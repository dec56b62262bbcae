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


def warmup_stable_decay_schedule(
    max_lr: float | Tensor, min_lr: float | Tensor, warmup_steps: int | Tensor, total_steps: int | Tensor,
    decay_fraction: float | Tensor = 0.2,
) -> Schedule:
    """Warm-up, a long constant stretch, then a linear cool-down over the last decay_fraction of
    total_steps (WSD: Hu et al., MiniCPM 2024; modded-nanogpt's and the CS336 leaderboard's shape):

        t < warmup_steps                  max_lr * t / warmup_steps
        warmup_steps <= t < decay_start   max_lr                     decay_start = total - fraction * total
        decay_start <= t <= total_steps   linear from max_lr to min_lr
        t > total_steps                   min_lr

    The decay starts no earlier than the warm-up ends. Tensors are taken as given, as in
    warmup_cosine_schedule; no Python branch on the step.
    """
    max_lr = hyperparameter("max_lr", max_lr, "> 0", lambda v: v > 0, tensor_ok=True)
    per_run = isinstance(max_lr, Tensor)
    min_lr = hyperparameter("min_lr", min_lr, ">= 0" if per_run else f"in [0, max_lr={max_lr}]",
                            lambda v: 0 <= v and (per_run or v <= max_lr), tensor_ok=True)
    decay_fraction = hyperparameter("decay_fraction", decay_fraction, "in [0, 1]", lambda v: 0 <= v <= 1,
                                    tensor_ok=True)
    warmup_steps = _steps("warmup_steps", warmup_steps, 0)
    total_steps = _steps("total_steps", total_steps, warmup_steps)

    def schedule(step: Tensor) -> Tensor:
        t = step.to(torch.promote_types(step.dtype, torch.float32))
        warmup = t * (max_lr / _at_least_one(warmup_steps))
        zero = torch.zeros((), dtype=t.dtype, device=t.device)  # numbers or (per-run) tensors alike
        decay_start = torch.maximum(zero + (total_steps - total_steps * decay_fraction), zero + warmup_steps)
        # progress through the cool-down, clamped to [0, 1]: 0 on the plateau, 1 after total_steps
        progress = ((t - decay_start) / (total_steps - decay_start).clamp_min(1.0)).clamp(0.0, 1.0)
        stable_then_decay = max_lr + (min_lr - max_lr) * progress
        return torch.where(t < warmup_steps, warmup, stable_then_decay)

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
