"""Float16 storage of a model (`ingest --storage float16`): the vectors are rounded once, to the
nearest float16, and stored as HALF_FLOAT[d]; everything else (statistics, fits, every score) is
computed from the stored values, widened exactly to float32.

Checked here: the raw Lance column holds exactly the float16-rounded input (read with lance and
numpy alone); every `scores` column of the float16 store equals the same column of a float32 store
of those rounded vectors (so the float32 path's brute-force tests carry over), and a float64 brute
force of the exact scores over the raw column; each score stays within a stated bound of the
float32 store of the unrounded vectors; the statistics equal the stored vectors; the vector bytes
halve; a model keeps its storage (the other one is a one-line error); `doctor --repair` rebuilds it."""
import json
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipsql import queries
from clipsql.cli import app
from clipsql.errors import StorageError
from clipsql.ingest.pipeline import ingest
from clipsql.kernels.arrays import as_stored
from clipsql.store.fits import fit_stats, load_fit
from clipsql.store.store import Store

from conftest import FakeEncoder, assert_stats_match_vectors, clip_like

N, D = 600, 16


def write_parquet(path, img, txt):
    d = img.shape[1]
    pq.write_table(pa.table({
        "id": [f"r{i:04d}" for i in range(len(img))], "caption": [f"caption {i}" for i in range(len(img))],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.astype(np.float32).reshape(-1)), d),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.astype(np.float32).reshape(-1)), d),
    }), path)
    return path


def raw_vectors(st):
    """(ids, image, text) of the store's model table, read with lance and numpy alone (sorted by id),
    in the type the column holds."""
    rec = st.model()
    tbl = lance.dataset(str(st.path / "lance" / f"{rec.table_name}.lance")).to_table().sort_by("id")
    out = []
    for name in ("image_embedding", "text_embedding"):
        col = tbl.column(name).combine_chunks()
        out.append(np.asarray(col.values).reshape(len(col), col.type.list_size))
    return tbl.column("id").to_pylist(), out[0], out[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{float32: the vectors as given, float16: the same stored as float16, rounded32: the
    float16-rounded vectors stored as float32}, each fitted alike, and the input vectors."""
    root = tmp_path_factory.mktemp("f16")
    img, txt = clip_like(N, np.random.default_rng(11), d=D)
    img, txt = img.astype(np.float32), txt.astype(np.float32)
    given = write_parquet(root / "given.parquet", img, txt)
    rounded = write_parquet(root / "rounded.parquet", img.astype(np.float16), txt.astype(np.float16))
    fake = FakeEncoder(root / "fake", dim=D)
    out = {}
    for name, src, storage in (("float32", given, None), ("float16", given, "float16"),
                               ("rounded32", rounded, "float32")):
        st = Store.init(root / name)
        s = ingest(st, str(src), model=fake.model, options=fake.options(id_column="id", storage=storage,
                                                                      batch_size=128))
        assert s.added == N
        fit_stats(st, reference_size=250, seed=3)
        out[name] = st
    return out, img, txt, fake


def scores_of(st):
    con = queries.connect(st)
    try:
        cur = con.execute("SELECT * EXCLUDE (model, uri, caption) FROM scores ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        con.close()
    return [r[0] for r in rows], {n: np.array([r[j] for r in rows], dtype=np.float64)
                                  for j, n in enumerate(names) if n != "id"}


def test_the_column_holds_the_rounded_vectors_and_records_the_storage(stores):
    sts, img, txt, _ = stores
    st = sts["float16"]
    assert st.model().storage == "float16" and sts["float32"].model().storage == "float32"
    assert "storage" not in sts["float32"].model().spec      # float32 records nothing: as before
    ids, X, Y = raw_vectors(st)
    assert X.dtype == np.float16 and Y.dtype == np.float16
    assert ids == [f"r{i:04d}" for i in range(N)]
    np.testing.assert_array_equal(X, img.astype(np.float16))
    np.testing.assert_array_equal(Y, txt.astype(np.float16))
    meta = json.loads(lance.dataset(st.table_uri(st.model().table_name)).schema.metadata[b"clipsql.model"])
    assert meta["spec"]["storage"] == "float16"


def test_statistics_and_fit_are_those_of_the_stored_vectors(stores):
    sts, _, _, _ = stores
    st = sts["float16"]
    assert_stats_match_vectors(st)
    ids, X, Y = raw_vectors(st)
    f, row = load_fit(st, st.model())
    where = {i: j for j, i in enumerate(ids)}
    ref = [where[i] for i in row.arrays["ref_ids"].tolist()]
    np.testing.assert_array_equal(row.arrays["X_ref_raw"].astype(np.float64), X[ref].astype(np.float64))
    np.testing.assert_array_equal(row.arrays["Y_ref_raw"].astype(np.float64), Y[ref].astype(np.float64))
    for R, V in ((f.X_ref, X[ref]), (f.Y_ref, Y[ref])):       # the fit's unit rows
        V = V.astype(np.float64)
        np.testing.assert_allclose(R, V / np.sqrt((V * V).sum(axis=1))[:, None], rtol=1e-12, atol=1e-15)


def test_every_score_equals_float32_storage_of_the_rounded_vectors(stores):
    """The float16 store reads exactly the float32 values a float32 store of the rounded vectors
    holds: every `scores` column is the same number (the float32 path's own tests check those
    against float64 brute force)."""
    sts, _, _, _ = stores
    ids16, s16 = scores_of(sts["float16"])
    ids32, r32 = scores_of(sts["rounded32"])
    assert ids16 == ids32 and set(s16) == set(r32)
    for name in s16:
        np.testing.assert_allclose(s16[name], r32[name], rtol=1e-12, atol=0, equal_nan=True, err_msg=name)


def unit(V):
    V = np.asarray(V, dtype=np.float64)
    return V / np.sqrt((V * V).sum(axis=1))[:, None]


def log_normalize(Z):
    m = Z.max(axis=1, keepdims=True)
    return Z - (m + np.log(np.exp(Z - m).sum(axis=1, keepdims=True)))


def bf_info_gain(Qh, Rh, Qref_h, a, own, reverse=False):
    """docs/science.md §1 for CLIP, float64: KL(π(q) ‖ prior) (reverse: KL(prior ‖ π(q))), π(q) the
    softmax of a·cos(q, r) over the reference rows R, the prior the mean posterior of the reference
    queries; a query that is reference row j (own[i] = j) leaves that row out of both."""
    prior = np.exp(log_normalize(a * Qref_h @ Rh.T)).mean(axis=0)
    logw = a * Qh @ Rh.T
    logp = np.broadcast_to(np.log(prior), logw.shape).copy()
    rows = np.flatnonzero(own >= 0)
    logw[rows, own[rows]] = -np.inf
    logp[rows, own[rows]] = -np.inf
    lp, lq = log_normalize(logw), log_normalize(logp)
    keep = np.isfinite(lp)
    p, q = (np.exp(lq), np.exp(lp)) if reverse else (np.exp(lp), np.exp(lq))
    return np.where(keep, p * (np.where(keep, np.log(np.where(keep, p, 1.0)), 0.0)
                               - np.where(keep, np.log(np.where(keep, q, 1.0)), 0.0)), 0.0).sum(axis=1)


def test_scores_equal_float64_brute_force_of_the_stored_vectors(stores):
    """From the raw float16 column alone (and the fit's reference ids and scale a):
    info gain (both directions; float64 in the implementation: 1e-9 relative) and the scores the SQL
    layer computes over FLOAT vectors (norms, conformity, CLIP score: the float32 path's 1e-6)."""
    sts, _, _, _ = stores
    st = sts["float16"]
    ids, X16, Y16 = raw_vectors(st)
    X, Y = X16.astype(np.float64), Y16.astype(np.float64)
    Xh, Yh = unit(X), unit(Y)
    _, row = load_fit(st, st.model())
    n, a = len(X), row.options["a"]
    assert row.options["prior"] == "posterior-mean" and row.options["kind"] == "clip"
    where = {i: j for j, i in enumerate(ids)}
    ref = np.array([where[i] for i in row.arrays["ref_ids"].tolist()])
    own = np.full(n, -1)
    own[ref] = np.arange(len(ref))
    exact = {
        "image_info_gain": bf_info_gain(Xh, Yh[ref], Xh[ref], a, own),
        "text_info_gain": bf_info_gain(Yh, Xh[ref], Yh[ref], a, own),
        "image_info_gain_reverse": bf_info_gain(Xh, Yh[ref], Xh[ref], a, own, reverse=True),
        "text_info_gain_reverse": bf_info_gain(Yh, Xh[ref], Yh[ref], a, own, reverse=True),
    }
    float32 = {
        "image_raw_norm": (X * X).sum(axis=1), "text_raw_norm": (Y * Y).sum(axis=1),
        "image_conformity": (Xh @ Xh.sum(axis=0) - 1) / (n - 1),
        "text_conformity": (Yh @ Yh.sum(axis=0) - 1) / (n - 1),
        "image_conformity_estimate": Xh @ unit(Xh.mean(axis=0)[None])[0],
        "text_conformity_estimate": Yh @ unit(Yh.mean(axis=0)[None])[0],
        "clip_score": (Xh * Yh).sum(axis=1),
    }
    got_ids, got = scores_of(st)
    assert got_ids == ids
    for name, want in exact.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-12, err_msg=name)
    for name, want in float32.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-9, err_msg=name)


# measured with bench/f16.py (and here): float16 rounding moves each score by at most this much
# (absolute, on the score's own scale); the float32-vs-float16 bound this store is tested within
BOUNDS = {"clip_score": 2e-3, "image_conformity": 1e-3, "text_conformity": 1e-3,
          "image_conformity_estimate": 2e-3, "text_conformity_estimate": 2e-3,
          "image_raw_norm_rel": 2e-3, "text_raw_norm_rel": 2e-3}


def test_every_score_stays_near_float32_storage(stores):
    sts, _, _, _ = stores
    ids16, s16 = scores_of(sts["float16"])
    ids32, s32 = scores_of(sts["float32"])
    assert ids16 == ids32
    for name in s16:
        a, b = s32[name], s16[name]
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        ok = ~np.isnan(a)
        if not ok.any():
            continue
        diff = np.abs(a[ok] - b[ok])
        if name.endswith("raw_norm"):
            assert (diff / a[ok]).max() <= BOUNDS[name + "_rel"], name
        elif name in BOUNDS:
            assert diff.max() <= BOUNDS[name], name
        else:     # fitted scores (info gain, its estimate, centered norms, NegCLIPLoss): relative to their spread
            assert diff.max() <= 2e-2 * np.std(a[ok]), (name, diff.max(), np.std(a[ok]))
            assert np.corrcoef(np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok])))[0, 1] > 0.999, name


def data_bytes(st):
    root = st.path / "lance" / f"{st.model().table_name}.lance" / "data"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_float16_halves_the_vector_bytes(tmp_path):
    d = 256
    img, txt = clip_like(400, np.random.default_rng(5), d=d)
    src = write_parquet(tmp_path / "e.parquet", img, txt)
    fake = FakeEncoder(tmp_path / "fake", dim=d)
    sizes = {}
    for storage in ("float32", "float16"):
        st = Store.init(tmp_path / storage)
        ingest(st, str(src), model=fake.model, options=fake.options(id_column="id", storage=storage))
        sizes[storage] = data_bytes(st)
    assert sizes["float16"] < 0.6 * sizes["float32"], sizes


def test_a_model_keeps_its_storage(tmp_path, stores):
    sts, img, txt, fake = stores
    src = write_parquet(tmp_path / "more.parquet", img[:5] + 1, txt[:5] + 1)
    with pytest.raises(StorageError, match="stored as float16, not float32"):
        ingest(sts["float16"], str(src), model=fake.model, options=fake.options(id_column="id", storage="float32"))
    with pytest.raises(StorageError, match="stored as float32, not float16"):
        ingest(sts["float32"], str(src), model=fake.model, options=fake.options(id_column="id", storage="float16"))
    with pytest.raises(StorageError, match="unknown storage 'bfloat16'"):
        ingest(sts["float32"], str(src), model=fake.model, options=fake.options(id_column="id", storage="bfloat16"))
    # through the command line: one line, exit 1, the flag named
    r = CliRunner().invoke(app, ["ingest", str(sts["float16"].path), str(src), "--model", fake.model,
                                 "--id-column", "id", "--storage", "float32", "--no-progress"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "--storage" in r.output and "float16" in r.output, r.output


def test_values_beyond_float16_are_refused_not_stored_as_inf(tmp_path):
    X = np.array([[1.0, 7.0e4], [np.nan, np.nan]], np.float32)
    with pytest.raises(StorageError, match="beyond float16"):
        as_stored(X, "float16")
    np.testing.assert_array_equal(as_stored(X[1:], "float16"), X[1:])        # NaN rows (NULL) stay
    img, txt = clip_like(20, np.random.default_rng(2), d=D)
    img[3, 0] = 1e5
    src = write_parquet(tmp_path / "big.parquet", img, txt)
    fake = FakeEncoder(tmp_path / "fake", dim=D)
    st = Store.init(tmp_path / "s")
    with pytest.raises(StorageError, match="beyond float16"):
        ingest(st, str(src), model=fake.model, options=fake.options(id_column="id", storage="float16"))
    assert st.embeddings_table(st.model()).count_rows() == 0


def test_repair_rebuilds_the_storage_from_the_table(tmp_path):
    img, txt = clip_like(50, np.random.default_rng(3), d=D)
    src = write_parquet(tmp_path / "e.parquet", img, txt)
    fake = FakeEncoder(tmp_path / "fake", dim=D)
    st = Store.init(tmp_path / "s")
    ingest(st, str(src), model=fake.model, options=fake.options(id_column="id", storage="float16"))
    (st.path / "catalog.sqlite").unlink()
    r = subprocess.run([sys.executable, "-m", "clipsql", "doctor", str(st.path), "--repair"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    again = Store.open(st.path)
    assert again.model().storage == "float16"
    assert_stats_match_vectors(again)
    # and the model takes more rows as float16
    more = write_parquet(tmp_path / "more.parquet", img[:5] + 0.5, txt[:5] + 0.5)
    pq.write_table(pq.read_table(more).set_column(0, "id", pa.array([f"m{i}" for i in range(5)])), more)
    ingest(again, str(more), model=fake.model, options=fake.options(id_column="id"))
    assert raw_vectors(again)[1].dtype == np.float16
    assert_stats_match_vectors(again)


def test_encoded_rows_updates_and_deletes_keep_statistics_exact(tmp_path, fake_encoder):
    """Rows the encoder makes (the writer rounds them), captions re-encoded by --update (their text
    vectors replaced, rounded the same way) and deleted rows: the statistics stay those of the
    stored float16 vectors."""
    import pyarrow.csv as pcsv

    from clipsql.queries.curation.delete import delete_where
    from conftest import write_image_folder
    fake = fake_encoder
    imgs = write_image_folder(tmp_path / "imgs", 12)
    files = sorted(str(p) for p in imgs.glob("*.png"))

    def write_csv(caps):
        pcsv.write_csv(pa.table({"key": [f"k{i}" for i in range(12)], "image": files, "caption": caps}),
                       tmp_path / "data.csv")
    caps = [f"a picture of thing {i}" for i in range(12)]
    write_csv(caps)
    st = Store.init(tmp_path / "s")
    ingest(st, str(tmp_path / "data.csv"), model=fake.model, options=fake.options(id_column="key", storage="float16"))
    ids, X, _ = raw_vectors(st)
    assert X.dtype == np.float16 and ids[0] == "k0"
    assert_stats_match_vectors(st)
    caps[3] = "a corrected caption"
    write_csv(caps)
    s = ingest(st, str(tmp_path / "data.csv"), model=fake.model, options=fake.options(id_column="key", update=True))
    assert s.updated == 1
    ids, _, Y = raw_vectors(st)
    assert Y.dtype == np.float16
    np.testing.assert_array_equal(Y[ids.index("k3")], fake.vector("text", b"a corrected caption").astype(np.float16))
    assert_stats_match_vectors(st)
    delete_where(st, "id IN ('k1', 'k5')")
    assert raw_vectors(st)[1].shape[0] == 10
    assert_stats_match_vectors(st)


def test_a_datacomp_pool_stores_its_float16_features_bit_for_bit(tmp_path):
    """DataComp ships float16 features: stored as float16 they are the npz's values exactly (no
    second rounding), for both models of the pool."""
    from clipsql.ingest.pipeline import IngestOptions, ingest_pool
    from datacomp_pool import write_datacomp_pool
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=[20, 15])
    st = Store.init(tmp_path / "s")
    summaries = ingest_pool(st, tmp_path / "pool", options=IngestOptions(progress=False, storage="float16"))
    assert [s.added for s in summaries] == [35, 35]
    by_uid = {u: (shard, i) for shard in pool.values() for i, u in enumerate(shard["uid"])}
    for feat, model in (("b32", "ViT-B-32/openai"), ("l14", "ViT-L-14/openai")):
        rec = st.model(model)
        assert rec.storage == "float16"
        tbl = lance.dataset(st.table_uri(rec.table_name)).to_table().sort_by("id")
        ids = tbl.column("id").to_pylist()
        for col, key in (("image_embedding", "img"), ("text_embedding", "txt")):
            got = np.asarray(tbl.column(col).combine_chunks().values).reshape(len(ids), -1)
            want = np.stack([by_uid[u][0][f"{feat}_{key}"][by_uid[u][1]] for u in ids])
            assert got.dtype == want.dtype == np.float16
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        assert_stats_match_vectors(st, model)


def test_search_and_vector_indexes_over_a_float16_column(tmp_path):
    """Exact search scores the stored (rounded) vectors; Lance builds both index kinds on a
    HALF_FLOAT column and the index's answers are re-scored from the stored vectors."""
    from clipsql.queries.search.index import build_index
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(40, D)) * 4
    img = (centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, D))).astype(np.float32)
    src = write_parquet(tmp_path / "e.parquet", img, img[::-1].copy())
    fake = FakeEncoder(tmp_path / "fake", dim=D)
    st = Store.init(tmp_path / "s")
    ingest(st, str(src), model=fake.model, options=fake.options(id_column="id", storage="float16"))
    ids, X16, _ = raw_vectors(st)
    X = X16.astype(np.float64)
    Xh = X / np.linalg.norm(X, axis=1, keepdims=True)
    q = 42

    def exact_top(k):
        s = Xh @ Xh[q]
        order = np.lexsort((np.array(ids), -s))[:k]
        return [ids[i] for i in order], s[order]

    sql = f"SELECT id, score FROM nearest((SELECT image_embedding FROM embeddings WHERE id = '{ids[q]}'), 10{{}})"
    con = queries.connect(st)
    rows = con.execute(sql.format(", exact := true")).fetchall()
    want_ids, want_s = exact_top(10)
    assert [r[0] for r in rows] == want_ids
    np.testing.assert_allclose([r[1] for r in rows], want_s, rtol=1e-9)
    con.close()
    for kind in ("ivf_pq", "ivf_hnsw_sq"):
        info = build_index(st, kind=kind, seed=2)
        assert info["recall"] >= 0.9, info
        con = queries.connect(st)
        rows = con.execute(sql.format("")).fetchall()
        con.close()
        got = dict(rows)
        assert len(set(got) & set(want_ids)) >= 8
        s = dict(zip(want_ids, want_s))
        for i in set(got) & set(want_ids):        # re-scored from the stored vectors: the exact cosine
            assert abs(got[i] - s[i]) <= 1e-9
