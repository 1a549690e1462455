"""`clipsql optimize`: compact small fragments, build or refresh the `id` indexes, prune old versions.

Compaction merges fragments smaller than ~256 MiB (64k rows of a d = 512 embedding table,
which is what one ingest unit writes, so a precomputed ingest leaves nothing to merge)
into fragments of that size; the rewritten data stays on disk until pruned. Runs under
the writer lock. Each table's compaction and index commits are Lance versions
that change no row; the catalog's `table_versions` moves to them in one transaction (a
`commits` row of kind `optimize`) before anything is pruned, so

* a query running meanwhile keeps reading the version it opened (pruning keeps every
  version younger than the retention window, default 24 h);
* a SIGKILL before that transaction leaves the ledger at the old versions, whose files
  are all still there: the next writer restores them (ledger.recover) and nothing is lost;
* versions a fit was computed on are tagged (`fit-<id>`) and never pruned;
* the tables `models rm` let go are deleted once older than the same retention (store.drops).
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.compaction import MAX_FRAGMENTS, compact_to_bound
from clipsql.store.drops import DEFAULT_RETENTION_HOURS, sweep_dropped_tables
from clipsql.store.faults import fault
from clipsql.store.ledger import commit_versions, recover, versioned_tables
from clipsql.store.location import table_created
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store
from clipsql.store.tables import SAMPLES

FRAGMENT_BYTES = 256 << 20       # compaction merges fragments smaller than this into ones of this size
INDEX_MIN_ROWS = 10_000          # below this a scan is as fast as the index
AUTO_FRAGMENTS = 64              # ingest compacts when a table has more *small* fragments than this
AUTO_UNINDEXED_SHARE = 0.25      # … or refreshes the index when this share of rows is not in it


def _tables(st: Store) -> list[str]:
    return versioned_tables(st)


def _unindexed(ds: Any) -> int | None:
    """Rows the `id` index does not cover (None: there is no index)."""
    for idx in ds.describe_indices():
        if list(idx.field_names) == ["id"]:
            return int(ds.stats.index_stats(idx.name)["num_unindexed_rows"])
    return None


def _stale_vector_indexes(ds: Any) -> int:
    """Rows not yet in the vector indexes (`clipsql index`) of the table: their largest count."""
    worst = 0
    for idx in ds.describe_indices():
        if list(idx.field_names) != ["id"]:
            try:
                worst = max(worst, int(ds.stats.index_stats(idx.name)["num_unindexed_rows"]))
            except Exception:  # noqa: BLE001 - an index kind without stats: leave it to Lance
                continue
    return worst


def target_rows(ds: Any) -> int:
    """Rows per compacted fragment: FRAGMENT_BYTES of this table's rows, 64k to 1M rows (an
    embedding table at d = 512 holds ~4 KiB a row: 64k rows; `samples` ~150 B: 1M rows)."""
    rows = ds.count_rows()
    if not rows:
        return 1 << 20
    size = sum(f.file_size_bytes or 0 for frag in ds.get_fragments() for f in frag.data_files())
    per_row = max(1, size // rows)
    return int(min(1 << 20, max(1 << 16, FRAGMENT_BYTES // per_row)))


def small_fragments(ds: Any, target: int | None = None) -> int:
    """Fragments with fewer than half the target rows (what compaction would merge)."""
    t = target or target_rows(ds)
    return sum(1 for f in ds.get_fragments() if f.count_rows() < t // 2)


def _tag_fit_versions(st: Store, ds: Any, name: str) -> int:
    """Tag the versions fits were computed on (tags are never pruned)."""
    models = {m.table_name: m for m in st.list_models()}
    rec: ModelRecord | None = models.get(name)
    if rec is None:
        return 0
    existing = set(ds.tags.list())
    n = 0
    with st.engine.connect() as conn:
        rows = conn.execute(sa.select(cat.fits.c.fit_id, cat.fits.c.options).where(
            cat.fits.c.model_id == rec.model_id)).fetchall()
    have = {v["version"] for v in ds.versions()}
    for fit_id, options in rows:
        version = json.loads(options).get("data_version")
        tag = f"fit-{fit_id}"
        if version in have and tag not in existing:
            ds.tags.create(tag, int(version))
            n += 1
    return n


@dataclass
class TableMaintenance:
    """What maintenance did to one table (None: that step did not run or had nothing to do):
    fragments and version before, the compaction (`fragments_removed` / `fragments_added`), the
    id index (`index`: built or refreshed), a vector index of `clipsql index` refreshed
    (`vector_index`) or left missing `vector_index_stale` rows, fragments after, and the pruning
    (`versions_pruned`, `bytes_pruned`, `versions_tagged` for fits, `versions` kept)."""
    fragments_before: int | None = None
    version_before: int | None = None
    fragments_removed: int | None = None
    fragments_added: int | None = None
    tiered: dict[str, Any] | None = None
    compact_seconds: float | None = None
    index: str | None = None
    vector_index_stale: int | None = None
    vector_index: str | None = None
    index_seconds: float | None = None
    fragments: int | None = None
    versions_pruned: int | None = None
    bytes_pruned: int | None = None
    versions_tagged: int | None = None
    versions: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: the steps that ran, in the order they ran."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class OptimizeReport:
    """Maintenance per table; `dropped_tables` swept (when pruning ran) and `seconds` (when
    `optimize` ran, not for an ingest's report of stale vector indexes only)."""
    tables: dict[str, TableMaintenance] = field(default_factory=dict)
    dropped_tables: list[str] | None = None
    seconds: float | None = None
    during_run: list[dict[str, Any]] | None = None   # compactions an ingest made to keep the fragment bound

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `clipsql optimize --format json` prints and an ingest run records."""
        out: dict[str, Any] = {"tables": {name: t.as_dict() for name, t in self.tables.items()}}
        if self.dropped_tables is not None:
            out["dropped_tables"] = self.dropped_tables
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.during_run is not None:
            out["during_run"] = self.during_run
        return out


def optimize(st: Store, *, compact: bool = True, index: bool = True, prune: bool = True,
             retention_hours: float = DEFAULT_RETENTION_HOURS, locked: bool = False,
             vector_index: bool = True, max_fragments: int = MAX_FRAGMENTS) -> OptimizeReport:
    """Compact, index and prune every table of the store; returns a report per table.
    `vector_index=False` leaves the vector indexes of `clipsql index` as they are (their refresh
    can take minutes) and reports the rows each does not cover as `vector_index_stale`.
    Compaction also brings a table of more than `max_fragments` small fragments (or of more than
    2,048 in all) back under the bounds (store.compaction, which says how little it rewrites)."""
    if locked:
        return _optimize(st, compact, index, prune, retention_hours, vector_index, max_fragments)
    with st.lock():
        return _optimize(st, compact, index, prune, retention_hours, vector_index, max_fragments)


def _optimize(st: Store, compact: bool, index: bool, prune: bool, retention_hours: float,
              vector_index: bool = True, max_fragments: int = MAX_FRAGMENTS) -> OptimizeReport:
    t_start = time.perf_counter()
    recover(st)
    report = OptimizeReport()
    new_versions: dict[str, int] = {}
    for name in _tables(st):
        ds = st.dataset(name, latest=True)
        info = TableMaintenance(fragments_before=len(ds.get_fragments()), version_before=ds.version)
        t0 = time.perf_counter()
        target = target_rows(ds)
        if compact and small_fragments(ds, target) > 1:
            m = ds.optimize.compact_files(target_rows_per_fragment=target)
            info.fragments_removed, info.fragments_added = m.fragments_removed, m.fragments_added
            ds = st.dataset(name, latest=True)
            fault("optimize:after-compact")
        if compact and (tiered := compact_to_bound(ds, max_fragments)) is not None:   # a table past the bound
            info.tiered = tiered
            ds = st.dataset(name, latest=True)
            fault("optimize:after-compact")
        info.compact_seconds = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        if index and ds.count_rows() >= INDEX_MIN_ROWS:
            unindexed = _unindexed(ds)
            if unindexed is None:
                ds.create_scalar_index("id", "BTREE")
                info.index = "built"
            elif unindexed:
                ds.optimize.optimize_indices()
                info.index = f"refreshed ({unindexed} rows added)"
            ds = st.dataset(name, latest=True)
        added = _stale_vector_indexes(ds)
        if added and not (index and vector_index):
            info.vector_index_stale = added
        elif added:                                      # a vector index of `clipsql index`, any size
            ds.optimize.optimize_indices()
            info.vector_index = f"refreshed ({added} rows added)"
            ds = st.dataset(name, latest=True)
        info.index_seconds = round(time.perf_counter() - t0, 3)
        info.fragments = len(ds.get_fragments())
        if ds.version != info.version_before:
            new_versions[name] = ds.version
        report.tables[name] = info
    if new_versions:
        commit_versions(st, "optimize", new_versions)
    fault("optimize:before-prune")
    if prune:
        older = _dt.timedelta(hours=max(0.0, float(retention_hours)))
        for name in _tables(st):
            ds = st.dataset(name, latest=True)
            tagged = _tag_fit_versions(st, ds, name)
            stats = ds.cleanup_old_versions(older_than=older, error_if_tagged_old_versions=False)
            info = report.tables[name]
            info.versions_pruned = int(stats.old_versions)
            info.bytes_pruned = int(stats.bytes_removed)
            info.versions_tagged = tagged
            info.versions = len(ds.versions())
        # tables a `models rm` let go, kept as long as the versions a reader may still hold
        report.dropped_tables = sweep_dropped_tables(st, retention_hours)
    report.seconds = round(time.perf_counter() - t_start, 3)
    return report


def maintain_after_ingest(st: Store, rec: ModelRecord) -> OptimizeReport | None:
    """What ingest runs (under its lock) when a threshold is crossed: many fragments, or many rows
    outside the id index. Returns None when nothing was due and no vector index misses rows.

    A vector index (`clipsql index`) is never refreshed here: on a large table that takes minutes
    (Lance re-reads the new rows and rewrites the partitions), which an ingest must not spend
    without saying so. The report says how many rows it misses instead (`vector_index_stale`);
    `nearest` still finds them (Lance scans the rows an index does not cover), more slowly, until
    `clipsql optimize` folds them in."""
    compact = index = False
    stale: dict[str, int] = {}
    for name in (SAMPLES, rec.table_name):
        if not table_created(st.table_uri(name)):
            continue
        ds = st.dataset(name)
        rows = ds.count_rows()
        unindexed = _unindexed(ds)
        compact |= small_fragments(ds) > AUTO_FRAGMENTS or len(ds.get_fragments()) > MAX_FRAGMENTS
        index |= rows >= INDEX_MIN_ROWS and (unindexed is None or unindexed > AUTO_UNINDEXED_SHARE * rows)
        if name == rec.table_name and (added := _stale_vector_indexes(ds)):
            stale[name] = added
    if not (compact or index):
        return OptimizeReport({n: TableMaintenance(vector_index_stale=a) for n, a in stale.items()}) if stale else None
    # no pruning here: the versions a compaction replaces stay until `clipsql optimize` (retention)
    return optimize(st, compact=compact, index=index, prune=False, locked=True, vector_index=False)
