"""Fault injection for the crash tests: `CLIPSQL_FAULT=<spec>[,<spec>…]`, each spec
`point[@N][=action]`: at the N-th pass (default the first) through `point`, `kill` (the default:
SIGKILL the process) or `enospc` (raise OSError "No space left on device", as a full disk would).

Points: `commit:between-tables` (samples committed in Lance, the model table not),
`commit:after-lance` (both Lance commits done, the catalog transaction not),
`optimize:after-compact` (a compaction committed in Lance, the ledger not moved),
`optimize:before-prune` (ledger moved, old versions not yet pruned), `compact:after-lance` (a
compaction during a run committed in Lance, the ledger not moved), `delete:after-lance`,
`update:after-lance`, `models-rm:after-catalog`, `target:after-table`, `target:after-switch`,
`select:before-rename`, `select:between-renames` (the sidecar published, the output not),
`writer:data-file` (a Lance data file being written),
`ingest:before-commit` (an ingest's data files written, their commit not begun), `run:finish`
(the run's catalog row being closed), `fit:before-save`, `score:before-write`,
`register:after-table` (a new model's Lance table created, its catalog rows not),
`backfill:after-lance` (backfilled columns committed in Lance, the ledger not moved).
"""
from __future__ import annotations

import errno
import os
import signal


_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """Act on `point` when CLIPSQL_FAULT names it (a no-op otherwise: one environment lookup)."""
    want = os.environ.get("CLIPSQL_FAULT")
    if not want:
        return
    for spec in want.split(","):
        spec, _, action = spec.strip().partition("=")
        name, _, nth = spec.partition("@")
        if name != point:
            continue
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] != int(nth or 1):
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)", point)
        os.kill(os.getpid(), signal.SIGKILL)
