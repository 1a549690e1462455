"""Every SQL function clipsql adds to DuckDB, registered in one place."""
from __future__ import annotations

from typing import Any


def register(con: Any, st: Any) -> None:
    """Register the score functions on `con` for store `st` (filled in by the scores layer)."""
    return None


def staleness_warning(con: Any) -> str | None:
    """A warning when the default model's fit predates a stated share of its rows (None when fine)."""
    return None
