"""GPT-2's tokenizer files: vocab.json ({token: id}) and merges.txt ("left right" per line).

Tokens are bytes; the files spell each byte as one printable character (GPT-2's
bytes_to_unicode), so that a space is 'Ġ' and every token is a JSON string without escapes
and a merges.txt field without spaces. The files of GPT-2 itself
(tests/fixtures/gpt2_vocab.json, gpt2_merges.txt) and of HF tokenizers load as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import regex

from ..files import read_text

MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the other
    68 bytes to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_TO_CHAR = bytes_to_unicode()  # also a str.translate table over Latin-1 code points
_TO_BYTE = {c: b for b, c in _TO_CHAR.items()}


def token_to_text(token: bytes) -> str:
    """The GPT-2 spelling of a token: b' the' -> 'Ġthe'."""
    return token.decode("latin-1").translate(_TO_CHAR)


def text_to_token(text: str) -> bytes:
    """The bytes a GPT-2 spelling stands for: 'Ġthe' -> b' the'; ValueError for a foreign character."""
    try:
        return bytes(_TO_BYTE[char] for char in text)
    except KeyError as error:
        char = error.args[0]
        raise ValueError(f"token {text!r} has {char!r} (U+{ord(char):04X}), "
                         "which is not in GPT-2's byte alphabet") from None


def vocab_text(vocab: Mapping[int, bytes]) -> str:
    """vocab.json's text: one token a line, by id."""
    entries = [f"  {json.dumps(token_to_text(vocab[i]), ensure_ascii=False)}: {i}" for i in sorted(vocab)]
    return "{\n" + ",\n".join(entries) + "\n}\n"


def merges_text(merges: Sequence[tuple[bytes, bytes]]) -> str:
    """merges.txt's text: the version header, then one "left right" pair a line."""
    lines = [MERGES_HEADER, *(f"{token_to_text(a)} {token_to_text(b)}" for a, b in merges)]
    return "".join(f"{line}\n" for line in lines)


def load_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a vocab.json into {id: token bytes}; ValueError naming the file and line if malformed."""
    text = read_text(path)
    where = _locator(path, text)

    def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{where(key, occurrence=2)}: token {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        table = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}:1: expected a JSON object {{token: id}}, got {type(table).__name__}")
    vocab: dict[int, bytes] = {}
    for key, token_id in table.items():
        if type(token_id) is not int or token_id < 0:
            raise ValueError(f"{where(key)}: the id of {key!r} must be a non-negative integer, got {token_id!r}")
        if token_id in vocab:
            raise ValueError(f"{where(key)}: id {token_id} is given to both "
                             f"{token_to_text(vocab[token_id])!r} and {key!r}")
        try:
            vocab[token_id] = text_to_token(key)
        except ValueError as error:
            raise ValueError(f"{where(key)}: {error}") from None
    return vocab


def load_merges(path: str | os.PathLike) -> tuple[list[tuple[bytes, bytes]], list[int]]:
    """Read a merges.txt into (merges, the line number of each); ValueError naming file:line.

    A first line starting with '#version' and blank lines are skipped. Whether the tokens are
    in a vocabulary is `check_merges`' business.
    """
    merges: list[tuple[bytes, bytes]] = []
    lines: list[int] = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):  # universal newlines: only \n
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}:{number}: expected two tokens separated by one space, got {line!r}")
        try:
            merges.append((text_to_token(parts[0]), text_to_token(parts[1])))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        lines.append(number)
    return merges, lines


def check_merges(vocab: Mapping[int, bytes], merges: Sequence[tuple[bytes, bytes]],
                 where: Callable[[int], str]) -> None:
    """ValueError naming `where(i)` for a merge whose parts or result are not tokens, or a repeat."""
    tokens = set(vocab.values())
    first: dict[tuple[bytes, bytes], int] = {}
    for i, merge in enumerate(merges):
        if not (isinstance(merge, tuple) and len(merge) == 2 and all(isinstance(part, bytes) for part in merge)):
            raise TypeError(f"{where(i)}: a merge must be a tuple of two bytes, got {merge!r}")
        for token in (*merge, merge[0] + merge[1]):
            if token not in tokens:
                raise ValueError(f"{where(i)}: merge {_spell(merge)} uses {token_to_text(token)!r}, "
                                 "which is not in the vocabulary")
        if merge in first:
            raise ValueError(f"{where(i)}: merge {_spell(merge)} repeats {where(first[merge])}")
        first[merge] = i


def _spell(merge: tuple[bytes, bytes]) -> str:
    return repr(f"{token_to_text(merge[0])} {token_to_text(merge[1])}")


def _locator(path: str | os.PathLike, text: str) -> Callable[..., str]:
    """where(key, occurrence=1) -> 'path:line' of that occurrence of `key` as a JSON object key.

    json reports no positions for valid JSON, so the key is searched for in both spellings
    json may have used (raw or \\u-escaped); 'path' alone if neither is found.
    """

    def where(key: str, occurrence: int = 1) -> str:
        spellings = {json.dumps(key, ensure_ascii=False), json.dumps(key)}
        pattern = regex.compile("|".join(regex.escape(s) for s in spellings) + r"\s*:")
        matches = list(pattern.finditer(text))
        if len(matches) < occurrence:
            return str(path)
        return f"{path}:{text.count(chr(10), 0, matches[occurrence - 1].start()) + 1}"

    return where
