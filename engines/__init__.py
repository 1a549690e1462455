"""Where clipsql's heavy steps run, chosen in one place: `choose(name, ray_address)`.

The CLI calls `choose` once per command that takes `--engine local|ray` and hands the engine
(queries.sql.engine.Engine) to the library functions: ingest, `stats refresh`, `score`,
`select`'s pool-wide scores and `dedup`'s assignment and within-cluster passes. The local engine is the library's own (queries.sql.engine.LOCAL);
the Ray engine (engines.ray) runs the same code per source unit or per Lance fragment on a Ray
cluster: source units are read and checked by the source classes, images go through
`ingest.encode`, statistics partials through `kernels.moments`, commits through `ledger.commit`
(the commit ledger), and stored scores through the very SQL score functions DuckDB calls.
Workers write Lance data files and return their metadata; an ingest's written ids and
statistics partials go to the run's shard actors (engines.shards), which check the run's
duplicates and merge the partials, so the driver handles O(units) small messages. The driver
alone commits, so a killed driver leaves no visible half-commit and a killed worker's task is
retried. Nothing below this package imports it.
"""
from __future__ import annotations

from clipsql.engines.engine import EngineError
from clipsql.engines.ray import RayEngine
from clipsql.queries.sql.engine import LOCAL, Engine

ENGINES = ("local", "ray")


def choose(name: str, ray_address: str | None = None) -> Engine:
    """The engine called `name` (local | ray); `ray_address` is where the Ray engine runs."""
    if name == "local":
        return LOCAL
    if name == "ray":
        return RayEngine(ray_address)
    raise EngineError(f"`engine` must be one of {', '.join(ENGINES)}; got {name!r}", param="engine")


__all__ = ["ENGINES", "Engine", "EngineError", "choose"]
