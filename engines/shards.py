"""The Ray ingest's run state, off the driver: K shard actors that check ids and gather statistics partials.

A worker that wrote a unit's rows sends each shard its share of the unit's ids (the shard of an id
is its 64-bit fingerprint modulo K, so every copy of an id meets the same shard) and sends the
unit's statistics partial to the unit's own shard (its key's CRC-32 modulo K). The driver then
handles O(units) small messages:

* in unit order, `check(key)` on every shard: each runs the local engine's in-run check
  (`ingest.dedup.IdChecker`: fingerprint set, hits confirmed exactly against the ids not committed
  yet or through the store's `id` index) on its share, and answers the unit's `Duplicates` — ids an
  earlier unit holds, ids repeated within the unit; nearly always none. The shards see the units in
  the order the local engine does, so the same rows are kept and rejected; `committed()` after each commit lets them drop the
  uncommitted ids they keep for confirming hits, as the local checker does.
* at a commit, `take` on every shard: each merges the partials of its units in the commit
  (`RunningMoments.merge`, exact) and shard 0 merges those: the driver receives one partial per
  commit, not one per unit (a two-level tree).

Pure Python here (no Ray): engines.ingest makes the actors, and tests call a `RunShard` directly.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.ingest.dedup import IdChecker, fingerprints
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store


def id_shards(ids: pa.Array, k: int) -> np.ndarray:
    """The shard (0 … k-1) of each id: its fingerprint modulo k."""
    if k == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return (fingerprints(ids) % np.uint64(k)).astype(np.int64)


def key_shard(key: str, k: int) -> int:
    """The shard that holds unit `key`'s statistics partial (stable across processes)."""
    return zlib.crc32(str(key).encode()) % k


def first_rows(ids: pa.Array) -> np.ndarray:
    """Which rows hold the first occurrence of their id (in the array's order)."""
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    first = np.zeros(len(ids), dtype=bool)
    first[np.unique(codes, return_index=True)[1]] = True
    return first


@dataclass(frozen=True)
class Duplicates:
    """A unit's rows that repeat an earlier row of the run, as the local engine finds them
    (ingest.dedup): every row of an id an earlier unit holds (`earlier`), and the rows after the
    first of an id that is new to the run but repeated within the unit (`repeated`)."""
    earlier: frozenset = field(default_factory=frozenset)
    repeated: frozenset = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.earlier or self.repeated)

    def rows(self, ids: pa.Array) -> np.ndarray:
        dup = np.zeros(len(ids), dtype=bool)
        for found, every in ((self.earlier, True), (self.repeated, False)):
            if found:
                hit = pc.is_in(ids, value_set=pa.array(sorted(found), pa.string())).to_numpy(zero_copy_only=False)
                dup |= hit if every else hit & ~first_rows(ids)
        return dup


def merge_partials(parts: list) -> dict | None:
    """One partial ({(modality, space): RunningMoments}) from several (None: none had rows), merged
    into a copy of the first (what Ray hands an actor may be read-only numpy views)."""
    acc = None
    for p in parts:
        if not p:
            continue
        if acc is None:
            acc = copy.deepcopy(p)
            continue
        for k, m in p.items():
            acc[k].merge(m)
    return acc


class RunShard:
    """One shard of a run: the ids whose fingerprint falls to it, the partials of the units whose
    key falls to it."""

    def __init__(self, store_path: str, rec: ModelRecord):
        self.checker = IdChecker(Store.open(store_path, read_only=True), rec)
        self.checker.lookup = False          # the workers looked in the store as the run found it
        self.staged: dict = {}               # {unit key: its ids of this shard}, until checked
        self.partials: dict = {}             # {unit key: statistics partial}, until taken
        self.received = 0                    # ids received (tests, benches)

    def stage(self, key: str, ids: pa.Array) -> None:
        """A worker wrote unit `key`: its ids of this shard (a retried task sends the same again)."""
        self.staged[key] = ids
        self.received += len(ids)

    def check(self, key: str) -> Duplicates:
        """Unit `key`'s ids (of this shard) that repeat an earlier row of the run (the driver calls
        this in unit order)."""
        ids = self.staged.pop(key, None)
        if ids is None or not len(ids):
            return Duplicates()
        dup, _, _ = self.checker.check(ids)
        if not dup.any():
            return Duplicates()
        first = first_rows(ids)
        earlier = ids.filter(pa.array(dup & first))           # its first row here repeats an earlier unit's
        later = ids.filter(pa.array(dup & ~first))
        repeated = pc.filter(later, pc.invert(pc.is_in(later, value_set=earlier)))
        return Duplicates(frozenset(earlier.to_pylist()), frozenset(repeated.to_pylist()))

    def committed(self) -> None:
        self.checker.committed()

    def put(self, key: str, moments: dict) -> None:
        self.partials[key] = moments

    def take(self, keys: list[str], drop: list[str] = ()) -> dict | None:
        """The merged partial of units `keys` (forgotten after); `drop`: partials not to use (a unit
        the driver redid)."""
        for key in drop:
            self.partials.pop(key, None)
        return merge_partials([self.partials.pop(key) for key in keys])

    def merge(self, *parts: dict | None) -> dict | None:
        return merge_partials(list(parts))

    def counts(self) -> dict:
        return {"received": self.received, "held": len(self.checker.seen), "staged": len(self.staged),
                "partials": len(self.partials)}
