"""Where the heavy steps run: an `Engine`, this process (`LOCAL`) or a Ray cluster (engines.ray).

An engine is chosen once per command, by `engines.choose(name, ray_address)` (the CLI's
`--engine local|ray`), and handed as an object to the library functions whose work can run
on a cluster: ingest (`engine.ingest`; DataComp pools through `ingest_pool(run=engine.ingest)`),
`stats refresh` (`engine.refresh_stats`), `clipsql score` (`engine.score`) and the pool-wide
scores a `select` recipe ranks by (`engine.score_columns`), and `clipsql dedup`'s two heavy
passes (`engine.dedup_assign`: every row to its centroid; `engine.dedup_within`: the
within-cluster maxima). Nothing else asks which engine it has: the local one is defined here,
the Ray one above the library, in engines/.

Both engines run the same code on their data: the local one calls the functions below
directly; the Ray one runs them per source unit or per Lance fragment and commits through the
same ledger.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Protocol

import numpy as np
import pyarrow as pa

from clipsql.ingest.pipeline import IngestOptions, IngestSummary, ingest
from clipsql.queries.sql.db import connect
from clipsql.queries.sql.materialize import ScoreReport, materialize_scores, score_relation
from clipsql.kernels import semdedup as K
from clipsql.kernels import semdedup_blocks as B
from clipsql.models import device as DV
from clipsql.store.records import ModelRecord
from clipsql.store.stats import StatsState, refresh_stats
from clipsql.store.store import Store


class Engine(Protocol):
    """What an engine does (engines.choose returns one)."""

    name: str               # "local" | "ray": recorded in selection sidecars
    in_process: bool        # whether the work runs in this process (DuckDB-only work, e.g. `select --sql`)

    def ingest(self, store: Store, source: str, *, model: str | None = None, pretrained: str | None = None,
               checkpoint: str | None = None, options: IngestOptions | None = None) -> IngestSummary:
        """Ingest one source with one model (ingest.pipeline.ingest's contract)."""

    def refresh_stats(self, store: Store, rec: ModelRecord) -> StatsState:
        """Recompute and save a model's running statistics from every stored vector."""

    def score(self, store: Store, columns: list[str], model: str | None = None, *, neg_clip_loss_pool: bool = False,
              norm_sim_d: bool = False, pool_batch_size: int | None = None, seed: int | None = None,
              progress: bool = False) -> ScoreReport:
        """`clipsql score`: store the score columns (view `stored_scores`); returns a summary."""

    def score_columns(self, store: Store, rec: ModelRecord, columns: list[str], *, fit: Any, con: Any,
                      relation: str, allowed: pa.Array | None) -> pa.Table:
        """id + `columns` for (at least) every row of `relation`, SQL over `con` (a connection of the
        store; `allowed`: the ids registered there as `_clipsql_allowed` when `relation` is filtered
        to them): the pool of a `select` recipe. `fit`: a (scores.Fit, fit row) to score with
        instead of the default fit."""

    def build_vector_index(self, ds: Any, column: str, options: dict) -> None:
        """`clipsql index`'s build: the Lance index `options` describe (IVF centroids given) on
        `column` of `ds` (its latest version), committed by Lance as a new version."""

    def session(self) -> ContextManager[Any]:
        """A context in which several calls share the engine's resources (the Ray engine: one Ray
        session for the command instead of one per call)."""

    def dedup_assign(self, rows: Any, C32: np.ndarray, inv: np.ndarray, valid: np.ndarray, *,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """`clipsql dedup`'s assignment: (labels, cos) of every row of `rows` (a
        `queries.curation.dedup.Rows`: one committed version of a model table, by row position)
        to the centroids C32, as `models.device.semdedup_assigner` gives them (-1, NaN where not
        `valid`; `inv`: 1/‖x‖ per row)."""

    def dedup_within(self, rows: Any, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                     C32: np.ndarray, full: np.ndarray, cap: int, *, grown: np.ndarray | None = None,
                     old: np.ndarray | None = None, new: np.ndarray | None = None, block: int = K.ROW_BLOCK,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, dict]:
        """`clipsql dedup`'s within-cluster pass: `kernels.semdedup_blocks.within_clusters` over the
        rows of `rows` (its arguments; at most `cap` members held at once per worker): max_sim per
        row (NaN outside the clusters `full` and `grown`) and {pairs, largest_cluster, clusters,
        groups, big_clusters}. The values never depend on the engine."""


class LocalEngine:
    """This process: DuckDB and numpy on the local cores."""

    name = "local"
    in_process = True

    def ingest(self, store: Store, source: str, *, model: str | None = None, pretrained: str | None = None,
               checkpoint: str | None = None, options: IngestOptions | None = None) -> IngestSummary:
        return ingest(store, source, model=model, pretrained=pretrained, checkpoint=checkpoint, options=options)

    def refresh_stats(self, store: Store, rec: ModelRecord) -> StatsState:
        with store.lock():
            return refresh_stats(store, rec)

    def score(self, store: Store, columns: list[str], model: str | None = None, *, neg_clip_loss_pool: bool = False,
              norm_sim_d: bool = False, pool_batch_size: int | None = None, seed: int | None = None,
              progress: bool = False) -> ScoreReport:
        return materialize_scores(store, columns, model, neg_clip_loss_pool=neg_clip_loss_pool, norm_sim_d=norm_sim_d,
                                  pool_batch_size=pool_batch_size, seed=seed, progress=progress)

    def score_columns(self, store: Store, rec: ModelRecord, columns: list[str], *, fit: Any, con: Any,
                      relation: str, allowed: pa.Array | None) -> pa.Table:
        """Through the SQL score functions on `con`, or on a connection of its own for a recipe's fit."""
        if fit is None:
            return score_relation(con, rec, relation, columns)
        own = connect(store, fits={rec.model_id: fit})     # a recipe's own fit, this connection only
        try:
            if allowed is not None:
                own.register("_clipsql_allowed", pa.table({"id": allowed}))
            return score_relation(own, rec, relation, columns)
        finally:
            own.close()

    def build_vector_index(self, ds: Any, column: str, options: dict) -> None:
        ds.create_index(column, **options)

    def session(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def dedup_assign(self, rows: Any, C32: np.ndarray, inv: np.ndarray, valid: np.ndarray, *,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """One stream over the rows (`rows.vectors()`: pass 1's scratch rows, else a scan), batch by batch."""
        labels = np.full(len(inv), -1, dtype=np.int64)
        cos = np.full(len(inv), np.nan)
        assign = DV.semdedup_assigner(C32, device, threads=None)      # every core of this machine
        for a, X in rows.vectors():
            e = a + len(X)
            labels[a:e], cos[a:e] = assign(X, inv[a:e], valid[a:e], progress)
        return labels, cos

    def dedup_within(self, rows: Any, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                     C32: np.ndarray, full: np.ndarray, cap: int, *, grown: np.ndarray | None = None,
                     old: np.ndarray | None = None, new: np.ndarray | None = None, block: int = K.ROW_BLOCK,
                     device: str | None = None, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, dict]:
        """The clusters in groups of at most `cap` members, each read by `rows.take` (pass 1's scratch
        rows, else Lance); a group's clusters on every core of this machine (one thread each)."""
        return B.within_clusters(rows.take, inv, labels, cos, id_rank, C32, full, cap, grown=grown, old=old, new=new,
                                 rows=block, progress=progress, gram=DV.semdedup_gram(device), threads=None)


LOCAL = LocalEngine()
