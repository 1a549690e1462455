"""Target sets for NormSim (docs/science.md §6): their storage, and scoring against them.

A target is a named set of image embeddings F_t of one model (e.g. the training
images of the downstream tasks a user cares about). Storage, split by size:

* the N_t normalized rows (float32) go to a Lance table (store.tables.target_table_name):
  they grow with N_t (a 1M-row ViT-L target is 3 GB, too large for a catalog blob),
  they are read in chunks by `norm_sim_inf`, and LanceDB can index them for
  nearest-neighbour search;
* the uncentred second moment S = F_tᵀF_t (d×d float64, what `norm_sim_2` needs,
  computed once from the float64-normalized rows) and the metadata (name, model,
  N_t, source, options, index recall) go to the catalog table `targets`
  (migration 3), so they are versioned with the rest of the statistics.

`TargetScorer` is what the SQL functions `norm_sim_2` / `norm_sim_inf` call. `norm_sim_inf`
is exact by default: max |⟨f_t, x̂⟩| over target chunks of `TARGET_CHUNK` rows (memory
O(chunk·d) per batch). A target built with an IVF_FLAT cosine index (queries.curation.targets
builds them) is scored through it: the nearest row to x̂ and to −x̂ (max |cos| = the larger of
the two cosines, recomputed in float64 from the returned vectors), at the recorded nprobes.
"""
from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import CatalogDamaged, TargetError
from clipsql.kernels import scores
from clipsql.kernels.arrays import to_numpy
from clipsql.store import catalog as cat
from clipsql.store.drops import mark_for_drop, sweep_dropped_tables
from clipsql.store.store import Store

TARGET_CHUNK = 16_384


@dataclass(frozen=True)
class Target:
    name: str
    model_id: str
    dim: int
    n: int
    table_name: str
    source: str
    created_at: float
    options: dict
    second_moment: np.ndarray

    @property
    def ann(self) -> dict | None:
        return self.options.get("index")

    def summary(self) -> TargetSummary:
        idx = self.ann
        return TargetSummary(
            name=self.name, model=self.model_id, n=self.n, dim=self.dim, source=self.source,
            created_at=_dt.datetime.fromtimestamp(self.created_at, _dt.timezone.utc).isoformat(timespec="seconds"),
            dropped_rows=self.options.get("dropped_rows", 0), index="ann" if idx else "exact",
            recall_at_1=idx["recall_at_1"] if idx else None, nprobes=idx["nprobes"] if idx else None)


@dataclass(frozen=True)
class TargetSummary:
    """A target as `target add` / `target rm` report it and a selection's sidecar records it: `n`
    rows of `model` (`dropped_rows` invalid ones left out), `index` exact or ann (with its measured
    `recall_at_1` and `nprobes`), `created_at` ISO-8601 UTC; `seconds` the time an add took."""
    name: str
    model: str
    n: int
    dim: int
    source: str
    created_at: str
    dropped_rows: int
    index: str
    recall_at_1: float | None
    nprobes: int | None
    seconds: float | None = None

    def with_seconds(self, seconds: float) -> TargetSummary:
        return replace(self, seconds=seconds)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (a selection's sidecar): `seconds` only when timed."""
        out = asdict(self)
        if self.seconds is None:
            del out["seconds"]
        return out


def get_target(st: Store, name: str) -> Target:
    """The target called `name`; TargetError listing the known ones if there is none."""
    with st.engine.connect() as conn:
        row = conn.execute(sa.select(cat.targets).where(cat.targets.c.name == name)).first()
    if row is None:
        raise unknown_target(name, [t.name for t in list_targets(st)])
    return target_from_row(row, st.path)


def unknown_target(name: str, known: list[str]) -> TargetError:
    return TargetError(f"unknown target {name!r} (known targets: {', '.join(known) or 'none yet'}); add one with "
                       f"`clipsql target add STORE {name} --query \"SELECT image_embedding FROM …\"` "
                       "or `clipsql target add STORE NAME SOURCE --model M`")


def target_from_row(row: Any, path: Any = "STORE") -> Target:
    """A `targets` catalog row as a Target (`path`: the store's, for the repair hint); CatalogDamaged
    when its stored moment or options cannot be read."""
    m = row._mapping
    name = m["name"]
    try:
        moment = cat.unpack(m["second_moment"], f"the second moment of target {name!r}")
        options = json.loads(m["options"])
    except (CatalogDamaged, TypeError, ValueError) as e:
        detail = e if isinstance(e, CatalogDamaged) else cat.damaged_value(f"the options of target {name!r}", e)
        raise CatalogDamaged(f"{detail}: run `clipsql doctor {path} --repair` (recomputes it from the target's "
                             f"rows), or re-add it with `clipsql target add {path} {name} --replace …`") from None
    return Target(m["name"], m["model_id"], int(m["dim"]), int(m["n"]), m["table_name"], m["source"],
                  float(m["created_at"]), options, moment)


@dataclass(frozen=True)
class TargetListing:
    """A row of `clipsql target list`: `n` rows of `dim` of `model` from `source`, created at
    `created_at` (seconds since the epoch), `dropped_rows` invalid ones left out, `index` exact or
    ann (with its measured `recall_at_1`)."""
    name: str
    dim: int
    n: int
    source: str
    created_at: float
    model: str
    dropped_rows: int
    index: str
    recall_at_1: float | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `clipsql target list --format json` prints."""
        return asdict(self)


def list_targets(st: Store) -> list[TargetListing]:
    cols = [c for c in cat.targets.c if c.name != "second_moment"]
    with st.engine.connect() as conn:
        rows = conn.execute(sa.select(*cols).order_by(cat.targets.c.name)).fetchall()
    out = []
    for r in rows:
        m = r._mapping
        opts = json.loads(m["options"])
        idx = opts.get("index")
        out.append(TargetListing(name=m["name"], dim=m["dim"], n=m["n"], source=m["source"],
                                 created_at=m["created_at"], model=m["model_id"],
                                 dropped_rows=opts.get("dropped_rows", 0), index="ann" if idx else "exact",
                                 recall_at_1=idx["recall_at_1"] if idx else None))
    return out


def remove_target(st: Store, name: str) -> TargetSummary:
    with st.lock():
        t = get_target(st, name)
        with st.engine.begin() as conn:
            conn.execute(sa.delete(cat.targets).where(cat.targets.c.name == name))
            mark_for_drop(conn, t.table_name, f"target {name}")
        sweep_dropped_tables(st)
    return t.summary()


def target_rows(st: Store, t: Target) -> np.ndarray:
    """(N_t, d) float32 normalized target rows, in insertion order."""
    ds = st.db.open_table(t.table_name).to_lance()
    tbl = ds.to_table(columns=["row", "vector"])
    tbl = tbl.take(pa.compute.sort_indices(tbl.column("row")))
    return to_numpy(tbl.column("vector"))


class TargetScorer:
    """A loaded target: second moment, lazily loaded rows (exact) or the Lance index (ann).
    DuckDB scores batches on several threads: the lazy loads run once, under a lock."""

    def __init__(self, st: Store, t: Target):
        self.st, self.t = st, t
        self._rows: list[np.ndarray] | None = None
        self._table = None
        self._lock = threading.Lock()

    def norm_sim_2(self, X: np.ndarray) -> np.ndarray:
        return scores.norm_sim_2(X, self.t.second_moment)

    def norm_sim_inf(self, X: np.ndarray) -> np.ndarray:
        if self.t.ann:
            return self.norm_sim_inf_ann(X, self.t.ann["nprobes"])
        return self.norm_sim_inf_exact(X)

    def chunks(self) -> list[np.ndarray]:
        with self._lock:
            if self._rows is None:
                R = target_rows(self.st, self.t)
                self._rows = [R[s] for s in scores._spans(len(R), TARGET_CHUNK)]
        return self._rows

    def norm_sim_inf_exact(self, X: np.ndarray) -> np.ndarray:
        """max over target chunks of `scores.norm_sim_inf` (the max of maxes is the max)."""
        best = None
        for T in self.chunks():
            s = scores.norm_sim_inf(X, T)
            best = s if best is None else np.fmax(best, s)
        return best

    def norm_sim_inf_ann(self, X: np.ndarray, nprobes: int) -> np.ndarray:
        with self._lock:
            if self._table is None:
                self._table = self.st.db.open_table(self.t.table_name)
        return ann_max_abs_cos(self._table, X, nprobes)


def ann_max_abs_cos(table: Any, X: np.ndarray, nprobes: int) -> np.ndarray:
    Qh, valid = scores.normalize(X)
    out = np.full(len(Qh), np.nan)
    ids = np.flatnonzero(valid)
    if len(ids) == 0:
        return out
    Q = Qh[ids]
    best = np.zeros(len(ids))
    for sign in (1.0, -1.0):
        res = (table.search((sign * Q).astype(np.float32)).distance_type("cosine").limit(1)
               .nprobes(int(nprobes)).select(["vector", "_distance"]).to_arrow())
        if res.num_rows == 0:
            continue
        qi = res.column("query_index").to_numpy() if len(ids) > 1 or "query_index" in res.column_names \
            else np.zeros(res.num_rows, dtype=np.int64)
        V, _ = scores.normalize(to_numpy(res.column("vector")))     # float64, like the exact path
        cos = np.abs(np.einsum("ij,ij->i", V, Q[qi]))
        np.maximum.at(best, qi, cos)
    out[ids] = best
    return out
