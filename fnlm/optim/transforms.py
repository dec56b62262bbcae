"""Gradient transformations: clipping, Adam's moments, decoupled weight decay, the learning rate.

Each works on a tree's leaves as one list with torch._foreach_* ops (one multi-tensor kernel per
operation in eager mode, instead of one kernel per leaf; inductor fuses either under compile;
fnlm.tree.foreach runs them leaf by leaf under vmap). The learning rate, weight decay and
clipping norm may be 0-d tensors, such as a sweep's per-run values (fnlm.sweep).
Temporaries created here may be updated in place; arguments never are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, foreach, global_norm, leaves_like, num_leaves, tree_flatten, tree_unflatten, zeros_like
from .base import EmptyState, GradientTransformation, hyperparameter, map_leaves, zero_count
from .schedules import Schedule

CLIP_EPS = 1e-6  # the handout's (and torch's) epsilon in max_norm / (norm + eps)


class ClipByGlobalNormState(NamedTuple):
    grad_norm: Tensor  # 0-d float32: the global norm of the last update's gradients, before clipping


def clip_factor(norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """max_norm / (norm + 1e-6) where norm > max_norm, else 1: a tensor select, not a Python branch."""
    return torch.where(norm > max_norm, max_norm / (norm + CLIP_EPS), torch.ones_like(norm))


def clip_by_global_norm(max_norm: float | Tensor) -> GradientTransformation:
    """Scale all updates together so that their global L2 norm is at most `max_norm`.

    The pre-clip norm stays in the state, so a training step can log it without a second pass.
    """
    max_norm = hyperparameter("max_norm", max_norm, "> 0", lambda v: v > 0, tensor_ok=True)

    def init(params: PyTree) -> ClipByGlobalNormState:
        return ClipByGlobalNormState(torch.zeros((), device=zero_count(params).device))

    def update(updates: PyTree, state: ClipByGlobalNormState, params: PyTree | None = None):
        norm = global_norm(updates)
        scale = clip_factor(norm, max_norm)
        clipped = map_leaves(lambda leaves: foreach("mul", leaves, scale), updates)
        return clipped, ClipByGlobalNormState(norm.float())

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: Tensor  # 0-d int32: the number of updates so far
    mu: PyTree  # first-moment estimate, shaped like params
    nu: PyTree  # second-moment estimate, shaped like params


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """g -> m_hat / (sqrt(v_hat) + eps): Adam's bias-corrected direction, before the learning rate.

    The moments follow PyTorch's AdamW arithmetic (m.lerp(g, 1 - b1), v * b2 + (1 - b2) g^2),
    so float64 runs agree with it to rounding.
    """
    b1 = hyperparameter("b1", b1, "in [0, 1)", lambda v: 0 <= v < 1)
    b2 = hyperparameter("b2", b2, "in [0, 1)", lambda v: 0 <= v < 1)
    eps = hyperparameter("eps", eps, ">= 0", lambda v: v >= 0)

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(zero_count(params), zeros_like(params), zeros_like(params))

    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None):
        grads, structure = tree_flatten(updates)
        mu, nu = leaves_like(structure, state.mu), leaves_like(structure, state.nu)
        directions, mu, nu = adam_directions(grads, mu, nu, state.count + 1, b1, b2, eps)
        new_state = ScaleByAdamState(state.count + 1, tree_unflatten(structure, mu), tree_unflatten(structure, nu))
        return tree_unflatten(structure, directions), new_state

    return GradientTransformation(init, update)


def adam_directions(
    grads: list[Tensor], mu: list[Tensor], nu: list[Tensor], count: Tensor, b1: float, b2: float, eps: float
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(m_hat / (sqrt(v_hat) + eps), new mu, new nu) for lists of leaves; count is the new step (1 first)."""
    mu = foreach("lerp", mu, grads, 1 - b1)
    nu = foreach("mul", nu, b2)
    foreach("addcmul_", nu, grads, grads, value=1 - b2)
    dtype = functools.reduce(torch.promote_types, (m.dtype for m in mu), torch.float32)
    correction1, correction2 = (bias_correction(b, count, dtype) for b in (b1, b2))
    # (m / c1) / (sqrt(v / c2) + eps). Tensor scalars only multiply: dynamo turns a foreach
    # add of a tensor scalar into .item(), a graph break.
    denom = foreach("sqrt", nu)
    foreach("mul_", denom, correction2.rsqrt())
    foreach("add_", denom, eps)
    foreach("mul_", denom, correction1)
    return foreach("div", mu, denom), mu, nu


def bias_correction(decay: float, count: Tensor, dtype: torch.dtype) -> Tensor:
    """1 - decay^count as -expm1(count log decay): exact to rounding even in float32 at count 1."""
    log_decay = math.log(decay) if decay > 0 else -math.inf  # decay 0: no correction needed (1)
    return -torch.expm1(count.to(dtype) * log_decay)


def add_decayed_weights(
    weight_decay: float | Tensor, mask: PyTree | Callable[[PyTree], PyTree] | None = None
) -> GradientTransformation:
    """u -> u + weight_decay * params on the leaves where `mask` is True (every leaf by default).

    `mask` is a tree of bools shaped like params, or a function params -> such a tree.
    """
    weight_decay = hyperparameter("weight_decay", weight_decay, ">= 0", lambda v: v >= 0, tensor_ok=True)

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(updates, state, params)")
        if isinstance(weight_decay, float) and weight_decay == 0:
            return updates, state
        leaves, structure = tree_flatten(updates)
        param_leaves = leaves_like(structure, params)
        decays = [True] * len(leaves) if mask is None else _mask_leaves(structure, mask(params) if callable(mask) else mask)
        if len(decays) != len(leaves) or not all(isinstance(d, bool) for d in decays):
            raise ValueError(f"mask must be a tree of {len(leaves)} bools shaped like params")
        chosen = [i for i, decays_leaf in enumerate(decays) if decays_leaf]
        decayed = decay_leaves([leaves[i] for i in chosen], [param_leaves[i] for i in chosen], weight_decay)
        for i, leaf in zip(chosen, decayed):
            leaves[i] = leaf
        return tree_unflatten(structure, leaves), state

    return GradientTransformation(lambda params: EmptyState(), update)


def decay_leaves(
    leaves: list[Tensor], params: list[Tensor], weight_decay: float | Tensor, *, in_place: bool = False
) -> list[Tensor]:
    """leaves + weight_decay * params, list by list; with in_place, written into `leaves`, which
    must be the caller's own."""
    add = "add_" if in_place else "add"
    if isinstance(weight_decay, Tensor):  # foreach alphas are Python numbers; tensor scalars multiply
        result = foreach(add, leaves, foreach("mul", params, weight_decay))
    else:
        result = foreach(add, leaves, params, alpha=weight_decay)
    return leaves if in_place else result


def _mask_leaves(structure, mask: PyTree) -> list:
    try:
        return leaves_like(structure, mask)
    except ValueError as error:
        raise ValueError(f"mask must be a tree of {num_leaves(structure)} bools shaped like params: {error}") from None


class ScaleByScheduleState(NamedTuple):
    count: Tensor  # 0-d int32: the schedule's step, the number of updates so far


def scale_by_learning_rate(learning_rate: float | Tensor | Schedule) -> GradientTransformation:
    """u -> -lr * u (a descent step). `learning_rate` is a float (or 0-d tensor) or a schedule of the step count."""
    if not callable(learning_rate):
        lr = hyperparameter("learning_rate", learning_rate, ">= 0", lambda v: v >= 0, tensor_ok=True)

        def scale(updates: PyTree, state: EmptyState, params: PyTree | None = None):
            return map_leaves(lambda leaves: foreach("mul", leaves, -lr), updates), state

        return GradientTransformation(lambda params: EmptyState(), scale)

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(zero_count(params))

    def update(updates: PyTree, state: ScaleByScheduleState, params: PyTree | None = None):
        neg_lr = -learning_rate(state.count)
        return map_leaves(lambda leaves: foreach("mul", leaves, neg_lr), updates), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)
