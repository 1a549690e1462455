"""Managing a store: the default model, `models rm`, `delete --where` with exact
statistics downdates and stale fits, `ingest --update`; a SIGKILL during each leaves the store
consistent."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from clipsql.store.fit_rows import latest_fit
from clipsql.store.ledger import committed_versions
from clipsql.store.reads import count_rows
from clipsql.store.stats import saved_stats
from clipsql.store.store import Store

from conftest import MODEL, assert_stats_match_vectors, cli, sample_ids, stored_vectors, write_image_folder, write_pool

OTHER = ["--model", "ViT-B-32", "--pretrained", "openai"]
A = "ViT-B-32/laion2b_s34b_b79k"


@pytest.fixture
def two_models(tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=600)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    cli("ingest", str(st.path), str(pool), *OTHER, "--id-column", "key", "--no-progress")
    return Store.open(st.path), pool


def model_ids(st):
    return [m.model_id for m in st.list_models()]


def test_models_default_and_list_keep_working(two_models):
    st, _ = two_models
    a, b = model_ids(st)
    assert st.model().model_id == a
    out = cli("models", "default", str(st.path), b).stdout.decode()
    assert b in out
    assert Store.open(st.path).model().model_id == b
    listing = cli("models", str(st.path)).stdout.decode()          # the old form still lists
    assert f"* {b}" in listing and f"  {a}" in listing
    rows = json.loads(cli("models", "list", str(st.path), "--format", "json").stdout)
    assert [r["default"] for r in rows] == [False, True]
    bad = cli("models", "default", str(st.path), "nope", check=False)
    assert bad.returncode == 1 and "not in this store" in bad.stderr.decode()


def test_models_rm_removes_everything_of_the_model(two_models):
    st, pool = two_models
    a, b = model_ids(st)
    cli("stats", "fit", str(st.path), "--model", a, "--reference-size", "200")
    table = st.model(a).table_name
    both = cli("models", "rm", str(st.path), "ViT-B-32", check=False)       # a part naming both: refused
    assert both.returncode == 1 and a in both.stderr.decode() and b in both.stderr.decode()
    out = cli("models", "rm", str(st.path), "laion").stdout.decode()        # a unique part, as `models default`
    assert f"removed {a}:" in out
    assert "1200 embedding rows, 1 fit(s)" in out and f"default model now: {b}" in out
    st = Store.open(st.path)
    assert model_ids(st) == [b] and st.model().model_id == b
    assert table not in committed_versions(st)          # the catalog forgot it; its files stay for the
    assert table in st.table_names()                     # retention (sessions opened before read them)
    assert latest_fit(st, st.model(b)) is None and len(sample_ids(st)) == 1200   # samples stay
    assert_stats_match_vectors(st, b)
    # ingesting the removed model again starts from nothing (its source units were forgotten, the kept
    # table is deleted first)
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    st = Store.open(st.path)
    assert count_rows(st, st.model(a)) == 1200
    assert_stats_match_vectors(st, a)


def test_delete_downdates_statistics_exactly_and_marks_fits_stale(two_models):
    st, _ = two_models
    a, b = model_ids(st)
    cli("stats", "fit", str(st.path), "--model", a, "--reference-size", "200")
    where = "id LIKE '000%' AND CAST(substr(id, 4) AS INTEGER) % 3 = 0"
    dry = cli("delete", str(st.path), "--where", where, "--dry-run").stdout.decode()
    assert "would delete 200 samples" in dry
    assert count_rows(Store.open(st.path), st.model(a)) == 1200
    before_ids, _, _ = stored_vectors(st, a)
    out = cli("delete", str(st.path), "--where", where).stdout.decode()
    assert "deleted 200 samples (200 from" in out and "now stale" in out
    st = Store.open(st.path)
    ids, _, _ = stored_vectors(st, a)
    assert len(ids) == 1000 and set(ids) < set(before_ids)
    assert not any(i.startswith("000") and int(i[3:]) % 3 == 0 for i in ids)
    assert len(sample_ids(st)) == 1000
    for m in (a, b):                       # every model downdated: equal to numpy over what is left
        assert_stats_match_vectors(st, m)
    from clipsql.store.fits import staleness
    assert "stale: 200 of its rows were deleted" in staleness(st, st.model(a))
    assert staleness(st, st.model(b)) is None           # no fit
    show = cli("stats", "show", str(st.path), "--model", a).stdout.decode()
    assert "is stale" in show
    bad = cli("delete", str(st.path), "--where", "no_such_column = 1", check=False)
    assert bad.returncode == 1 and "no_such_column" in bad.stderr.decode() and "Traceback" not in bad.stderr.decode()
    empty = cli("delete", str(st.path), "--where", " ", check=False)
    assert empty.returncode == 1 and "--where true" in empty.stderr.decode()


def test_delete_everything_leaves_empty_statistics(two_models):
    st, _ = two_models
    cli("delete", str(st.path), "--where", "true")
    st = Store.open(st.path)
    for m in st.list_models():
        assert count_rows(st, m) == 0 and saved_stats(st, m).n == 0


@pytest.mark.parametrize("point", ["delete:after-lance", "models-rm:after-catalog"])
def test_kill_during_delete_or_rm_leaves_a_consistent_store(two_models, point):
    st, _ = two_models
    a, b = model_ids(st)
    args = (["delete", str(st.path), "--where", "id LIKE '001%'"] if point.startswith("delete")
            else ["models", "rm", str(st.path), a])
    p = cli(*args, env={"CLIPSQL_FAULT": point}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    for m in st.list_models():                  # what a reader sees: consistent, statistics current
        assert saved_stats(st, m).n == count_rows(st, m)
        assert_stats_match_vectors(st, m.model_id)
    if point.startswith("delete"):
        assert count_rows(st, st.model(a)) == 1200        # not committed: nothing deleted
        cli(*args)                                       # the next writer rolls back, then deletes
        st = Store.open(st.path)
        assert count_rows(st, st.model(a)) == 600 and len(sample_ids(st)) == 600
        for m in (a, b):
            assert_stats_match_vectors(st, m)
    else:
        assert model_ids(st) == [b]                      # committed: the model is gone ...
        cli("optimize", str(st.path), "--retention-hours", "0")   # ... and a writer past the retention
        #                                                             removes its table
        assert st.model(b).table_name in Store.open(st.path).table_names()
        assert not any(n.startswith("emb_") and n != st.model(b).table_name
                       for n in Store.open(st.path).table_names())


def write_csv(path, captions, extra=None):
    cols = {"key": [f"k{i}" for i in range(len(captions))], "image": [f"img{i}.png" for i in range(len(captions))],
            "caption": captions}
    cols.update(extra or {})
    pcsv.write_csv(pa.table(cols), path)


def write_folder_csv(folder, captions, meta=None):
    """A csv of images (the conftest tiny PNGs) with a stable key column."""
    imgs = write_image_folder(folder / "imgs", len(captions))
    files = sorted(p.name for p in imgs.glob("*.png"))
    cols = {"key": [f"k{i}" for i in range(len(captions))], "image": [str(imgs / f) for f in files],
            "caption": captions}
    cols.update(meta or {})
    path = folder / "data.csv"
    pcsv.write_csv(pa.table(cols), path)
    return path


def test_ingest_update_rewrites_captions_and_reencodes_text(tmp_path, tiny_model):
    caps = [f"a picture of thing {i}" for i in range(12)]
    path = write_folder_csv(tmp_path, caps, {"score": list(range(12))})
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(path), "--model", tiny_model, "--id-column", "key", "--no-progress"]
    cli(*args)
    cli("stats", "fit", str(st.path), "--reference-size", "5")
    _, img0, txt0 = stored_vectors(Store.open(st.path))
    fixed = list(caps)
    fixed[3], fixed[7] = "a corrected caption", "another corrected caption"
    score = list(range(12))
    score[5] = 99
    os.utime(path, None)
    write_folder_csv(tmp_path, fixed, {"score": score})
    plain = cli(*args).stdout.decode()                       # without --update: nothing changes …
    assert "skipped (already present) 12" in plain
    assert Store.open(st.path).samples_table().to_table().column("caption").to_pylist().count(fixed[3]) == 0
    bad = cli("ingest", str(st.path), str(path), "--model", tiny_model, "--update", check=False)
    assert bad.returncode == 1 and "--id-column" in bad.stderr.decode()
    write_folder_csv(tmp_path, fixed, {"score": score})      # a new mtime: the unit is read again
    out = cli(*args, "--update").stdout.decode()             # … with it, the changed rows are rewritten
    assert "3 samples rewritten, 2 text embeddings re-encoded" in out, out
    st = Store.open(st.path)
    ids, img, txt = stored_vectors(st)
    caps_by_id = dict(zip(*[st.samples_table().to_table().column(c).to_pylist() for c in ("id", "caption")]))
    assert caps_by_id["k3"] == fixed[3] and caps_by_id["k7"] == fixed[7] and caps_by_id["k0"] == caps[0]
    emb_caps = dict(zip(*[st.embeddings_table(st.model()).to_table().column(c).to_pylist() for c in ("id", "caption")]))
    assert emb_caps["k3"] == fixed[3]
    np.testing.assert_array_equal(img, img0)                 # images untouched
    changed = [ids.index("k3"), ids.index("k7")]
    same = [i for i in range(12) if i not in changed]
    np.testing.assert_array_equal(txt[same], txt0[same])
    assert not np.allclose(txt[changed], txt0[changed])
    # the new text vectors are what the model gives the new captions (a fresh store agrees)
    fresh = Store.init(tmp_path / "fresh")
    cli("ingest", str(fresh.path), str(path), "--model", tiny_model, "--id-column", "key", "--no-progress")
    _, _, txt_fresh = stored_vectors(Store.open(fresh.path))
    np.testing.assert_allclose(txt, txt_fresh, rtol=1e-5, atol=1e-6)
    assert_stats_match_vectors(st)
    meta = st.samples_table().to_table(columns=["id", "metadata"]).to_pylist()
    assert json.loads(next(m for m in meta if m["id"] == "k5")["metadata"])["score"] == 99
    from clipsql.store.fits import staleness
    assert "captions of 2 of its rows were rewritten" in staleness(st, st.model())
    again = cli(*args, "--update").stdout.decode()           # nothing changed since: nothing rewritten
    assert "rewritten" not in again


def test_kill_during_update_leaves_old_rows(tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=300)
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    cli(*args)
    _, _, txt0 = stored_vectors(Store.open(st.path))
    import pyarrow.parquet as pq
    meta = pool / "metadata" / "metadata_0.parquet"
    t = pq.read_table(meta)
    caps = t.column("caption").to_pylist()
    caps[10] = "changed"
    pq.write_table(t.set_column(t.schema.get_field_index("caption"), "caption", pa.array(caps)), meta,
                   row_group_size=250)
    txt_file = pool / "text_emb" / "text_emb_0.npy"
    T = np.load(txt_file)
    T[10] += 1.0
    np.save(txt_file, T)
    p = cli(*args, "--update", env={"CLIPSQL_FAULT": "update:after-lance"}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    _, _, txt = stored_vectors(st)
    np.testing.assert_array_equal(txt, txt0)
    assert_stats_match_vectors(st)
    out = cli(*args, "--update").stdout.decode()
    assert "1 samples rewritten, 1 text embeddings re-encoded" in out, out
    st = Store.open(st.path)
    ids, _, txt = stored_vectors(st)
    np.testing.assert_array_equal(txt[ids.index("000000010")], T[10])
    assert_stats_match_vectors(st)


def corrected_copy(pool, folder, captions=None):
    """The pool again at another path (new source units), with some captions corrected."""
    import shutil
    import pyarrow.parquet as pq
    shutil.copytree(pool, folder)
    meta = folder / "metadata" / "metadata_0.parquet"
    t = pq.read_table(meta)
    caps = t.column("caption").to_pylist()
    for i, c in (captions or {}).items():
        caps[i] = c
    pq.write_table(t.set_column(t.schema.get_field_index("caption"), "caption", pa.array(caps)), meta,
                   row_group_size=100)
    return folder


def test_deleted_ids_stay_deleted_until_undeleted(tmp_path):
    """A delete is recorded (ids, when, the --where) in the same commit; every later ingest, with
    --update too and from another source, skips those ids and says so; `undelete` lets them back."""
    import datetime
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=300, row_group=100)
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    cli(*args)
    _, _, txt0 = stored_vectors(Store.open(st.path))
    where = "CAST(substr(id, 4) AS INTEGER) % 10 = 0"
    out = cli("delete", str(st.path), "--where", where).stdout.decode()
    assert "deleted 30 samples" in out and "recorded 30 deleted ids" in out, out
    gone = {f"000{i:06d}" for i in range(0, 300, 10)}
    rec = json.loads(cli("query", str(st.path), "SELECT count(*) AS n, min(deleted_where) AS w, "
                         "count(DISTINCT source) AS s FROM deletions", "--format", "json").stdout)
    assert rec == [{"n": 30, "w": where, "s": 1}], rec
    # a corrected table with new captions (two of them of deleted rows), ingested with --update
    fixed = corrected_copy(pool, tmp_path / "table_corrected", {10: "a corrected caption", 11: "fixed too"})
    upd = ["ingest", str(st.path), str(fixed), *MODEL, "--id-column", "key", "--no-progress", "--update"]
    out = cli(*upd).stdout.decode()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"30 skipped: deleted on {today}" in out and "added 0" in out, out
    assert "1 samples rewritten" in out, out               # only the stored row's caption (k11)
    st = Store.open(st.path)
    ids, _, _ = stored_vectors(st)
    assert len(ids) == 270 and not gone & set(ids) and not gone & set(sample_ids(st))
    assert_stats_match_vectors(st)
    # optimize keeps the record; doctor checks it
    cli("optimize", str(st.path), "--retention-hours", "0")
    p = cli("doctor", str(st.path), "--format", "json", check=False)
    rep = json.loads(p.stdout)
    assert p.returncode == 0 and any(f["check"] == "deletions" and "30 deleted ids" in f["detail"]
                                     for f in rep["findings"]), rep
    # undelete one: the next ingest of its source restores it (and still skips the other 29)
    bad = cli("undelete", str(st.path), "--where", "nope = 1", check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr.decode() and "Traceback" not in bad.stderr.decode()
    dry = cli("undelete", str(st.path), "--where", "id = '000000010'", "--dry-run").stdout.decode()
    assert "would let 1 deleted ids back in" in dry, dry
    out = cli("undelete", str(st.path), "--where", "id = '000000010'").stdout.decode()
    assert "removed 1 ids from the deletions record" in out and str(pool) in out, out
    out = cli(*args).stdout.decode()
    assert "added 1," in out and f"29 skipped: deleted on {today}" in out, out
    st = Store.open(st.path)
    ids, _, txt = stored_vectors(st)
    assert len(ids) == 271 and "000000010" in ids and not (gone - {"000000010"}) & set(ids)
    np.testing.assert_array_equal(txt[ids.index("000000010")], txt0[10])
    assert_stats_match_vectors(st)
    assert json.loads(cli("query", str(st.path), "SELECT count(*) AS n FROM deletions", "--format",
                          "json").stdout) == [{"n": 29}]
    assert "added 0" in cli(*args).stdout.decode()          # the ledger is whole again: nothing re-read


def test_kill_during_a_recorded_delete_leaves_no_record(tmp_path):
    """The record is part of the delete's commit: a kill after the Lance writes leaves neither."""
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=200)
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    cli(*args)
    p = cli("delete", str(st.path), "--where", "id LIKE '0000000%'", env={"CLIPSQL_FAULT": "delete:after-lance"},
            check=False)
    assert p.returncode == -9
    q = cli("query", str(st.path), "SELECT count(*) AS n FROM deletions", "--format", "json")
    assert json.loads(q.stdout) == [{"n": 0}]
    cli("delete", str(st.path), "--where", "id LIKE '0000000%'")      # the next writer rolls back, then deletes
    q = cli("query", str(st.path), "SELECT count(*) AS n FROM deletions", "--format", "json")
    assert json.loads(q.stdout) == [{"n": 100}]
    assert len(sample_ids(Store.open(st.path))) == 100


def test_deleted_content_ids_are_skipped_from_any_path(tmp_path, tiny_model):
    """Content ids hash image bytes + caption: the same image and caption copied elsewhere is the
    same id, and stays deleted."""
    import shutil
    from conftest import write_image_folder
    src = write_image_folder(tmp_path / "a", 12)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(src), "--model", tiny_model, "--no-progress")
    out = cli("delete", str(st.path), "--where", "caption LIKE '% 3' OR caption LIKE '% 7'").stdout.decode()
    assert "deleted 2 samples" in out, out
    shutil.copytree(src, tmp_path / "b")
    out = cli("ingest", str(st.path), str(tmp_path / "b"), "--model", tiny_model, "--no-progress").stdout.decode()
    assert "2 skipped: deleted on" in out and "added 0" in out, out
    assert len(sample_ids(Store.open(st.path))) == 10


def test_update_decodes_nothing_and_encodes_only_changed_captions(tmp_path, fake_encoder, monkeypatch):
    """--update over rows the store holds: no image is decoded (an id column's rows are compared by
    caption and metadata), the text tower runs for the changed captions only, and a run in which
    nothing changed does not load the model."""
    from clipsql.ingest import encode
    from clipsql.ingest.pipeline import ingest
    decodes = []
    real = encode.load_image
    monkeypatch.setattr(encode, "load_image", lambda data, *a, **kw: decodes.append(1) or real(data, *a, **kw))
    fake = fake_encoder
    caps = [f"a picture of thing {i}" for i in range(12)]
    path = write_folder_csv(tmp_path, caps, {"score": list(range(12))})
    st = Store.init(tmp_path / "s")
    ingest(st, str(path), model=fake.model, options=fake.options(id_column="key"))
    assert (fake.loads, fake.images, fake.texts, len(decodes)) == (1, 12, 12, 12)
    fixed = list(caps)
    fixed[3], fixed[7] = "a corrected caption", "another corrected caption"
    score = list(range(12))
    score[5] = 99
    write_folder_csv(tmp_path, fixed, {"score": score})      # a new mtime: the unit is read again
    s = ingest(st, str(path), model=fake.model, options=fake.options(id_column="key", update=True))
    assert (s.added, s.updated, s.updated_samples) == (0, 2, 3)
    assert (fake.loads, fake.images, fake.texts, len(decodes)) == (2, 12, 14, 12)   # 2 captions, no image
    assert sorted(fake.captions[12:]) == sorted([fixed[3], fixed[7]])
    caps_by_id = dict(zip(*[st.samples_table().to_table().column(c).to_pylist() for c in ("id", "caption")]))
    assert caps_by_id["k3"] == fixed[3] and caps_by_id["k0"] == caps[0]
    write_folder_csv(tmp_path, fixed, {"score": score})      # read again, nothing changed
    s = ingest(st, str(path), model=fake.model, options=fake.options(id_column="key", update=True))
    assert (s.added, s.updated, s.updated_samples, s.skipped) == (0, 0, 0, 12)
    assert (fake.loads, fake.images, fake.texts, len(decodes)) == (2, 12, 14, 12)   # no load, decode or encode
    assert_stats_match_vectors(st)
