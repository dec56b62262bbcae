"""fnlm.data: uniform windows over memory-mapped tokens, in-order evaluation, and clear errors."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm import data
from fnlm.data import eval_batches, get_batch, load_tokens, resolve_device
from tests import adapters


def test_get_batch_cs336_contract():
    """CS336's tests/test_data.py::test_get_batch: shapes, shift by one, uniform starts, bad device."""
    dataset, context_length, batch_size, num_iters = np.arange(0, 100), 7, 32, 1000
    starts = Counter()
    for _ in range(num_iters):
        x, y = adapters.run_get_batch(dataset, batch_size, context_length, "cpu")
        assert x.shape == y.shape == (batch_size, context_length) and x.dtype == y.dtype == torch.int64
        np.testing.assert_allclose((x + 1).numpy(), y.numpy())
        starts.update(x[:, 0].tolist())
    num_starts = len(dataset) - context_length
    assert max(starts) == num_starts - 1 and min(starts) == 0
    expected = num_iters * batch_size / num_starts
    sigma = math.sqrt(num_iters * batch_size * (1 / num_starts) * (1 - 1 / num_starts))
    assert all(expected - 5 * sigma <= count <= expected + 5 * sigma for count in starts.values())
    with pytest.raises(RuntimeError, match="cuda:99"):
        adapters.run_get_batch(dataset, batch_size, context_length, "cuda:99")


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_memory_mapped_files_batch_like_arrays(tmp_path, suffix):
    tokens = (np.arange(500) % 97).astype(np.uint16)
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    mapped = load_tokens(path, vocab_size=97)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16
    batches = [get_batch(source, 4, 16, "cpu", generator=torch.Generator().manual_seed(3)) for source in (mapped, tokens)]
    for a, b in zip(*batches):
        assert torch.equal(a, b)


@given(st.integers(2, 300), st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**16))
def test_windows_are_contiguous_and_in_range(num_tokens, batch_size, context_length, seed):
    tokens = np.arange(num_tokens, dtype=np.int64)
    if num_tokens < context_length + 1:
        with pytest.raises(ValueError, match=f"too short for context_length {context_length}"):
            get_batch(tokens, batch_size, context_length, "cpu", generator=torch.Generator())
        return
    x, y = get_batch(tokens, batch_size, context_length, "cpu", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y)
    assert torch.equal(x - x[:, :1], torch.arange(context_length).expand_as(x))
    assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= num_tokens - 1


def test_the_generator_alone_decides_the_batch():
    tokens = np.arange(1000)
    first = get_batch(tokens, 8, 10, "cpu", generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global RNG plays no part
    again = get_batch(tokens, 8, 10, "cpu", generator=torch.Generator().manual_seed(1))
    other = get_batch(tokens, 8, 10, "cpu", generator=torch.Generator().manual_seed(2))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


@pytest.mark.parametrize("num_tokens, batch_size, max_batches", [(101, 3, None), (100, 4, None), (1000, 5, 3)])
def test_eval_batches_cover_the_array_in_order(num_tokens, batch_size, max_batches):
    tokens, context_length = np.arange(num_tokens), 9
    batches = list(eval_batches(tokens, batch_size, context_length, "cpu", max_batches=max_batches))
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    windows = (num_tokens - 1) // context_length
    if max_batches is None:
        assert len(xs) == windows and all(len(x) == batch_size for x, _ in batches[:-1])
    else:
        assert len(batches) == max_batches and len(xs) == max_batches * batch_size
    assert torch.equal(xs.flatten(), torch.arange(len(xs) * context_length)) and torch.equal(xs + 1, ys)
    sharded = [list(eval_batches(tokens, batch_size, context_length, "cpu", max_batches=max_batches, shard=(r, 2))) for r in range(2)]
    assert sorted(int(x[0, 0]) for shard in sharded for x, _ in shard) == [int(x[0, 0]) for x, _ in batches]


def test_out_of_vocabulary_ids_are_found_once_with_their_position(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHECK_CHUNK", 64)  # the bad id sits in a later chunk
    tokens = np.zeros(1000, dtype=np.uint16)
    tokens[700] = 50
    np.save(tmp_path / "bad.npy", tokens)
    with pytest.raises(ValueError, match=r"token id 50 at position 700 is outside the vocabulary \[0, 50\)"):
        load_tokens(tmp_path / "bad.npy", vocab_size=50)
    assert len(load_tokens(tmp_path / "bad.npy", vocab_size=51)) == 1000
    np.save(tmp_path / "negative.npy", np.array([3, -1, 2]))
    with pytest.raises(ValueError, match="token id -1 at position 1"):
        load_tokens(tmp_path / "negative.npy", vocab_size=10)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(tmp_path / "missing.npy")
    np.save(tmp_path / "floats.npy", np.zeros(10))
    with pytest.raises(ValueError, match="must be integers"):
        load_tokens(tmp_path / "floats.npy", vocab_size=10)
    np.save(tmp_path / "matrix.npy", np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D token array"):
        load_tokens(tmp_path / "matrix.npy")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        get_batch(np.arange(10), 0, 3, "cpu", generator=torch.Generator())
    with pytest.raises(ValueError, match="too short"):
        list(eval_batches(np.arange(5), 2, 5, "cpu"))
    with pytest.raises(RuntimeError, match="not available"):
        resolve_device("cuda:99")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in {"cpu", "cuda", "mps"}
