"""`clipsql dedup`: semantic deduplication (SemDeDup, docs/science.md §10) as stored columns.

Per row of a model: `semdedup_cluster` (INT, the spherical k-means cluster of its normalized
image embedding) and `semdedup_max_sim` (DOUBLE, the largest cosine to a member of its cluster
ranked before it; farthest-from-the-centroid first, ties by id). `semdedup_max_sim > 1 − ε`
marks the removable rows, keeping one of each duplicate group; ε is chosen in SQL afterwards.
Rows without a usable image vector (NULL, all-zero, non-finite) have NULL in both.

Storage (names: store.tables): Lance table `semdedup_<model table>` (id, semdedup_cluster,
semdedup_max_sim, computed_at), its parameters in the schema metadata (key `clipsql`), and the centroids (float32)
in `semdedup_<model table>_centroids` (cluster, centroid), whose version and sha256 the main
table's metadata names. SQL: the view `semdedup` (default model). Each write is one Lance commit
of the main table (the centroids are written first, at a new version the old main table does not
name), under the store's writer lock: a kill leaves the old result or the new one.

Defaults (documented in `clipsql dedup --help`): K = round(√(valid rows)) (1,000 at 1M rows;
NeMo Curator uses ≥ 1,000 at scale); sample = min(valid rows, max(10,000, 64·K), 3,200,000)
(faiss warns below 39 rows per centroid; the cap bounds the sample's memory: 6.1 GiB at d = 512,
and is reached at K = 50,000, 2.5·10⁹ rows); seed 0; at most 20 Lloyd iterations; init
k-means++. From K = 2,048 on, the k-means steps and the assignment are two-level
(`kernels.semdedup_assign`: ~√K dot products a row on clustered data instead of K, the same
labels), so with K = √N the assignment costs ~N^1.25 rather than N^1.5 and there is no cap on K.
The k-means, the assignment and the within-cluster Gram blocks can run on a GPU (`device`,
`models.device`; the same values). The assignment of a full run and the within-cluster pass go
through the `engine` (queries.sql.engine: LOCAL runs them here; the Ray engine, engines.dedup,
as tasks over row ranges and sets of clusters; the same values); pass 1, the fit, the
incremental assignment of new rows and the write run here on either.
A re-run without options reuses the stored run's parameters: rows added since are assigned to
the stored centroids; a cluster that only gained members is updated against them
(new members: max over every earlier member; old ones: max of the stored value and the new
members ranked before them, O(n_c·new_c·d)), a cluster that lost members (deleted rows) is
recomputed — either way the values a full pass with those centroids gives, bit for bit. Other
parameters, or --refit, recompute everything (unspecified options then take the defaults of the
current pool).

Memory: the image vectors are never all in memory. Pass 1 streams the committed version's
(id, image_embedding) batches for the ids, 1/‖x‖ (validity) and the k-means sample: the valid rows
of the smallest seeded hash of their id (`kernels.sample`: independent of the storage order),
kept as float32 unit rows while streaming — no read by position; pass 2 streams the batches again
to assign every row; the within-cluster pass reads the clusters in groups of at most
budget / (16·d) members by `take` (`kernels.semdedup_blocks`; a larger cluster alone, out of
core). A full run on the local engine also writes pass 1's raw rows to local scratch disk
(`kernels.scratch`: an unlinked temporary file, where the temporary folder has room) and passes 2
and 3 read them from there — the same float32 values, without Lance's per-row cost of a take
(5 µs a row locally, ~30 µs on object storage); the page cache holds that file, not the process.
Budget: `memory_gb` / `--memory-gb`, else $CLIPSQL_DEDUP_MEMORY_GB, else 2 GiB; it never
changes a stored value. Beyond it: O(n) per-row arrays (ids, ranks, norms, labels, cos, max_sim:
≈ 90 bytes a row) and the k-means sample as float32 unit rows (4·sample·d bytes, 1.25× that while
pass 1 draws it: 0.4 GiB at 10⁷ rows with the defaults). A re-run that reuses the stored centroids
draws no sample; the incremental path takes only the new rows and the changed clusters' rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import ClipsqlError, SelectionError
from clipsql.kernels import semdedup as K
from clipsql.kernels import semdedup_assign as A
from clipsql.kernels import semdedup_blocks as B
from clipsql.kernels.arrays import fixed_list, to_numpy
from clipsql.kernels.sample import StreamSample, hash_keys
from clipsql.kernels.scratch import ScratchRows
from clipsql.kernels.semdedup import inverse_norms, removable, unit32
from clipsql.lazy import tqdm
from clipsql.models import device as DV
from clipsql.queries.sql.engine import LOCAL, Engine
from clipsql.store.faults import fault
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store
from clipsql.store.tables import centroids_table_name, dedup_table_name

META_KEY = "clipsql"
MAX_DEFAULT_SAMPLE = 3_200_000     # rows (float32 unit rows: 6.1 GiB at d = 512)
DEFAULT_ITERATIONS = 20
DEFAULT_SEED = 0
EPS_REPORTED = (0.001, 0.01, 0.05)
SCAN_BATCH = 16384          # rows per streamed batch (fewer under a small budget)
TAKE_ROWS = 4096            # rows per Lance take
DEFAULT_MEMORY_GB = 2.0
MEMORY_ENV = "CLIPSQL_DEDUP_MEMORY_GB"
PARAMS = ("clusters", "sample", "seed", "iterations", "init", "kernel", "dim")


def default_clusters(n_valid: int) -> int:
    return max(1, min(n_valid, round(math.sqrt(n_valid))))


def default_sample(n_valid: int, k: int) -> int:
    return min(n_valid, max(10_000, 64 * k), max(10_000, MAX_DEFAULT_SAMPLE))


def _schema(params: dict | None = None) -> pa.Schema:
    s = pa.schema([("id", pa.string()), ("semdedup_cluster", pa.int32()), ("semdedup_max_sim", pa.float64()),
                   ("computed_at", pa.timestamp("us", tz="UTC"))])
    return s.with_metadata({META_KEY: json.dumps(params, sort_keys=True)}) if params is not None else s


# --------------------------------------------------------------------------- reading
class Rows:
    """The image vectors of one committed version of a model's table (default: the latest), by row
    position (the scan order: Lance `take` offsets of that version), streamed or taken — never all in
    memory. `store_path`, `rec` and `version` let another process (a Ray task) open the same rows.
    `scratch`: pass 1's raw rows spilled to local scratch disk (`kernels.scratch`; a full run in this
    process, where the temporary folder has room): the later passes then read them from there, in
    scan order or by position, instead of from Lance — the same float32 values."""

    def __init__(self, st: Store, rec: ModelRecord, batch: int, version: int | None = None):
        self.ds = st.embeddings_table(rec, version)
        self.version, self.dim, self.batch = int(self.ds.version), rec.dim, batch
        self.store_path, self.rec = str(st.path), rec
        self.ids: pa.Array | None = None        # every row's id, once pass 1 has read them
        self.scratch: ScratchRows | None = None

    def __enter__(self) -> "Rows":
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop_scratch()

    def drop_scratch(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None

    @property
    def scratch_bytes(self) -> int:
        s = self._spilled()
        return 0 if s is None else s.written * s.row_bytes

    def _spilled(self) -> ScratchRows | None:
        """The scratch rows, when they hold every row pass 1 read."""
        s = self.scratch
        return s if s is not None and self.ids is not None and s.complete and s.written == len(self.ids) else None

    def scan(self, columns: tuple[str, ...] = ("image_embedding",)) -> Iterator[tuple[int, pa.RecordBatch]]:
        pos = 0
        for b in self.ds.to_batches(columns=list(columns), batch_size=self.batch, scan_in_order=True,
                                    batch_readahead=4, fragment_readahead=1):    # Lance's buffers: ≈ 0.5 GiB
            if b.num_rows:
                yield pos, b
                pos += b.num_rows

    def vectors(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, raw float32 rows) of every row in scan order: from the scratch rows when
        pass 1 spilled them, else a scan of the version."""
        s = self._spilled()
        if s is not None:
            for a in range(0, s.written, self.batch):
                yield a, s.rows(a, min(s.written, a + self.batch))
            return
        for pos, b in self.scan():
            yield pos, to_numpy(b.column("image_embedding"))

    def take(self, pos: np.ndarray, ids: pa.Array | None = None) -> np.ndarray:
        """Raw float32 rows at the sorted positions `pos`: from the scratch rows when pass 1 spilled
        them (they are pass 1's rows), else read TAKE_ROWS at a time (one large Lance take holds ≈ 3×
        its result in buffers; 4k-row takes are faster and hold ≈ 64 MiB), checking that they are
        the rows pass 1 read (`ids`: theirs, default from `self.ids`)."""
        pos = np.asarray(pos, dtype=np.int64)
        s = self._spilled()
        if s is not None:
            return s.take(pos)
        out = np.empty((len(pos), self.dim), dtype=np.float32)
        for a in range(0, len(pos), TAKE_ROWS):
            p = pos[a:a + TAKE_ROWS]
            t = self.ds.take(p, columns=["id", "image_embedding"])
            want = ids.slice(a, len(p)) if ids is not None else \
                self.ids.take(pa.array(p)) if self.ids is not None else None
            if want is not None:
                self.check_ids(t.column("id"), want)
            out[a:a + len(p)] = to_numpy(t.column("image_embedding"))
        return out

    def check_ids(self, got: pa.Array | pa.ChunkedArray, want: pa.Array) -> None:
        """The rows read are those pass 1 read at those positions, or a one-line error."""
        if len(got) != len(want) or not pc.all(pc.equal(got, want)).as_py():
            raise ClipsqlError(f"{self.ds.uri}: rows read by position do not match the scan of version "
                               f"{self.version}: run `clipsql doctor`")


def _scan_norms(rows: Rows, sampler: StreamSample | None = None, seed: int = 0, spill: bool = False
                ) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Pass 1 over the committed table: (ids, inv, valid); inv = 1/‖x‖ float64 (0 for invalid rows).
    With `sampler`, the valid rows are offered to it (key: `hash_keys(id, seed)`), as float32 unit rows.
    With `spill`, the raw rows are also written to `rows.scratch` where the temporary folder has room
    (a write that fails, a full disk, drops it: the later passes then read Lance)."""
    n = rows.ds.count_rows()
    rows.drop_scratch()
    if spill:
        rows.scratch = ScratchRows.create(n, rows.dim)
    inv, valid = np.zeros(n), np.zeros(n, dtype=bool)
    ids = []
    end = 0
    for pos, b in rows.scan(("id", "image_embedding")):
        end = pos + b.num_rows
        if end > n:
            raise ClipsqlError(f"{rows.ds.uri}: version {rows.version} has more rows than it counts: "
                               "run `clipsql doctor`")
        X = to_numpy(b.column("image_embedding"))
        inv[pos:end], valid[pos:end] = inverse_norms(X)
        if rows.scratch is not None:
            try:
                rows.scratch.append_soon(X)            # written while the next batch is read
            except OSError:
                rows.drop_scratch()
        if sampler is not None:
            ok = np.flatnonzero(valid[pos:end])
            iv = inv[pos:end]
            sampler.add(hash_keys(b.column("id"), seed)[ok], pos + ok,
                        lambda i, X=X, iv=iv, ok=ok: unit32(X, iv, ok[i]))
        ids.append(pa.concat_arrays([b.column("id")]))   # a compact copy: a slice keeps Lance's whole
        #                                                  decoded buffers (vectors included) alive
    ids_arr = pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())
    rows.ids = ids_arr
    if rows.scratch is not None:
        try:
            rows.scratch.wait()
        except OSError:
            pass                                         # a failed write: the file is short
        if rows._spilled() is None:                      # short, or fewer rows than counted: read Lance
            rows.drop_scratch()
    return ids_arr, inv[:end], valid[:end]


def _previous(st: Store, rec: ModelRecord, columns: list[str] | None = None) -> tuple[dict, pa.Table] | None:
    name = dedup_table_name(rec.table_name)
    if name not in st.table_names():
        return None
    ds = st.dataset(name, latest=True)
    raw = (ds.schema.metadata or {}).get(META_KEY.encode())
    params = json.loads(raw) if raw else {}
    return params, ds.to_table(columns=columns or ["id", "semdedup_cluster", "semdedup_max_sim", "computed_at"])


def _centroids(st: Store, rec: ModelRecord, params: dict) -> np.ndarray | None:
    """The stored centroids the result was computed with (None if missing or not matching its hash)."""
    ref = params.get("centroids") or {}
    name = centroids_table_name(rec.table_name)
    if name not in st.table_names() or "version" not in ref:
        return None
    try:
        tbl = st.dataset(name, version=int(ref["version"])).to_table().sort_by("cluster")
    except Exception:  # noqa: BLE001 - a pruned or damaged version: refit
        return None
    C = np.ascontiguousarray(to_numpy(tbl.column("centroid")), dtype=np.float32)
    return C if hashlib.sha256(C.tobytes()).hexdigest() == ref.get("sha256") else None


def _id_positions(ids: pa.Array, stored_ids: pa.Array) -> np.ndarray:
    """For each of `ids`: its row in `stored_ids`, or -1."""
    idx = pc.index_in(ids, value_set=stored_ids)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class DedupStatus:
    """What is stored for a model: rows, rows with a value, pending (added since), stale (deleted since)."""
    model: str
    table: str
    rows: int
    stored: int
    pending: int
    stale: int
    params: dict[str, Any] | None         # the stored run's parameters (None: never computed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DedupFit:
    """The k-means fit a run's centroids come from: Lloyd iterations run (and whether they
    converged) on a sample of `pool` valid rows of the `rows` at `data_version`."""
    iterations_run: int | None = None
    converged: bool | None = None
    pool: int | None = None
    rows: int | None = None
    data_version: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DedupFit | None:
        return None if d is None else cls(**{f: d.get(f) for f in cls.__dataclass_fields__})


@dataclass
class DedupReport:
    """What a `semdedup` run did: `mode` full (k-means fitted), incremental (new rows assigned to the
    stored centroids, changed clusters recomputed) or current (nothing to do); the parameters used;
    `removable` rows per ε (as text) with semdedup_max_sim > 1 − ε; seconds and per-stage timings.
    A run that wrote the table also reports how the within-cluster pass was grouped
    (`largest_cluster`, `pairs`, `groups`, `big_clusters`, `memory_budget_mib`, `group_rows`), and
    `scratch_mib`: the raw rows a full run spilled to local scratch disk for its later passes (0: it
    read them from Lance again: no room in the temporary folder, or another engine; None: not a full run)."""
    model: str
    table: str
    mode: str
    rows: int
    valid: int
    clusters: int
    sample: int
    seed: int
    iterations: int
    init: str
    fit: DedupFit | None
    removable: dict[str, int]
    seconds: float
    timings: dict[str, float]
    pending_before: int
    new_rows: int
    removed_rows: int
    recomputed: int
    largest_cluster: int | None = None
    pairs: int | None = None
    groups: int | None = None
    big_clusters: int | None = None
    memory_budget_mib: float | None = None
    group_rows: int | None = None
    scratch_mib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready dict (the fit as stored; the grouping keys only when present)."""
        out = asdict(self)
        fit = out.pop("fit")
        out = {**{k: out[k] for k in ("model", "table", "mode", "rows", "valid", "clusters", "sample", "seed",
                                      "iterations", "init")}, "fit": fit, **out}
        return {k: v for k, v in out.items() if v is not None or k == "fit"}


def dedup_status(st: Store, model: str | None = None) -> DedupStatus:
    """What is stored for a model (see DedupStatus)."""
    rec = st.model(model)
    ids = st.embeddings_table(rec).to_table(columns=["id"]).column("id").combine_chunks()
    prev = _previous(st, rec, ["id"])
    table = dedup_table_name(rec.table_name)
    if prev is None:
        return DedupStatus(rec.model_id, table, len(ids), stored=0, pending=len(ids), stale=0, params=None)
    params, tbl = prev
    stored = tbl.column("id").combine_chunks()
    have = int(pc.sum(pc.is_in(ids, value_set=stored)).as_py() or 0)
    stale = len(stored) - int(pc.sum(pc.is_in(stored, value_set=ids)).as_py() or 0)
    return DedupStatus(rec.model_id, table, len(ids), stored=have, pending=len(ids) - have, stale=stale,
                       params=params)


# --------------------------------------------------------------------------- computing
def _check(name: str, value: int | None, low: int = 1) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < low):
        raise SelectionError(f"`{name}` must be an integer ≥ {low}; got {value}", param=name)


def memory_budget(memory_gb: float | None = None) -> float:
    """Bytes the within-cluster pass may hold: `memory_gb` (GiB), else $CLIPSQL_DEDUP_MEMORY_GB, else 2."""
    raw = memory_gb if memory_gb is not None else os.environ.get(MEMORY_ENV)
    try:
        gb = DEFAULT_MEMORY_GB if raw is None else float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        src = "`memory_gb`" if memory_gb is not None else MEMORY_ENV
        raise SelectionError(f"{src} must be a number of GiB > 0; got {raw!r}",
                             param="memory_gb" if memory_gb is not None else None)
    return gb * 2.0 ** 30


def semdedup(st: Store, model: str | None = None, *, clusters: int | None = None, sample: int | None = None,
             seed: int | None = None, iterations: int | None = None, refit: bool = False, progress: bool = False,
             chunk: int | None = None, memory_gb: float | None = None,
             device: str | None = None, engine: Engine = LOCAL) -> DedupReport:
    """Compute (or bring up to date) the model's SemDeDup columns; see the module docstring.
    `device`: where the k-means steps, the assignment and the within-cluster Gram blocks run
    (`models.device`: numpy, auto, cpu, cuda[:N]; default $CLIPSQL_DEVICE, else numpy); the stored
    values are the same on every device. `engine`: where the assignment of a full run and the
    within-cluster pass run (`queries.sql.engine`: LOCAL, this process; the Ray engine: tasks over
    row ranges and over sets of clusters); the stored values are the same on every engine."""
    _check("clusters", clusters)
    _check("sample", sample)
    _check("iterations", iterations)
    _check("seed", seed, 0)
    budget = memory_budget(memory_gb)
    DV.resolve(device)                      # an unknown device: one line, before any work
    rec = st.model(model)
    cap = B.cap_rows(budget, rec.dim)
    block = chunk or K.ROW_BLOCK
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with st.lock(), engine.session(), Rows(st, rec, max(256, min(SCAN_BATCH, cap))) as reader:
        prev = _previous(st, rec)
        old = prev[0] if prev is not None and not refit else {}
        # the parameters as far as they are known before pass 1 (the pool size taken as every row:
        # the defaults only grow with it); a run that will reuse the stored centroids draws no sample
        rows_now = reader.ds.count_rows()
        plan = _params(rec, old, clusters, sample, seed, iterations, rows_now)
        C32 = _centroids(st, rec, old) if old and all(old.get(p) == plan[p] for p in PARAMS) else None
        sampler = None if C32 is not None else StreamSample(max(1, min(plan["sample"], rows_now)), rec.dim)
        # pass 1: ids, norms, validity, sample; a full run here spills the rows for passes 2 and 3
        ids, inv, valid = _scan_norms(reader, sampler, plan["seed"], spill=sampler is not None and engine.in_process)
        version, n = reader.version, len(ids)
        if n == 0:
            raise SelectionError(f"model {rec.model_id} has no rows yet: ingest data first "
                                 "(`clipsql ingest STORE SOURCE --model …`)")
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise SelectionError(f"none of the {n} rows of {rec.model_id} has a usable image embedding "
                                 "(all NULL, zero or non-finite): nothing to deduplicate")
        timings["load_s"] = time.perf_counter() - t0
        params = _params(rec, old, clusters, sample, seed, iterations, n_valid)
        k = params["clusters"]
        if k > n_valid:
            raise SelectionError(f"`clusters` {k} is more than the {n_valid} rows of {rec.model_id} with a usable "
                                 "image embedding: choose K ≤ the pool" + (" (or `refit`)" if old else ""),
                                 param="clusters")
        if not k <= params["sample"] <= n_valid:
            raise SelectionError(f"`sample` must be between `clusters` ({k}) and the {n_valid} rows with a usable "
                                 f"image embedding; got {params['sample']}", param="sample")
        if C32 is not None and any(plan[p] != params[p] for p in PARAMS):
            raise ClipsqlError(f"{reader.ds.uri}: the table changed during the run: run `clipsql dedup` again")
        perm = pc.sort_indices(ids).to_numpy()
        id_rank = np.empty(n, dtype=np.int64)
        id_rank[perm] = np.arange(n)
        now = int(time.time() * 1e6)
        bar = _bar(progress, f"semdedup [{rec.model_id}]")
        pos = None if prev is None else _id_positions(ids, prev[1].column("id").combine_chunks())
        pending_before = n if pos is None else int((pos < 0).sum())
        cos = np.full(n, np.nan)
        scratch_mib = None
        if C32 is not None:                               # incremental: assign new rows to the stored centroids
            stored = prev[1]
            have = pos >= 0
            labels = np.full(n, -1, dtype=np.int64)
            old_lab = stored.column("semdedup_cluster").fill_null(-1).to_numpy(zero_copy_only=False)
            labels[have] = old_lab[pos[have]]
            max_sim = np.full(n, np.nan)
            old_ms = stored.column("semdedup_max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
            max_sim[have] = old_ms[pos[have]]
            computed = np.full(n, now, dtype=np.int64)
            computed[have] = stored.column("computed_at").cast(pa.int64()).to_numpy(zero_copy_only=False)[pos[have]]
            gone = ~pc.is_in(stored.column("id"), value_set=ids).to_numpy(zero_copy_only=False)
            del stored, pos, prev
            new_rows = np.flatnonzero(~have)
            if not new_rows.size and not gone.any():
                bar.close()
                return _report(rec, params, old, "current", n, n_valid, max_sim, t0, timings, pending_before=0,
                               new_rows=0, removed_rows=0, recomputed=0)
            t1 = time.perf_counter()
            bar.reset(total=len(new_rows))
            bar.set_description(f"semdedup [{rec.model_id}]: assign new rows")
            assign = DV.semdedup_assigner(C32, device)        # flat, two-level or a device's: same labels
            for a in range(0, len(new_rows), cap):            # taken in chunks of the budget
                r = new_rows[a:a + cap]
                labels[r], cos[r] = assign(reader.take(r), inv[r], valid[r], bar.update)
            timings["assign_s"] = time.perf_counter() - t1
            shrunk = np.unique(old_lab[gone])
            shrunk = shrunk[shrunk >= 0]                  # lost members: recompute those clusters in full
            grown = np.setdiff1d(np.unique(labels[new_rows]), shrunk)
            grown = grown[grown >= 0]                     # only gained: update against the new members
            affected = np.union1d(shrunk, grown)
            t1 = time.perf_counter()
            bar.reset(total=int(np.isin(labels, affected).sum()))
            bar.set_description(f"semdedup [{rec.model_id}]: within clusters")
            part, pinfo = engine.dedup_within(reader, inv, labels, cos, id_rank, C32, shrunk, cap, grown=grown,
                                              old=max_sim, new=~have, block=block, device=device,
                                              progress=bar.update)
            rows = np.flatnonzero(np.isin(labels, affected))
            max_sim[rows] = part[rows]
            computed[rows] = now
            timings["pairs_s"] = time.perf_counter() - t1
            mode = "incremental"
            fit, cent = old["fit"], old["centroids"]
            extra = {"new_rows": int(len(new_rows)), "removed_rows": int(gone.sum()), "recomputed": int(len(affected))}
        else:                                             # a full run: fit, assign all, every cluster
            rng = np.random.default_rng(params["seed"])
            t1 = time.perf_counter()
            S, U = sampler.take(params["sample"], id_rank)     # drawn in pass 1: valid rows in id order
            del sampler
            bar.reset(total=params["iterations"])
            bar.set_description(f"semdedup [{rec.model_id}]: k-means (K={k}, sample {params['sample']})")
            label = DV.semdedup_fit_label(device)
            C32, info = K.fit_units(U, k, rng, params["iterations"], progress=bar.update, label=label) if label \
                else A.fit_units(U, k, rng, params["iterations"], progress=bar.update, threads=None)
            del U, S
            timings["fit_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            bar.reset(total=n)
            bar.set_description(f"semdedup [{rec.model_id}]: assign")
            labels, cos = engine.dedup_assign(reader, C32, inv, valid, device=device,   # pass 2: every row
                                              progress=bar.update)                      # to its centroid
            timings["assign_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            bar.reset(total=n_valid)
            bar.set_description(f"semdedup [{rec.model_id}]: within clusters")
            max_sim, pinfo = engine.dedup_within(reader, inv, labels, cos, id_rank, C32, np.arange(k), cap,
                                                 block=block, device=device, progress=bar.update)
            timings["pairs_s"] = time.perf_counter() - t1
            scratch_mib = round(reader.scratch_bytes / 2 ** 20, 1)
            reader.drop_scratch()
            computed = np.full(n, now, dtype=np.int64)
            mode = "full"
            fit = {**info, "pool": n_valid, "rows": n, "data_version": version}
            cent = _write_centroids(st, rec, C32)
            extra = {"new_rows": n, "removed_rows": 0, "recomputed": int(k)}
        bar.close()
        del cos, inv, valid, perm, id_rank
        fault("dedup:before-write")
        t1 = time.perf_counter()
        meta = {**params, "fit": fit, "centroids": cent, "data_version": version, "rows": n, "valid": n_valid,
                "order": "cos to centroid ascending (farthest first), ties by id ascending",
                "assignment": "max cosine, ties to the lowest cluster", "last_run": {"mode": mode, **extra,
                                                                                     "pairs": pinfo["pairs"]}}
        tbl = pa.table({"id": ids, "semdedup_cluster": pa.array(labels.astype(np.int32), mask=labels < 0),
                        "semdedup_max_sim": pa.array(max_sim, pa.float64(), mask=~np.isfinite(max_sim)),
                        "computed_at": pa.array(computed, pa.int64()).cast(pa.timestamp("us", tz="UTC"))},
                       schema=_schema(meta))
        st.db.create_table(dedup_table_name(rec.table_name), data=tbl, mode="overwrite")
        timings["write_s"] = time.perf_counter() - t1
    return _report(rec, params, meta, mode, n, n_valid, max_sim, t0, timings, pending_before=pending_before,
                   largest_cluster=pinfo["largest_cluster"], pairs=pinfo["pairs"], groups=pinfo["groups"],
                   big_clusters=pinfo["big_clusters"], memory_budget_mib=round(budget / 2 ** 20, 1),
                   group_rows=cap, scratch_mib=scratch_mib, **extra)


def _params(rec: ModelRecord, old: dict, clusters: int | None, sample: int | None, seed: int | None,
            iterations: int | None, n_valid: int) -> dict:
    """The run's parameters: the options, else the stored run's (`old`), else the defaults for `n_valid`."""
    k = clusters if clusters is not None else old.get("clusters") or default_clusters(n_valid)
    m = sample if sample is not None else old.get("sample") or default_sample(n_valid, k)
    return {"clusters": int(k), "sample": int(m),
            "seed": int(seed if seed is not None else old.get("seed", DEFAULT_SEED)),
            "iterations": int(iterations or old.get("iterations") or DEFAULT_ITERATIONS),
            "init": K.INIT, "kernel": K.KERNEL_VERSION, "dim": rec.dim}


def _write_centroids(st: Store, rec: ModelRecord, C32: np.ndarray) -> dict:
    C32 = np.ascontiguousarray(C32, dtype=np.float32)
    name = centroids_table_name(rec.table_name)
    st.db.create_table(name, data=pa.table({"cluster": pa.array(np.arange(len(C32), dtype=np.int32)),
                                            "centroid": fixed_list(C32, C32.shape[1])}), mode="overwrite")
    return {"table": name, "version": int(st.dataset(name, latest=True).version),
            "sha256": hashlib.sha256(C32.tobytes()).hexdigest()}


def _report(rec: ModelRecord, params: dict, meta: dict, mode: str, n: int, n_valid: int, max_sim: np.ndarray,
            t0: float, timings: dict, **extra: Any) -> DedupReport:
    return DedupReport(
        model=rec.model_id, table=dedup_table_name(rec.table_name), mode=mode, rows=n, valid=n_valid,
        **{p: params[p] for p in ("clusters", "sample", "seed", "iterations", "init")},
        fit=DedupFit.from_dict(meta.get("fit")),
        removable={str(e): int(removable(max_sim, e).sum()) for e in EPS_REPORTED},
        seconds=round(time.perf_counter() - t0, 3), timings={k: round(v, 3) for k, v in timings.items()}, **extra)


def _bar(enabled: bool, desc: str) -> Any:
    return tqdm.tqdm(desc=desc, unit="rows", disable=not enabled, dynamic_ncols=True, mininterval=0.5)
