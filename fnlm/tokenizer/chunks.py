"""A file as chunks that tokenize independently, and parallel passes over them.

Chunks end at cuts (pretokenize.py), so the pre-tokens (or token ids) of the chunks add up to
those of the whole file; each worker reads its own byte ranges, never the whole file.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, TypeVar

import regex

from .pretokenize import first_cut, longest, special_pattern

T = TypeVar("T")

CHUNK_BYTES = 1 << 20  # the unit of the parallel passes; bounds each worker's memory
_WINDOW_BYTES = 1 << 16  # how far past a chunk's nominal end to look for a cut, per read


def chunk_boundaries(path: str | os.PathLike, special_tokens: Sequence[str],
                     chunk_bytes: int | None = None) -> list[int]:
    """Byte offsets [0, ..., size] that cut the file into chunks of about `chunk_bytes`
    (default CHUNK_BYTES).

    Each offset is a cut (see the module docstring), found by reading a small window after the
    nominal offset, so that chunks can be pre-tokenized independently and exactly.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path} does not exist" if not os.path.exists(path)
                                else f"input {path} is not a file")
    size = os.path.getsize(path)
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    specials = special_pattern(special_tokens)
    bounds = [0]
    with open(path, "rb") as file:
        while bounds[-1] + chunk_bytes < size:
            bounds.append(_next_cut(file, bounds[-1] + chunk_bytes, size, special_tokens, specials))
    if bounds[-1] < size:
        bounds.append(size)
    return bounds


def _next_cut(file: BinaryIO, offset: int, size: int, special_tokens: Sequence[str],
              specials: regex.Pattern | None) -> int:
    """The first cut at or after byte `offset`, or `size` if the rest of the file has none.

    Each window carries `margin` bytes of context on both sides of the candidates, enough for
    the longest special token (<= 4 bytes a character) and the regex's one-character lookahead.
    """
    context = max(1, longest(special_tokens))
    margin = 4 * context + 4
    while offset < size:
        begin = max(offset - margin, 0)
        file.seek(begin)
        window = file.read(offset - begin + _WINDOW_BYTES + margin)
        at_eof = begin + len(window) >= size
        first, middle = _char_start(window, 0), _char_start(window, offset - begin)
        last = len(window) if at_eof else _char_start(window, len(window) - margin)
        head = decode_utf8(window[first:middle], file.name, begin + first)
        text = head + decode_utf8(window[middle:last], file.name, begin + middle)
        cut = first_cut(text, special_tokens, specials, len(head), len(text) - (1 if at_eof else context))
        if cut is not None:
            return begin + middle + len(text[len(head):cut].encode("utf-8"))
        offset += _WINDOW_BYTES
    return size


def _char_start(data: bytes, index: int) -> int:
    """The first index >= `index` that does not hold a UTF-8 continuation byte."""
    index = max(index, 0)
    while index < len(data) and 0x80 <= data[index] < 0xC0:
        index += 1
    return index


def decode_utf8(data: bytes, path: str | os.PathLike, offset: int) -> str:
    """data.decode('utf-8'), or a ValueError naming the file and the byte offset of bad input."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: invalid UTF-8 at byte {offset + error.start}: {error.reason}") from None


def read_chunk(path: str | os.PathLike, start: int, end: int) -> str:
    """The text of bytes [start, end) of a UTF-8 file."""
    with open(path, "rb") as file:
        file.seek(start)
        return decode_utf8(file.read(end - start), path, start)


def map_chunks(function: Callable[..., T], args: tuple, bounds: Sequence[int], num_workers: int | None,
               *, ordered: bool) -> Iterator[tuple[int, T]]:
    """(bytes, function(*args, ranges)) for runs of neighbouring chunks [start, end) of `bounds`.

    Runs in `num_workers` forked processes (default: all cores; forked, so `function` and
    `args` need no pickling and callers need no `if __name__ == "__main__"` guard), each
    taking runs of up to 16 chunks (an eighth of its share at most, for balance): one result
    per run to send back, and a worker's cache meets text like what it has just seen. With one
    worker (or one chunk) it runs here, one chunk a run. Results come in file order if
    `ordered`, else as they are ready.
    """
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise ValueError(f"num_workers must be a positive integer or None, got {num_workers!r}")
    ranges = list(zip(bounds, bounds[1:]))
    workers = min(num_workers or os.cpu_count() or 1, len(ranges))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from ((end - start, function(*args, [(start, end)])) for start, end in ranges)
        return
    size = min(16, max(1, len(ranges) // (8 * workers)))
    runs = [ranges[i : i + size] for i in range(0, len(ranges), size)]
    with multiprocessing.get_context("fork").Pool(workers, _set_job, (function, args)) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(_run, runs)


_job: tuple[Callable[..., object], tuple] | None = None  # a worker's (function, args), inherited by fork


def _set_job(function: Callable[..., object], args: tuple) -> None:
    global _job
    _job = (function, args)


def _run(ranges: list[tuple[int, int]]) -> tuple[int, object]:
    function, args = _job
    return ranges[-1][1] - ranges[0][0], function(*args, ranges)
