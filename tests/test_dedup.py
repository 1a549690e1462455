"""SemDeDup (docs/science.md §10, `clipsql dedup`) against a brute force written from the definition."""
import math

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from clipsql import queries
from clipsql.cli import app
from clipsql.queries.curation.dedup import dedup_status, semdedup
from clipsql.store.ledger import recover
from clipsql.store.runs import start_run
from clipsql.store.tables import centroids_table_name, dedup_table_name
from clipsql.kernels import semdedup as K
from clipsql.errors import ClipsqlError, SelectionError
from clipsql.kernels.arrays import to_numpy
from clipsql.store.store import Store
from clipsql.store.writer import write_batch

D = 32
MODEL = "test/semdedup"
runner = CliRunner()


# --------------------------------------------------------------------------- data
def planted(n_base=2400, n_groups=150, n_near=120, n_far=120, seed=0, d=D):
    """Clustered rows (30 true clusters, within-cluster cos ~0.5) with planted duplicates:
    `n_groups` groups of 2–4 copies + tiny noise (cos > 0.9999), `n_near` near copies
    (cos ≈ 0.995: removed at ε = 0.01, not 0.001) and `n_far` (cos ≈ 0.97: only at ε = 0.05).
    Raw norms vary (×0.5–20), as raw CLIP vectors do. Returns X, ids, {group: [row]}."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = centres[rng.integers(30, size=n_base)] + rng.normal(size=(n_base, d)) / math.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows, groups = [X], {}
    nxt = n_base
    for g, src in enumerate(rng.choice(n_base, n_groups, replace=False)):
        m = int(rng.integers(1, 4))
        rows.append(X[src] + 1e-3 * rng.normal(size=(m, d)) / math.sqrt(d))
        groups[g] = [int(src)] + list(range(nxt, nxt + m))
        nxt += m
    for count, cos in ((n_near, 0.995), (n_far, 0.97)):
        src = rng.choice(n_base, count, replace=False)
        z = rng.normal(size=(count, d))
        z -= (z * X[src]).sum(1, keepdims=True) * X[src]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        rows.append(cos * X[src] + math.sqrt(1 - cos * cos) * z)
    X = np.concatenate(rows)
    perm = rng.permutation(len(X))            # storage order ≠ id order
    inv_perm = np.argsort(perm)
    X = X[perm] * rng.uniform(0.5, 20, size=(len(X), 1))
    groups = {g: [int(inv_perm[r]) for r in rs] for g, rs in groups.items()}
    ids = [f"s{i:05d}" for i in rng.permutation(len(X))]
    return X.astype(np.float32), ids, groups


def make_store(path, X, ids):
    st = Store.init(path)
    rec = st.register_model(model_id=MODEL, kind="clip", dim=X.shape[1], logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={})
    append(st, X, ids)
    return st, rec


def append(st, X, ids):
    rec = st.model(MODEL)
    run = start_run(st.engine, MODEL, "src", "precomputed")
    write_batch(st, rec, samples=None, ids=list(ids), image=X, text=np.ones_like(X), run_id=run, source="src",
                   rejects=[], meta_types={})


def stored(st, rec):
    """{id: (cluster, max_sim)} through SQL (the `semdedup` view), and the centroids table."""
    con = queries.connect(st)
    rows = con.sql("SELECT id, semdedup_cluster, semdedup_max_sim FROM semdedup").fetchall()
    con.close()
    C = st.dataset(centroids_table_name(rec.table_name), latest=True).to_table().sort_by("cluster")
    return {r[0]: (r[1], r[2]) for r in rows}, to_numpy(C.column("centroid"))


# --------------------------------------------------------------------------- brute force
def brute_force(X, ids, labels, C32):
    """SemDeDup straight from docs/science.md §10, float64, O(n_c²) loops per cluster: order by cos to the
    centroid ascending (farthest first), ties by id; max_sim = max cos to the earlier members."""
    Xn = X.astype(np.float64)
    norms = np.linalg.norm(Xn, axis=1)
    C = C32.astype(np.float64)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    out = {}
    for c in sorted({int(v) for v in labels if v is not None}):
        mem = [i for i in range(len(X)) if labels[i] == c]
        mem.sort(key=lambda i: (float(Xn[i] @ C[c]) / norms[i], ids[i]))
        unit = [Xn[i] / norms[i] for i in mem]
        for j, i in enumerate(mem):
            out[ids[i]] = 0.0 if j == 0 else max(float(unit[j] @ unit[k]) for k in range(j))
    return out


def bf_assign(X, C32):
    """Each row's cluster: the largest cosine to the (unit) centroids, float64."""
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    Cn = C32.astype(np.float64) / np.linalg.norm(C32.astype(np.float64), axis=1, keepdims=True)
    return [int(v) for v in np.argmax(Xn @ Cn.T, axis=1)]


def assert_equals_brute_force(got, X, ids, C32):
    """The stored (cluster, max_sim) of every row equal the brute force over X with centroids C32."""
    labels = bf_assign(X, C32)
    assert [got[i][0] for i in ids] == labels
    bf = brute_force(X, ids, labels, C32)
    np.testing.assert_allclose([got[i][1] for i in ids], [bf[i] for i in ids], rtol=0, atol=1e-12)


def removed(values, eps):
    return {i for i, v in values.items() if v is not None and v > 1 - eps}


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    X, ids, groups = planted()
    X[7] = np.nan                      # no usable vector: NULL cluster and max_sim
    X[11] = 0.0
    st, rec = make_store(tmp_path_factory.mktemp("dd") / "s", X, ids)
    res = semdedup(st, clusters=12, seed=1)
    return st, rec, X, ids, groups, res


# --------------------------------------------------------------------------- tests
def test_stored_scores_equal_brute_force_kept_sets(run1):
    st, rec, X, ids, groups, res = run1
    got, C32 = stored(st, rec)
    assert res.mode == "full" and len(got) == len(ids) and C32.shape == (12, D)
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    Cn = C32.astype(np.float64) / np.linalg.norm(C32.astype(np.float64), axis=1, keepdims=True)
    labels = [got[i][0] for i in ids]
    for r in range(len(ids)):          # assignment: max cosine to the stored centroids
        if labels[r] is not None:
            s = Xn[r] @ Cn.T
            assert labels[r] == int(np.argmax(s)), r
    bf = brute_force(X, ids, labels, C32)
    vals = {i: v for i, (_, v) in got.items()}
    assert set(bf) == {i for i, v in vals.items() if v is not None}
    np.testing.assert_allclose([vals[i] for i in bf], [bf[i] for i in bf], rtol=0, atol=1e-12)
    for eps in (0.001, 0.01, 0.05):
        assert removed(vals, eps) == removed(bf, eps), eps
        con = queries.connect(st)
        n_sql = con.sql(f"SELECT count(*) FROM semdedup WHERE semdedup_max_sim > 1 - {eps}").fetchall()[0][0]
        con.close()
        assert n_sql == len(removed(bf, eps)) == res.removable[str(eps)]
    # the planted shares: every copy / near copy is removable once ε covers it
    assert len(removed(vals, 0.001)) >= 0.9 * sum(len(g) - 1 for g in groups.values())
    assert len(removed(vals, 0.05)) - len(removed(vals, 0.01)) >= 0.8 * 120


def test_one_survivor_per_duplicate_group_the_farthest(run1):
    st, rec, X, ids, groups, _ = run1
    got, C32 = stored(st, rec)
    Cn = C32.astype(np.float64) / np.linalg.norm(C32.astype(np.float64), axis=1, keepdims=True)
    checked = 0
    for rows in groups.values():
        if len({got[ids[r]][0] for r in rows}) != 1:
            continue                   # split across clusters: SemDeDup keeps one per cluster
        kept = [r for r in rows if got[ids[r]][1] <= 1 - 0.001]
        assert len(kept) == 1
        cos = [X[r].astype(np.float64) @ Cn[got[ids[r]][0]] / np.linalg.norm(X[r].astype(np.float64)) for r in rows]
        assert kept[0] == rows[int(np.argmin(cos))]      # keep hard: the farthest from the centroid
        checked += 1
    assert checked >= 0.9 * len(groups)


def test_null_zero_and_nonfinite_rows_are_null(run1):
    st, rec, X, ids, _, _ = run1
    got, _ = stored(st, rec)
    assert got[ids[7]] == (None, None) and got[ids[11]] == (None, None)
    assert sum(v == (None, None) for v in got.values()) == 2
    inv, valid = K.inverse_norms(np.array([[1, 2], [0, 0], [np.inf, 1], [np.nan, 0]], np.float32))
    assert valid.tolist() == [True, False, False, False] and inv[1:].tolist() == [0, 0, 0]
    col = pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0, 0.0, 0.0], pa.float32()), 2,
                                            mask=pa.array([False, True]))
    assert K.inverse_norms(to_numpy(col))[1].tolist() == [True, False]   # a NULL vector reads as NaN


def test_float32_near_the_threshold_matches_float64():
    """Pairs whose cosine sits within the float32 GEMM's error of 1 − ε (ε = 0.01, d = 512): a float32
    value alone can land on the wrong side; the stored (refined) values are float64-exact."""
    d = 512
    rng = np.random.default_rng(3)
    delta = K.f32_tolerance(d)
    assert 2e-5 < delta < 4e-5
    rows, want = [], []
    for s in (-2e-6, -5e-7, -1e-7, -1e-8, 1e-8, 1e-7, 5e-7, 2e-6) * 8:
        x = rng.normal(size=d)
        x /= np.linalg.norm(x)
        z = rng.normal(size=d)
        z -= (z @ x) * x
        z /= np.linalg.norm(z)
        c = 0.99 + s
        rows += [x * rng.uniform(1, 30), (c * x + math.sqrt(1 - c * c) * z) * rng.uniform(1, 30)]
    X = np.array(rows, np.float32)
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    inv, _ = K.inverse_norms(X)
    members = np.arange(len(X))
    got = K.cluster_max_sim(X, inv, members, rows=7, cols=12)  # odd blocks: the masking is exercised
    want = [0.0] + [max(Xn[j] @ Xn[k] for k in range(j)) for j in range(1, len(X))]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert (got > 0.99).tolist() == (np.array(want) > 0.99).tolist()
    U = K.unit32(X, inv, members)
    err = np.abs((U @ U.T).astype(np.float64) - Xn @ Xn.T).max()
    assert 0 < err < delta                                     # the bound holds, and float32 does err
    g32 = (U[1::2] * U[::2]).sum(1, dtype=np.float32)          # float32 alone: some pairs on the wrong side
    g64 = (Xn[1::2] * Xn[::2]).sum(1)
    assert ((g32 > 0.99) != (g64 > 0.99)).any()


def test_kmeans_is_deterministic_under_a_seed():
    X, ids, _ = planted(n_base=1500, n_groups=20, n_near=0, n_far=0, seed=5)
    inv, valid = K.inverse_norms(X)
    pool = np.flatnonzero(valid)

    def fit(seed):
        rng = np.random.default_rng(seed)
        return K.spherical_kmeans(X, inv, K.draw_sample(pool, 800, rng), 10, rng, 20)

    (a, ia), (b, ib), (c, _) = fit(4), fit(4), fit(5)
    assert np.array_equal(a, b) and ia == ib
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float64), axis=1), 1.0, atol=1e-6)
    la, _ = K.assign(X, inv, valid, a)
    lb, _ = K.assign(X, inv, valid, a, chunk=97)               # chunking does not change the assignment
    assert np.array_equal(la, lb) and len(np.unique(la)) == 10


def test_incremental_rerun_equals_a_full_pass_with_the_same_centroids(tmp_path):
    X, ids, _ = planted(seed=2)
    n0 = 2200
    st, rec = make_store(tmp_path / "s", X[:n0], ids[:n0])
    first = semdedup(st, clusters=10, sample=1500, seed=3)
    assert first.mode == "full" and first.pending_before == n0
    append(st, X[n0:], ids[n0:])
    status = dedup_status(Store.open(st.path, read_only=True))
    assert status.pending == len(X) - n0 and status.stored == n0 and status.stale == 0
    assert status.to_dict()["params"]["clusters"] == 10
    con = queries.connect(st)                  # the view holds committed values only: no pending rows
    assert con.sql("SELECT count(*) FROM semdedup").fetchall()[0][0] == n0
    con.close()
    res = semdedup(st)                          # the stored parameters: assign the new rows
    assert res.mode == "incremental" and res.new_rows == len(X) - n0 and res.clusters == 10
    assert res.pending_before == len(X) - n0 and dedup_status(st).pending == 0
    got, C32 = stored(st, rec)
    assert_equals_brute_force(got, X, ids, C32)
    # deletions: the clusters that lost members are recomputed too
    from clipsql.store.manage import delete_ids
    with st.lock():
        recover(st)
        delete_ids(st, pa.array(ids[:50]))
    assert dedup_status(st).stale == 50
    res = semdedup(st)
    assert res.mode == "incremental" and res.removed_rows == 50 and res.new_rows == 0
    got, _ = stored(st, rec)
    keep = np.arange(50, len(X))
    assert len(got) == len(keep)
    assert_equals_brute_force(got, X[keep], [ids[i] for i in keep], C32)
    assert semdedup(st).mode == "current"
    # other parameters: a full recompute
    assert semdedup(st, clusters=8).mode == "full"
    assert semdedup(st, refit=True).clusters == round(math.sqrt(len(keep)))


def test_a_failed_write_leaves_the_old_result(tmp_path, monkeypatch):
    from clipsql.store import faults
    X, ids, _ = planted(n_base=600, n_groups=20, n_near=0, n_far=0, seed=4)
    st, rec = make_store(tmp_path / "s", X, ids)
    semdedup(st, clusters=5)
    before = st.dataset(dedup_table_name(rec.table_name), latest=True)
    monkeypatch.setenv("CLIPSQL_FAULT", "dedup:before-write=enospc")
    faults._hits.pop("dedup:before-write", None)
    with pytest.raises(OSError, match="No space"):
        semdedup(st, clusters=6)                # centroids rewritten, the main table not
    monkeypatch.delenv("CLIPSQL_FAULT")
    after = st.dataset(dedup_table_name(rec.table_name), latest=True)
    assert after.version == before.version and after.to_table().equals(before.to_table())
    assert semdedup(st, clusters=5).mode == "current"    # still names its own centroids' version


def test_model_removal_drops_the_tables(tmp_path):
    from clipsql.store.maintenance import optimize
    from clipsql.store.manage import remove_model
    X, ids, _ = planted(n_base=300, n_groups=5, n_near=0, n_far=0, seed=6)
    st, rec = make_store(tmp_path / "s", X, ids)
    semdedup(st, clusters=3)
    names = {dedup_table_name(rec.table_name), centroids_table_name(rec.table_name)}
    assert names <= set(st.table_names())
    remove_model(st, MODEL)
    assert names <= set(st.table_names())           # kept for the sessions opened before, for the retention
    optimize(st, retention_hours=0)
    assert not names & set(st.table_names())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_end_to_end_and_one_line_errors(tmp_path):
    X, ids, _ = planted(n_base=800, n_groups=40, n_near=0, n_far=0, seed=7)
    make_store(tmp_path / "s", X, ids)
    s = tmp_path / "s"
    r = invoke("dedup", s, "--status")
    assert r.exit_code == 0 and f"0 of {len(ids)} rows have a value" in r.output and "never computed" in r.output
    r = invoke("dedup", s, "--clusters", "6", "--seed", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "K=6" in r.output and "full" in r.output and "ε=0.01" in r.output
    r = invoke("query", s, "SELECT count(*) AS n FROM semdedup WHERE semdedup_max_sim > 0.99", "--format", "csv")
    assert r.exit_code == 0 and int(r.output.split()[-1]) >= 40
    r = invoke("dedup", s, "--no-progress")
    assert r.exit_code == 0 and "already up to date" in r.output
    for args, msg in ((["--clusters", "0"], "--clusters must be an integer ≥ 1"),
                      (["--clusters", str(len(ids) + 1)], "is more than the"),
                      (["--clusters", "5", "--sample", "3"], "--sample must be between"),
                      (["--model", "nope"], "is not in this store")):
        r = invoke("dedup", s, *args, "--no-progress")
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    invoke("init", tmp_path / "empty")
    r = invoke("dedup", tmp_path / "empty", "--no-progress")
    assert r.exit_code == 1 and "no models yet" in r.output and len(r.output.strip().splitlines()) == 1


def test_library_errors_are_domain_errors(tmp_path):
    st = Store.init(tmp_path / "s")
    st.register_model(model_id=MODEL, kind="clip", dim=D, logit_scale=100.0, logit_bias=None, context_length=77,
                      spec={})
    with pytest.raises(SelectionError, match="no rows yet"):
        semdedup(st)
    append(st, np.full((4, D), np.nan, np.float32), ["a", "b", "c", "d"])
    with pytest.raises(ClipsqlError, match="usable image embedding"):
        semdedup(st)
    with pytest.raises(SelectionError, match="`iterations`"):
        semdedup(st, iterations=0)


def test_update_after_additions_equals_a_full_pass_kernel():
    """Rows added to a cluster, some ranked before every old member; d = 8 so cosines go negative
    (the old first member's stored 0 must not survive)."""
    rng = np.random.default_rng(9)
    X = rng.normal(size=(90, 8)).astype(np.float32)
    inv, valid = K.inverse_norms(X)
    C32 = K.spherical_kmeans(X, inv, np.arange(90), 2, np.random.default_rng(0), 5)[0]
    rank = np.arange(90)
    new = np.zeros(90, dtype=bool)
    new[rng.choice(90, 35, replace=False)] = True
    lab_old, cos_old = K.assign(X, inv, valid & ~new, C32)
    old_ms, _ = K.max_sims(X, inv, lab_old, cos_old, rank)
    labels, cos = K.assign(X, inv, valid, C32)
    full, _ = K.max_sims(X, inv, labels, cos, rank)
    upd = K.update_max_sims(X, inv, labels, cos, rank, old_ms, new, np.unique(labels), rows=4, cols=8)
    assert (full < 0).any() and np.array_equal(upd, full)


def test_the_kernels_on_threads_equal_one_thread_bit_for_bit():
    """The k-means fit, the assignment and the within-cluster pass on 2–4 threads (BLAS on one
    each): the same centroids, labels, cosines, float64 max_sim values, pair counts and progress as
    one thread."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 16)).astype(np.float32)
    X[1500:1600] = X[:100] + rng.normal(size=(100, 16)).astype(np.float32) * 1e-4    # near copies
    X[7] = np.nan
    inv, valid = K.inverse_norms(X)
    U = K.unit32(X, inv, np.flatnonzero(valid))
    C32, info = K.fit_units(U, 12, np.random.default_rng(0), 5, threads=1)
    labels, cos = K.assign(X, inv, valid, C32, chunk=256)
    for threads in (2, 3):
        C_t, info_t = K.fit_units(U, 12, np.random.default_rng(0), 5, threads=threads)
        assert np.array_equal(C_t, C32) and info_t == info
        lab_t, cos_t = K.assign(X, inv, valid, C32, chunk=256, threads=threads)
        assert np.array_equal(lab_t, labels) and np.array_equal(cos_t, cos, equal_nan=True)
    assert labels[7] == -1
    rank = rng.permutation(3000)
    seen: list[int] = []
    one, info = K.max_sims(X, inv, labels, cos, rank, rows=64, threads=1, progress=seen.append)
    for threads in (2, 3, 4):
        got: list[int] = []
        many, info_many = K.max_sims(X, inv, labels, cos, rank, rows=64, threads=threads, progress=got.append)
        assert np.array_equal(many, one, equal_nan=True) and info_many == info and got == seen
    assert (one > 0.999).sum() == 99              # the near copies (one source is NaN)


def test_a_tiny_memory_budget_gives_the_same_stored_values(tmp_path, monkeypatch):
    """A budget of 120 members (d = 32): the scan in 256-row batches, reads in takes of 7 rows, the
    clusters in many groups, some alone and out of core (super-blocks of 60 against the earlier ones
    re-read): the stored values equal the default budget's bit for bit — full run, additions (grown
    clusters updated) and deletions (shrunk ones recomputed) alike."""
    from clipsql.queries.curation import dedup
    from clipsql.kernels import semdedup_blocks as B
    from clipsql.store.manage import delete_ids
    X, ids, _ = planted(seed=8)
    n0 = 2300
    tiny = 120 * B.BYTES_PER_DIM * D / 2 ** 30
    assert B.cap_rows(tiny * 2 ** 30, D) == 120
    stores = {}
    for name in ("default", "tiny"):
        st, rec = make_store(tmp_path / name, X[:n0], ids[:n0])
        stores[name] = (st, rec)
    ref = semdedup(stores["default"][0], clusters=25, seed=2)
    monkeypatch.setattr(dedup, "TAKE_ROWS", 7)                   # Lance takes of 7 rows
    res = semdedup(stores["tiny"][0], clusters=25, seed=2, memory_gb=tiny)
    assert ref.groups == 1 and ref.big_clusters == 0
    assert res.group_rows == 120 and res.big_clusters >= 2 and res.largest_cluster > 120
    assert res.groups < 25 and res.groups > 10               # some groups hold several clusters
    assert res.pairs == ref.pairs and res.removable == ref.removable

    def same():
        (a, Ca), (b, Cb) = stored(*stores["default"]), stored(*stores["tiny"])
        assert a == b and np.array_equal(Ca, Cb)
        return a
    got = same()
    assert_equals_brute_force(got, X[:n0], ids[:n0], stored(*stores["tiny"])[1])     # and the brute force agrees
    for st, _ in stores.values():                                 # additions: grown clusters updated
        append(st, X[n0:], ids[n0:])
    ref = semdedup(stores["default"][0])
    monkeypatch.setenv("CLIPSQL_DEDUP_MEMORY_GB", str(tiny))      # the environment sets the budget too
    res = semdedup(stores["tiny"][0])
    assert res.mode == ref.mode == "incremental" and res.big_clusters >= 1
    same()
    for st, _ in stores.values():                                 # deletions: shrunk clusters recomputed
        with st.lock():
            recover(st)
            delete_ids(st, pa.array(ids[100:160]))
    ref = semdedup(stores["default"][0], memory_gb=2)
    res = semdedup(stores["tiny"][0])
    assert res.mode == "incremental" and res.removed_rows == 60 and res.big_clusters >= 1
    same()
    monkeypatch.setenv("CLIPSQL_DEDUP_MEMORY_GB", "lots")
    with pytest.raises(SelectionError, match="CLIPSQL_DEDUP_MEMORY_GB must be a number"):
        semdedup(stores["tiny"][0])
    with pytest.raises(SelectionError, match="`memory_gb` must be a number of GiB > 0"):
        semdedup(stores["tiny"][0], memory_gb=0)


def test_a_full_run_spills_pass_1_rows_and_equals_reading_lance_again(tmp_path, monkeypatch):
    """A full run writes pass 1's rows to local scratch disk and reads the assignment and the
    within-cluster groups from there; with no room for them, or a disk that fills while pass 1
    writes, it reads Lance again. The stored values are the same bit for bit, and no scratch file
    stays open."""
    from clipsql.queries.curation import dedup
    from clipsql.kernels import scratch
    from clipsql.kernels import semdedup_blocks as B
    X, ids, _ = planted(seed=5)
    X[3] = np.nan
    small = 120 * B.BYTES_PER_DIM * D / 2 ** 30            # scan batches of 256, many groups
    monkeypatch.setattr(scratch, "TAKE_ROWS", 7)            # many memory maps per group
    monkeypatch.setattr(scratch, "mount_type", lambda folder: None)   # a disk, even where /tmp is tmpfs
    made, lance_takes = [], []
    real_create, real_take = scratch.ScratchRows.create, dedup.Rows.check_ids
    monkeypatch.setattr(scratch.ScratchRows, "create",
                        classmethod(lambda cls, *a, **k: made.append(real_create(*a, **k)) or made[-1]))
    monkeypatch.setattr(dedup.Rows, "check_ids", lambda self, *a: lance_takes.append(1) or real_take(self, *a))
    results, stores = {}, {}
    for case in ("scratch", "no room", "disk full"):
        if case == "no room":
            monkeypatch.setattr(scratch, "has_room", lambda nbytes, folder=None: False)
        if case == "disk full":
            monkeypatch.setattr(scratch, "has_room", lambda nbytes, folder=None: True)
            calls = []

            def failing_append(self, X, real=scratch.ScratchRows.append):
                calls.append(1)
                if len(calls) == 3:
                    raise OSError(28, "No space left on device")
                real(self, X)
            monkeypatch.setattr(scratch.ScratchRows, "append", failing_append)
        made.clear()
        lance_takes.clear()
        st, rec = make_store(tmp_path / case.replace(" ", "_"), X, ids)
        res = semdedup(st, clusters=20, seed=3, memory_gb=small)
        assert res.groups > 3
        if case == "scratch":
            assert res.scratch_mib == round(len(X) * D * 4 / 2 ** 20, 1) and not lance_takes
        else:
            assert res.scratch_mib == 0 and lance_takes                 # the groups read from Lance
        assert made == [None] if case == "no room" else len(made) == 1 and made[0]._fh is None   # closed
        results[case], stores[case] = stored(st, rec), (st, rec)
    assert results["scratch"][0] == results["no room"][0] == results["disk full"][0]
    assert all(np.array_equal(results["scratch"][1], r[1]) for r in results.values())
    ok = [i for i in range(len(ids)) if i != 3]
    assert_equals_brute_force(results["scratch"][0], X[ok], [ids[i] for i in ok], results["scratch"][1])
    again = semdedup(stores["scratch"][0])                     # nothing new: no pass to spill for
    assert again.mode == "current" and again.scratch_mib is None


def test_out_of_core_cluster_kernel_equals_in_memory():
    """One cluster through `big_cluster` (cap 10: super-blocks of 5; odd row blocks) against `cluster_max_sim`;
    a super-block's first member with a negative max_sim (the earlier blocks' value, not 0, must win)."""
    from clipsql.kernels import semdedup_blocks as B
    rng = np.random.default_rng(11)
    X = rng.normal(size=(47, 8)).astype(np.float32)
    X[[5, 20]] = X[[3, 3]] * np.float32(2.0)                   # exact duplicates across super-blocks
    members = rng.permutation(47)
    X[members[:5], 0] = np.abs(X[members[:5], 0]) + 0.5       # rank 5 (a super-block's first) points away
    X[members[5]] = 0.0                                         # from ranks 0–4: its max_sim is negative
    X[members[5], 0] = -3.0
    inv, _ = K.inverse_norms(X)
    want = K.cluster_max_sim(X, inv, members)
    fetch = lambda pos: X[pos]                                  # noqa: E731
    got = B.big_cluster(fetch, inv, members, 10, rows=3)
    assert want[5] < 0 and np.array_equal(got, want)
    assert B.plan_groups(np.array([3, 9, 2, 2, 30, 1]), np.arange(6), 10) and \
        [g.tolist() for g in B.plan_groups(np.array([3, 9, 2, 2, 30, 1]), np.arange(6), 10)] == \
        [[0], [1], [2, 3], [4], [5]]


def test_cli_memory_option(tmp_path):
    X, ids, _ = planted(n_base=500, n_groups=20, n_near=0, n_far=0, seed=12)
    make_store(tmp_path / "s", X, ids)
    r = invoke("dedup", tmp_path / "s", "--clusters", "4", "--memory-gb", "0.0001", "--no-progress")
    assert r.exit_code == 0 and "K=4" in r.output, r.output
    r = invoke("dedup", tmp_path / "s", "--memory-gb", "-1", "--no-progress")
    assert r.exit_code == 1 and "--memory-gb must be a number of GiB > 0" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_blocked_kmeans_pp_draws_the_exact_kmeans_pp_distribution():
    """The blocked seeding (stale weights + rejection) against the k-means++ probabilities computed
    by brute force in float64: P(c1, c2 | c0) = w(c1 | c0) / Σ w(· | c0) · w(c2 | c0, c1) / Σ w(· | c0, c1),
    w = 1 − max cos to the chosen. With block = 2 the third seed is drawn by rejection."""
    rng = np.random.default_rng(11)
    U = rng.standard_normal((5, 3))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    G = U @ U.T

    def weights(chosen):
        w = 1.0 - G[:, chosen].max(axis=1)
        w[chosen] = 0.0
        return np.clip(w, 0.0, None)

    want = {}
    for c0 in range(5):
        w1 = weights([c0])
        for c1 in range(5):
            w2 = weights([c0, c1])
            for c2 in range(5):
                p = 0.2 * w1[c1] / w1.sum() * w2[c2] / w2.sum() if w1[c1] > 0 and w2.sum() > 0 else 0.0
                if p > 0:
                    want[(c0, c1, c2)] = p
    draws = 40000
    U32 = U.astype(np.float32)
    gen = np.random.default_rng(0)
    got: dict = {}
    for _ in range(draws):
        t = tuple(K.kmeans_pp(U32, 3, gen, block=2).tolist())
        got[t] = got.get(t, 0) + 1
    assert set(got) <= set(want)
    for key, p in want.items():                  # each frequency within 5 standard deviations
        sd = np.sqrt(p * (1 - p) / draws)
        assert abs(got.get(key, 0) / draws - p) < 5 * sd + 1e-4, (key, got.get(key, 0) / draws, p)


def test_kmeans_pp_with_fewer_distinct_rows_than_k_picks_distinct_rows():
    U = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)          # 20 rows, 4 distinct
    for block in (1, 3, 32):
        c = K.kmeans_pp(U, 10, np.random.default_rng(2), block=block)
        assert len(np.unique(c)) == 10
        assert len(np.unique(c[:4] // 5)) == 4                      # the first 4 seeds: one per distinct row


# --------------------------------------------------------------------------- the sample drawn in pass 1
_MASK = (1 << 64) - 1


def _fmix_ref(h):
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def hash_ref(s, seed):
    """The documented key, in Python integers: polynomial hashes of the UTF-8 bytes (+1) in two seeded
    odd bases mod 2⁶⁴, mixed with the length and the seed by splitmix64's finalizer."""
    g = 0x9E3779B97F4A7C15
    sd = _fmix_ref((seed + g) & _MASK)
    b1, b2 = _fmix_ref(sd ^ g) | 1, _fmix_ref((sd + g) & _MASK) | 1
    p1 = p2 = 0
    for byte in s.encode():
        p1 = (p1 * b1 + byte + 1) & _MASK
        p2 = (p2 * b2 + byte + 1) & _MASK
    h = _fmix_ref(p1 ^ sd) ^ _fmix_ref((p2 + len(s.encode()) * g) & _MASK)
    return _fmix_ref(h)


def test_hash_keys_equal_the_definition_whatever_the_slicing():
    from clipsql.kernels.sample import hash_keys
    ids = ["", "a", "ab", "ba", "s00001", "s00010", "é€", "x" * 300]
    arr = pa.array(ids)
    for seed in (0, 1, 2 ** 40):
        want = [hash_ref(s, seed) for s in ids]
        assert hash_keys(arr, seed).tolist() == want
        assert hash_keys(arr.slice(3), seed).tolist() == want[3:]
        assert hash_keys(pa.chunked_array([arr.slice(0, 2), arr.slice(2)]), seed).tolist() == want
    assert hash_keys(arr, 0).tolist() != hash_keys(arr, 1).tolist()


def test_stream_sample_is_the_smallest_keys_whatever_the_order_and_batches():
    """Brute force: the m valid rows of smallest (key, id rank), in id order. Ties at the cut are
    planted (equal keys), the stream is fed in two storage orders and several batch sizes."""
    from clipsql.kernels.sample import StreamSample
    rng = np.random.default_rng(3)
    n, d, m = 5000, 4, 300
    keys = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    keys[rng.choice(n, 400, replace=False)] = np.sort(keys)[m - 1]      # many ties at the m-th key
    rank = rng.permutation(n)                                            # id order ≠ stream order
    X = rng.standard_normal((n, d)).astype(np.float32)
    want = sorted(range(n), key=lambda i: (int(keys[i]), int(rank[i])))[:m]
    want = sorted(want, key=lambda i: rank[i])
    for order in (np.arange(n), rng.permutation(n)):
        for batch, slack in ((1, 1), (97, 10), (4096, None)):
            s = StreamSample(m + 50, d, slack=slack)
            for a in range(0, n, batch):
                p = order[a:a + batch]
                s.add(keys[p], p, lambda i, p=p: X[p[i]])
            pos, rows = s.take(m, rank)
            assert pos.tolist() == want
            assert np.array_equal(rows, X[pos])
            assert s.admitted < n if batch > 1 else True


def test_the_sample_does_not_depend_on_the_storage_order(tmp_path):
    """The same rows written in another order (and in several commits) give the same centroids."""
    X, ids, _ = planted(n_base=900, n_groups=20, n_near=0, n_far=0, seed=7)
    st1, rec1 = make_store(tmp_path / "a", X, ids)
    perm = np.random.default_rng(0).permutation(len(X))
    st2, rec2 = make_store(tmp_path / "b", X[perm[:400]], [ids[i] for i in perm[:400]])
    append(st2, X[perm[400:]], [ids[i] for i in perm[400:]])
    r1 = semdedup(st1, clusters=6, sample=500, seed=2)
    r2 = semdedup(st2, clusters=6, sample=500, seed=2)
    (g1, C1), (g2, C2) = stored(st1, rec1), stored(st2, rec2)
    assert np.array_equal(C1, C2) and g1 == g2 and r1.fit.iterations_run == r2.fit.iterations_run
    r3 = semdedup(st1, clusters=6, sample=500, seed=3)
    assert not np.array_equal(stored(st1, rec1)[1], C1) and r3.mode == "full"


def test_device_run_stores_the_numpy_values(run1, tmp_path):
    """`device="cpu"` runs the k-means steps, the assignment and the Gram blocks through torch
    (models.device: the code a GPU runs): the same centroids, clusters and max_sim, bit for bit."""
    pytest.importorskip("torch")
    st, rec, X, ids, _, _ = run1
    want, C_want = stored(st, rec)
    st2, rec2 = make_store(tmp_path / "s", X, ids)
    semdedup(st2, clusters=12, seed=1, device="cpu")
    got, C_got = stored(st2, rec2)
    assert np.array_equal(C_got, C_want) and got == want
    with pytest.raises(ClipsqlError, match="device must be one of"):
        semdedup(st2, clusters=12, seed=1, device="tpu", refit=True)


def test_inverse_norms_do_not_depend_on_the_chunk_and_equal_the_float64_definition():
    """1/‖x‖ per row, float64 of the float32 values; 0 and invalid for NULL, zero and non-finite rows."""
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((700, 48)) * rng.lognormal(0, 4, (700, 1))).astype(np.float32)
    X[3], X[5], X[8, 2], X[13] = np.nan, 0.0, np.inf, 1e-30
    one, valid = K.inverse_norms(X, chunk=1)
    for chunk in (7, 256, 700, 10_000):
        inv, ok = K.inverse_norms(X, chunk=chunk)
        assert np.array_equal(inv, one) and np.array_equal(ok, valid)
    bf = [1 / math.sqrt(sum(float(v) * float(v) for v in row)) if np.isfinite(row).all() and row.any() else 0.0
          for row in X]
    np.testing.assert_allclose(one, bf, rtol=1e-15, atol=0)
    assert valid.tolist() == [v > 0 for v in bf]
