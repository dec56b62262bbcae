"""Parameter pytrees: nested dicts and lists of tensors. The only module that imports optree.

A flat view joins paths with dots ("layers.0.attn.q_proj.weight"); that flat dict IS a
PyTorch state dict, and `flatten` / `unflatten` are the single bridge between the two.

Two flatteners: optree in eager code, and torch.utils._pytree while torch.compile traces (dynamo
captures its pure-Python flattening several times faster than optree's; a 12-layer step's
capture is mostly pytree work). They order dict keys differently (optree sorts, torch keeps
insertion order), so never zip leaves of two trees by position: take the second tree's leaves
in the first one's order with `leaves_like`, or match by path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

PyTree = Any  # nested dicts / lists / tuples / NamedTuples with tensor (or spec) leaves

__all__ = [
    "PyTree",
    "flatten",
    "foreach",
    "global_norm",
    "leaves_like",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_map_with_path",
    "tree_unflatten",
    "unflatten",
    "zeros_like",
]


def _flattener() -> Any:
    """torch's pytree while dynamo traces (torch.compile), optree otherwise: same API for what we use."""
    return torch_pytree if torch.compiler.is_compiling() else optree


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply `fn` leafwise over `tree` and trees of the same structure (matched by key, not position)."""
    return _flattener().tree_map(fn, tree, *rest)


def tree_map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like `tree_map`, with the leaf's dotted path as `fn`'s first argument."""
    paths, leaves, structure = _flatten_with_paths(tree)
    others = [leaves_like(structure, other) for other in rest]
    return tree_unflatten(structure, [fn(path, *xs) for path, *xs in zip(paths, leaves, *others)])


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves in the flattener's order: zip them with another tree's only through `leaves_like`."""
    return _flattener().tree_leaves(tree)


def tree_flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """(leaves, structure): for list-at-a-time (torch._foreach_*) work over a tree's leaves."""
    return _flattener().tree_flatten(tree)


def leaves_like(structure: Any, tree: PyTree) -> list[Any]:
    """`tree`'s leaves in the order of `structure` (from tree_flatten of a tree shaped like it),
    matched by key: the way to zip two trees' leaves, whatever their dicts' insertion order.
    A ValueError if the structures differ."""
    return structure.flatten_up_to(tree)


def tree_unflatten(structure: Any, leaves: list[Any]) -> PyTree:
    """The inverse of `tree_flatten` (either flattener's structure)."""
    if isinstance(structure, optree.PyTreeSpec):
        return optree.tree_unflatten(structure, leaves)
    return torch_pytree.tree_unflatten(leaves, structure)


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
    if not any(map(_is_batched, (*(xs[0] for xs in lists if xs), *args, *kwargs.values()))):
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


def _is_batched(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and torch._C._functorch.is_batchedtensor(value)


def _flatten_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """(dotted paths, leaves, structure) with the flattener of `_flattener`: partition and the
    sweep's labels flatten inside the compiled step too."""
    if torch.compiler.is_compiling():
        pairs, structure = torch_pytree.tree_flatten_with_path(tree)
        paths = [_join(tuple(_torch_key(entry) for entry in path)) for path, _ in pairs]
        return paths, [leaf for _, leaf in pairs], structure
    paths, leaves, structure = optree.tree_flatten_with_path(tree)
    return [_join(path) for path in paths], leaves, structure


def _torch_key(entry: Any) -> Any:
    """A torch.utils._pytree key entry as optree names it: the dict key, list index or field."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unexpected pytree key entry {entry!r}")


def _join(path: tuple[Any, ...]) -> str:
    return ".".join(str(key) for key in path)


def _short(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
