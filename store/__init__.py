"""The clipsql store: Lance tables + a SQLAlchemy catalog (see store.store)."""
from __future__ import annotations

import os as _os


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (M_ARENA_MAX) before Lance and DuckDB start their threads.

    Each reader/writer thread otherwise gets an arena and freed scan buffers stay in it, so a
    process's peak memory grew with the rows it had scanned: a DuckDB scan over 5M rows × 512-d
    peaked at 1,140 MiB (850 MiB at 1M); with two arenas 930 MiB at 5M and 840 MiB at 1M, and no
    slower (bench/scale.py). MALLOC_ARENA_MAX in the environment wins; off glibc nothing happens."""
    if _os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, int(arenas))     # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()
# Lance's Rust logger is configured once, when `lance` is first imported, from LANCE_LOG: set
# it (and LANCEDB_LOG) here (every path to lance goes through this package) so its WARN lines, e.g. "No existing
# dataset … it will be created", never reach a user's terminal. LANCE_LOG in the environment wins.
_os.environ.setdefault("LANCE_LOG", "error")
_os.environ.setdefault("LANCEDB_LOG", "error")     # lancedb bundles its own Lance and logger
# Index statistics (rows a vector index does not cover yet: store.maintenance, store.vector_index)
# need no centroids: opt into Lance's coming default now, which also silences its warning about it.
_os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
