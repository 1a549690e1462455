"""Shared helpers of the benchmark scripts (bench/ingest.py, bench/scores.py).

The machines these run on are shared and small, so every figure that matters is a
*ratio measured within one run*: the two sides are interleaved, each repeated, and
the best (fastest) repetition of each side is kept.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]   # run as `python bench/x.py`: bench/ is on sys.path, clipsql installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


CPU: dict[str, list[float]] = {}   # process CPU seconds of each run of the last `interleaved` call


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int,
                settle: float = 0.5) -> dict[str, list[tuple[float, Any]]]:
    """Run every variant once per round, `repeats` rounds; {name: [(seconds, result), ...]}.
    The process CPU time of each run lands in CPU[name] (CPU ÷ wall shows how parallel a run was).
    Before each run the process idles `settle` seconds: OpenBLAS's worker threads keep spinning
    for a while after a multi-threaded call (measured: the variant run right after the numpy
    baseline lost ~8 % to them), and a run must not pay for its predecessor."""
    out: dict[str, list[tuple[float, Any]]] = {k: [] for k in variants}
    for k in variants:
        CPU[k] = []
    for _ in range(max(1, repeats)):
        for name, fn in variants.items():
            time.sleep(settle)
            c0 = time.process_time()
            out[name].append(timed(fn))
            CPU[name].append(time.process_time() - c0)
    return out


def cpu_of_best(name: str, runs: list[tuple[float, Any]]) -> float:
    """CPU seconds of the fastest run of `name` in the last `interleaved` call."""
    i = min(range(len(runs)), key=lambda j: runs[j][0])
    return CPU[name][i]


def best(runs: list[tuple[float, Any]]) -> tuple[float, Any]:
    return min(runs, key=lambda r: r[0])


def paired_median_ratio(ref: list[tuple[float, Any]], other: list[tuple[float, Any]]) -> float:
    """Median over rounds of ref_seconds / other_seconds (runs of one round are close in time, so a
    slow drift of the machine's load cancels); > 1 means `other` is faster."""
    import statistics
    return statistics.median(r[0] / o[0] for r, o in zip(ref, other))


def _proc_status_kib(field: str) -> int | None:
    """A KiB figure of this process from /proc/self/status; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def vm_hwm_kib() -> int | None:
    """Peak resident set size of this process (VmHWM, KiB)."""
    return _proc_status_kib("VmHWM")


def vm_rss_kib() -> int | None:
    """Current resident set size of this process (VmRSS, KiB)."""
    return _proc_status_kib("VmRSS")


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[_fmt(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v)


def key_values(figures: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}".replace(",", "") for k, v in figures.items())


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        print(f"wrote {path}")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def cli_stdout(argv: list[str]) -> str:
    """Run `clipsql ARGV…` (the CLI's own entry point) in this process; its standard output.
    A non-zero exit is raised as SystemExit, so a failing step fails its bench."""
    import contextlib
    import io

    from clipsql import cli
    sys.argv = ["clipsql", *argv]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            cli.app(prog_name="clipsql")
        except SystemExit as e:
            if e.code:
                raise
    return buf.getvalue()


@contextlib.contextmanager
def work_dir(given: str | None) -> Iterator[Path]:
    """A bench's work directory: `given` (`--tmp`, created, kept) or a temporary one, removed after."""
    if given is not None:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipsql-bench-") as name:
        yield Path(name)
