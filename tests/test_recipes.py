"""The DataComp baselines as `select` recipes (docs/science.md §11), `--where` narrowing the pool, and
`--format datacomp-uids`: each against an independent implementation of its definition."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store.fits import fit_stats
from clipsql.queries.curation.selection import count_for, select
from clipsql.queries.curation.targets import add_target
from clipsql.errors import ClipsqlError, SelectionError
from clipsql.kernels.arrays import to_numpy
from clipsql.store.reads import read_embeddings
from clipsql.store.store import Store

from conftest import clip_like

N = 360


def uid(i: int) -> str:
    return f"{(i * 2654435761) % (1 << 64):016x}{(i * 40503 + 7) % (1 << 64):016x}"


def write_pool(path, img, txt):
    n = len(img)
    pq.write_table(pa.table({
        "id": [uid(i) for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "url": [f"file:///x/{i}.jpg" for i in range(n)], "quality": [100 + (i % 7) * 50 for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), img.shape[1]),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), txt.shape[1]),
    }), path)
    return path


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("recipes")
    img, txt = clip_like(N, np.random.default_rng(21))
    img[10] = img[11] * 1.5          # planted duplicates (same direction) for the dedup intersection
    img[12] = img[11] * 0.7
    st = Store.init(root / "store")
    ingest(st, str(write_pool(root / "e.parquet", img, txt)), model=tiny_model,
           options=IngestOptions(batch_size=128, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=120, seed=1)
    add_target(st, "tgt", query=f"SELECT image_embedding FROM embeddings WHERE id IN "
                                f"('{uid(3)}', '{uid(50)}', '{uid(200)}')")
    return st


def rows(st):
    tbl = read_embeddings(st, st.model()).sort_by("id")
    return (np.array(tbl.column("id").to_pylist()), to_numpy(tbl.column("image_embedding")).astype(np.float64),
            to_numpy(tbl.column("text_embedding")).astype(np.float64))


def unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def ids_of(path):
    return pq.read_table(path).column("id").to_pylist()


# --------------------------------------------------------------------------- clip-score
def test_clip_score_top_fraction_and_threshold_match_datacomp(pool_store, tmp_path):
    ids, X, Y = rows(pool_store)
    cs = np.einsum("ij,ij->i", unit(X), unit(Y))
    side = select(pool_store, recipe="clip-score", output=tmp_path / "c.parquet")
    want = [ids[i] for i in sorted(range(N), key=lambda i: (-cs[i], ids[i]))[:count_for(0.3, N)]]
    assert ids_of(tmp_path / "c.parquet") == want and side.counts["selected"] == 108
    np.testing.assert_allclose(pq.read_table(tmp_path / "c.parquet").column("clip_score").to_pylist(),
                               sorted(cs, reverse=True)[:108], rtol=1e-6)
    # DataComp's get_threshold: threshold = -sort(-scores)[int(n · f)], keep scores >= threshold
    # (n·f + 1 rows without ties); --threshold applies `>=` exactly as its load_uids_with_clip_score
    t = -np.sort(-cs)[int(N * 0.3)]
    theirs = {ids[i] for i in np.flatnonzero(cs >= t)}
    select(pool_store, recipe="clip-score", threshold=float(t) - 1e-6, output=tmp_path / "t.parquet")
    assert set(ids_of(tmp_path / "t.parquet")) == theirs and len(theirs) == 109
    assert set(want) < theirs                      # the fraction keeps exactly floor(F·n): one fewer


# --------------------------------------------------------------------------- image-based
def datacomp_image_based(X_pool, ids, T, k, seed, iterations=20):
    """DataComp's image-based baseline written from its code: L2 Lloyd k-means (faiss, niter 20) from
    k seeded sample rows, then `get_centroid_ids_gpu` (argmax ⟨x, c⟩) for targets and pool."""
    P = unit(X_pool)
    rng = np.random.default_rng(seed)
    C = P[np.sort(rng.choice(len(P), size=k, replace=False))].copy()
    labels = None
    for _ in range(iterations):
        d2 = ((P[:, None, :] - C[None, :, :]) ** 2).sum(-1)
        new = d2.argmin(1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                C[c] = P[labels == c].mean(0)
    target_ids = set((unit(T) @ C.T).argmax(1).tolist())
    pool_labels = (P @ C.T).argmax(1)
    return sorted(ids[i] for i in range(len(P)) if pool_labels[i] in target_ids)


def test_image_based_matches_datacomps_procedure(pool_store, tmp_path):
    ids, X, _ = rows(pool_store)
    T = X[[list(ids).index(uid(i)) for i in (3, 50, 200)]]
    side = select(pool_store, recipe="image-based", target="tgt", clusters=12, seed=4, output=tmp_path / "i.parquet")
    got = ids_of(tmp_path / "i.parquet")
    assert got == datacomp_image_based(X, ids, T, 12, 4) and got == sorted(got)
    ib = side.details["image_based"]
    assert ib["clusters"] == 12 and ib["sample"] == N and ib["iterations"] == 20 and 1 <= ib["target_clusters"] <= 3
    assert all(uid(i) in got for i in (3, 50, 200))      # a target's own row is in its cluster
    assert "image_cluster" in pq.read_table(tmp_path / "i.parquet").column_names
    # the default K scales DataComp's 100,000 clusters for 12.8M rows: one per 128 rows
    d = select(pool_store, recipe="image-based", target="tgt", output=tmp_path / "d.txt")
    assert d.details["image_based"]["clusters"] == round(N / 128)
    with pytest.raises(SelectionError, match="no `fraction`"):
        select(pool_store, recipe="image-based", target="tgt", fraction=0.2, output=tmp_path / "x.txt")
    with pytest.raises(SelectionError, match="needs `target`"):
        select(pool_store, recipe="image-based", output=tmp_path / "x.txt")
    with pytest.raises(SelectionError, match="`clusters` must be between"):
        select(pool_store, recipe="image-based", target="tgt", clusters=N + 1, output=tmp_path / "x.txt")


# --------------------------------------------------------------------------- --where
def test_where_narrows_the_pool_before_the_recipe(pool_store, tmp_path):
    ids, X, Y = rows(pool_store)
    width = {uid(i): 100 + (i % 7) * 50 for i in range(N)}
    keep = [i for i in range(N) if width[ids[i]] >= 200]
    cs = np.einsum("ij,ij->i", unit(X), unit(Y))
    side = select(pool_store, recipe="clip-score", where="quality >= 200", output=tmp_path / "w.parquet")
    want = [ids[i] for i in sorted(keep, key=lambda i: (-cs[i], ids[i]))[:count_for(0.3, len(keep))]]
    assert ids_of(tmp_path / "w.parquet") == want
    assert side.counts["pool"] == len(keep) and side.counts["pool_before_where"] == N
    assert side.where == "quality >= 200"
    # kl-guided over the same narrowed pool ranks the same scores as over the whole pool
    full = select(pool_store, recipe="kl-guided", fraction=1.0, output=tmp_path / "all.parquet")
    kl = dict(zip(ids_of(tmp_path / "all.parquet"),
                  pq.read_table(tmp_path / "all.parquet").column("text_info_gain").to_pylist()))
    select(pool_store, recipe="kl-guided", where="quality >= 200", output=tmp_path / "k.parquet")
    sub = [ids[i] for i in keep]
    assert ids_of(tmp_path / "k.parquet") == sorted(sub, key=lambda k: (-kl[k], k))[:count_for(0.25, len(sub))]
    assert full.counts["selected"] == N
    with pytest.raises(SelectionError, match="`where` failed"):
        select(pool_store, recipe="clip-score", where="no_such_column > 1", output=tmp_path / "x.txt")


def test_where_on_semantic_dedup_then_kl_guided(tmp_path, tiny_model):
    """"dedup, then KL-guided" is one command: the planted duplicates keep exactly one row."""
    from clipsql.queries.curation.dedup import semdedup
    img, txt = clip_like(200, np.random.default_rng(8))
    img[1] = img[0] * 2.0
    img[2] = img[0] * 0.5
    st = Store.init(tmp_path / "s")
    ingest(st, str(write_pool(tmp_path / "e.parquet", img, txt)), model=tiny_model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=80, seed=0)
    with pytest.raises(SelectionError, match="run `clipsql dedup STORE"):
        select(st, recipe="kl-guided", where="semdedup_max_sim < 0.99", output=tmp_path / "x.txt")
    semdedup(st, clusters=4, seed=0)
    side = select(st, recipe="kl-guided", fraction=1.0, where="semdedup_max_sim <= 0.99",
                  output=tmp_path / "k.parquet")
    got = set(ids_of(tmp_path / "k.parquet"))
    assert len(got & {uid(0), uid(1), uid(2)}) == 1 and side.counts["pool"] == 198
    con = queries.connect(st)
    dup = {r[0] for r in con.execute("SELECT id FROM semdedup WHERE semdedup_max_sim > 0.99").fetchall()}
    assert got == set(uid(i) for i in range(200)) - dup


# --------------------------------------------------------------------------- datacomp-uids
def test_datacomp_uids_output_round_trips_through_the_resharders_reading(pool_store, tmp_path):
    """Read as DataComp's resharder reads it (written here: np.load of a .npy whose dtype must be
    u8,u8), not through clipsql's own reader."""
    side = select(pool_store, recipe="clip-score", output=tmp_path / "uids.npy")
    assert (tmp_path / "uids.npy").read_bytes()[:6] == b"\x93NUMPY"
    arr = np.load(tmp_path / "uids.npy")
    assert arr.dtype == np.dtype("u8,u8") and side.format == "datacomp-uids"
    assert (np.sort(arr) == arr).all() and len(arr) == side.counts["selected"] == 108
    select(pool_store, recipe="clip-score", output=tmp_path / "same.txt")
    chosen = (tmp_path / "same.txt").read_text().split()
    want = sorted((int(u[:16], 16), int(u[16:], 16)) for u in chosen)
    assert [tuple(int(v) for v in r) for r in arr.tolist()] == want
    meta = json.loads((tmp_path / "uids.npy.json").read_text())
    import hashlib
    assert meta["sha256"] == hashlib.sha256((tmp_path / "uids.npy").read_bytes()).hexdigest()
    with pytest.raises(ClipsqlError, match="writes a .npy file"):
        select(pool_store, recipe="clip-score", format="datacomp-uids", output=tmp_path / "u.parquet")


def test_datacomp_uids_refuses_ids_that_are_not_uids(tmp_path, tiny_model):
    img, txt = clip_like(40, np.random.default_rng(2))
    st = Store.init(tmp_path / "s")
    tbl = pq.read_table(write_pool(tmp_path / "e.parquet", img, txt))
    pq.write_table(tbl.set_column(0, "id", pa.array([f"row-{i}" for i in range(40)])), tmp_path / "e.parquet")
    ingest(st, str(tmp_path / "e.parquet"), model=tiny_model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    with pytest.raises(SelectionError, match="uid"):
        select(st, recipe="clip-score", output=tmp_path / "u.npy")
    assert not (tmp_path / "u.npy").exists()


def test_cli_recipes(pool_store, tmp_path):
    from typer.testing import CliRunner

    from clipsql.cli import app
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("select", pool_store.path, "--recipe", "clip-score", "--where", "quality >= 200", "-o", tmp_path / "a.npy")
    assert r.exit_code == 0 and "(clip-score)" in r.output, r.output
    r = run("select", pool_store.path, "--recipe", "image-based", "--target", "tgt", "--clusters", 6,
            "-o", tmp_path / "b.csv")
    assert r.exit_code == 0, r.output
    r = run("select", pool_store.path, "--recipe", "kl-guided", "--threshold", 0.2, "-o", tmp_path / "c.txt")
    assert r.exit_code == 1 and "--threshold is only used by --recipe clip-score" in r.output
    r = run("select", pool_store.path, "--recipe", "kl-guided", "--include-own-pair", "-o", tmp_path / "k.txt")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k.txt.json").read_text())["recipe_fit"]["own_pair"] == "include"
    r = run("select", pool_store.path, "--recipe", "clip-score", "--include-own-pair", "-o", tmp_path / "c.txt")
    assert r.exit_code == 1 and "--include-own-pair is only used by --recipe kl-guided" in r.output
    r = run("select", pool_store.path, "--recipe", "clip-score", "--where", "nope(", "-o", tmp_path / "c.txt")
    assert r.exit_code == 1 and "--where takes one SQL condition" in r.output and "Traceback" not in r.output


def test_cluster_sums_on_threads_equal_per_label_float64_sums_and_one_thread_bit_for_bit():
    """Several gathered pieces (a label spanning two of them), summed on 1–4 threads: the float64
    sums of each label's rows within 1e-12, and every thread count the same to the last bit."""
    from clipsql.kernels import kmeans
    rng = np.random.default_rng(5)
    n = 2 * kmeans.SUM_ROWS + 1234
    X = rng.standard_normal((n, 6)).astype(np.float32)
    labels = rng.integers(0, 7, n)             # ~19k rows a label: several labels span two pieces
    P = X.astype(np.float64)
    want = np.stack([P[labels == c].sum(0) for c in range(9)])
    one, counts = kmeans.cluster_sums(X, labels, 9, 1)
    np.testing.assert_allclose(one, want, rtol=1e-12, atol=1e-9)
    assert counts.tolist() == np.bincount(labels, minlength=9).tolist() and not one[7:].any()
    for threads in (2, 3, 4):
        sums, c = kmeans.cluster_sums(X, labels, 9, threads)
        assert np.array_equal(sums, one) and np.array_equal(c, counts)


def test_lloyd_kmeans_equals_brute_force_and_ignores_the_chunking():
    from clipsql.kernels import kmeans
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 24)).astype(np.float32)
    P = X.astype(np.float64)
    C = P[np.sort(np.random.default_rng(1).choice(len(P), 20, replace=False))].copy()
    labels = None
    for _ in range(20):
        new = ((P[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for c in range(20):
            if (labels == c).any():
                C[c] = P[labels == c].mean(0)
    for chunk in (65536, 1000, 333):
        np.testing.assert_allclose(kmeans.lloyd(X, 20, seed=1, chunk=chunk), C, atol=1e-6)
    assert (kmeans.assign(X, C) == (P @ C.T).argmax(1)).all()
    for threads in (2, 3):            # threads change nothing, to the last bit
        assert np.array_equal(kmeans.lloyd(X, 20, seed=1, threads=threads), kmeans.lloyd(X, 20, seed=1, threads=1))
        assert (kmeans.assign(X, C, threads=threads) == (P @ C.T).argmax(1)).all()
    with pytest.raises(ValueError, match="k must be between"):
        kmeans.lloyd(X, 0)
