"""`ingest --update`: rewrite stored rows whose caption or metadata changed in the source.

Only for sources with stable ids (`--id-column`): a content-hash id changes with the caption,
so without one a corrected caption is simply a new row. For each batch, the rows the store
already holds are compared with what it stores:

* `samples` (caption, metadata): rewritten where they differ;
* the model's own table (its copy of the caption): a differing caption gets a new text
  embedding (re-encoded for image sources, the source's vector for precomputed ones).

Comparing against the model's table, not `samples`, means an update run per model brings
each model's text embeddings up to date even after another model's run rewrote `samples`.
Changes are applied by store.manage.apply_update in commits of up to FLUSH_ROWS rows.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import SourceError
from clipsql.ingest.rows import metadata_fields
from clipsql.kernels.arrays import as_stored, fixed_list
from clipsql.store.manage import apply_update
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store
from clipsql.store.tables import STORAGE_TYPES

FLUSH_ROWS = 50_000


def require_ids(id_column: str | None, update: bool, precomputed_has_ids: bool = False) -> None:
    if update and not id_column and not precomputed_has_ids:
        raise SourceError("`update` needs stable ids: set `id_column` (content-hash ids change "
                          "with the caption, so without an id column a corrected caption is a new row)",
                          param="id_column")


def _differs(new: pa.Array, old: pa.Array) -> np.ndarray:
    eq = pc.fill_null(pc.equal(new, old), False)
    both_null = pc.and_(pc.is_null(new), pc.is_null(old))
    return ~pc.or_(eq, both_null).to_numpy(zero_copy_only=False)


class Updater:
    def __init__(self, store: Store, rec: ModelRecord):
        self.store, self.rec = store, rec
        self._samples: list[pa.Table] = []
        self._model: list[pa.Table] = []
        self._types: dict[str, str] = {}
        self.pending = 0
        self.updated_samples = 0
        self.updated_rows = 0

    def check(self, ids: pa.Array, caption: pa.Array, metadata: pa.Array,
              truncated: pa.Array | Callable[[np.ndarray], pa.Array],
              in_samples: np.ndarray, in_model: np.ndarray, text: Callable[[np.ndarray], np.ndarray],
              meta_types: dict[str, str] | None = None) -> int:
        """Queue the changes of one batch; returns how many of the model's rows get a new caption.
        `truncated`: caption_truncated of the batch's rows, or a function of row positions giving it
        (computed only for the rows whose caption or metadata changed)."""
        n_model = 0
        idx = np.flatnonzero(in_samples)
        if len(idx):
            t = pa.array(idx, pa.int64())
            sid = ids.take(t)
            stored = self.store.samples_table().to_table(
                columns=["id", "caption", "metadata"], filter=pc.field("id").isin(sid))
            pos = pc.index_in(sid, value_set=stored.column("id").combine_chunks())
            old_cap = stored.column("caption").take(pos)
            old_meta = stored.column("metadata").take(pos)
            new_cap, new_meta = caption.take(t), metadata.take(t)
            changed = _differs(new_cap, old_cap) | _differs(new_meta, old_meta)
            if changed.any():
                c = pa.array(np.flatnonzero(changed), pa.int64())
                trunc = truncated(idx[changed]) if callable(truncated) else truncated.take(t).take(c)
                self._samples.append(pa.table({"id": sid.take(c), "caption": new_cap.take(c),
                                               "caption_truncated": trunc,
                                               "metadata": new_meta.take(c)}))
                self._types.update(meta_types or {})
                self.pending += len(c)
        idx = np.flatnonzero(in_model)
        if len(idx):
            t = pa.array(idx, pa.int64())
            mid = ids.take(t)
            stored = self.store.embeddings_table(self.rec).to_table(
                columns=["id", "caption"], filter=pc.field("id").isin(mid))
            pos = pc.index_in(mid, value_set=stored.column("id").combine_chunks())
            new_cap = caption.take(t)
            changed = _differs(new_cap, stored.column("caption").take(pos))
            if changed.any():
                rows = idx[changed]
                vectors = as_stored(np.asarray(text(rows), dtype=np.float32), self.rec.storage)
                c = pa.array(np.flatnonzero(changed), pa.int64())
                self._model.append(pa.table({"id": mid.take(c), "caption": new_cap.take(c),
                                             "text_embedding": fixed_list(vectors, self.rec.dim,
                                                                          storage=self.rec.storage)}))
                n_model = len(rows)
                self.pending += n_model
        return n_model

    def flush(self, force: bool = False) -> None:
        if not self.pending or (not force and self.pending < FLUSH_ROWS):
            return
        samples = pa.concat_tables(self._samples) if self._samples else None
        model = pa.concat_tables(self._model) if self._model else None
        if model is not None:
            model = model.cast(pa.schema([("id", pa.string()), ("caption", pa.string()),
                                          ("text_embedding", pa.list_(STORAGE_TYPES[self.rec.storage],
                                                                      self.rec.dim))]))
        out = apply_update(self.store, self.rec, samples, model, self._types)
        self.updated_samples += out["samples"]
        self.updated_rows += out["rows"]
        self._samples, self._model, self._types, self.pending = [], [], {}, 0


def row_arrays(rows: list[dict[str, Any]]) -> tuple[pa.Array, pa.Array, pa.Array, dict[str, str]]:
    """caption, metadata JSON, caption_truncated and metadata types of prepared image rows, as
    `samples` stores them."""
    metas, types = metadata_fields(rows)
    return (pa.array([r["caption"] for r in rows], pa.string()), pa.array(metas, pa.string()),
            pa.array([bool(r["caption_truncated"]) for r in rows], pa.bool_()), types)
