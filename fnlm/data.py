"""Batches of token windows from a (memory-mapped) 1-D token array.

    tokens = load_tokens("train.npy", vocab_size=10_000)     # np.memmap, checked once
    x, y = get_batch(tokens, 32, 256, "cuda", generator=gen)  # (B, T) int64 each, y = x shifted by 1

Randomness comes only from the explicit torch.Generator (a CPU generator, so runs on any device
draw the same windows). Shape legend: B batch, T context length, N tokens in the array.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_CHECK_CHUNK = 1 << 24  # tokens per pass of the range check: bounded memory on any file size


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda, else mps, else cpu; any other device must exist, or a RuntimeError says why."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    device = torch.device(device)
    _check_available(device)
    return device


@functools.cache
def _check_available(device: torch.device) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(f"device {str(device)!r} is not available: no CUDA device (or torch without CUDA)")
        if (device.index or 0) >= count:
            raise RuntimeError(f"device {str(device)!r} is not available: only {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r} is not available: MPS is not available here")


def load_tokens(
    path: str | Path, *, vocab_size: int | None = None, dtype: str = "uint16", context_length: int | None = None
) -> np.ndarray:
    """Memory-map a token array: a .npy file (its own dtype) or raw binary of `dtype` (e.g. .bin).

    With `vocab_size`, every id is checked once to lie in [0, vocab_size); with `context_length`,
    the array must hold at least one window (context_length + 1 tokens). Every problem is an
    error naming the file: missing (FileNotFoundError), unreadable, or bad content (ValueError).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        else:
            tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    except (ValueError, EOFError, TypeError) as error:  # a foreign or cut .npy, an empty or odd-sized raw file
        raise ValueError(f"{path}: not a readable token array ({error})") from None
    if tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D token array, got shape {tokens.shape}")
    if context_length is not None:
        _check_holds_a_window(len(tokens), context_length, what=f"{path}: {len(tokens)} tokens")
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, name=str(path))
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, *, name: str = "tokens") -> None:
    """Raise a ValueError for an id outside [0, vocab_size); reads the array once, in chunks."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name}: token ids must be integers, got dtype {tokens.dtype}")
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return  # the dtype cannot hold a bad id
    for begin in range(0, len(tokens), _CHECK_CHUNK):
        chunk = np.asarray(tokens[begin : begin + _CHECK_CHUNK])
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            offset = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            raise ValueError(
                f"{name}: token id {int(chunk[offset])} at position {begin + offset} is outside the "
                f"vocabulary [0, {vocab_size})"
            )


def sample_starts(num_tokens: int, batch_size: int, context_length: int, *, generator: torch.Generator) -> Tensor:
    """B window starts, uniform over every valid start 0 .. N - T - 1 -> (B,) int64 (CPU)."""
    _check_positive(batch_size=batch_size, context_length=context_length)
    _check_holds_a_window(num_tokens, context_length, what=f"dataset of {num_tokens} tokens")
    return torch.randint(0, num_tokens - context_length, (batch_size,), generator=generator)


def gather_windows(
    tokens: np.ndarray, starts: Tensor, context_length: int, device: str | torch.device
) -> tuple[Tensor, Tensor]:
    """Windows tokens[s : s + T + 1] for each start s -> x, y (B, T) int64 on `device`."""
    device = resolve_device(device)
    offsets = starts.numpy()[:, None] + np.arange(context_length + 1)  # (B, T + 1)
    windows = torch.from_numpy(np.asarray(tokens[offsets], dtype=np.int64))  # reads B (T + 1) ids
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)  # overlaps with the running step
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    *,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """B random windows of T + 1 tokens -> inputs x and next-token targets y, (B, T) int64 each."""
    starts = sample_starts(len(tokens), batch_size, context_length, generator=generator)
    return gather_windows(tokens, starts, context_length, device)


def eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    *,
    max_batches: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """Cover `tokens` in order with non-overlapping windows (starts 0, T, 2T, ...), B per batch
    (the last batch may be smaller); stop after `max_batches`. shard (rank, world) keeps every
    world-th batch from the rank-th, so that ranks split the evaluation.
    """
    _check_positive(batch_size=batch_size, context_length=context_length)
    num_windows = (len(tokens) - 1) // context_length
    if num_windows == 0:
        raise ValueError(
            f"validation set of {len(tokens)} tokens is too short for context_length {context_length}"
        )
    num_batches = -(-num_windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    rank, world = shard
    for batch in range(rank, num_batches, world):
        first = batch * batch_size
        starts = torch.arange(first, min(first + batch_size, num_windows)) * context_length
        yield gather_windows(tokens, starts, context_length, device)


def _check_holds_a_window(num_tokens: int, context_length: int, *, what: str) -> None:
    """ValueError "WHAT is too short for context_length ..." unless num_tokens >= context_length + 1."""
    if num_tokens < context_length + 1:
        raise ValueError(f"{what} is too short for context_length {context_length}: "
                         f"a window needs context_length + 1 = {context_length + 1} tokens")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
