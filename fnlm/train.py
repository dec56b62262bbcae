"""The training step as a pure function, and evaluation.

    optimizer = adamw(warmup_cosine_schedule(...), b1, b2, eps, weight_decay, max_grad_norm=1.0)
    step = make_train_step(cfg, optimizer, autocast_dtype=torch.bfloat16, compile=True)
    params, opt_state, metrics = step(params, opt_state, x, y)   # metrics.loss, metrics.grad_norm

A step is torch.func.grad_and_value of the loss followed by the optimizer's pure update. Params
and optimizer state stay in their own dtype (float32): autocast, when asked, covers only the
forward pass, and the loss is float32. With compile=True the whole step (gradient and update)
is one torch.compile'd function; the gradient transform is never applied to a compiled function.
The run itself (data, logging, checkpoints) lives in fnlm.loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig
from .model import transformer_lm
from .nn import cross_entropy
from .optim import ClipByGlobalNormState, GradientTransformation, OptState, apply_updates, find_state
from .tree import PyTree, global_norm, tree_leaves

LossFn = Callable[[PyTree, Tensor, Tensor], Tensor]  # (params, x (B, T), y (B, T)) -> 0-d float32
GradSync = Callable[[PyTree], PyTree]  # a tree of tensors -> its mean over workers (fnlm.distributed)


class StepMetrics(NamedTuple):
    loss: Tensor  # 0-d float32, the batch's mean loss before the update
    grad_norm: Tensor  # 0-d float32, the global gradient norm before clipping


class EvalResult(NamedTuple):
    loss: float  # mean per-token loss
    perplexity: float
    tokens: int


def make_loss_fn(cfg: ModelConfig, *, autocast_dtype: torch.dtype | None = None, device_type: str = "cpu") -> LossFn:
    """Mean next-token cross-entropy; with autocast_dtype, the forward runs under autocast."""

    def loss_fn(params: PyTree, x: Tensor, y: Tensor) -> Tensor:
        with autocast(device_type, autocast_dtype):
            logits = transformer_lm(params, x, cfg)  # (B, T, V)
        return cross_entropy(logits, y)  # float32 whatever the logits' dtype

    return loss_fn


def make_train_step(
    cfg: ModelConfig,
    optimizer: GradientTransformation,
    *,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    compile: bool = False,
    compile_mode: str | None = None,
    grad_sync: GradSync | None = None,
) -> Callable[[PyTree, OptState, Tensor, Tensor], tuple[PyTree, OptState, StepMetrics]]:
    """step(params, opt_state, x, y) -> (params, opt_state, StepMetrics), pure.

    grad_sync, if given, maps (grads, loss) to their mean over data-parallel workers between the
    gradient and the update; the collective runs eagerly between two compiled halves.
    """
    value_and_grad = torch.func.grad_and_value(make_loss_fn(cfg, autocast_dtype=autocast_dtype, device_type=device_type))

    def update(params: PyTree, opt_state: OptState, grads: PyTree, loss: Tensor):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        clip = find_state(opt_state, ClipByGlobalNormState)  # the clip already measured the norm
        grad_norm = global_norm(grads).float() if clip is None else clip.grad_norm
        return apply_updates(params, updates), opt_state, StepMetrics(loss, grad_norm)

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, mode=compile_mode) if compile else fn

    if grad_sync is None:

        def step(params: PyTree, opt_state: OptState, x: Tensor, y: Tensor):
            grads, loss = value_and_grad(params, x, y)
            return update(params, opt_state, grads, loss)

        return compiled(step)

    gradient, apply = compiled(value_and_grad), compiled(update)

    def synced_step(params: PyTree, opt_state: OptState, x: Tensor, y: Tensor):
        grads, loss = grad_sync(gradient(params, x, y))
        return apply(params, opt_state, grads, loss)

    return synced_step


def evaluate(loss_fn: LossFn, params: PyTree, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """(2,) float32 [sum of per-token losses, number of tokens] over `batches`, on their device.

    Sums rather than a mean, so that the shards of a data-parallel evaluation add up; no host
    sync per batch. `eval_result` turns them into a mean loss and a perplexity.
    """
    total, tokens = torch.zeros((), device=tree_leaves(params)[0].device), 0  # a shard may get no batch
    with torch.no_grad():
        for x, y in batches:
            total = total + loss_fn(params, x, y) * y.numel()
            tokens += y.numel()
    return torch.stack([total, torch.tensor(float(tokens), device=total.device)])


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


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    An eager CPU step allocates and frees tens of megabytes of temporaries (logits, gradients,
    new parameters); by default glibc serves big blocks with fresh mmaps and trims the heap, so
    every step page-faults the same memory in again: a quarter of a small model's step, measured
    on both fnlm's step and the nn.Module reference. Process-wide, so it is for entry points
    (`fnlm train` on CPU, benchmarks), not library code. Returns False where it does not apply.
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
