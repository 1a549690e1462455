"""`clipsql serve`'s SQL endpoint (Arrow Flight SQL) against the same queries in-process.

    .venv/bin/python bench/serve.py [--rows 1000] [--result-rows 1000000] [--clients 8] [--json serve.json]

A demo store (`--rows` generated images, the bundled model, fitted) is built in a temporary
directory (or `--store PATH` is used as is). `clipsql serve` runs in a process of its own on
loopback, as a team would run it; the client is ADBC (`adbc_driver_flightsql`), in this process.

* transfer: a ~10⁶-row result (`samples` × range: id, uri, caption, an integer) fetched whole as
  Arrow through the endpoint ÷ the same query run in-process on `clipsql.queries.connect`
  (`to_arrow_table`); `stream_ratio` = remote rows/s ÷ in-process rows/s (target ≥ 0.5). The
  server's peak RSS growth during the remote runs is printed beside the result's size: the
  result streams, it is not materialised in the server.
* concurrency: `--clients` clients, each on its own connection, run the README's first query
  (`SELECT uri, image_info_gain FROM scores ORDER BY image_info_gain LIMIT 10`, a score
  function over every row) `--queries` times; queries/s ÷ one client doing the same. Beside
  it, the server process's CPU seconds per wall second (cores busy): when that reaches the
  cores the machine gives it, more clients cannot add queries/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment)

from _common import best, interleaved, key_values, machine, table, write_json

SECRET = "bench-secret-0123456789"
TOP10 = "SELECT uri, image_info_gain FROM scores ORDER BY image_info_gain LIMIT 10"


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "CLIPSQL_SERVE_TOKENS": f"bench:{SECRET}"}
    proc = subprocess.Popen([sys.executable, "-m", "clipsql", "serve", str(store), "--sql-port", "0", "--port", "0",
                             "--memory-limit", "2GB"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    for line in proc.stdout:
        if "Flight SQL" in line:
            return proc, line.split("):", 1)[1].split()[0]
    raise SystemExit(f"clipsql serve did not start (exit {proc.wait()})")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect_client(url: str):  # noqa: ANN201
    import adbc_driver_flightsql.dbapi as fsql
    return fsql.connect(url, db_kwargs={"username": "bench", "password": SECRET}, autocommit=True)


def fetch(conn, sql: str):  # noqa: ANN001, ANN201
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return cur.fetch_arrow_table()
    finally:
        cur.close()


def clients_qps(url: str, clients: int, queries: int) -> float:
    conns = [connect_client(url) for _ in range(clients)]
    for c in conns:                                     # warm: each connection prepared once
        fetch(c, TOP10)
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run(conn) -> None:  # noqa: ANN001
        barrier.wait()
        try:
            for _ in range(queries):
                assert fetch(conn, TOP10).num_rows == 10
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    return clients * queries / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1000, help="rows of the demo store")
    ap.add_argument("--store", default=None, help="an existing store instead of a new demo store")
    ap.add_argument("--result-rows", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=10, help="queries per client")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from clipsql.queries.sql.db import connect
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="clipsql-bench-serve-"))
    if args.store:
        store = Path(args.store)
    else:
        from clipsql.queries.present.demo import run_demo
        store = tmp / "store"
        if not (store / "clipsql.json").exists():
            run_demo(store, rows=args.rows, workers=0, progress=False, echo=lambda s: None)
    proc, url = start_server(store)
    try:
        local = connect(store)
        n_store = local.sql("SELECT count(*) FROM samples").fetchall()[0][0]
        k = -(-args.result_rows // n_store)
        big = f"SELECT s.id, s.uri, s.caption, r.range AS k FROM samples s, range({k}) r"
        remote = connect_client(url)
        fetch(remote, "SELECT 1")
        rss0 = peak_rss_mib(proc.pid)
        runs = interleaved({
            "in-process": lambda: local.sql(big).to_arrow_table(),
            "flight": lambda: fetch(remote, big),
        }, args.repeats)
        rss1 = peak_rss_mib(proc.pid)
        cur = remote.cursor()                          # 3× the result, counted as it streams by
        cur.execute(big.replace(f"range({k})", f"range({3 * k})"))
        n3 = sum(b.num_rows for b in cur.fetch_record_batch())
        cur.close()
        rss3 = peak_rss_mib(proc.pid)
        (t_local, tbl_local), (t_remote, tbl_remote) = best(runs["in-process"]), best(runs["flight"])
        assert tbl_local.num_rows == tbl_remote.num_rows
        n = tbl_remote.num_rows
        result_mib = tbl_remote.nbytes / 2**20
        remote.close()
        local.close()
        del runs, tbl_local, tbl_remote

        qps: dict[int, list[float]] = {1: [], args.clients: []}
        cores: dict[int, list[float]] = {1: [], args.clients: []}
        for _ in range(args.repeats):                   # interleaved, best of each
            for c in qps:
                c0, t0 = cpu_s(proc.pid), time.perf_counter()
                qps[c].append(clients_qps(url, c, args.queries))
                cores[c].append((cpu_s(proc.pid) - c0) / (time.perf_counter() - t0))
        q1, qn = max(qps[1]), max(qps[args.clients])
        cores1, coresn = max(cores[1]), max(cores[args.clients])
    finally:
        proc.terminate()
        proc.wait(60)
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "result_rows": n, "result_mib": round(result_mib, 1),
        "in_process_rows_per_s": n / t_local, "flight_rows_per_s": n / t_remote,
        "stream_ratio": t_local / t_remote,
        "server_peak_rss_growth_mib": round(rss1 - rss0, 1),
        "server_peak_rss_growth_3x_mib": round(rss3 - rss0, 1), "rows_3x": n3,
        "qps_1_client": q1, f"qps_{args.clients}_clients": qn, "concurrency_ratio": qn / q1,
        "server_cores_1_client": cores1, f"server_cores_{args.clients}_clients": coresn,
    }
    print(table([["in-process (to_arrow_table)", n, t_local, n / t_local],
                 ["Flight SQL (ADBC, other process)", n, t_remote, n / t_remote]],
                ["10⁶-row result", "rows", "best s", "rows/s"]))
    print()
    print(table([[1, q1, cores1], [args.clients, qn, coresn]],
                ["clients", "queries/s (TOP10, best)", "server CPU cores busy (best)"]))
    print()
    print(key_values(figures))
    write_json(args.json, {"figures": figures, "machine": machine(), "store_rows": n_store,
                           "qps_runs": {str(c): v for c, v in qps.items()}})


if __name__ == "__main__":
    main()
