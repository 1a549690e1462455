"""Sample rows as the `samples` table stores them: the Arrow table of a batch of rows, their
metadata JSON and the SQL type of each metadata key. Used by the local pipeline, `--update`
and the Ray workers alike."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.ingest.captions import caption_features
from clipsql.store.ledger import merge_sql_types
from clipsql.store.tables import samples_schema


def _sql_type(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "BOOLEAN"
    if isinstance(v, (int, np.integer)):
        return "BIGINT"
    if isinstance(v, (float, np.floating)):
        return "DOUBLE"
    return "VARCHAR"


def metadata_fields(rows: list[dict]) -> tuple[list[str | None], dict[str, str]]:
    """Per row the metadata JSON `samples` stores (sorted keys, None when empty), and the SQL type
    of every key over the rows."""
    types: dict[str, str] = {}
    metas = []
    for r in rows:
        meta = {}
        for k, v in r["meta"].items():
            if isinstance(v, np.generic):
                v = v.item()
            meta[k] = v
            t = _sql_type(v)
            if t:
                types[k] = merge_sql_types(types[k], t) if k in types else t
        metas.append(json.dumps(meta, sort_keys=True, default=str) if meta else None)
    return metas, types


def samples_table(rows: list[dict], source: str) -> tuple[pa.Table, dict[str, str]]:
    metas, types = metadata_fields(rows)
    cols = {
        "id": [r["id"] for r in rows], "uri": [r["uri"] for r in rows], "caption": [r["caption"] for r in rows],
        "width": [r["width"] for r in rows], "height": [r["height"] for r in rows],
        "source": [source] * len(rows), "location": [r["location"] for r in rows],
        "caption_truncated": [bool(r["caption_truncated"]) for r in rows], "metadata": metas,
    }
    # the caption features count the text as the source gave it (before cleaning), as DataComp does
    raw = pa.array([r.get("caption_text", r["caption"]) for r in rows], pa.string())
    cols.update(caption_features(raw))
    return pa.table(cols, schema=samples_schema()), types


def samples_columns(c: Any, source: str) -> pa.Table:
    n = len(c)
    width = getattr(c, "width", None)
    height = getattr(c, "height", None)
    raw = getattr(c, "caption_raw", None)
    return pa.table({
        "id": c.ids, "uri": c.uri, "caption": c.caption,
        "width": pa.nulls(n, pa.int32()) if width is None else width,
        "height": pa.nulls(n, pa.int32()) if height is None else height,
        "source": pa.array([source] * n, pa.string()),
        "location": c.location, "caption_truncated": pa.array(np.zeros(n, dtype=bool)), "metadata": c.metadata,
        **caption_features(c.caption if raw is None else raw),
    }, schema=samples_schema())
