"""One snapshot per reader: a connection is built from one catalog read (store.snapshot) and keeps
answering exactly as it did while writers remove a model, delete rows, optimize, deduplicate and
ingest; the tables `models rm` lets go stay for the retention and the next writer after it deletes
them (also after a kill); commands that only select ids read only `samples`."""
import json
import time

import pyarrow as pa
import pytest
import sqlalchemy as sa

from clipsql.ingest.pipeline import ingest
from clipsql.queries.curation.dedup import semdedup
from clipsql.queries.curation.delete import delete_where, ids_where
from clipsql.queries.sql.db import connect
from clipsql.store import catalog as cat
from clipsql.store.drops import DROP_PREFIX
from clipsql.store.fit_rows import get_fit, latest_fit
from clipsql.store.fits import fit_stats
from clipsql.store.maintenance import optimize
from clipsql.store.manage import remove_model
from clipsql.store.snapshot import Snapshot
from clipsql.store.stats import load_stats_in, saved_stats
from clipsql.store.store import Store

from conftest import cli, write_image_folder


@pytest.fixture
def two_model_store(tmp_path, fake_encoder, fake_siglip):
    """40 images ingested with two fake models (both 16-d), each with a fit."""
    folder = write_image_folder(tmp_path / "imgs", 40)
    st = Store.init(tmp_path / "s")
    for fake in (fake_encoder, fake_siglip):
        ingest(st, str(folder), model=fake.model, options=fake.options(batch_size=8))
    a, b = (m.model_id for m in st.list_models())
    for m in (a, b):
        fit_stats(st, m, reference_size=12)
    return st, a, b


def queries_of(a, b):
    return {
        "samples": "SELECT id, uri, caption FROM samples ORDER BY id",
        "embeddings": "SELECT id, model, image_embedding, text_embedding FROM embeddings ORDER BY model, id",
        "scores": "SELECT * FROM scores ORDER BY model, id",
        "stats": "SELECT model, modality, n, rows, current, fit_id, fit_rows, trace_cov FROM stats ORDER BY model, modality",
        "fitted score": f"SELECT id, image_info_gain(image_embedding, '{b}', id) AS g, "
                        f"text_info_gain_approx(text_embedding, '{b}') AS t FROM embeddings WHERE model = '{b}' "
                        "ORDER BY id",
        "counts": "SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM embeddings), (SELECT count(*) FROM tags)",
    }


def answers(con, sqls):
    return {name: con.execute(sql).fetchall() for name, sql in sqls.items()}


def test_a_held_connection_answers_as_before_every_writer(two_model_store, fake_encoder, tmp_path):
    st, a, b = two_model_store
    sqls = queries_of(a, b)
    ref = connect(st)
    before = answers(ref, sqls)                 # on a connection of its own: the held one loads nothing yet
    ref.close()
    held = connect(st)
    assert before["counts"] == [(40, 80, 0)]

    removed = remove_model(st, b)               # the model, its fit and its statistics leave the catalog
    assert removed["fits"] == 1
    out = delete_where(st, "id IN (SELECT id FROM samples ORDER BY id LIMIT 5)")
    assert out.samples == 5
    optimize(st)                                # compacts, indexes and prunes (default retention)
    semdedup(st, a, clusters=3)
    more = write_image_folder(tmp_path / "more", 6, seed=9)
    assert ingest(st, str(more), model=fake_encoder.model, options=fake_encoder.options(batch_size=4)).added == 6

    fresh = connect(st)                         # the writers did change what a new reader sees
    assert fresh.execute("SELECT count(*) FROM samples").fetchone()[0] == 41
    assert fresh.execute("SELECT count(DISTINCT model) FROM embeddings").fetchone()[0] == 1
    fresh.close()
    after = answers(held, sqls)
    for name in sqls:
        assert after[name] == before[name], name
    held.close()


def test_one_catalog_read_never_mixes_two_commits(two_model_store, monkeypatch):
    """A commit landing while a snapshot is being read is not seen, in any part of it."""
    st, a, b = two_model_store
    writer = Store.open(st.path)
    n_before = {m.model_id: saved_stats(st, m).n for m in st.list_models()}
    original = load_stats_in
    landed = []

    def load_stats_landing(conn, model, path):
        if not landed:                          # between the reads of one snapshot: a writer commits
            with writer.engine.begin() as w:
                w.execute(sa.update(cat.running_stats).values(n=cat.running_stats.c.n + 1000))
                w.execute(sa.delete(cat.models).where(cat.models.c.model_id == b))
            landed.append(True)
        return original(conn, model, path)

    monkeypatch.setattr("clipsql.store.snapshot.load_stats_in", load_stats_landing)
    snap = Snapshot.read(Store.open(st.path, read_only=True))
    assert landed
    assert [m.model_id for m in snap.models] == [a, b]
    assert {k: s.n for k, s in snap.stats.items()} == n_before
    later = Snapshot.read(Store.open(st.path, read_only=True))
    assert [m.model_id for m in later.models] == [a] and later.stats[a].n == n_before[a] + 1000


def _age_drops(st, hours):
    """Pretend the tables recorded for deletion were let go `hours` ago."""
    with st.engine.begin() as conn:
        for key, value in conn.execute(sa.select(cat.settings.c.key, cat.settings.c.value).where(
                cat.settings.c.key.like(DROP_PREFIX + "%"))).all():
            try:
                rec = json.loads(value)
            except ValueError:              # a record without a time: due at once anyway
                continue
            rec["dropped_at"] = time.time() - hours * 3600
            conn.execute(sa.update(cat.settings).where(cat.settings.c.key == key).values(value=json.dumps(rec)))


def test_a_killed_models_rm_is_swept_by_the_next_writer_after_the_retention(two_model_store):
    st, a, b = two_model_store
    table = st.model(b).table_name
    fit_b = latest_fit(st, st.model(b), with_arrays=False).fit_id
    held = connect(st)
    p = cli("models", "rm", st.path, b, env={"CLIPSQL_FAULT": "models-rm:after-catalog"}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    assert [m.model_id for m in st.list_models()] == [a] and table in st.table_names()
    report = json.loads(cli("doctor", st.path, "--format", "json").stdout)
    assert report["consistent"], report
    fit_stats(st, a, reference_size=10)         # a writer within the retention: a held session still reads
    assert table in st.table_names()
    assert held.execute(f"SELECT count(*) FROM embeddings WHERE model = '{b}'").fetchone()[0] == 40
    _age_drops(st, 25)
    fit_stats(st, a, reference_size=10)         # the next writer past it (not an ingest, not optimize)
    assert table not in st.table_names()
    assert get_fit(st, fit_b, with_arrays=False) is None          # the removed model's fit goes with it
    with st.engine.connect() as conn:
        assert not conn.execute(sa.select(cat.settings.c.key).where(
            cat.settings.c.key.like(DROP_PREFIX + "%"))).all()
    held.close()


def test_selecting_ids_reads_only_samples(two_model_store):
    """`delete --where` (and its dry run) open only `samples`: a fit that cannot be read does not stop them."""
    st, a, b = two_model_store
    with st.engine.begin() as conn:
        conn.execute(sa.update(cat.fits).values(options="{not json"))
    with pytest.raises(ValueError):
        connect(st)                             # a full connection reads the fits
    seen = []

    def record(conn, cursor, statement, *args):
        seen.append(statement)

    sa.event.listen(st.engine, "before_cursor_execute", record)
    where = "caption LIKE '% 0' OR caption LIKE '% 1' OR caption LIKE '% 2'"
    ids = ids_where(st, where)
    sa.event.remove(st.engine, "before_cursor_execute", record)
    assert len(ids) == 3
    touched = " ".join(seen).lower()
    assert "running_stats" not in touched and "fits" not in touched and "from models" not in touched
    dry = delete_where(st, where, dry_run=True)
    assert dry.samples == 3 and dry.rows == {a: 3, b: 3}
    out = delete_where(st, where)
    assert out.samples == 3
    assert st.samples_table().count_rows() == 37
    con = connect(st, samples_only=True)
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 37
    assert {r[0] for r in con.execute("SHOW TABLES").fetchall()} >= {"samples", "deletions", "tags"}
    assert "embeddings" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    con.close()
    assert isinstance(ids, pa.Array)
