"""Pre-tokenization: the GPT-2 regex, special-token splitting, safe cut points, parallel counting.

A *cut* is a position in a text where it can be split into two halves that tokenize (with the
special tokens and the GPT-2 regex) to exactly the concatenation of their tokens. Cuts let the
trainer and `fnlm tokenize` work on byte ranges of a file in parallel and let
`Tokenizer.encode_iterable` stream with a bounded buffer.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import regex

from ..progress import Progress

T = TypeVar("T")

# GPT-2's pre-tokenizer (github.com/openai/tiktoken/pull/234), as in the handout.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN = regex.compile(GPT2_PATTERN)
# The same pattern restricted to ASCII text, where \p{L} is [A-Za-z], \p{N} is [0-9] and \s is
# [\t\n\v\f\r ]; the standard library's re runs it about twice as fast as regex runs the original.
_S = r"\t\n\x0b\x0c\r "
ASCII_PRETOKEN = re.compile(
    rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_S}A-Za-z0-9]+|[{_S}]+(?![^{_S}])|[{_S}]+"""
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

# Between a letter and a non-letter (or a digit and a non-digit) the GPT-2 regex always ends a
# pre-token, and no alternative looks behind or further ahead than that next character: such a
# position is a cut unless a special token straddles it (`straddles`).
_SAFE = r"(?<=\p{L})(?=\P{L})|(?<=\p{N})(?=\P{N})"
_FIRST_SAFE = regex.compile(_SAFE)
_LAST_SAFE = regex.compile("(?r)" + _SAFE)

CHUNK_BYTES = 1 << 20  # one task of the parallel passes; bounds each worker's memory
_WINDOW_BYTES = 1 << 16  # how far past a chunk's nominal end to look for a cut, per read


def special_pattern(special_tokens: Sequence[str], *, capture: bool = False) -> regex.Pattern | None:
    """A regex matching any special token, the longest first where they overlap; None if none.

    With `capture`, `pattern.split(text)` keeps the special tokens at the odd indices.
    """
    if not special_tokens:
        return None
    body = "|".join(regex.escape(token) for token in sorted(set(special_tokens), key=len, reverse=True))
    return regex.compile(f"({body})" if capture else body)


def straddles(text: str, position: int, special_tokens: Sequence[str]) -> bool:
    """Whether an occurrence of a special token starts before `position` and ends after it."""
    return any(text.find(token, max(position - len(token) + 1, 0), position + len(token) - 1) >= 0
               for token in special_tokens)


def last_cut(text: str, special_tokens: Sequence[str]) -> int:
    """The largest cut of `text` that more text appended to it cannot move; 0 if there is none.

    Stays before the last max(len(special)) - 1 characters, which may begin a special token
    that the next chunk completes.
    """
    limit = len(text) - max(1, _longest(special_tokens) - 1)
    while limit > 0:
        match = _LAST_SAFE.search(text, 0, limit + 1)  # endpos past the limit: lookahead sees text[limit]
        if match is None:
            return 0
        if not straddles(text, match.start(), special_tokens):
            return match.start()
        limit = match.start() - 1
    return 0


def first_cut(text: str, special_tokens: Sequence[str], specials: regex.Pattern | None,
              lo: int = 0, hi: int | None = None) -> int | None:
    """The first cut p of `text` with lo <= p <= hi, preferring the start of a special token.

    Special-token starts are document boundaries; the regex cuts serve text without them.
    """
    hi = len(text) - 1 if hi is None else hi
    for pattern in (specials, _FIRST_SAFE) if specials is not None else (_FIRST_SAFE,):
        for match in pattern.finditer(text, lo, hi + 1):
            if match.start() <= hi and not straddles(text, match.start(), special_tokens):
                return match.start()
    return None


def chunk_boundaries(path: str | os.PathLike, special_tokens: Sequence[str],
                     chunk_bytes: int | None = None) -> list[int]:
    """Byte offsets [0, ..., size] that cut the file into chunks of about `chunk_bytes`
    (default CHUNK_BYTES).

    Each offset is a cut (see the module docstring), found by reading a small window after the
    nominal offset, so that chunks can be pre-tokenized independently and exactly.
    """
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
    context = max(1, _longest(special_tokens))
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


def _longest(special_tokens: Sequence[str]) -> int:
    return max(map(len, special_tokens), default=0)


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


def pretokenize(text: str) -> list[str]:
    """GPT-2's pre-tokens of `text` (special tokens are the caller's business).

    ASCII stretches go through ASCII_PRETOKEN; each run of other characters, widened to the
    cuts around it, through PRETOKEN. Cuts make the pieces' pre-tokens add up to the whole's.
    """
    if text.isascii():
        return ASCII_PRETOKEN.findall(text)
    pieces: list[str] = []
    done = 0
    while (run := _NON_ASCII.search(text, done)) is not None:
        before = _LAST_SAFE.search(text, done, run.start() + 1)
        after = _FIRST_SAFE.search(text, run.end())
        start = before.start() if before is not None else done
        end = after.start() if after is not None else len(text)
        pieces += ASCII_PRETOKEN.findall(text[done:start])
        pieces += PRETOKEN.findall(text[start:end])
        done = end
    pieces += ASCII_PRETOKEN.findall(text[done:])
    return pieces


def iter_pretokens(text: str, specials: regex.Pattern | None) -> Iterator[list[str]]:
    """The GPT-2 pre-tokens of each stretch of `text` between special tokens (which are dropped)."""
    for segment in specials.split(text) if specials is not None else (text,):
        yield pretokenize(segment)


def count_pretokens(path: str | os.PathLike, special_tokens: Sequence[str], *,
                    num_workers: int | None = None, progress: bool = True) -> Counter[str]:
    """How often each pre-token occurs in a UTF-8 file; special tokens split it and are not counted.

    The file is cut into ~1 MB chunks at cuts, which `num_workers` processes (default: all
    cores) read and count on their own; memory follows the number of distinct pre-tokens.
    """
    bounds = chunk_boundaries(path, special_tokens)
    total: Counter[str] = Counter()
    with Progress("pre-tokenize", total=bounds[-1], unit="B", enabled=progress) as bar:
        for size, counts in map_chunks(_count_chunks, (path, special_tokens), bounds, num_workers, ordered=False):
            total.update(counts)
            bar.update(size)
    return total


def _count_chunks(path: str | os.PathLike, special_tokens: Sequence[str], ranges: list[tuple[int, int]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    specials = special_pattern(special_tokens)
    for start, end in ranges:
        for pretokens in iter_pretokens(read_chunk(path, start, end), specials):
            counts.update(pretokens)
    return counts


def map_chunks(function: Callable[..., T], args: tuple, bounds: Sequence[int], num_workers: int | None,
               *, ordered: bool) -> Iterator[tuple[int, T]]:
    """(bytes, function(*args, ranges)) for runs of neighbouring chunks [start, end) of `bounds`.

    Runs in `num_workers` forked processes (default: all cores; forked, so `function` and
    `args` need no pickling and callers need no `if __name__ == "__main__"` guard), each
    taking runs of up to 16 chunks (a quarter of its share at most, for balance): one result
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
    size = min(16, max(1, len(ranges) // (4 * workers)))
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
