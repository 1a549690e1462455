"""`clipsql backfill STORE`: add the columns that ingest now computes to a store written before them.

    backfill(st)                                  # every missing caption feature column
    backfill(st, ["caption_lang", "caption_chars"])

The columns (store.tables.CAPTION_FEATURES, computed by ingest.captions) are computed from the
stored caption, fragment by fragment (`LanceFragment.merge_columns`: new data files beside the
old ones, nothing rewritten), then made visible by the write protocol of store.ledger: one Lance
`Merge` commit from the ledger's committed version, then ONE catalog transaction that inserts
the `commits` row (kind `backfill`) and moves the committed version of `samples`. A kill at any
instant leaves either the old store (a Lance version beyond the ledger, which the next writer's
`ledger.recover` restores away; unreferenced data files go with `clipsql optimize`) or the new
one. Columns already present are left alone, so running it again changes nothing.

An ingest computes the features from the caption as the source gave it; a backfill has only the
stored caption, which ingest cleaned (control characters deleted, runs of whitespace made one
space, ends stripped). The two differ only for captions that cleaning changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from clipsql.errors import BackfillError
from clipsql.ingest.captions import caption_features
from clipsql.lazy import lance, tqdm
from clipsql.store import catalog as cat
from clipsql.store.faults import fault
from clipsql.store.ledger import committed_versions, recover, set_committed_version
from clipsql.store.store import Store
from clipsql.store.tables import CAPTION_FEATURES, SAMPLES, samples_schema

BACKFILLABLE = CAPTION_FEATURES


@dataclass
class BackfillResult:
    """The columns a backfill `added` to `rows` samples in commit `commit_id` (None: nothing to add),
    and those `already` there."""
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rows: int = 0
    commit_id: int | None = None


def backfill(st: Store, columns: Iterable[str] | None = None, *, progress: bool = False) -> BackfillResult:
    """Add `columns` (default: every backfillable column) that `samples` lacks, in one commit."""
    wanted = list(dict.fromkeys(columns)) if columns else list(BACKFILLABLE)
    unknown = [c for c in wanted if c not in BACKFILLABLE]
    if unknown:
        raise BackfillError(f"cannot backfill {', '.join(unknown)}: the columns are {', '.join(BACKFILLABLE)}")
    with st.lock():
        recover(st)
        recorded = committed_versions(st).get(SAMPLES)
        if recorded is None:
            return BackfillResult(already=wanted)
        ds = st.dataset(SAMPLES, recorded)
        missing = [c for c in BACKFILLABLE if c in wanted and c not in ds.schema.names]
        out = BackfillResult(added=missing, already=[c for c in wanted if c not in missing])
        if not missing:
            return out
        fields = pa.schema([samples_schema().field(c) for c in missing])
        rows = ds.count_rows()
        bar = tqdm.tqdm(total=rows, desc="backfill", unit="rows", disable=not progress, dynamic_ncols=True,
                        mininterval=0.5)

        def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
            feats = caption_features(batch.column("caption"))
            bar.update(batch.num_rows)
            return pa.record_batch([feats[c] for c in missing], schema=fields)

        fragments, schema = [], None
        try:
            for frag in ds.get_fragments():
                meta, schema = frag.merge_columns(compute, columns=["caption"], batch_size=65536)
                fragments.append(meta)
        finally:
            bar.close()
        if schema is None:        # no fragment: an empty table gets the columns as a schema change
            ds.add_columns(list(fields))
            version = lance.dataset(st.table_uri(SAMPLES)).version
        else:
            version = lance.LanceDataset.commit(st.table_uri(SAMPLES), lance.LanceOperation.Merge(fragments, schema),
                                                read_version=recorded).version
        fault("backfill:after-lance")
        with st.engine.begin() as conn:
            res = conn.execute(cat.commits.insert().values(
                model_id=None, run_id=None, kind="backfill", rows=0, sample_rows=0,
                versions=cat.to_json({SAMPLES: int(version)}), created_at=time.time()))
            out.commit_id = int(res.inserted_primary_key[0])
            set_committed_version(conn, SAMPLES, version, out.commit_id)
        out.rows = rows
        return out
