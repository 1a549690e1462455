"""`--engine ray` on a local multi-node Ray cluster: Ray ingest equals local ingest,
a killed worker's tasks are retried, a killed driver's re-run completes exactly."""
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pytest

from clipsql.store.reads import count_rows, read_embeddings
from clipsql.store.stats import saved_stats
from clipsql.store.store import Store

from conftest import (MODEL, ROOT, assert_stats_match_vectors, cli, processes_naming, sample_ids, stored_vectors,
                      wait_for, write_image_folder, write_pool)

pytestmark = pytest.mark.ray


def ray_cli(cluster, *args, check=True, env=None):
    return cli(*args, "--engine", "ray", "--ray-address", cluster.address, env=env, check=check)


def assert_equal_stores(a, b, exact=True):
    ia, xa, ya = stored_vectors(a)
    ib, xb, yb = stored_vectors(b)
    assert ia == ib and sample_ids(a) == sample_ids(b)
    if exact:
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    else:
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-6)
    sa, sb = saved_stats(a, a.model()), saved_stats(b, b.model())
    for k, m in sa.moments.items():
        assert m.n == sb.moments[k].n
        np.testing.assert_allclose(m.mean, sb.moments[k].mean, rtol=1e-9, atol=1e-12)
        if m.second:
            np.testing.assert_allclose(m.cov, sb.moments[k].cov, rtol=1e-9, atol=1e-12)


def test_ray_ingest_of_precomputed_embeddings_equals_local(ray_cluster, tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=700, row_group=200)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "500"]
    cli("ingest", str(local.path), *args)
    out = ray_cli(ray_cluster, "ingest", str(dist.path), *args).stdout.decode()
    assert "added 2100" in out and "device ray" in out
    assert_equal_stores(Store.open(dist.path), Store.open(local.path))
    assert_stats_match_vectors(Store.open(dist.path))
    again = ray_cli(ray_cluster, "ingest", str(dist.path), *args).stdout.decode()
    assert "added 0" in again and "source unit(s) already ingested" in again


def test_ray_ingest_of_images_equals_local(ray_cluster, tmp_path, tiny_model):
    folder = write_image_folder(tmp_path / "imgs", 90)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken image")
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    cli("ingest", str(local.path), str(folder), "--model", tiny_model, "--no-progress")
    out = ray_cli(ray_cluster, "ingest", str(dist.path), str(folder), "--model", tiny_model, "--no-progress")
    assert "added 90" in out.stdout.decode() and "rejected 1" in out.stdout.decode()
    assert_equal_stores(Store.open(dist.path), Store.open(local.path), exact=False)
    assert_stats_match_vectors(Store.open(dist.path))


def test_killed_driver_leaves_no_half_commit_and_the_rerun_is_exact(ray_cluster, tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=4, rows=300, row_group=100)
    ref, st = Store.init(tmp_path / "ref"), Store.init(tmp_path / "s")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "200"]
    cli("ingest", str(ref.path), *args)
    p = ray_cli(ray_cluster, "ingest", str(st.path), *args, env={"CLIPSQL_FAULT": "ingest:before-commit@3"},
                check=False)
    assert p.returncode == -9
    mid = Store.open(st.path)
    assert saved_stats(mid, mid.model()).n == count_rows(mid, mid.model()) < 1200     # whole commits only
    ray_cli(ray_cluster, "ingest", str(st.path), *args)
    assert_equal_stores(Store.open(st.path), Store.open(ref.path))
    assert cli("doctor", str(st.path), check=False).returncode == 0


def test_a_killed_worker_node_does_not_fail_the_job(ray_cluster, tmp_path):
    """A worker node dies mid-job: its tasks are retried on the others and the job completes."""
    pool = tmp_path / "pool"
    write_pool(pool, shards=6, rows=400, row_group=50)
    ref, st = Store.init(tmp_path / "ref"), Store.init(tmp_path / "s")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    cli("ingest", str(ref.path), *args)
    proc = subprocess.Popen([sys.executable, "-m", "clipsql", "ingest", str(st.path), *args, "--engine", "ray",
                             "--ray-address", ray_cluster.address], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def writing() -> bool:          # the job runs: a task has written a data file (nothing committed yet)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        seen = Store.open(st.path, read_only=True)
        if not seen.list_models():
            return False
        data = Path(seen.table_uri(seen.model().table_name)) / "data"
        return data.is_dir() and any(data.iterdir())
    wait_for(writing, "the Ray job to write its first data file", deadline=300, every=0.05)
    victim = ray_cluster.workers[-1]
    ray_cluster.remove_node(victim, allow_graceful=False)
    try:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert "added 2400" in out.decode()
    finally:
        ray_cluster.workers[-1] = ray_cluster.add_node(num_cpus=1, object_store_memory=96 << 20,
                                                       node_ip_address="127.0.0.1")
        ray_cluster.wait_for_nodes()
    assert_equal_stores(Store.open(st.path), Store.open(ref.path))


def test_ray_scores_equal_sql_scores_and_rerun_scores_only_new_rows(ray_cluster, tmp_path):
    from clipsql import queries
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=400, row_group=100)
    st = Store.init(tmp_path / "s")
    first = tmp_path / "first"
    (first / "img_emb").mkdir(parents=True)
    for sub in ("img_emb", "text_emb", "metadata"):
        (first / sub).mkdir(exist_ok=True)
        for f in (pool / sub).iterdir():
            if f.name.split("_")[-1].split(".")[0] in ("0", "1"):
                os.link(f, first / sub / f.name)
    cli("ingest", str(st.path), str(first), *MODEL, "--id-column", "key", "--no-progress")
    cli("stats", "fit", str(st.path), "--reference-size", "300")
    cols = "image_info_gain,text_info_gain,image_conformity,clip_score,neg_clip_loss"
    out = ray_cli(ray_cluster, "score", str(st.path), "--columns", cols).stdout.decode()
    assert "for 800 rows" in out and "overwrite" in out
    con = queries.connect(Store.open(st.path))
    got = con.sql(f"SELECT s.id, {cols.replace(',', ', s.')} FROM stored_scores s ORDER BY id").fetchall()
    want = con.sql(f"SELECT id, {cols} FROM scores ORDER BY id").fetchall()
    assert len(got) == len(want) == 800
    np.testing.assert_allclose(np.array([g[1:] for g in got], float), np.array([w[1:] for w in want], float),
                               rtol=1e-6, atol=1e-9)
    # an ingest appends while a score job runs: both finish, the job reports what it left pending
    proc = subprocess.Popen([sys.executable, "-m", "clipsql", "ingest", str(st.path), str(pool), *MODEL,
                             "--id-column", "key", "--no-progress", "--commit-rows", "50", "--commit-seconds", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = ray_cli(ray_cluster, "score", str(st.path), "--columns", cols).stdout.decode()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-1500:]
    assert "append" in out and "pending" in out
    final = ray_cli(ray_cluster, "score", str(st.path), "--columns", cols).stdout.decode()
    con = queries.connect(Store.open(st.path))
    n, distinct = con.sql("SELECT count(*), count(DISTINCT id) FROM stored_scores").fetchall()[0]
    assert n == distinct == 1200, (out, final)
    assert "0 rows committed meanwhile" in final


def test_ray_stats_refresh_equals_local(ray_cluster, tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=500, row_group=100)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "100")
    before = saved_stats(Store.open(st.path), st.model())
    ray_cli(ray_cluster, "stats", "refresh", str(st.path))
    after = saved_stats(Store.open(st.path), st.model())
    for k, m in before.moments.items():
        assert after.moments[k].n == m.n
        np.testing.assert_allclose(after.moments[k].mean, m.mean, rtol=1e-9, atol=1e-12)
        if m.second:
            np.testing.assert_allclose(after.moments[k].cov, m.cov, rtol=1e-9, atol=1e-12)
    assert_stats_match_vectors(Store.open(st.path))


@pytest.mark.slow          # 3 recipes × (local + Ray) selects: 3.5 min measured
def test_select_with_the_ray_engine_chooses_what_the_local_engine_chooses(ray_cluster, tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "100")
    cli("stats", "fit", str(st.path), "--reference-size", "200")
    cli("target", "add", str(st.path), "t", "--query", "SELECT image_embedding FROM embeddings LIMIT 40")
    # kl-guided makes its own fit (the first, local run) and the Ray tasks score with that fit
    for args in (["--recipe", "kl-guided", "--fraction", "0.25"],
                 ["--recipe", "kl-guided", "--fraction", "0.25", "--include-own-pair"], ["--recipe", "clip-score"],
                 ["--recipe", "negclip-normsim", "--target", "t", "--fraction", "0.1"]):
        local, dist = tmp_path / "local.txt", tmp_path / "ray.txt"
        cli("select", str(st.path), *args, "-o", str(local))
        ray_cli(ray_cluster, "select", str(st.path), *args, "-o", str(dist))
        assert local.read_text() == dist.read_text() and len(local.read_text().splitlines()) > 0
        import json
        assert json.loads(Path(str(dist) + ".json").read_text())["engine"] == "ray"
    bad = ray_cli(ray_cluster, "select", str(st.path), "--sql", "SELECT id FROM samples", "-o",
                  str(tmp_path / "x.txt"), check=False)
    assert bad.returncode == 1 and "set --engine to local" in bad.stderr.decode()


def test_ids_repeated_across_units_are_rejected_as_locally(ray_cluster, tmp_path):
    """Two units of one run holding the same id: the driver redoes the later unit without it; an id
    twice within one unit keeps its first row, as locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=200, row_group=200)
    meta = pool / "metadata" / "metadata_1.parquet"
    t = pq.read_table(meta)
    keys = t.column("key").to_pylist()
    keys[:10] = [f"000{i:06d}" for i in range(10)]          # ids of shard 0
    keys[21] = keys[20]                                     # twice within the unit
    pq.write_table(t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys)), meta)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    a = cli("ingest", str(local.path), *args).stdout.decode()
    b = ray_cli(ray_cluster, "ingest", str(dist.path), *args).stdout.decode()
    assert "added 389" in a and "added 389" in b and "duplicate_id" in b, b
    assert_equal_stores(Store.open(dist.path), Store.open(local.path))
    assert_stats_match_vectors(Store.open(dist.path))


# a Ray ingest that counts what its driver receives: each unit's result (pickled bytes, whether it
# carries ids or a partial), the partials gathered at each commit, and what the shard actors hold
_COUNTING_RUN = """
import json, pickle, sys
import ray
from clipsql.engines import ingest as ray_ingest
from clipsql.ingest.run import IngestOptions
from clipsql.store.store import Store
from clipsql.store.writer import CommitPolicy
address, store, pool, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
results, gathered, counts = [], [], []
real_results, real_gather = ray_ingest._results, ray_ingest._Driver.gather
def counting_results(*args, **kwargs):
    for r in real_results(*args, **kwargs):
        results.append([r.rows, len(pickle.dumps(r, protocol=5)), len(r.ids), len(r.moments), r.sharded])
        yield r
def counting_gather(self):
    before = self.received
    real_gather(self)
    gathered.append(self.received - before)
    counts[:] = ray.get([s.counts.remote() for s in self.shards])
ray_ingest._results, ray_ingest._Driver.gather = counting_results, counting_gather
opts = IngestOptions(id_column="key", progress=False, maintain=False,
                     policy=CommitPolicy(rows=2 * rows, seconds=float("inf")))
s = ray_ingest.ingest_ray(Store.init(store), pool, model="ViT-B-32", pretrained="laion2b_s34b_b79k",
                          options=opts, address=address)
print(json.dumps({"added": s.added, "commits": s.commits, "results": results, "gathered": gathered,
                  "shards": counts}))
"""


def test_the_ray_driver_receives_no_ids_and_one_partial_per_commit(ray_cluster, tmp_path):
    """Every written id (~41 GB of uids at DataComp large) and every unit's statistics partial passed
    through the driver. Now a worker sends the ids to the run's shard actors (by id hash) and its
    partial to its unit's shard: what the driver receives per unit (the pickled result: data files,
    counts) is the same size at 50 and at 400 rows a unit and holds no id and no partial, the shards
    received every written id, and one merged partial reaches the driver per commit."""
    import json
    got = {}
    for rows in (50, 400):
        pool = tmp_path / f"pool{rows}"
        write_pool(pool, shards=2, rows=2 * rows, row_group=rows)
        p = subprocess.run([sys.executable, "-c", _COUNTING_RUN, ray_cluster.address, str(tmp_path / f"s{rows}"),
                            str(pool), str(rows)], cwd=ROOT, capture_output=True, timeout=300,
                           env=dict(os.environ, CLIPSQL_RAY_SHARDS="2"))
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        got[rows] = out = json.loads(p.stdout.decode().strip().splitlines()[-1])
        assert out["added"] == 4 * rows and out["commits"] == 2
        assert [r[0] for r in out["results"]] == [rows] * 4
        assert all(ids == 0 and moments == 0 and sharded for _, _, ids, moments, sharded in out["results"])
        assert len(out["shards"]) == 2 and min(c["received"] for c in out["shards"]) > 0
        assert sum(c["received"] for c in out["shards"]) == 4 * rows
        assert not any(c["staged"] or c["partials"] for c in out["shards"])
        assert len([b for b in out["gathered"] if b]) == out["commits"]        # one partial per commit
        assert_stats_match_vectors(Store.open(tmp_path / f"s{rows}"))
    small, large = (max(r[1] for r in got[rows]["results"]) for rows in (50, 400))
    assert large <= small + 64, (small, large)


@pytest.mark.slow          # two models, local and Ray: 2 min measured
def test_ray_ingest_of_a_datacomp_pool_equals_local(ray_cluster, tmp_path):
    from datacomp_pool import write_datacomp_pool
    write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=[60, 45], row_group_size=20)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    cli("ingest", str(local.path), str(tmp_path / "pool"), "--no-progress")
    out = ray_cli(ray_cluster, "ingest", str(dist.path), str(tmp_path / "pool"), "--no-progress").stdout.decode()
    assert "[ViT-B-32/openai] done: added 105" in out and "[ViT-L-14/openai] done: added 105" in out, out
    a, b = Store.open(dist.path), Store.open(local.path)
    assert [m.model_id for m in a.list_models()] == [m.model_id for m in b.list_models()]
    for m in b.list_models():
        ta = read_embeddings(a, a.model(m.model_id)).sort_by("id")
        tb = read_embeddings(b, b.model(m.model_id)).sort_by("id")
        assert ta.select(["id", "image_embedding", "text_embedding"]).equals(
            tb.select(["id", "image_embedding", "text_embedding"]))
    assert sample_ids(a) == sample_ids(b)


def test_a_ray_that_does_not_start_is_one_line(monkeypatch):
    """Ray reports a start-up timeout as a bare Exception, which reached the user as a traceback;
    every failure of `ray.init` is now one line saying what to do."""
    ray = pytest.importorskip("ray")
    from clipsql.engines.engine import EngineError, ray_session
    stopped = []

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(EngineError, match=r"^a local Ray for this command did not start \(The current node timed "
                                          r"out during startup.*\): check free memory") as info:
        with ray_session():
            pass
    assert "\n" not in str(info.value) and stopped        # and what it started is stopped

    def unreachable(**kwargs):
        raise TimeoutError("Timed out after 60 seconds waiting for the GCS")
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(EngineError, match=r"^cannot reach the Ray cluster at 10\.0\.0\.1:6379: Timed out .*ray start"):
        with ray_session("10.0.0.1:6379"):
            pass
def test_ray_ingest_skips_deleted_ids_as_locally(ray_cluster, tmp_path):
    """Ids `clipsql delete` recorded are skipped by a Ray ingest too (the workers look them up in
    the record as the run found it), and the summary says how many."""
    import shutil
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=150, row_group=50)
    st = Store.init(tmp_path / "s")
    args = [*MODEL, "--id-column", "key", "--no-progress"]
    cli("ingest", str(st.path), str(pool), *args)
    cli("delete", str(st.path), "--where", "CAST(substr(id, 4) AS INTEGER) % 10 = 0")
    shutil.copytree(pool, tmp_path / "copy")                  # the same rows as new source units
    out = ray_cli(ray_cluster, "ingest", str(st.path), str(tmp_path / "copy"), *args).stdout.decode()
    assert "added 0" in out and "30 skipped: deleted on" in out, out
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == 270 and len(sample_ids(st)) == 270
    assert_stats_match_vectors(st)


def _ledger(st):  # noqa: ANN001, ANN202
    """A store's commit ledger as plain values: each commit (rows, sample rows, tables it moved), each
    source unit (rows, rejects, which commit), the run's counters, the rejects, the statistics."""
    import json
    import sqlalchemy as sa
    from clipsql.store import catalog as cat
    with st.engine.connect() as conn:
        commits = conn.execute(sa.select(cat.commits.c.commit_id, cat.commits.c.kind, cat.commits.c.rows,
                                         cat.commits.c.sample_rows, cat.commits.c.versions)
                               .order_by(cat.commits.c.commit_id)).all()
        order = {c[0]: i for i, c in enumerate(commits)}
        units = sorted((u.unit_key, u.source, u.rows, u.rejected, order[u.commit_id])
                       for u in conn.execute(sa.select(cat.ingested_units)))
        runs = [(r.status, r.added, r.skipped, r.rejected) for r in conn.execute(sa.select(cat.ingest_runs))]
        rejects = sorted((r.source, r.location, r.reason, r.detail) for r in conn.execute(sa.select(cat.rejects)))
    state = saved_stats(st, st.model())
    return {"commits": [(k, n, s, sorted(json.loads(v))) for _, k, n, s, v in commits], "units": units,
            "runs": runs, "rejects": rejects, "covered_seq": state.covered_seq,
            "n": {k: m.n for k, m in state.moments.items()}}


# one ingest through an engine, in its own process (as the CLI runs it), counting the decisions of
# the commit rule `CommitPolicy.due`; prints the run's summary fields as JSON
_ENGINE_RUN = """
import json, sys
from clipsql import engines
from clipsql.ingest.pipeline import IngestOptions
from clipsql.store.store import Store
from clipsql.store.writer import CommitPolicy
decided = []
due = CommitPolicy.due
def spy(self, pending, started, now=None):
    decided.append(1)
    return due(self, pending, started, now)
CommitPolicy.due = spy
name, address, store, pool = sys.argv[1:5]
opts = IngestOptions(id_column="key", progress=False, maintain=False,
                     policy=CommitPolicy(rows=250, seconds=float("inf")))
s = engines.choose(name, address or None).ingest(Store.init(store), pool, model="ViT-B-32",
                                                 pretrained="laion2b_s34b_b79k", options=opts)
print(json.dumps({"decided": len(decided), "added": s.added, "commits": s.commits, "device": s.device}))
"""


def test_both_engines_commit_the_same_ledger_through_one_commit_policy(ray_cluster, tmp_path):
    """The same source through the local and the Ray engine: the same commits (grouping of units,
    rows, sample rows), units, run counters, rejects and statistics; and both engines' commits
    were decided by the one commit rule, `CommitPolicy.due` (the Ray driver hands its workers'
    data files and partials to the run's writer instead of committing them itself)."""
    import json
    import pyarrow as pa
    import pyarrow.parquet as pq
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=400, row_group=100)
    meta = pool / "metadata" / "metadata_2.parquet"             # ids of shard 0 again: duplicate_id rejects
    t = pq.read_table(meta)
    keys = t.column("key").to_pylist()
    keys[150:155] = [f"000{i:06d}" for i in range(5)]
    pq.write_table(t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys)), meta, row_group_size=100)
    summaries, ledgers = {}, {}
    for name, address in (("local", ""), ("ray", ray_cluster.address)):
        p = subprocess.run([sys.executable, "-c", _ENGINE_RUN, name, address, str(tmp_path / name), str(pool)],
                           cwd=ROOT, capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        summaries[name] = json.loads(p.stdout.decode().strip().splitlines()[-1])
        ledgers[name] = _ledger(Store.open(tmp_path / name))
    local, ray = ledgers["local"], ledgers["ray"]
    assert summaries["ray"]["device"] == "ray" and summaries["local"]["added"] == summaries["ray"]["added"] == 1195
    assert summaries["local"]["commits"] == summaries["ray"]["commits"] == len(local["commits"]) >= 4
    assert ray == local
    n_units = len(local["units"])
    assert summaries["local"]["decided"] >= n_units and summaries["ray"]["decided"] >= n_units   # each engine
    assert_equal_stores(Store.open(tmp_path / "ray"), Store.open(tmp_path / "local"))
    assert_stats_match_vectors(Store.open(tmp_path / "ray"))


# a command's local Ray (`ray_session` without an address) that runs one task, says it is ready, and waits
LOCAL_RAY_DRIVER = """
import sys
from pathlib import Path
from clipsql.engines.engine import ray_session
with ray_session(num_cpus=1) as ray:
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    Path(sys.argv[1]).write_text("ready")
    if sys.argv[2] == "wait":
        sys.stdin.read()
"""


def _start_time(pid: int) -> str | None:
    """The process's start time (None when it is gone or a zombie): tells it from a later one with its PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def test_the_local_ray_of_a_killed_command_is_stopped_and_removed_by_the_next(ray_tmpdir, tmp_path):
    """A SIGKILLed command's local Ray left helper processes running (its dashboard and runtime-env
    agents, for minutes) and its folder behind: the next command's local Ray stops them and removes
    the folder before it starts, and removes its own folder when it ends."""
    from clipsql.leftovers import owner_tag
    if not os.path.isdir("/proc"):
        pytest.skip("finding a process's files needs /proc")
    env = dict(os.environ, RAY_ADDRESS="")        # a local Ray, not the session's test cluster
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY_DRIVER, str(ready), "wait"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "the local Ray to start", deadline=300)
        assert ready.exists(), proc.communicate()[1].decode()[-2000:]
        folder = Path(ray_tmpdir) / f"clipsql-ray-{owner_tag(proc.pid)}"
        assert folder.is_dir()
        started = {pid: _start_time(pid) for pid in processes_naming(str(folder))}
        assert len(started) >= 3 and proc.pid not in started       # GCS, raylet, agents, the worker
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stderr.close()
    nxt = subprocess.run([sys.executable, "-c", LOCAL_RAY_DRIVER, str(tmp_path / "ready2"), "end"], cwd=ROOT,
                         env=env, capture_output=True, timeout=300)
    assert nxt.returncode == 0, nxt.stderr.decode()[-2000:]
    left = [pid for pid, t in started.items() if _start_time(pid) == t]
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    assert not folder.exists()
    assert not list(Path(ray_tmpdir).glob("clipsql-ray-*"))         # the next one's own folder too


def test_ray_ingest_and_score_of_a_float16_model_equal_local(ray_cluster, tmp_path):
    """`--storage float16` through the Ray engine: the workers round and fold as the local writer
    does (the same stored values, statistics of the stored values), and `score` on the workers reads
    the float16 table as the `scores` view does."""
    from clipsql import queries
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress", "--storage", "float16"]
    cli("ingest", str(local.path), *args)
    out = ray_cli(ray_cluster, "ingest", str(dist.path), *args).stdout.decode()
    assert "added 600" in out
    st = Store.open(dist.path)
    assert st.model().storage == "float16"
    assert_equal_stores(st, Store.open(local.path))
    assert_stats_match_vectors(st)
    cli("stats", "fit", str(st.path), "--reference-size", "200")
    cols = "image_info_gain,text_info_gain,image_conformity,clip_score,neg_clip_loss"
    ray_cli(ray_cluster, "score", str(st.path), "--columns", cols)
    con = queries.connect(Store.open(st.path))
    got = con.sql(f"SELECT s.id, {cols.replace(',', ', s.')} FROM stored_scores s ORDER BY id").fetchall()
    want = con.sql(f"SELECT id, {cols} FROM scores ORDER BY id").fetchall()
    assert len(got) == len(want) == 600
    np.testing.assert_allclose(np.array([g[1:] for g in got], float), np.array([w[1:] for w in want], float),
                               rtol=1e-6, atol=1e-9)


def test_a_compaction_during_a_ray_run_rewrites_on_the_workers(ray_cluster, tmp_path):
    """Each unit of a Ray run is a fragment of its own; past the bound on small fragments, the run's
    compaction is planned by the driver, its tasks rewritten on the Ray workers, and committed by
    the driver through the ledger: the store equals a local run's, statistics exact."""
    import json
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=700, row_group=100)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    args = [str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "200",
            "--max-fragments", "3", "--format", "json"]
    cli("ingest", str(local.path), *args)
    out = json.loads(ray_cli(ray_cluster, "ingest", str(dist.path), *args).stdout.decode())
    during = out["maintenance"]["during_run"]
    assert out["added"] == 2100 and during and all(c["tasks"] >= 1 for c in during)
    st = Store.open(dist.path)
    assert all(len(st.dataset(n).get_fragments()) <= 3 + 1 for n in ("samples", st.model().table_name))
    assert_equal_stores(st, Store.open(local.path))
    assert_stats_match_vectors(st)


def test_ray_index_builds_segments_on_the_workers_with_the_recall_of_a_local_build(ray_cluster, tmp_path):
    """`index --engine ray`: the seeded centroids at the driver, one index segment per group of
    fragments on the workers, one commit; the ledger records it, its recall is measured for both
    query modalities as a local build's is, and search reads through it."""
    import json
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=700, row_group=200)
    local, dist = Store.init(tmp_path / "local"), Store.init(tmp_path / "ray")
    for st in (local, dist):
        cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "400")
    built = json.loads(cli("index", str(local.path), "--format", "json").stdout.decode())
    made = json.loads(ray_cli(ray_cluster, "index", str(dist.path), "--format", "json").stdout.decode())
    assert made["engine"] == "ray" and built["engine"] == "local" and made["partitions"] == built["partitions"]
    assert min(made["recall_by_query"].values()) >= 0.95, made
    st = Store.open(dist.path)
    rec = st.model()
    ds = st.dataset(rec.table_name)
    assert ds.version == lance.dataset(st.table_uri(rec.table_name)).version     # the ledger is at the index
    (index,) = [i for i in ds.describe_indices() if list(i.field_names) == ["image_embedding"]]
    assert len(ds.get_fragments()) > 1 and len(index.segments) > 1 and index.num_rows_indexed == 2100
    key = sample_ids(st)[7]
    hits = json.loads(cli("search", str(dist.path), "--like", key, "-k", "5", "--format", "json").stdout.decode())
    assert hits
