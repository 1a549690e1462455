"""Every SQL function clipsql adds to DuckDB, registered in one place: `register`.

Score functions are vectorized Arrow UDFs: DuckDB hands a batch (≤ 2048 rows: its vector
size, fixed at build time, so the per-batch work is kept small rather than the batch made
large), the batch becomes one (n, d) matrix (float64; float32 as stored, without a copy, for
the §2 quadratic forms, whose operands are prepared once per connection) and one numpy call
scores it.
Optional arguments (the model) come from overloaded SQL macros over fixed-arity
UDFs. NaN (zero, NULL or non-finite vectors) comes back as NULL. BLAS is pinned
to one thread inside UDF work; DuckDB's threads parallelize across batches.

The functions, their arguments, kernels and NULL rules are declared once in `queries.sql.specs`
(`SPECS`); `register` builds every UDF and macro from there (`clipsql sql` → `.help` lists them).

Information Gain leaves a reference row's own pair out (§1). A row is in the reference when its
id is one of the fit's reference ids (`ref_ids`), so these functions take the row's id as an
optional last argument (the `scores` view, stored scores and recipes pass it); without it the row
is scored as one outside the reference. A fit made with `own_pair = "include"` (`stats fit
--include-own-pair`, the authors' behaviour) keeps every own pair in.

negCLIPLoss needs to know whether a row is itself a reference pair (it then appears
once in its batch). The UDF sees only vectors, so membership is decided by the
vectors: the row's (image, text) float32 bytes are looked up in a hash of the fit's
raw reference pairs (`X_ref_raw`, `Y_ref_raw`). The score is thereby a pure function
of the pair: a row whose vectors equal a reference pair's is scored as that pair.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import UDF_WRAPPER, ClipsqlError, DimensionMismatch, QueryError, from_udf_text
from clipsql.kernels import scores
from clipsql.kernels.arrays import matrix, take_rows
from clipsql.kernels.geometry import MODS, ellipsoid, gaussian_loglik
from clipsql.lazy import threadpoolctl
from clipsql.models import device as DV
from clipsql.models.prompts import PromptCache
from clipsql.queries.sql import specs
from clipsql.queries.sql.nearest import register_nearest
from clipsql.store.fit_rows import FitRow
from clipsql.store.fits import load_fit, no_fit_error
from clipsql.store.records import ModelRecord
from clipsql.store.snapshot import Snapshot
from clipsql.store.store import Store
from clipsql.store.targets import TargetScorer, unknown_target


class ScoreContext:
    """Per-connection models, fits and running statistics, all from the connection's snapshot
    (store.snapshot): what the catalog said when the connection was opened, never a later commit.
    Fit arrays are loaded on first use, by the snapshot's fit id.

    DuckDB calls UDFs from several threads at once, so every first load happens under
    one lock: each object is loaded once, and catalog reads never run concurrently.
    """

    def __init__(self, snap: Snapshot):
        self.snap = snap
        self.st = snap.store
        self._lock = threading.RLock()
        self._models: dict[str | None, ModelRecord] = {}
        self._fits: dict[str, scores.Fit] = {}
        self._fit_rows: dict[str, FitRow] = {}
        self._light: dict[str, scores.Fit] = {}
        self._forms: dict[tuple, scores.QuadraticForm] = {}
        self._ref_lookup: dict[str, dict[bytes, int]] = {}
        self._ref_ids: dict[str, pa.Array] = {}
        self._targets: dict[str, Any] = {}
        self._prompts: Any = None
        self.last_error: BaseException | None = None    # the last exception a UDF of this connection raised

    def guard(self, fn: Callable) -> Callable:
        """`fn` as a UDF that remembers what it raised: DuckDB hands the caller only its own text
        ("Python exception occurred while executing the UDF: …"), `udf_error` gives back the original."""
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as e:
                self.last_error = e
                raise
        return call

    def _cached(self, cache: dict, key: Any, load: Callable[[], Any]) -> Any:
        try:
            return cache[key]
        except KeyError:
            pass
        with self._lock:
            if key not in cache:
                cache[key] = load()
            return cache[key]

    def model(self, name: str | None) -> ModelRecord:
        return self._cached(self._models, name, lambda: self.snap.model(name))

    def score_model(self, name: str | None, function: str) -> ModelRecord:
        """The model a score is computed with. Without a model argument on a store holding several
        models this refuses, naming them: a vector does not say which model made it, and scoring it
        with the default model's fit would be silently wrong (the `scores` view passes each row's own)."""
        if name is None:
            models = self.snap.models
            if len(models) > 1:
                ids = ", ".join(repr(m.model_id) for m in models)
                example = "image_info_gain(image_embedding, " + ids.split(", ")[0] + ")"
                raise QueryError(f"{function} was called without a model on a store holding {len(models)} models "
                                 f"({ids}): pass the model as its last argument, e.g. {example}, or query the "
                                 "`scores` view, which scores every row with its own model")
        return self.model(name)

    def _load_fit(self, rec: ModelRecord) -> scores.Fit:
        fit, self._fit_rows[rec.model_id] = load_fit(self.st, rec, row=self._fit_row(rec, True))
        return fit

    def _fit_row(self, rec: ModelRecord, reference: bool) -> FitRow:
        row = self.snap.fit_with_arrays(rec, reference)
        if row is None:
            raise no_fit_error(rec)
        return row

    def fit(self, rec: ModelRecord) -> scores.Fit:
        return self._cached(self._fits, rec.model_id, lambda: self._load_fit(rec))

    def preload_fit(self, model_id: str, fit: scores.Fit, row: FitRow) -> None:
        """Use this fit (and its catalog row) for `model_id` instead of reading the catalog: a Ray
        task gets the fit the driver broadcast, so every task scores with the same one."""
        with self._lock:
            self._fits[model_id], self._fit_rows[model_id] = fit, row

    def fit_light(self, rec: ModelRecord) -> scores.Fit:
        """The fit without its reference sample (means, covariances, factors): O(d²) memory."""
        if rec.model_id in self._fits:
            return self._fits[rec.model_id]

        def load() -> scores.Fit:
            return load_fit(self.st, rec, reference=False, row=self._fit_row(rec, False))[0]
        return self._cached(self._light, rec.model_id, load)

    def quadratic_form(self, rec: ModelRecord, modality: Any, centered: bool) -> scores.QuadraticForm:
        """The float32 operands (ū, L, scale) of a §2 quadratic form, prepared once per connection."""
        if modality not in scores.MODALITIES:
            raise QueryError(f"modality must be 'image' or 'text', got {modality!r}")
        return self._cached(self._forms, (rec.model_id, modality, centered),
                            lambda: scores.quadratic_form(self.fit_light(rec), modality, centered))

    def fit_row(self, rec: ModelRecord) -> FitRow:
        """The catalog row of the fit `fit(rec)` returns (options, raw reference arrays)."""
        self.fit(rec)
        return self._fit_rows[rec.model_id]

    def reference_index(self, rec: ModelRecord, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Per row, its index in the reference sample (matched on float32 image+text bytes), else -1."""
        def build() -> dict[bytes, int]:
            arr = self.fit_row(rec).arrays
            keys = np.concatenate([arr["X_ref_raw"].astype(np.float32), arr["Y_ref_raw"].astype(np.float32)], 1)
            lookup: dict[bytes, int] = {}
            for j, row in enumerate(keys):
                lookup.setdefault(row.tobytes(), j)
            return lookup
        lookup = self._cached(self._ref_lookup, rec.model_id, build)
        keys = np.ascontiguousarray(np.concatenate([X.astype(np.float32), Y.astype(np.float32)], 1))
        return np.array([lookup.get(row.tobytes(), -1) for row in keys], dtype=np.int64)

    def own_pair(self, rec: ModelRecord) -> str:
        """How the fit's Information Gain treats a reference row's own pair (docs/science.md §1):
        "exclude" (the default, and for fits that predate the option) or "include" (the authors')."""
        return str(self.fit_row(rec).options.get("own_pair", scores.OWN_PAIR[0]))

    def reference_positions(self, rec: ModelRecord, ids: Any) -> np.ndarray | None:
        """Per row, its position in the fit's reference sample when its id is one of the sample's
        ids, else -1 (NULL ids: -1); None when the fit keeps own pairs in ("include"). Membership is
        the row's id, not its vectors: another row duplicating a reference pair is not that pair."""
        if self.own_pair(rec) == "include":
            return None

        def build() -> pa.Array:
            return pa.array(np.asarray(self.fit_row(rec).arrays["ref_ids"]).astype(str), pa.string())
        ref_ids = self._cached(self._ref_ids, rec.model_id, build)
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        pos = pc.index_in(ids.cast(pa.string()), value_set=ref_ids)
        return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def target(self, name: str) -> Any:
        def load() -> Any:
            if name in self.snap.damaged_targets:
                raise self.snap.damaged_targets[name]
            if name not in self.snap.targets:
                raise unknown_target(name, sorted(self.snap.targets))
            return TargetScorer(self.st, self.snap.targets[name])
        return self._cached(self._targets, name, load)

    @property
    def prompts(self) -> Any:
        if self._prompts is None:
            with self._lock:
                if self._prompts is None:
                    self._prompts = PromptCache()
        return self._prompts

    def running(self, rec: ModelRecord) -> Any:
        return self.snap.stats[rec.model_id]


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Pin BLAS to one thread around a query, on the calling thread.

    DuckDB runs UDF batches on several threads; with a multi-threaded BLAS under each
    they oversubscribe the cores (measured: half the throughput). The BLAS thread count
    is process-global and OpenBLAS ignores changes made from DuckDB's worker threads, so
    the pin belongs around the query on the thread that runs it — `clipsql query` and
    the other commands do this; from Python: `with queries.one_blas_thread(): con.sql(…)`.
    """
    try:
        threadpool_limits = threadpoolctl.threadpool_limits
    except ImportError:  # pinning is an optimisation only
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blas_pinned(fn: Callable) -> Callable:
    """Decorator: run `fn` (an entry point that runs score SQL) under `one_blas_thread()`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_blas_thread():
            return fn(*args, **kwargs)
    return wrapper


def _constant(arr: Any) -> tuple[bool, Any]:
    """(True, value) when every row of an argument column holds the same value (NULL included), found
    in Arrow without a Python object per row: the model and modality columns of a batch usually are."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return True, None
    distinct = pc.unique(arr)
    return (True, distinct[0].as_py()) if len(distinct) == 1 else (False, None)


def _groups(arr: Any, n: int) -> list[tuple[Any, np.ndarray]]:
    """Split row indices by the value of a (usually constant) argument column."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    same, value = _constant(arr)
    if same:
        return [(value, np.arange(n))]
    values = arr.to_pylist()
    first = values[0] if values else None
    if all(v == first for v in values):
        return [(first, np.arange(n))]
    out: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return [(k, np.array(v)) for k, v in out.items()]


def _result(values: np.ndarray) -> pa.Array:
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, type=pa.float64(), mask=~np.isfinite(values))


def _scored(ctx: ScoreContext, fn: Callable[[np.ndarray, ModelRecord, Any], np.ndarray],
            dtype: Any = np.float64) -> Callable:
    """Wrap `fn(X, model, modality)` into an Arrow UDF (emb, modality, model); X is `dtype` (float32:
    the stored FLOAT values as they come, no copy)."""
    def udf(emb: Any, modality: Any, model: Any) -> pa.Array:
        n = len(emb)
        out = np.full(n, np.nan)
        for (mod, mname), idx in pair_groups(modality, model, n):
            if mod not in (None, "image", "text"):
                raise QueryError(f"modality must be 'image' or 'text', got {mod!r}")
            rec = ctx.score_model(mname, "a score function")
            col = emb if len(idx) == n else take_rows(emb, idx)
            out[idx] = fn(matrix(col, rec.dim, f"{mod or ''} embedding".strip(), dtype), rec, mod)
        return _result(out)
    return udf


def _info_gain_scored(ctx: ScoreContext, reverse: bool) -> Callable:
    """Arrow UDF (emb, modality, model, id) of the exact Information Gain (docs/science.md §1): a row
    whose id is in the fit's reference sample leaves its own pair out (unless the fit says "include");
    a NULL id is scored as a row outside the reference."""
    def udf(emb: Any, modality: Any, model: Any, ids: Any) -> pa.Array:
        n = len(emb)
        out = np.full(n, np.nan)
        for (mod, mname), idx in pair_groups(modality, model, n):
            if mod not in ("image", "text"):
                raise QueryError(f"modality must be 'image' or 'text', got {mod!r}")
            rec = ctx.score_model(mname, "a score function")
            X = matrix(_sub(emb, idx, n), rec.dim, f"{mod} embedding")
            fit = ctx.fit(rec)
            ref = ctx.reference_positions(rec, _sub(ids, idx, n))
            out[idx] = DV.info_gain(X, fit, mod, reverse=reverse, ref_index=ref)   # $CLIPSQL_DEVICE: numpy or a GPU
        return _result(out)
    return udf


def pair_groups(a: Any, b: Any, n: int) -> list[tuple[tuple[Any, Any], np.ndarray]]:
    ga = _groups(a, n)
    gb = _groups(b, n)
    if len(ga) == 1 and len(gb) == 1:
        return [((ga[0][0], gb[0][0]), np.arange(n))]
    va = a.to_pylist() if not isinstance(a, pa.ChunkedArray) else a.combine_chunks().to_pylist()
    vb = b.to_pylist() if not isinstance(b, pa.ChunkedArray) else b.combine_chunks().to_pylist()
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(va, vb)):
        out.setdefault(key, []).append(i)
    return [(k, np.array(v)) for k, v in out.items()]


def _key_groups(cols: list[Any], n: int) -> list[tuple[tuple, np.ndarray]]:
    """Split row indices by the tuple of values of (usually constant) argument columns."""
    consts = [_constant(c) for c in cols]
    if all(same for same, _ in consts):
        return [(tuple(v for _, v in consts), np.arange(n))]
    lists = [(c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c).to_pylist() for c in cols]
    if all(all(v == vals[0] for v in vals) for vals in lists if vals):
        return [(tuple(vals[0] if vals else None for vals in lists), np.arange(n))]
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*lists)):
        out.setdefault(key, []).append(i)
    return [(k, np.array(v)) for k, v in out.items()]


def _sub(arr: Any, idx: np.ndarray, n: int) -> Any:
    return arr if len(idx) == n else take_rows(arr, idx)


def _pair_scored(ctx: ScoreContext, fn: Callable[[np.ndarray, np.ndarray, ModelRecord], np.ndarray]) -> Callable:
    """Wrap `fn(X, Y, model)` (paired image/text rows) into an Arrow UDF (img, txt, model)."""
    def udf(img: Any, txt: Any, model: Any) -> pa.Array:
        n = len(img)
        out = np.full(n, np.nan)
        for (mname,), idx in _key_groups([model], n):
            rec = ctx.score_model(mname, "a score function")
            X = matrix(_sub(img, idx, n), rec.dim, "image embedding")
            Y = matrix(_sub(txt, idx, n), rec.dim, "text embedding")
            out[idx] = fn(X, Y, rec)
        return _result(out)
    return udf


def _neg_clip_params(ctx: ScoreContext, rec: ModelRecord) -> dict:
    """negCLIPLoss batch options recorded with the fit (defaults for fits that predate them)."""
    row = ctx.fit_row(rec)
    opts = dict(tau=0.01, batch_size=min(32768, int(row.reference_size) + 1), k=10,
                seed=int(row.options.get("seed", 0)))
    opts.update(row.options.get("neg_clip") or {})
    return opts


def _neg_clip(ctx: ScoreContext, X: np.ndarray, Y: np.ndarray, rec: ModelRecord) -> np.ndarray:
    p = _neg_clip_params(ctx, rec)
    return scores.neg_clip_loss(X, Y, ctx.fit(rec), ctx.reference_index(rec, X, Y), tau=float(p["tau"]),
                                batch_size=int(p["batch_size"]), k=int(p["k"]), seed=int(p["seed"]))


def _neg_siglip(ctx: ScoreContext, X: np.ndarray, Y: np.ndarray, rec: ModelRecord) -> np.ndarray:
    if rec.kind != "siglip" or rec.logit_bias is None:
        raise QueryError(f"neg_siglip_loss needs a SigLIP model (sigmoid loss with a logit bias); "
                         f"{rec.model_id} is a {rec.kind} model: use neg_clip_loss")
    p = _neg_clip_params(ctx, rec)
    return scores.neg_siglip_loss(X, Y, ctx.fit(rec), ctx.reference_index(rec, X, Y), rec.logit_scale,
                                  rec.logit_bias, batch_size=int(p["batch_size"]), k=int(p["k"]),
                                  seed=int(p["seed"]))


def _target_scored(ctx: ScoreContext, method: str) -> Callable:
    """Arrow UDF (emb, target name) calling `TargetScorer.<method>(X)`."""
    def udf(emb: Any, target: Any) -> pa.Array:
        n = len(emb)
        out = np.full(n, np.nan)
        for (name,), idx in _key_groups([target], n):
            if name is None:
                continue
            scorer = ctx.target(name)
            X = matrix(_sub(emb, idx, n), scorer.t.dim, f"image embedding (target {name})")
            out[idx] = getattr(scorer, method)(X)
        return _result(out)
    return udf


def _text_embedding(ctx: ScoreContext) -> Callable:
    def udf(prompt: Any, model: Any) -> pa.Array:
        n = len(prompt)
        texts = (prompt.combine_chunks() if isinstance(prompt, pa.ChunkedArray) else prompt).to_pylist()
        out: list[Any] = [None] * n
        for (mname,), idx in _key_groups([model], n):
            rec = ctx.model(mname)
            todo = sorted({texts[i] for i in idx if texts[i] is not None})
            vectors = dict(zip(todo, (v.tolist() for v in ctx.prompts.embed(rec, todo))))
            for i in idx:
                if texts[i] is not None:
                    out[i] = vectors[texts[i]]
        return pa.array(out, type=pa.list_(pa.float32()))
    return udf


def _importance_weight(ctx: ScoreContext) -> Callable:
    def udf(emb: Any, prompt: Any, scale: Any, model: Any) -> pa.Array:
        n = len(emb)
        out = np.full(n, np.nan)
        for (p, a, mname), idx in _key_groups([prompt, scale, model], n):
            if p is None or a is None:
                continue
            rec = ctx.score_model(mname, "importance_weight")
            yq = ctx.prompts.embed(rec, [p])[0]
            X = matrix(_sub(emb, idx, n), rec.dim, "image embedding")
            out[idx] = scores.importance_weight(X, yq, ctx.fit(rec), a=float(a))
        return _result(out)
    return udf


# connection → its ScoreContext, for `udf_error` (weak: a closed, dropped connection leaves)
_CONTEXTS: "weakref.WeakKeyDictionary[Any, ScoreContext]" = weakref.WeakKeyDictionary()


def udf_error(e: BaseException, con: Any = None) -> ClipsqlError | None:
    """The clipsql error raised inside a UDF that DuckDB reported as `e` (its message wrapped in
    DuckDB's "Invalid Input Error: Python exception occurred while executing the UDF: …"), or None
    when `e` is not such an error. The exception is the one the UDF raised (kept by
    `ScoreContext.guard` for `con`, or for any open connection when `con` is not known) when its
    message is the one DuckDB reports; else it is rebuilt from DuckDB's text."""
    text = str(e)
    if UDF_WRAPPER not in text:
        return None
    ctx = _CONTEXTS.get(con) if con is not None else None
    for c in [ctx] if ctx is not None else list(_CONTEXTS.values()):
        orig = c.last_error
        if isinstance(orig, ClipsqlError) and str(orig).strip() in text:
            c.last_error = None
            return orig
    return from_udf_text(text)


def register(con: Any, snap: Snapshot | Store) -> ScoreContext:
    """Register every clipsql SQL function on `con` (one place, one call), from `specs.SPECS`, over
    the snapshot `snap` (a Store: its snapshot as of now)."""
    snap = snap if isinstance(snap, Snapshot) else Snapshot.read(snap)
    ctx = ScoreContext(snap)
    _CONTEXTS[con] = ctx
    # The store's embedding width, when all its models share one: every score UDF taking embeddings
    # is also declared on FLOAT[d] and each macro gets an overload typed on FLOAT[d], so
    # FLOAT[d] columns reach the UDF without DuckDB's ARRAY → LIST cast (measured ~10 % of a
    # scan; bench/scores.py). With several widths the typed overloads would be ambiguous for
    # NULL and list literals, so only the untyped FLOAT[] path is registered then.
    dims = sorted({m.dim for m in snap.models})
    typed = dims[0] if len(dims) == 1 else None
    for u in specs.UDFS:
        fn = ctx.guard(IMPLEMENTATIONS[u.impl](ctx))
        con.create_function(u.name, fn, list(u.params), u.returns, type="arrow", null_handling="special",
                            side_effects=False)
        if typed is not None and u.returns == specs.D:
            con.create_function(f"{u.name}_d{typed}", fn, [f"FLOAT[{typed}]" if t == specs.F else t for t in u.params],
                                u.returns, type="arrow", null_handling="special", side_effects=False)
    # native DuckDB array functions where they already compute the thing; non-finite → NULL
    # (a NULL vector is tested first: DuckDB's list functions refuse a NULL array read from Arrow)
    con.execute("CREATE OR REPLACE MACRO _clipsql_finite(x) AS CASE WHEN isfinite(x) THEN x END")
    # a vector function's result: FLOAT[d] of the default model's d; with a model argument, FLOAT[d]
    # when every model of the store has the same d, else FLOAT[] (as the `embeddings` view does)
    default_cast = f"::FLOAT[{snap.model().dim}]" if dims else ""
    model_cast = f"::FLOAT[{dims[0]}]" if len(dims) == 1 else ""
    returns = {u.name: u.returns for u in specs.UDFS}
    for f in specs.FUNCTIONS:
        con.execute(f"CREATE OR REPLACE MACRO {f.name}" + ", ".join(_macro_overloads(f, returns, typed, default_cast,
                                                                                     model_cast)))
    # nearest(q, k [, model [, modality]] [, filter := SQL] [, exact := bool]) (queries.sql.nearest)
    register_nearest(con, ctx)
    return ctx


def _macro_overloads(f: specs.SqlFunction, returns: dict[str, str], typed: int | None, default_cast: str,
                     model_cast: str) -> list[str]:
    """The `(params) AS body` overloads of one macro. A score's overloads come typed on FLOAT[d] (its
    embedding parameters; the `_d{d}` UDF) when the store has one width, and untyped (`::FLOAT[]` casts,
    the FLOAT[] UDF); a vector function's result is cast to FLOAT[d] as `default_cast`/`model_cast` say."""
    if f.body is not None:
        return [f"({', '.join(f.args)}) AS {f.body}"]
    parts = []
    for params, call in f.overloads():
        if returns[f.udf] != specs.D:
            cast = model_cast if "model" in params else default_cast
            parts.append(f"({', '.join(params)}) AS {f.udf}({', '.join(call)}){cast}")
            continue
        if typed is not None:
            tparams = ", ".join(f"{p} FLOAT[{typed}]" if p in specs.EMBEDDING_PARAMS else p for p in params)
            parts.append(f"({tparams}) AS {f.udf}_d{typed}({', '.join(call)})")
        ucall = ", ".join(f"{a}::FLOAT[]" if a in specs.EMBEDDING_PARAMS else a for a in call)
        parts.append(f"({', '.join(params)}) AS {f.udf}({ucall})")
    return parts


# spec `Udf.impl` → (ctx → Arrow UDF): the code between DuckDB's batches and the spec's kernel
IMPLEMENTATIONS: dict[str, Callable[[ScoreContext], Callable]] = {
    "info_gain": lambda ctx: _info_gain_scored(ctx, False),
    "info_gain_reverse": lambda ctx: _info_gain_scored(ctx, True),
    # the quadratic forms of §2 in float32 (their bound: docs/science.md §2), operands prepared once
    "info_gain_approx": lambda ctx: _scored(ctx, lambda X, rec, mod: scores.quadratic_scores(
        X, ctx.quadratic_form(rec, mod, False)), np.float32),
    "centered_norm": lambda ctx: _scored(ctx, lambda X, rec, mod: scores.quadratic_scores(
        X, ctx.quadratic_form(rec, mod, True)), np.float32),
    "conformity": lambda ctx: _scored(ctx, lambda X, rec, mod: _conformity(ctx, X, rec, mod)),
    "conformity_estimate": lambda ctx: _scored(ctx, lambda X, rec, mod: scores.conformity_estimate(
        X, ctx.running(rec).moments[(mod, "normalized")].mean)),
    "conformity_estimate_raw": lambda ctx: _scored(ctx, lambda X, rec, mod: scores.conformity_estimate_raw(
        X, ctx.running(rec).moments[(mod, "raw")].mean)),
    "neg_clip_loss": lambda ctx: _pair_scored(ctx, lambda X, Y, rec: _neg_clip(ctx, X, Y, rec)),
    "neg_siglip_loss": lambda ctx: _pair_scored(ctx, lambda X, Y, rec: _neg_siglip(ctx, X, Y, rec)),
    "norm_sim_2": lambda ctx: _target_scored(ctx, "norm_sim_2"),
    "norm_sim_inf": lambda ctx: _target_scored(ctx, "norm_sim_inf"),
    "importance_weight": lambda ctx: _importance_weight(ctx),
    "text_embedding": lambda ctx: _text_embedding(ctx),
    "vslerp": lambda ctx: vslerp_udf(ctx),
}


def _conformity(ctx: ScoreContext, X: np.ndarray, rec: ModelRecord, modality: str) -> np.ndarray:
    m = ctx.running(rec).moments[(modality, "normalized")]
    return scores.conformity(X, m.sum, m.n, member=True)


def vslerp_udf(ctx: Any) -> Callable:
    """Arrow UDF behind ``vslerp(a, b, theta, alpha [, model [, modality]])`` (registered in
    `register`): ``SLERP(a − αm, b − αm, θ) + αm`` by ``scores.vslerp``.

    ``m`` is the modality centre: the RAW mean of that modality's stored vectors of the model
    (its running statistics, so it tracks the store). The 6th argument names the modality
    ('image' or 'text'). When it is NULL (the 4- and 5-argument forms) each row uses the
    modality in whose ellipsoid the midpoint (a + b)/2 is more likely: the larger Gaussian
    log-likelihood under N(m, C) of the running raw mean and covariance (ridge 1e-6·tr C/d;
    kernels.geometry.ellipsoid) — the double-ellipsoid picture. Nearest mean alone is not enough: the modality gap can be
    small next to the spread (the demo model classifies ~80% of vectors right by nearest mean,
    100% by likelihood). Two images thus pick the image centre and two captions the text
    centre; pass the modality to be explicit, e.g. across modalities. NULL or non-finite
    a, b, θ or α give NULL. θ outside [0, 1] extrapolates along the arc.
    """
    def col(arr: Any) -> np.ndarray:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        return pc.fill_null(arr.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)

    cache: dict = {}

    def udf(a: Any, b: Any, theta: Any, alpha: Any, model: Any, modality: Any) -> Any:
        n = len(a)
        th, al = col(theta), col(alpha)
        rows: list[Any] = [None] * n
        for (mod, mname), idx in pair_groups(modality, model, n):
            if mod not in (None, "image", "text"):
                raise QueryError(f"vslerp modality must be 'image', 'text' or NULL, got {mod!r}")
            rec = ctx.model(mname)
            A = matrix(a if len(idx) == n else take_rows(a, idx), rec.dim, "vslerp a")
            B = matrix(b if len(idx) == n else take_rows(b, idx), rec.dim, "vslerp b")
            state = ctx.running(rec)
            centre = {m: state.moments[(m, "raw")].mean for m in MODS}
            if mod is None:
                ll = {m: gaussian_loglik((A + B) / 2, *ellipsoid(cache, rec, state, m)) for m in MODS}
                which = np.where(ll["image"] >= ll["text"], "image", "text")
            else:
                which = np.full(len(idx), mod)
            t, al_g = th[idx], al[idx]
            ok = np.isfinite(A).all(1) & np.isfinite(B).all(1) & np.isfinite(t) & np.isfinite(al_g)
            for m in MODS:
                if not np.isfinite(centre[m]).all():
                    continue
                for alpha_v in np.unique(al_g[ok & (which == m)]):
                    sel = np.flatnonzero(ok & (which == m) & (al_g == alpha_v))
                    res = scores.vslerp(A[sel], B[sel], t[sel, None], float(alpha_v), centre[m])
                    for j, row in zip(sel, res):
                        if np.isfinite(row).all():
                            rows[idx[j]] = row.astype(np.float32)
        return pa.array(rows, type=pa.list_(pa.float32()))
    return udf
