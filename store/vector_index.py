"""Reading through a model table's Lance vector index (cosine), and the chunked scan beside it.

`clipsql index` (queries.search.index) builds the index and records its figures as the JSON
setting `index:<table>:<column>`; `nearest(...)` (queries.sql.nearest) reads them here:
`index_info` (None when the table version has no index on the column), `index_search` (top-k
through the index, re-scored in float64), `scan_chunks` (the exact path's float32 chunks).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import QueryError
from clipsql.kernels import topk as kernels
from clipsql.kernels.arrays import vectors
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store

CHUNK_ROWS = 32768
MODALITIES = ("image", "text")


def column_for(modality: str) -> str:
    if modality not in MODALITIES:
        raise QueryError(f"modality must be 'image' or 'text'; got {modality!r}")
    return f"{modality}_embedding"


def setting_key(rec: ModelRecord, column: str) -> str:
    return f"index:{rec.table_name}:{column}"


def vector_index(ds: Any, column: str) -> Any:
    """The vector index on `column` of Lance dataset `ds` (at its version), or None."""
    for idx in ds.describe_indices():
        if list(idx.field_names) == [column] and "Vector" in str(getattr(idx, "type_url", "")):
            return idx
    return None


def index_info(st: Store, rec: ModelRecord, column: str, ds: Any) -> dict | None:
    """The recorded figures of the index `ds` has on `column` (defaults if unrecorded), or None."""
    if vector_index(ds, column) is None:
        return None
    raw = st.get_setting(setting_key(rec, column))
    info = json.loads(raw) if raw else {}
    info.setdefault("nprobes", 20)
    info.setdefault("kind", "unknown")
    try:       # rows added since the build: Lance scans them beside the index (exact, slower)
        info["unindexed"] = int(ds.stats.index_stats(vector_index(ds, column).name)["num_unindexed_rows"])
    except Exception:  # noqa: BLE001 - an index kind without stats
        info["unindexed"] = 0
    return info


def recall_by_query(info: dict, column: str) -> dict[str, float]:
    """{query modality: recall@k} recorded for the index (an index recorded before both modalities
    were measured: its own modality's, the stored vectors it was measured on)."""
    by = info.get("recall_by_query")
    if by is None and info.get("recall") is not None:
        by = {column.split("_")[0]: info["recall"]}
    return dict(by or {})


def unmeasured_note(info: dict, column: str, query_modality: str | None) -> str | None:
    """A note when the index's recall was not measured for the query's modality (`None`: a SQL
    query vector of unknown modality, so either)."""
    by = recall_by_query(info, column)
    want = [query_modality] if query_modality else list(MODALITIES)
    missing = [m for m in want if m not in by]
    if not missing:
        return None
    target = column.split("_")[0]
    pairs = " or ".join(f"{m} → {target}" for m in missing)
    return (f"the vector index's recall was not measured for {pairs} queries (measured: "
            f"{', '.join(f'{m} → {target} {r:.3f}' for m, r in sorted(by.items())) or 'none'}); rebuild it with "
            "`clipsql index` to measure both, or search exactly (exact := true / --exact)")


def scan_chunks(ds: Any, column: str, *, ids: pa.Array | None = None,
                batch: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(X float32 (c, d) with NaN rows for NULL, ids (c,) object) chunks of `column`; `ids`: only
    those rows (Lance evaluates the `isin`, through its id index where there is one)."""
    filt = None if ids is None else pc.field("id").isin(ids)
    for b in ds.to_batches(columns=["id", column], filter=filt, batch_size=batch):
        if b.num_rows:
            yield vectors(b.column(column)), b.column("id").to_numpy(zero_copy_only=False)


def index_search(ds: Any, column: str, q: np.ndarray, k: int, info: dict,
                 nprobes: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Top-k through the index: (ids, float64 cosines re-scored from the returned vectors), best
    first, ties by id; None when the index gave fewer than k valid rows (the caller goes exact)."""
    qh, ok = kernels.unit_queries(q)
    slack = 16                                 # NULL / zero vectors the index may return
    params: dict[str, Any] = {"column": column, "q": qh[0].astype(np.float32), "k": int(k) + slack,
                              "metric": "cosine", "nprobes": int(nprobes or info["nprobes"])}
    if info.get("refine_factor"):
        params["refine_factor"] = int(info["refine_factor"])
    if info.get("ef"):
        params["ef"] = max(int(info["ef"]), int(k) + slack)
    # the columns asked for, without `_distance` (the cosines are re-scored here): Lance printed a
    # deprecation line on every search that named columns without it, unless told not to add it
    tbl = ds.to_table(nearest=params, columns=["id", column], disable_scoring_autoprojection=True)
    X = vectors(tbl.column(column))
    sq = kernels.row_norms_sq(X)
    valid = np.isfinite(sq) & (sq > 0)
    ids = tbl.column("id").to_numpy(zero_copy_only=False)[valid]
    s = np.clip(kernels.rescore(X[valid], qh[0], 1.0 / np.sqrt(sq[valid])), -1.0, 1.0)
    order = np.lexsort((ids.astype(str), -s))[:k]
    if len(order) < k:
        return None
    return ids[order], s[order]
