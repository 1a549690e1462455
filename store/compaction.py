"""A bound on the fragments of a table, kept by tiered compaction (long ingests and `optimize`).

Every Lance commit reads and rewrites the table's manifest, which lists every fragment, and every
reader that opens the table reads it: measured (bench/growth.py) a commit's cost grows faster
than linearly with the fragments already there, so a run that appends one fragment per commit
pays a quadratic total. `bound_fragments` keeps a table at most `max_fragments` fragments: past
the bound it merges every fragment smaller than a target T into fragments of T rows, T the
smallest of base·4^k (base: a ~256 MiB fragment of the table's rows) that brings the count to
half the bound. Fragments only grow, by ×4 a tier, so a row is rewritten once per tier it climbs
(a few times over a run of billions of rows), and a commit's cost stays that of a table of
`max_fragments` fragments whatever the table's size.

A compaction is a Lance version that changes no row. It runs under the writer lock and, like
every commit, becomes what readers see only by the catalog transaction that moves
`table_versions` to it (a `commits` row of kind `compact`): a kill before that transaction
leaves the ledger at the previous versions, whose files are all still there, and the next writer
restores them (Store.recover); nothing is lost. Readers holding an older version keep reading it:
the files a compaction replaces are deleted only by `clipsql optimize` once older than its
retention window.
"""
from __future__ import annotations

import time
from typing import Any

from clipsql.store.faults import fault
from clipsql.store.ledger import commit_versions, committed_versions
from clipsql.store.store import Store

FRAGMENT_BYTES = 256 << 20       # the base tier: fragments of ~this many bytes
MAX_FRAGMENTS = 256              # the default bound on fragments per table (≈ 10 ms a commit, measured)
TIER = 4                         # each tier's fragments hold this many times the rows of the one below


def base_rows(ds: Any, rows: list[int]) -> int:
    """Rows of a FRAGMENT_BYTES fragment of this table, 64k to 1M rows (an embedding table at
    d = 512 holds ~4 KiB a row: 64k rows; `samples` ~150 B: 1M rows)."""
    total = sum(rows)
    if not total:
        return 1 << 20
    frags = ds.get_fragments()
    probe = frags[-min(len(frags), 8):]          # the newest few: what is being written now
    size = sum(f.file_size_bytes or 0 for frag in probe for f in frag.data_files())
    per_row = max(1, size // max(1, sum(fr.metadata.num_rows for fr in probe)))
    return int(min(1 << 20, max(1 << 16, FRAGMENT_BYTES // per_row)))


def tier_target(rows: list[int], max_fragments: int, base: int) -> int | None:
    """The smallest T = base·TIER^k such that merging every fragment of fewer than T rows into
    fragments of T rows leaves at most max_fragments // 2 fragments; None within the bound."""
    if len(rows) <= max_fragments:
        return None
    goal, target = max(1, max_fragments // 2), base
    while True:
        small = [r for r in rows if r < target]
        after = len(rows) - len(small) + -(-sum(small) // target)
        if after <= goal or target > sum(rows):
            return target
        target *= TIER


def compact_to_bound(ds: Any, max_fragments: int) -> dict | None:
    """Compact the Lance dataset `ds` (its latest version) to the bound; None when within it.
    Lance commits the compaction; the caller moves the ledger."""
    frags = ds.get_fragments()
    rows = [f.metadata.num_rows for f in frags]
    target = tier_target(rows, max_fragments, base_rows(ds, rows))
    if target is None:
        return None
    t0 = time.perf_counter()
    m = ds.optimize.compact_files(target_rows_per_fragment=target)
    return {"target_rows": target, "fragments_before": len(frags), "fragments_removed": m.fragments_removed,
            "fragments_added": m.fragments_added, "seconds": round(time.perf_counter() - t0, 3)}


def bound_fragments(st: Store, names: list[str], max_fragments: int = MAX_FRAGMENTS) -> dict[str, dict]:
    """Writers only (under the lock, with nothing pending): compact each of the tables `names`
    that holds more than `max_fragments` fragments, then move the ledger to the compacted
    versions in one catalog transaction. Returns {table: what its compaction did}."""
    recorded = committed_versions(st)
    done: dict[str, dict] = {}
    versions: dict[str, int] = {}
    for name in names:
        if name not in recorded:
            continue
        ds = st.dataset(name, recorded[name])
        if ds.latest_version != recorded[name]:      # only a table the ledger is at the head of
            continue
        info = compact_to_bound(ds, max_fragments)
        if info is None:
            continue
        versions[name] = st.dataset(name, latest=True).version
        done[name] = info
        fault("compact:after-lance")
    if versions:
        commit_versions(st, "compact", versions)
    return done
