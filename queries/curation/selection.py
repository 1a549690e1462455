"""`clipsql select`: curation recipes (docs/science.md §9, §11) and the export of the chosen ids.

    select(st, recipe="kl-guided", output="subset.parquet")
    select(st, SelectSpec(recipe="clip-score", where="semdedup_max_sim < 0.99"), output="uids.npy")

Recipes (queries.curation.recipes has their definitions):
* `kl-guided`: the top `fraction` (default 25%) by text Information Gain against the uniform
  prior at the model's logit scale, on a fit with exactly those settings (made if needed); a
  reference row leaves its own pair out unless `include_own_pair` (the authors' behaviour).
* `negclip-normsim`: the top `first_fraction` (default 30%) by `neg_clip_loss` (the per-row
  stable form; `negclip_form="pool"` uses the stored `neg_clip_loss_pool`), then among those the
  top rows by `norm_sim_inf(image, target)` up to `fraction` (default 20%) of the pool.
* `clip-score`: DataComp's CLIP-score baseline, the top `fraction` (default 30%) by `clip_score`
  or every row with `clip_score >= threshold`.
* `image-based`: DataComp's image-based clustering baseline against a named target set.
* `sql`: any query returning an `id` column; its row order decides.

`where` (SQL over `samples`, the model's `semdedup_*` columns and its stored scores) narrows the
pool first, so "dedup, then KL-guided" is one call; fractions are of the narrowed pool.
A fraction F keeps `floor(F × pool)` rows, F read as the decimal it is written as (so 0.29 × 100
is 29, not 28); `limit` keeps N rows. Rows are ranked by score descending, ties broken by id
ascending (byte order); rows whose score is NULL are never chosen, so fewer rows than asked
come back when the pool has fewer scored rows (the sidecar says so).

Output: `.parquet`, `.csv` (id, uri, caption, the scores used, in rank order), `.txt` (one id per
line) or `datacomp-uids` (`.npy`: the sorted uid array DataComp's resharder reads), plus
`<output>.json`: recipe, model, statistics version (fit), seeds, every option, the counts, the run
id and the output's sha256. The sidecar is published first, then the output: `check_output(path)`
tells whether an output and its sidecar belong together (a killed select can leave a new sidecar
beside the previous output).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from clipsql.errors import ClipsqlError, SelectionError
from clipsql.files import fsync_path, sha256_file
from clipsql.lazy import duckdb
from clipsql.queries.curation import recipes
from clipsql.queries.curation.datacomp import require_datacomp_ids, write_uids
from clipsql.queries.curation.recipes import fraction_count as count_for  # noqa: F401 - the public names of this module
from clipsql.queries.curation.recipes import rank
from clipsql.queries.sql.condition import check_condition
from clipsql.queries.sql.db import connect, quote_ident, quote_literal
from clipsql.queries.sql.engine import LOCAL, Engine
from clipsql.queries.sql.functions import blas_pinned, udf_error
from clipsql import leftovers
from clipsql.store.faults import fault
from clipsql.store.fit_rows import get_fit, latest_fit
from clipsql.store.reads import count_rows
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store
from clipsql.store.tables import dedup_table_name, stored_table_name
from clipsql.store.targets import get_target, target_rows

DEFAULT_FIRST_FRACTION = 0.30
FORMATS = (".parquet", ".csv", ".txt", ".npy")
OUTPUT_FORMATS = ("parquet", "csv", "txt", "datacomp-uids")
TIE_RULE = "score descending, ties by id ascending; NULL scores never chosen"
ROUNDING = "count = floor(F x pool), F as written in decimal; --limit N keeps N"


@dataclass(frozen=True)
class RecipeSpec:
    """One curation recipe, declared once: the CLI's choices and help, `SelectSpec.check` and the
    dispatch in `_run` come from `RECIPE_SPECS`.

    `options`: the recipe-only SelectSpec fields it reads (giving one to another recipe is an
    error; `OPTION_GROUPS` names them); `default_fraction`: the cut when none is given (None: it
    keeps what it keeps, and takes no --fraction or --limit); `pool_score`: the pool-wide score the
    engine computes; `sidecar`: the keys it adds to `<output>.json`; `run(pool, spec, count,
    fraction)` → (rows, counts, sidecar fields); `fit_ready(st, model, spec)`: for a recipe that makes
    its own fit, whether that fit exists (else the selection writes to the catalog)."""
    name: str
    help: str
    default_fraction: float | None
    options: frozenset[str]
    pool_score: str
    sidecar: tuple[str, ...]
    run: Callable[[Any, Any, Any, Any], tuple[pa.Table, dict, dict]]
    needs_target: bool = False
    fit_ready: Callable[[Store, str | None, Any], bool] | None = None


@dataclass(frozen=True)
class SelectSpec:
    """What to select: a recipe (and its options) or SQL, the cut, and the pool filter."""
    recipe: str | None = None
    sql: str | None = None
    target: str | None = None
    fraction: float | None = None
    limit: int | None = None
    threshold: float | None = None          # clip-score: keep clip_score >= threshold
    where: str | None = None                # SQL narrowing the pool first
    first_fraction: float = DEFAULT_FIRST_FRACTION
    negclip_form: str = "row"
    clusters: int | None = None             # image-based: k (default pool / 128)
    sample: int | None = None               # image-based: k-means training rows (default: the pool)
    seed: int | None = None                 # image-based k-means; kl-guided's fit (default: the default fit's)
    reference_size: int | None = None       # kl-guided's fit (default: the default fit's)
    make_fit: bool = True                   # kl-guided: make the recipe's fit when missing
    include_own_pair: bool = False          # kl-guided: keep a reference row's own pair (the authors' code)
    format: str | None = None               # output format (default: from the suffix)

    def check(self) -> None:
        s = self
        if (s.recipe is None) == (s.sql is None):
            raise SelectionError(f"give exactly one of `recipe` ({' | '.join(RECIPES)}) or `sql` \"SELECT id …\"",
                                 param="recipe")
        if s.recipe is not None and s.recipe not in RECIPES:
            raise SelectionError(f"unknown recipe {s.recipe!r}; choose one of {', '.join(RECIPES)}", param="recipe")
        if sum(x is not None for x in (s.fraction, s.limit, s.threshold)) > 1:
            raise SelectionError("give one of `fraction`, `limit` or `threshold`, not both", param="fraction")
        for name, f in (("fraction", s.fraction), ("first_fraction", s.first_fraction)):
            if f is not None and not 0 < f <= 1:
                raise SelectionError(f"`{name}` must be in (0, 1]; got {f}", param=name)
        if s.limit is not None and s.limit < 0:
            raise SelectionError(f"`limit` must be >= 0; got {s.limit}", param="limit")
        recipe = RECIPE_SPECS.get(s.recipe) if s.recipe is not None else None
        if recipe is not None and recipe.needs_target and not s.target:
            raise SelectionError(f"the {s.recipe} recipe needs `target` NAME (see `clipsql target list`)", param="target")
        for group in OPTION_GROUPS:
            given = [f for f in group if getattr(s, f) != _FIELD_DEFAULTS[f]]
            if given and (recipe is None or not set(given) <= recipe.options):
                flags = " and ".join(f"`{f}`" for f in group)
                users = " and ".join(r.name for r in RECIPE_SPECS.values() if set(group) & r.options)
                raise SelectionError(f"{flags} {'is' if len(group) == 1 else 'are'} only used by `recipe` {users}",
                                     param=group[0])
        if recipe is not None and recipe.default_fraction is None and (s.fraction is not None or s.limit is not None):
            raise SelectionError(f"{s.recipe} keeps whole clusters: it takes no `fraction` or `limit` (narrow "
                                 "the pool with `where`, or set `clusters`)", param="fraction")
        if s.clusters is not None and s.clusters < 1:
            raise SelectionError(f"`clusters` must be >= 1; got {s.clusters}", param="clusters")
        if s.where is not None:
            check_condition(None, s.where, example="width >= 256")      # one condition, nothing more
        if s.negclip_form not in ("row", "pool"):
            raise SelectionError(f"`negclip_form` must be row or pool; got {s.negclip_form!r}", param="negclip_form")


@dataclass(frozen=True)
class RecipeFit:
    """The fit a kl-guided selection ran on: `fit` says which (the default fit, or the recipe's own
    fit), `made` whether this run made it (and `command` the one that makes it again); its
    `fit_id`, cosine scale `a`, bias `b`, `prior`, reference draw (`seed`, `reference_size`) at
    `data_version`, the recipe's published `settings` and `own_pair` (include / exclude)."""
    fit: str
    made: bool
    fit_id: int
    a: float
    b: float
    prior: str
    seed: int | None
    reference_size: int
    data_version: int | None
    settings: dict[str, Any]
    own_pair: str
    command: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeFit:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


# the keys every sidecar holds (a recipe's own keys, `RecipeSpec.sidecar`, come with `details`)
@dataclass
class Selection:
    """What a select did, as `<output>.json` (its sidecar) records it: the recipe (or `sql`), the
    model, the cut (`fraction`, `limit`), the pool condition `where`, the fit's `statistics`, the
    seeds, the output and its `format` and `sha256`, `counts` (pool, requested, selected and the
    recipe's own), `warnings`, a `run_id`; `details`: the recipe's own keys (kl-guided:
    `recipe_fit`; image-based: `image_based`; negclip-normsim: `target`, `first_fraction`,
    `negclip_form`; clip-score: `threshold`). `sidecar` is the sidecar's path."""
    recipe: str
    sql: str | None
    model: str
    model_kind: str
    fraction: float | None
    limit: int | None
    where: str | None
    rounding: str
    ties: str
    statistics: dict[str, Any] | None
    output: str
    format: str
    engine: str
    options: dict[str, Any]
    seeds: dict[str, Any]
    score_columns: list[str]
    counts: dict[str, Any]
    warnings: list[str]
    run_id: str
    created_at: str
    details: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    seconds: float | None = None
    sidecar: str | None = None

    @property
    def selected(self) -> int:
        return int(self.counts["selected"])

    @property
    def pool(self) -> int:
        return int(self.counts["pool"])

    @property
    def recipe_fit(self) -> RecipeFit | None:
        """kl-guided: the fit it ran on."""
        made = self.details.get("recipe_fit")
        return RecipeFit.from_dict(made) if made is not None else None

    def to_json(self) -> dict[str, Any]:
        """The sidecar file's content (`sidecar`, its own path, is not in it)."""
        out = {**self.details, **{f.name: getattr(self, f.name) for f in fields(self)
                                  if f.name not in ("details", "sidecar")}}
        return {k: v for k, v in out.items() if v is not None or k not in ("sha256", "seconds")}


@blas_pinned
def select(st: Store, spec: SelectSpec | None = None, *, output: str | Path, model: str | None = None,
           engine: Engine = LOCAL, **fields: Any) -> Selection:
    """Run a recipe (or SQL), cut to the exact count, write `output` and `<output>.json`; returns what
    the sidecar records (`Selection.to_json()` is the file's content).

    `spec` (or its fields as keywords) says what to select. `engine` computes the recipe's
    pool-wide score (queries.sql.engine: DuckDB here, or one Ray task per fragment with the engine
    engines.choose("ray") gives); the ranking and the cut are the same."""
    t0 = time.perf_counter()
    spec = SelectSpec(**fields) if spec is None else SelectSpec(**{**asdict(spec), **fields})
    output = Path(output)
    fmt = _output_format(output, spec.format)
    spec.check()
    if not engine.in_process and spec.sql is not None:
        raise SelectionError("`sql` runs in DuckDB: set `engine` to local (`clipsql score --engine ray` stores "
                             "scores that `sql` can read from stored_scores)", param="sql")
    rec = st.model(model)
    con = connect(st)
    try:
        pool = _pool(st, rec, con, spec.where, engine)
        tbl, counts, side = _run(pool, spec)
        tbl = _with_samples(con, tbl)
        if fmt == "datacomp-uids":
            require_datacomp_ids(st, con, tbl.column("id"))
    except Exception as e:  # noqa: BLE001 - DuckDB wraps errors raised inside UDFs
        if isinstance(e, ClipsqlError):
            raise
        raise udf_error(e) or SelectionError(f"selection failed: {e}") from None
    finally:
        con.close()
    fit_info = _fit_info(st, rec, side.get("recipe_fit", {}).get("fit_id"))
    fraction = side.pop("fraction", spec.fraction)
    warnings = list(pool.info.get("warnings", []))
    if spec.limit is not None and spec.limit > tbl.num_rows:
        warnings.append(f"`limit` {spec.limit} is more than the {tbl.num_rows} rows there are to select "
                        f"(pool {pool.size}): all of them were selected")
    sel = Selection(
        recipe=spec.recipe or "sql", sql=spec.sql, model=rec.model_id, model_kind=rec.kind, fraction=fraction,
        limit=spec.limit, where=spec.where, rounding=ROUNDING, ties=TIE_RULE, statistics=fit_info,
        output=str(output), format=fmt, engine=engine.name,
        options={k: v for k, v in asdict(spec).items() if k not in ("recipe", "sql")},
        seeds={"reference": (fit_info or {}).get("seed"),
               "neg_clip": ((fit_info or {}).get("neg_clip") or {}).get("seed"),
               **({"kmeans": side["image_based"]["seed"]} if "image_based" in side else {})},
        score_columns=[c for c in tbl.column_names if c not in ("id", "uri", "caption")],
        counts={**counts, "selected": tbl.num_rows}, warnings=warnings, run_id=uuid.uuid4().hex,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), details=side)
    _publish(tbl, output, fmt, sel, t0)
    sel.sidecar = str(sidecar_path(output))
    return sel


def sidecar_path(output: str | Path) -> Path:
    return Path(str(output) + ".json")


def _output_format(output: Path, given: str | None) -> str:
    suffix = output.suffix.lower()
    if given is None:
        if suffix not in FORMATS:
            raise SelectionError(f"`output` must end in {', '.join(FORMATS)}; got {output.name!r}", param="output")
        return "datacomp-uids" if suffix == ".npy" else suffix[1:]
    if given not in OUTPUT_FORMATS:
        raise SelectionError(f"`format` must be one of {', '.join(OUTPUT_FORMATS)}; got {given!r}", param="format")
    want = ".npy" if given == "datacomp-uids" else "." + given
    if suffix != want:
        raise SelectionError(f"`format` {given} writes a {want} file; got `output` {output.name!r}", param="format")
    return given


def _run(pool: recipes.Pool, spec: SelectSpec) -> tuple[pa.Table, dict, dict]:
    """(chosen rows, counts, sidecar fields) of the spec's recipe over the pool."""
    fraction = spec.fraction
    if spec.recipe is not None and fraction is None and spec.limit is None and spec.threshold is None:
        fraction = RECIPE_SPECS[spec.recipe].default_fraction
    count = spec.limit if spec.limit is not None else (count_for(fraction, pool.size) if fraction is not None else None)
    counts: dict[str, Any] = {"pool": pool.size, "requested": count, **pool.info.get("counts", {})}
    side: dict[str, Any] = {"fraction": fraction}
    if spec.recipe is not None:
        tbl, c, extra = RECIPE_SPECS[spec.recipe].run(pool, spec, count, fraction)
    else:
        tbl, c = _from_sql(pool.con, spec.sql, count, where=pool.allowed is not None)
        extra = {}
    return tbl, {**counts, **c}, {**side, **extra}


def _run_kl_guided(pool: recipes.Pool, spec: SelectSpec, count: int | None, fraction: float | None) -> tuple:
    return recipes.kl_guided(pool, count, make_fit=spec.make_fit, seed=spec.seed, reference_size=spec.reference_size,
                             include_own_pair=spec.include_own_pair)


def _run_clip_score(pool: recipes.Pool, spec: SelectSpec, count: int | None, fraction: float | None) -> tuple:
    return recipes.clip_score(pool, count, spec.threshold)


def _run_image_based(pool: recipes.Pool, spec: SelectSpec, count: int | None, fraction: float | None) -> tuple:
    t, rows = _target(pool, spec.target)
    return recipes.image_based(pool, t, rows, clusters=spec.clusters, sample=spec.sample,
                               seed=spec.seed if spec.seed is not None else 0)


def _run_negclip_normsim(pool: recipes.Pool, spec: SelectSpec, count: int | None, fraction: float | None) -> tuple:
    first = count_for(spec.first_fraction, pool.size)
    if count is not None and count > first and spec.limit is None:
        raise SelectionError(f"`fraction` {fraction} exceeds `first_fraction` {spec.first_fraction}: the "
                             "NormSim stage can only keep rows the negCLIPLoss stage kept", param="fraction")
    tbl, c, extra = _negclip_normsim(pool, spec.target, count, first, spec.negclip_form)
    extra.update(first_fraction=spec.first_fraction, negclip_form=spec.negclip_form)
    return tbl, c, extra


RECIPE_SPECS: dict[str, RecipeSpec] = {r.name: r for r in (
    RecipeSpec("kl-guided", "top --fraction (0.25) by text Information Gain against the uniform prior at the "
               "model's logit scale (on a fit with those settings, made if missing)", 0.25,
               frozenset({"seed", "reference_size", "make_fit", "include_own_pair"}), "text_info_gain",
               ("recipe_fit",), _run_kl_guided,
               fit_ready=lambda st, model, spec: recipes.kl_guided_fit_ready(
                   st, model, seed=spec.seed, reference_size=spec.reference_size)),
    RecipeSpec("negclip-normsim", "top --first-fraction (0.3) by neg_clip_loss, then top norm_sim_inf to "
               "--fraction (0.2) of the pool", 0.20, frozenset({"target", "first_fraction", "negclip_form"}),
               "neg_clip_loss", ("first_fraction", "negclip_form"), _run_negclip_normsim, needs_target=True),
    RecipeSpec("clip-score", "DataComp's baseline, top --fraction (0.3) by clip_score or --threshold", 0.30,
               frozenset({"threshold"}), "clip_score", (), _run_clip_score),
    RecipeSpec("image-based", "DataComp's baseline, the pool rows in the k-means clusters of a --target's images",
               None, frozenset({"target", "clusters", "sample", "seed"}), "image embeddings (k-means)",
               ("image_based",), _run_image_based, needs_target=True),
)}
RECIPES = tuple(RECIPE_SPECS)
DEFAULT_FRACTION = {r.name: r.default_fraction for r in RECIPE_SPECS.values() if r.default_fraction is not None}
# recipe-only options, checked against each recipe's `options` (a group shares one message)
OPTION_GROUPS = (("threshold",), ("target",), ("clusters", "sample"), ("include_own_pair",))
_FIELD_DEFAULTS = {f.name: f.default for f in fields(SelectSpec)}


def writes_fit(st: Store, spec: SelectSpec, model: str | None = None) -> bool:
    """Whether running `spec` writes to the catalog (a recipe making its missing fit); every other
    selection only reads the store."""
    r = RECIPE_SPECS.get(spec.recipe) if spec.recipe is not None else None
    return bool(r is not None and r.fit_ready is not None and spec.make_fit and not r.fit_ready(st, model, spec))


def recipe_help() -> str:
    """The `--recipe` help of `clipsql select`, from RECIPE_SPECS."""
    return " ".join(f"{r.name}: {r.help}." for r in RECIPE_SPECS.values())


# --------------------------------------------------------------------------- the pool
def _pool(st: Store, rec: ModelRecord, con: Any, where: str | None, engine: Engine) -> recipes.Pool:
    """Every row of the model, or those passing `where`, and how to score them (the engine's way)."""
    view = _emb_view(st, rec)
    total = count_rows(st, rec)
    allowed = None
    info: dict[str, Any] = {}
    relation = view
    if where is not None:
        allowed, info = _where_ids(st, rec, con, view, where)
        if len(allowed) == 0:
            raise SelectionError(f"`where` {where!r} leaves no rows of the {total} of model {rec.model_id}: "
                                 "nothing to select (a column that is NULL fails every comparison; look with "
                                 "`clipsql query STORE \"SELECT … FROM samples\"`)", param="where")
        con.register("_clipsql_allowed", pa.table({"id": allowed}))
        relation = f"(SELECT * FROM {view} WHERE id IN (SELECT id FROM _clipsql_allowed))"
        info["counts"] = {"pool_before_where": total}

    def score_all(columns: list[str], fit: Any = None) -> pa.Table:
        """id + `columns` for every pool row (the engine may score more rows: Pool.score filters)."""
        return engine.score_columns(st, rec, columns, fit=fit, con=con, relation=relation, allowed=allowed)
    size = total if allowed is None else len(allowed)
    return recipes.Pool(st, rec, con, relation, size, allowed, score_all, info)


def _where_ids(st: Store, rec: ModelRecord, con: Any, view: str, where: str) -> tuple[pa.Array, dict]:
    """Ids of the model's rows for which `where` holds, over samples + semdedup + stored scores."""

    joins, cols, info = [], [], {"warnings": []}
    dedup = _dedup_table(st, rec)
    if dedup is not None:
        con.register("_clipsql_where_dedup", st.dataset(dedup, latest=True))
        joins.append("LEFT JOIN _clipsql_where_dedup d ON d.id = e.id")
        cols += ["d.semdedup_cluster", "d.semdedup_max_sim"]
    elif "semdedup_" in where:
        raise SelectionError(f"`where` uses semantic-dedup columns but model {rec.model_id} has none yet: run "
                             f"`clipsql dedup STORE --model {rec.model_id}` first", param="where")
    name = stored_table_name(rec.table_name)
    if name in st.table_names():
        ds = st.dataset(name, latest=True)
        con.register("_clipsql_where_stored", ds)
        joins.append("LEFT JOIN _clipsql_where_stored sc ON sc.id = e.id")
        cols += [f"sc.{quote_ident(c)}" for c in ds.schema.names if c not in ("id", "fit_id", "computed_at")]
    extra = "".join(", " + c for c in cols)
    pool_sql = (f"SELECT s.*, e.image_embedding, e.text_embedding{extra} FROM {view} e "
                f"LEFT JOIN samples s ON s.id = e.id {' '.join(joins)}")
    try:
        con.execute(f"CREATE OR REPLACE TEMP VIEW _clipsql_pool AS {pool_sql}")
        tbl = _arrow(con.sql(f"SELECT id FROM _clipsql_pool WHERE ({where})"))
        if dedup is not None and "semdedup_" in where:
            pending = con.execute("SELECT count(*) FROM _clipsql_pool WHERE semdedup_max_sim IS NULL "
                                  "AND image_embedding IS NOT NULL").fetchall()[0][0]
            if pending:
                info["warnings"].append(f"{pending} rows have no semantic-dedup score yet (added since `clipsql "
                                        "dedup` ran): a condition on semdedup_* leaves them out; re-run dedup")
    except duckdb.Error as e:
        raise udf_error(e, con) or SelectionError(f"`where` failed: {str(e).splitlines()[0]}", param="where") from None
    return tbl.column("id").combine_chunks().cast(pa.string()), info


def _dedup_table(st: Store, rec: ModelRecord) -> str | None:
    name = dedup_table_name(rec.table_name)
    return name if name in st.table_names() else None


def _target(pool: recipes.Pool, name: str) -> tuple[Any, np.ndarray]:
    t = get_target(pool.st, name)
    if t.model_id != pool.rec.model_id:
        raise SelectionError(f"target {name!r} belongs to model {t.model_id}, not {pool.rec.model_id}: set "
                             f"`model` to {t.model_id} or add a target for this model", param="target")
    return t, target_rows(pool.st, t)


# --------------------------------------------------------------------------- recipes
def _emb_view(st: Store, rec: ModelRecord) -> str:
    return quote_ident(f"embeddings_{[m.model_id for m in st.list_models()].index(rec.model_id)}")


def _arrow(rel: Any) -> pa.Table:
    tbl = rel.arrow()
    return tbl.read_all() if hasattr(tbl, "read_all") else tbl


def _negclip_normsim(pool: recipes.Pool, target: str, count: int | None, first: int,
                     form: str) -> tuple[pa.Table, dict, dict]:
    t, _ = _target(pool, target)
    if form == "row":
        s1 = pool.score(["neg_clip_loss"])
        col = "neg_clip_loss"
    else:
        s1 = _stored_pool_column(pool.st, pool.rec)
        if pool.allowed is not None:
            s1 = s1.filter(pa.compute.is_in(s1.column("id"), value_set=pool.allowed))
        col = "neg_clip_loss_pool"
    stage1, nulls1 = recipes.top(s1, col, first)
    con = pool.con
    con.register("_clipsql_stage1", stage1)
    s2 = _arrow(con.sql(f"SELECT s.id, s.{col}, norm_sim_inf(e.image_embedding, {quote_literal(target)}) "
                        f"AS norm_sim_inf FROM _clipsql_stage1 s JOIN {_emb_view(pool.st, pool.rec)} e USING (id)"))
    con.unregister("_clipsql_stage1")
    chosen, nulls2 = recipes.top(s2, "norm_sim_inf", count)
    return chosen, {"stage1": stage1.num_rows, "stage1_requested": first, "null_scores": nulls1,
                    "null_norm_sim": nulls2}, {"target": t.summary().as_dict()}


def _stored_pool_column(st: Store, rec: ModelRecord) -> pa.Table:
    name = stored_table_name(rec.table_name)
    tbl = st.db.open_table(name).to_lance().to_table() if name in st.table_names() else None
    if tbl is None or "neg_clip_loss_pool" not in tbl.column_names:
        raise SelectionError(f"no stored neg_clip_loss_pool for {rec.model_id}: run "
                             "`clipsql score STORE --neg-clip-loss-pool` first, or set `negclip_form` to row",
                             param="negclip_form")
    return tbl.select(["id", "neg_clip_loss_pool"])


def _from_sql(con: Any, sql: str, count: int | None, where: bool = False) -> tuple[pa.Table, dict]:
    """The SQL's rows, first of each id, in its order; with `where`, only ids the pool's --where kept
    (registered as `_clipsql_allowed`)."""
    try:
        rel = con.sql(sql)
    except duckdb.Error as e:
        raise udf_error(e, con) or SelectionError(f"`sql` failed: {e}", param="sql") from None
    if rel is None or "id" not in rel.columns:
        raise SelectionError("`sql` must return a column named id (and decides the order), e.g. "
                             "\"SELECT id, clip_score FROM scores ORDER BY clip_score DESC, id\"", param="sql")
    # the first row of each non-NULL id, in the SQL's order (DuckDB: no Python object per row)
    con.execute("DROP TABLE IF EXISTS _clipsql_sql_rows")
    rel.create("_clipsql_sql_rows")             # rows in the SQL's order: rowid is the position
    n, firsts = con.execute("SELECT count(*), count(DISTINCT id) FROM _clipsql_sql_rows").fetchall()[0]
    limit = "" if count is None else f" LIMIT {int(count)}"
    allowed = " AND id IN (SELECT id FROM _clipsql_allowed)" if where else ""
    tbl = _arrow(con.sql("SELECT * EXCLUDE (_pos) FROM (SELECT rowid AS _pos, * FROM _clipsql_sql_rows) "
                         f"WHERE id IS NOT NULL{allowed} QUALIFY row_number() OVER (PARTITION BY id ORDER BY _pos) = 1 "
                         f"ORDER BY _pos{limit}"))
    con.execute("DROP TABLE _clipsql_sql_rows")
    tbl = tbl.set_column(tbl.column_names.index("id"), "id", tbl.column("id").cast(pa.string()))
    return tbl, {"sql_rows": n, "duplicate_or_null_ids_dropped": n - firsts}


def _with_samples(con: Any, tbl: pa.Table) -> pa.Table:
    """id, uri, caption (from `samples` unless the selection has them), then the score columns; rank order."""
    tbl = tbl.append_column("_rank", pa.array(np.arange(tbl.num_rows, dtype=np.int64)))
    con.register("_clipsql_selected", tbl)
    have = set(tbl.column_names)
    extra = [c for c in ("uri", "caption") if c not in have]
    sel = ", ".join(f"sm.{c}" for c in extra)
    out = _arrow(con.sql(f"SELECT s.*{', ' + sel if sel else ''} FROM _clipsql_selected s "
                         f"LEFT JOIN samples sm ON sm.id = s.id ORDER BY s._rank"))
    con.unregister("_clipsql_selected")
    front = ["id", "uri", "caption"]
    rest = [c for c in out.column_names if c not in front and c != "_rank"]
    return out.select(front + rest)


# --------------------------------------------------------------------------- output
# a temporary file of a select (`.<name>.tmp-<host>-<pid>`, also of its sidecar): swept by the next
# select writing into the same folder once the process that made it has ended
_TEMP = re.compile(r"\..+\.(?:parquet|csv|txt|npy)(?:\.json)?\.tmp-" + leftovers.TAG)


def _publish(tbl: pa.Table, output: Path, fmt: str, sel: Selection, t0: float) -> str:
    """Write the selection and its sidecar so that a consumer can always tell whether they belong
    together: both are written whole to temporary files first (fsynced), then the sidecar, which
    records the output's sha256 and the run id (a parquet output carries the run id too), replaces
    the old sidecar, then the output replaces the old output. A kill before the first rename leaves
    the previous pair; between the two, the new sidecar beside the previous output, whose sha256 it
    does not match (`check_output` says so); temporary files of a killed select are swept by the
    next one. Returns the output's sha256."""
    output.parent.mkdir(parents=True, exist_ok=True)
    leftovers.sweep(output.parent, _TEMP)
    sidecar = sidecar_path(output)
    tag = leftovers.owner_tag()
    tmp = output.parent / f".{output.name}.tmp-{tag}"
    side_tmp = output.parent / f".{sidecar.name}.tmp-{tag}"
    try:
        if fmt == "datacomp-uids":
            with open(tmp, "wb") as fh:
                write_uids(tbl.column("id"), fh)
        elif fmt == "txt":
            ids = tbl.column("id").to_pylist()
            tmp.write_text("".join(f"{i}\n" for i in ids))
        elif fmt == "csv":
            flat = [c for c, fl in zip(tbl.column_names, tbl.schema) if not pa.types.is_nested(fl.type)]
            pcsv.write_csv(tbl.select(flat), tmp)
        else:
            meta = {**(tbl.schema.metadata or {}), b"clipsql.run_id": sel.run_id.encode()}
            pq.write_table(tbl.replace_schema_metadata(meta), tmp)
        digest = sha256_file(tmp, fsync=True)
        sel.sha256 = digest
        sel.seconds = round(time.perf_counter() - t0, 3)
        side_tmp.write_text(json.dumps(sel.to_json(), indent=2, sort_keys=True, default=_json_default) + "\n")
        sha256_file(side_tmp, fsync=True)
        fault("select:before-rename")
        os.replace(side_tmp, sidecar)
        fault("select:between-renames")
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    fsync_path(output.parent)
    return digest


def check_output(output: str | Path) -> dict:
    """The sidecar of a select's output when the two belong together (the output's sha256 is the
    one the sidecar records); SelectionError otherwise: no sidecar, or a select was interrupted
    between publishing the two (re-run it)."""
    output = Path(output)
    sidecar = sidecar_path(output)
    try:
        side = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise SelectionError(f"{output} has no sidecar {sidecar.name}: it was not written by `clipsql select`, or "
                             "the select was interrupted; re-run the select") from None
    except (OSError, ValueError) as e:
        raise SelectionError(f"cannot read the sidecar {sidecar}: {e}") from None
    try:
        digest = sha256_file(output)
    except FileNotFoundError:
        raise SelectionError(f"{output} is missing although its sidecar {sidecar.name} is there: the select was "
                             "interrupted; re-run the select") from None
    except OSError as e:
        raise SelectionError(f"cannot read {output}: {e.strerror or e}") from None
    if not isinstance(side, dict) or side.get("sha256") != digest:
        raise SelectionError(f"{output} and its sidecar {sidecar.name} do not belong together (the sidecar is of "
                             f"run {side.get('run_id') if isinstance(side, dict) else None}, written for another "
                             "output: a select was interrupted between publishing the two); re-run the select")
    return side



def _fit_info(st: Store, rec: ModelRecord, fit_id: int | None = None) -> dict | None:
    """The fit a selection used: `fit_id` (a recipe's own fit) or the default fit."""
    fit = get_fit(st, fit_id, with_arrays=False) if fit_id is not None else latest_fit(st, rec, with_arrays=False)
    if fit is None:
        return None
    o = fit.options
    return {"fit_id": fit.fit_id, "created_at": fit.created_at, "n_rows": fit.n_rows,
            "reference_size": fit.reference_size, "data_version": o.get("data_version"), "seed": o.get("seed"),
            "a": o.get("a"), "b": o.get("b"), "prior": o.get("prior"), "scale": o.get("scale"),
            "neg_clip": o.get("neg_clip"), "recipe": o.get("recipe")}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
