"""Similarity search: `nearest` against brute-force numpy, filters before the top-k,
the Lance vector index's recall, `clipsql index` / `clipsql search` end to end, and clear errors."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.kernels import topk as kernels
from clipsql.queries.search.index import build_index
from clipsql.errors import ClipsqlError, QueryError
from clipsql.kernels.arrays import to_numpy
from clipsql.store.store import Store
from clipsql.store.vector_index import index_search

from conftest import cli as run_cli

D = 16


def clustered(n, rng, d=D, centers=24):
    c = rng.normal(size=(centers, d)) * 2.0
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def write(path, ids, img, txt, txt_null=()):
    mask = np.zeros(len(ids), bool)
    mask[list(txt_null)] = True
    pq.write_table(pa.table({
        "id": ids, "caption": [f"caption {i}" for i in ids], "url": [f"file:///x/{i}.jpg" for i in ids],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), D),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), D, mask=pa.array(mask)),
    }), path)
    return str(path)


def load(st, path, model):
    ingest(st, path, model=model, options=IngestOptions(batch_size=1024, workers=0, progress=False,
                                                         id_column="id"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_model):
    """600 rows; rows 500-519 duplicate rows 0-19 (exact ties)."""
    root = tmp_path_factory.mktemp("search-small")
    rng = np.random.default_rng(5)
    img, txt = clustered(600, rng), clustered(600, rng)
    img[500:520], txt[500:520] = img[:20], txt[:20]
    st = Store.init(root / "store")
    load(st, write(root / "e.parquet", [f"r{i:04d}" for i in range(600)], img, txt), tiny_model)
    return st


@pytest.fixture(scope="module")
def big(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("search-big")
    rng = np.random.default_rng(9)
    img, txt = clustered(4000, rng), clustered(4000, rng)
    st = Store.init(root / "store")
    load(st, write(root / "e.parquet", [f"b{i:05d}" for i in range(4000)], img, txt), tiny_model)
    st.tmp_root = root
    return st


def stored(st, column="image_embedding"):
    tbl = st.read_embeddings(st.model()).sort_by("id")
    return np.array(tbl.column("id").to_pylist()), to_numpy(tbl.column(column)).astype(np.float64)


def brute(ids, X, q, k, allowed=None):
    norms = np.linalg.norm(X, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if allowed is not None:
        ok &= np.isin(ids, list(allowed))
    s = ((X[ok] / norms[ok, None]) * (q / np.linalg.norm(q))).sum(axis=1)    # equal rows score equal
    order = np.lexsort((ids[ok], -s))[:k]
    return ids[ok][order].tolist(), s[order]


def nearest(con, sql_args, params=None):
    rows = con.execute(f"SELECT id, score FROM nearest({sql_args})", params or []).fetchall()
    return [r[0] for r in rows], np.array([r[1] for r in rows])


def test_exact_nearest_equals_brute_force_with_ties_by_id(small):
    con = queries.connect(small)
    ids, X = stored(small)
    for qid, k in (("r0003", 12), ("r0250", 7)):
        got_ids, got_s = nearest(con, f"(SELECT image_embedding FROM embeddings WHERE id = '{qid}'), {k}")
        want_ids, want_s = brute(ids, X, X[list(ids).index(qid)], k)
        assert got_ids == want_ids
        np.testing.assert_allclose(got_s, want_s, atol=1e-6)
    # r0003 and r0503 hold the same vector: a tie at cos 1, broken by id ascending
    assert nearest(con, "(SELECT image_embedding FROM embeddings WHERE id = 'r0003'), 2")[0] == ["r0003", "r0503"]
    q = np.random.default_rng(1).normal(size=D)
    got_ids, got_s = nearest(con, "?::FLOAT[16], 600, NULL, 'text'", [q.tolist()])
    tids, T = stored(small, "text_embedding")
    want_ids, want_s = brute(tids, T, q, 600)
    assert got_ids == want_ids and len(got_ids) == 600
    np.testing.assert_allclose(got_s, want_s, atol=1e-6)
    assert nearest(con, "NULL::FLOAT[16], 5") == ([], pytest.approx(np.array([])))


def test_chunked_float32_kernel_is_the_float64_top_k_and_the_error_is_bounded():
    rng = np.random.default_rng(3)
    d = 512
    X = rng.normal(size=(5000, d)).astype(np.float32)
    Q = rng.normal(size=(4, d))
    Qh = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    X64 = X.astype(np.float64)
    S64 = Qh @ (X64 / np.linalg.norm(X64, axis=1, keepdims=True)).T
    S32 = (Qh.astype(np.float32) @ X.T) / np.linalg.norm(X, axis=1)[None, :]
    assert np.abs(S32 - S64).max() <= kernels.cosine_error_bound(d)
    # near-ties below float32 resolution: rows that differ from row 0 by ~1e-7 in cosine
    X[1:40] = X[0] + rng.normal(size=(39, d)).astype(np.float32) * 1e-6
    X[40], X[41], X[42, 7] = np.nan, 0.0, np.inf          # NULL, zero and non-finite rows never score
    X64 = X.astype(np.float64)
    ids = np.array([f"x{i:05d}" for i in range(len(X))], dtype=object)
    Q = X64[:1] + 1e-3 * rng.normal(size=(1, d))
    top = kernels.RunningTopK(Q, 25)
    for s in range(0, len(X), 700):                       # chunks that split the near-ties
        top.update(X[s:s + 700], ids[s:s + 700])
    got_ids, got_s = top.result()[0]
    want_ids, want_s = brute(ids.astype(str), X64, Q[0], 25)
    assert got_ids.tolist() == want_ids and not {"x00040", "x00041", "x00042"} & set(want_ids)
    np.testing.assert_allclose(got_s, want_s, atol=1e-12)
    assert len(kernels.exact_topk(Q, [(X[38:44], ids[38:44])], 10)[0][0]) == 3
    base = kernels.gemm_topk(Q, X, 25)[0]
    # the bare float32 baseline finds the near-tie cluster but not its float64 order or membership
    assert len(set(base.tolist())) == 25 and set(base.tolist()) <= set(range(40))


def test_filter_applies_before_the_top_k(small):
    con = queries.connect(small)
    ids, X = stored(small)
    q = "(SELECT image_embedding FROM embeddings WHERE id = 'r0042')"
    got_ids, got_s = nearest(con, f"{q}, 10, filter := 'id <> ''r0042'' AND caption NOT LIKE ''%r05%'''")
    allowed = {i for i in ids if i != "r0042" and "r05" not in i}
    want_ids, want_s = brute(ids, X, X[list(ids).index("r0042")], 10, allowed)
    assert got_ids == want_ids and len(got_ids) == 10 and "r0042" not in got_ids
    np.testing.assert_allclose(got_s, want_s, atol=1e-6)
    assert nearest(con, f"{q}, 10, filter := 'false'")[0] == []
    assert nearest(con, f"{q}, 3, NULL, 'image', 'id >= ''r0590'''")[0][0] >= "r0590"     # positional
    with pytest.raises(Exception, match="nosuch"):
        nearest(con, f"{q}, 3, filter := 'nosuch > 1'")


def test_index_recall_against_exact_and_rows_added_after_it(big, tiny_model):
    results = {}
    for kind in ("ivf_pq", "ivf_hnsw_sq"):
        info = build_index(big, kind=kind, seed=2)
        assert info["partitions"] == 15 and info["queries"] == 100 and info["recall"] >= 0.9, info
        assert json.loads(big.get_setting(f"index:{big.model().table_name}:image_embedding"))["kind"] == kind
        results[kind] = info["recall"]
    con = queries.connect(big)
    ids, X = stored(big)
    rng = np.random.default_rng(4)
    hits = 0
    for qi in rng.choice(len(ids), 30, replace=False):
        got = nearest(con, "?::FLOAT[16], 10", [X[qi].tolist()])[0]
        hits += len(set(got) & set(brute(ids, X, X[qi], 10)[0]))
        assert nearest(con, "?::FLOAT[16], 10, exact := true", [X[qi].tolist()])[0] == brute(ids, X, X[qi], 10)[0]
    assert hits / 300 >= 0.9
    # a row ingested after the build is not in the index: Lance searches it flat
    q = rng.normal(size=D).astype(np.float32) * 50
    root = big.tmp_root
    load(big, write(root / "late.parquet", ["late0"], q[None, :], q[None, :]), tiny_model)
    con = queries.connect(big)
    assert nearest(con, "?::FLOAT[16], 1", [q.tolist()])[0] == ["late0"]


def test_index_refuses_a_small_table(small):
    with pytest.raises(QueryError, match=r"holds 600 image embeddings: too few for a vector index"):
        build_index(small)


def cli(*args):
    from typer.testing import CliRunner

    from clipsql.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_index_and_search_end_to_end(big, small, tmp_path):
    r = cli("index", big.path, "--kind", "ivf_hnsw_sq", "--seed", "1")
    assert r.exit_code == 0 and "recall@10" in r.output and "15 partitions" in r.output, r.output
    r = cli("search", big.path, "--like", "b00007", "-k", "5", "--format", "json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["method"] == "index ivf_hnsw_sq" and res["rows"][0]["id"] == "b00007" and len(res["rows"]) == 5
    assert res["rows"][0]["uri"] == "file:///x/b00007.jpg" and res["rows"][0]["caption"] == "caption b00007"
    r = cli("search", big.path, "--like", "b00007", "-k", "5", "--where", "id > 'b02000'")
    assert r.exit_code == 0 and "exact search over the" in r.output and "| b00007 |" not in r.output, r.output
    r = cli("search", small.path, "a red circle", "-k", "4", "--gallery", tmp_path / "g.html")
    assert r.exit_code == 0 and "4 nearest images" in r.output and "(exact)" in r.output, r.output
    page = (tmp_path / "g.html").read_text()
    assert page.count('class="tile') >= 4 or page.count("caption r0") >= 4
    con = queries.connect(small)
    want = [x[0] for x in con.execute("SELECT id FROM nearest(text_embedding('a red circle'), 4)").fetchall()]
    lines = [ln.split(" | ")[1].strip() for ln in r.output.splitlines()[3:7]]
    assert lines == want


def test_bad_input_is_a_one_line_error(small):
    con = queries.connect(small)
    with pytest.raises(Exception, match="query vector.*has 3 dimensions but the model has 16"):
        nearest(con, "[1, 2, 3], 5")
    with pytest.raises(Exception, match="k must be a positive integer"):
        nearest(con, "(SELECT image_embedding FROM embeddings WHERE id = 'r0001'), 0")
    with pytest.raises(Exception, match="modality must be 'image' or 'text'"):
        nearest(con, "(SELECT image_embedding FROM embeddings WHERE id = 'r0001'), 3, NULL, 'audio'")
    for args, msg in (((small.path, "--like", "nope"), "no stored row has id 'nope'"),
                      ((small.path, "x", "--model", "nope"), "model 'nope' is not in this store"),
                      ((small.path, "x", "-k", "0"), "-k must be a positive integer"),
                      ((small.path,), "give exactly one of a PROMPT"),
                      ((small.path, "x", "--where", "width >"), "the search filter 'width >' failed")):
        r = cli("search", *args)
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = cli("index", small.path)
    assert r.exit_code == 1 and "too few for a vector index" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert issubclass(QueryError, ClipsqlError)


def test_a_huge_k_is_capped_at_the_row_count_and_a_bad_k_is_one_line(big, small):
    """`clipsql search -k 1000000000000` aborted the process (SIGABRT: an 8 TB allocation through the
    vector index); nearest(q, 1000000000000) was a binder error naming the internal _clipsql_nearest."""
    from conftest import cli as run
    if not [i for i in big.embeddings_table(big.model()).describe_indices() if list(i.field_names) != ["id"]]:
        build_index(big, kind="ivf_pq", seed=2)
    n = big.count_rows(big.model())
    p = run("search", str(big.path), "--like", "b00007", "-k", "1000000000000", "--format", "json", check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    res = json.loads(p.stdout)
    assert len(res["rows"]) == n and res["rows"][0]["id"] == "b00007"
    assert f"-k 1000000000000 is more than the {n} rows" in res["note"]
    con = queries.connect(small)
    q = "(SELECT image_embedding FROM embeddings WHERE id = 'r0003')"
    ids, X = stored(small)
    want_ids, _ = brute(ids, X, X[list(ids).index("r0003")], 600)
    for k in ("1000000000000", "600", "9223372036854775807", "1e15"):
        assert nearest(con, f"{q}, {k}")[0] == want_ids
    first = [i for i in want_ids if i < "r0100"]
    assert nearest(con, f"{q}, 1000000000000, filter := 'id < ''r0100'''")[0] == first and len(first) == 100
    for k, shown in (("0", "0"), ("-5", "-5"), ("2.5", "2.5"), ("'nan'", "nan"), ("'inf'", "inf")):
        with pytest.raises(Exception) as e:
            nearest(con, f"{q}, {k}")
        msg = str(e.value)
        assert f"k must be a positive integer; got {shown}" in msg and "_clipsql" not in msg, msg
    for k in ("0", "-3"):
        r = cli("search", small.path, "x", "-k", k)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
        assert f"-k must be a positive integer; got {k}" in r.output, r.output


def test_help_explains_the_options():
    for cmd in ("index", "search"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output
    assert "--like" in cli("search", "--help").output and "--kind" in cli("index", "--help").output


def test_optimize_folds_rows_added_after_the_build_into_the_vector_index(big, tiny_model):
    from clipsql.store.maintenance import optimize
    if not [i for i in big.embeddings_table(big.model()).describe_indices() if list(i.field_names) != ["id"]]:
        build_index(big, kind="ivf_pq", seed=2)
    q = np.random.default_rng(9).normal(size=D).astype(np.float32) * 40
    load(big, write(big.tmp_root / "later.parquet", ["later0"], q[None, :], q[None, :]), tiny_model)

    def unindexed():
        ds = big.embeddings_table(big.model(), big.committed_versions()[big.model().table_name])
        return [int(ds.stats.index_stats(i.name)["num_unindexed_rows"]) for i in ds.describe_indices()
                if list(i.field_names) != ["id"]]
    assert max(unindexed()) >= 1
    report = optimize(big)
    assert "vector_index" in report["tables"][big.model().table_name]
    assert max(unindexed()) == 0
    assert nearest(queries.connect(big), "?::FLOAT[16], 1", [q.tolist()])[0] == ["later0"]


def test_ingest_leaves_a_vector_index_stale_and_says_so(tmp_path, tiny_model, monkeypatch):
    """An ingest never refreshes a vector index (minutes on a large table) without saying so: it
    reports the rows the index misses, even when its own maintenance (compaction) runs; `nearest`
    still finds those rows and `clipsql search` says the index covers less than the table."""
    from clipsql.store import maintenance
    rng = np.random.default_rng(21)
    img, txt = clustered(3000, rng), clustered(3000, rng)
    st = Store.init(tmp_path / "store")
    load(st, write(tmp_path / "e.parquet", [f"s{i:05d}" for i in range(3000)], img, txt), tiny_model)
    build_index(st, kind="ivf_pq", seed=2)
    monkeypatch.setattr(maintenance, "AUTO_FRAGMENTS", 0)       # make the ingest's maintenance due
    q = rng.normal(size=D).astype(np.float32) * 40
    summary = ingest(st, write(tmp_path / "later.parquet", ["late0"], q[None, :], q[None, :]), model=tiny_model,
                     options=IngestOptions(batch_size=1024, workers=0, progress=False, id_column="id"))
    table = st.model().table_name
    assert summary.maintenance["tables"][table]["vector_index_stale"] == 1
    assert "vector_index" not in summary.maintenance["tables"][table]
    ds = st.embeddings_table(st.model(), st.committed_versions()[table])
    assert [int(ds.stats.index_stats(i.name)["num_unindexed_rows"]) for i in ds.describe_indices()
            if list(i.field_names) != ["id"]] == [1]
    assert nearest(queries.connect(st), "?::FLOAT[16], 1", [q.tolist()])[0] == ["late0"]
    r = cli("search", str(st.path), "--like", "late0", "-k", "2")
    assert r.exit_code == 0, r.output
    assert "the vector index covers 3000 of 3001 rows" in r.output


def test_the_same_index_build_with_the_same_seed_is_the_same_index(big):
    """The IVF centroids are a seeded k-means: two ivf_hnsw_sq builds with one seed give the same
    recall figures and the same neighbours (Lance's own training drew an unseeded sample: the recall
    moved between runs, e.g. 0.952 / 0.953 / 0.964)."""
    ids, X = stored(big)
    Q = X[np.random.default_rng(3).choice(len(ids), 40, replace=False)]
    runs = []
    for _ in range(2):
        info = build_index(big, kind="ivf_hnsw_sq", seed=7)
        ds = big.dataset(big.model().table_name, latest=True)
        got = [tuple(index_search(ds, "image_embedding", q, 10, info, nprobes=2)[0].tolist()) for q in Q]
        runs.append(([(p["nprobes"], p["recall"]) for p in info["probes"]], got))
    assert runs[0] == runs[1]


def test_an_index_search_prints_no_lance_deprecation_line(big):
    """Lance's `_distance` deprecation warning (a search naming its columns without `_distance`)
    went straight to the terminal on every indexed search. The store quiets Lance's logger by
    default (LANCE_LOG=error); with warnings on, the search itself must not cause one."""
    build_index(big, kind="ivf_hnsw_sq", seed=1)
    p = run_cli("search", big.path, "--like", "b00007", "-k", "5", env={"LANCE_LOG": "warn"})
    assert p.returncode == 0 and "index ivf_hnsw_sq" in p.stdout.decode(), p.stdout.decode()
    assert "_distance" not in p.stderr.decode() and "WARN" not in p.stderr.decode(), p.stderr.decode()
