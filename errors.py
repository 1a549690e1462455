"""Domain exceptions.

Every exception subclasses a built-in (so callers can catch ``ValueError`` etc.)
and :class:`ClipsqlError` (so the CLI can turn it into a message and exit code 1).
Messages say what went wrong *and* how to fix it.
"""


class ClipsqlError(Exception):
    """Base class of every error clipsql raises on purpose."""
    exit_code = 1


class StoreNotFound(ClipsqlError, FileNotFoundError):
    pass


class StoreLocked(ClipsqlError, RuntimeError):
    pass


class ModelError(ClipsqlError, ValueError):
    """Unknown model, missing checkpoint, weights that cannot be fetched."""


class DimensionMismatch(ClipsqlError, ValueError):
    pass


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


class CatalogError(ClipsqlError, ConnectionError):
    """The catalog database cannot be reached or used (bad URL, missing driver, server down)."""


class TagError(ClipsqlError, ValueError):
    """A tag that cannot be stored as given (empty or overlong name, ids that are not samples)."""
