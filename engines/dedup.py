"""`clipsql dedup --engine ray`: SemDeDup's assignment and within-cluster passes as Ray tasks.

The driver does what is O(N) small (pass 1: ids, 1/‖x‖, the k-means sample; the fit; the
order of the rows by cluster) and writes the result through the very code of the local path
(`queries.curation.dedup.semdedup`, under the store's writer lock, one Lance commit); the tasks
do what reads the vectors, each from the committed version the run started from:

* assignment: one task per run of consecutive fragments (a row range of the scan order), the
  centroids put in the object store once; each task streams its fragments and assigns their
  rows with the local pass's assigner (`models.device.semdedup_assigner`: per row, whatever the
  batch), returning (labels, cos to the centroid) for its range;
* within clusters: the clusters dealt to tasks by size (largest first, each to the task with the
  least Σ n_c² so far); each task receives the sorted row positions of its clusters' members with
  their labels, cosines, id ranks and 1/‖x‖, reads those rows by `take` and runs
  `kernels.semdedup_blocks.within_clusters` on them: the members of a cluster are ordered there
  by (cos ascending, global id rank), as locally, so every value is the local pass's, bit for bit.

Every read checks that the rows at those positions carry the ids pass 1 read. Nothing here
writes: the tasks return arrays, a killed task is retried, a killed driver leaves the stored
result as it was. Memory: each task holds at most `cap` members (the `--memory-gb` budget) at once;
a task's arguments are made when it is submitted, at most IN_FLIGHT_PER_CPU per CPU at a time
(about MAX_TASK_ROWS rows each), so the object store holds a bounded share of the O(N) arrays.
"""
from __future__ import annotations

import heapq
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from clipsql.engines.engine import ray_session, worker_count
from clipsql.errors import ClipsqlError
from clipsql.kernels import semdedup as K
from clipsql.kernels import semdedup_blocks as B
from clipsql.kernels.arrays import to_numpy
from clipsql.models import device as DV
from clipsql.queries.curation.dedup import Rows
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store

TASKS_PER_CPU = 4           # tasks per CPU of the cluster (the last ones even out the stragglers)
MIN_TASK_ROWS = 256         # an assignment task takes fragments until it has at least this many rows …
MAX_TASK_ROWS = 1 << 20     # … and a task gets at most about this many (its arguments: ≈ 30–60 bytes a row)
IN_FLIGHT_PER_CPU = 2       # tasks submitted at once per CPU: the arguments in the object store stay bounded


def _rows(store_path: str, rec: ModelRecord, version: int, batch: int) -> Rows:
    return Rows(Store.open(store_path, read_only=True), rec, batch, version)


# --------------------------------------------------------------------------- assignment
def _assign_task(store_path: str, rec: ModelRecord, version: int, batch: int, fragment_ids: list[int],
                 ids: pa.Array, inv: np.ndarray, valid: np.ndarray, C32: np.ndarray, device: str | None
                 ) -> dict:
    """Worker: (labels, cos) of the rows of `fragment_ids` (consecutive: one row range of the scan
    order; `ids`, `inv`, `valid` those rows' as pass 1 read them)."""
    t0 = time.perf_counter()
    rows = _rows(store_path, rec, version, batch)
    labels = np.full(len(inv), -1, dtype=np.int64)
    cos = np.full(len(inv), np.nan)
    assign = DV.semdedup_assigner(C32, device)
    a = 0
    for fid in fragment_ids:
        for b in rows.ds.get_fragment(fid).to_batches(columns=["id", "image_embedding"], batch_size=batch):
            e = a + b.num_rows
            if not b.num_rows:
                continue
            rows.check_ids(b.column("id"), ids.slice(a, b.num_rows))
            labels[a:e], cos[a:e] = assign(to_numpy(b.column("image_embedding")), inv[a:e], valid[a:e], None)
            a = e
    if a != len(inv):
        rows.check_ids(pa.array([], pa.string()), ids)        # fewer rows than pass 1 counted
    return {"labels": labels, "cos": cos, "seconds": time.perf_counter() - t0}


def _ranges(fragments: list[tuple[int, int]], target: int) -> list[tuple[list[int], int, int]]:
    """Consecutive fragments (id, rows) packed into (fragment ids, first row, end row) of ≥ `target` rows."""
    out, cur, start, pos = [], [], 0, 0
    for fid, n in fragments:
        cur.append(fid)
        pos += n
        if pos - start >= target:
            out.append((cur, start, pos))
            cur, start = [], pos
    if cur:
        out.append((cur, start, pos))
    return out


def dedup_assign_ray(rows: Rows, C32: np.ndarray, inv: np.ndarray, valid: np.ndarray, *, device: str | None = None,
                     progress: Callable[[int], None] | None = None, address: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The Ray engine's `dedup_assign` (see the module docstring)."""
    n = len(inv)
    frags = [(f.fragment_id, f.count_rows()) for f in rows.ds.get_fragments()]
    labels = np.full(n, -1, dtype=np.int64)
    cos = np.full(n, np.nan)
    with ray_session(address) as ray:
        cpus = worker_count(ray)
        target = min(MAX_TASK_ROWS, max(MIN_TASK_ROWS, math.ceil(n / (TASKS_PER_CPU * cpus))))
        ranges = _ranges(frags, target)
        if sum(c for _, c in frags) != n:
            rows.check_ids(pa.array([], pa.string()), rows.ids)     # the fragments do not hold pass 1's rows
        task = ray.remote(max_retries=3)(_assign_task)
        c_ref = ray.put(np.ascontiguousarray(C32, dtype=np.float32))

        def submit(fids: list[int], a: int, e: int) -> Any:
            return task.remote(rows.store_path, rows.rec, rows.version, rows.batch, fids, rows.ids.slice(a, e - a),
                               inv[a:e], valid[a:e], c_ref, device)
        jobs = (((r[1], r[2]), lambda r=r: submit(*r)) for r in ranges)
        for (a, e), out in _in_flight(ray, jobs, IN_FLIGHT_PER_CPU * cpus):
            labels[a:e], cos[a:e] = out["labels"], out["cos"]
            if progress:
                progress(e - a)
    return labels, cos


# --------------------------------------------------------------------------- within clusters
def _within_task(store_path: str, rec: ModelRecord, version: int, pos: np.ndarray, ids: pa.Array, inv: np.ndarray,
                 labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray, C32: np.ndarray, full: np.ndarray,
                 grown: np.ndarray, old: np.ndarray | None, new: np.ndarray | None, cap: int, block: int,
                 device: str | None) -> dict:
    """Worker: `within_clusters` over the members of its clusters: `pos` (sorted) their row positions,
    the other arrays theirs in that order; its own rows are read by position (`take`)."""
    t0 = time.perf_counter()
    cos = np.array(cos)                     # filled in place where unknown (the object store's is read-only)
    rows = _rows(store_path, rec, version, 256)      # (no scan: takes only)

    def fetch(local: np.ndarray) -> np.ndarray:          # sorted local indices → sorted positions
        return rows.take(pos[local], ids.take(pa.array(local, pa.int64())))
    out, info = B.within_clusters(fetch, inv, labels, cos, id_rank, C32, full, cap, grown=grown, old=old, new=new,
                                  rows=block, gram=DV.semdedup_gram(device))
    return {"max_sim": out, "info": info, "seconds": time.perf_counter() - t0}


def deal_clusters(sizes: np.ndarray, clusters: np.ndarray, tasks: int) -> list[np.ndarray]:
    """`clusters` dealt to at most `tasks` sets by their cost n_c² (largest first, each to the set with
    the least cost so far); each set ascending, empty sets left out. A loop over clusters, not rows."""
    clusters = np.asarray(clusters, dtype=np.int64)
    clusters = clusters[sizes[clusters] > 0]
    tasks = max(1, min(tasks, len(clusters)))
    heap = [(0, t) for t in range(tasks)]
    sets: list[list[int]] = [[] for _ in range(tasks)]
    for c in clusters[np.argsort(-sizes[clusters], kind="stable")].tolist():
        cost, t = heapq.heappop(heap)
        sets[t].append(c)
        heapq.heappush(heap, (cost + int(sizes[c]) ** 2, t))
    return [np.sort(np.array(s, dtype=np.int64)) for s in sets if s]


def dedup_within_ray(rows: Rows, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                     C32: np.ndarray, full: np.ndarray, cap: int, *, grown: np.ndarray | None = None,
                     old: np.ndarray | None = None, new: np.ndarray | None = None, block: int = K.ROW_BLOCK,
                     device: str | None = None, progress: Callable[[int], None] | None = None,
                     address: str | None = None) -> tuple[np.ndarray, dict]:
    """The Ray engine's `dedup_within` (see the module docstring)."""
    grown = np.zeros(0, dtype=np.int64) if grown is None else np.asarray(grown, dtype=np.int64)
    full = np.asarray(full, dtype=np.int64)
    todo = np.union1d(full, grown)
    out = np.full(len(labels), np.nan)
    info = {"pairs": 0, "largest_cluster": 0, "clusters": 0, "groups": 0, "big_clusters": 0}
    live = np.flatnonzero(labels >= 0)
    order = live[np.argsort(labels[live], kind="stable")]       # the valid rows by cluster
    top = int(max(labels.max(initial=-1), todo.max(initial=-1))) + 1
    sizes = np.bincount(labels[live], minlength=top)
    starts = np.r_[0, np.cumsum(sizes)]
    if not todo.size or not order.size:
        return out, info
    with ray_session(address) as ray:
        cpus = worker_count(ray)
        task = ray.remote(max_retries=3)(_within_task)
        c_ref = ray.put(np.ascontiguousarray(C32, dtype=np.float32))
        tasks = max(TASKS_PER_CPU * cpus, math.ceil(int(sizes[todo].sum()) / MAX_TASK_ROWS))
        sets = deal_clusters(sizes, todo, tasks)
        positions: dict[int, np.ndarray] = {}

        def submit(i: int, cl: np.ndarray) -> Any:       # the set's arguments, made when it is submitted
            pos = positions[i] = np.sort(np.concatenate([order[starts[c]:starts[c + 1]] for c in cl.tolist()]))
            g = np.intersect1d(cl, grown)
            return task.remote(rows.store_path, rows.rec, rows.version, pos, rows.ids.take(pa.array(pos)), inv[pos],
                               labels[pos], cos[pos], id_rank[pos], c_ref, np.setdiff1d(cl, grown), g,
                               old[pos] if g.size else None, new[pos] if g.size else None, cap, block, device)
        jobs = ((i, lambda i=i, cl=cl: submit(i, cl)) for i, cl in enumerate(sets))
        for i, res in _in_flight(ray, jobs, IN_FLIGHT_PER_CPU * cpus):
            pos = positions.pop(i)
            out[pos] = res["max_sim"]
            for k, v in res["info"].items():
                info[k] = max(info[k], v) if k == "largest_cluster" else info[k] + v
            if progress:
                progress(len(pos))
    return out, info


def _in_flight(ray: Any, jobs: Iterator[tuple[Any, Callable[[], Any]]], limit: int) -> Iterator[tuple[Any, Any]]:
    """(key, result) of the tasks `jobs` gives as (key, submit), as they finish, with at most `limit`
    submitted and unfinished at once; a task's own one-line error (rows read by position that are
    not pass 1's) is raised as itself."""
    running: dict[Any, Any] = {}
    jobs = iter(jobs)
    more = True
    while True:
        while more and len(running) < max(1, limit):
            job = next(jobs, None)
            if job is None:
                more = False
            else:
                running[job[1]()] = job[0]
        if not running:
            return
        done, _ = ray.wait(list(running), num_returns=1)
        for r in done:
            key = running.pop(r)
            try:
                got = ray.get(r)
            except ray.exceptions.RayTaskError as e:
                if isinstance(getattr(e, "cause", None), ClipsqlError):
                    raise e.cause from None
                raise
            yield key, got
