"""Pure score math (docs/science.md §1–8): numpy only, no DuckDB and no store, so the DuckDB UDFs
and any worker process (a Ray task) import the very same functions."""
