"""A bound on the small fragments of a table, kept by compaction (long ingests and `optimize`).

Every Lance commit reads and rewrites the table's manifest, which lists every fragment, and every
reader that opens the table reads it: measured (bench/growth.py) a commit's cost grows with the
fragments already there, so a run that appends many small fragments pays a quadratic total.
`bound_fragments` keeps at most `max_fragments` fragments smaller than a full-size fragment
(`base_rows`: ~256 MiB of the table's rows) in a table: past the bound it merges every fragment
smaller than that into full-size ones. A full-size fragment is never rewritten during a run: a
row is rewritten about once (when it arrived in a small fragment), not once per tier as a
bound on all fragments would need. Measured and simulated (bench/growth.py): a bound of 256 on
all fragments rewrote each row 2.7 times over a 1.28B-row run (~57 h of serial rewriting here)
to save commits ~0.4 h; full-size fragments, never rewritten, cost a commit ~20 µs each.

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
from typing import Any, Callable

from clipsql.lazy import lance_optimize
from clipsql.store.faults import fault
from clipsql.store.ledger import commit_versions, committed_versions
from clipsql.store.store import Store

FRAGMENT_BYTES = 256 << 20       # a full-size fragment: ~this many bytes
MAX_FRAGMENTS = 256              # the default bound on small fragments per table (≈ 10 ms a commit, measured)


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


def merge_target(rows: list[int], max_fragments: int, base: int) -> int | None:
    """`base` when more than `max_fragments` of the fragments (`rows`: their row counts) are
    smaller than a full-size fragment of `base` rows, so that merging them into fragments of
    `base` rows brings the table back under the bound; None within it."""
    return base if sum(1 for r in rows if r < base) > max_fragments else None


# runs a compaction plan's tasks somewhere (an engine's workers) and returns their results:
# (table uri, the version planned from, [lance.optimize.CompactionTask]) -> [RewriteResult]
TaskRunner = Callable[[str, int, list], list]


def compact_to_bound(ds: Any, max_fragments: int, run_tasks: TaskRunner | None = None) -> dict | None:
    """Compact the Lance dataset `ds` (its latest version) to the bound; None when within it.
    Lance commits the compaction; the caller moves the ledger. `run_tasks`: the rewrite runs as
    Lance's distributed compaction, a plan whose tasks `run_tasks` executes (the Ray engine: one
    task per group of fragments, on the workers) and whose results are committed here; None: in
    this process."""
    frags = ds.get_fragments()
    rows = [f.metadata.num_rows for f in frags]
    target = merge_target(rows, max_fragments, base_rows(ds, rows))
    if target is None:
        return None
    t0 = time.perf_counter()
    info: dict = {"target_rows": target, "fragments_before": len(frags)}
    if run_tasks is None:
        m = ds.optimize.compact_files(target_rows_per_fragment=target)
    else:
        plan = lance_optimize.Compaction.plan(ds, {"target_rows_per_fragment": target})
        tasks = list(plan.tasks)
        m = lance_optimize.Compaction.commit(ds, run_tasks(ds.uri, ds.version, tasks))
        info["tasks"] = len(tasks)
    return {**info, "fragments_removed": m.fragments_removed, "fragments_added": m.fragments_added,
            "seconds": round(time.perf_counter() - t0, 3)}


def bound_fragments(st: Store, names: list[str], max_fragments: int = MAX_FRAGMENTS,
                    run_tasks: TaskRunner | None = None) -> dict[str, dict]:
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
        info = compact_to_bound(ds, max_fragments, run_tasks)
        if info is None:
            continue
        versions[name] = st.dataset(name, latest=True).version
        done[name] = info
        fault("compact:after-lance")
    if versions:
        commit_versions(st, "compact", versions)
    return done
