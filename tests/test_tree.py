from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm.tree import (
    flatten, global_norm, leaves_like, num_leaves, tree_flatten, tree_map, tree_unflatten, unflatten, zeros_like,
)

names = st.text("abcdefghij_", min_size=1, max_size=6)
leaves = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(lambda shape: torch.randn(shape))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(st.dictionaries(names, children, min_size=1, max_size=4),
                               st.lists(children, min_size=1, max_size=3)),
    max_leaves=12,
)


@given(st.dictionaries(names, trees, min_size=1, max_size=4))
def test_flatten_unflatten_round_trip(tree):
    flat = flatten(tree)
    assert all(isinstance(key, str) for key in flat)
    rebuilt = unflatten(flat, like=tree)
    assert flatten(rebuilt).keys() == flat.keys()
    for key, leaf in flatten(rebuilt).items():
        assert leaf is flat[key]


def test_flatten_uses_dotted_paths_with_list_indices():
    tree = {"layers": [{"w": torch.ones(1)}, {"w": torch.zeros(1)}], "head": {"weight": torch.ones(2)}}
    assert set(flatten(tree)) == {"layers.0.w", "layers.1.w", "head.weight"}


def test_unflatten_names_missing_unexpected_and_misshapen_keys():
    like = {"a": {"weight": torch.ones(2, 3)}, "b": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing b, unexpected c"):
        unflatten({"a.weight": torch.ones(2, 3), "c": torch.ones(1)}, like)
    with pytest.raises(ValueError, match=r"a\.weight: expected shape \(2, 3\), got \(3, 2\)"):
        unflatten({"a.weight": torch.ones(3, 2), "b": torch.ones(1)}, like)


def test_zeros_like_tree_map_and_global_norm():
    tree = {"a": torch.full((1,), 3.0), "b": [torch.full((1,), 4.0)]}
    assert global_norm(tree).item() == pytest.approx(5.0)
    assert all((leaf == 0).all() for leaf in flatten(zeros_like(tree)).values())
    doubled = tree_map(lambda x, y: x + y, tree, tree)
    assert doubled["b"][0].item() == 8.0



class Pair(NamedTuple):
    first: Any
    second: Any


# Optimizer states hold tuples, NamedTuples and None beside the parameters' dicts and lists.
state_trees = st.recursive(
    leaves | st.none(),
    lambda children: st.one_of(st.dictionaries(names, children, min_size=1, max_size=4),
                               st.lists(children, max_size=3), st.lists(children, max_size=3).map(tuple),
                               st.builds(Pair, children, children)),
    max_leaves=12,
)


def reordered(tree: Any) -> Any:
    """The same tree with every dict's keys inserted in reverse order."""
    if isinstance(tree, dict):
        return {key: reordered(tree[key]) for key in reversed(list(tree))}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*map(reordered, tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map(reordered, tree))
    return tree


def traced(fn, *args):
    """fn(*args) with fnlm.tree's flattener as torch.compile traces it (without compiling)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        return fn(*args)


@given(state_trees)
def test_traced_flattener_agrees_with_optree(tree):
    eager = flatten(tree)
    in_trace = traced(flatten, tree)
    assert in_trace.keys() == eager.keys()  # the same paths: keys, indices, None as an empty node
    assert all(in_trace[key] is leaf for key, leaf in eager.items())
    leaves, structure = traced(tree_flatten, tree)
    assert num_leaves(structure) == len(leaves) == len(eager)
    rebuilt = traced(tree_unflatten, structure, leaves)
    assert repr(rebuilt) == repr(tree)  # types too: tuples, NamedTuples, None
    assert [id(leaf) for leaf in traced(leaves_like, structure, reordered(tree))] == [id(leaf) for leaf in leaves]


def test_traced_leaves_like_rejects_another_structure():
    leaves, structure = traced(tree_flatten, {"a": [torch.ones(1), torch.ones(2)], "b": Pair(torch.ones(1), None)})
    for other in ({"a": [torch.ones(1), torch.ones(2)]}, {"a": [torch.ones(1)], "b": Pair(torch.ones(1), None)},
                  {"a": (torch.ones(1), torch.ones(2)), "b": Pair(torch.ones(1), None)}):
        with pytest.raises(ValueError):
            traced(leaves_like, structure, other)


def test_trees_map_by_key_inside_torch_compile():
    tree = {"b": [torch.ones(2), {"c": torch.full((1,), 2.0)}], "a": Pair(torch.zeros(3), None)}

    def add_and_flatten(x, y):
        return flatten(tree_map(torch.add, x, y))

    want = add_and_flatten(tree, reordered(tree))
    got = torch.compile(add_and_flatten, backend="eager", fullgraph=True)(tree, reordered(tree))
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
