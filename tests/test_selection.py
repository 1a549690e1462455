"""negCLIPLoss, NormSim, prompts and `clipsql select` through SQL, against brute-force numpy
of each definition (docs/science.md §1, §5–7, §9), on synthetic vectors and on the demo model."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from clipsql import queries
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store.fit_rows import get_fit, latest_fit
from clipsql.store.fits import fit_stats
from clipsql.queries.sql.materialize import materialize_scores
from clipsql.queries.curation.selection import count_for, rank, select
from clipsql.queries.curation.targets import add_target
from clipsql.store.reads import count_rows, read_embeddings
from clipsql.store.runs import start_run
from clipsql.store.targets import get_target, list_targets, remove_target, target_rows
from clipsql.store import catalog as cat
from clipsql.errors import ClipsqlError, SelectionError, StatsError, TargetError
from clipsql.kernels.arrays import to_numpy
from clipsql.store.store import Store
from clipsql.store.writer import write_batch

from conftest import clip_like

D = 16
N = 400
M = 150
TAU = 0.01


def write_precomputed(path, img, txt, start=0):
    n = len(img)
    pq.write_table(pa.table({
        "id": [f"r{i:04d}" for i in range(start, start + n)], "caption": [f"caption {i}" for i in range(n)],
        "url": [f"file:///x/{i}.jpg" for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), img.shape[1]),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), txt.shape[1]),
    }), path)
    return path


@pytest.fixture(scope="module")
def sel_store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("sel")
    img, txt = clip_like(N, np.random.default_rng(11))
    st = Store.init(root / "store")
    ingest(st, str(write_precomputed(root / "e.parquet", img, txt)), model=tiny_model,
           options=IngestOptions(batch_size=128, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=M, seed=3)
    return st


def fetch(con, sql, params=None):
    return con.execute(sql, params or []).fetchall()


def stored(st):
    tbl = read_embeddings(st, st.model()).sort_by("id")
    return (np.array(tbl.column("id").to_pylist()), to_numpy(tbl.column("image_embedding")).astype(np.float64),
            to_numpy(tbl.column("text_embedding")).astype(np.float64))


def unit(X):
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def lse(z):
    m = z.max()
    return m + np.log(np.exp(z - m).sum())


def reference(st):
    arr = latest_fit(st, st.model(), with_reference=True).arrays
    return list(arr["ref_ids"]), unit(arr["X_ref_raw"]), unit(arr["Y_ref_raw"])


def bf_neg_clip(f, g, Fb, Gb, tau=TAU):
    """cos(f,g) − (τ/2)[LSE_j(⟨f,g_j⟩/τ) + LSE_j(⟨f_j,g⟩/τ)], j over the batch (which holds the pair)."""
    return f @ g - tau / 2 * (lse(Gb @ f / tau) + lse(Fb @ g / tau))


def bf_norm_sim_d(X, keep_fraction, steps):
    """NormSim-D (§6) from its definition: starting from every row, `steps` times keep the
    round(f^(s/steps)·n) rows of largest Σ_t ⟨t̂, x̂⟩² over the kept set (ties: the earlier row);
    a row's score is sqrt(Σ_t ⟨t̂, x̂⟩²) over the final set."""
    U = unit(X)
    sq = (U @ U.T) ** 2
    kept = np.arange(len(U))
    for s in range(1, steps + 1):
        count = max(1, int(np.floor(keep_fraction ** (s / steps) * len(U) + 0.5)))
        score = sq[np.ix_(kept, kept)].sum(axis=0)
        kept = np.sort(kept[np.lexsort((kept, -score))[:count]])
    return np.sqrt(sq[kept].sum(axis=0))


def bf_neg_clip_pool(F, G, tau, batch_size, k, seed):
    """negCLIPLoss, pool form (§5), its documented contract: K partitions, each a permutation of
    the rows (numpy default_rng(seed), one permutation per partition) cut into batches of exactly
    |B| (the rest sit that partition out); a row's score is the mean over its batches of
    cos(f, g) − (τ/2)[LSE_j ⟨f, g_j⟩/τ + LSE_j ⟨f_j, g⟩/τ]; NaN for a row never batched."""
    Fh, Gh = unit(F), unit(G)
    rng = np.random.default_rng(seed)
    sums, counts = np.zeros(len(F)), np.zeros(len(F))

    def lse(Z, axis):
        m = Z.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(Z - m).sum(axis=axis, keepdims=True))).squeeze(axis)
    for _ in range(k):
        perm = rng.permutation(len(F))
        for start in range(0, len(F) - batch_size + 1, batch_size):
            b = perm[start:start + batch_size]
            L = Fh[b] @ Gh[b].T / tau
            sums[b] += tau * np.diag(L) - tau / 2 * (lse(L, 1) + lse(L, 0))
            counts[b] += 1
    with np.errstate(invalid="ignore"):
        return sums / counts


def batch_with(i_pos, f, g, Xr, Yr, idx):
    """B = {i} ∪ R (R = reference rows idx), holding i once."""
    keep = [j for j in idx if j != i_pos]
    return np.vstack([f, Xr[keep]]), np.vstack([g, Yr[keep]])


# --------------------------------------------------------------------------- §5 negCLIPLoss
def test_neg_clip_loss_whole_reference_is_exact(sel_store):
    ids, X, Y = stored(sel_store)
    ref_ids, Xr, Yr = reference(sel_store)
    pos = {r: j for j, r in enumerate(ref_ids)}
    assert latest_fit(sel_store, sel_store.model(), with_arrays=False).options["neg_clip"]["batch_size"] == M + 1
    con = queries.connect(sel_store)
    got = np.array([r[0] for r in fetch(con, "SELECT neg_clip_loss(image_embedding, text_embedding) "
                                             "FROM embeddings ORDER BY id")])
    F, G = unit(X), unit(Y)
    want = np.array([bf_neg_clip(F[i], G[i], *batch_with(pos.get(ids[i], -1), F[i], G[i], Xr, Yr, range(M)))
                     for i in range(N)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # reference rows were recognised as such: counting them twice would give another value
    members = [i for i in range(N) if ids[i] in pos]
    assert len(members) == M
    twice = [bf_neg_clip(F[i], G[i], np.vstack([F[i], Xr]), np.vstack([G[i], Yr])) for i in members[:5]]
    assert not np.allclose(got[members[:5]], twice, rtol=1e-6)
    # the scores view carries it too, and the model overload agrees
    view = fetch(con, "SELECT neg_clip_loss FROM scores ORDER BY id LIMIT 5")
    assert [v[0] for v in view] == pytest.approx(list(got[:5]), rel=1e-12)
    mid = sel_store.model().model_id
    assert fetch(con, "SELECT neg_clip_loss(image_embedding, text_embedding, ?) FROM embeddings ORDER BY id "
                      "LIMIT 3", [mid]) == [(v,) for v in got[:3]]


def test_neg_clip_loss_k_seeded_batches_match_brute_force_and_are_deterministic(sel_store):
    st = sel_store
    fit_stats(st, reference_size=M, seed=3, neg_clip={"batch_size": 40, "k": 3, "seed": 5})
    try:
        ids, X, Y = stored(st)
        ref_ids, Xr, Yr = reference(st)
        pos = {r: j for j, r in enumerate(ref_ids)}
        rng = np.random.default_rng(5)
        subsets = [rng.choice(M, size=39, replace=False) for _ in range(3)]
        F, G = unit(X), unit(Y)
        rows = list(range(0, N, 7))
        want = []
        for i in rows:
            r = pos.get(ids[i], -1)
            want.append(np.mean([bf_neg_clip(F[i], G[i], *batch_with(r, F[i], G[i], Xr, Yr, R)) for R in subsets]))
        sql = "SELECT neg_clip_loss(image_embedding, text_embedding) FROM embeddings ORDER BY id"
        got = np.array([v[0] for v in fetch(queries.connect(st), sql)])
        np.testing.assert_allclose(got[rows], want, rtol=1e-9, atol=1e-12)
        again = np.array([v[0] for v in fetch(queries.connect(st), sql)])
        np.testing.assert_array_equal(got, again)                       # same seed → same scores
        fit_stats(st, reference_size=M, seed=3, neg_clip={"batch_size": 40, "k": 3, "seed": 6})
        other = np.array([v[0] for v in fetch(queries.connect(st), sql)])
        assert not np.allclose(got, other)                              # another seed → other batches
    finally:
        fit_stats(st, reference_size=M, seed=3)
    with pytest.raises(StatsError, match="unknown negCLIPLoss option"):
        fit_stats(st, reference_size=M, neg_clip={"batchsize": 3})


def test_neg_clip_loss_pool_form_is_stored_and_exact_for_one_batch(sel_store):
    ids, X, Y = stored(sel_store)
    res = materialize_scores(sel_store, ["clip_score"], neg_clip_loss_pool=True, norm_sim_d=True,
                             pool_batch_size=N)
    assert res.columns == ["clip_score", "neg_clip_loss_pool", "norm_sim_d"]
    assert res.params["neg_clip_loss_pool"]["batch_size"] == N
    con = queries.connect(sel_store)
    got = np.array(fetch(con, "SELECT neg_clip_loss_pool, norm_sim_d FROM stored_scores ORDER BY id"))
    F, G = unit(X), unit(Y)
    want = [bf_neg_clip(F[i], G[i], F, G) for i in range(N)]          # one batch = the whole pool
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[:, 1], bf_norm_sim_d(X, keep_fraction=0.2, steps=5), rtol=1e-9)
    # batches of exactly |B|: 400 // 150 = 2 per partition, 100 rows sit each partition out
    res = materialize_scores(sel_store, [], neg_clip_loss_pool=True, pool_batch_size=150, seed=9)
    p = res.params["neg_clip_loss_pool"]
    assert p["batches_per_partition"] == 2 and p["seed"] == 9 and p["k"] == 10
    got = np.array([r[0] for r in fetch(queries.connect(sel_store),
                                        "SELECT neg_clip_loss_pool FROM stored_scores ORDER BY id")], dtype=float)
    want = bf_neg_clip_pool(X, Y, tau=TAU, batch_size=150, k=10, seed=9)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert int(np.isnan(got).sum()) == p["rows_never_batched"]
    meta = json.loads(sel_store.db.open_table("scores_" + sel_store.model().table_name).schema.metadata[b"clipsql"])
    assert meta["neg_clip_loss_pool"]["batch_size"] == 150
    with pytest.raises(ClipsqlError, match="`pool_batch_size` must be between"):
        materialize_scores(sel_store, [], neg_clip_loss_pool=True, pool_batch_size=N + 1)


def test_the_pool_form_runs_on_every_core_with_a_progress_bar(sel_store, monkeypatch, capsys):
    """The negCLIPLoss pool pass runs its chunks on every core (one BLAS thread each, so they do not
    oversubscribe the cores), not on the one thread the DuckDB-UDF pin left it, and reports progress."""
    import os
    from threadpoolctl import threadpool_info
    from clipsql.kernels import scores as kernel
    from clipsql.queries.sql import materialize

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    seen, real = {}, kernel.neg_clip_loss_pool

    def spy(*args, **kw):
        seen["blas"], seen["workers"] = blas_threads(), kw.get("workers")
        steps = []
        out = real(*args, **{**kw, "progress": lambda n: (steps.append(n), kw["progress"](n))})
        seen["rows"] = sum(steps)
        return out
    monkeypatch.setattr(kernel, "neg_clip_loss_pool", spy)
    materialize_scores(sel_store, ["clip_score"], neg_clip_loss_pool=True, pool_batch_size=150, progress=True)
    assert seen["workers"] == materialize.pool_threads() == min(8, len(os.sched_getaffinity(0)))
    assert set(seen["blas"]) <= {1}                          # one BLAS thread under each of those threads
    assert seen["rows"] == 10 * 2 * 150                       # K partitions of 2 batches of 150
    err = capsys.readouterr().err
    assert "neg_clip_loss_pool" in err and "3.00k/3.00k" in err


@pytest.fixture(scope="module")
def siglip_store(tmp_path_factory, tiny_siglip):
    root = tmp_path_factory.mktemp("sig")
    img, txt = clip_like(120, np.random.default_rng(2))
    st = Store.init(root / "store")
    ingest(st, str(write_precomputed(root / "e.parquet", img, txt)), model=tiny_siglip,
           options=IngestOptions(batch_size=128, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=60, seed=1)
    return st


def test_neg_siglip_loss_uses_the_models_scale_and_bias(siglip_store, sel_store):
    st = siglip_store
    rec = st.model()
    assert rec.kind == "siglip" and rec.logit_bias == pytest.approx(-10.0)
    ids, X, Y = stored(st)
    ref_ids, Xr, Yr = reference(st)
    pos = {r: j for j, r in enumerate(ref_ids)}
    a, b = rec.logit_scale, rec.logit_bias
    logsig = lambda z: -np.logaddexp(0.0, -z)  # noqa: E731
    F, G = unit(X), unit(Y)
    want = []
    for i in range(len(ids)):
        keep = [j for j in range(len(Xr)) if j != pos.get(ids[i], -1)]
        want.append(logsig(a * F[i] @ G[i] + b) + 0.5 * (logsig(-(a * Yr[keep] @ F[i] + b)).sum()
                                                         + logsig(-(a * Xr[keep] @ G[i] + b)).sum()))
    got = [r[0] for r in fetch(queries.connect(st), "SELECT neg_siglip_loss(image_embedding, text_embedding) "
                                                    "FROM embeddings ORDER BY id")]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    with pytest.raises(Exception, match="needs a SigLIP model"):
        fetch(queries.connect(sel_store), "SELECT neg_siglip_loss(image_embedding, text_embedding) FROM embeddings")


# --------------------------------------------------------------------------- §6 NormSim and targets
def test_norm_sim_through_a_target_equals_brute_force(sel_store):
    ids, X, _ = stored(sel_store)
    res = add_target(sel_store, "tgt-a", query="SELECT image_embedding FROM embeddings WHERE id < 'r0080'")
    assert res.n == 80 and res.index == "exact"
    T = unit(X[:80])
    con = queries.connect(sel_store)
    got = np.array(fetch(con, "SELECT norm_sim_2(image_embedding, 'tgt-a'), norm_sim_inf(image_embedding, "
                              "'tgt-a') FROM embeddings ORDER BY id"))
    Q = unit(X)
    brute2 = np.sqrt(((Q @ T.T) ** 2).sum(axis=1))                      # ‖F_t x̂‖₂
    second = T.T @ T / len(T)                                            # uncentred second moment
    np.testing.assert_allclose(got[:, 0], brute2, rtol=1e-6)
    np.testing.assert_allclose(got[:, 0] ** 2, len(T) * np.einsum("ij,jk,ik->i", Q, second, Q), rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], np.abs(Q @ T.T).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(got[:80, 1], 1.0, rtol=1e-6)             # a target row is its own nearest
    np.testing.assert_allclose(get_target(sel_store, "tgt-a").second_moment, T.T @ T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(target_rows(sel_store, get_target(sel_store, "tgt-a")), T, atol=1e-6)


def test_ann_index_recall_is_measured_and_recorded(sel_store):
    res = add_target(sel_store, "tgt-ann", query="SELECT image_embedding FROM embeddings WHERE id >= 'r0100'",
                     index="ann", seed=4)
    t = get_target(sel_store, "tgt-ann")
    idx = t.options["index"]
    assert res.index == "ann" and idx["queries"] == "pool images" and idx["sample"] == N
    assert 0.5 <= idx["recall_at_1"] <= 1.0 and idx["kind"] == "IVF_FLAT"
    assert [r.recall_at_1 for r in list_targets(sel_store) if r.name == "tgt-ann"] == [idx["recall_at_1"]]
    _, X, _ = stored(sel_store)
    exact = np.abs(unit(X) @ unit(X[100:]).T).max(axis=1)
    got = np.array([r[0] for r in fetch(queries.connect(sel_store), "SELECT norm_sim_inf(image_embedding, "
                                                                    "'tgt-ann') FROM embeddings ORDER BY id")])
    assert (got <= exact + 1e-6).all()                     # ANN can only miss the maximum (float32 rows)
    assert np.mean(np.abs(got - exact) <= 1e-6) == pytest.approx(idx["recall_at_1"], abs=0.02)
    remove_target(sel_store, "tgt-ann")


def test_target_errors_are_clear(sel_store):
    con = queries.connect(sel_store)
    with pytest.raises(Exception, match="unknown target 'nope'.*clipsql target add"):
        fetch(con, "SELECT norm_sim_2(image_embedding, 'nope') FROM embeddings")
    with pytest.raises(TargetError, match="would be empty"):
        add_target(sel_store, "empty", query="SELECT image_embedding FROM embeddings WHERE false")
    zero = "[" + ", ".join(["0"] * D) + f"]::FLOAT[{D}]"
    with pytest.raises(TargetError, match="would be empty"):
        add_target(sel_store, "zeros", query=f"SELECT {zero} AS image_embedding")
    assert "empty" not in [t.name for t in list_targets(sel_store)]
    with pytest.raises(TargetError, match="must return a column named image_embedding"):
        add_target(sel_store, "x", query="SELECT id FROM embeddings")
    with pytest.raises(TargetError, match="exactly one of"):
        add_target(sel_store, "x")
    with pytest.raises(TargetError, match="must be 1-100"):
        add_target(sel_store, "bad name", query="SELECT image_embedding FROM embeddings")
    add_target(sel_store, "tmp", query="SELECT image_embedding FROM embeddings LIMIT 5")
    with pytest.raises(TargetError, match="already exists"):
        add_target(sel_store, "tmp", query="SELECT image_embedding FROM embeddings LIMIT 5")
    assert add_target(sel_store, "tmp", query="SELECT image_embedding FROM embeddings LIMIT 7",
                      replace=True).n == 7
    remove_target(sel_store, "tmp")
    with pytest.raises(TargetError, match="unknown target 'tmp'"):
        remove_target(sel_store, "tmp")


def test_target_from_a_source_encodes_its_images(sel_store, tmp_path):
    from conftest import write_image_folder
    folder = write_image_folder(tmp_path / "imgs", 6)
    (folder / "img0000.txt").unlink()                                    # captions are not needed
    res = add_target(sel_store, "from-images", source=str(folder), model=sel_store.model().model_id)
    assert res.n == 6 and res.source.startswith("source:")
    from PIL import Image

    from clipsql.models.prompts import encode_images, load_for_record
    want = encode_images(load_for_record(sel_store.model()), [Image.open(p).convert("RGB")
                                                             for p in sorted(folder.glob("*.png"))])
    np.testing.assert_allclose(target_rows(sel_store, get_target(sel_store, "from-images")), unit(want), atol=1e-5)
    remove_target(sel_store, "from-images")


# --------------------------------------------------------------------------- §7 prompts, on the demo model
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from clipsql.ingest.demo import write_dataset
    root = tmp_path_factory.mktemp("demo-sel")
    st = Store.init(root / "store")
    ingest(st, str(write_dataset(root / "data", n=120, seed=2)), model="clipsql-demo",
           options=IngestOptions(batch_size=64, workers=0, progress=False))
    fit_stats(st, reference_size=80, seed=0)
    return st


def test_text_embedding_is_the_text_tower_cached_per_prompt(demo_store):
    import duckdb

    from clipsql.queries.sql.db import register_views
    from clipsql.queries.sql.functions import register
    from clipsql.store.snapshot import Snapshot
    con = duckdb.connect()
    snap = Snapshot.read(demo_store)           # the views and the functions: one snapshot
    register_views(con, snap)
    ctx = register(con, snap)
    dim = demo_store.model().dim
    assert fetch(con, "SELECT typeof(text_embedding('a photo of nothing at all'))") == [(f"FLOAT[{dim}]",)]
    # the prompt's embedding is the stored text embedding of the same caption (same tower, same raw vector)
    rows = fetch(con, "SELECT list_cosine_similarity(text_embedding(s.caption), e.text_embedding), "
                      "list_distance(text_embedding(s.caption), e.text_embedding) / sqrt(list_dot_product("
                      "e.text_embedding, e.text_embedding)) FROM samples s JOIN embeddings e USING (id)")
    cos, rel = np.array(rows).T
    assert cos.min() > 1 - 1e-6 and rel.max() < 1e-3
    distinct = fetch(con, "SELECT count(DISTINCT caption) FROM samples")[0][0]
    assert ctx.prompts.encoded == distinct                              # (typeof only binds, runs nothing)
    fetch(con, "SELECT list_dot_product(image_embedding, text_embedding('a photo of nothing at all')), "
               "importance_weight(image_embedding, 'a photo of nothing at all') FROM embeddings")
    assert ctx.prompts.encoded == distinct + 1                           # one prompt, encoded once
    fetch(con, "SELECT importance_weight(image_embedding, 'an empty white page', 3.0) FROM embeddings")
    assert ctx.prompts.encoded == distinct + 2
    fetch(con, "SELECT text_embedding('an empty white page'), text_embedding(caption) FROM samples")
    assert ctx.prompts.encoded == distinct + 2                           # cached per connection


def test_importance_weight_is_the_density_ratio_with_mean_one_over_the_reference(demo_store):
    st = demo_store
    ref_ids, Xr, _ = reference(st)
    ids, X, _ = stored(st)
    con = queries.connect(st)
    yq = np.array(fetch(con, "SELECT text_embedding('a small green triangle')")[0][0], dtype=np.float64)
    yq /= np.linalg.norm(yq)
    for a, call in ((10.0, "importance_weight(image_embedding, 'a small green triangle')"),
                    (3.0, "importance_weight(image_embedding, 'a small green triangle', 3.0)"),
                    (3.0, f"importance_weight(image_embedding, 'a small green triangle', 3, "
                          f"'{st.model().model_id}')")):
        got = np.array([r[0] for r in fetch(con, f"SELECT {call} FROM embeddings ORDER BY id")])
        want = np.exp(a * unit(X) @ yq) / np.mean(np.exp(a * Xr @ yq))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        ref = set(ref_ids)
        assert np.mean(got[[i for i, k in enumerate(ids) if k in ref]]) == pytest.approx(1.0, rel=1e-9)


def test_unknown_or_unloadable_prompt_model_is_a_clear_error(demo_store, tmp_path):
    con = queries.connect(demo_store)
    with pytest.raises(Exception, match="model 'nope' is not in this store"):
        fetch(con, "SELECT text_embedding('x', 'nope')")
    st = Store.init(tmp_path / "s")
    st.register_model(model_id="hf-hub:nobody/precomputed-only", kind="clip", dim=16, logit_scale=100.0,
                      logit_bias=None, context_length=None,
                      spec={"open_clip_name": "hf-hub:nobody/precomputed-only", "pretrained": None, "local": False,
                            "given": None})
    with pytest.raises(Exception, match="cannot load the text tower of model hf-hub:nobody/precomputed-only"):
        fetch(queries.connect(st), "SELECT text_embedding('x')")


# --------------------------------------------------------------------------- §9 selection
def test_count_and_tie_rule():
    assert count_for(0.29, 100) == 29 and count_for(0.3, 401) == 120 and count_for(1, 7) == 7
    ids = np.array(["b", "a", "d", "c", "e"])
    s = np.array([1.0, 1.0, np.nan, 2.0, 1.0])
    assert list(ids[rank(ids, s)]) == ["c", "a", "b", "e"]


def paper_kl_guided(ids, Y, ref_ids, Xref_raw, a, fraction, own_pair_out=False):
    """The density-ratio paper's D_KL selection, written independently of clipsql's kernels: for each
    caption the posterior over the reference images π = softmax(a·⟨ŷ, x̂_j⟩), D_KL(π ‖ U) = log M − H(π),
    keep the top `fraction` (ties by id). `own_pair_out` (docs/science.md §1, §9): a caption whose row
    is reference row j takes j out of π and of U (U over the other M − 1)."""
    Xh = unit(Xref_raw)
    where = {r: j for j, r in enumerate(list(ref_ids))}
    kl = []
    for i, y in zip(ids, unit(Y)):
        R = np.delete(Xh, where[i], axis=0) if own_pair_out and i in where else Xh
        z = a * (R @ y)
        logp = z - lse(z)
        kl.append(np.log(len(R)) + float(np.exp(logp) @ logp))
    kl = np.array(kl)
    order = sorted(range(len(ids)), key=lambda i: (-kl[i], ids[i]))
    return [ids[i] for i in order[:int(np.floor(fraction * len(ids)))]], dict(zip(ids, kl))


def test_kl_guided_is_the_papers_selection_on_its_own_fit(sel_store, tmp_path):
    """§9: the recipe runs at the model's logit scale with the uniform prior, on a fit it makes
    (seeded like the default fit) without touching the default fit. With --include-own-pair the
    chosen quarter equals an independent implementation of the paper's (the authors') selection
    exactly (overlap 1.0, same order); by default it equals one of the rule that a caption drawn into
    the reference leaves its own pair out (§1)."""
    st = sel_store
    default_before = latest_fit(st, st.model(), with_arrays=False)
    out = tmp_path / "kl.parquet"
    side = select(st, recipe="kl-guided", include_own_pair=True, output=out)
    rec = st.model()
    made = side.recipe_fit
    assert made.made and made.prior == "uniform" and made.a == pytest.approx(rec.logit_scale)
    assert made.seed == 3 and made.fit_id != default_before.fit_id
    assert latest_fit(st, rec, with_arrays=False).fit_id == default_before.fit_id   # scores view unchanged
    assert side.statistics["fit_id"] == made.fit_id and side.statistics["recipe"] == "kl-guided"
    ids, _, Y = stored(st)
    ref = get_fit(st, made.fit_id, with_reference=True).arrays
    # the recipe's reference sample is the default fit's rows (same seed and size)
    assert list(ref["ref_ids"]) == list(latest_fit(st, rec, with_reference=True).arrays["ref_ids"])
    want, kl = paper_kl_guided(list(ids), Y, ref["ref_ids"], ref["X_ref_raw"], rec.logit_scale, 0.25)
    tbl = pq.read_table(out)
    got = tbl.column("id").to_pylist()
    assert len(set(got) & set(want)) / len(want) == 1.0 and got == want
    np.testing.assert_allclose(tbl.column("text_info_gain").to_pylist(), [kl[k] for k in want], rtol=1e-9)
    assert tbl.column_names == ["id", "uri", "caption", "text_info_gain"]
    meta = json.loads((tmp_path / "kl.parquet.json").read_text())
    assert meta["recipe"] == "kl-guided" and meta["counts"] == {"pool": N, "requested": 100, "null_scores": 0,
                                                                "selected": 100}
    assert meta["recipe_fit"]["settings"] == {"a": rec.logit_scale, "b": 0.0, "prior": "uniform"}
    assert meta["fraction"] == 0.25 and "ties by id" in meta["ties"] and meta["options"]["make_fit"] is True
    assert meta["recipe_fit"]["own_pair"] == "include" and meta["options"]["include_own_pair"] is True
    # a second run reuses the recipe's fit; the selection is byte-identical
    again = select(st, recipe="kl-guided", include_own_pair=True, output=tmp_path / "kl2.parquet")
    assert not again.recipe_fit.made and again.recipe_fit.fit_id == made.fit_id
    assert pq.read_table(tmp_path / "kl2.parquet").equals(tbl)
    # the default: reference captions leave their own pair out, on the same fit
    new = select(st, recipe="kl-guided", output=tmp_path / "kl3.parquet")
    assert new.recipe_fit.fit_id == made.fit_id and new.recipe_fit.own_pair == "exclude"
    want_new, kl_new = paper_kl_guided(list(ids), Y, ref["ref_ids"], ref["X_ref_raw"], rec.logit_scale, 0.25,
                                       own_pair_out=True)
    t3 = pq.read_table(tmp_path / "kl3.parquet")
    assert t3.column("id").to_pylist() == want_new and want_new != want
    np.testing.assert_allclose(t3.column("text_info_gain").to_pylist(), [kl_new[k] for k in want_new], rtol=1e-9)
    in_ref = set(ref["ref_ids"].tolist())
    assert sum(k in in_ref for k in want_new) < sum(k in in_ref for k in want)


def scale100_store(path, img, txt, ids):
    """A store whose model has CLIP's logit scale a = 100 (vectors written as they are)."""
    st = Store.init(path)
    rec = st.register_model(model_id="clip-a100", kind="clip", dim=img.shape[1], logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={})
    write_batch(st, rec, samples=None, ids=list(ids), image=img, text=txt,
                run_id=start_run(st.engine, rec.model_id, "src", "precomputed"), source="src", rejects=[], meta_types={})
    return st


def leave_own_pair_out_kl(Q, R):
    """D_KL(π ‖ U) of row i against the rows of R other than row i: log(M − 1) − H(π), a = 100."""
    out = []
    for i, q in enumerate(unit(Q)):
        z = 100.0 * (np.delete(unit(R), i, axis=0) @ q)
        logp = z - lse(z)
        out.append(np.log(len(R) - 1) + float(np.exp(logp) @ logp))
    return np.array(out)


def test_reference_rows_leave_their_own_pair_out_in_sql_stored_scores_and_kl_guided(tmp_path):
    """The defect: a reference row's own pair stayed in its posterior, so at a = 100 with the uniform
    prior every reference row scored ln M (here all 300 rows, the whole store being the reference)
    and kl-guided mostly selected its own reference sample. Now (docs/science.md §1): the `scores`
    view and stored scores equal log(M − 1) − H over the other rows; a reference row scores as its
    vectors under a new id against a reference without it; reference rows take about their 25%
    share of a kl-guided selection (with the own pair kept in: 89%)."""
    n, d, rng = 300, 32, np.random.default_rng(4)
    shared = 3.0 * np.eye(d)[0] + rng.normal(size=(n, d)) * np.linspace(1.5, 0.2, d)    # CLIP-like offset
    img = shared + 0.3 * rng.normal(size=(n, d))
    txt = shared + 0.6 * rng.normal(size=(n, d))
    ids = [f"r{i:04d}" for i in range(n)]
    st = scale100_store(tmp_path / "a", img.astype(np.float32), txt.astype(np.float32), ids)
    fit_stats(st, reference_size=n, scale="model", prior="uniform")           # reference = every row
    want_t = leave_own_pair_out_kl(txt.astype(np.float32), img.astype(np.float32))
    want_i = leave_own_pair_out_kl(img.astype(np.float32), txt.astype(np.float32))
    con = queries.connect(st)
    rows = fetch(con, "SELECT text_info_gain, image_info_gain FROM scores ORDER BY id")
    got_t, got_i = np.array(rows).T
    np.testing.assert_allclose(got_t, want_t, rtol=1e-9)
    np.testing.assert_allclose(got_i, want_i, rtol=1e-9)
    assert np.mean(np.abs(got_t - np.log(n)) < 1e-2) < 0.5       # was: 95% of the rows
    materialize_scores(st, ["text_info_gain", "image_info_gain"])
    stored_rows = fetch(queries.connect(st), "SELECT text_info_gain, image_info_gain FROM stored_scores ORDER BY id")
    np.testing.assert_allclose(np.array(stored_rows), np.array(rows), rtol=1e-12)
    # row 7 scores as its own vectors under a new id against a reference that lacks row 7
    keep = np.arange(n) != 7
    other = scale100_store(tmp_path / "b", img[keep].astype(np.float32), txt[keep].astype(np.float32),
                           [ids[i] for i in np.flatnonzero(keep)])
    fit_stats(other, reference_size=n, scale="model", prior="uniform")
    rec = other.model()
    write_batch(other, rec, samples=None, ids=["new"], image=img[[7]].astype(np.float32),
                text=txt[[7]].astype(np.float32), run_id=start_run(other.engine, rec.model_id, "src", "precomputed"),
                source="src", rejects=[], meta_types={})
    new = fetch(queries.connect(other), "SELECT text_info_gain, image_info_gain FROM scores WHERE id = 'new'")[0]
    np.testing.assert_allclose(new, rows[7], rtol=1e-9)
    # kl-guided over a reference of 75 of the 300 rows: reference rows take about their 25% share
    shares = {}
    for incl in (False, True):
        side = select(st, recipe="kl-guided", reference_size=75, include_own_pair=incl, output=tmp_path / f"{incl}.txt")
        ref_ids = set(get_fit(st, side.recipe_fit.fit_id, with_reference=True).arrays["ref_ids"].tolist())
        chosen = (tmp_path / f"{incl}.txt").read_text().split()
        shares[incl] = sum(i in ref_ids for i in chosen) / len(chosen)
    assert 0.12 < shares[False] < 0.38 and shares[True] > 0.7, shares
    # the authors' behaviour for the scores view is an explicit, recorded fit option
    fit_stats(st, reference_size=n, scale="model", prior="uniform", own_pair="include")
    assert latest_fit(st, st.model(), with_arrays=False).options["own_pair"] == "include"
    kept_in = np.array(fetch(queries.connect(st), "SELECT text_info_gain FROM scores ORDER BY id"))[:, 0]
    assert np.mean(np.abs(kept_in - np.log(n)) < 1e-2) > 0.9
    with pytest.raises(StatsError, match="`own_pair` must be one of"):
        fit_stats(st, own_pair="sometimes")


def test_kl_guided_refuses_without_its_fit_naming_the_command(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from clipsql.cli import app
    img, txt = clip_like(120, np.random.default_rng(5))
    st = Store.init(tmp_path / "s")
    ingest(st, str(write_precomputed(tmp_path / "e.parquet", img, txt)), model=tiny_model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=50, seed=9)
    with pytest.raises(SelectionError, match=r"run `clipsql stats fit STORE --model .* --for-recipe kl-guided "
                                             r"--reference-size 50 --seed 9`"):
        select(st, recipe="kl-guided", make_fit=False, output=tmp_path / "x.txt")
    ro = Store.open(st.path, read_only=True)
    with pytest.raises(SelectionError, match="--for-recipe kl-guided"):
        select(ro, recipe="kl-guided", output=tmp_path / "x.txt")
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("select", st.path, "--recipe", "kl-guided", "--no-make-fit", "-o", tmp_path / "x.txt")
    assert r.exit_code == 1 and "--for-recipe kl-guided" in r.output and "Traceback" not in r.output
    r = run("stats", "fit", st.path, "--for-recipe", "kl-guided", "--reference-size", 50, "--seed", 9)
    assert r.exit_code == 0 and "for kl-guided" in r.output, r.output
    r = run("select", st.path, "--recipe", "kl-guided", "--no-make-fit", "-o", tmp_path / "x.txt")
    assert r.exit_code == 0 and "selected 30 of 120" in r.output, r.output
    assert latest_fit(st, st.model(), with_arrays=False).options["prior"] == "posterior-mean"
    # a default fit that already has the recipe's settings is used as it is
    fit_stats(st, reference_size=50, seed=9, scale="model", prior="uniform")
    side = select(st, recipe="kl-guided", make_fit=False, output=tmp_path / "y.txt")
    assert side.recipe_fit.fit == "default fit"
    assert (tmp_path / "x.txt").read_text() == (tmp_path / "y.txt").read_text()
    r = run("stats", "fit", st.path, "--reference-size", 50, "--include-own-pair")
    assert r.exit_code == 0 and latest_fit(st, st.model(), with_arrays=False).options["own_pair"] == "include"


def test_negclip_normsim_recipe_and_determinism(sel_store, tmp_path):
    if "tgt-a" not in [t.name for t in list_targets(sel_store)]:
        add_target(sel_store, "tgt-a", query="SELECT image_embedding FROM embeddings WHERE id < 'r0080'")
    a = select(sel_store, recipe="negclip-normsim", target="tgt-a", output=tmp_path / "a.csv")
    b = select(sel_store, recipe="negclip-normsim", target="tgt-a", output=tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    con = queries.connect(sel_store)
    rows = fetch(con, "SELECT id, neg_clip_loss, norm_sim_inf(image_embedding, 'tgt-a') FROM scores "
                      "JOIN embeddings USING (id)")
    nc = {r[0]: r[1] for r in rows}
    ns = {r[0]: r[2] for r in rows}
    stage1 = sorted(nc, key=lambda k: (-nc[k], k))[:120]
    want = sorted(stage1, key=lambda k: (-ns[k], k))[:80]
    import pyarrow.csv as pcsv
    got = pcsv.read_csv(tmp_path / "a.csv")
    assert got.column("id").to_pylist() == want
    assert got.column_names == ["id", "uri", "caption", "neg_clip_loss", "norm_sim_inf"]
    assert a.counts["stage1"] == 120 and a.counts["selected"] == 80 and a.details["target"]["name"] == "tgt-a"
    assert a.counts == b.counts
    # fractions are configurable; --limit cuts to an exact count; txt is one id per line
    c = select(sel_store, recipe="negclip-normsim", target="tgt-a", first_fraction=0.5, limit=7,
               output=tmp_path / "c.txt")
    assert c.counts["stage1"] == 200
    assert (tmp_path / "c.txt").read_text().splitlines() == \
        sorted(sorted(nc, key=lambda k: (-nc[k], k))[:200], key=lambda k: (-ns[k], k))[:7]


def test_negclip_normsim_with_the_stored_pool_form(sel_store, tmp_path):
    if "tgt-a" not in [t.name for t in list_targets(sel_store)]:
        add_target(sel_store, "tgt-a", query="SELECT image_embedding FROM embeddings WHERE id < 'r0080'")
    materialize_scores(sel_store, ["clip_score"])
    with pytest.raises(SelectionError, match="clipsql score STORE --neg-clip-loss-pool"):
        select(sel_store, recipe="negclip-normsim", target="tgt-a", negclip_form="pool", output=tmp_path / "x.txt")
    materialize_scores(sel_store, [], neg_clip_loss_pool=True, pool_batch_size=N)
    side = select(sel_store, recipe="negclip-normsim", target="tgt-a", negclip_form="pool",
                  output=tmp_path / "p.parquet")
    con = queries.connect(sel_store)
    pool = dict(fetch(con, "SELECT id, neg_clip_loss_pool FROM stored_scores"))
    ns = dict(fetch(con, "SELECT id, norm_sim_inf(image_embedding, 'tgt-a') FROM embeddings"))
    stage1 = sorted(pool, key=lambda k: (-pool[k], k))[:120]
    tbl = pq.read_table(tmp_path / "p.parquet")
    assert tbl.column("id").to_pylist() == sorted(stage1, key=lambda k: (-ns[k], k))[:80]
    assert "neg_clip_loss_pool" in tbl.column_names and side.details["negclip_form"] == "pool"


def test_sql_selection_keeps_the_sql_order(sel_store, tmp_path):
    side = select(sel_store, sql="SELECT id, clip_score FROM scores ORDER BY clip_score, id", fraction=0.1,
                  output=tmp_path / "s.parquet")
    cs = dict(fetch(queries.connect(sel_store), "SELECT id, clip_score FROM scores"))
    want = sorted(cs, key=lambda k: (cs[k], k))[:40]
    assert pq.read_table(tmp_path / "s.parquet").column("id").to_pylist() == want
    assert side.recipe == "sql" and side.counts["selected"] == 40


def test_selection_errors(sel_store, tmp_path):
    out = tmp_path / "x.parquet"
    cases = [
        (dict(sql="SELECT clip_score FROM scores", output=out), "must return a column named id"),
        (dict(recipe="kl-guided", fraction=0.1, limit=3, output=out), "not both"),
        (dict(recipe="kl-guided", output=tmp_path / "x.xlsx"), "must end in"),
        (dict(recipe="nope", output=out), "unknown recipe"),
        (dict(recipe="negclip-normsim", output=out), "needs `target`"),
        (dict(recipe="negclip-normsim", target="nope", output=out), "unknown target 'nope'"),
        (dict(recipe="negclip-normsim", target="tgt-a", fraction=0.4, output=out), "exceeds `first_fraction`"),
        (dict(recipe="kl-guided", fraction=1.5, output=out), r"must be in \(0, 1\]"),
    ]
    if "tgt-a" not in [t.name for t in list_targets(sel_store)]:
        add_target(sel_store, "tgt-a", query="SELECT image_embedding FROM embeddings WHERE id < 'r0080'")
    for kwargs, msg in cases:
        with pytest.raises(ClipsqlError, match=msg):
            select(sel_store, **kwargs)
    assert not out.exists()


def test_cli_target_select_and_score(sel_store, tmp_path):
    from typer.testing import CliRunner

    from clipsql.cli import app
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    path = sel_store.path
    r = run("target", "add", path, "cli-t", "--query", "SELECT image_embedding FROM embeddings LIMIT 30")
    assert r.exit_code == 0 and "30 rows" in r.output, r.output
    r = run("target", "list", path)
    assert "cli-t" in r.output and "n=30" in r.output
    r = run("select", path, "--recipe", "negclip-normsim", "--target", "cli-t", "--fraction", "0.1",
            "--output", tmp_path / "o.txt")
    assert r.exit_code == 0 and "selected 40 of 400" in r.output, r.output
    assert len((tmp_path / "o.txt").read_text().splitlines()) == 40
    assert json.loads((tmp_path / "o.txt.json").read_text())["target"]["n"] == 30
    r = run("select", path, "--recipe", "negclip-normsim", "--target", "missing", "--output", tmp_path / "p.txt")
    assert r.exit_code == 1 and "unknown target 'missing'" in r.output
    r = run("score", path, "--neg-clip-loss-pool", "--pool-batch-size", "100")
    assert r.exit_code == 0 and "neg_clip_loss_pool" in r.output, r.output
    r = run("target", "rm", path, "cli-t")
    assert r.exit_code == 0 and "removed target cli-t" in r.output
    with sel_store.engine.connect() as conn:
        assert conn.execute(sa.select(cat.targets.c.name).where(cat.targets.c.name == "cli-t")).first() is None


def test_scores_view_has_neg_siglip_loss_for_siglip_and_null_for_clip(siglip_store, sel_store):
    """the SigLIP `scores` view carries neg_siglip_loss (equal to the function)."""
    got = fetch(queries.connect(siglip_store), "SELECT s.neg_siglip_loss, neg_siglip_loss(e.image_embedding, "
                "e.text_embedding) FROM scores s JOIN embeddings e USING (id) ORDER BY id")
    assert len(got) == 120 and all(a is not None and a == pytest.approx(b, rel=1e-12) for a, b in got)
    assert {r[0] for r in fetch(queries.connect(sel_store), "SELECT neg_siglip_loss FROM scores")} == {None}


def test_empty_prompt_is_refused(sel_store):
    for sql in ("SELECT importance_weight(image_embedding, '') FROM embeddings",
                "SELECT text_embedding('   ')"):
        with pytest.raises(Exception, match="the prompt is empty"):
            fetch(queries.connect(sel_store), sql)


def test_select_limit_beyond_the_pool_warns_and_outputs_are_atomic(sel_store, tmp_path):
    """A --limit larger than the pool says so; a killed select leaves the
    previous output and sidecar, whole, and the sidecar names the output's sha256."""
    import hashlib
    from conftest import cli
    out = tmp_path / "sel.csv"
    pool = count_rows(sel_store, sel_store.model())
    p = cli("select", str(sel_store.path), "--sql", "SELECT id FROM embeddings", "--limit", str(pool + 50),
            "-o", str(out))
    assert f"--limit {pool + 50} is more than the {pool} rows" in p.stderr.decode()
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert side["warnings"] and side["counts"]["selected"] == pool
    before, before_side = out.read_bytes(), Path(str(out) + ".json").read_bytes()
    killed = cli("select", str(sel_store.path), "--sql", "SELECT id FROM embeddings", "--limit", "5",
                 "-o", str(out), env={"CLIPSQL_FAULT": "select:before-rename"}, check=False)
    assert killed.returncode == -9
    assert out.read_bytes() == before and Path(str(out) + ".json").read_bytes() == before_side
    cli("select", str(sel_store.path), "--sql", "SELECT id FROM embeddings", "--limit", "5", "-o", str(out))
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and side["counts"]["selected"] == 5
    assert not side["warnings"]


def test_a_select_killed_between_publishing_output_and_sidecar_is_detected_and_its_temps_swept(sel_store,
                                                                                             tmp_path):
    """A select killed between its two renames leaves a pair `check_output` refuses (never a new output
    passing for the previous run's sidecar, or the reverse), plus temporary files; the next select
    sweeps those of the dead process (not another live one's) and publishes a consistent pair."""
    import subprocess
    import sys
    from conftest import cli
    from clipsql.queries.curation.selection import check_output
    from clipsql.leftovers import owner_tag
    args = ["select", str(sel_store.path), "--sql", "SELECT id FROM embeddings ORDER BY id"]
    for name in ("sel.parquet", "sel.txt", "sel.csv"):
        out = tmp_path / name
        cli(*args, "--limit", "7", "-o", str(out))
        first = check_output(out)
        assert first["counts"]["selected"] == 7 and len(first["run_id"]) == 32
        if name.endswith(".parquet"):
            assert pq.read_schema(out).metadata[b"clipsql.run_id"].decode() == first["run_id"]
        live = tmp_path / f".{name}.tmp-{owner_tag()}"          # this (live) process's: never swept
        live.write_text("mine")
        for point in ("select:before-rename", "select:between-renames"):
            killed = cli(*args, "--limit", "3", "-o", str(out), env={"CLIPSQL_FAULT": point}, check=False)
            assert killed.returncode == -9
            temps = sorted(p.name for p in tmp_path.glob(f".{name}*.tmp-*") if p != live)
            assert temps, point
            if point == "select:before-rename":
                assert check_output(out) == first                  # the previous pair, whole
            else:
                with pytest.raises(SelectionError, match="do not belong together"):
                    check_output(out)
        cli(*args, "--limit", "4", "-o", str(out))
        assert check_output(out)["counts"]["selected"] == 4
        assert sorted(p.name for p in tmp_path.glob(f".{name}*")) == [live.name]   # the dead ones' swept
        live.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    stale = tmp_path / f".sel.parquet.tmp-{owner_tag(int(dead.stdout))}"
    stale.write_text("left by a killed select")
    Path(str(tmp_path / "sel.parquet") + ".json").unlink()
    with pytest.raises(SelectionError, match="has no sidecar"):
        check_output(tmp_path / "sel.parquet")
    select(sel_store, sql="SELECT id FROM embeddings", limit=2, output=tmp_path / "other.parquet")
    assert not stale.exists() and check_output(tmp_path / "other.parquet")["counts"]["selected"] == 2


def test_sql_selection_keeps_the_first_of_each_id_and_drops_nulls(sel_store, tmp_path):
    side = select(sel_store, sql="SELECT id, clip_score FROM (SELECT id, clip_score FROM scores UNION ALL "
                                 "SELECT id, clip_score - 1 FROM scores UNION ALL SELECT NULL, 9.0) "
                                 "ORDER BY clip_score DESC, id", output=tmp_path / "d.parquet")
    cs = dict(fetch(queries.connect(sel_store), "SELECT id, clip_score FROM scores"))
    tbl = pq.read_table(tmp_path / "d.parquet")
    assert tbl.column("id").to_pylist() == sorted(cs, key=lambda k: (-cs[k], k))
    np.testing.assert_allclose(tbl.column("clip_score").to_pylist(), sorted(cs.values(), reverse=True))
    assert side.counts["sql_rows"] == 2 * N + 1 and side.counts["duplicate_or_null_ids_dropped"] == N + 1


def write_laion(root, img, txt, widths, heights, names=("width", "height")):
    """A clip-retrieval / LAION embedding folder: img_emb/, text_emb/ and metadata/ with the
    images' size in the metadata (the images themselves are never read)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", img)
    np.save(root / "text_emb" / "text_emb_0.npy", txt)
    n = len(img)
    pq.write_table(pa.table({"url": [f"http://x/{i}.jpg" for i in range(n)],
                             "caption": [f"laion caption {i}" for i in range(n)],
                             names[0]: widths, names[1]: heights, "similarity": [0.3] * n}),
                   root / "metadata" / "metadata_0.parquet")
    return root


@pytest.fixture(scope="module")
def laion_store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("laion")
    img, txt = clip_like(60, np.random.default_rng(5))
    widths = pa.array([64 * (i % 8) + 32 for i in range(60)], pa.int64())          # 32 … 480
    heights = pa.array([None if i == 7 else 300 + i for i in range(60)], pa.int64())
    st = Store.init(root / "store")
    ingest(st, str(write_laion(root / "emb", img, txt, widths, heights)), model=tiny_model,
           options=IngestOptions(batch_size=64, workers=0, progress=False))
    return st


def test_laion_width_and_height_fill_the_samples_columns(laion_store, tmp_path):
    """LAION / clip-retrieval width and height ended up NULL (the source columns became meta_width), so
    --where "width >= 256" selected 0 of 0 rows with exit 0 and an empty file."""
    rows = fetch(queries.connect(laion_store), "SELECT caption, width, height, meta_width FROM samples")
    got = {int(c.rsplit(" ", 1)[1]): (w, h, m) for c, w, h, m in rows}
    assert len(got) == 60
    for i, (w, h, m) in got.items():
        assert (w, h, m) == (64 * (i % 8) + 32, None if i == 7 else 300 + i, 64 * (i % 8) + 32)
    side = select(laion_store, recipe="clip-score", where="width >= 256", fraction=1.0, output=tmp_path / "cs.txt")
    want = [i for i in range(60) if 64 * (i % 8) + 32 >= 256]
    assert len(want) == 28 and side.counts["pool"] == 28 and side.counts["pool_before_where"] == 60
    chosen = set((tmp_path / "cs.txt").read_text().split())
    by_caption = dict(fetch(queries.connect(laion_store), "SELECT caption, id FROM samples"))
    assert chosen == {by_caption[f"laion caption {i}"] for i in want}


def test_precomputed_image_size_columns(tmp_path):
    from clipsql.ingest.registry import open_source
    img, txt = clip_like(6, np.random.default_rng(1))
    w = pa.array([256, 0, -3, None, 2.5e10, 640.0], pa.float64())
    h = pa.array(["100", "200", "300", "400", "500", "600"], pa.string())
    src = open_source(write_laion(tmp_path / "e", img, txt, w, h, names=("WIDTH", "HEIGHT")))
    cols = src.read_columns(src.units()[0], D)
    assert cols.width.to_pylist() == [256, None, None, None, None, 640]
    assert cols.height.to_pylist() == [100, 200, 300, 400, 500, 600]
    src = open_source(write_laion(tmp_path / "f", img, txt, w, h, names=("w", "h")))
    cols = src.read_columns(src.units()[0], D)
    assert cols.width is None and cols.height is None


def test_a_where_that_leaves_no_rows_is_an_error_naming_it(laion_store, tmp_path):
    from conftest import cli
    out = tmp_path / "none.txt"
    for recipe in ("clip-score", "kl-guided"):
        with pytest.raises(SelectionError, match=r"`where` 'width >= 100000' leaves no rows") as e:
            select(laion_store, recipe=recipe, where="width >= 100000", output=out, make_fit=False)
        assert "\n" not in str(e.value) and "of the 60" in str(e.value)
    assert not out.exists() and not Path(str(out) + ".json").exists()
    p = cli("select", str(laion_store.path), "--recipe", "clip-score", "--where", "width >= 100000",
            "-o", str(out), check=False)
    assert p.returncode != 0 and not out.exists()
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "width >= 100000" in err, err
