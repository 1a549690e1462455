"""One DuckDB connection with the store's views and every score function.

    con = queries.connect("my-store")
    con.sql("SELECT uri, caption FROM scores ORDER BY image_info_gain LIMIT 20")

Lance datasets are registered through Arrow (DuckDB scans them as pyarrow
datasets with projection and filter pushdown; DuckDB's own lance extension is not
needed). By default the connection is read-only towards the file system: ad-hoc
SQL cannot read or write files (``enable_external_access = false``, locked).
Pass ``allow_external_access=True`` (CLI: ``--allow-external-access``) to COPY
results out or read other files. Spill files go to a private, bounded temporary directory
(see `_bounded_spill`), never the caller's working directory.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.errors import env_number
from clipsql.lazy import duckdb
from clipsql.queries.sql import functions
from clipsql.queries.sql.specs import score_expressions
from clipsql.store.ledger import metadata_columns
from clipsql.store.location import exists
from clipsql.store.snapshot import Snapshot
from clipsql.store.store import Store
from clipsql.store.tables import (CAPTION_FEATURES, SAMPLES, dedup_table_name, metadata_aliases, samples_schema,
                                   stored_table_name)
from clipsql.store import deletions
from clipsql import leftovers
from clipsql.store import tags
from clipsql.store.reads import for_duckdb


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def open_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else Store.open(store, read_only=True)


def connect(store: Store | str | os.PathLike | Snapshot, *, allow_external_access: bool = False,
            threads: int | None = None, fits: dict | None = None, config: dict[str, Any] | None = None,
            progress_bar: bool = True, samples_only: bool = False, for_sql: str | None = None) -> Any:
    """An in-memory DuckDB connection over one snapshot of the store (store.snapshot: one catalog
    read), with its views, stats and score functions. `store` may be a `Snapshot` already read.
    `fits`: {model_id: (scores.Fit, fit row)} to use instead of loading them (Ray tasks).
    `config`: more DuckDB (global) settings, made before the configuration is locked (a server
    bounds each client's queries with `memory_limit`); `progress_bar=False`: DuckDB draws no
    progress bar (a server's terminal). `samples_only`: only the `samples`, `deletions` and `tags`
    views, no model, statistics, fit or score function is read (commands that select ids).
    `for_sql`: the one statement the connection is for; when it reads no table (`reads_no_table`:
    `SELECT 1`), no view (nor `stats`, `scores`) is made and no Lance table opened, only the
    functions registered."""
    snap = store if isinstance(store, Snapshot) else Snapshot.read(open_store(store), samples_only=samples_only)
    config = {**(config or {}), **({"threads": threads} if threads else {})}
    con = duckdb.connect(":memory:", config=config)
    if not progress_bar:
        con.execute("SET enable_progress_bar = false")
    tables = for_sql is None or not reads_no_table(for_sql, con)
    if tables:
        register_views(con, snap)
    if not snap.samples_only:
        ctx = functions.register(con, snap)
        for model_id, (fit, row) in (fits or {}).items():
            ctx.preload_fit(model_id, fit, row)
        if tables:
            _register_stats(con, snap)
            _register_scores(con, snap)
    _bounded_spill(con)
    if not progress_bar:
        con.execute("SET enable_progress_bar = false")
    if not allow_external_access:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def reads_no_table(sql: str, con: Any = None) -> bool:
    """Whether DuckDB's parser finds `sql` to be SELECTs with no FROM anywhere (`SELECT 1`, scalar
    expressions and functions): no view, table function or SHOW can be referenced then. Anything
    else, or SQL the parser refuses (its error is the query's to report), is False. `con`: a
    DuckDB connection to parse with (a new one costs more than the parse)."""
    try:
        own = con is None
        con = duckdb.connect(":memory:") if own else con
        try:
            tree = json.loads(con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()[0][0])
        finally:
            if own:
                con.close()
    except Exception:  # noqa: BLE001 - e.g. no json extension: simply open the tables
        return False
    if tree.get("error") or not tree.get("statements"):
        return False
    froms: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "from_table":
                    froms.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(tree["statements"])
    return all(isinstance(f, dict) and f.get("type") == "EMPTY" for f in froms)


DEFAULT_SPILL_GB = 8.0
_SPILL_DIR: tuple[int, str] | None = None       # (the process that made it, the folder)
_SPILL_NAME = re.compile(r"clipsql-spill-" + leftovers.TAG + r"-.+")


def _bounded_spill(con: Any) -> str:
    """Spill files (a sort or join larger than memory) go to a private directory under the system
    temp dir, removed at exit, at most CLIPSQL_SPILL_GB (default 8) GiB — never DuckDB's default
    `./.tmp` in the caller's working directory with up to 90% of the disk; past the bound a query
    fails with DuckDB's out-of-memory message instead of filling the disk. The directory is named
    `clipsql-spill-<host>-<pid>-…`; making one sweeps those of processes of this host that have
    ended without removing theirs (killed)."""
    global _SPILL_DIR
    if _SPILL_DIR is None or _SPILL_DIR[0] != os.getpid():    # one per process (also a forked one)
        leftovers.sweep(tempfile.gettempdir(), _SPILL_NAME)
        folder = tempfile.mkdtemp(prefix=f"clipsql-spill-{leftovers.owner_tag()}-")
        _SPILL_DIR = (os.getpid(), folder)
        atexit.register(_remove_spill, folder)
    folder = _SPILL_DIR[1]
    gb = env_number("CLIPSQL_SPILL_GB", DEFAULT_SPILL_GB)
    con.execute(f"SET temp_directory = {quote_literal(folder)}")
    con.execute(f"SET max_temp_directory_size = '{max(gb, 0.0):.3f}GiB'")
    return folder


def _remove_spill(folder: str) -> None:
    if _SPILL_DIR is not None and _SPILL_DIR == (os.getpid(), folder):     # not a forked child's exit
        shutil.rmtree(folder, ignore_errors=True)


def register_views(con: Any, snap: Snapshot | Store) -> None:
    """Views over one snapshot: every table at the version the ledger's last commit names, as the
    snapshot read them, so `samples`, `embeddings`, `scores` and `stats` come from the same commit
    (a Store: its snapshot as of now)."""
    snap = snap if isinstance(snap, Snapshot) else Snapshot.read(snap)
    _register_samples(con, snap)
    if not snap.samples_only:
        _register_embeddings(con, snap)
        _register_rejects(con, snap)
    _register_tags(con, snap)
    _register_deletions(con, snap)


def _register_samples(con: Any, snap: Snapshot) -> None:
    tbl = snap.dataset(SAMPLES) if exists(snap.store.table_uri(SAMPLES)) else None
    con.register("_lance_samples", tbl if tbl is not None else samples_schema().empty_table())
    names = (tbl.schema if tbl is not None else samples_schema()).names
    con.execute(f"CREATE OR REPLACE VIEW samples AS SELECT {samples_select_list(snap, names)} FROM _lance_samples")


def samples_select_list(meta: Snapshot | Store | dict[str, str], names: list[str] | None = None) -> str:
    """The `samples` view's columns over a table of the Lance `samples` schema: the metadata keys as
    typed columns (so the same view can be put over a few rows read from Lance directly). `meta`:
    the metadata column types ({name: SQL type}), or the snapshot or store to take them from.
    `names`: the Lance table's columns (a store from before the caption features lacks them until
    `clipsql backfill`; default: all)."""
    if isinstance(meta, Snapshot):
        meta = meta.metadata_columns
    elif isinstance(meta, Store):
        meta = metadata_columns(meta)
    base = ["id", "uri", "caption", "width", "height"]
    base += [c for c in CAPTION_FEATURES if names is None or c in names]
    cols = [quote_ident(c) for c in base]
    aliases = metadata_aliases(list(meta))
    for name, sql_type in meta.items():
        alias = aliases[name]
        path = quote_literal("$." + _json_path_key(name))
        if sql_type == "VARCHAR":
            expr = f"json_extract_string(metadata, {path})"
        else:
            expr = f"TRY_CAST(json_extract_string(metadata, {path}) AS {sql_type})"
        cols.append(f"{expr} AS {quote_ident(alias)}")
    cols += ["source", "location", "caption_truncated", "metadata"]
    return ", ".join(cols)


def _json_path_key(name: str) -> str:
    # JSON path member with quoting so keys with dots/spaces work: $."my key"
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _register_embeddings(con: Any, snap: Snapshot) -> None:
    models = snap.models
    parts = []
    same_dim = len({m.dim for m in models}) <= 1
    for i, m in enumerate(models):
        con.register(f"_lance_emb_{i}", for_duckdb(snap.embeddings_table(m)))
        cast = "" if same_dim else "::FLOAT[]"
        parts.append(f"SELECT id, {quote_literal(m.model_id)} AS model, {_vec('image_embedding')}{cast} AS "
                     f"image_embedding, {_vec('text_embedding')}{cast} AS text_embedding FROM _lance_emb_{i}")
        con.execute(f"CREATE OR REPLACE VIEW {quote_ident('embeddings_' + str(i))} AS {parts[-1]}")
    if not parts:
        parts = ["SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS model, NULL::FLOAT[] AS image_embedding, "
                 "NULL::FLOAT[] AS text_embedding WHERE false"]
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {' UNION ALL '.join(parts)}")


def _vec(col: str) -> str:
    """A vector column as an expression DuckDB does not push into the Lance scan: its Arrow scan
    pushes `v IS NULL` without projecting `v`, which Lance refuses ("No match for FieldRef")."""
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE {col} END"


def _register_tags(con: Any, snap: Snapshot) -> None:
    """View `tags` (id, tag, tagged_at): the tags table (store.tags) at its committed version; empty
    before the first tag."""
    ds = snap.dataset(tags.TABLE) if tags.TABLE in snap.versions else tags.tags_schema().empty_table()
    con.register("_lance_tags", ds)
    con.execute("CREATE OR REPLACE VIEW tags AS SELECT id, tag, tagged_at FROM _lance_tags")


def _register_rejects(con: Any, snap: Snapshot) -> None:
    cols = ["reject_id", "run_id", "model_id", "source", "location", "reason", "detail", "created_at"]
    data = {c: [r[c] for r in snap.rejects] for c in cols}
    schema = pa.schema([("reject_id", pa.int64()), ("run_id", pa.int64()), ("model_id", pa.string()),
                        ("source", pa.string()), ("location", pa.string()), ("reason", pa.string()),
                        ("detail", pa.string()), ("created_at", pa.float64())])
    con.register("_rejects", pa.table(data, schema=schema))
    con.execute("CREATE OR REPLACE VIEW rejects AS SELECT reject_id, run_id, model_id AS model, source, location, "
                "reason, detail, to_timestamp(created_at) AS created_at FROM _rejects")


def _register_deletions(con: Any, snap: Snapshot) -> None:
    """View `deletions`: the ids `clipsql delete` removed (what ingest skips, what undelete selects)."""
    tbl = snap.dataset(deletions.TABLE) if deletions.TABLE in snap.versions and \
        exists(snap.store.table_uri(deletions.TABLE)) else None
    con.register("_lance_deletions", tbl if tbl is not None else deletions.deletions_schema().empty_table())
    con.execute("CREATE OR REPLACE VIEW deletions AS SELECT id, uri, caption, source, deleted_at, deleted_where "
                "FROM _lance_deletions")


def _register_stats(con: Any, snap: Snapshot) -> None:
    """View `stats`: per model and modality, the running statistics and the latest fit."""
    rows = []
    for m in snap.models:
        state = snap.stats[m.model_id]
        n_rows = snap.rows(m)
        fit = snap.fit(m)
        for modality in ("image", "text"):
            raw = state.moments[(modality, "raw")]
            nrm = state.moments[(modality, "normalized")]
            rows.append({
                "model": m.model_id, "modality": modality, "dim": m.dim, "n": raw.n, "rows": n_rows,
                "current": raw.n == n_rows, "covered_seq": state.covered_seq,
                "mean": raw.mean.astype(np.float32).tolist() if raw.n else None,
                "mean_normalized": nrm.mean.astype(np.float32).tolist() if nrm.n else None,
                "trace_cov": float(np.trace(raw.cov)) if raw.n else None,
                "fit_id": fit.fit_id if fit else None, "fit_rows": fit.n_rows if fit else None,
                "reference_size": fit.reference_size if fit else None,
                "share_added_since_fit": ((n_rows - fit.n_rows) / n_rows if fit and n_rows else None),
                "fit_options": json.dumps(fit.options) if fit else None,
            })
    schema = pa.schema([("model", pa.string()), ("modality", pa.string()), ("dim", pa.int32()), ("n", pa.int64()),
                        ("rows", pa.int64()), ("current", pa.bool_()), ("covered_seq", pa.int64()),
                        ("mean", pa.list_(pa.float32())), ("mean_normalized", pa.list_(pa.float32())),
                        ("trace_cov", pa.float64()), ("fit_id", pa.int64()), ("fit_rows", pa.int64()),
                        ("reference_size", pa.int64()), ("share_added_since_fit", pa.float64()),
                        ("fit_options", pa.string())])
    con.register("_stats", pa.Table.from_pylist(rows, schema=schema))
    con.execute("CREATE OR REPLACE VIEW stats AS SELECT * FROM _stats")


def _register_scores(con: Any, snap: Snapshot) -> None:
    """View `scores`: id, model, uri, caption and one lazily computed column per score, for every
    model that has fitted statistics (each row scored with its own model's fit); with no fit yet,
    the default model's rows (whose score columns then say to run `clipsql stats fit`)."""
    models = list(snap.models)
    if not models:
        return
    st = snap.store
    default = snap.model()
    fitted = [m for m in models if snap.fit(m) is not None] or [default]
    parts = []
    for m in fitted:
        idx = [x.model_id for x in models].index(m.model_id)
        exprs = score_expressions(quote_literal(m.model_id), m.kind)
        cols = ", ".join(f"{e} AS {quote_ident(name)}" for name, e in exprs.items())
        model = f"{quote_literal(m.model_id)} AS model"
        if {"uri", "caption"} <= set(snap.embeddings_table(m).schema.names):
            # one scan: uri and caption live beside the vectors (no join growing with the store)
            parts.append(f"SELECT e.id, {model}, e.uri, e.caption, {cols} FROM _lance_emb_{idx} e")
        else:   # a table written before uri/caption were copied into it
            parts.append(f"SELECT e.id, {model}, s.uri, s.caption, {cols} "
                         f"FROM {quote_ident('embeddings_' + str(idx))} e LEFT JOIN samples s ON s.id = e.id")
    con.execute("CREATE OR REPLACE VIEW scores AS " + " UNION ALL ".join(parts))
    name = stored_table_name(default.table_name)
    if name in st.table_names():
        con.register("_lance_stored_scores", snap.latest(name))
        con.execute("CREATE OR REPLACE VIEW stored_scores AS SELECT * FROM _lance_stored_scores")
    name = dedup_table_name(default.table_name)
    if name in st.table_names():   # `clipsql dedup`: only rows it computed (rows added since are pending)
        con.register("_lance_semdedup", snap.latest(name))
        con.execute("CREATE OR REPLACE VIEW semdedup AS SELECT id, semdedup_cluster, semdedup_max_sim "
                    "FROM _lance_semdedup")
