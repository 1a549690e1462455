"""A small demo store (300 generated rows, bundled model, fitted) shared by the gallery,
plot and geometry tests: built once per test session under pytest's base temp dir."""
from __future__ import annotations

from pathlib import Path

SMALL_DEMO_ROWS = 300


def small_demo_store(tmp_path_factory) -> Path:
    from clipsql.queries.present.demo import run_demo
    path = tmp_path_factory.getbasetemp() / "small-demo-store"
    done = path / ".small-demo-done"
    if not done.exists():
        run_demo(path, rows=SMALL_DEMO_ROWS, workers=0, progress=False, echo=lambda s: None)
        done.write_text("ok")
    return path
