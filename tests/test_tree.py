import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm.tree import flatten, global_norm, tree_map, unflatten, zeros_like

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

