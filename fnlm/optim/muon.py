"""Muon: momentum, then Newton-Schulz orthogonalization of each matrix's update.

For a gradient matrix G = U S V^T (m x n), Muon steps along (approximately) U V^T: every
direction the momentum found gets the same step size, whatever its singular value. The
polar factor U V^T comes from a few iterations of an odd matrix polynomial (no SVD), which
keeps U and V exactly and maps each singular value s through the same scalar polynomial.

    optimizer = muon_adamw(muon_lr, adam_lr, weight_decay=0.1, max_grad_norm=1.0)
    # hidden matrices take Muon; embeddings, the LM head and the norm gains take AdamW

Shape legend: m rows (d_out), n columns (d_in) of a weight matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, flatten, foreach, leaves_like, tree_flatten, tree_map_with_path, tree_unflatten, zeros_like
from .base import GradientTransformation, chain, hyperparameter, partition, zero_count
from .schedules import Schedule
from .alias import adamw
from .transforms import add_decayed_weights, clip_by_global_norm, scale_by_learning_rate

# modded-nanogpt's quintic: a, b, c chosen so that p(s) = a s + b s^3 + c s^5 has the largest
# slope at 0 that still keeps five iterations inside [0.7, 1.2] for s in (0, 1]: a fast,
# deliberately inexact polar factor (singular values land near 1, not on 1).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # in X / (|X|_F + eps): a zero gradient gives a zero update, not NaN
RMS_MATCH = 0.2  # AdamW's typical update RMS (Moonshot's "Muon is scalable", section 2.2)


def newton_schulz(
    g: Tensor, steps: int = 5, *, dtype: torch.dtype | None = None,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """g (..., m, n) -> an approximate polar factor U V^T of each matrix of g, in g's dtype.

    X <- g / |g|_F (all singular values in (0, 1]), then `steps` times X <- a X + (b A + c A^2) X
    with A = X X^T. Iterated on the wide orientation (X X^T is min(m, n) square) in `dtype`;
    by default bfloat16 on CUDA (the iteration is self-correcting; its matmuls are the cost) and
    g's own dtype elsewhere, so a float64 input is a float64 computation. No branch on values:
    vmap-safe.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz orthogonalizes matrices, got a tensor of shape {tuple(g.shape)}")
    a, b, c = coefficients
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g  # (..., min, max)
    if dtype is None:
        dtype = torch.bfloat16 if x.device.type == "cuda" else x.dtype
    x = x.to(dtype)
    norm = torch.linalg.matrix_norm(x, dtype=torch.promote_types(x.dtype, torch.float32), keepdim=True)  # bf16 sums lose digits
    x = x / (norm.to(x.dtype) + NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT  # (..., min, min)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_scale(shape: tuple[int, ...]) -> float:
    """0.2 sqrt(max(m, n)): an m x n matrix with min(m, n) unit singular values has RMS
    1 / sqrt(max(m, n)), so the scaled update has RMS ~0.2 like AdamW's, and Muon shares
    AdamW's learning-rate range and weight-decay meaning (Moonshot; optax's default too).
    modded-nanogpt's sqrt(max(1, m/n)) instead keeps square matrices at RMS 1/sqrt(n), with
    learning rates ~0.02-0.05."""
    return RMS_MATCH * math.sqrt(max(shape[-2:]))


class ScaleByMuonState(NamedTuple):
    count: Tensor  # 0-d int32: the number of updates so far
    mu: PyTree  # the momentum, an exponential moving average of the gradients, shaped like params


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5) -> GradientTransformation:
    """g -> 0.2 sqrt(max(m, n)) * NS(direction): Muon's direction before weight decay and learning rate.

        mu <- momentum mu + (1 - momentum) g
        direction = (1 - momentum) g + momentum mu   (nesterov)   or   mu
    Every leaf must be a matrix (m, n); `partition` sends the others elsewhere (muon_adamw).
    The moving average (not optax's running sum) only changes mu's scale, which NS removes.
    """
    momentum = hyperparameter("momentum", momentum, "in [0, 1)", lambda v: 0 <= v < 1)
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"ns_steps must be a non-negative int, got {ns_steps!r}")

    def init(params: PyTree) -> ScaleByMuonState:
        for path, leaf in flatten(params).items():
            if leaf.ndim != 2:
                raise ValueError(
                    f"muon orthogonalizes matrices, but {path or 'a leaf'} has shape {tuple(leaf.shape)}: "
                    "partition the tree (fnlm.optim.muon_adamw) so that other leaves take another optimizer"
                )
        return ScaleByMuonState(zero_count(params), zeros_like(params))

    def update(updates: PyTree, state: ScaleByMuonState, params: PyTree | None = None):
        grads, structure = tree_flatten(updates)
        mu = foreach("lerp", leaves_like(structure, state.mu), grads, 1 - momentum)
        directions = foreach("lerp", grads, mu, momentum) if nesterov else mu
        # One iteration per matrix: stacking same-shape matrices into one batched iteration was
        # 1.3x slower on the CPU (the copies); its fewer GPU launches are unmeasured.
        orthogonal = [newton_schulz(d, ns_steps) * muon_scale(d.shape) for d in directions]
        return tree_unflatten(structure, orthogonal), ScaleByMuonState(state.count + 1, tree_unflatten(structure, mu))

    return GradientTransformation(init, update)


def muon(
    learning_rate: float | Tensor | Schedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    weight_decay: float | Tensor = 0.0,
) -> GradientTransformation:
    """Muon on a tree of matrices, with decoupled weight decay:

        p <- p - lr * (0.2 sqrt(max(m, n)) NS(nesterov momentum) + weight_decay * p)

    learning_rate and weight_decay may be 0-d tensors (a sweep's per-run values, fnlm.sweep).
    """
    return chain(
        scale_by_muon(momentum, nesterov, ns_steps),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )


MUON, ADAMW = "muon", "adamw"
ADAMW_ONLY = ("token_embeddings", "lm_head")  # input and output layers: AdamW, as in every Muon recipe


def muon_labels(params: PyTree) -> PyTree:
    """"muon" for the hidden matrices (2-D leaves outside token_embeddings and lm_head), "adamw"
    for the rest (embeddings, the LM head, norm gains); a tree shaped like params."""

    def label(path: str, leaf: Tensor) -> str:
        return MUON if leaf.ndim == 2 and path.split(".")[0] not in ADAMW_ONLY else ADAMW

    return tree_map_with_path(label, params)


def muon_adamw(
    learning_rate: float | Tensor | Schedule,
    adam_learning_rate: float | Tensor | Schedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float | Tensor = 0.0,
    max_grad_norm: float | Tensor | None = None,
    labels: PyTree | Callable[[PyTree], PyTree] = muon_labels,
) -> GradientTransformation:
    """Muon for the hidden matrices and AdamW for the rest (labels: muon_labels), after one
    global-norm clip over all gradients (if max_grad_norm). Both decay by weight_decay."""
    adam = adamw(adam_learning_rate, b1, b2, eps, weight_decay)
    split = partition({MUON: muon(learning_rate, momentum, nesterov, ns_steps, weight_decay), ADAMW: adam}, labels)
    return split if max_grad_norm is None else chain(clip_by_global_norm(max_grad_norm), split)

