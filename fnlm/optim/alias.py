"""Optimizers assembled from transformations."""

from __future__ import annotations

from collections.abc import Callable

from ..tree import PyTree
from .base import GradientTransformation, chain
from .schedules import Schedule
from .transforms import add_decayed_weights, clip_by_global_norm, scale_by_adam, scale_by_learning_rate


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    max_grad_norm: float | None = None,
) -> GradientTransformation:
    """AdamW (Loshchilov and Hutter, algorithm 2) as a chain, optionally after global-norm clipping:

        g <- g * min(1, max_grad_norm / (|g| + 1e-6))                   (if max_grad_norm)
        p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)

    which is PyTorch's AdamW step. The decay uses the parameters before the step, and is
    scaled by the (scheduled) learning rate, as in torch and optax.
    """
    transforms = [
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    ]
    if max_grad_norm is not None:
        transforms.insert(0, clip_by_global_norm(max_grad_norm))
    return chain(*transforms)
