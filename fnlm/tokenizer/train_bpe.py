"""Byte-level BPE training (handout section 2.4), exact and fast.

Pre-tokens are counted in parallel over file chunks (count_pretokens). The distinct pre-tokens are
then laid end to end in one array of token ids, each followed by a separator, with a doubly
linked list over it (`nxt`, `prv`) and each position's weight (its pre-token's count). A merge
of (a, b) -> c then works on numpy arrays:
  - the positions holding a, followed by b, come from the position list of a or of b, whichever
    is shorter (token -> positions where it was created; stale entries are filtered out). This
    index stands in for the usual pair -> words index: one array per token instead of a set
    per pair, so it is built in one argsort and takes a fraction of the memory;
  - only the pairs touching an occurrence change: (left, a) and (b, right) lose its weight,
    (left, c) and (c, right) gain it; the deltas are summed per pair with one sort;
  - a heap keyed by (-count, then the reverse byte order of the pair) yields the next merge;
    counts only go down except for pairs holding the newest token, which are pushed afresh, so a
    popped entry whose count is stale is simply pushed again with the true count.
Memory follows the number of distinct pre-tokens (and their length), not the corpus size.
"""

from __future__ import annotations

import heapq
import os
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..progress import Progress
from .chunks import chunk_boundaries, map_chunks, read_chunk
from .pretokenize import iter_pretokens, special_pattern

SEPARATOR = -1  # follows every word; never part of a pair
DEAD = -2  # the second half of a merged pair


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns (vocab, merges): vocab maps ids to token bytes, the special tokens first, then the
    256 bytes, then one token per merge in order; merges are the (left, right) pairs in order.
    Special tokens split the text and take no part in merges. Ties between equally frequent
    pairs go to the lexicographically greater pair of bytes. Training stops early, with a
    warning, if no pair is left (a small corpus supports fewer tokens than asked for).
    `num_workers` processes pre-tokenize (default: all cores).
    """
    special_tokens = list(special_tokens)
    if not all(isinstance(token, str) and token for token in special_tokens):
        raise TypeError(f"special_tokens must be non-empty strings, got {special_tokens!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has repeats: {special_tokens!r}")
    base = len(special_tokens) + 256
    if not isinstance(vocab_size, int) or vocab_size < base:
        raise ValueError(f"vocab_size must be an integer >= {base} (the special tokens and 256 bytes), "
                         f"got {vocab_size!r}")
    counts = count_pretokens(input_path, special_tokens, num_workers=num_workers, progress=progress)
    state = _State(counts, num_ids=vocab_size - len(special_tokens))
    del counts  # the words live on in state's arrays; this frees ~100 bytes per distinct pre-token
    with Progress("merge", total=vocab_size - base, unit="", enabled=progress) as bar:
        while len(state.merges) < vocab_size - base and state.merge_best():
            bar.update(1)
    merges = state.merges
    if len(merges) < vocab_size - base:
        warnings.warn(f"{input_path} supports only {len(merges)} merges (no pair of tokens is left to merge): "
                      f"the vocabulary has {base + len(merges)} tokens, not the {vocab_size} asked for",
                      stacklevel=2)
    vocab = {i: token.encode("utf-8") for i, token in enumerate(special_tokens)}
    vocab.update({len(special_tokens) + b: bytes([b]) for b in range(256)})
    vocab.update({base + i: a + b for i, (a, b) in enumerate(merges)})
    return vocab, merges


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


class _State:
    """The words, the pair counts and the heap of one training run (see the module docstring).

    Token ids: 0..255 are the bytes, 256 + i is the token of merge i. A pair (a, b) is the int
    a << shift | b, so pair keys stay plain ints in numpy and in the dict.
    """

    def __init__(self, counts: Counter[str], num_ids: int) -> None:
        self.shift = max(num_ids, 256).bit_length()
        self.tokens: list[bytes] = [bytes([b]) for b in range(256)]
        self.merges: list[tuple[bytes, bytes]] = []
        self.rank_keys = [_reverse_order_key(token) for token in self.tokens]
        self.tok, self.nxt, self.prv, self.weight = _layout(counts)
        self.positions = _group_positions(self.tok, 256)
        self.counts = _byte_pair_counts(self.tok, self.weight, self.shift)
        self.heap = [self._entry(pair, n) for pair, n in self.counts.items()]
        heapq.heapify(self.heap)

    def _entry(self, pair: int, count: int) -> tuple[int, str, str, int]:
        a, b = pair >> self.shift, pair & ((1 << self.shift) - 1)
        return -count, self.rank_keys[a], self.rank_keys[b], pair

    def _add(self, pairs: np.ndarray, deltas: np.ndarray) -> list[int]:
        """counts[pair] += delta for each (summed per pair); returns the distinct pairs touched."""
        if len(pairs) == 0:
            return []
        order = np.argsort(pairs, kind="stable")
        pairs = pairs[order]
        starts = np.flatnonzero(np.concatenate(([True], pairs[1:] != pairs[:-1])))
        sums = np.add.reduceat(deltas[order], starts)
        touched = pairs[starts].tolist()
        counts = self.counts
        for pair, delta in zip(touched, sums.tolist()):
            total = counts.get(pair, 0) + delta
            if total:
                counts[pair] = total
            else:
                counts.pop(pair, None)
        return touched

    def merge_best(self) -> bool:
        """Merge the most frequent pair (ties: the greater bytes); False if no pair is left."""
        while self.heap:
            negative, _, _, pair = heapq.heappop(self.heap)
            count = self.counts.get(pair, 0)
            if count == -negative:
                self._merge(pair)
                return True
            if count > 0:  # stale: the count went down since the push
                heapq.heappush(self.heap, self._entry(pair, count))
        return False

    def _merge(self, pair: int) -> None:
        shift = self.shift
        a, b = pair >> shift, pair & ((1 << shift) - 1)
        c = len(self.tokens)
        self.tokens.append(self.tokens[a] + self.tokens[b])
        self.rank_keys.append(_reverse_order_key(self.tokens[c]))
        self.merges.append((self.tokens[a], self.tokens[b]))
        del self.counts[pair]

        tok, nxt, prv = self.tok, self.nxt, self.prv
        at = self._occurrences(a, b)  # positions of a in each occurrence, ascending
        then = nxt[at]  # positions of b
        left, right = prv[at], nxt[then]
        # Occurrences side by side ("a b a b"): the pair between them is counted once, as the
        # right pair of the first, and after the merge it is (c, c).
        follows = np.zeros(len(at), dtype=bool)
        follows[:-1] = right[:-1] == at[1:]
        precedes = np.concatenate(([False], follows[:-1]))
        left_tok, right_tok = tok[left].astype(np.int64), tok[right].astype(np.int64)
        has_left, has_right = (left_tok >= 0) & ~precedes, right_tok >= 0
        new_right = np.where(follows, c, right_tok)
        weight = self.weight[at]
        old = np.concatenate([(left_tok << shift | a)[has_left], (b << shift | right_tok)[has_right]])
        new = np.concatenate([(left_tok << shift | c)[has_left], (c << shift | new_right)[has_right]])
        moved = np.concatenate([weight[has_left], weight[has_right]])
        keep = old != pair  # with a == b, (a, a) next to an occurrence is the merged pair itself
        touched = self._add(np.concatenate([old[keep], new]), np.concatenate([-moved[keep], moved]))
        for p in touched:
            if p >> shift == c or p & ((1 << shift) - 1) == c:
                count = self.counts.get(p, 0)
                if count > 0:
                    heapq.heappush(self.heap, self._entry(p, count))

        tok[at], tok[then] = c, DEAD
        nxt[at], prv[right] = right, at
        self.positions.append(at)

    def _occurrences(self, a: int, b: int) -> np.ndarray:
        """Ascending positions p with tok[p] == a and tok[nxt[p]] == b, left to right without
        overlap (in "a a a", (a, a) occurs once, at the first a)."""
        tok, nxt = self.tok, self.nxt
        if len(self.positions[a]) <= len(self.positions[b]):
            at = self._live(a)
            at = at[tok[nxt[at]] == b]
        else:
            at = self.prv[self._live(b)]
            at = at[tok[at] == a]
        if a == b and len(at) > 1:
            # In a run of overlapping occurrences keep the 1st, 3rd, ...: merging is left to right.
            index = np.arange(len(at))
            chained = np.concatenate(([False], at[1:] == nxt[at[:-1]]))
            run_start = np.maximum.accumulate(np.where(chained, 0, index))
            at = at[(index - run_start) % 2 == 0]
        return at

    def _live(self, token: int) -> np.ndarray:
        """Positions now holding `token`; drops the stale ones from its list when they dominate."""
        listed = self.positions[token]
        live = listed[self.tok[listed] == token]
        if 2 * len(live) < len(listed):
            self.positions[token] = live
        return live


def _layout(counts: Counter[str]) -> tuple[np.ndarray, ...]:
    """(tok, nxt, prv, weight): the pre-tokens' bytes end to end, each followed by a SEPARATOR.

    Positions are int32 (a corpus has far fewer than 2**31 distinct pre-token bytes); prv of
    the very first position is -1, which numpy reads as the last position: a separator.
    """
    joined = np.frombuffer("".join(counts).encode("utf-8"), dtype=np.uint8)
    lengths = np.fromiter((len(w) if w.isascii() else len(w.encode("utf-8")) for w in counts),
                          dtype=np.int64, count=len(counts))
    size = len(joined) + len(counts)
    tok = np.full(size, SEPARATOR, dtype=np.int32)
    is_token = np.ones(size, dtype=bool)
    is_token[np.cumsum(lengths + 1) - 1] = False
    tok[is_token] = joined
    weight = np.repeat(np.fromiter(counts.values(), dtype=np.int64, count=len(counts)), lengths + 1)
    index = np.arange(size, dtype=np.int32)
    return tok, index + 1, index - 1, weight


def _group_positions(tok: np.ndarray, num_tokens: int) -> list[np.ndarray]:
    """For each token id below `num_tokens`, the ascending positions holding it (int32)."""
    order = np.argsort(tok, kind="stable").astype(np.int32)
    ends = np.searchsorted(tok[order], np.arange(num_tokens + 1), side="left")
    return [order[ends[t]:ends[t + 1]] for t in range(num_tokens)]


def _byte_pair_counts(tok: np.ndarray, weight: np.ndarray, shift: int) -> dict[int, int]:
    """{a << shift | b: weighted count} over adjacent bytes, by one bincount over 256 * 256 pairs."""
    left, right = tok[:-1], tok[1:]
    real = (left >= 0) & (right >= 0)
    pairs = left[real] * 256 + right[real]
    sums = np.bincount(pairs, weights=weight[:-1][real], minlength=256 * 256)  # float64: exact below 2**53
    return {int(p >> 8) << shift | int(p & 255): int(sums[p]) for p in np.flatnonzero(sums)}


_INVERT = bytes(range(255, -1, -1))


def _reverse_order_key(token: bytes) -> str:
    """A string whose order is the reverse of the tokens' byte order (so a min-heap pops the
    lexicographically greater pair first): each byte x becomes chr(255 - x) and a final chr(256)
    puts a token after every longer token it begins."""
    return token.translate(_INVERT).decode("latin-1") + "\u0100"
