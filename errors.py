"""Domain exceptions.

Every exception subclasses a built-in (so callers can catch ``ValueError`` etc.)
and :class:`ClipsqlError` (so the CLI can turn it into a message and exit code 1).
Messages say what went wrong *and* how to fix it.
"""
from __future__ import annotations

import math
import os


class ClipsqlError(Exception):
    """Base class of every error clipsql raises on purpose.

    `param` names the library argument the error is about (API terms: ``where``, ``sql``); the
    message spells it in backticks (`` `where` is empty``) and a front end renames it with
    :meth:`message` (the CLI: ``--where``)."""
    exit_code = 1
    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param

    def message(self, names: dict[str, str] | None = None) -> str:
        """The message with each backticked argument name replaced by its name in `names` (e.g. a
        CLI flag); unknown names stay as they are."""
        return renamed(str(self), names)


def renamed(text: str, names: dict[str, str] | None = None) -> str:
    """`text` (a library message, warning or report line) with each backticked argument name in
    `names` replaced by its front end's name for it (`limit` → --limit); others stay as they are."""
    for param, name in (names or {}).items():
        text = text.replace(f"`{param}`", name)
    return text


class StoreNotFound(ClipsqlError, FileNotFoundError):
    pass


class MarkerDamaged(StoreNotFound):
    """The store's clipsql.json cannot be read (`clipsql doctor STORE --repair` rewrites it from the
    catalog, which records the store id)."""


class StoreLocked(ClipsqlError, RuntimeError):
    pass


class ModelError(ClipsqlError, ValueError):
    """Unknown model, missing checkpoint, weights that cannot be fetched."""


class DimensionMismatch(ClipsqlError, ValueError):
    pass


class StorageError(ModelError):
    """A model's storage dtype (float32 / float16): unknown, not the one the model was stored with,
    or values float16 cannot hold."""


class SourceError(ClipsqlError, ValueError):
    """A source that cannot be read at all (not a single bad row: those are rejects)."""


class StatsError(ClipsqlError, LookupError):
    """Missing or stale statistics (names the command that fixes it)."""


class QueryError(ClipsqlError, RuntimeError):
    pass


class QueryCancelled(QueryError):
    """Ctrl-C / SIGINT interrupted a running query."""
    exit_code = 130


class TargetError(ClipsqlError, LookupError):
    """Unknown, empty or mismatched target set (names the `clipsql target` command that fixes it)."""


class SelectionError(ClipsqlError, ValueError):
    """A curation request that cannot run as given (bad recipe, fraction, SQL or output)."""


class ExportError(ClipsqlError, ValueError):
    """An export that cannot be written as asked (OUT exists or cannot be written, unknown columns)."""


class CatalogError(ClipsqlError, ConnectionError):
    """The catalog database cannot be reached or used (bad URL, missing driver, server down)."""


class CatalogDamaged(CatalogError):
    """A value stored in the catalog cannot be read (damaged bytes): `clipsql doctor STORE --repair`
    drops or rebuilds it."""


class StoreReadOnly(ClipsqlError, PermissionError):
    """A command that changes the store run where the store cannot be written (a read-only mount,
    a backup, another user's files)."""


READ_ONLY_HINT = ("this command changes the store: run it as a user who can write the store, or on a writable "
                  "copy; commands that only read (query, sql, stats show, select with an existing fit) work as "
                  "they are")


class ObjectStoreError(ClipsqlError, RuntimeError):
    """Object storage (S3 and compatibles) cannot be reached or refuses access. Not an OSError on
    purpose: code that treats an OSError as "no such object" must not take an outage for one."""


UDF_WRAPPER = "Python exception occurred while executing the UDF: "


def from_udf_text(text: str) -> ClipsqlError | None:
    """The clipsql error that DuckDB wrapped into `text` ("Invalid Input Error: Python exception
    occurred while executing the UDF: StatsError: no fitted statistics …"), rebuilt from its class
    name and message; None when `text` wraps no clipsql error."""
    _, sep, rest = text.partition(UDF_WRAPPER)
    if not sep:
        return None
    name, sep, message = rest.partition(": ")
    cls = globals().get(name.rsplit(".", 1)[-1]) if sep else None
    if not (isinstance(cls, type) and issubclass(cls, ClipsqlError)):
        return None
    return cls(message.strip())
class ServeError(ClipsqlError, RuntimeError):
    """`clipsql serve` cannot start or serve as asked (credentials, address, certificates)."""


class AuthError(ClipsqlError, PermissionError):
    """A request to `clipsql serve` without valid credentials."""
class TagError(ClipsqlError, ValueError):
    """A tag that cannot be stored as given (empty or overlong name, ids that are not samples)."""


class LanguageModelError(ClipsqlError, RuntimeError):
    """The caption language-identification model cannot be loaded."""


class BackfillError(ClipsqlError, ValueError):
    """`clipsql backfill` was asked for a column it cannot compute."""


class SettingError(ClipsqlError, ValueError):
    """An environment setting (CLIPSQL_…) whose value cannot be used: the message names the variable."""


def env_number(name: str, default: float, *, minimum: float = 0.0, above: bool = False,
               environ: dict | None = None) -> float:
    """The number environment variable `name` holds (`default` when unset or empty); a value that is not a
    finite number ≥ `minimum` (> `minimum` with `above`) → SettingError naming the variable."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        bound = f"> {minimum:g}" if above else f"≥ {minimum:g}"
        raise SettingError(f"{name} must be a number {bound}; got {raw!r} (unset it for the default, {default:g})")
    return value
