"""The catalog on PostgreSQL (`clipsql init STORE --catalog postgresql+psycopg://…`), the
team set-up: a throwaway server (tests/pg.py) and the same data in a SQLite-catalog
store side by side: every number — running statistics, fits, scores, selections —
must be the same whichever database holds the catalog."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store.fits import fit_stats
from clipsql.queries.curation.selection import select
from clipsql.queries.curation.targets import add_target
from clipsql.store import catalog as cat
from clipsql.kernels.arrays import to_numpy
from clipsql.store.reads import read_embeddings
from clipsql.store.stats import refresh_stats, saved_stats
from clipsql.store.store import Store

pytestmark = pytest.mark.postgres
D = 16


def embeddings_parquet(path, n=400, seed=11):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, D)) * np.linspace(1.5, 0.2, D)
    img = (3 * (2.0 * np.eye(D)[0] + shared + 0.3 * rng.normal(size=(n, D)))).astype(np.float32)
    txt = (5 * (-2.0 * np.eye(D)[1] + shared + 0.3 * rng.normal(size=(n, D)))).astype(np.float32)
    pq.write_table(pa.table({
        "id": [f"r{i:04d}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "url": [f"file:///x/{i}.jpg" for i in range(n)], "split": ["a" if i % 3 else "b" for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), D),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), D),
    }), path)
    return img, txt


def fetch(st, sql):
    con = queries.connect(st)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_postgres_catalog_gives_the_same_numbers_as_sqlite(tmp_path, pg_server, tiny_model):
    img, txt = embeddings_parquet(tmp_path / "emb.parquet")
    opts = IngestOptions(batch_size=64, workers=0, progress=False, id_column="id")
    url = pg_server.new_database()
    stores = {"postgres": Store.init(tmp_path / "pg", catalog_url=url), "sqlite": Store.init(tmp_path / "lite")}
    assert stores["postgres"].engine.dialect.name == "postgresql"
    assert cat.schema_version(stores["postgres"].engine) == cat.SCHEMA_VERSION
    for st in stores.values():
        assert ingest(st, str(tmp_path / "emb.parquet"), model=tiny_model, options=opts).added == 400
        assert ingest(st, str(tmp_path / "emb.parquet"), model=tiny_model, options=opts).added == 0
        fit_stats(st, reference_size=150, seed=3)
        add_target(st, "split_b", query="SELECT e.image_embedding FROM embeddings e JOIN samples s USING (id) "
                                         "WHERE s.split = 'b'")

    # reopening finds the catalog through the store's marker
    pg_store = Store.open(tmp_path / "pg")
    assert str(pg_store.engine.url) == str(stores["postgres"].engine.url)

    # running statistics: equal to a from-scratch float64 computation, on both catalogs
    for st in (pg_store, stores["sqlite"]):
        state = saved_stats(st, st.model())
        for modality, X in (("image", img), ("text", txt)):
            m = state.moments[(modality, "raw")]
            X64 = X.astype(np.float64)
            assert m.n == 400
            np.testing.assert_allclose(m.mean, X64.mean(0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(m.cov, np.cov(X64.T, bias=True), rtol=1e-9, atol=1e-9)

    sql = ("SELECT id, image_info_gain, text_info_gain, image_info_gain_approx, text_conformity, "
           "neg_clip_loss, norm_sim_2(e_img, 'split_b'), norm_sim_inf(e_img, 'split_b') "
           "FROM scores JOIN (SELECT id, image_embedding AS e_img FROM embeddings) USING (id) ORDER BY id")
    got = {name: fetch(st, sql) for name, st in stores.items()}
    assert [r[0] for r in got["postgres"]] == [r[0] for r in got["sqlite"]]
    a = np.array([r[1:] for r in got["postgres"]], dtype=float)
    b = np.array([r[1:] for r in got["sqlite"]], dtype=float)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

    for name, st in stores.items():
        side = select(st, recipe="negclip-normsim", target="split_b", output=tmp_path / f"{name}.csv")
        assert side.counts["selected"] == 80         # 20 % of 400
    assert (tmp_path / "postgres.csv").read_text() == (tmp_path / "sqlite.csv").read_text()


def test_images_and_rejects_through_a_postgres_catalog(tmp_path, pg_server, tiny_model, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (image_folder / "broken.txt").write_text("a broken image")
    st = Store.init(tmp_path / "pg", catalog_url=pg_server.new_database())
    s = ingest(st, str(image_folder), model=tiny_model, options=IngestOptions(batch_size=8, progress=False))
    assert s.added == 40 and sum(s.rejected.values()) == 1
    rows = fetch(st, "SELECT location, reason FROM rejects")
    assert len(rows) == 1 and rows[0][0].endswith("broken.png")
    assert fetch(st, "SELECT count(*) FROM embeddings")[0][0] == 40
    state = saved_stats(st, st.model())
    refreshed = refresh_stats(st, st.model())          # recomputed from the stored vectors
    np.testing.assert_allclose(refreshed.moments[("image", "raw")].mean, state.moments[("image", "raw")].mean,
                               rtol=1e-12)
    vecs = to_numpy(read_embeddings(st, st.model(), columns=("image_embedding",)).column("image_embedding"))
    np.testing.assert_allclose(state.moments[("image", "raw")].mean, vecs.astype(np.float64).mean(0),
                               rtol=1e-9, atol=1e-12)
