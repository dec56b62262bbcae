"""The BPE Tokenizer (handout section 2.6): encode, encode_iterable, decode, GPT-2 files."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from itertools import chain, filterfalse, islice

from ..files import read_json, write_files
from . import gpt2
from .bpe import Merger
from .pretokenize import last_cut, pretokenize, special_pattern

STREAM_BLOCK = 1 << 12  # characters encode_iterable gathers before it encodes (amortizes a call)
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # GPT-2's files
SPECIAL_TOKENS_FILE = "special_tokens.json"  # beside them: the special tokens, a JSON list
MANIFEST_FILE = "manifest.json"  # vocab.json's and merges.txt's size and sha256, which Tokenizer.load checks
MANIFEST_FORMAT = "fnlm.tokenizer/1"
CACHE_SIZE = 1 << 18  # pre-tokens (~40 MB); encoding the 92 MB English corpus took 15% longer with 2**17


class Tokenizer:
    """Byte-level BPE with special tokens.

    vocab: {id: token bytes}, holding all 256 single bytes; merges: (left, right) token pairs in
    priority order, each part and their concatenation in vocab; special_tokens: strings encoded
    as one id each (added to the vocabulary if absent) and never split; where they overlap, the
    longest match wins. The ids of up to `cache_size` recent pre-tokens are cached.
    """

    def __init__(self, vocab: Mapping[int, bytes], merges: Sequence[tuple[bytes, bytes]],
                 special_tokens: Sequence[str] | None = None, *, cache_size: int = CACHE_SIZE) -> None:
        self.vocab: dict[int, bytes] = _check_vocab(vocab)
        self.special_tokens: list[str] = _check_special_tokens(special_tokens)
        gpt2.check_merges(self.vocab, merges, where=lambda i: f"merges[{i}]")
        self.merges: list[tuple[bytes, bytes]] = list(merges)
        ids = {token: i for i, token in self.vocab.items()}
        for token in (special.encode("utf-8") for special in self.special_tokens):
            if token not in ids:
                ids[token] = max(self.vocab) + 1
                self.vocab[ids[token]] = token
        self._special_ids = {token: ids[token.encode("utf-8")] for token in self.special_tokens}
        self._specials = special_pattern(self.special_tokens, capture=True)
        merger = Merger([ids[bytes([b])] for b in range(256)], [(ids[a], ids[b], ids[a + b]) for a, b in self.merges])
        self._cache = _Cache(merger, cache_size)

    @classmethod
    def from_files(cls, vocab_filepath: str | os.PathLike, merges_filepath: str | os.PathLike,
                   special_tokens: Sequence[str] | None = None, *, cache_size: int = CACHE_SIZE) -> Tokenizer:
        """Load GPT-2 style vocab.json and merges.txt (see gpt2.py); errors name the file and line."""
        vocab = gpt2.load_vocab(vocab_filepath)
        merges, lines = gpt2.load_merges(merges_filepath)
        gpt2.check_merges(vocab, merges, where=lambda i: f"{merges_filepath}:{lines[i]}")
        return cls(vocab, merges, special_tokens, cache_size=cache_size)

    @classmethod
    def load(cls, directory: str | os.PathLike, special_tokens: Sequence[str] | None = None) -> Tokenizer:
        """The tokenizer that `save` (or `fnlm train-bpe`) wrote into `directory`; special_tokens,
        if given, replace those of its special_tokens.json.

        A folder with a manifest.json (every folder `save` wrote) is checked against it first: a
        file changed, replaced or cut short since (even at a line boundary) is a ValueError
        naming it. Folders without one (GPT-2's files, older saves) load unchecked.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer folder {directory} does not exist" if not directory.exists()
                                    else f"{directory} is not a tokenizer folder (it is a file)")
        if not (directory / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not a tokenizer folder: it has no {VOCAB_FILE}")
        manifest = _read_manifest(directory)
        if manifest is not None:
            _check_against_manifest(directory, manifest)
        # After the manifest's check, which names a listed file that is missing as such.
        if not (directory / MERGES_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not a tokenizer folder: it has no {MERGES_FILE}")
        if special_tokens is None and (directory / SPECIAL_TOKENS_FILE).exists():
            special_tokens = read_json(directory / SPECIAL_TOKENS_FILE)
            if not (isinstance(special_tokens, list) and all(isinstance(t, str) and t for t in special_tokens)):
                raise ValueError(f"{directory / SPECIAL_TOKENS_FILE}: expected a JSON list of non-empty strings, "
                                 f"got {special_tokens!r:.80}")
        return cls.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json and merges.txt (GPT-2's format), special_tokens.json (which one may
        edit) and manifest.json (the vocabulary size, the number of merges, and the size and sha256
        of vocab.json and merges.txt, which `load` checks) into `directory`, all or none: on a
        full disk the folder keeps its old files (fnlm.files.write_files)."""
        files = {VOCAB_FILE: gpt2.vocab_text(self.vocab).encode("utf-8"),
                 MERGES_FILE: gpt2.merges_text(self.merges).encode("utf-8")}
        manifest = {
            "format": MANIFEST_FORMAT,
            "vocab_size": len(self.vocab),
            "merges": len(self.merges),
            "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in files.items()},
        }
        write_files(directory, {**files, SPECIAL_TOKENS_FILE: json.dumps(self.special_tokens) + "\n",
                                MANIFEST_FILE: json.dumps(manifest, indent=2) + "\n"})  # the manifest last

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`; ValueError if it holds a lone surrogate (not UTF-8 encodable)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids: list[int] = []
        try:
            for block in self._blocks(text):
                self._encode_block(block, ids)
        except UnicodeEncodeError as error:
            raise ValueError(f"encode: the text holds a lone surrogate {error.object[error.start]!r}, "
                             "which UTF-8 cannot encode") from None
        return ids

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily the ids of "".join(iterable), whatever the chunking, in constant memory.

        Text is encoded up to the last cut of what has arrived (pretokenize.last_cut: a point
        that no later text can change, so a chunk may end inside a word or a special token);
        the rest waits for the next chunk. No threads and no buffers beyond a few kB.
        """
        buffer = ""
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable takes an iterable of str, got a {type(chunk).__name__}")
            buffer += chunk
            if len(buffer) >= STREAM_BLOCK and (cut := last_cut(buffer, self.special_tokens)):
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        yield from self.encode(buffer)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; bytes that are not valid UTF-8 become U+FFFD."""
        vocab = self.vocab
        try:
            data = b"".join([vocab[i] for i in ids])
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]!r} is not in the vocabulary "
                             f"(ids 0..{max(vocab)})") from None
        except TypeError:
            raise TypeError(f"decode takes an iterable of int token ids, got {ids!r:.80}") from None
        return data.decode("utf-8", errors="replace")

    def _blocks(self, text: str) -> Iterator[list[list[str] | int]]:
        """The text as items in order, pre-token lists and special-token ids, gathered in blocks
        of about half the cache's worth of pre-tokens (so that a block's misses fit in it)."""
        limit = self._cache.size // 2
        block: list[list[str] | int] = []
        size = 0
        for i, part in enumerate(self._specials.split(text) if self._specials is not None else [text]):
            pieces = pretokenize(part) if i % 2 == 0 else []
            for start in range(0, len(pieces), limit):
                block.append(pieces[start : start + limit])
                size += len(block[-1])
                if size >= limit:
                    yield block
                    block, size = [], 0
            if i % 2:
                block.append(self._special_ids[part])
        yield block

    def _encode_block(self, items: list[list[str] | int], ids: list[int]) -> None:
        """Append the ids of a block: merge its misses together (bpe.Merger.many), then look every
        pre-token up in C (map, chain)."""
        table = self._cache.fill(set(chain.from_iterable(item for item in items if not isinstance(item, int))))
        for item in items:
            if isinstance(item, int):
                ids.append(item)
            else:
                ids += chain.from_iterable(map(table.__getitem__, item))


class _Cache:
    """pre-token -> ids for at most `size` pre-tokens, computed by `merger`.

    When a block's misses would not fit, only the newest half of the table is kept, rebuilt as
    a fresh dict: eviction costs O(1) a miss, and the table never fills with deleted slots.
    """

    def __init__(self, merger: Merger, size: int) -> None:
        self.merger, self.size = merger, max(size, 2)
        self.table: dict[str, tuple[int, ...]] = {}

    def fill(self, pieces: Collection[str]) -> dict[str, tuple[int, ...]]:
        """The table, holding all of `pieces` (at most size // 2 of them)."""
        missing = list(filterfalse(self.table.__contains__, pieces))
        if len(self.table) + len(missing) > self.size:
            self.table = dict(islice(self.table.items(), len(self.table) - self.size // 2, None))
            missing = list(filterfalse(self.table.__contains__, pieces))
        self.table.update(zip(missing, self.merger.many(missing)))
        return self.table


def _read_manifest(directory: Path) -> dict | None:
    """The folder's manifest.json, or None if it has none (a folder written before manifests)."""
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and manifest.get("format") == MANIFEST_FORMAT
            and all(isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys() for entry in files.values())):
        raise ValueError(f"{path}: not an {MANIFEST_FORMAT} manifest (expected 'format' and 'files' with "
                         "each file's 'bytes' and 'sha256')")
    return manifest


def _check_against_manifest(directory: Path, manifest: dict) -> None:
    """ValueError naming the first file whose size or sha256 differs from the manifest's."""
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (listed in {directory / MANIFEST_FILE})")
        data = path.read_bytes()
        found = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if found != {"bytes": expected["bytes"], "sha256": expected["sha256"]}:
            raise ValueError(
                f"{path} does not match {directory / MANIFEST_FILE} ({found['bytes']} bytes, expected "
                f"{expected['bytes']}; sha256 {found['sha256'][:12]}..., expected {str(expected['sha256'])[:12]}...): "
                "it was changed, replaced or cut short after the tokenizer was saved"
            )


def _check_vocab(vocab: Mapping[int, bytes]) -> dict[int, bytes]:
    """A copy of vocab; TypeError/ValueError for bad entries, repeated tokens or missing bytes."""
    if not isinstance(vocab, Mapping):
        raise TypeError(f"vocab must be a mapping {{id: bytes}}, got {type(vocab).__name__}")
    first: dict[bytes, int] = {}
    for i, token in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or not isinstance(token, bytes):
            raise TypeError(f"vocab must map non-negative int ids to bytes, got {i!r}: {token!r}")
        if token in first:
            raise ValueError(f"vocab: token {token!r} has two ids, {first[token]} and {i}")
        first[token] = i
    missing = [b for b in range(256) if bytes([b]) not in first]
    if missing:
        raise ValueError(f"vocab lacks {len(missing)} of the 256 single bytes (first: {bytes([missing[0]])!r}); "
                         "a byte-level BPE vocabulary needs all of them")
    return dict(vocab)


def _check_special_tokens(special_tokens: Sequence[str] | None) -> list[str]:
    if special_tokens is None:
        return []
    if isinstance(special_tokens, str) or not all(isinstance(t, str) and t for t in special_tokens):
        raise TypeError(f"special_tokens must be a list of non-empty str, got {special_tokens!r}")
    return list(dict.fromkeys(special_tokens))
