"""Running clipsql's heavy steps on a Ray cluster (`--engine ray`).

The engine choice lives in one place (`cluster.engine`); the work itself is the same code the
local path runs: source units are read and checked by the source classes, images go through
`ingest.encode`, statistics partials through `store.stats`, commits through `Store.commit`
(the commit ledger), and stored scores through the very SQL score functions DuckDB calls.
Workers write Lance data files and return their metadata with per-unit statistics partials;
the driver alone commits, so a killed driver leaves no visible half-commit and a killed
worker's task is retried.
"""
