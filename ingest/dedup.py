"""Which ids of a batch are new: O(new data) work, never a set of every stored id.

* Ids this run already added: 64-bit fingerprints in a numpy hash set (kernels/idset.py:
  O(1) expected work per id, so linear over a run; 16–32 bytes a row). A fingerprint hit is confirmed exactly — against the Arrow arrays of ids not yet
  committed, or through the store's `id` index for committed ones — so a hash collision
  never rejects a row.
* Ids recorded as deleted (`clipsql delete`): `deleted`, an `id IN (…)` lookup in the
  deletions record as the run found it (store.deletions); ingest skips them and counts them.
* Ids stored before this run: `reads.stored_ids`, an `id IN (…)` lookup through the Lance
  BTREE index on `id` (and a scan of fragments not indexed yet), in the table versions of
  the run's start — so the rows the run commits itself (not indexed yet) are never scanned
  again: a lookup costs the same at the end of a long run as at its start. Skipped when
  the store had no rows when the run started.
"""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.kernels.idset import FingerprintSet
from clipsql.lazy import duckdb
from clipsql.store import deletions
from clipsql.store.reads import stored_ids

_LOCAL = threading.local()


def fingerprints(ids: pa.Array) -> np.ndarray:
    """64-bit hashes of strings (DuckDB's hash(), vectorised)."""
    con = getattr(_LOCAL, "con", None)
    if con is None:
        con = _LOCAL.con = duckdb.connect(":memory:", config={"threads": 1})
    con.register("_clipsql_ids", pa.table({"id": ids}))
    try:
        out = con.sql("SELECT hash(id) AS h FROM _clipsql_ids").to_arrow_table()
    finally:
        con.unregister("_clipsql_ids")
    col = out.column("h")
    return col.to_numpy().astype(np.uint64, copy=False)


class IdChecker:
    """Classifies the ids of each batch: duplicate within this run, stored before it, or new."""

    def __init__(self, store, model) -> None:  # noqa: ANN001
        self.store, self.model = store, model
        samples = store.samples_table()
        self.before = (samples, store.embeddings_table(model))   # the store as the run found it
        self.lookup = bool((samples is not None and samples.count_rows()) or self.before[1].count_rows())
        self.deletions = deletions.table(store)                 # the deletions record as the run found it
        self.seen = FingerprintSet()
        self.uncommitted: list[pa.Array] = []     # ids since the last commit, as Arrow arrays

    def check(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(duplicate of an earlier row of this run, already in samples, already in the model table)."""
        n = len(ids)
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        dup = np.zeros(n, dtype=bool)
        if n == 0:
            return dup, dup.copy(), dup.copy()
        # within the batch, exactly: a row whose id occurred at a smaller index
        codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
        _, first = np.unique(codes, return_index=True)
        dup[:] = True
        dup[first] = False
        h = fingerprints(ids)
        cand = np.flatnonzero(~dup & self.seen.contains(h))
        if len(cand):
            cand_ids = ids.take(pa.array(cand))
            exact = np.zeros(len(cand), dtype=bool)
            for seen_ids in self.uncommitted:
                exact |= pc.is_in(cand_ids, value_set=seen_ids).to_numpy(zero_copy_only=False)
            rest = cand[~exact]
            if len(rest):
                _, in_emb = stored_ids(self.store, self.model, ids.take(pa.array(rest)))
                exact[~exact] = in_emb
            dup[cand[exact]] = True
        in_s = np.zeros(n, dtype=bool)
        in_e = np.zeros(n, dtype=bool)
        fresh = np.flatnonzero(~dup)
        if self.lookup and len(fresh):
            s, e = stored_ids(self.store, self.model, ids.take(pa.array(fresh)), self.before)
            in_s[fresh], in_e[fresh] = s, e
        self.seen.add(h[fresh])
        self.uncommitted.append(ids if len(fresh) == n else ids.take(pa.array(fresh)))
        return dup, in_s, in_e

    def deleted(self, ids: pa.Array) -> tuple[np.ndarray, object, object]:
        """(which ids `clipsql delete` recorded as deleted, the earliest and latest deletion time)."""
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        return deletions.lookup(self.deletions, ids)

    def committed(self) -> None:
        """The writer committed: the ids so far are in the store (found through its index)."""
        self.uncommitted.clear()
