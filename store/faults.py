"""Fault injection for the crash tests: `CLIPSQL_FAULT=<point>` SIGKILLs the process there.

Points: `commit:between-tables` (samples committed in Lance, the model table not),
`commit:after-lance` (both Lance commits done, the catalog transaction not),
`optimize:after-compact` (a compaction committed in Lance, the ledger not moved),
`optimize:before-prune` (ledger moved, old versions not yet pruned).
"""
from __future__ import annotations

import os
import signal


def fault(point: str) -> None:
    if os.environ.get("CLIPSQL_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
