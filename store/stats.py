"""Running statistics of a model's stored vectors: moments per (modality, space) in `running_stats`,
merged into by every commit (store.ledger) and recomputed from the vectors on request.

The functions taking `st` (a store.store.Store, which sits above this module) read and write a
model's statistics; the rest work on arrays, Arrow batches or a catalog connection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from clipsql.errors import CatalogDamaged
from clipsql.kernels.arrays import to_numpy
from clipsql.kernels.moments import RunningMoments, fold_pair
from clipsql.store import catalog as cat
from clipsql.store.reads import count_rows, read_embeddings
from clipsql.store.records import ModelRecord

MODALITIES = ("image", "text")
SPACES = ("raw", "normalized")
STATS_COLUMNS = ("image_embedding", "text_embedding", "seq")     # what the statistics are folded from


@dataclass
class StatsState:
    """Running statistics of one model: moments per (modality, space) and the batch seq they cover."""
    model_id: str
    moments: dict[tuple[str, str], RunningMoments]
    covered_seq: int

    @property
    def n(self) -> int:
        return self.moments[("image", "raw")].n


# (table version, fragment ids, shifts) -> one statistics partial per fragment, in order
FoldFragments = Callable[[int, list, dict], list]


def saved_stats(st: Any, model: ModelRecord) -> StatsState:
    """The model's saved running statistics (`running_stats`)."""
    with st.engine.connect() as conn:
        return load_stats_in(conn, model)


def load_stats_in(conn: sa.Connection, model: ModelRecord, path: Any = "STORE") -> StatsState:
    """The running statistics of `model` as `conn` sees them; CatalogDamaged (naming the repair of the
    store at `path`) when a stored array cannot be read."""
    rows = conn.execute(sa.select(cat.running_stats).where(
        cat.running_stats.c.model_id == model.model_id)).fetchall()
    moments = new_moments(model.dim)
    covered = 0
    for r in rows:
        m = r._mapping
        what = f"the {m['modality']} {m['space']} statistics of model {model.model_id}"
        try:
            s2, shift, s1 = (cat.unpack(m[k], what) for k in ("sum_outer", "shift", "sum"))
        except CatalogDamaged as e:
            raise CatalogDamaged(f"{e}: run `clipsql doctor {path} --repair` (recomputes them from the "
                                 "stored vectors)") from None
        moments[(m["modality"], m["space"])] = RunningMoments(
            model.dim, int(m["n"]), shift, s1, s2, second=s2 is not None)
        covered = int(m["covered_seq"])
    return StatsState(model.model_id, moments, covered)


def save_stats(st: Any, state: StatsState) -> None:
    with st.engine.begin() as conn:
        save_stats_in(conn, state)


def save_stats_in(conn: sa.Connection, state: StatsState) -> None:
    conn.execute(sa.delete(cat.running_stats).where(cat.running_stats.c.model_id == state.model_id))
    now = time.time()
    for (mo, sp), rm in state.moments.items():
        conn.execute(cat.running_stats.insert().values(
            model_id=state.model_id, modality=mo, space=sp, dim=rm.dim, n=rm.n, shift=cat.pack(rm.shift),
            sum=cat.pack(rm.s1), sum_outer=cat.pack(rm.s2), covered_seq=state.covered_seq, updated_at=now))


def uncovered_rows(st: Any, model: ModelRecord) -> int:
    return count_rows(st, model) - saved_stats(st, model).n


def sync_stats(st: Any, model: ModelRecord) -> StatsState:
    """Fold in rows the statistics do not cover. Commits carry their statistics, so this finds
    nothing on a store written by this version; stores written before the ledger may lag."""
    state = saved_stats(st, model)
    if count_rows(st, model) == state.n:
        return state
    with st.engine.begin() as conn:
        state = load_stats_in(conn, model)
        tbl = read_embeddings(st, model, min_seq=state.covered_seq, columns=STATS_COLUMNS)
        if tbl.num_rows:
            part = fold_batches(model, tbl.to_batches(), {k: m.shift for k, m in state.moments.items()})
            state = merge_states(model, [state, part])
            save_stats_in(conn, state)
        return state


def refresh_stats(st: Any, model: ModelRecord, batch_rows: int = 65536, *,
                  fold_fragments: FoldFragments | None = None) -> StatsState:
    """Recompute the running statistics from every stored vector and save them (`recompute_stats`)."""
    state = recompute_stats(st, model, batch_rows, fold_fragments=fold_fragments)
    with st.engine.begin() as conn:
        save_stats_in(conn, state)
    return state


def recompute_stats(st: Any, model: ModelRecord, batch_rows: int = 65536, *,
                    fold_fragments: FoldFragments | None = None) -> StatsState:
    """The running statistics of every stored vector, from scratch: one partial per Lance fragment
    of the committed table (`fold_fragment`, streamed: memory O(batch·d + d²)), all centred on one
    shift, merged in fragment order (`merge_states`). `fold_fragments(version, fragment_ids,
    shifts)` returns those partials, in that order, computed wherever the caller decides (the
    Ray engine: one task per fragment); by default here, one after another."""
    ds = st.embeddings_table(model)
    shifts = _stats_shifts(st, model, ds)
    ids = [f.fragment_id for f in ds.get_fragments()]
    if fold_fragments is None:
        parts = [fold_fragment(st, model, ds.version, i, shifts, batch_rows) for i in ids]
    else:
        parts = fold_fragments(ds.version, ids, shifts)
    return merge_states(model, parts)


def fold_fragment(st: Any, model: ModelRecord, version: int, fragment_id: int, shifts: dict,
                  batch_rows: int = 65536) -> StatsState:
    """The statistics partial of one fragment of the model table at `version`."""
    frag = st.embeddings_table(model, version).get_fragment(fragment_id)
    return fold_batches(model, frag.to_batches(columns=list(STATS_COLUMNS), batch_size=batch_rows), shifts)


def _stats_shifts(st: Any, model: ModelRecord, ds: Any) -> dict:
    """What a recompute's partials are centred on: the saved statistics' shift, else the mean of
    the first rows (one shift for all: the partials then merge without rounding)."""
    shifts = {k: m.shift for k, m in saved_stats(st, model).moments.items()}
    if any(v is None for v in shifts.values()) and ds.count_rows():
        head = ds.head(4096, columns=list(STATS_COLUMNS))
        shifts = {k: m.shift for k, m in fold_batches(model, head.to_batches(), None).moments.items()}
    return shifts


def new_moments(dim: int, shifts: dict | None = None) -> dict[tuple[str, str], RunningMoments]:
    """Empty moments per (modality, space): raw vectors keep mean and covariance, normalized
    ones the mean (conformity needs it; no score uses their covariance). `shifts`
    {(modality, space): vector or None}: what each is centred on (None: its first rows' mean)."""
    out = {(mo, sp): RunningMoments(dim, second=sp == "raw") for mo in MODALITIES for sp in SPACES}
    for key, shift in (shifts or {}).items():
        out[key].shift = None if shift is None else np.array(shift, dtype=np.float64)
    return out


def update_moments(state: StatsState, image: np.ndarray, text: np.ndarray) -> None:
    for modality, X in (("image", image), ("text", text)):
        fold_pair(state.moments[(modality, "raw")], state.moments[(modality, "normalized")], X)


def fold_batches(model: ModelRecord, batches: Iterable[pa.RecordBatch], shifts: dict | None) -> StatsState:
    """The running statistics of `batches` (the STATS_COLUMNS of stored rows), from scratch,
    centred on `shifts` (see new_moments); `covered_seq` is the highest write batch seen."""
    state = StatsState(model.model_id, new_moments(model.dim, shifts), 0)
    for batch in batches:
        if batch.num_rows:
            update_moments(state, to_numpy(batch.column("image_embedding")), to_numpy(batch.column("text_embedding")))
            state.covered_seq = max(state.covered_seq, int(pc.max(batch.column("seq")).as_py()))
    return state


def merge_states(model: ModelRecord, parts: Iterable[StatsState]) -> StatsState:
    """Partials merged exactly (RunningMoments.merge), in the order given."""
    state = StatsState(model.model_id, new_moments(model.dim), 0)
    for part in parts:
        for key, m in part.moments.items():
            state.moments[key].merge(m)
        state.covered_seq = max(state.covered_seq, part.covered_seq)
    return state
