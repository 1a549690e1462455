"""clipsql: a store of CLIP embeddings whose curation scores are SQL.

A thin typer router: each command calls one library function and turns
clipsql's domain errors into a message and exit code 1. The engine of a command
that takes --engine is chosen here, once (`engines.choose`). Heavy third-party
modules (torch, open_clip, lance, lancedb, duckdb, ray, matplotlib) are imported
by the first command that uses them (clipsql.lazy), so --help is instant.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import shlex
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from clipsql import __version__, engines
from clipsql.errors import READ_ONLY_HINT, ClipsqlError, from_udf_text, renamed
from clipsql.ingest.backfill import BACKFILLABLE
from clipsql.ingest.backfill import backfill as run_backfill
from clipsql.ingest.datacomp import is_datacomp_pool
from clipsql.ingest.pipeline import IngestOptions, ingest_pool
from clipsql.ingest.registry import KINDS as SOURCE_KINDS
from clipsql.models.loading import DEFAULT_MODEL, DEMO_NOTICE
from clipsql.queries.curation.dedup import DedupFit, dedup_status, semdedup
from clipsql.queries.curation.delete import delete_where, undelete_where
from clipsql.queries.curation.export import export_store
from clipsql.queries.curation.selection import (DEFAULT_FIRST_FRACTION, RECIPES, SelectSpec, recipe_help, select,
                                                writes_fit)
from clipsql.queries.curation.targets import add_target
from clipsql.queries.present.demo import run_demo
from clipsql.queries.present.gallery import write_gallery
from clipsql.queries.present.geometry import geometry_report
from clipsql.queries.present.plots import plot_hist, plot_scatter
from clipsql.queries.present.stats import format_report as format_stats_report
from clipsql.queries.present.stats import stats_report
from clipsql.queries.search.command import format_search
from clipsql.queries.search.command import search as run_search
from clipsql.queries.search.index import build_index
from clipsql.queries.sql.cli_query import repl, run_query
from clipsql.queries.sql.specs import FUNCTIONS as SQL_FUNCTIONS
from clipsql.store.compaction import MAX_FRAGMENTS
from clipsql.store.deletions import deleted_phrase
from clipsql.serve.server import run_server
from clipsql.store.doctor import doctor as run_doctor
from clipsql.store.doctor import format_report as format_doctor_report
from clipsql.store.fits import fit_stats
from clipsql.store.maintenance import OptimizeReport
from clipsql.store.maintenance import optimize as run_optimize
from clipsql.store.manage import remove_model, set_default_model
from clipsql.store.reads import count_rows
from clipsql.store.store import Store
from clipsql.store.targets import list_targets, remove_target
from clipsql.store.writer import CommitPolicy

# Help for people at any width (80 columns included): click's plain two-column layout, which
# wraps help text and never cuts an option name; a placeholder that says what a value is (N,
# PATH, a list of choices, else the option's last word: --image-column COLUMN) instead of its
# Python type; argument names upper-case in the usage line (STORE SOURCE); command summaries
# whole, wrapped. Every Typer and command here is built with these classes.
_METAVARS = {"where": "SQL", "sql": "SQL"}


def _choices(param) -> list[str] | None:  # noqa: ANN001
    desc = getattr(param, "type_descriptor", None)          # typer >= 0.2x keeps the annotation
    choices = desc.choices if desc is not None and desc.is_choice else getattr(getattr(param, "type", None),
                                                                                 "choices", None)
    return None if choices is None else [str(getattr(c, "value", c)) for c in choices]


def _value_type(param) -> object:  # noqa: ANN001
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        return desc.annotation
    kind = type(getattr(param, "type", None)).__name__
    return {"IntParamType": int, "IntRange": int, "Path": Path, "TyperPath": Path}.get(kind, str)


def _metavar(param) -> str:  # noqa: ANN001
    if param.param_type_name == "argument":
        return param.name.upper()
    choices = _choices(param)
    if choices:
        return "[" + "|".join(choices) + "]"
    kind = _value_type(param)
    if kind is int:
        return "N"
    if isinstance(kind, type) and issubclass(kind, Path):
        return "PATH"
    return _METAVARS.get(param.name) or param.opts[0].lstrip("-").split("-")[-1].upper()


_NB_HYPHEN = "\u2011"   # wraps like a letter: help text breaks at spaces only


class _HelpFormatter(typer.core.TyperCommand.context_class.formatter_class):
    """Wraps at spaces only, so `--id-column` or `re-running` never breaks across two lines."""

    def write_usage(self, prog, args="", prefix=None):  # noqa: ANN001, ANN201
        super().write_usage(prog.replace("-", _NB_HYPHEN), args.replace("-", _NB_HYPHEN), prefix)

    def write_text(self, text):  # noqa: ANN001, ANN201
        super().write_text(text.replace("-", _NB_HYPHEN))

    def write_dl(self, rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        super().write_dl([tuple(c.replace("-", _NB_HYPHEN) for c in row) for row in rows], *args, **kwargs)

    def getvalue(self):  # noqa: ANN201
        return super().getvalue().replace(_NB_HYPHEN, "-")


class _Context(typer.core.TyperCommand.context_class):
    formatter_class = _HelpFormatter


class _Command(typer.core.TyperCommand):
    context_class = _Context

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = _metavar(param)

    def collect_usage_pieces(self, ctx):  # noqa: ANN001, ANN201
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.params:
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter):  # noqa: ANN001, ANN201
        args = []
        for param in self.params:
            if param.param_type_name == "argument" and not getattr(param, "hidden", False):
                extra = [f"one of: {', '.join(_choices(param))}"] if _choices(param) else []
                if not param.required and param.default is not None and param.nargs == 1:
                    extra.append(f"default: {getattr(param.default, 'value', param.default)}")
                args.append((param.metavar, "  ".join(filter(None, [param.help or "", "[" + "; ".join(extra) + "]"
                                                                      if extra else ""]))))
        opts = [r for p in self.get_params(ctx) if p.param_type_name == "option"
                for r in [p.get_help_record(ctx)] if r is not None]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _Group(typer.core.TyperGroup):
    context_class = _Context

    def format_commands(self, ctx, formatter):  # noqa: ANN001, ANN201
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                for cmd in [self.get_command(ctx, name)] if cmd is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _Typer(typer.Typer):
    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        kwargs.setdefault("cls", _Group)
        super().__init__(rich_markup_mode=None, **kwargs)

    def command(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(help=__doc__.split("\n\n")[0] + "\n\nStart with `clipsql demo`, then see `clipsql COMMAND --help`.",
             no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
stats_app = _Typer(help="Running statistics and fitted reference statistics.", no_args_is_help=True)
app.add_typer(stats_app, name="stats")
target_app = _Typer(help="Target sets of image embeddings for NormSim (norm_sim_2 / norm_sim_inf).",
                    no_args_is_help=True)
app.add_typer(target_app, name="target")

def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clipsql {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print clipsql's version and exit.")) -> None:
    pass


STORE_ARG = typer.Argument(..., help="Store directory (created by `clipsql init`).")


class Fmt(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class TableFmt(str, Enum):
    """Commands whose output is a report, not rows: a table for people or json for programs."""
    table = "table"
    json = "json"


# Library errors name their arguments in API terms, in backticks (`where`); the CLI says the flag.
PARAM_FLAGS = {"where": "--where", "sql": "--sql", "fraction": "--fraction", "limit": "--limit",
               "threshold": "--threshold", "first_fraction": "--first-fraction", "target": "--target",
               "recipe": "--recipe", "clusters": "--clusters", "sample": "--sample", "seed": "--seed",
               "include_own_pair": "--include-own-pair", "negclip_form": "--negclip-form", "k": "-k",
               "model": "--model", "pretrained": "--pretrained", "image_column": "--image-column",
               "caption_column": "--caption-column", "id_column": "--id-column", "update": "--update",
               "image_embeddings": "--image-embeddings", "text_embeddings": "--text-embeddings",
               "features": "--datacomp-features", "query": "--query", "index": "--index", "replace": "--replace",
               "output": "--output", "format": "--format", "fmt": "--format", "engine": "--engine",
               "columns": "--columns", "neg_clip_loss_pool": "--neg-clip-loss-pool", "norm_sim_d": "--norm-sim-d",
               "pool_batch_size": "--pool-batch-size", "memory_gb": "--memory-gb", "refit": "--refit",
               "iterations": "--iterations", "scale": "--scale", "prior": "--prior",
               "reference_size": "--reference-size", "thumb": "--thumb", "top_bottom": "--top-bottom",
               "like": "--like", "kind": "--kind", "catalog_url": "--catalog", "device": "--device",
               "checkpoint": "--checkpoint", "prompt": "PROMPT", "source": "SOURCE", "store": "STORE",
               "ray_address": "--ray-address", "repair": "--repair", "repair=True": "--repair",
               "storage": "--storage"}


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"Error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _interrupted(signum, frame):  # noqa: ANN001, ANN202
    """Ctrl-C outside a library call (start-up, argument parsing, printing): nothing is being
    written, so the process ends at once with one line and exit code 130 (typer would exit 130
    without a word, and a traceback came from Ctrl-C during the imports)."""
    sys.stderr.write("Error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def _run(fn, *args, _flags: dict[str, str] | None = None, **kwargs):  # noqa: ANN001, ANN201
    """Call a library function; domain errors become a message and exit 1, the library's argument
    names in it replaced by the command's flags (PARAM_FLAGS, then `_flags` where the command names
    one differently). While it runs, Ctrl-C raises KeyboardInterrupt (so a writer closes what it
    opened), which ends in one line, exit 130."""
    names = {**PARAM_FLAGS, **(_flags or {})}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        return fn(*args, **kwargs)
    except ClipsqlError as e:
        _fail(e.message(names), getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        _fail("interrupted (committed rows are kept; re-run to resume)", 130)
    except Exception as e:  # noqa: BLE001 - storage faults a command cannot recover from: one line
        wrapped = from_udf_text(str(e))     # a clipsql error raised inside a DuckDB UDF, in DuckDB's words
        if wrapped is not None:
            _fail(wrapped.message(names), wrapped.exit_code)
        msg = storage_fault(e)
        if msg is None:
            raise
        _fail(msg)
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def storage_fault(e: BaseException) -> str | None:
    """One line for a damaged or full disk / catalog / Lance file (see `clipsql doctor`), else None."""
    mod = type(e).__module__ or ""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e) \
            or "database or disk is full" in str(e):
        return (f"the disk is full ({getattr(e, 'filename', None) or text}): free space and re-run; "
                "committed rows are kept and the run resumes where it stopped")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
        return f"{e.filename}: {e.strerror}; if it is part of the store, {READ_ONLY_HINT}"
    if "Read-only file system" in str(e) or "attempt to write a readonly database" in str(e):
        return f"the store cannot be written here ({text}); {READ_ONLY_HINT}"
    if mod.startswith("sqlalchemy") or isinstance(e, UnicodeDecodeError):
        return f"the catalog cannot be read ({type(e).__name__}: {text}): run `clipsql doctor STORE`"
    if mod.startswith(("lance", "pyarrow")) or type(e).__name__ in ("LanceError", "ArrowInvalid", "ArrowIOError") \
            or "LanceError" in text:
        return f"a Lance table cannot be read ({text}): run `clipsql doctor STORE` (and --repair)"
    return None


@app.command()
def init(store: str = STORE_ARG,
         catalog: Optional[str] = typer.Option(None, help="SQLAlchemy URL of the catalog (default: SQLite file "
                                                          "inside the store), e.g. postgresql://user@host/db")) -> None:
    """Create a store: a LanceDB database plus a catalog of models, runs, rejects and statistics."""
    st = _run(Store.init, store, catalog)
    typer.echo(f"store ready at {st.path} (catalog: {st.engine.url.render_as_string(hide_password=True)})")


class _DefaultList(_Group):
    """`clipsql models STORE` lists (as before); `models default|rm STORE MODEL` manage."""

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


models_app = _Typer(cls=_DefaultList, no_args_is_help=True,
                    help="The models whose embeddings the store holds: list, choose the default, remove.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(store: str = STORE_ARG,
                fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json")) -> None:
    """List the models (`*` marks the default, which commands use without --model)."""
    st = _run(Store.open, store, read_only=True)
    default = st.get_setting("default_model")
    rows = [dict(model=m.model_id, kind=m.kind, dim=m.dim, logit_scale=round(m.logit_scale, 4),
                 logit_bias=m.logit_bias, storage=m.storage, rows=count_rows(st, m), default=m.model_id == default)
            for m in st.list_models()]
    if fmt == TableFmt.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no models yet: `clipsql ingest STORE SOURCE --model …`")
    for r in rows:
        star = "*" if r["default"] else " "
        typer.echo(f"{star} {r['model']}  kind={r['kind']} dim={r['dim']} logit_scale={r['logit_scale']} "
                   f"logit_bias={r['logit_bias']} storage={r['storage']} rows={r['rows']}")


@models_app.command("default")
def models_default(store: str = STORE_ARG,
                   model: str = typer.Argument(..., help="Model id (or a unique part of it).")) -> None:
    """Make MODEL the default: what ingest, stats, score and the score functions use without --model."""
    st = _run(Store.open, store)
    rec = _run(set_default_model, st, model)
    typer.echo(f"default model of {store}: {rec.model_id}")


@models_app.command("rm")
def models_rm(store: str = STORE_ARG,
              model: str = typer.Argument(..., help="Model id (or a unique part of it).")) -> None:
    """Remove a model: its embeddings, running statistics, fits and targets (samples stay)."""
    st = _run(Store.open, store)
    out = _run(remove_model, st, model)
    typer.echo(f"removed {out['model']}: {out['rows']} embedding rows, {out['fits']} fit(s), "
               f"{len(out['targets'])} target(s); default model now: {out['default_model'] or 'none'}")


@app.command()
def delete(store: str = STORE_ARG,
           where: str = typer.Option(..., help="SQL condition on the `samples` view (metadata columns "
                                               "included), e.g. \"caption IS NULL\" or \"width < 64\"."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; change nothing.")) -> None:
    """Delete samples and their embeddings under every model, in one commit.

    Running statistics are downdated exactly (the deleted rows' sums subtract); fits that
    covered a deleted row are marked stale. The ids are recorded (with the time and this
    --where) in the `deletions` table in the same commit: every later ingest, from any source,
    skips them and says how many. `clipsql undelete` lets them back in.
    """
    st = _run(Store.open, store)
    out = _run(delete_where, st, where, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    per = ", ".join(f"{n} from {m}" for m, n in out.rows.items()) or "no embedding rows"
    typer.echo(f"{verb} {out.samples} samples ({per})")
    if out.stale_fits:
        typer.echo(f"fit(s) {', '.join('#' + str(f) for f in out.stale_fits)} covered deleted rows and are "
                   "now stale: re-run `clipsql stats fit`")
    if out.recorded:
        typer.echo(f"recorded {out.recorded} deleted ids: ingest skips them from now on "
                   "(`clipsql undelete STORE --where …` lets them back in)")


@app.command()
def export(store: str = STORE_ARG,
           out: Path = typer.Argument(..., help="OUT.duckdb: one DuckDB database file; any other name: a folder "
                                                "of parquet files. Must not exist."),
           columns: Optional[str] = typer.Option(None, "--columns", help="Comma-separated columns of the samples "
                                                 "view to export (id always; default: every column)."),
           where: Optional[str] = typer.Option(None, "--where", help="SQL condition on the `samples` view choosing "
                                               "the samples; the other tables keep the rows of those ids."),
           model: Optional[str] = typer.Option(None, "--model", help="Export only this model's embeddings and "
                                               "scores (default: every model)."),
           progress: bool = typer.Option(True, help="Show a progress bar.")) -> None:
    """Export one committed snapshot for tools without clipsql: samples, embeddings, stored scores.

    Tables: samples, embeddings_<model key> (fixed-size FLOAT arrays), stored_scores_<key> and
    semdedup_<key> where the store has them. What was exported (store id, ledger commit id,
    table versions, models, clipsql version, time) is in the table clipsql_export (.duckdb) or
    _clipsql_export.json (folder). Written under a temporary name and renamed: OUT is absent
    or complete. Read it with plain DuckDB: `duckdb OUT.duckdb "SELECT count(*) FROM samples"`.
    """
    st = _run(Store.open, store, read_only=True)
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns is not None else None
    res = _run(export_store, st, out, columns=cols, where=where, model=model, progress=progress)
    tables = ", ".join(f"{t['table']} {t['rows']}" for t in res.tables)
    typer.echo(f"exported commit {res.commit_id} of {store} to {res.path} ({res.format}) in "
               f"{res.seconds:.2f}s: {tables}")


@app.command()
def undelete(store: str = STORE_ARG,
             where: str = typer.Option(..., help="SQL condition on the `deletions` view (id, uri, caption, source, "
                                                 "deleted_at, deleted_where), e.g. \"id = 'k17'\" or "
                                                 "\"deleted_at > '2026-01-05'\"."),
             dry_run: bool = typer.Option(False, "--dry-run",
                                          help="Count what would be restored; change nothing.")) -> None:
    """Let deleted ids back in: remove them from the deletions record, in one commit.

    The source units that held them are forgotten in that commit, so the next ingest of their
    source reads those units again and restores exactly these rows (rows already stored are
    skipped, other deleted ids stay skipped). See them with
    `clipsql query STORE "SELECT * FROM deletions"`.
    """
    st = _run(Store.open, store)
    out = _run(undelete_where, st, where, dry_run=dry_run)
    if dry_run:
        typer.echo(f"would let {out.ids} deleted ids back in")
        return
    again = (f"; re-run `clipsql ingest STORE {' / '.join(out.sources[:3])}` to restore them"
             if out.sources else "; the next ingest that meets them restores them")
    typer.echo(f"removed {out.ids} ids from the deletions record ({out.units} source unit(s) forgotten){again}")


@app.command()
def backfill(store: str = STORE_ARG,
             columns: Optional[str] = typer.Option(
                 None, help=f"Comma-separated columns to add (default: all of {', '.join(BACKFILLABLE)})."),
             progress: bool = typer.Option(True, help="Show a progress bar.")) -> None:
    """Add the samples columns that ingest now computes to a store written before them.

    The caption features (caption_lang, caption_lang_score, caption_words, caption_tokens,
    caption_chars; see the README's "DataComp's filters as SQL") are computed from the stored
    captions and added in one commit; columns already there are left alone, so it can be re-run.
    A killed backfill leaves the store as it was.
    """
    st = _run(Store.open, store)
    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    out = _run(run_backfill, st, names, progress=progress)
    if out.added:
        typer.echo(f"added {', '.join(out.added)} to {out.rows} samples (commit #{out.commit_id})")
    if out.already:
        typer.echo(f"already there: {', '.join(out.already)}")


@app.command()
def ingest(
    store: str = STORE_ARG,
    source: str = typer.Argument(..., help="Folder of images + .txt captions, a csv/parquet/jsonl table, "
                                           "webdataset .tar shard(s), or precomputed embeddings (also a "
                                           "DataComp pool folder: both feature sets, as two models)."),
    model: Optional[str] = typer.Option(None, help="ARCH (with --pretrained), hf-hub:ORG/REPO, local-dir:PATH, "
                                                   "or clipsql-demo. Default: the store's default model, else the "
                                                   "bundled demo model."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag, e.g. laion2b_s34b_b79k."),
    checkpoint: Optional[Path] = typer.Option(None, help="A local checkpoint file for ARCH."),
    batch_size: int = typer.Option(256, min=1, help="Rows per encode/write batch."),
    workers: Optional[int] = typer.Option(
        None, min=0, help="DataLoader workers decoding images in parallel (0 = inline). Default: on CUDA all "
        "cores but one (up to 8); on CPU one per 4 cores (up to 4; none on 2 cores, where the forward needs both)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    image_column: str = typer.Option("image", help="Table sources: column with the image path."),
    caption_column: str = typer.Option("caption", help="Table/precomputed sources: caption column."),
    id_column: Optional[str] = typer.Option(None, help="Column with stable sample ids (default: content hash)."),
    image_embeddings: Optional[str] = typer.Option(None, help="Precomputed parquet: image embedding column."),
    text_embeddings: Optional[str] = typer.Option(None, help="Precomputed parquet: text embedding column."),
    kind: Optional[str] = typer.Option(None, help="Force the source kind: " + ", ".join(SOURCE_KINDS) + "."),
    datacomp_features: Optional[str] = typer.Option(
        None, "--datacomp-features", help="DataComp pools (<stem>.parquet + <stem>.npz shards, found in SOURCE or "
        "SOURCE/metadata): b32 (ViT-B-32/openai, 512-d), l14 (ViT-L-14/openai, 768-d) or all (default: both, one "
        "run per model, ids = uids)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    commit_rows: int = typer.Option(100_000, min=1, help="Commit (make rows visible, record the source units "
                                    "done) every N rows …"),
    commit_seconds: float = typer.Option(30.0, min=0.0, help="… or every T seconds, whichever comes first. A "
                                         "killed run loses at most this much work, never committed rows."),
    max_fragments: int = typer.Option(MAX_FRAGMENTS, min=2, help="Merge a table's small data files "
                                      "(under ~256 MiB) into full-size ones during the run whenever a commit "
                                      "leaves more small files than this (and merge by size tiers past 2,048 "
                                      "files in all), so a commit's cost stays bounded."),
    allow_missing_captions: bool = typer.Option(
        False, "--allow-missing-captions", help="Keep images that have no caption (none, or empty once cleaned) "
        "with a NULL caption and text embedding: image-only scores work, text and pair scores are NULL. "
        "Default: rejected as missing_caption / empty_caption."),
    max_file_mb: float = typer.Option(256.0, min=0.001, help="Image or caption files (and tar members) larger "
                                      "than this many MiB are rejected unread (file_too_large)."),
    update: bool = typer.Option(False, "--update", help="Rewrite rows the store already holds whose caption or "
                                "metadata changed in the source (re-encoding changed captions). Needs --id-column."),
    storage: Optional[str] = typer.Option(
        None, metavar="float32|float16", help="How the model's vectors are stored, chosen by its first ingest "
        "(default float32; an existing model keeps its own): float16 halves them (2.1 kB a row instead of 4.1 at "
        "512-d), at the cost of rounding each value to float16 (relative 2^-11): every score moves by at most "
        "0.4% of its spread and rankings stay the same to 1e-7 (measured: README \"Float16 storage\"). "
        "Statistics, fits and scores are computed from the stored values. Asking an existing model for the "
        "other storage is an error."),
    engine: str = typer.Option("local", help="local (this process) or ray (source units as Ray tasks; images "
                               "encoded by an actor pool, one GPU per actor where the cluster has GPUs)."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: `auto` or host:port joins a running "
                                              "cluster; default: start a local Ray for this command."),
    fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="Summary as table or json."),
) -> None:
    """Encode a source with open_clip and add its raw embeddings; re-running adds nothing new.

    Source units already ingested with this model (files, row groups, shards: recognised by
    path, size and mtime) are skipped without being read; new rows are checked against the
    store's id index. Rows become visible in commits of --commit-rows rows or --commit-seconds.
    """
    st = _run(Store.open, store)
    datacomp = kind == "datacomp" or (kind is None and is_datacomp_pool(source))
    if datacomp_features is not None and not datacomp:
        _fail(f"--datacomp-features applies to DataComp pools only; {source} is not one")
    model_given = model is not None or checkpoint is not None
    if not model_given and not datacomp:
        model, pretrained, checkpoint = _default_model(st, pretrained)
    opts = IngestOptions(batch_size=batch_size, workers=workers, device=device, image_column=image_column,
                         caption_column=caption_column, id_column=id_column, image_embeddings=image_embeddings,
                         text_embeddings=text_embeddings, source_kind=kind, progress=progress,
                         policy=CommitPolicy(rows=commit_rows, seconds=commit_seconds, max_fragments=max_fragments),
                         update=update,
                         allow_missing_captions=allow_missing_captions, model_given=model_given,
                         max_file_bytes=int(max_file_mb * (1 << 20)), storage=storage)
    eng = _run(engines.choose, engine, ray_address)
    if datacomp:
        _ingest_datacomp(st, source, datacomp_features, model, pretrained, checkpoint, opts, eng, fmt)
        return
    summary = _run(eng.ingest, st, source, model=model, pretrained=pretrained,
                   checkpoint=str(checkpoint) if checkpoint else None, options=opts)
    if fmt == TableFmt.json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(format_summary(summary, st.path))


def _ingest_datacomp(st, source, features, model, pretrained, checkpoint, opts, engine, fmt):  # noqa: ANN001, ANN202
    """A DataComp pool: one run per feature set (ingest.pipeline.ingest_pool), a summary each."""
    summaries = _run(ingest_pool, st, source, features=features, model=model, pretrained=pretrained,
                     checkpoint=checkpoint, options=opts, run=engine.ingest)
    if fmt == TableFmt.json:
        typer.echo(json.dumps([s.to_dict() for s in summaries], indent=2))
    else:
        typer.echo("\n".join(format_summary(s, st.path) for s in summaries))


def _default_model(st, pretrained):  # noqa: ANN001, ANN202
    """No --model: the store's default model, else the bundled demo model (with a plain notice)."""
    if st.list_models():
        spec = st.model().spec
        name = spec.get("given") or spec["open_clip_name"]
        if spec.get("local") and spec.get("pretrained"):
            return name, None, Path(spec["pretrained"])
        return name, pretrained or spec.get("pretrained"), None
    typer.secho(f"note: {DEMO_NOTICE}", fg=typer.colors.YELLOW, err=True)
    return DEFAULT_MODEL, None, None


def format_summary(s, store=None) -> str:  # noqa: ANN001
    lines = [f"run {s.run_id} [{s.model_id}] {s.status}: added {s.added}, skipped (already present) {s.skipped}, "
             f"rejected {sum(s.rejected.values())}; {s.commits} commit(s)"
             + (f", {s.units_skipped} source unit(s) already ingested" if s.units_skipped else "")]
    if s.samples_restored:
        lines.append(f"  {s.samples_restored} samples restored (their embeddings were stored; a repair had lost them)")
    if s.deleted:
        lines.append(f"  {deleted_phrase(s.deleted, s.deleted_on)} (`clipsql undelete STORE --where …` lets them "
                     "back in)")
    if s.updated or s.updated_samples:
        lines.append(f"  updated: {s.updated_samples} samples rewritten, {s.updated} text embeddings re-encoded")
    for reason, n in sorted(s.rejected.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {n:>6}  {reason}")
    for note in s.notes:
        lines.append(f"  note: {note}")
    lines.append(f"device {s.device or '-'}, {s.workers} decode workers; "
                 f"wall {s.wall_seconds:.2f}s, {s.rows_per_second:.1f} rows/s; stage seconds: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in s.seconds.items()))
    if s.maintenance:
        lines.append(f"maintenance: {_maintenance_line(s.maintenance)}")
    if s.rejected and sum(s.rejected.values()):
        sql = f"SELECT reason, location, detail FROM rejects WHERE run_id = {int(s.run_id)}"
        lines.append(f"see rejects with: clipsql query {shlex.quote(str(store))} {shlex.quote(sql)}"
                     if store is not None else f"see rejects with the SQL: {sql}")
    return "\n".join(lines)


def _maintenance_line(report: OptimizeReport) -> str:
    parts = []
    for name, t in report.tables.items():
        bits = [f"{t.fragments_before}→{t.fragments} fragments"] if t.fragments is not None else []
        if t.index:
            bits.append(f"index {t.index}")
        if t.vector_index:
            bits.append(f"vector index {t.vector_index}")
        if t.vector_index_stale:
            bits.append(f"vector index misses {t.vector_index_stale} new rows (searched exactly until "
                        "`clipsql optimize` folds them in)")
        if t.versions_pruned is not None:
            bits.append(f"{t.versions_pruned} old versions pruned, {t.versions} kept")
        parts.append(f"{name}: " + ", ".join(bits))
    return "; ".join(parts) + (f" ({report.seconds:.1f}s)" if report.seconds is not None else "")


@app.command()
def optimize(store: str = STORE_ARG,
             retention_hours: float = typer.Option(24.0, min=0.0, help="Keep every version younger than this "
                                                   "(running queries and recent selections read them); versions "
                                                   "a fit was computed on are kept always."),
             compact: bool = typer.Option(True, help="Rewrite small fragments into ~1M-row ones."),
             index: bool = typer.Option(True, help="Build or refresh the BTREE index on `id` of every table."),
             prune: bool = typer.Option(True, help="Delete versions older than --retention-hours."),
             fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="Report as table or json.")) -> None:
    """Compact fragments, build or refresh the id indexes and prune old versions (under the writer lock).

    Ingest runs the first two by itself when a table passes 64 fragments or a quarter of its rows
    are outside the id index. Queries running meanwhile keep their snapshot; a kill loses nothing.
    """
    st = _run(Store.open, store)
    report = _run(run_optimize, st, compact=compact, index=index, prune=prune, retention_hours=retention_hours)
    if fmt == TableFmt.json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo(f"optimized {store}: {_maintenance_line(report)}")


@app.command()
def doctor(store: str = STORE_ARG,
           repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed (under the writer lock), "
                                                               "reporting each step."),
           fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json")) -> None:
    """Check the store after a crash or a storage fault; exit 0 when it is consistent.

    Checks formats, catalog integrity, the commit ledger against the Lance versions, row counts,
    duplicate ids, embeddings without samples, statistics against a recomputation from the
    vectors, fits, targets, runs left running and dropped tables. --repair rolls tables back to
    the ledger; a table that cannot be read keeps every row that still reads (a lost data file
    costs its own rows, a damaged manifest goes back to the newest that opens, quarantined), the
    source units of lost rows are forgotten so re-running the ingest restores them, fits that
    covered them marked stale and the loss reported; intact embeddings are never deleted. It
    also recomputes statistics, marks dead runs aborted and rebuilds a lost catalog from the
    Lance data (fits and targets are then listed as lost).
    """
    report = _run(run_doctor, store, repair=repair)
    for f in report.findings:                   # the library names its arguments; the CLI, its flags
        f.detail = renamed(f.detail, PARAM_FLAGS)
    if fmt == TableFmt.json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(format_doctor_report(report))
    if not report.consistent:
        raise typer.Exit(1)


@stats_app.command("show")
def stats_show(store: str = STORE_ARG, model: Optional[str] = typer.Option(None, help="Model id (default: the "
                                                                                        "store's default)."),
               fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json"),
               top: int = typer.Option(5, help="How many covariance eigenvalues to show.")) -> None:
    """Show running statistics: n, mean, norms, top covariance eigenvalues, and whether they are current."""
    st = _run(Store.open, store, read_only=True)
    report = _run(stats_report, st, model, top=top)
    if fmt == TableFmt.json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo(format_stats_report(report))


ENGINE_OPT = typer.Option("local", help="local (this process) or ray (one task per Lance fragment).")
RAY_ADDRESS_OPT = typer.Option(None, help="--engine ray: `auto` or host:port joins a running cluster; "
                                          "default: start a local Ray for this command.")


@stats_app.command("refresh")
def stats_refresh(store: str = STORE_ARG, model: Optional[str] = typer.Option(None, help="Model id (default: "
                                                                                           "all models)."),
                  engine: str = ENGINE_OPT, ray_address: Optional[str] = RAY_ADDRESS_OPT) -> None:
    """Recompute the running statistics from every stored vector."""
    st = _run(Store.open, store)
    targets = [_run(st.model, model)] if model else st.list_models()
    eng = _run(engines.choose, engine, ray_address)

    def refresh() -> None:
        for m in targets:
            state = eng.refresh_stats(st, m)
            typer.echo(f"{m.model_id}: statistics recomputed over {state.n} rows")
    _run(refresh)


class Scale(str, Enum):
    one = "1"
    model = "model"


class Prior(str, Enum):
    posterior_mean = "posterior-mean"
    uniform = "uniform"


@stats_app.command("fit")
def stats_fit(store: str = STORE_ARG,
              model: Optional[str] = typer.Option(None, help="Model id (default: the store's default)."),
              reference_size: int = typer.Option(10_000, help="Rows M in the reference sample (all rows when the "
                                                              "store has fewer)."),
              seed: int = typer.Option(0, help="Seed of the reference draw (same inputs + seed → same fit)."),
              scale: Scale = typer.Option(Scale.one, help="Cosine scale a: 1 (the Information Gain paper; the "
                                                          "approximation is accurate) or the model's logit "
                                                          "scale (and bias)."),
              prior: Prior = typer.Option(Prior.posterior_mean, help="Prior over the reference: the mean "
                                                                     "posterior, or uniform."),
              for_recipe: Optional[str] = typer.Option(None, "--for-recipe", help="Make the fit a curation "
                                                       "recipe runs on, with its published settings (kl-guided: "
                                                       "the model's logit scale, uniform prior; overrides --scale "
                                                       "and --prior), kept apart: the default fit of the scores "
                                                       "view stays as it is."),
              include_own_pair: bool = typer.Option(False, "--include-own-pair", help="Information Gain of a "
                                                    "row drawn into the reference keeps its own pair in its "
                                                    "posterior (the authors' DataComp code); default: left "
                                                    "out, so being drawn does not decide the score.")) -> None:
    """Draw the reference sample and fit priors, means and covariances for the scores."""
    st = _run(Store.open, store)
    res = _run(fit_stats, st, model, reference_size=reference_size, seed=seed, scale=scale.value,
               prior=prior.value, recipe=for_recipe, own_pair="include" if include_own_pair else "exclude",
               _flags={"recipe": "--for-recipe"})
    kind = f" for {res.recipe}" if res.recipe else ""
    kind += " (own pairs kept in: the authors' behaviour)" if include_own_pair else ""
    typer.echo(f"fit #{res.fit_id}{kind} of {res.model}: reference M={res.reference_size} of {res.rows} "
               f"rows (seed {res.seed}, a={res.a:.4g}, b={res.b:.4g}, prior {res.prior}) "
               f"in {res.seconds:.2f}s")


@app.command(epilog="Score and vector functions (`.help` in `clipsql sql` says what each computes): "
             + ", ".join(f.name for f in SQL_FUNCTIONS) + ".")
def query(store: str = STORE_ARG,
          sql: str = typer.Argument(..., help="DuckDB SQL over the views samples, embeddings, rejects, "
                                              "stats, scores and the score functions."),
          fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json | parquet"),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a file instead of stdout "
                                                                             "(required for parquet)."),
          allow_external_access: bool = typer.Option(False, help="Let the SQL read/write files (COPY, read_csv…); "
                                                                 "off by default so ad-hoc SQL cannot touch files."),
          max_rows: int = typer.Option(40, help="Rows shown in table format (0 = all).")) -> None:
    """Run SQL through DuckDB over the store (read-only by default)."""
    out = _run(run_query, store, sql, fmt.value, output, allow_external_access, max_rows)
    if out:
        typer.echo(out)


@app.command()
def sql(store: str = STORE_ARG,
        allow_external_access: bool = typer.Option(False, help="Let the SQL read/write files.")) -> None:
    """An interactive SQL prompt over the store (same views and functions as `query`)."""
    _run(repl, store, allow_external_access)


@app.command()
def serve(store: str = STORE_ARG,
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8765, help="Port of the app (HTTP)."),
          sql_port: int = typer.Option(8815, help="Port of the SQL endpoint (Arrow Flight SQL)."),
          auth: Optional[Path] = typer.Option(None, "--auth", help="Credentials file: one `name:secret` per line "
                                              "(else $CLIPSQL_SERVE_TOKENS). Never on the command line."),
          allow_anonymous: bool = typer.Option(False, help="Accept clients without credentials (loopback "
                                                           "addresses only)."),
          tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) for both endpoints."),
          tls_key: Optional[Path] = typer.Option(None, help="TLS private key (PEM)."),
          memory_limit: str = typer.Option("4GB", help="DuckDB memory limit of each query's connection."),
          query_timeout: float = typer.Option(600.0, help="Seconds a query may run (0: no limit)."),
          max_queries: int = typer.Option(32, min=1, help="Queries running at once (more wait, then are "
                                                          "refused as busy)."),
          remote_images: bool = typer.Option(False, help="Show http(s) images (DataComp, LAION pools) in the app: "
                                             "the curator's browser loads them from their own hosts. Off: no "
                                             "request to any host but this server.")) -> None:
    """Serve the store read-only to a team: SQL over Arrow Flight SQL, and the app. Ctrl-C stops it."""
    _run(run_server, store, host=host, port=port, sql_port=sql_port, auth_file=auth,
         allow_anonymous=allow_anonymous, tls_cert=tls_cert, tls_key=tls_key, memory_limit=memory_limit,
         query_timeout_s=query_timeout or None, max_queries=max_queries, remote_images=remote_images,
         echo=typer.echo)


@app.command()
def score(store: str = STORE_ARG,
          columns: str = typer.Option("", help="Comma-separated score columns of the `scores` view to store, "
                                               "e.g. image_info_gain,text_info_gain."),
          model: Optional[str] = typer.Option(None, help="Model id (default: the store's default)."),
          neg_clip_loss_pool: bool = typer.Option(False, "--neg-clip-loss-pool", help="Also store "
                                                  "neg_clip_loss_pool: negCLIPLoss in the paper's pool form (K "
                                                  "random partitions into batches of exactly |B|; τ, K, seed "
                                                  "from the fit)."),
          norm_sim_d: bool = typer.Option(False, "--norm-sim-d", help="Also store norm_sim_d: NormSim-D, "
                                          "for when no target data exist."),
          pool_batch_size: Optional[int] = typer.Option(None, help="|B| of the pool form (default "
                                                                    "min(32768, pool))."),
          seed: Optional[int] = typer.Option(None, help="Seed of the pool partitions (default: the fit's)."),
          progress: bool = typer.Option(True, help="Show a progress bar (with an ETA) on the pool form."),
          engine: str = ENGINE_OPT, ray_address: Optional[str] = RAY_ADDRESS_OPT) -> None:
    """Materialize chosen scores as stored columns (view `stored_scores`), stamped with the fit they came from.

    Locally, re-running replaces the table: pass every column you want in one run. With
    --engine ray each fragment is a task; a re-run with the same fit and columns scores only
    rows added since (another fit or other columns rescore all), and rows an ingest commits
    while the job runs are reported as pending."""
    st = _run(Store.open, store)
    cols = [c.strip() for c in columns.split(",") if c.strip()]
    eng = _run(engines.choose, engine, ray_address)
    res = _run(eng.score, st, cols, model,
               neg_clip_loss_pool=neg_clip_loss_pool, norm_sim_d=norm_sim_d, pool_batch_size=pool_batch_size,
               seed=seed, progress=progress)
    if res.tasks is not None:      # a distributed job: how it went, and what an ingest committed meanwhile
        typer.echo(f"stored {', '.join(res.columns)} for {res.rows} rows of {res.model} "
                   f"(fit #{res.fit_id}, {res.mode}, {res.tasks} tasks) in {res.seconds:.2f}s; "
                   f"{res.pending} rows committed meanwhile are pending (re-run to score them)")
        return
    typer.echo(f"stored {', '.join(res.columns)} for {res.rows} rows of {res.model} "
               f"(fit #{res.fit_id}) in {res.seconds:.2f}s — query them in the view stored_scores")


@target_app.command("add")
def target_add(store: str = STORE_ARG,
               name: str = typer.Argument(..., help="Target name (letters, digits, _ . -); SQL refers to it."),
               source: Optional[str] = typer.Argument(None, help="Images to encode with --model (any ingest "
                                                                 "layout; precomputed sources give their image "
                                                                 "embeddings)."),
               query: Optional[str] = typer.Option(None, "--query", help="SQL over the store returning an "
                                                                          "image_embedding column."),
               model: Optional[str] = typer.Option(None, help="The model the target belongs to (default: the "
                                                              "store's default)."),
               replace: bool = typer.Option(False, help="Replace an existing target of that name."),
               index: str = typer.Option("auto", help="norm_sim_inf: exact, ann (LanceDB IVF_FLAT cosine index, "
                                                      "recall measured and recorded) or auto (ann above 200k "
                                                      "rows)."),
               seed: int = typer.Option(0, help="Seed of the recall sample (ann).")) -> None:
    """Add a target set (image embeddings of one model) for norm_sim_2 / norm_sim_inf."""
    st = _run(Store.open, store)
    res = _run(add_target, st, name, query=query, source=source, model=model, replace=replace, index=index,
               seed=seed, echo=typer.echo)
    typer.echo(f"target {res.name} of {res.model}: {res.n} rows (dropped {res.dropped_rows} invalid), "
               f"norm_sim_inf {res.index} in {res.seconds:.2f}s")


@target_app.command("list")
def target_list(store: str = STORE_ARG, fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json")) -> None:
    """List the target sets."""
    st = _run(Store.open, store, read_only=True)
    rows = _run(list_targets, st)
    if fmt == TableFmt.json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no targets yet: `clipsql target add STORE NAME --query \"SELECT image_embedding FROM …\"`")
    for r in rows:
        recall = f" recall@1={r.recall_at_1:.4f}" if r.recall_at_1 is not None else ""
        typer.echo(f"{r.name}  model={r.model} n={r.n} index={r.index}{recall}  {r.source}")


@target_app.command("rm")
def target_rm(store: str = STORE_ARG, name: str = typer.Argument(..., help="Target name.")) -> None:
    """Remove a target set."""
    st = _run(Store.open, store)
    res = _run(remove_target, st, name)
    typer.echo(f"removed target {res.name} ({res.n} rows of {res.model})")


# the recipes `select` offers: queries.curation.selection.RECIPE_SPECS
Recipe = Enum("Recipe", {name.replace("-", "_"): name for name in RECIPES}, type=str)


class OutFmt(str, Enum):
    parquet = "parquet"
    csv = "csv"
    txt = "txt"
    datacomp_uids = "datacomp-uids"


@app.command("select")
def select_cmd(store: str = STORE_ARG,
               recipe: Optional[Recipe] = typer.Option(None, help=recipe_help()),
               sql: Optional[str] = typer.Option(None, "--sql", help="SQL returning an id column; its order "
                                                                      "decides."),
               where: Optional[str] = typer.Option(None, "--where", help="SQL condition narrowing the pool "
                                                   "first, over samples columns, semdedup_cluster / "
                                                   "semdedup_max_sim (after `clipsql dedup`) and stored scores, "
                                                   "e.g. \"semdedup_max_sim < 0.99\"; fractions are of what "
                                                   "passes."),
               target: Optional[str] = typer.Option(None, help="Target set for negclip-normsim and image-based."),
               fraction: Optional[float] = typer.Option(None, help="Keep floor(F × pool) rows (pool = every row "
                                                                   "of the model, or those passing --where; F read "
                                                                   "as written in decimal)."),
               limit: Optional[int] = typer.Option(None, help="Keep exactly N rows (instead of --fraction)."),
               threshold: Optional[float] = typer.Option(None, help="clip-score: keep every row with clip_score "
                                                                    ">= T (DataComp uses 0.25 for B/32, 0.3 for "
                                                                    "L/14)."),
               first_fraction: float = typer.Option(DEFAULT_FIRST_FRACTION,
                                                    help="negclip-normsim: share kept by negCLIPLoss."),
               negclip_form: str = typer.Option("row", help="negclip-normsim: row (per-row stable form) or pool "
                                                            "(stored by `clipsql score --neg-clip-loss-pool`)."),
               clusters: Optional[int] = typer.Option(None, help="image-based: k-means clusters (default pool / "
                                                                 "128, DataComp's 100,000 for 12.8M rows)."),
               sample: Optional[int] = typer.Option(None, help="image-based: rows the k-means trains on (seeded; "
                                                               "default the whole pool)."),
               seed: Optional[int] = typer.Option(None, help="image-based: k-means seed (default 0); kl-guided: "
                                                             "seed of a fit it makes (default the default fit's)."),
               make_fit: bool = typer.Option(True, "--make-fit/--no-make-fit", help="kl-guided: make the recipe's "
                                             "fit when the store has none (else refuse, naming the command)."),
               include_own_pair: bool = typer.Option(False, "--include-own-pair", help="kl-guided: a caption "
                                                     "drawn into the reference keeps its own pair in its "
                                                     "posterior, as the authors' code does (their selection "
                                                     "exactly); default: left out."),
               output: Path = typer.Option(..., "--output", "-o", help="subset.parquet | .csv | .txt (one id per "
                                                                       "line) | .npy (DataComp uids); a "
                                                                       "<output>.json sidecar records how."),
               fmt: Optional[OutFmt] = typer.Option(None, "--format", help="Output format (default: from the "
                                                    "suffix); datacomp-uids writes the sorted u8,u8 uid array "
                                                    "DataComp's resharder reads."),
               model: Optional[str] = typer.Option(None, help="Model id (default: the store's default)."),
               engine: str = typer.Option("local", help="local, or ray: the recipe's pool-wide score (text "
                                          "Information Gain / negCLIPLoss / clip_score) one Ray task per "
                                          "fragment."),
               ray_address: Optional[str] = RAY_ADDRESS_OPT) -> None:
    """Choose a subset by a curation recipe or SQL; ties broken by id (ascending), cut to an exact count."""
    spec = SelectSpec(recipe=recipe.value if recipe else None, sql=sql, target=target, fraction=fraction,
                      limit=limit, threshold=threshold, where=where, first_fraction=first_fraction,
                      negclip_form=negclip_form, clusters=clusters, sample=sample, seed=seed, make_fit=make_fit,
                      include_own_pair=include_own_pair, format=fmt.value if fmt else None)
    # every selection only reads the store, unless kl-guided has to make its fit (a catalog write)
    st = _run(Store.open, store, read_only=True)
    if _run(writes_fit, st, spec, model):
        st = _run(Store.open, store)
    res = _run(select, st, spec, output=output, model=model, engine=_run(engines.choose, engine, ray_address))
    for w in res.warnings:
        typer.secho(f"Warning: {renamed(w, PARAM_FLAGS)}", fg=typer.colors.YELLOW, err=True)
    made = res.recipe_fit
    if made is not None and made.made:
        typer.echo(f"made fit #{made.fit_id} for {res.recipe} (a={made.a:.6g}, prior {made.prior}, "
                   f"seed {made.seed}, M={made.reference_size}); the default fit is unchanged")
    typer.echo(f"selected {res.selected} of {res.pool} rows ({res.recipe}) → {output}; how: {res.sidecar}")


class PlotKind(str, Enum):
    hist = "hist"
    scatter = "scatter"


@app.command()
def dedup(store: str = STORE_ARG,
          model: Optional[str] = typer.Option(None, help="Model id (default: the store's default)."),
          clusters: Optional[int] = typer.Option(None, "--clusters", help="K of the spherical k-means (default "
                                                 "round(√ valid rows): 1,000 at 1M rows)."),
          sample: Optional[int] = typer.Option(None, "--sample", help="Rows the k-means is fitted on, a seeded "
                                               "sample (default min(pool, max(10,000, 64·K)))."),
          seed: Optional[int] = typer.Option(None, help="Seed of the sample and the k-means++ init (default 0)."),
          iterations: Optional[int] = typer.Option(None, help="At most this many Lloyd iterations (default 20; "
                                                   "stops earlier when no row changes cluster)."),
          refit: bool = typer.Option(False, "--refit", help="Fit new centroids even when the parameters match "
                                     "the stored run (unspecified options: the current pool's defaults)."),
          status: bool = typer.Option(False, "--status", help="Only report what is stored and how many rows are "
                                      "pending; compute nothing."),
          memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="GiB of image vectors held at once "
                                                    "(default $CLIPSQL_DEDUP_MEMORY_GB or 2); never changes a value. "
                                                    "A full run also copies the vectors to $TMPDIR when it has room "
                                                    "(4·dim bytes a row), read back faster than from Lance."),
          device: Optional[str] = typer.Option(None, "--device", help="Where the k-means, the assignment and "
                                               "the within-cluster Gram blocks run: numpy, auto (a CUDA GPU if "
                                               "torch sees one), cpu, cuda[:N] (default $CLIPSQL_DEVICE or numpy); "
                                               "never changes a value."),
          progress: bool = typer.Option(True, help="Show a progress bar."),
          engine: str = typer.Option("local", help="local (this process) or ray: the assignment one task per run "
                                     "of fragments, the within-cluster pass one task per set of clusters "
                                     "(--memory-gb per task); never changes a value."),
          ray_address: Optional[str] = RAY_ADDRESS_OPT) -> None:
    """Semantic deduplication (SemDeDup): per row semdedup_cluster and semdedup_max_sim (view `semdedup`).

    semdedup_max_sim is the largest cosine of a row's image embedding to the members of its
    k-means cluster ranked before it (farthest from the centroid first); removing
    semdedup_max_sim > 1 − ε keeps one row of every duplicate group, e.g. ε = 0.01:
    `clipsql query STORE "SELECT count(*) FROM semdedup WHERE semdedup_max_sim > 0.99"`.
    A re-run with the same parameters (the default: the stored ones) assigns rows added
    since to the stored centroids and recomputes only the clusters that changed."""
    if status:
        st = _run(Store.open, store, read_only=True)
        res = _run(dedup_status, st, model)
        p = res.params
        how = (f"K={p.get('clusters')}, sample {p.get('sample')}, seed {p.get('seed')}, "
               f"iterations {p.get('iterations')}, {p.get('init')}" if p else "never computed")
        todo = " — run `clipsql dedup STORE` to bring it up to date" if res.pending or res.stale else ""
        typer.echo(f"semdedup of {res.model}: {res.stored} of {res.rows} rows have a value ({how}); "
                   f"{res.pending} pending, {res.stale} stored rows deleted since{todo}")
        return
    eng = _run(engines.choose, engine, ray_address)
    st = _run(Store.open, store)
    out = _run(semdedup, st, model, clusters=clusters, sample=sample, seed=seed, iterations=iterations,
               refit=refit, progress=progress, memory_gb=memory_gb, device=device, engine=eng)
    rm = ", ".join(f"ε={e}: {c} ({c / max(out.rows, 1):.1%})" for e, c in out.removable.items())
    if out.mode == "current":
        how = "already up to date"
    elif out.mode == "incremental":
        how = (f"incremental: {out.new_rows} new rows assigned, {out.removed_rows} deleted, "
               f"{out.recomputed} clusters recomputed")
    else:
        fit = out.fit or DedupFit()
        how = f"full: k-means {fit.iterations_run} iterations{' (converged)' if fit.converged else ''}"
    typer.echo(f"semdedup of {out.model}: {out.rows} rows ({out.valid} with an image vector), "
               f"K={out.clusters}, sample {out.sample}, seed {out.seed}; {how}; "
               f"{out.pending_before} rows were pending; in {out.seconds:.2f}s")
    typer.echo(f"removable (semdedup_max_sim > 1 − ε): {rm} — view `semdedup`")


@app.command()
def gallery(store: str = STORE_ARG,
            sql: str = typer.Argument(..., help="SQL returning an `id` column and any others, e.g. "
                                                "\"SELECT id, image_info_gain FROM scores\"; uri/caption are "
                                                "joined from samples when missing."),
            output: Path = typer.Option(Path("gallery.html"), "--output", "-o", help="The HTML file to write."),
            limit: int = typer.Option(1000, min=1, help="Most rows shown (ignored with --top-bottom, which "
                                                        "ranks every row)."),
            thumb: int = typer.Option(128, min=8, help="Thumbnail size in pixels."),
            top_bottom: Optional[Tuple[str, int]] = typer.Option(None, "--top-bottom", metavar="COLUMN N",
                                                                 help="The N lowest and N highest rows by "
                                                                      "COLUMN, side by side."),
            allow_external_access: bool = typer.Option(
                False, "--allow-external-access", help="Also show images the store's samples do not name (a "
                "query can put any path in `uri`; by default those tiles are left empty)."),
            remote_images: bool = typer.Option(
                True, help="Show http(s) images (DataComp, LAION pools) by URL: the browser that opens the page "
                "fetches them from their hosts. --no-remote-images writes a page that contacts no other host.")) -> None:
    """One self-contained HTML page of thumbnails for any SQL result: local images embedded, web
    images (URL-based pools) by URL unless --no-remote-images."""
    tb = (top_bottom[0], top_bottom[1]) if top_bottom else None
    res = _run(write_gallery, store, sql, output, limit=limit, thumb=thumb, top_bottom=tb,
               allow_external_access=allow_external_access, remote_images=remote_images)
    note = f", {res.broken} broken image(s)" if res.broken else ""
    if res.remote:
        note += f", {res.remote} web image(s) your browser loads from their hosts"
    if res.offline:
        note += f", {res.offline} web image(s) not shown (--no-remote-images)"
    typer.echo(f"gallery of {res.shown} of {res.rows} rows{note}: {res.path}")


@app.command()
def plot(store: str = STORE_ARG,
         kind: PlotKind = typer.Argument(..., help="hist COLUMN | scatter X Y"),
         columns: List[str] = typer.Argument(..., help="hist: one column; scatter: X and Y."),
         sql: Optional[str] = typer.Option(None, help="SQL choosing the rows; must return the columns "
                                                      "(default: SELECT COLUMNS FROM scores WHERE model = the default model)."),
         output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG file (default: "
                                                                            "<kind>-<columns>.png)."),
         bins: int = typer.Option(50, min=1, help="hist: number of bins.")) -> None:
    """PNG plots of score columns: a histogram, or a scatter with the fitted line and R²."""
    want = 1 if kind == PlotKind.hist else 2
    if len(columns) != want:
        _fail(f"plot {kind.value} takes {want} column(s), got {len(columns)}")
    out = output or Path(f"{kind.value}-{'-'.join(columns)}.png")
    if kind == PlotKind.hist:
        res = _run(plot_hist, store, columns[0], sql=sql, output=out, bins=bins)
        typer.echo(f"{res.path}: n={res.n} mean={res.mean:.4g} std={res.std:.4g}")
    else:
        sc = _run(plot_scatter, store, columns[0], columns[1], sql=sql, output=out)
        typer.echo(f"{sc.path}: n={sc.n} R²={sc.r2:.4f} slope={sc.slope:.4g} intercept={sc.intercept:.4g}")


@app.command()
def geometry(store: str = STORE_ARG,
             model: Optional[str] = typer.Option(None, help="Model id (default: the store's default)."),
             output: Path = typer.Option(Path("geometry-report"), "--output", "-o",
                                         help="Directory for report.json, report.html and the PNG plots."),
             sample: Optional[int] = typer.Option(None, min=2, help="Use a seeded random sample of this many "
                                                                    "rows (default: every row)."),
             seed: int = typer.Option(0, help="Seed of --sample."),
             top: int = typer.Option(10, min=2, help="How many top separable features to list.")) -> None:
    """Geometry of the raw embeddings, per modality (mean m, per-feature std σ, covariance C).

    Reports the offset ratio ‖m‖/‖σ‖; the thin shell (μ = E‖x − m‖, var ‖x − m‖, and √tr C
    against μ); feature separability Sep(l) = |m_I(l) − m_T(l)| / √(var_I(l) + var_T(l));
    off-diagonal dominance ODD(l) = Σ_{k≠l} |C_lk| / C_ll; and the image vs text conformity
    distributions. Writes an HTML report with figures.
    """
    res = _run(geometry_report, store, model, output, sample=sample, seed=seed, top=top)
    for m, r in (("image", res.image), ("text", res.text)):
        typer.echo(f"{m}: offset ratio {r.offset_ratio:.4g}, ‖x−m‖ mean {r.thin_shell.mu:.4g} "
                   f"var {r.thin_shell.var:.4g} vs sqrt(tr C) {r.thin_shell.sqrt_trace:.4g}")
    s = res.separator
    typer.echo(f"separator on features {s.features[0]}, {s.features[1]}: train accuracy {s.accuracy:.4f}")
    typer.echo(f"report: {res.paths.html}")


class IndexKind(str, Enum):
    ivf_hnsw_sq = "ivf_hnsw_sq"
    ivf_pq = "ivf_pq"


class Modality(str, Enum):
    image = "image"
    text = "text"


@app.command("index")
def index_cmd(store: str = STORE_ARG,
              model: Optional[str] = typer.Option(None, "--model", help="Model id (default: the store's default)."),
              modality: Modality = typer.Option(Modality.image, "--modality",
                                                help="Which stored vectors to index: image or text embeddings."),
              kind: IndexKind = typer.Option(IndexKind.ivf_hnsw_sq, "--kind",
                                             help="ivf_hnsw_sq (IVF partitions with an HNSW graph over 8-bit "
                                                  "scalar-quantized vectors; the default, measured best at 1M rows) "
                                                  "or ivf_pq (product quantization: smaller, lower recall)."),
              seed: int = typer.Option(0, "--seed", help="Seed of the IVF centroids' k-means (and its training "
                                                        "sample) and of the stored vectors the recall is measured "
                                                        "with: the same seed builds the same ivf_hnsw_sq index "
                                                        "(ivf_pq's quantizer is trained by Lance, unseeded)."),
              fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json"),
              engine: str = typer.Option("local", help="local (this process) or ray: the seeded IVF "
                                                        "centroids trained here, then one index segment per "
                                                        "group of fragments built on the workers and "
                                                        "committed as one index."),
              ray_address: Optional[str] = RAY_ADDRESS_OPT) -> None:
    """Build a cosine vector index on a model's vectors and print its recall@10 against exact search.

    Partitions ≈ √rows; tables too small for the index are refused (exact search is fast there).
    nprobes (then the refine factor / ef) is raised until recall@10 reaches 0.95 for both 100 sampled
    stored image vectors and 100 stored text vectors as queries (text → image is the common search);
    both recalls are recorded in the catalog and used by `nearest(...)` / `clipsql search`. Rows ingested later are
    searched flat until `clipsql optimize` folds them into the index."""
    st = _run(Store.open, store)
    eng = _run(engines.choose, engine, ray_address)
    res = _run(build_index, st, model, modality.value, kind.value, seed=seed,
               echo=None if fmt == TableFmt.json else typer.echo, engine=eng)
    if fmt == TableFmt.json:
        typer.echo(json.dumps(res, indent=1, default=str))


@app.command()
def search(store: str = STORE_ARG,
           prompt: Optional[str] = typer.Argument(None, help="Text to search by (encoded with the model's text "
                                                             "tower, like the SQL function text_embedding)."),
           k: int = typer.Option(50, "-k", help="How many rows to return (best first, ties by id)."),
           model: Optional[str] = typer.Option(None, "--model", help="Model id (default: the store's default)."),
           modality: Modality = typer.Option(Modality.image, "--modality",
                                             help="Which stored vectors to rank: image (text → image) or text."),
           where: Optional[str] = typer.Option(None, "--where", help="SQL boolean expression over the samples "
                                               "view's columns, applied before the top-k (e.g. \"width >= 256\"); "
                                               "filtered searches are exact."),
           like: Optional[str] = typer.Option(None, "--like", help="Search by the stored vector of the row with "
                                              "this id instead of a prompt (image → image)."),
           exact: bool = typer.Option(False, "--exact", help="Exact search even when a vector index exists."),
           gallery: Optional[Path] = typer.Option(None, "--gallery", help="Also write an HTML gallery of the "
                                                  "results to this file."),
           fmt: TableFmt = typer.Option(TableFmt.table, "--format", help="table or json")) -> None:
    """Similarity search by a prompt or a stored row: prints id, cosine score, uri and caption.

    The SQL behind it: SELECT * FROM nearest(text_embedding('a red circle'), 50)."""
    res = _run(run_search, store, prompt, like=like, k=k, model=model, modality=modality.value, where=where,
               exact=exact, gallery=str(gallery) if gallery else None)
    typer.echo(format_search(res, fmt.value))


@app.command()
def demo(store: Path = typer.Argument(Path("clipsql-demo-store"), help="Where to build the demo store."),
         rows: int = typer.Option(2000, min=50, help="How many generated image–caption pairs."),
         workers: Optional[int] = typer.Option(None, min=0, help="Decode workers (default: as `ingest`)."),
         progress: bool = typer.Option(True, help="Show progress bars.")) -> None:
    """Offline demo: generate shapes, ingest them with the bundled model, fit, and run curation queries."""
    _run(run_demo, store, rows=rows, workers=workers, progress=progress, echo=typer.echo)


def main() -> None:
    """The console entry (also `python -m clipsql`, whose __main__ installs the same handler
    before importing this module)."""
    signal.signal(signal.SIGINT, _interrupted)
    try:
        app()
    except SystemExit as e:
        _exit_now(e.code)
        raise


def _exit_now(code: object) -> None:
    """End the process without the interpreter's finalization when nothing can be lost by it:
    tearing down SQLAlchemy's and pyarrow's objects module by module takes ~0.1 s, a fifth of
    `clipsql query STORE "SELECT 1"`. Only when the main thread is the only Python thread left
    (a thread still running would be joined by a normal exit); the atexit handlers run (spill
    folders, temporary copies, multiprocessing and Ray shutdown) and both streams are flushed
    first. Everything a command wrote is committed before it returns (a writer killed at any
    instant loses nothing committed), so skipping object destructors loses nothing. Returns
    (the caller exits normally) when a stream cannot be flushed or threads remain."""
    if threading.active_count() > 1:
        return
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
        code = 1
    elif not isinstance(code, int):
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
