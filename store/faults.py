"""Fault injection for the crash tests: `CLIPSQL_FAULT=<point>` SIGKILLs the process there.

Points: `commit:between-tables` (samples committed in Lance, the model table not),
`commit:after-lance` (both Lance commits done, the catalog transaction not),
`optimize:after-compact` (a compaction committed in Lance, the ledger not moved),
`optimize:before-prune` (ledger moved, old versions not yet pruned).
"""
from __future__ import annotations

import os
import signal


_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """`CLIPSQL_FAULT=point` kills at the first pass through `point`, `point@N` at the N-th."""
    want = os.environ.get("CLIPSQL_FAULT")
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
