"""Sweeps as one program: K runs that differ in seed or hyperparameters, stacked along a leading
axis and trained together by one torch.func.vmap'd step on one device.

    params = stack([init_params(cfg, seed=s) for s in seeds])      # every leaf (K, ...)
    opt_state = stack([make_optimizer(train_cfg).init(p) for p in unstack(params)])
    hparams = {"lr": torch.tensor([1e-4, 3e-4, 1e-3])}             # (K,) per swept number
    step = make_sweep_step(cfg, train_cfg)
    params, opt_state, metrics = step(params, opt_state, hparams, alive, x, y)  # metrics (K,) each

Per-run numbers enter the step as tensors (`hparams`), never as Python floats baked into the
optimizer, so one program (and one compilation) serves every run; each run's optimizer is
fnlm.train.make_optimizer(train_cfg, **its hparams), the single run's own. A batch is shared
by all runs (x (B, T)) or per run (x (K, B, T)). A run whose loss or gradient norm turns NaN/inf keeps its
last finite parameters and optimizer state (a select, not a Python branch) and stays frozen;
the others go on. fnlm.run runs a grid of such runs with logs and checkpoints
(`fnlm train --sweep`) in the same loop as a single run.
Shape legend: K runs, B batch, T context length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ModelConfig, TrainConfig
from .optim import OptState
from .train import make_optimizer, make_schedule, make_train_step
from .tree import PyTree, foreach, tree_leaves, tree_map

class SweepMetrics(NamedTuple):
    loss: Tensor  # (K,) float32, each run's batch loss before the update
    grad_norm: Tensor  # (K,) float32, the global gradient norm before clipping
    alive: Tensor  # (K,) bool: the run took this step (alive before, and its loss and norm are finite)
    lr: Tensor  # (K,) float32, each run's learning rate at this step


# --- pytrees of stacked runs -------------------------------------------------------------------


def stack(trees: Sequence[PyTree]) -> PyTree:
    """K trees of one structure -> one tree whose leaves are (K, ...) stacks."""
    if not trees:
        raise ValueError("stack needs at least one tree")
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack(tree: PyTree, *, device: str | torch.device | None = None) -> list[PyTree]:
    """The inverse of `stack`: K trees, run_of each run."""
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("unstack needs a tree with at least one tensor")
    return [run_of(tree, k, device=device) for k in range(leaves[0].shape[0])]


def run_of(tree: PyTree, k: int, *, device: str | torch.device | None = None) -> PyTree:
    """Run k of a stacked tree, each leaf a fresh copy (not a view that would keep, or save, the
    whole stack), on `device` (default: where the stack is)."""
    return tree_map(lambda leaf: leaf[k].to(device or leaf.device, copy=True), tree)


# --- the step ----------------------------------------------------------------------------------


def make_sweep_step(
    cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    shared_batch: bool = True,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    compile: bool = False,
    compile_mode: str | None = None,
) -> Callable[..., tuple[PyTree, OptState, SweepMetrics]]:
    """step(params, opt_state, hparams, alive, x, y) -> (params, opt_state, SweepMetrics), pure.

    params and opt_state are stacked trees (leaves (K, ...)); hparams {name: (K,) tensor} holds
    the per-run numbers (fnlm.train.TENSOR_HPARAMS) that replace train_cfg's in each run's
    optimizer and schedule; alive (K,) bool. x, y are (B, T) for every run when shared_batch,
    else (K, B, T). Each run takes fnlm.train's step; where alive is False or the step's loss or gradient norm is not
    finite (or the update overflows the parameters), the run keeps its parameters and optimizer
    state, and alive turns False for good.
    compile=True torch.compile's the vmapped function as a whole.
    """

    def run_step(params: PyTree, opt_state: OptState, hparams: dict[str, Tensor], alive: Tensor, x: Tensor, y: Tensor):
        step = make_train_step(cfg, make_optimizer(train_cfg, **hparams), schedule=make_schedule(train_cfg, **hparams),
                               autocast_dtype=autocast_dtype, device_type=device_type)
        new_params, new_state, metrics = step(params, opt_state, x, y)
        # The new parameters too (their largest |value|: a norm could overflow where they do not),
        # since a finite step can still overflow them (a huge learning rate).
        largest = torch.stack(foreach("norm", tree_leaves(new_params), math.inf)).amax()
        ok = alive & torch.isfinite(metrics.loss) & torch.isfinite(metrics.grad_norm) & torch.isfinite(largest)

        def keep(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(ok, new, old)

        return tree_map(keep, new_params, params), tree_map(keep, new_state, opt_state), SweepMetrics(
            metrics.loss, metrics.grad_norm, ok, metrics.lr)

    batch_dim = None if shared_batch else 0
    step = torch.func.vmap(run_step, in_dims=(0, 0, 0, 0, batch_dim, batch_dim))
    # fnlm's autograd.Functions are registered with dynamo's allow_in_graph where they are
    # defined (fnlm.nn), which is what lets torch.compile trace them under vmap.
    return torch.compile(step, mode=compile_mode) if compile else step
