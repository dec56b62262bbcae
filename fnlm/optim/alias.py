"""Optimizers assembled from transformations."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..tree import PyTree, foreach, global_norm, leaves_like, tree_flatten, tree_unflatten
from . import adamw_kernel
from .base import GradientTransformation, OptState, chain, hyperparameter
from .schedules import Schedule
from .transforms import (
    ClipByGlobalNormState,
    ScaleByAdamState,
    ScaleByScheduleState,
    adam_directions,
    add_decayed_weights,
    bias_correction,
    clip_by_global_norm,
    clip_factor,
    decay_leaves,
    scale_by_adam,
    scale_by_learning_rate,
)


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    max_grad_norm: float | None = None,
    fused: bool = True,
) -> GradientTransformation:
    """AdamW (Loshchilov and Hutter, algorithm 2) as a chain, optionally after global-norm clipping:

        g <- g * min(1, max_grad_norm / (|g| + 1e-6))                   (if max_grad_norm)
        p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)

    which is PyTorch's AdamW step. The decay uses the parameters before the step, and is
    scaled by the (scheduled) learning rate, as in torch and optax.

    fused (without a mask): the chain's init and state, and an update that runs the chain's
    arithmetic on the trees' leaves flattened once, the same foreach ops in the same order
    (equal to the chain's update bit for bit in eager mode), or on CUDA one Triton kernel over
    all leaves (adamw_kernel, equal to rounding), which as the fused_step also adds the step to
    the parameters (apply_step). A chain flattens and rebuilds every tree at each of its
    transforms; under torch.compile that pytree work was most of the step's graph-capture time.
    """
    transforms = [
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    ]
    if max_grad_norm is not None:
        transforms.insert(0, clip_by_global_norm(max_grad_norm))
    chained = chain(*transforms)
    if not fused or mask is not None:
        return chained
    run = _fused(learning_rate, b1, b2, eps, weight_decay, max_grad_norm)
    return GradientTransformation(chained.init, functools.partial(run, apply=False), functools.partial(run, apply=True))


def _fused(learning_rate, b1, b2, eps, weight_decay, max_grad_norm) -> Callable:
    """run(updates, state, params, apply): the update of adamw's chain (clip?, scale_by_adam,
    add_decayed_weights, scale_by_learning_rate) on leaf lists, or with apply the new parameters
    (apply_step's); the arguments were validated by the chain's transforms."""

    def number(name: str, value):  # as the transforms hold it: a float (or a sweep's 0-d tensor)
        return value if value is None or callable(value) else hyperparameter(name, value, "", lambda v: True, tensor_ok=True)

    b1, b2, eps, weight_decay, max_grad_norm, learning_rate = (
        number(name, value) for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("weight_decay", weight_decay),
                                                ("max_grad_norm", max_grad_norm), ("learning_rate", learning_rate))
    )
    size = 3 if max_grad_norm is None else 4

    def run(updates: PyTree, state: tuple[OptState, ...], params: PyTree | None, apply: bool):
        if params is None:
            raise ValueError("adamw needs params (for the weight decay): call update(updates, state, params)")
        if len(state) != size:
            raise ValueError(f"chain of {size} transformations got a state of {len(state)}")
        *clip_state, adam, decay_state, lr_state = state
        grads, structure = tree_flatten(updates)
        clip_scale = None
        if max_grad_norm is not None:
            norm = global_norm(grads)
            clip_scale = clip_factor(norm, max_grad_norm)
            clip_state = [ClipByGlobalNormState(norm.float())]
        count = adam.count + 1
        mu, nu = leaves_like(structure, adam.mu), leaves_like(structure, adam.nu)
        param_leaves = leaves_like(structure, params)
        if callable(learning_rate):
            neg_lr = -learning_rate(lr_state.count)
            lr_state = ScaleByScheduleState(lr_state.count + 1)
        else:
            neg_lr = -learning_rate
        if isinstance(weight_decay, float) and adamw_kernel.supports(*grads, *mu, *nu, *param_leaves):
            correction1, correction2 = (bias_correction(b, count, torch.float32) for b in (b1, b2))
            one = torch.ones((), device=count.device)
            coefficients = torch.stack([one if clip_scale is None else clip_scale.float(), correction1,
                                        correction2.rsqrt(), one * neg_lr])
            out, mu, nu = adamw_kernel.adamw_leaves(param_leaves, grads, mu, nu, coefficients, b1, b2, eps,
                                                    weight_decay, apply)
        else:
            if clip_scale is not None:
                grads = foreach("mul", grads, clip_scale)
            # The chain's arithmetic, on the directions in place (they are this step's own): in
            # eager mode each new leaf is an allocation, as long as a pass over it on the CPU.
            out, mu, nu = adam_directions(grads, mu, nu, count, b1, b2, eps)
            if not (isinstance(weight_decay, float) and weight_decay == 0):
                decay_leaves(out, param_leaves, weight_decay, in_place=True)
            foreach("mul_", out, neg_lr)
            if apply:
                foreach("add_", out, param_leaves)
        adam = ScaleByAdamState(count, tree_unflatten(structure, mu), tree_unflatten(structure, nu))
        return tree_unflatten(structure, out), (*clip_state, adam, decay_state, lr_state)

    return run
