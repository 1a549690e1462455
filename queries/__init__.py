"""The DuckDB layer's front door: `queries.connect(STORE)` (an in-memory DuckDB connection with
the store's views and every score function) and `queries.one_blas_thread()` (BLAS pinned to one
thread while DuckDB's threads run score UDFs). The score math itself is `clipsql.kernels.scores`."""
from __future__ import annotations

from clipsql.queries.sql.db import connect
from clipsql.queries.sql.functions import one_blas_thread

__all__ = ["connect", "one_blas_thread"]
