"""The training step as a pure function, the optimizer a TrainConfig describes, and evaluation.

    optimizer = make_optimizer(train_cfg)         # clipping, AdamW and the schedule, one chain
    step = make_train_step(cfg, optimizer, schedule=make_schedule(train_cfg), compile=True)
    params, opt_state, metrics = step(params, opt_state, x, y)   # metrics.loss, .grad_norm, .lr

A step is torch.func.grad_and_value of the loss followed by the optimizer's pure update. Params
and optimizer state stay in their own dtype (float32): autocast, when asked, covers only the
forward pass, and the loss is float32. With compile=True the gradient and the update are two
torch.compile'd functions, as in a data-parallel step (docs/experiments.md weighs this against one
graph), except on CUDA an optimizer's fused step (AdamW's one kernel), which runs as it is; the
gradient transform is never applied to a compiled function.
The run itself (data, logging, checkpoints) lives in fnlm.run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig, TrainConfig
from .model import lm_loss
from .optim import (
    ClipByGlobalNormState,
    GradientTransformation,
    OptState,
    Schedule,
    ScaleByScheduleState,
    adamw,
    apply_step,
    find_state,
    muon_adamw,
    warmup_cosine_schedule,
    warmup_stable_decay_schedule,
)
from .tree import PyTree, global_norm, tree_leaves

LossFn = Callable[[PyTree, Tensor, Tensor], Tensor]  # (params, x (B, T), y (B, T)) -> 0-d float32
GradSync = Callable[[PyTree], PyTree]  # a tree of tensors -> its mean over workers (fnlm.distributed)


class StepMetrics(NamedTuple):
    loss: Tensor  # 0-d float32, the batch's mean loss before the update
    grad_norm: Tensor  # 0-d float32, the global gradient norm before clipping
    lr: Tensor  # 0-d float32, the learning rate this step used (NaN when the step has no schedule)


class EvalResult(NamedTuple):
    loss: float  # mean per-token loss
    perplexity: float
    tokens: int


def make_loss_fn(cfg: ModelConfig, *, autocast_dtype: torch.dtype | None = None, device_type: str = "cpu") -> LossFn:
    """Mean next-token cross-entropy; with autocast_dtype, the forward runs under autocast."""

    def loss_fn(params: PyTree, x: Tensor, y: Tensor) -> Tensor:
        with autocast(device_type, autocast_dtype):
            return lm_loss(params, x, y, cfg)  # float32; the fused LM head never holds the (B, T, V) logits

    return loss_fn


SCHEDULE_HPARAMS = ("lr", "min_lr", "warmup_steps", "cosine_steps")
TENSOR_HPARAMS = SCHEDULE_HPARAMS + ("weight_decay", "max_grad_norm", "muon_lr")  # what a sweep may vary per run


def make_schedule(cfg: TrainConfig, **hparams: Tensor) -> Schedule:
    """The learning-rate schedule `cfg` describes (warm-up, then cosine or warmup-stable-decay
    from lr to min_lr); with optimizer "muon", the AdamW side's.

    hparams replace cfg's lr, min_lr, warmup_steps or cosine_steps with 0-d tensors: a sweep's
    per-run values, batched by vmap inside the step (fnlm.sweep); the other TENSOR_HPARAMS are
    accepted and left to make_optimizer.
    """
    values = _hparams(cfg, hparams, SCHEDULE_HPARAMS)
    return _schedule(cfg, values["lr"], values["min_lr"], values["warmup_steps"], values["cosine_steps"])


def _schedule(cfg: TrainConfig, peak, floor, warmup_steps, end_steps) -> Schedule:
    if cfg.schedule == "wsd":
        return warmup_stable_decay_schedule(peak, floor, warmup_steps, end_steps, cfg.decay_fraction)
    return warmup_cosine_schedule(peak, floor, warmup_steps, end_steps)


def make_optimizer(cfg: TrainConfig, **hparams: Tensor) -> GradientTransformation:
    """The one optimizer of a run: global-norm clipping, AdamW and make_schedule's learning rate
    as one chain; with optimizer "muon", Muon at muon_lr (the same schedule shape, min_lr scaled
    alike) for the hidden matrices beside that AdamW (fnlm.optim.muon_adamw). hparams replace
    any of TENSOR_HPARAMS with 0-d tensors (see make_schedule)."""
    values = _hparams(cfg, hparams, TENSOR_HPARAMS)
    schedule = _schedule(cfg, values["lr"], values["min_lr"], values["warmup_steps"], values["cosine_steps"])
    if cfg.optimizer == "muon":
        muon_floor = values["min_lr"] * values["muon_lr"] / values["lr"]  # lr > 0: the schedule checked it
        muon_schedule = _schedule(cfg, values["muon_lr"], muon_floor, values["warmup_steps"], values["cosine_steps"])
        return muon_adamw(muon_schedule, schedule, momentum=cfg.muon_momentum, b1=cfg.beta1, b2=cfg.beta2,
                          eps=cfg.adam_eps, weight_decay=values["weight_decay"], max_grad_norm=values["max_grad_norm"])
    return adamw(schedule, cfg.beta1, cfg.beta2, cfg.adam_eps, values["weight_decay"],
                 max_grad_norm=values["max_grad_norm"])


def _hparams(cfg: TrainConfig, tensors: dict[str, Tensor], names: tuple[str, ...]) -> dict:
    """cfg's values of `names` (cosine_steps resolved), with `tensors` in place of some."""
    unknown = sorted(tensors.keys() - set(TENSOR_HPARAMS))
    if unknown:
        raise ValueError(f"{unknown} cannot be tensors; tensors may replace {list(TENSOR_HPARAMS)}")
    values = {name: cfg.decay_steps if name == "cosine_steps" else getattr(cfg, name) for name in names}
    return values | {name: value for name, value in tensors.items() if name in names}


def make_train_step(
    cfg: ModelConfig,
    optimizer: GradientTransformation,
    *,
    schedule: Schedule | None = None,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    compile: bool = False,
    compile_mode: str | None = None,
    grad_sync: GradSync | None = None,
) -> Callable[[PyTree, OptState, Tensor, Tensor], tuple[PyTree, OptState, StepMetrics]]:
    """step(params, opt_state, x, y) -> (params, opt_state, StepMetrics), pure.

    schedule, the learning-rate schedule inside `optimizer`, lets the step report the rate it
    used (StepMetrics.lr), read at the optimizer state's own step count. grad_sync, if given,
    maps (grads, loss) to their mean over data-parallel workers between the gradient and the
    update: the collective runs eagerly between the two compiled halves.
    """
    value_and_grad = torch.func.grad_and_value(make_loss_fn(cfg, autocast_dtype=autocast_dtype, device_type=device_type))

    def update(params: PyTree, opt_state: OptState, grads: PyTree, loss: Tensor):
        lr = learning_rate(opt_state, loss.device)
        params, opt_state = apply_step(optimizer, grads, opt_state, params)
        clip = find_state(opt_state, ClipByGlobalNormState)  # the clip already measured the norm
        grad_norm = global_norm(grads).float() if clip is None else clip.grad_norm
        return params, opt_state, StepMetrics(loss, grad_norm, lr)

    def learning_rate(opt_state: OptState, device: torch.device) -> Tensor:
        counter = find_state(opt_state, ScaleByScheduleState)
        if schedule is None or counter is None:  # the state may hold no tensor at all (plain SGD)
            return torch.full((), math.nan, device=device)
        return schedule(counter.count).float()

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, mode=compile_mode) if compile else fn

    # On CUDA a fused step (AdamW's) is one kernel already: compiling around it bought nothing but
    # a third of the warm-up (docs/experiments.md). On the CPU it is the foreach chain, which
    # inductor still fuses into a faster step.
    kernel_step = optimizer.fused_step is not None and device_type == "cuda"
    gradient, apply = compiled(value_and_grad), update if kernel_step else compiled(update)
    sync = grad_sync or (lambda grads_and_loss: grads_and_loss)

    def step(params: PyTree, opt_state: OptState, x: Tensor, y: Tensor):
        grads, loss = sync(gradient(params, x, y))
        return apply(params, opt_state, grads, loss)

    return step


def evaluate(loss_fn: LossFn, params: PyTree, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """(2,) float32 [sum of per-token losses, number of tokens] over `batches`, on their device;
    (K, 2) for a loss vmapped over K stacked runs (a sweep), one row per run.

    Sums rather than a mean, so that the shards of a data-parallel evaluation add up; no host
    sync per batch. `eval_result` turns a row into a mean loss and a perplexity.
    """
    total, tokens = torch.zeros((), device=tree_leaves(params)[0].device), 0  # a shard may get no batch
    with torch.no_grad():
        for x, y in batches:
            total = total + loss_fn(params, x, y) * y.numel()
            tokens += y.numel()
    return torch.stack([total, torch.full_like(total, float(tokens))], -1)


def eval_result(sums: Tensor) -> EvalResult:
    total, tokens = sums.tolist()
    loss = total / tokens
    return EvalResult(loss, math.exp(min(loss, 700.0)), round(tokens))  # exp overflows past ~709


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for dtype, or a no-op context for None (full precision)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def parse_autocast(name: str) -> torch.dtype | None:
    """TrainConfig.autocast ("none" or "bfloat16") -> the autocast dtype, or None."""
    return None if name == "none" else getattr(torch, name)
