"""Applying BPE merges to pre-tokens: the encoder's inner step, for one piece or for many.

Both ways merge, in each pre-token, the pair of adjacent ids with the best (lowest) merge rank
until no pair has a rank; one piece goes through a Python loop, a batch of pieces through numpy,
where each round merges the best pair of every unfinished piece at once (all its occurrences,
left to right; for merges learned in order this is the same as one at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice, repeat

import numpy as np

BATCH_MIN = 256  # below this many pieces the per-round numpy overhead costs more than it saves


class Merger:
    """byte_ids: the id of each of the 256 bytes; merges: (left id, right id, merged id) by rank."""

    def __init__(self, byte_ids: Sequence[int], merges: Sequence[tuple[int, int, int]]) -> None:
        self.byte_ids = list(byte_ids)
        self.ranks = {(left, right): rank for rank, (left, right, _) in enumerate(merges)}
        self.merged = [merged for _, _, merged in merges]
        self.never = len(merges)  # the rank of a pair that has no merge
        # a pair (left, right) has the key left * width + right
        self.width = max([*self.byte_ids, *(i for merge in merges for i in merge)]) + 1
        self.rank_table = _RankTable([left * self.width + right for left, right, _ in merges], self.never)
        self.byte_table = np.array(self.byte_ids, dtype=np.int64)
        self.merged_table = np.array([*self.merged, -1], dtype=np.int64)

    def many(self, pieces: Sequence[str]) -> list[tuple[int, ...]]:
        """The ids of each piece (tuples: the garbage collector soon stops tracking them)."""
        if len(pieces) < BATCH_MIN:
            return [self.one(piece) for piece in pieces]
        return self._batch(pieces)

    def one(self, piece: str) -> tuple[int, ...]:
        """The ids of one piece: merge the leftmost pair with the best rank, until none has one."""
        ids = list(map(self.byte_ids.__getitem__, piece.encode("utf-8")))
        rank, merged, never = self.ranks.get, self.merged, self.never
        pair_ranks = list(map(rank, zip(ids, ids[1:]), repeat(never)))
        while pair_ranks and (best := min(pair_ranks)) < never:
            i = pair_ranks.index(best)
            ids[i] = merged[best]
            del ids[i + 1], pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = rank((ids[i - 1], ids[i]), never)
            if i < len(pair_ranks):
                pair_ranks[i] = rank((ids[i], ids[i + 1]), never)
        return tuple(ids)

    def _batch(self, pieces: Sequence[str]) -> list[tuple[int, ...]]:
        """The ids of each piece, all pieces at once.

        ids (N,) holds the unfinished pieces end to end and owner (N,) the index of each one's
        piece; every round finishes the pieces without a mergeable pair and merges the best pair
        of each other piece.
        """
        data = "".join(pieces).encode("utf-8")
        lengths = np.fromiter(map(len, pieces) if len(data) == sum(map(len, pieces)) else  # ASCII: chars are bytes
                              (len(piece.encode("utf-8")) for piece in pieces), dtype=np.int64, count=len(pieces))
        ids = self.byte_table[np.frombuffer(data, dtype=np.uint8)]
        owner = np.repeat(np.arange(len(pieces)), lengths)
        finished_ids, finished_owner = [], []
        while len(ids):
            starts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))
            sizes = np.diff(starts, append=len(ids))
            rank = self._pair_ranks(ids, owner)  # (N,): of the pair (i, i + 1), `never` across pieces
            best_of = np.repeat(np.minimum.reduceat(rank, starts), sizes)
            done = best_of == self.never
            if done.any():
                finished_ids.append(ids[done])
                finished_owner.append(owner[done])
                ids, owner, rank, best_of = ids[~done], owner[~done], rank[~done], best_of[~done]
            at = _leftmost_runs(np.flatnonzero(rank == best_of))
            ids[at] = self.merged_table[rank[at]]
            keep = np.ones(len(ids), dtype=bool)
            keep[at + 1] = False
            ids, owner = ids[keep], owner[keep]
        # Each piece finished in one round, its ids in order: a stable sort by piece restores them.
        owner = np.concatenate(finished_owner)
        flat = iter(np.concatenate(finished_ids)[np.argsort(owner, kind="stable")].tolist())
        return list(map(tuple, map(islice, repeat(flat), np.bincount(owner, minlength=len(pieces)).tolist())))

    def _pair_ranks(self, ids: np.ndarray, owner: np.ndarray) -> np.ndarray:
        rank = self.rank_table.lookup(ids[:-1] * self.width + ids[1:])
        rank[owner[:-1] != owner[1:]] = self.never
        return np.append(rank, self.never)


class _RankTable:
    """A numpy hash table (open addressing, linear probing, load <= 1/4) from pair keys to ranks;
    vectorized lookups run several times faster than np.searchsorted over sorted keys."""

    _MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing

    def __init__(self, keys: Sequence[int], missing: int) -> None:
        self.bits = max(4 * len(keys), 16).bit_length()
        self.keys = np.full(1 << self.bits, -1, dtype=np.int64)
        self.ranks = np.full(1 << self.bits, missing, dtype=np.int64)
        self.missing = missing
        table, mask = self.keys.tolist(), (1 << self.bits) - 1
        for rank, (key, slot) in enumerate(zip(keys, self._slots(np.array(keys, dtype=np.int64)).tolist())):
            while table[slot] != -1:
                slot = (slot + 1) & mask
            table[slot] = key
            self.ranks[slot] = rank
        self.keys = np.array(table, dtype=np.int64)

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * self._MULTIPLIER) >> np.uint64(64 - self.bits)).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The rank of each key, `missing` for keys not in the table."""
        ranks = np.full(len(keys), self.missing, dtype=np.int64)
        pending, slots = np.arange(len(keys)), self._slots(keys)
        mask = (1 << self.bits) - 1
        while len(pending):
            found = self.keys[slots]
            hit = found == keys[pending]
            ranks[pending[hit]] = self.ranks[slots[hit]]
            probe = ~hit & (found != -1)
            pending, slots = pending[probe], (slots[probe] + 1) & mask
        return ranks


def _leftmost_runs(at: np.ndarray) -> np.ndarray:
    """Of ascending positions where a pair starts, those merged left to right: in a run of
    consecutive ones (the pair (a, a) in "a a a"), the 1st, 3rd, ..."""
    if len(at) < 2:
        return at
    index = np.arange(len(at))
    chained = np.concatenate(([False], at[1:] == at[:-1] + 1))
    run_start = np.maximum.accumulate(np.where(chained, 0, index))
    return at[(index - run_start) % 2 == 0]
