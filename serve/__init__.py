"""`clipsql serve`: one long-running, read-only process serving a store to a team.

* the SQL endpoint (`flight`): Arrow Flight SQL on pyarrow.flight — every view and score
  function of `clipsql query`, for ADBC, JDBC (DBeaver) and other Flight SQL clients;
* the browser app (`app`, on HTTP);
* `auth`: who may connect (secrets from a file or the environment); `sessions`: prepared
  read-only DuckDB connections, each request on the store's last commit; `stream`: a query on a
  worker thread, its result streamed in batches; `server.run_server`: both endpoints, stopped
  cleanly by Ctrl-C / SIGTERM.

Layering: above clipsql.queries and clipsql.store, below clipsql.cli.
"""
