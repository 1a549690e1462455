"""`clipsql dedup --engine ray` (engines.dedup) stores what the local engine stores, bit for bit:
the same clusters, max_sim and centroids, on a store of several fragments split over several
tasks, with exact duplicates (ties in the within-cluster order, broken by id), rows without a
vector, clusters larger than a task's memory budget, and incremental re-runs."""
import numpy as np
import pyarrow as pa
import pytest

from clipsql import queries
from clipsql.engines import dedup as RD
from clipsql.kernels import semdedup_blocks as B
from clipsql.queries.curation.dedup import semdedup
from clipsql.store.ledger import recover
from clipsql.store.manage import delete_ids
from clipsql.store.runs import start_run
from clipsql.store.store import Store
from clipsql.store.tables import centroids_table_name, dedup_table_name
from clipsql.store.writer import write_batch

from conftest import cli

D = 24
MODEL = "test/semdedup-ray"


def rows(n, seed):
    """Clustered rows (12 true clusters) with exact copies (equal cos to any centroid: ties), near
    copies, raw norms ×0.5–20 and two rows without a vector; ids not in storage order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, D))
    X = centres[rng.integers(12, size=n)] + 0.6 * rng.normal(size=(n, D))
    near = rng.choice(n, n // 20, replace=False)
    X[near] += 1e-3 * rng.normal(size=(len(near), D))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    X *= rng.uniform(0.5, 20, size=(n, 1)).astype(np.float32)
    pick = rng.permutation(n)[:n // 5]
    X[pick[n // 10:]] = X[pick[:n // 10]]                                 # exact copies (raw vectors)
    X[3] = np.nan
    X[5] = 0.0
    ids = [f"r{seed}-{i:05d}" for i in rng.permutation(n)]
    return X, ids


def make_store(path, parts):
    st = Store.init(path)
    st.register_model(model_id=MODEL, kind="clip", dim=D, logit_scale=100.0, logit_bias=None, context_length=77,
                      spec={})
    for X, ids in parts:
        append(st, X, ids)
    return st


def append(st, X, ids):
    rec = st.model(MODEL)
    run = start_run(st.engine, MODEL, "src", "precomputed")
    write_batch(st, rec, samples=None, ids=list(ids), image=X, text=np.ones_like(X), run_id=run, source="src",
                rejects=[], meta_types={})


def stored(st):
    rec = st.model(MODEL)
    tbl = st.dataset(dedup_table_name(rec.table_name), latest=True).to_table().sort_by("id")
    C = st.dataset(centroids_table_name(rec.table_name), latest=True).to_table().sort_by("cluster")
    return (tbl.column("id").to_pylist(), tbl.column("semdedup_cluster").to_pylist(),
            tbl.column("semdedup_max_sim").to_numpy(zero_copy_only=False), C.column("centroid").to_pylist())


def assert_same(a, b):
    ia, la, ma, ca = stored(a)
    ib, lb, mb, cb = stored(b)
    assert ia == ib and la == lb and ca == cb
    assert np.array_equal(ma, mb, equal_nan=True)          # bit for bit (so also within 1e-12)
    return la, ma


def ray_dedup(cluster, st, *args):
    return cli("dedup", str(st.path), *map(str, args), "--no-progress", "--engine", "ray", "--ray-address",
               cluster.address).stdout.decode()


@pytest.mark.ray
def test_ray_dedup_equals_local_full_incremental_and_after_deletions(ray_cluster, tmp_path):
    """The Ray side through the command (`clipsql dedup --engine ray`), the local one in process;
    4 fragments → 4 assignment tasks (MIN_TASK_ROWS), 7 clusters → 7 within-cluster tasks on 3 CPUs."""
    assert RD.MIN_TASK_ROWS <= 500
    parts = [rows(n, seed) for seed, n in enumerate((700, 500, 900, 600))]
    extra = rows(500, 9)
    local = make_store(tmp_path / "local", parts)
    dist = make_store(tmp_path / "ray", parts)
    assert len(dist.embeddings_table(dist.model(MODEL)).get_fragments()) == 4
    tiny = 150 * B.BYTES_PER_DIM * D / 2 ** 30                # 150 members at once: big clusters out of core

    want = semdedup(local, clusters=7, seed=3, memory_gb=tiny)
    out = ray_dedup(ray_cluster, dist, "--clusters", 7, "--seed", 3, "--memory-gb", tiny)
    assert want.mode == "full" and want.big_clusters >= 1 and "full: k-means" in out
    labels, max_sim = assert_same(local, Store.open(dist.path))
    assert labels.count(None) == 8 and np.isnan(max_sim).sum() == 8     # rows 3 and 5 of each part
    assert (max_sim > 1 - 1e-12).sum() >= 250               # the exact copies: ties ordered by id alike
    assert all(f"ε={e}: {c} (" in out for e, c in want.removable.items())

    for st in (local, dist):                                 # additions: grown clusters updated
        append(st, *extra)
    want = semdedup(local, memory_gb=tiny)
    out = ray_dedup(ray_cluster, dist, "--memory-gb", tiny)
    assert want.mode == "incremental" and "incremental: 500 new rows assigned" in out
    assert_same(local, Store.open(dist.path))
    for st in (local, dist):                                 # deletions: shrunk clusters recomputed
        with st.lock():
            recover(st)
            delete_ids(st, pa.array(parts[1][1][:80]))
    want = semdedup(local)
    out = ray_dedup(ray_cluster, dist)
    assert want.mode == "incremental" and "80 deleted" in out
    assert_same(local, Store.open(dist.path))
    assert "already up to date" in ray_dedup(ray_cluster, dist)

    want = semdedup(local, clusters=9, seed=1, refit=True)   # a refit after all that
    ray_dedup(ray_cluster, dist, "--clusters", 9, "--seed", 1, "--refit")
    assert_same(local, Store.open(dist.path))
    con = queries.connect(Store.open(dist.path))
    assert con.sql("SELECT count(*) FROM semdedup WHERE semdedup_max_sim > 0.99").fetchall()[0][0] > 0


def test_deal_clusters_balances_by_pairs():
    sizes = np.array([100, 0, 10, 10, 10, 90, 5])
    sets = RD.deal_clusters(sizes, np.arange(7), 3)
    assert sorted(np.concatenate(sets).tolist()) == [0, 2, 3, 4, 5, 6]       # the empty cluster left out
    assert [s.tolist() for s in sets] == [[0], [5], [2, 3, 4, 6]]
    assert [s.tolist() for s in RD.deal_clusters(sizes, np.array([2, 3]), 8)] == [[2], [3]]
    assert RD.deal_clusters(sizes, np.array([1]), 4) == []


def test_tasks_in_flight_are_bounded_and_a_task_error_is_one_line():
    """`_in_flight` submits a task only when fewer than `limit` are unfinished, yields each result
    under its key, and raises a task's ClipsqlError as itself (not Ray's wrapper)."""
    from clipsql.errors import ClipsqlError

    class TaskError(Exception):
        def __init__(self, cause):
            self.cause = cause

    class FakeRay:
        exceptions = type("exceptions", (), {"RayTaskError": TaskError})
        running, most = set(), 0

        def submit(self, v):
            self.running.add(v)
            FakeRay.most = max(FakeRay.most, len(self.running))
            return v

        def wait(self, refs, num_returns):
            return [min(refs)], [r for r in refs if r != min(refs)]

        def get(self, ref):
            self.running.discard(ref)
            if ref == 99:
                raise TaskError(ClipsqlError("rows read by position do not match"))
            return ref * 10

    ray = FakeRay()
    got = list(RD._in_flight(ray, ((f"k{i}", lambda i=i: ray.submit(i)) for i in range(7)), 3))
    assert got == [(f"k{i}", i * 10) for i in range(7)] and FakeRay.most == 3
    with pytest.raises(ClipsqlError, match="do not match"):
        list(RD._in_flight(ray, [("bad", lambda: ray.submit(99))], 2))


def test_a_task_reads_its_rows_and_checks_their_ids(tmp_path):
    """The tasks themselves, called here: an assignment task over the second fragment gives the local
    engine's labels and cosines for that row range; rows whose ids are not pass 1's are one line."""
    from clipsql.kernels import semdedup as K
    from clipsql.errors import ClipsqlError
    from clipsql.queries.curation.dedup import Rows
    from clipsql.queries.sql.engine import LOCAL
    st = make_store(tmp_path / "s", [rows(300, 0), rows(400, 1)])
    rec = st.model(MODEL)
    r = Rows(st, rec, 128)
    tbl = r.ds.to_table(columns=["id", "image_embedding"])
    r.ids = tbl.column("id").combine_chunks()
    X = np.asarray(tbl.column("image_embedding").combine_chunks().flatten()).reshape(-1, D)
    inv, valid = K.inverse_norms(X)
    C32 = X[[10, 20, 30]].astype(np.float32)
    labels, cos = LOCAL.dedup_assign(r, C32, inv, valid)
    fid = r.ds.get_fragments()[1].fragment_id
    got = RD._assign_task(str(st.path), rec, r.version, 64, [fid], r.ids.slice(300), inv[300:], valid[300:], C32,
                          None)
    assert np.array_equal(got["labels"], labels[300:]) and np.array_equal(got["cos"], cos[300:], equal_nan=True)
    with pytest.raises(ClipsqlError, match="do not match the scan"):
        RD._assign_task(str(st.path), rec, r.version, 64, [fid], r.ids.slice(299, 400), inv[300:], valid[300:], C32,
                        None)
    pos = np.arange(5, 600, 7)
    sizes = np.bincount(labels[pos][labels[pos] >= 0])
    with pytest.raises(ClipsqlError, match="do not match the scan"):
        RD._within_task(str(st.path), rec, r.version, pos, r.ids.take(pa.array(pos + 1)), inv[pos], labels[pos],
                        cos[pos], np.arange(len(pos)), C32, np.flatnonzero(sizes), np.zeros(0, np.int64), None, None,
                        1000, 512, None)


def test_an_unknown_engine_is_one_line(tmp_path):
    st = make_store(tmp_path / "s", [rows(50, 0)])
    bad = cli("dedup", str(st.path), "--engine", "spark", check=False)
    assert bad.returncode == 1 and bad.stderr.decode().count("\n") <= 1
    assert "must be one of local, ray" in bad.stderr.decode()
