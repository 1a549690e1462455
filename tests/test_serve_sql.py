"""`clipsql serve`'s SQL endpoint through the real Flight SQL client (ADBC) on loopback: the same
results as `clipsql query`, authentication, read-only refusals, malformed requests, cancellation,
limits, concurrent clients, streaming, snapshots across an ingest, TLS and the command itself."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

pytest.importorskip("adbc_driver_flightsql")
import adbc_driver_flightsql.dbapi as fsql  # noqa: E402

from _small_demo import SMALL_DEMO_ROWS, small_demo_store  # noqa: E402
from conftest import write_image_folder  # noqa: E402

from clipsql.errors import QueryCancelled, ServeError  # noqa: E402
from clipsql.queries.sql.cli_query import _table_text, run_query  # noqa: E402
from clipsql.queries.sql.db import connect  # noqa: E402
from clipsql.serve import flightsql_proto as proto  # noqa: E402
from clipsql.serve.auth import Auth  # noqa: E402
from clipsql.serve.server import Server  # noqa: E402

ALICE = "alice-secret-0123456789"
BOB = "bob-secret-0123456789"
TOP10 = "SELECT uri, image_info_gain FROM scores ORDER BY image_info_gain LIMIT 10"
LONG = "SELECT sum(hash(i)) FROM range(2000000000000) t(i)"      # hours: only ever cancelled


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return small_demo_store(tmp_path_factory)


@pytest.fixture(scope="module")
def server(store):
    srv = Server(store, port=None, sql_port=0, auth=Auth({"alice": ALICE, "bob": BOB}),
                 memory_limit="256MB", query_timeout_s=None, echo=lambda s: None).start()
    yield srv
    srv.stop()


def client(srv: Server, *, user: str = "alice", password: str = ALICE, autocommit: bool = True, **kw):
    return fsql.connect(srv.sql_url, db_kwargs={"username": user, "password": password, **kw},
                        autocommit=autocommit)


def rows(conn, sql: str, params=None) -> list[tuple]:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "Traceback" not in text and 'File "' not in text, text
    return text


# -- what `clipsql query` gives ------------------------------------------------------------------

def test_done_when_query_equals_clipsql_query(server, store):
    with client(server) as conn:
        remote = rows(conn, TOP10)
        cur = conn.cursor()
        cur.execute(TOP10 + " OFFSET 0")
        table = cur.fetch_arrow_table()
        cur.close()
    local = json.loads(run_query(store, TOP10, fmt="json"))
    assert len(remote) == 10
    # equal values; rows with equal gains may come in either order
    assert sorted(remote, key=lambda r: (r[1], r[0])) == sorted(((r["uri"], r["image_info_gain"]) for r in local),
                                                                 key=lambda r: (r[1], r[0]))
    assert table.column_names == ["uri", "image_info_gain"]
    # and printed the way `clipsql query` prints it, on a query without ties
    ordered = "SELECT uri, image_info_gain FROM scores ORDER BY image_info_gain, uri LIMIT 10"
    with client(server) as conn:
        cur = conn.cursor()
        cur.execute(ordered)
        printed = _table_text(cur.fetch_arrow_table(), 40)
        cur.close()
    assert printed == run_query(store, ordered)


def test_search_functions_and_parameters(server, store):
    con = connect(store)
    try:
        near = "SELECT id, score FROM nearest(text_embedding('a red circle'), 5) ORDER BY score DESC, id"
        want_near = con.sql(near).fetchall()
        gains = "SELECT id, image_info_gain FROM scores WHERE image_info_gain > $1 ORDER BY id"
        cut = con.sql("SELECT median(image_info_gain) FROM scores").fetchall()[0][0]
        want_gains = con.sql(gains, params=[cut]).fetchall()
        want_stats = con.sql("SELECT model, modality, n FROM stats ORDER BY 1, 2").fetchall()
    finally:
        con.close()
    with client(server) as conn:
        assert rows(conn, near) == want_near and len(want_near) == 5
        assert rows(conn, gains.replace("$1", "?"), (cut,)) == want_gains    # a bound parameter
        assert 0 < len(want_gains) < SMALL_DEMO_ROWS
        assert rows(conn, "SELECT model, modality, n FROM stats ORDER BY 1, 2") == want_stats


def test_catalog_calls(server):
    with client(server) as conn:
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "clipsql"
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        names = {t["table_name"] for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]}
        assert {"scores", "samples", "embeddings", "stats", "rejects"} <= names
        assert not any(n.startswith("_") for n in names)              # the connection's own registrations
        schema = conn.adbc_get_table_schema("scores")
        assert "image_info_gain" in schema.names and "uri" in schema.names
        assert set(conn.adbc_get_table_types()) == {"TABLE", "VIEW"}


# -- who may connect -----------------------------------------------------------------------------

def test_wrong_password_and_no_credentials_refused(server):
    with pytest.raises(fsql.Error) as e:
        client(server, password="not-the-secret-at-all")
    assert "UNAUTHENTICATED" in one_line_error(e) and "wrong user name or password" in str(e.value)
    with pytest.raises(fsql.Error) as e:
        client(server, user="bob", password=ALICE)                   # another user's secret
    assert "wrong user name or password" in one_line_error(e)
    anon = fsql.connect(server.sql_url, autocommit=True)
    with pytest.raises(fsql.Error) as e:
        rows(anon, "SELECT 1")
    assert "needs credentials" in one_line_error(e)
    anon.close()


def test_tokens(server):
    ok = fsql.connect(server.sql_url, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {BOB}"},
                      autocommit=True)
    assert rows(ok, "SELECT 42") == [(42,)]
    ok.close()
    bad = fsql.connect(server.sql_url, db_kwargs={"adbc.flight.sql.authorization_header": "Bearer nope-nope-nope"},
                       autocommit=True)
    with pytest.raises(fsql.Error) as e:
        rows(bad, "SELECT 1")
    assert "invalid or expired token" in one_line_error(e)
    bad.close()


def test_auth_sources(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# team\nalice:" + ALICE + "\n\nbob:" + BOB + "\n")
    assert Auth.load(f).users == ["alice", "bob"]
    assert Auth.load(environ={"CLIPSQL_SERVE_TOKENS": f"alice:{ALICE},bob:{BOB}"}).users == ["alice", "bob"]
    with pytest.raises(ServeError, match="needs credentials"):
        Auth.load(environ={})
    with pytest.raises(ServeError, match="loopback"):
        Auth.load(environ={}, allow_anonymous=True, host="0.0.0.0")
    assert Auth.load(environ={}, allow_anonymous=True, host="127.0.0.1").allow_anonymous
    f.write_text("alice:short\n")
    with pytest.raises(ServeError, match="shorter than"):
        Auth.load(f)
    f.write_text("just-a-secret-without-name\n")
    with pytest.raises(ServeError, match="entry 1"):
        Auth.load(f)


def test_anonymous_on_loopback(store):
    with Server(store, port=None, sql_port=0, auth=Auth({}, allow_anonymous=True), echo=lambda s: None) as srv:
        conn = fsql.connect(srv.sql_url, autocommit=True)
        assert rows(conn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]
        conn.close()
        with pytest.raises(fsql.Error) as e:                          # wrong credentials still refused
            client(srv, password="wrong-password-123")
        assert "UNAUTHENTICATED" in one_line_error(e)


# -- read-only, malformed ------------------------------------------------------------------------

@pytest.mark.parametrize("sql, word", [
    ("COPY (SELECT * FROM scores) TO 'out.csv'", "COPY"),
    ("ATTACH 'other.duckdb' AS o", "ATTACH"),
    ("SET memory_limit = '100GB'", "SET"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE OR REPLACE VIEW scores AS SELECT 1", "CREATE"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("SELECT * FROM read_csv('/etc/passwd')", "no file access"),
    ("INSTALL httpfs", "INSTALL"),
])
def test_over_privileged_refused(server, sql, word):
    with client(server) as conn:
        with pytest.raises(fsql.Error) as e:
            rows(conn, sql)
        text = one_line_error(e)
        assert "read-only" in text and word in text, text
        assert rows(conn, "SELECT count(*) FROM scores") == [(SMALL_DEMO_ROWS,)]   # nothing changed


def test_malformed_requests(server):
    c = flight.connect(server.sql_url)
    auth = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {ALICE}".encode())])
    cases = [
        (lambda: c.get_flight_info(flight.FlightDescriptor.for_command(b"\x0agarbage"), auth),
         "not a Flight SQL command"),
        (lambda: c.get_flight_info(flight.FlightDescriptor.for_path("scores"), auth), "not paths"),
        (lambda: c.get_flight_info(flight.FlightDescriptor.for_command(
            proto.pack_any(proto.TYPE_PREFIX + "CommandStatementQuery", b"\x0a\xff")), auth), "malformed"),
        (lambda: c.get_flight_info(flight.FlightDescriptor.for_command(
            proto.pack_any(proto.TYPE_PREFIX + "CommandNoSuchThing", b"")), auth), "not supported"),
        (lambda: c.do_get(flight.Ticket(b"\x01\x02"), auth).read_all(), "not a Flight SQL command"),
        (lambda: c.do_get(flight.Ticket(proto.TicketStatementQuery.pack(statement_handle=b"x" * 16)),
                          auth).read_all(), "unknown or expired result ticket"),
        (lambda: list(c.do_action(flight.Action("DropEverything", b""), auth)), "not supported"),
        (lambda: c.get_flight_info(flight.FlightDescriptor.for_command(
            proto.CommandStatementUpdate.pack(query="DELETE FROM samples")), auth), "read-only"),
    ]
    for call, message in cases:
        with pytest.raises(flight.FlightError) as e:
            call()
        assert message in one_line_error(e), str(e.value)
    # a prepared query bound to two rows of parameters
    created = list(c.do_action(flight.Action("CreatePreparedStatement", proto.ActionCreatePreparedStatementRequest
                                             .pack(query="SELECT ? AS x")), auth))
    _, body = proto.unpack_any(created[0].body.to_pybytes())
    handle = proto.ActionCreatePreparedStatementResult.parse(body)["prepared_statement_handle"]
    params = pa.table({"p": [1, 2]})
    writer, _ = c.do_put(flight.FlightDescriptor.for_command(
        proto.CommandPreparedStatementQuery.pack(prepared_statement_handle=handle)), params.schema, auth)
    writer.write_table(params)
    with pytest.raises(flight.FlightError) as e:
        writer.close()
    assert "bind one row of parameters" in one_line_error(e)
    with pytest.raises(flight.FlightUnauthenticatedError):          # no credentials at all
        c.get_flight_info(flight.FlightDescriptor.for_command(proto.CommandStatementQuery.pack(query="SELECT 1")))
    c.close()


def test_sql_errors_are_one_line(server):
    with client(server) as conn:
        with pytest.raises(fsql.Error) as e:
            rows(conn, "SELECT 1; SELECT 2")
        assert "2 statements" in one_line_error(e)
        with pytest.raises(fsql.Error) as e:
            rows(conn, "SELECT nope FROM scores")
        assert "Binder Error" in one_line_error(e)
        with pytest.raises(fsql.Error) as e:                 # a score function's own message
            rows(conn, "SELECT norm_sim_2(image_embedding, 'no_such_target') FROM embeddings")
        assert "no_such_target" in one_line_error(e) and "Python exception" not in str(e.value)
        with pytest.raises(fsql.Error) as e:                 # failing after half the result has streamed
            rows(conn, "SELECT CASE WHEN range < 500000 THEN range ELSE error('boom at ' || range) END "
                       "FROM range(1000000)")
        assert "boom at 500000" in one_line_error(e) and "OSError" not in str(e.value)
        cur = conn.cursor()
        with pytest.raises(fsql.Error) as e:                 # executemany is an update (DoPut): refused
            cur.executemany("SELECT ? AS x", [(1,), (2,)])
        assert "read-only" in one_line_error(e)
        cur.close()


# -- cancellation and limits ---------------------------------------------------------------------

def test_client_cancels_a_long_query(server):
    started = threading.Event()
    seen: list = []

    def on_query(q):
        seen.append(q)
        started.set()
    server.flight.on_query = on_query
    errors: list[BaseException] = []
    conn = client(server)
    cur = conn.cursor()

    def run():
        try:
            cur.execute(LONG)
            cur.fetchall()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=run)
    try:
        t.start()
        assert started.wait(60)
        cur.adbc_cancel()
        t.join(60)
        assert not t.is_alive() and errors and "cancel" in str(errors[0]).lower()
        assert seen[0].wait(60)                       # the server stopped it, not just the client
        assert isinstance(seen[0].error, QueryCancelled)
        assert rows(conn, "SELECT 1") == [(1,)]       # the connection still works
    finally:
        server.flight.on_query = None
        cur.close()
        conn.close()


def test_cancel_flight_info(server):
    """The Flight RPC way: CancelFlightInfo on a started query's FlightInfo stops it on the server."""
    c = flight.connect(server.sql_url)
    auth = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {ALICE}".encode())])
    seen: list = []
    server.flight.on_query = seen.append
    try:
        info = c.get_flight_info(flight.FlightDescriptor.for_command(proto.CommandStatementQuery.pack(
            query="SELECT * FROM range(100000000)")), auth)
        body = proto.encode_field(1, info.serialize())              # CancelFlightInfoRequest{info}
        result = list(c.do_action(flight.Action("CancelFlightInfo", body), auth))
        assert proto.decode(result[0].body.to_pybytes()) == {1: [proto.CANCEL_STATUS_CANCELLED]}
        assert seen[0].wait(60) and isinstance(seen[0].error, QueryCancelled)
        with pytest.raises(flight.FlightCancelledError) as e:      # (read_all would turn it into Ctrl-C)
            c.do_get(info.endpoints[0].ticket, auth).read_chunk()
        assert "query cancelled by the client" in one_line_error(e)
    finally:
        server.flight.on_query = None
        c.close()


def test_time_and_memory_limits(server):
    server.flight.query_timeout_s = 1.0
    try:
        with client(server) as conn:
            with pytest.raises(fsql.Error) as e:
                rows(conn, LONG)
            assert "time limit of 1 s" in one_line_error(e)
    finally:
        server.flight.query_timeout_s = None
    with client(server) as conn:
        with pytest.raises(fsql.Error) as e:
            rows(conn, "SELECT list(i) FROM range(200000000) t(i)")      # ~1.6 GB > 256 MB
        text = one_line_error(e)
        assert "Out of Memory" in text and "memory limit per query" in text and "SET " not in text
        # the limit is the connection's (set before its configuration was locked); no progress bar
        assert rows(conn, "SELECT current_setting('memory_limit'), current_setting('enable_progress_bar')") \
            == [("244.1 MiB", False)]


# -- several clients, streaming ------------------------------------------------------------------

def test_eight_concurrent_clients(server, store):
    sql = "SELECT id, image_info_gain FROM scores ORDER BY image_info_gain, id LIMIT 20 OFFSET ?"
    con = connect(store)
    want = {k: con.sql(sql.replace("?", "$1"), params=[10 * k]).fetchall() for k in range(8)}
    con.close()
    barrier = threading.Barrier(8)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            with client(server, user="bob" if k % 2 else "alice", password=BOB if k % 2 else ALICE) as conn:
                barrier.wait(60)
                for _ in range(3):
                    got[k] = rows(conn, sql, (10 * k,))
                    assert got[k] == want[k]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert got == want


def test_large_result_is_streamed(server):
    n = SMALL_DEMO_ROWS * 3400                         # ~10⁶ rows, ~100 MB
    sql = f"SELECT s.id, s.uri, s.caption, r.range AS k FROM samples s, range({3400}) r"
    with client(server) as conn:
        cur = conn.cursor()
        cur.execute(sql)
        reader = cur.fetch_record_batch()
        first = reader.read_next_batch()
        # the first batch is here while the server still runs the query: it holds a few batches,
        # never the whole result
        running = server.flight.running()
        assert running and not running[0].finished
        total = first.num_rows + sum(b.num_rows for b in reader)
        cur.close()
    assert total == n
    assert running[0].wait(60) and running[0].error is None


def test_open_transactions_do_not_count_as_running_queries(store):
    """DB-API connections hold a transaction each; only queries running at once are bounded."""
    with Server(store, port=None, sql_port=0, auth=Auth({"alice": ALICE}), max_queries=2,
                echo=lambda s: None) as srv:
        srv.pool.wait_s = 2.0
        conns = [client(srv, autocommit=False) for _ in range(5)]
        assert len(srv.flight._transactions) == 5
        for conn in conns:
            assert rows(conn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]
        for conn in conns:
            conn.close()
        assert not srv.flight._transactions and srv.pool._leased == 0


# -- snapshots -----------------------------------------------------------------------------------

def test_new_commit_visible_to_next_request_not_to_a_running_one(tmp_path, store):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    with Server(copy, port=None, sql_port=0, auth=Auth({"alice": ALICE}), echo=lambda s: None) as srv:
        auto = client(srv)
        txn = client(srv, autocommit=False)               # DB-API: a transaction, one snapshot
        assert rows(auto, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]
        assert rows(txn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]
        cur = auto.cursor()                               # a query streaming while the ingest commits
        cur.execute("SELECT s.id FROM samples s, range(4000) r")
        reader = cur.fetch_record_batch()
        streamed = reader.read_next_batch().num_rows

        images = write_image_folder(tmp_path / "more", 5, seed=7)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-m", "clipsql", "ingest", str(copy), str(images), "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr

        streamed += sum(b.num_rows for b in reader)
        cur.close()
        assert streamed == SMALL_DEMO_ROWS * 4000         # the running query kept its snapshot
        assert rows(auto, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS + 5,)]   # the next request
        assert rows(txn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]        # the transaction's
        txn.commit()
        assert rows(txn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS + 5,)]
        txn.close()
        assert not srv.flight._transactions               # closing the connection ended its transaction

        # what other commands write meanwhile (stored scores, dedup, a target) is there for the next
        # request, through the same views and functions as `clipsql query`
        steps = [(["score", str(copy), "--columns", "image_info_gain"],
                  "SELECT count(*), sum(image_info_gain) FROM stored_scores"),
                 (["dedup", str(copy), "--no-progress"],
                  "SELECT count(*), count(DISTINCT semdedup_cluster) FROM semdedup"),
                 (["target", "add", str(copy), "tgt", "--query", "SELECT image_embedding FROM embeddings "
                                                                 "ORDER BY id LIMIT 20"],
                  "SELECT id, norm_sim_2(image_embedding, 'tgt') FROM embeddings ORDER BY id LIMIT 5")]
        want = []
        for args, check in steps:
            rows(auto, "SELECT count(*) FROM samples")      # a kept connection on the snapshot before
            done = subprocess.run([sys.executable, "-m", "clipsql", *args], capture_output=True, text=True, env=env,
                                  timeout=600)
            assert done.returncode == 0, done.stderr
            local = connect(copy)
            want.append(local.sql(check).fetchall())
            local.close()
            assert rows(auto, check) == want[-1], args[0]
        assert want[0][0][0] == want[1][0][0] == SMALL_DEMO_ROWS + 5
        auto.close()


# -- TLS -----------------------------------------------------------------------------------------

def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls(tmp_path, store):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    with Server(store, port=None, sql_port=0, auth=Auth({"alice": ALICE}), tls_cert=cert, tls_key=key,
                echo=lambda s: None) as srv:
        assert srv.sql_url.startswith("grpc+tls://")
        conn = client(srv, **{"adbc.flight.sql.client_option.tls_root_certs": cert.read_text()})
        assert rows(conn, "SELECT count(*) FROM samples") == [(SMALL_DEMO_ROWS,)]
        conn.close()
        plain = srv.sql_url.replace("grpc+tls://", "grpc://")
        with pytest.raises(fsql.Error):                  # a client without TLS does not get through
            c = fsql.connect(plain, db_kwargs={"username": "alice", "password": ALICE}, autocommit=True)
            rows(c, "SELECT 1")
    with pytest.raises(ServeError, match="both --tls-cert and --tls-key"):
        Server(store, port=None, sql_port=0, auth=Auth({"alice": ALICE}), tls_cert=cert)


# -- the protobuf codec --------------------------------------------------------------------------

def test_flightsql_messages_round_trip():
    buf = proto.CommandGetTables.pack(catalog="memory", table_name_filter_pattern="sc%",
                                      table_types=["VIEW", "TABLE"], include_schema=True)
    name, cmd = proto.parse_command(buf)
    assert name == "CommandGetTables"
    assert cmd == {"catalog": "memory", "db_schema_filter_pattern": None, "table_name_filter_pattern": "sc%",
                   "table_types": ["VIEW", "TABLE"], "include_schema": True}
    assert proto.parse_command(proto.CommandStatementQuery.pack(query="SELECT 'é'", transaction_id=b"\x00\x01")) \
        == ("CommandStatementQuery", {"query": "SELECT 'é'", "transaction_id": b"\x00\x01"})
    # a packed repeated uint32 (what clients send for GetSqlInfo) and a negative int64
    packed = proto.encode_field(1, bytes([0, 1, 0xF4, 0x03]))
    assert proto.CommandGetSqlInfo.parse(packed)["info"] == [0, 1, 500]
    assert proto.decode(proto.DoPutUpdateResult.build(record_count=-1)) == {1: [(1 << 64) - 1]}
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0b", b"\x00\x00"):
        with pytest.raises(proto.ProtocolError):
            proto.decode(bad)
    with pytest.raises(proto.ProtocolError, match="not a Flight SQL command"):
        proto.parse_command(b"hello")


# -- the command ---------------------------------------------------------------------------------

def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clipsql", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_cli_serve_and_stop(store):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "CLIPSQL_SERVE_TOKENS": f"alice:{ALICE}"}
    proc = _cli(["serve", str(store), "--sql-port", "0", "--port", "0"], env)
    try:
        url = None
        lines = []
        for line in proc.stdout:                         # the server says where it listens
            lines.append(line)
            if "Flight SQL" in line:
                url = line.split("):", 1)[1].split()[0]
                break
        assert url and url.startswith("grpc://127.0.0.1:"), lines
        conn = fsql.connect(url, db_kwargs={"username": "alice", "password": ALICE}, autocommit=True)
        assert len(rows(conn, TOP10)) == 10
        conn.close()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "clipsql serve: stopped" in out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    no_creds = {k: v for k, v in env.items() if k != "CLIPSQL_SERVE_TOKENS"}
    for args, message in ((["--sql-port", "0", "--port", "0"], "needs credentials"),
                          (["--host", "0.0.0.0", "--allow-anonymous", "--sql-port", "0", "--port", "0"],
                           "loopback")):
        done = subprocess.run([sys.executable, "-m", "clipsql", "serve", str(store), *args], capture_output=True,
                              text=True, env=no_creds, timeout=120)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_tags_written_in_the_app_are_read_back_through_the_sql_endpoint(tmp_path, store):
    """One `clipsql serve` process: three tiles tagged through the app's HTTP API (a commit through
    the ledger) are what a remote SQL client then reads from the `tags` view."""
    import base64

    import httpx
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    with Server(copy, port=0, sql_port=0, auth=Auth({"alice": ALICE}), echo=lambda s: None) as srv:
        with client(srv) as conn:
            ids = [r[0] for r in rows(conn, "SELECT id FROM samples ORDER BY id LIMIT 3")]
            assert rows(conn, "SELECT count(*) FROM tags") == [(0,)]
        basic = base64.b64encode(f"alice:{ALICE}".encode()).decode()
        r = httpx.post(f"{srv.http_url}/api/tags", json={"action": "add", "tag": "reject", "ids": ids},
                       headers={"Authorization": f"Basic {basic}"}, timeout=60)
        assert r.status_code == 200, r.text
        with client(srv) as conn:          # a new request: the tag commit is visible, whole
            got = rows(conn, "SELECT s.id FROM samples s JOIN tags t USING (id) WHERE t.tag = 'reject' ORDER BY 1")
        assert [g[0] for g in got] == sorted(ids)
        unauth = httpx.post(f"{srv.http_url}/api/tags", json={"action": "add", "tag": "x", "ids": ids}, timeout=60)
        assert unauth.status_code in (401, 403), unauth.text
