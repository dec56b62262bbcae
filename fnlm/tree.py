"""Parameter pytrees: nested dicts and lists of tensors. The only module that imports optree.

A flat view joins paths with dots ("layers.0.attn.q_proj.weight"); that flat dict IS a
PyTorch state dict, and `flatten` / `unflatten` are the single bridge between the two.

Two flatteners: optree in eager code, and a small one of our own while torch.compile traces
(dynamo steps through the Python it traces, and torch.utils._pytree costs it several calls per
node where ours costs one per dict, list or tuple: half the optimizer update's capture time,
docs/experiments.md). Both treat None as an empty node and name paths alike. They order dict
keys differently (optree sorts, ours keeps insertion order), so never zip leaves of two trees by
position: take the second tree's leaves in the first one's order with `leaves_like`, or match
by path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optree
import torch

PyTree = Any  # nested dicts / lists / tuples / NamedTuples with tensor (or spec) leaves

__all__ = [
    "PyTree",
    "flatten",
    "foreach",
    "global_norm",
    "is_batched",
    "leaves_like",
    "num_leaves",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_map_with_path",
    "tree_unflatten",
    "unflatten",
    "zeros_like",
]


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply `fn` leafwise over `tree` and trees of the same structure (matched by key, not position)."""
    if not torch.compiler.is_compiling():
        return optree.tree_map(fn, tree, *rest)
    leaves, structure = tree_flatten(tree)
    others = [leaves_like(structure, other) for other in rest]
    return tree_unflatten(structure, [fn(*xs) for xs in zip(leaves, *others)])


def tree_map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like `tree_map`, with the leaf's dotted path as `fn`'s first argument."""
    paths, leaves, structure = _flatten_with_paths(tree)
    others = [leaves_like(structure, other) for other in rest]
    return tree_unflatten(structure, [fn(path, *xs) for path, *xs in zip(paths, leaves, *others)])


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves in the flattener's order: zip them with another tree's only through `leaves_like`."""
    return tree_flatten(tree)[0]


def tree_flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """(leaves, structure): for list-at-a-time (torch._foreach_*) work over a tree's leaves."""
    if not torch.compiler.is_compiling():
        return optree.tree_flatten(tree)
    leaves: list[Any] = []
    return leaves, _traced_structure(tree, leaves)


def leaves_like(structure: Any, tree: PyTree) -> list[Any]:
    """`tree`'s leaves in the order of `structure` (from tree_flatten of a tree shaped like it),
    matched by key: the way to zip two trees' leaves, whatever their dicts' insertion order.
    A ValueError if the structures differ."""
    if isinstance(structure, optree.PyTreeSpec):
        return structure.flatten_up_to(tree)
    leaves: list[Any] = []
    _traced_leaves_like(structure, tree, leaves)
    return leaves


def tree_unflatten(structure: Any, leaves: list[Any]) -> PyTree:
    """The inverse of `tree_flatten` (either flattener's structure)."""
    if isinstance(structure, optree.PyTreeSpec):
        return optree.tree_unflatten(structure, leaves)
    return _traced_unflatten(structure, iter(leaves))


def num_leaves(structure: Any) -> int:
    """How many leaves a tree of this structure (either flattener's) holds."""
    if isinstance(structure, optree.PyTreeSpec):
        return structure.num_leaves
    return 1 if structure is None else sum(num_leaves(child) for child in structure[2])


def flatten(tree: PyTree) -> dict[str, Any]:
    """{"a": {"b": [x, y]}} -> {"a.b.0": x, "a.b.1": y}."""
    paths, leaves, _ = _flatten_with_paths(tree)
    return dict(zip(paths, leaves))


def unflatten(flat: Mapping[str, Any], like: PyTree) -> PyTree:
    """Rebuild a tree shaped like `like` from a flat dict; keys and leaf shapes must match exactly."""
    paths, like_leaves, structure = _flatten_with_paths(like)
    expected = dict(zip(paths, like_leaves))
    missing = sorted(expected.keys() - flat.keys())
    unexpected = sorted(flat.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the parameter tree: missing {_short(missing)}, "
            f"unexpected {_short(unexpected)}"
        )
    for key, want in expected.items():
        got = getattr(flat[key], "shape", None)
        if hasattr(want, "shape") and got is not None and tuple(got) != tuple(want.shape):
            raise ValueError(f"{key}: expected shape {tuple(want.shape)}, got {tuple(got)}")
    return tree_unflatten(structure, [flat[key] for key in expected])


def zeros_like(tree: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves taken together, as a 0-d tensor of float32 (float64 if any leaf is)."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    dtype = functools.reduce(torch.promote_types, (leaf.dtype for leaf in leaves), torch.float32)
    norms = foreach("norm", leaves, 2, dtype=dtype)  # one multi-tensor kernel, not one per leaf
    return torch.linalg.vector_norm(torch.stack(norms))


def foreach(op: str, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """torch._foreach_<op>(*args, **kwargs): one multi-tensor kernel over lists of leaves.

    Under torch.func.vmap (any tensor argument a functorch BatchedTensor, e.g. a sweep's stacked
    runs, fnlm.sweep) the same op runs leaf by leaf instead, since foreach ops have no batching
    rules: list arguments are zipped, the others go to every leaf. Inductor fuses either form.
    """
    lists = [arg for arg in args if isinstance(arg, (list, tuple))]
    # A list's first leaf stands for the list: vmap batches a tree's leaves alike, and a mix
    # would still fail loudly in the foreach op rather than compute anything wrong.
    if not any(map(is_batched, (*(xs[0] for xs in lists if xs), *args, *kwargs.values()))):
        return getattr(torch, f"_foreach_{op}")(*args, **kwargs)
    per_leaf = _PER_LEAF.get(op) or getattr(torch.Tensor, op)
    return [
        per_leaf(*(arg[i] if isinstance(arg, (list, tuple)) else arg for arg in args), **kwargs)
        for i in range(len(lists[0]))
    ]


_PER_LEAF: dict[str, Callable[..., torch.Tensor]] = {
    "norm": torch.linalg.vector_norm,
    # vmap has no rule for the in-place addcmul_ (it would loop over the runs): same arithmetic, out of place
    "addcmul_": lambda leaf, a, b, value=1: leaf.copy_(torch.addcmul(leaf, a, b, value=value)),
}


def is_batched(value: Any) -> bool:
    """Whether value is a tensor that torch.func.vmap is batching (a sweep's stacked runs)."""
    return isinstance(value, torch.Tensor) and torch._C._functorch.is_batchedtensor(value)


def _flatten_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """(dotted paths, leaves, structure) with either flattener: partition and the sweep's labels
    flatten inside the compiled step too."""
    if torch.compiler.is_compiling():
        leaves, structure = tree_flatten(tree)
        return [_join(path) for path in _traced_paths(structure, ())], leaves, structure
    paths, leaves, structure = optree.tree_flatten_with_path(tree)
    return [_join(path) for path in paths], leaves, structure


# The traced flattener's structure of a tree: None for a leaf, else (type, dict keys or None, the
# children's structures). Keys, indices and None follow optree, so paths agree with the eager
# flattener. The three walks that the optimizer's update runs are written for dynamo's sake: a
# leaf is handled in its parent's loop, and there are no comprehensions, enumerate or dict(...)
# calls, since dynamo traces each of those as one more call.

def _traced_structure(tree: Any, leaves: list[Any]) -> Any:
    if not isinstance(tree, (dict, list, tuple)) and tree is not None:
        leaves.append(tree)
        return None
    children = () if tree is None else tree.values() if isinstance(tree, dict) else tree
    structures = []
    for child in children:
        if isinstance(child, (dict, list, tuple)) or child is None:
            structures.append(_traced_structure(child, leaves))
        else:
            leaves.append(child)
            structures.append(None)
    return type(tree), tuple(tree) if isinstance(tree, dict) else None, tuple(structures)


def _traced_leaves_like(structure: Any, tree: Any, leaves: list[Any]) -> None:
    if structure is None:
        leaves.append(tree)
        return
    kind, keys, children = structure
    if not isinstance(tree, kind) or (tree is not None and len(tree) != len(children)):
        raise ValueError(f"expected a {kind.__name__} of {len(children)} children, got {type(tree).__name__}")
    if keys is not None and set(keys) != set(tree):
        raise ValueError(f"expected dict keys {sorted(map(str, keys))}, got {sorted(map(str, tree))}")
    for i in range(len(children)):
        child_structure, child = children[i], tree[keys[i]] if keys is not None else tree[i]
        if child_structure is None:
            leaves.append(child)
        else:
            _traced_leaves_like(child_structure, child, leaves)


def _traced_unflatten(structure: Any, leaves: Iterator[Any]) -> Any:
    if structure is None:
        return next(leaves)
    kind, keys, children = structure
    values = []
    for child in children:
        values.append(next(leaves) if child is None else _traced_unflatten(child, leaves))
    if keys is not None:
        node = {}
        for key, value in zip(keys, values):
            node[key] = value
        return node if kind is dict else kind(node)
    if kind is type(None):
        return None
    return kind(*values) if hasattr(kind, "_fields") else kind(values)  # a NamedTuple takes fields


def _traced_paths(structure: Any, prefix: tuple) -> list[tuple]:
    if structure is None:
        return [prefix]
    _, keys, children = structure
    names = keys if keys is not None else range(len(children))
    return [path for name, child in zip(names, children) for path in _traced_paths(child, (*prefix, name))]


def _join(path: tuple[Any, ...]) -> str:
    return ".".join(str(key) for key in path)


def _short(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
