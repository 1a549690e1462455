"""The DuckDB layer: the connection with the store's views, every SQL function (registered in
one place: `functions.register`), `clipsql query`/`sql`, and stored score columns."""
