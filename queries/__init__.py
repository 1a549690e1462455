"""The score math (`queries.kernels.scores`) and the DuckDB layer (`queries.connect`)."""
from __future__ import annotations

from typing import Any


def connect(store: Any, **kwargs: Any) -> Any:
    """`queries.connect(STORE)` → an in-memory DuckDB connection with views and score functions."""
    from clipsql.queries.sql.db import connect as _connect
    return _connect(store, **kwargs)


def one_blas_thread() -> Any:
    """Context manager pinning BLAS to one thread while DuckDB's threads run score UDFs."""
    from clipsql.queries.sql.functions import one_blas_thread as _pin
    return _pin()
