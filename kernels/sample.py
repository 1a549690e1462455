"""A seeded sample drawn while streaming: the m rows with the smallest seeded hash of their id.

The k-means sample of `clipsql dedup` (docs/science.md §10) is chosen in the same pass that reads
the ids and norms, so its rows are never read again by position. The rule: among the valid rows,
the m of smallest key `hash_keys(id, seed)`, ties by id; the sample is then used in id order. It
depends only on the set of (id, vector) pairs and the seed — not on the storage order, the batch
sizes or m_cap — and is a uniform m-subset to the extent the hash is random-like.

`hash_keys`: a polynomial hash of the id's UTF-8 bytes modulo 2⁶⁴ in two seeded odd bases,
combined with the length and the seed through the splitmix64 finalizer; vectorized over an Arrow
string array (no per-row Python objects).

`StreamSample` keeps the rows of the m_cap smallest keys seen so far (their float32 unit rows),
in a buffer of m_cap + slack rows: when full, it keeps the m_cap smallest (and any tied with the
m_cap-th) and from then on admits only keys ≤ that cut. Over a stream of n rows ≈ m(1 + ln(n/m))
rows are admitted.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _fmix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64, wrapping)."""
    h = np.asarray(h, dtype=np.uint64).copy()
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def _poly(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, bases: tuple) -> list[np.ndarray]:
    """Per base: Σ_i (b_i + 1) · base^(L−1−i) mod 2⁶⁴ per string (0 for an empty one)."""
    n = len(starts)
    if not len(data):
        return [np.zeros(n, dtype=np.uint64) for _ in bases]
    expo = np.repeat(starts + lengths - 1, lengths) - np.arange(len(data), dtype=np.int64)
    vals = data.astype(np.uint64) + np.uint64(1)
    nz = lengths > 0
    out = []
    with np.errstate(over="ignore"):
        for base in bases:
            pows = np.ones(int(lengths.max()), dtype=np.uint64)
            for e in range(1, len(pows)):              # a loop over the longest id's length, not rows
                pows[e] = pows[e - 1] * base
            h = np.zeros(n, dtype=np.uint64)
            h[nz] = np.add.reduceat(vals * pows[expo], starts[nz], dtype=np.uint64)
            out.append(h)
    return out


def hash_keys(ids: pa.Array, seed: int) -> np.ndarray:
    """uint64 key of every id (string or binary Arrow array, no nulls) under `seed`."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offs = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8)[offs[0]:offs[-1]] if buf is not None else np.zeros(0, np.uint8)
    starts = (offs[:-1] - offs[0]).astype(np.int64)
    lengths = np.diff(offs).astype(np.int64)
    s = _fmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
    b1 = (_fmix(s ^ _GOLDEN) | np.uint64(1))[0]
    b2 = (_fmix(s + _GOLDEN) | np.uint64(1))[0]
    with np.errstate(over="ignore"):
        p1, p2 = _poly(data, starts, lengths, (b1, b2))
        h = _fmix(p1 ^ s[0])
        h ^= _fmix(p2 + lengths.astype(np.uint64) * _GOLDEN)
    return _fmix(h)


class StreamSample:
    """The rows of the m_cap smallest keys of a stream, with their float32 rows (see the module doc).
    The buffer's slots are reused in place: a prune only marks the slots above the cut free and
    later admissions fill them, so no row is moved until `take` gathers the sample."""

    def __init__(self, m_cap: int, d: int, slack: int | None = None):
        self.m_cap = int(m_cap)
        self.size = self.m_cap + max(1024, self.m_cap // 4 if slack is None else int(slack))
        self.keys = np.empty(self.size, dtype=np.uint64)
        self.pos = np.empty(self.size, dtype=np.int64)
        self.rows = np.empty((self.size, d), dtype=np.float32)
        self.live = np.zeros(self.size, dtype=bool)
        self.count = 0
        self.cut = np.uint64(0xFFFFFFFFFFFFFFFF)      # keys above it can no longer be among the m_cap smallest
        self.admitted = 0

    def add(self, keys: np.ndarray, pos: np.ndarray, rows) -> None:
        """Offer the rows at stream positions `pos` with `keys`; `rows(i)` gives the float32 rows of
        the offered indices i (formed only for the admitted ones)."""
        sel = np.flatnonzero(keys <= self.cut)
        while sel.size:
            room = self.size - self.count
            if room == 0:
                self._prune()
                sel = sel[keys[sel] <= self.cut]
                if self.count == self.size:                # ties at the cut fill the buffer: grow it
                    self._grow()
                continue
            take = sel[:room]
            slots = np.flatnonzero(~self.live)[:len(take)]
            self.keys[slots], self.pos[slots], self.rows[slots] = keys[take], pos[take], rows(take)
            self.live[slots] = True
            self.count += len(take)
            self.admitted += len(take)
            sel = sel[room:]

    def _prune(self) -> None:
        if self.count <= self.m_cap:
            return
        k = self.keys[self.live]
        cut = np.partition(k, self.m_cap - 1)[self.m_cap - 1]
        self.live &= self.keys <= cut
        self.count, self.cut = int(self.live.sum()), cut

    def _grow(self) -> None:
        extra = max(1024, self.size // 4)
        self.keys = np.concatenate([self.keys, np.empty(extra, dtype=np.uint64)])
        self.pos = np.concatenate([self.pos, np.empty(extra, dtype=np.int64)])
        self.rows = np.concatenate([self.rows, np.empty((extra, self.rows.shape[1]), dtype=np.float32)])
        self.live = np.concatenate([self.live, np.zeros(extra, dtype=bool)])
        self.size += extra

    def take(self, m: int, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, rows) of the m rows of smallest (key, rank) — rank: every stream position's
        rank of its id — in rank order (id order). m ≤ m_cap."""
        if m > self.m_cap:
            raise ValueError(f"a sample of {m} rows was asked of a stream sample of at most {self.m_cap}")
        slot = np.flatnonzero(self.live)
        k, p = self.keys[slot], self.pos[slot]
        o = np.lexsort((rank[p], k))[:m]
        o = o[np.argsort(rank[p[o]], kind="stable")]
        return p[o].copy(), self.rows[slot[o]]
