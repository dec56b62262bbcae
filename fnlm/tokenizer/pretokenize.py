"""Pre-tokenization: the GPT-2 regex (with an ASCII fast path), special tokens, and cuts.

A *cut* is a position in a text where it can be split into two halves that tokenize (with the
special tokens and the GPT-2 regex) to exactly the concatenation of their tokens. Cuts let the
trainer and `fnlm tokenize` work on byte ranges of a file in parallel (chunks.py) and let
`Tokenizer.encode_iterable` stream with a bounded buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import regex

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
    limit = len(text) - max(1, longest(special_tokens) - 1)
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


def longest(special_tokens: Sequence[str]) -> int:
    """The length of the longest special token, 0 if there is none."""
    return max(map(len, special_tokens), default=0)


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
