"""The curation recipes `clipsql select` runs (docs/science.md §9, §11), each over a `Pool`.

* `kl-guided` (density-ratio revision, as published): the top 25% by text Information Gain
  against the **uniform** prior at the model's own logit scale (and bias, for SigLIP), a caption
  drawn into the reference leaving its own pair out (`include_own_pair`: the authors'
  behaviour, kept in). It runs
  on a fit with exactly those settings: the default fit when it has them, else the newest fit
  made for the recipe, else one made now (seeded like the default fit, recorded, kept apart
  from the default fit the `scores` view uses), or — when the store is read-only or
  `make_fit=False` — a refusal naming the exact `clipsql stats fit` command.
* `negclip-normsim` (Wang et al.): top 30% by negCLIPLoss, then top NormSim∞(target) to 20%.
* `clip-score` (DataComp's baseline): top fraction (default 30%) by `clip_score`, or every row
  with `clip_score >= threshold`, from one global sort.
* `image-based` (DataComp's baseline): k-means of the pool's image embeddings (K scaled to the
  pool: DataComp's 100,000 clusters for 12.8M rows is one per 128 rows), each target image
  assigned to a centroid; keep the pool rows whose centroid is one of those.

A `Pool` is every row of the model, or the rows passing `--where` (SQL over `samples`, the
model's semantic-dedup columns and its stored scores): fractions are of that pool.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import SelectionError
from clipsql.kernels import kmeans
from clipsql.kernels.arrays import to_numpy
from clipsql.kernels.scores import normalize
from clipsql.store.fit_rows import get_fit, latest_fit
from clipsql.store.fits import DEFAULT_REFERENCE_SIZE, fit_stats, load_fit, staleness
from clipsql.store.ledger import committed_versions
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store

ROWS_PER_CLUSTER = 128          # DataComp: 100,000 clusters for the 12.8M-row small pool
KL_GUIDED = "kl-guided"


def rank(ids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Positions of the rows with a finite score, best first: score descending, then id ascending."""
    ok = np.flatnonzero(np.isfinite(score))
    order = np.lexsort((ids[ok], -score[ok]))
    return ok[order]


def top(tbl: pa.Table, column: str, count: int | None, threshold: float | None = None) -> tuple[pa.Table, int]:
    """Rows of `tbl` ranked by `column` (desc, ties by id in byte order, as `rank`), cut to `count`
    (or to the rows with `column >= threshold`); also the count of NULL scores. Arrow sorts and
    filters: no Python object per row."""
    score = tbl.column(column).cast(pa.float64())
    ok = pc.fill_null(pc.is_finite(score), False)
    if threshold is not None:
        ok = pc.and_(ok, pc.fill_null(pc.greater_equal(score, threshold), False))
    kept = tbl.filter(ok)
    kept = kept.take(pc.sort_indices(kept, sort_keys=[(column, "descending"), ("id", "ascending")]))
    if count is not None:
        kept = kept.slice(0, count)
    nulls = tbl.num_rows - int(pc.sum(pc.fill_null(pc.is_finite(score), False).cast(pa.int64())).as_py() or 0)
    return kept, nulls


@dataclass
class Pool:
    """The rows a recipe chooses from and how to score them.

    `relation`: SQL relation of their embeddings (id, image_embedding, text_embedding); `allowed`:
    their ids when `--where` filtered the model's rows (None: every row); `score` computes
    id + score columns for the pool (DuckDB, or one Ray task per fragment)."""
    st: Store
    rec: ModelRecord
    con: Any
    relation: str
    size: int
    allowed: pa.Array | None
    score_all: Callable[[list[str], Any], pa.Table]
    info: dict = field(default_factory=dict)

    def score(self, columns: list[str], fit: Any = None) -> pa.Table:
        tbl = self.score_all(columns, fit)
        if self.allowed is not None:
            tbl = tbl.filter(pc.is_in(tbl.column("id"), value_set=self.allowed))
        return tbl

    def image_batches(self, batch_size: int = 65536):
        """(ids, raw image vectors) of the pool in committed-table order, one Arrow batch at a time."""
        version = committed_versions(self.st).get(self.rec.table_name)
        ds = self.st.embeddings_table(self.rec, version)
        for b in ds.to_batches(columns=["id", "image_embedding"], batch_size=batch_size):
            if self.allowed is not None:
                b = b.filter(pc.is_in(b.column(0), value_set=self.allowed))
            if b.num_rows:
                yield b.column(0), to_numpy(b.column(1))


# --------------------------------------------------------------------------- kl-guided
def kl_guided_settings(rec: ModelRecord) -> dict[str, Any]:
    """The recipe's fit: uniform prior, the model's logit scale a (and its bias b for SigLIP)."""
    return {"a": float(rec.logit_scale), "b": float(rec.logit_bias or 0.0) if rec.kind == "siglip" else 0.0,
            "prior": "uniform"}


def _has_settings(options: dict, want: dict) -> bool:
    close = lambda x, y: x is not None and abs(float(x) - y) <= 1e-9 * max(1.0, abs(y))  # noqa: E731
    return options.get("prior") == want["prior"] and close(options.get("a"), want["a"]) \
        and close(options.get("b", 0.0), want["b"])


def _kl_guided_choice(st: Store, rec: ModelRecord, seed: int | None,
                      reference_size: int | None) -> tuple[dict | None, str, int, int, dict]:
    """(the current fit row the recipe would run on or None, which fit, seed, reference size, settings)."""
    want = kl_guided_settings(rec)
    default = latest_fit(st, rec, with_arrays=False)
    d_opts = default.options if default else {}
    seed = int(seed if seed is not None else d_opts.get("seed", 0))
    size = int(reference_size or d_opts.get("requested_reference_size") or DEFAULT_REFERENCE_SIZE)

    def current(row: dict | None) -> bool:
        """Not stale (fit.staleness), and drawn with the asked seed and reference size."""
        if row is None or staleness(st, rec, row) is not None:
            return False
        o = row.options
        return int(o.get("seed", 0)) == seed and (reference_size is None or o.get("requested_reference_size") == size)

    if default is not None and _has_settings(d_opts, want) and current(default):
        row, how = default, "default fit"
    else:
        row, how = latest_fit(st, rec, with_arrays=False, recipe=KL_GUIDED,
                              where=lambda o: _has_settings(o, want)), "recipe fit"
    return (row if current(row) else None), how, seed, size, want


def kl_guided_fit_ready(st: Store, model: str | None, *, seed: int | None = None,
                        reference_size: int | None = None) -> bool:
    """Whether the recipe's fit exists and is current: then the recipe only reads the store (no
    writer, no lock: it runs on a read-only store)."""
    return _kl_guided_choice(st, st.model(model), seed, reference_size)[0] is not None


def kl_guided_fit(st: Store, rec: ModelRecord, *, make: bool, seed: int | None,
                  reference_size: int | None) -> tuple[Any, dict]:
    """((scores.Fit, row), how): the fit the recipe runs on, made if needed (see the module doc)."""
    row, how, seed, size, want = _kl_guided_choice(st, rec, seed, reference_size)
    if row is not None:
        return load_fit(st, rec, row=get_fit(st, int(row.fit_id), with_reference=True)), {"fit": how, "made": False}
    command = (f"clipsql stats fit STORE --model {rec.model_id} --for-recipe {KL_GUIDED} "
               f"--reference-size {size} --seed {seed}")
    if not make or st.read_only:
        raise SelectionError(f"the {KL_GUIDED} recipe runs on a fit with the uniform prior at the model's logit "
                             f"scale (a = {want['a']:.6g}, b = {want['b']:.6g}) and this store has no current one: "
                             f"run `{command}` (the default fit of the scores view stays as it is)")
    made = fit_stats(st, rec.model_id, reference_size=size, seed=seed, recipe=KL_GUIDED)
    full = get_fit(st, made.fit_id, with_reference=True)
    return load_fit(st, rec, row=full), {"fit": "recipe fit", "made": True, "command": command}


def kl_guided(pool: Pool, count: int | None, *, make_fit: bool, seed: int | None,
              reference_size: int | None, include_own_pair: bool = False) -> tuple[pa.Table, dict, dict]:
    """Top `count` by text Information Gain on the recipe's fit. A caption drawn into the reference
    leaves its own pair out (docs/science.md §1, §9) unless `include_own_pair` (the authors' code,
    whose selection it then equals); the rule is the recipe's, whatever the fit recorded."""
    fit, how = kl_guided_fit(pool.st, pool.rec, make=make_fit, seed=seed, reference_size=reference_size)
    f, row = fit
    own_pair = "include" if include_own_pair else "exclude"
    row = dataclasses.replace(row, options={**row.options, "own_pair": own_pair})
    tbl = pool.score(["text_info_gain"], (f, row))
    chosen, nulls = top(tbl, "text_info_gain", count)
    o = row.options
    extra = {"recipe_fit": {**how, "fit_id": row.fit_id, "a": f.a, "b": f.b, "prior": f.prior,
                            "seed": o.get("seed"), "reference_size": row.reference_size,
                            "data_version": o.get("data_version"), "settings": kl_guided_settings(pool.rec),
                            "own_pair": own_pair}}
    return chosen, {"null_scores": nulls}, extra


# --------------------------------------------------------------------------- DataComp baselines
def clip_score(pool: Pool, count: int | None, threshold: float | None) -> tuple[pa.Table, dict, dict]:
    """Top `count` by clip_score (ties by id), or every row with clip_score >= `threshold`."""
    tbl = pool.score(["clip_score"])
    chosen, nulls = top(tbl, "clip_score", count, threshold)
    return chosen, {"null_scores": nulls}, {"threshold": threshold}


def default_clusters(pool_size: int) -> int:
    return max(1, min(pool_size, round(pool_size / ROWS_PER_CLUSTER)))


def image_based(pool: Pool, target: Any, target_rows: np.ndarray, *, clusters: int | None, sample: int | None,
                seed: int, iterations: int = kmeans.DEFAULT_ITERATIONS) -> tuple[pa.Table, dict, dict]:
    """DataComp's image-based baseline over the pool (see the module doc); rows in id order."""
    ids, vectors, everything = _pool_vectors_ids(pool, keep=sample is None)
    n = len(ids)
    if n == 0:
        raise SelectionError("the pool has no rows with a valid image embedding")
    k = int(clusters) if clusters is not None else default_clusters(n)
    if not 1 <= k <= n:
        raise SelectionError(f"`clusters` must be between 1 and the {n} pool rows with an image; got {k}",
                             param="clusters")
    m = n if sample is None else int(sample)
    if not k <= m:
        raise SelectionError(f"`sample` ({m}) must be at least `clusters` ({k})", param="sample")
    if everything is not None and m >= n:      # the sample is the pool, read once in pass 1
        positions, train = np.arange(n), everything
    else:
        positions = np.sort(np.random.default_rng(seed).choice(n, size=min(m, n), replace=False))
        train = vectors(positions)
    centroids = kmeans.lloyd(train, k, iterations=iterations, seed=seed)
    if everything is not None:
        labels = kmeans.assign(everything, centroids)
    else:
        labels = np.concatenate([kmeans.assign(X, centroids) for X in _pool_normalized(pool)])
    del train, everything
    wanted = np.unique(kmeans.assign(target_rows, centroids))
    keep = np.flatnonzero(np.isin(labels, wanted))
    kept_ids = ids.take(pa.array(keep, pa.int64()))
    tbl = pa.table({"id": kept_ids, "image_cluster": pa.array(labels[keep], pa.int64())})
    tbl = tbl.take(pc.sort_indices(tbl, [("id", "ascending")]))
    extra = {"image_based": {"clusters": k, "sample": int(len(positions)), "iterations": iterations, "seed": seed,
                             "init": "k distinct sample rows drawn by numpy default_rng(seed)",
                             "kmeans": "Lloyd under L2 on normalized image embeddings (as DataComp's faiss run)",
                             "assignment": "largest inner product with a centroid (DataComp's get_centroid_ids)",
                             "target_clusters": int(len(wanted)), "target": target.summary().as_dict()}}
    return tbl, {"pool_with_image": n}, extra


def _pool_normalized(pool: Pool):
    for _, X in pool.image_batches():
        Xh, ok = normalize(X)
        yield Xh[ok].astype(np.float32)


def _pool_vectors_ids(pool: Pool, keep: bool = False
                      ) -> tuple[pa.Array, Callable[[np.ndarray], np.ndarray], np.ndarray | None]:
    """Ids of the pool rows with a valid image embedding (in scan order), a reader of the
    normalized vectors at sorted positions among them (a second pass, O(sample × d) memory), and
    with `keep` (the sample is the whole pool) all those vectors, float32, read in this one pass."""
    chunks, kept = [], []
    for ids, X in pool.image_batches():
        Xh, ok = normalize(X)
        chunks.append(ids.filter(pa.array(ok)))
        if keep:
            kept.append(Xh[ok].astype(np.float32))
    ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    everything = (np.concatenate(kept) if kept else np.empty((0, pool.rec.dim), np.float32)) if keep else None

    def vectors(positions: np.ndarray) -> np.ndarray:
        out, start = [], 0
        for X in _pool_normalized(pool):
            sel = positions[(positions >= start) & (positions < start + len(X))] - start
            out.append(X[sel])
            start += len(X)
        return np.concatenate(out) if out else np.empty((0, pool.rec.dim), np.float32)
    return ids, vectors, everything


def fraction_count(fraction: float, pool: int) -> int:
    """floor(F × pool) with F taken as the decimal it is written as (so 0.29 × 100 is 29)."""
    return int(math.floor(Decimal(str(fraction)) * pool))


__all__ = ["Pool", "rank", "top", "kl_guided", "kl_guided_fit", "kl_guided_settings", "clip_score", "image_based",
           "default_clusters", "fraction_count"]
