"""Bounds on the fragments of a table, kept by compaction (long ingests and `optimize`).

Every Lance commit reads and rewrites the table's manifest, which lists every fragment, and every
reader that opens the table reads it: measured (bench/growth.py) a commit's cost grows with the
fragments already there, so a run that appends fragments without end pays a quadratic total.
Rewriting rows costs too, so `merge_target` keeps two bounds that rewrite as little as they can:

* at most `max_fragments` (256) fragments smaller than a full-size one (`base_rows`: ~256 MiB of
  the table's rows): past it, those merge into full-size fragments. A run of small commits, or a
  Ray run (a data file per source unit), rewrites each row about once for this.
* at most `max_total` (2,048) fragments in all: past it, every fragment under T = base·4^k merges
  into fragments of T rows, T the smallest that halves the count. Rows climb a size tier at a
  time, but only in tables past ~2,048 full-size fragments (~130M rows of 512-d vectors, more with
  100k-row commits), so a commit never pays for more than 2,048 fragments.

Measured and simulated (bench/growth.py): a single bound of 256 on all fragments rewrote each row
1.4 times over a 128M-row run (as long as the ingest itself on two cores) and 2.7 times over
1.28B; with these bounds a 128M-row run of 100k-row commits rewrites nothing. The Ray engine
rewrites a compaction's tasks on its workers (engines.ingest), so only the commit is serial.

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
MAX_FRAGMENTS = 256              # the default bound on small fragments per table
MAX_TOTAL_FRAGMENTS = 2048       # and on all of a table's fragments (a commit's cost is bounded by it)
TIER = 4                         # past MAX_TOTAL_FRAGMENTS, each size tier holds this many times the rows of the one below


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


def merge_target(rows: list[int], max_fragments: int, base: int, max_total: int | None = None) -> int | None:
    """The row count T to merge every fragment under into fragments of T rows (`rows`: the
    fragments' row counts), or None within both bounds: past `max_total` fragments in all, the
    smallest T = base·4^k that halves the count; else past `max_fragments` fragments smaller than
    a full-size one of `base` rows, `base`."""
    max_total = MAX_TOTAL_FRAGMENTS if max_total is None else max_total
    if len(rows) > max_total:
        goal, target = max(1, max_total // 2), base
        while True:
            small = [r for r in rows if r < target]
            if len(rows) - len(small) + -(-sum(small) // target) <= goal or target > sum(rows):
                return target
            target *= TIER
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
