"""The Ray engine: the `Engine` of queries.sql.engine with its work on a Ray cluster.

Ingest runs one task per source unit (engines.ingest), `stats refresh` and `score` one task
per Lance fragment (engines.scores), `dedup`'s assignment one task per run of fragments and its
within-cluster pass one task per set of clusters (engines.dedup); the driver alone commits,
through the same code as the local engine. `address`: None starts a local Ray for the command (or joins RAY_ADDRESS);
`auto` or host:port joins a running cluster.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import numpy as np
import pyarrow as pa

from clipsql.engines.dedup import dedup_assign_ray, dedup_within_ray
from clipsql.engines.engine import EngineError, ray_session
from clipsql.engines.index import build_vector_index_ray
from clipsql.engines.ingest import ingest_ray
from clipsql.engines.scores import refresh_stats_ray, score_columns_ray, score_ray
from clipsql.ingest.run import IngestOptions, IngestSummary
from clipsql.kernels import semdedup as K
from clipsql.queries.sql.materialize import ScoreReport
from clipsql.store.records import ModelRecord
from clipsql.store.stats import StatsState
from clipsql.store.store import Store


class RayEngine:
    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None):
        self.address = address

    def ingest(self, store: Store, source: str, *, model: str | None = None, pretrained: str | None = None,
               checkpoint: str | None = None, options: IngestOptions | None = None) -> IngestSummary:
        return ingest_ray(store, source, model=model, pretrained=pretrained, checkpoint=checkpoint, options=options,
                          address=self.address)

    def refresh_stats(self, store: Store, rec: ModelRecord) -> StatsState:
        return refresh_stats_ray(store, rec, address=self.address)

    def score(self, store: Store, columns: list[str], model: str | None = None, *, neg_clip_loss_pool: bool = False,
              norm_sim_d: bool = False, pool_batch_size: int | None = None, seed: int | None = None,
              progress: bool = False) -> ScoreReport:
        if neg_clip_loss_pool or norm_sim_d:
            raise EngineError("the pool-form scores (`neg_clip_loss_pool`, `norm_sim_d`) need the whole pool at "
                              "once: set `engine` to local", param="engine")
        return score_ray(store, columns, model, address=self.address)

    def score_columns(self, store: Store, rec: ModelRecord, columns: list[str], *, fit: Any, con: Any,
                      relation: str, allowed: pa.Array | None) -> pa.Table:
        """Every row of the model's committed table, one task per fragment (the pool filters them)."""
        return score_columns_ray(store, rec, columns, address=self.address, fit=fit)

    def build_vector_index(self, ds: Any, column: str, options: dict) -> None:
        """One index segment per group of fragments on the workers, committed as one index."""
        build_vector_index_ray(ds, column, options, address=self.address)

    def session(self) -> ContextManager[Any]:
        """One Ray session for the calls made inside (each call joins it)."""
        return ray_session(self.address)

    def dedup_assign(self, rows: Any, C32: np.ndarray, inv: np.ndarray, valid: np.ndarray, *,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        return dedup_assign_ray(rows, C32, inv, valid, device=device, progress=progress, address=self.address)

    def dedup_within(self, rows: Any, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                     C32: np.ndarray, full: np.ndarray, cap: int, *, grown: np.ndarray | None = None,
                     old: np.ndarray | None = None, new: np.ndarray | None = None, block: int = K.ROW_BLOCK,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, dict]:
        return dedup_within_ray(rows, inv, labels, cos, id_rank, C32, full, cap, grown=grown, old=old, new=new,
                                block=block, device=device, progress=progress, address=self.address)
