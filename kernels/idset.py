"""A set of 64-bit fingerprints with O(1) expected work per insert and look-up, in numpy arrays.

Open addressing with linear probing, processed a whole batch at a time: every probe round looks
at one slot for each key still unresolved, so a batch costs a few vectorised passes, not a
Python loop over keys. The table doubles when it is half full (each key is moved once per
doubling: O(n) in all over a run), so the work of a run is linear in its rows — the sorted-runs
structure it replaces re-sorted everything seen so far and grew as n².

Fingerprints are hashes: the caller confirms every hit exactly (a collision never rejects a
row). 0 marks an empty slot, so a key 0 is stored as 1 — one more possible false hit, confirmed
like any other.

`work` counts slots probed plus keys moved by growth, so a test can check linear growth by
counting, not timing.
"""
from __future__ import annotations

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)   # Fibonacci hashing: spreads keys whose low bits agree


class FingerprintSet:
    """Insert and look up uint64 keys in batches; 8 bytes × capacity (2–4 × the keys held)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self.table = np.zeros(cap, dtype=np.uint64)
        self.size = 0
        self.work = 0

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _slots(self, h: np.ndarray) -> np.ndarray:
        bits = int(len(self.table)).bit_length() - 1
        with np.errstate(over="ignore"):
            return ((h * _MIX) >> np.uint64(64 - bits)).astype(np.int64)

    @staticmethod
    def _keys(h: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(h, dtype=np.uint64)
        return np.where(h == 0, np.uint64(1), h)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """Which keys are in the set (a bool array)."""
        h = self._keys(h)
        hit = np.zeros(len(h), dtype=bool)
        todo = np.arange(len(h))
        slot = self._slots(h)
        mask = len(self.table) - 1
        while len(todo):
            self.work += len(todo)
            seen = self.table[slot]
            found = seen == h[todo]
            hit[todo[found]] = True
            going = ~found & (seen != 0)
            todo, slot = todo[going], (slot[going] + 1) & mask
        return hit

    def add(self, h: np.ndarray) -> None:
        """Insert keys (duplicates, within the batch or of keys held, are stored once)."""
        h = np.unique(self._keys(h))
        if not len(h):
            return
        if 2 * (self.size + len(h)) > len(self.table):
            self._grow(self.size + len(h))
        self._insert(h[~self.contains(h)])

    def _grow(self, need: int) -> None:
        old = self.table[self.table != 0]
        self.work += len(old)
        self.table = np.zeros(1 << (2 * need - 1).bit_length(), dtype=np.uint64)
        self.size = 0
        self._insert(old)

    def _insert(self, h: np.ndarray) -> None:
        """Place distinct keys not in the table: each round, one key wins each free slot it asks for."""
        mask = len(self.table) - 1
        slot = self._slots(h)
        keys = h
        self.size += len(h)
        while len(keys):
            self.work += len(keys)
            free = self.table[slot] == 0
            # among the keys that found a free slot, the first one asking for each slot takes it
            cand = np.flatnonzero(free)
            _, first = np.unique(slot[cand], return_index=True)
            won = np.zeros(len(keys), dtype=bool)
            won[cand[first]] = True
            self.table[slot[won]] = keys[won]
            keys, slot = keys[~won], (slot[~won] + 1) & mask
