"""A store on object storage: Lance data on an S3-compatible server (moto, on
loopback, started by the fixture) with a PostgreSQL catalog (tests/pg.py): init, ingest, fit,
query, select, gallery, score, doctor end to end; the writer lock is a lease in the catalog that
refuses a second writer and lapses when its holder dies. Nothing leaves the machine."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.errors import StoreLocked
from clipsql.store.reads import count_rows
from clipsql.store.store import Store

from conftest import MODEL, assert_stats_match_vectors, cli, wait_for, write_image_folder, write_pool

pytestmark = [pytest.mark.s3, pytest.mark.postgres]
BUCKET = "clipsql-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    try:
        import boto3
    except ImportError:
        if os.environ.get("CLIPSQL_REQUIRE_S3"):
            pytest.fail("the object-storage tests cannot run: moto[server] is not installed")
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def bucket_created() -> bool:
        assert proc.poll() is None, "moto_server exited"
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            return True
        except Exception:  # noqa: BLE001 - the server is starting
            return False
    try:
        wait_for(bucket_created, "moto_server to serve", deadline=120, every=0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lease_expiry(st):
    with st.engine.connect() as conn:
        return conn.execute(sa.select(cat.leases.c.expires_at).where(cat.leases.c.name == "writer")).scalar()


def test_a_store_on_s3_with_a_postgres_catalog_end_to_end(s3, pg_server, tmp_path, tiny_model):
    uri = f"s3://{BUCKET}/stores/one"
    url = pg_server.new_database()
    p = cli("init", uri, check=False)
    assert p.returncode == 1 and "--catalog" in p.stderr.decode()
    cli("init", uri, "--catalog", url)
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    out = cli("ingest", uri, str(pool), *MODEL, "--id-column", "key", "--no-progress").stdout.decode()
    assert "added 600" in out
    assert "added 0" in cli("ingest", uri, str(pool), *MODEL, "--id-column", "key", "--no-progress").stdout.decode()
    st = Store.open(uri)
    assert count_rows(st, st.model()) == 600 and str(st.table_uri("samples")).startswith("s3://")
    assert_stats_match_vectors(st)
    cli("stats", "fit", uri, "--reference-size", "200")
    q = cli("query", uri, "SELECT count(*) AS n, count(image_info_gain) AS scored FROM scores", "--format", "json")
    assert json.loads(q.stdout) == [{"n": 600, "scored": 600}]
    sel = tmp_path / "sel.csv"
    cli("select", uri, "--recipe", "kl-guided", "--fraction", "0.25", "-o", str(sel))
    assert len(sel.read_text().splitlines()) == 1 + 150
    cli("score", uri, "--columns", "image_info_gain")
    assert "600" in cli("query", uri, "SELECT count(*) FROM stored_scores").stdout.decode()
    rc = cli("doctor", uri, check=False)
    assert rc.returncode == 0, rc.stdout.decode()
    # images: a folder ingested into a second S3 store, shown in a gallery
    uri2 = f"s3://{BUCKET}/stores/two"
    cli("init", uri2, "--catalog", pg_server.new_database())
    folder = write_image_folder(tmp_path / "imgs", 8)
    cli("ingest", uri2, str(folder), "--model", tiny_model, "--no-progress")
    g = cli("gallery", uri2, "SELECT id FROM samples", "-o", str(tmp_path / "g.html")).stdout.decode()
    assert "gallery of 8 of 8 rows" in g and (tmp_path / "g.html").read_text().count("data:image/") == 8


def test_the_writer_lease_refuses_a_second_writer_and_lapses(s3, pg_server, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/stores/lease"
    st = Store.init(uri, pg_server.new_database())
    monkeypatch.setenv("CLIPSQL_LEASE_SECONDS", "3")
    with st.lock():
        with pytest.raises(StoreLocked, match="is being written by pid"):
            with Store.open(uri).lock():
                pass
        p = cli("optimize", uri, check=False)
        assert p.returncode == 1 and "being written by" in p.stderr.decode()
        first = lease_expiry(st)        # the heartbeat keeps a live lease alive past its first expiry
        wait_for(lambda: time.time() > first and lease_expiry(st) > first, "the lease's first expiry to pass")
        with pytest.raises(StoreLocked):
            with Store.open(uri).lock():
                pass
    with Store.open(uri).lock():        # released
        pass
    expires = time.time() + 2
    with st.engine.begin() as conn:     # a dead holder's lease (never renewed) lapses
        conn.execute(cat.leases.insert().values(name="writer", holder="pid 1 on gone", expires_at=expires))
    with pytest.raises(StoreLocked, match="pid 1 on gone"):
        with st.lock():
            pass
    wait_for(lambda: time.time() > expires, "the dead holder's lease to expire")
    with st.lock():
        pass


@pytest.mark.ray
def test_ray_ingest_and_scores_into_an_s3_store(s3, pg_server, ray_tmpdir, tmp_path):
    """--engine ray against a store on object storage: the command's own local Ray (in the
    session's fresh RAY_TMPDIR), whose workers reach the bucket with the same AWS environment."""
    uri = f"s3://{BUCKET}/stores/ray"
    cli("init", uri, "--catalog", pg_server.new_database())
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=200, row_group=100)
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": ""}     # not the session's test cluster: a fresh local Ray inherits the AWS environment
    out = cli("ingest", uri, str(pool), *MODEL, "--id-column", "key", "--no-progress", "--engine", "ray",
              env=env).stdout.decode()
    assert "added 400" in out and "device ray" in out
    st = Store.open(uri)
    assert count_rows(st, st.model()) == 400
    assert_stats_match_vectors(st)
    cli("stats", "fit", uri, "--reference-size", "100")
    out = cli("score", uri, "--columns", "clip_score", "--engine", "ray", env=env).stdout.decode()
    assert "for 400 rows" in out
    assert "400" in cli("query", uri, "SELECT count(clip_score) FROM stored_scores").stdout.decode()


def test_an_unreachable_object_store_is_one_line(tmp_path, monkeypatch):
    """pyarrow's OSError for an endpoint it cannot reach ("When getting information for key … AWS Error
    NETWORK_CONNECTION …", or "When resolving region for bucket …") reached the user as a traceback."""
    port = _free_port()                               # nothing listens there
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
    catalog = tmp_path / "catalog.sqlite"
    for args in (("init", f"s3://{BUCKET}/store", "--catalog", f"sqlite:///{catalog}"),
                 ("query", f"s3://{BUCKET}/store", "SELECT 1")):
        p = cli(*args, env=env, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-1500:]
        assert "cannot reach the object store" in err and f"127.0.0.1:{port}" in err and "AWS_ENDPOINT_URL" in err
    assert not catalog.exists()
    from clipsql.store.location import object_store_error
    # no endpoint: the region of the bucket is looked up on AWS; when that fails, the fix is AWS_REGION
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    err = object_store_error("s3://b/store", OSError("When resolving region for bucket 'b': AWS Error "
                                                     "NETWORK_CONNECTION during HeadBucket operation: curlCode: 6"))
    assert err is not None and "set AWS_REGION" in str(err) and not isinstance(err, OSError)
    assert object_store_error("s3://b/store", FileNotFoundError("Path does not exist 'b/store'")) is None
