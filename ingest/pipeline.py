"""The ingest worker: read → decode/encode → write → stats, each stage timed.

Idempotent and resumable: a sample's id is a content hash (or the source's id
column); ids already stored with this model are skipped before decoding, so a
re-run adds nothing and a killed run picks up where its last committed batch
ended (see store.store for the write protocol).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from store.store import Store, merge_sql_types, update_moments
from . import models
from .encode import Encoder, Prepared, prepare_item
from .sources import Reject, open_source



@dataclass
class IngestOptions:
    batch_size: int = 256
    workers: int | None = None          # None: default_workers(device)
    device: str = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None
    image_embeddings: str | None = None
    text_embeddings: str | None = None
    source_kind: str | None = None
    progress: bool = True
    stats_flush_seconds: float = 5.0


def default_workers(device: str, cpus: int | None = None) -> int:
    """Decode workers when the user does not say: on CUDA the cores are free for decoding
    (all but one, up to 8); on CPU the forward already uses every core, and a decode worker
    takes cores from it — measured on 2 cores, workers=0 was faster for both a decode-bound
    model (0.39 vs 0.19 of the bare forward) and a ViT (0.94 vs 0.81) — so one worker per
    4 cores, up to 4 (none on 2 cores)."""
    cpus = cpus or os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return min(8, max(1, cpus - 1))
    return min(4, cpus // 4)


@dataclass
class IngestSummary:
    run_id: int
    model_id: str
    source: str
    added: int = 0
    skipped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)   # per stage
    wall_seconds: float = 0.0
    status: str = "running"
    device: str = ""
    workers: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.added / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_second"] = round(self.rows_per_second, 2)
        return d


class _PreparedStream(IterableDataset):
    """IterableDataset over source units; each DataLoader worker takes every n-th unit."""

    def __init__(self, source: Any, units: list, preprocess: Any, tokenizer: Any, done_ids: set,
                 dim: int, batch_size: int):
        super().__init__()
        self.source, self.units, self.preprocess, self.tokenizer = source, units, preprocess, tokenizer
        self.done_ids, self.dim, self.batch_size = done_ids, dim, batch_size

    def __iter__(self) -> Iterator[Prepared]:
        import torch
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        mine = self.units[info.id::info.num_workers] if info is not None else self.units
        out = Prepared()
        for unit in mine:
            records = iter(self.source.read(unit))
            while True:
                t0 = time.perf_counter()
                rec = next(records, None)
                out.read_seconds += time.perf_counter() - t0
                if rec is None:
                    break
                if isinstance(rec, Reject):
                    out.rejects.append((rec.location, rec.reason, rec.detail))
                else:
                    prepare_item(rec, preprocess=self.preprocess, tokenizer=self.tokenizer,
                                 done_ids=self.done_ids, dim=self.dim, out=out)
                if len(out.rows) + len(out.skipped) + len(out.rejects) >= self.batch_size:
                    yield out
                    out = Prepared()
        if out.rows or out.skipped or out.rejects:
            yield out


def _identity(x: Any) -> Any:
    return x


def _peek_dim(source: Any) -> int:
    for unit in source.units():
        for rec in source.read(unit):
            if not isinstance(rec, Reject) and rec.image_embedding is not None:
                return int(np.asarray(rec.image_embedding).reshape(-1).shape[0])
    from store.errors import SourceError
    raise SourceError(f"{source.describe()}: no embeddings found to ingest")


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


def _samples_table(rows: list[dict], source: str) -> tuple[pa.Table, dict[str, str]]:
    from store.store import samples_schema
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
    cols = {
        "id": [r["id"] for r in rows], "uri": [r["uri"] for r in rows], "caption": [r["caption"] for r in rows],
        "width": [r["width"] for r in rows], "height": [r["height"] for r in rows],
        "source": [source] * len(rows), "location": [r["location"] for r in rows],
        "caption_truncated": [bool(r["caption_truncated"]) for r in rows], "metadata": metas,
    }
    return pa.table(cols, schema=samples_schema()), types


def ingest(store: Store, source_path: str, *, model: str | None = None, pretrained: str | None = None,
           checkpoint: str | None = None, options: IngestOptions | None = None,
           on_batch: Any = None) -> IngestSummary:
    """Ingest one source with one model into the store. Returns the run's summary.

    Everything that can fail for the whole run (unknown model, unreadable source, a
    locked store) fails before the first write; bad items become rejects.
    """
    opts = options or IngestOptions()
    t_start = time.perf_counter()
    spec = models.resolve(model, pretrained, checkpoint)
    source = open_source(source_path, image_column=opts.image_column, caption_column=opts.caption_column,
                         id_column=opts.id_column, image_embeddings=opts.image_embeddings,
                         text_embeddings=opts.text_embeddings, kind=opts.source_kind)
    loaded = None
    if not source.precomputed or spec.local:
        loaded = models.load(spec, opts.device)
    source_name = str(source_path)
    seconds: Counter = Counter()
    seconds["load_model"] = time.perf_counter() - t_start

    with store.lock():
        if loaded is not None:
            fields = loaded.record_fields()
            if source.precomputed:
                dim = _peek_dim(source)
                if dim != loaded.dim:
                    from store.errors import DimensionMismatch
                    raise DimensionMismatch(f"{spec.model_id} produces {loaded.dim}-d embeddings but "
                                            f"{source_name} holds {dim}-d vectors: name the model that made them")
        else:
            fields = models.record_without_weights(spec, _peek_dim(source))
        rec = store.register_model(**fields)
        state = store.sync_stats(rec)
        seq = store.max_seq(rec)
        emb_ids = store.embedding_ids(rec)
        sample_ids = store.sample_ids()
        done = emb_ids & sample_ids
        run_id = store.start_run(rec.model_id, source_name, source.kind)
        summary = IngestSummary(run_id, rec.model_id, source_name)
        rejected: Counter = Counter()
        seen: set[str] = set()
        encoder = Encoder(loaded) if loaded is not None and not source.precomputed else None
        units = source.units()
        stream = _PreparedStream(source, units, None if loaded is None else loaded.preprocess,
                                 None if loaded is None else loaded.tokenizer, done, rec.dim, opts.batch_size)
        workers = 0 if source.precomputed or loaded is None else (
            default_workers(loaded.device) if opts.workers is None else max(0, opts.workers))
        summary.workers, summary.device = workers, "" if loaded is None else str(loaded.device)
        if workers:
            from torch.utils.data import DataLoader
            # Workers are forked (fast start, no re-import of torch) and only read source files and
            # decode images; they never call into Lance, so its fork-safety warning does not apply.
            warnings.filterwarnings("ignore", message=".*fork.*", module="lance.*")
            warnings.filterwarnings("ignore", message="lancedb fork support")
            batches = iter(DataLoader(stream, batch_size=None, num_workers=min(workers, max(1, len(units))),
                                      collate_fn=_identity, prefetch_factor=4, persistent_workers=False))
        else:
            batches = iter(stream)
        stats = _StatsFolder(store, state)
        bar = _progress(opts.progress, rec.model_id)
        last_flush = time.perf_counter()
        try:
            while True:
                t0 = time.perf_counter()
                prepared = next(batches, None)
                seconds["read+decode (wait)"] += time.perf_counter() - t0
                if prepared is None:
                    break
                seconds["read (workers)"] += prepared.read_seconds
                seconds["decode (workers)"] += prepared.decode_seconds
                rejects = list(prepared.rejects)
                for sid, location in prepared.skipped:
                    if sid in seen:
                        rejects.append((location, "duplicate_id", f"id {sid} occurs earlier in this source"))
                    else:
                        seen.add(sid)
                        summary.skipped += 1
                keep = []
                for i, row in enumerate(prepared.rows):
                    if row["id"] in seen:
                        rejects.append((row["location"], "duplicate_id",
                                        f"id {row['id']} occurs earlier in this source"))
                    else:
                        seen.add(row["id"])
                        keep.append(i)
                rows = [prepared.rows[i] for i in keep]
                if rows:
                    t0 = time.perf_counter()
                    if encoder is not None:
                        img, txt = encoder([prepared.pixels[i] for i in keep], [prepared.tokens[i] for i in keep])
                    else:
                        img = np.stack([prepared.image_vectors[i] for i in keep])
                        txt = np.stack([prepared.text_vectors[i] for i in keep])
                    seconds["encode"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    new_samples = [r for r in rows if r["id"] not in sample_ids]
                    samples_tbl, meta_types = _samples_table(new_samples, source_name) if new_samples else (None, {})
                    need = [i for i, r in enumerate(rows) if r["id"] not in emb_ids]
                    if need:
                        seq += 1
                    store.write_batch(rec, samples=samples_tbl, ids=[rows[i]["id"] for i in need],
                                      image=img[need], text=txt[need], seq=seq, run_id=run_id,
                                      source=source_name, rejects=rejects, meta_types=meta_types)
                    sample_ids.update(r["id"] for r in new_samples)
                    emb_ids.update(rows[i]["id"] for i in need)
                    seconds["write"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    if need:
                        stats.fold(img[need], txt[need], seq)
                        if time.perf_counter() - last_flush > opts.stats_flush_seconds:
                            stats.save()
                            last_flush = time.perf_counter()
                    seconds["stats"] += time.perf_counter() - t0
                    summary.added += len(need)
                elif rejects:
                    store.record_rejects(run_id, rec.model_id, source_name, rejects)
                for _, reason, _ in rejects:
                    rejected[reason] += 1
                bar.update(len(prepared.rows) + len(prepared.skipped) + len(prepared.rejects))
                bar.set_postfix(added=summary.added, skipped=summary.skipped, rejected=sum(rejected.values()))
                if on_batch is not None:
                    on_batch(summary)
            summary.status = "done"
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            bar.close()
            t0 = time.perf_counter()
            stats.save()
            stats.close()
            seconds["stats"] += time.perf_counter() - t0
            seconds["stats (background)"] = stats.seconds
            summary.rejected = dict(rejected)
            summary.wall_seconds = time.perf_counter() - t_start
            summary.seconds = {k: round(v, 4) for k, v in seconds.items()}
            store.finish_run(run_id, summary.status, summary.skipped, summary.to_dict())
    return summary


class _StatsFolder:
    """Folds committed batches into the running statistics on a background thread.

    BLAS releases the GIL, so the d×d outer-product sums (the costly part at d = 512)
    overlap with decoding and encoding; one worker keeps the batches in commit order.
    `save()` waits for the folds queued so far and stores the moments with their seq.
    """

    def __init__(self, store: Store, state: Any):
        from concurrent.futures import ThreadPoolExecutor
        self.store, self.state = store, state
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsql-stats")
        self.pending: Any = None
        self.seconds = 0.0

    def _fold(self, image: np.ndarray, text: np.ndarray, seq: int) -> None:
        t0 = time.perf_counter()
        update_moments(self.state, image, text)
        self.state.covered_seq = seq
        self.seconds += time.perf_counter() - t0

    def fold(self, image: np.ndarray, text: np.ndarray, seq: int) -> None:
        self.pending = self.pool.submit(self._fold, image, text, seq)

    def save(self) -> None:
        if self.pending is not None:
            self.pending.result()
        self.store.save_stats(self.state)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _progress(enabled: bool, model_id: str) -> Any:
    from tqdm import tqdm
    return tqdm(desc=f"ingest [{model_id}]", unit="rows", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)
