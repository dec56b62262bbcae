"""The optimizer interface, in optax's shape: a GradientTransformation is a pair of pure functions.

    init(params) -> state
    update(updates, state, params=None) -> (updates, state)

`updates` enter as gradients and leave as the step to add to the parameters (apply_updates,
or both at once: apply_step);
states are NamedTuples of tensors and pytrees, so they flatten into checkpoints like params do.
No function here modifies an argument in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, flatten, foreach, leaves_like, tree_flatten, tree_leaves, tree_unflatten, unflatten

OptState = Any  # a NamedTuple, or a tuple of them for a chain


class GradientTransformation(NamedTuple):
    init: Callable[[PyTree], OptState]
    update: Callable[..., tuple[PyTree, OptState]]  # (updates, state, params=None)
    # (grads, state, params) -> (new params, state): apply_updates(params, update(...)[0]) in one
    # pass over memory, for an optimizer with a fused kernel (adamw on CUDA); see apply_step.
    fused_step: Callable[..., tuple[PyTree, OptState]] | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` in order; the state is the tuple of their states."""

    def init(params: PyTree) -> tuple[OptState, ...]:
        return tuple(transform.init(params) for transform in transforms)

    def update(updates: PyTree, state: tuple[OptState, ...], params: PyTree | None = None):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transformations got a state of {len(state)}")
        new_state = []
        for transform, inner in zip(transforms, state):
            updates, inner = transform.update(updates, inner, params)
            new_state.append(inner)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


class PartitionState(NamedTuple):
    inner_states: dict[str, OptState]  # label -> the state of that label's transformation


def partition(
    transforms: dict[str, GradientTransformation], labels: PyTree | Callable[[PyTree], PyTree]
) -> GradientTransformation:
    """One transformation per group of leaves: leaves labelled L take transforms[L].

    `labels` is a tree of strings shaped like params, or a function params -> such a tree (a
    function of paths and shapes only: it runs again inside every update, vmap included). Each
    transformation sees its leaves as one flat dict {dotted path: leaf}, so its state flattens
    to checkpoint keys that end in the parameter's own path ("....muon.0.1.layers.0.attn.q_proj.weight").
    A label may have no leaves (its state then never changes); an unknown label is a ValueError. optax's
    multi_transform / partition, with the groups as flat dicts instead of masked trees.
    """
    if not transforms or not all(isinstance(label, str) for label in transforms):
        raise ValueError(f"partition needs a dict of transformations keyed by label, got {transforms!r}")

    def path_labels(tree: PyTree, flat_tree: dict[str, Any]) -> dict[str, str]:
        """{path: label} of `tree` (params, or updates shaped like them), whose leaves are flat_tree."""
        flat_labels = flatten(labels(tree) if callable(labels) else labels)
        if flat_labels.keys() != flat_tree.keys():
            missing, extra = sorted(flat_tree.keys() - flat_labels.keys()), sorted(flat_labels.keys() - flat_tree.keys())
            raise ValueError(f"partition labels do not match the tree: no label for {missing[:4]}, "
                             f"labels without a leaf {extra[:4]}")
        for path, label in flat_labels.items():
            if label not in transforms:
                raise ValueError(f"partition: {path} is labelled {label!r}; known labels {sorted(transforms)}")
        return flat_labels

    def split(flat_tree: dict[str, Any], flat_labels: dict[str, str]) -> dict[str, dict[str, Any]]:
        """{label: {path: leaf}}."""
        groups: dict[str, dict[str, Any]] = {label: {} for label in transforms}
        for path, label in flat_labels.items():
            groups[label][path] = flat_tree[path]
        return groups

    def init(params: PyTree) -> PartitionState:
        flat_params = flatten(params)
        groups = split(flat_params, path_labels(params, flat_params))
        return PartitionState({label: transform.init(groups[label]) for label, transform in transforms.items()})

    def update(updates: PyTree, state: PartitionState, params: PyTree | None = None):
        flat_updates = flatten(updates)
        flat_labels = path_labels(updates, flat_updates)  # paths and shapes, which params share with updates
        groups, param_groups = split(flat_updates, flat_labels), None
        if params is not None:
            flat_params = flatten(params)
            if flat_params.keys() != flat_updates.keys():
                raise ValueError("partition: params and updates have different leaves")
            param_groups = split(flat_params, flat_labels)
        flat_out, new_states = {}, {}
        for label, transform in transforms.items():
            if not groups[label]:  # nothing to update (and foreach ops refuse empty lists)
                new_states[label] = state.inner_states[label]
                continue
            inner_params = None if param_groups is None else param_groups[label]
            out, new_states[label] = transform.update(groups[label], state.inner_states[label], inner_params)
            flat_out |= flatten(out)
        return unflatten(flat_out, like=updates), PartitionState(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """params + updates, leafwise, out of place."""
    leaves, structure = tree_flatten(params)
    return tree_unflatten(structure, foreach("add", leaves, leaves_like(structure, updates)))


def apply_step(optimizer: GradientTransformation, grads: PyTree, state: OptState, params: PyTree):
    """(new params, new state): one optimizer step, by its fused_step where it has one."""
    if optimizer.fused_step is not None:
        return optimizer.fused_step(grads, state, params)
    updates, state = optimizer.update(grads, state, params)
    return apply_updates(params, updates), state


def find_state(state: OptState, kind: type) -> Any | None:
    """The first sub-state of type `kind` in a (chained) state, or None."""
    if isinstance(state, kind):
        return state
    if isinstance(state, PartitionState):
        inners = state.inner_states.values()
    elif isinstance(state, tuple) and not hasattr(state, "_fields"):  # a chain's plain tuple
        inners = state
    else:
        return None
    for inner in inners:
        found = find_state(inner, kind)
        if found is not None:
            return found
    return None


def replace_state(state: OptState, kind: type, new: Any) -> OptState:
    """`state` with every sub-state of type `kind` replaced by `new` (the shims' bridge)."""
    if isinstance(state, kind):
        return new
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(replace_state(inner, kind, new) for inner in state)
    return state


def map_leaves(fn: Callable[[list[Tensor]], list[Tensor]], tree: PyTree) -> PyTree:
    """Rebuild `tree` from fn(its leaves as one list): the bridge to torch._foreach_* ops."""
    leaves, structure = tree_flatten(tree)
    return tree_unflatten(structure, fn(leaves))


def zero_count(params: PyTree) -> Tensor:
    """A 0-d int32 step counter on the parameters' device (CPU for an empty tree)."""
    leaves = tree_leaves(params)
    return torch.zeros((), dtype=torch.int32, device=leaves[0].device if leaves else "cpu")


def hyperparameter(
    name: str, value: Any, expected: str, ok: Callable[[float], bool], *, tensor_ok: bool = False
) -> float | Tensor:
    """`value` as a float, or a TypeError (not a number) / ValueError (not `expected`) naming it.

    With tensor_ok, a 0-d floating tensor passes through unchecked: a per-run value of a sweep,
    batched by torch.func.vmap (fnlm.sweep), whose range its caller checked as a float.
    """
    if tensor_ok and isinstance(value, Tensor):
        if value.ndim != 0 or not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 0-d floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)
