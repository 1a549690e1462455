"""Managing a store (issue 10.2): the default model, `models rm`, `delete --where` with exact
statistics downdates and stale fits, `ingest --update`; a SIGKILL during each leaves the store
consistent."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from store.store import Store

from .test_ingest import assert_stats_match_vectors, sample_ids, stored_vectors
from .test_ledger import MODEL, cli, write_pool

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
    part = cli("models", "rm", str(st.path), "laion", check=False)
    assert part.returncode == 1 and "exact model id" in part.stderr.decode()
    out = cli("models", "rm", str(st.path), a).stdout.decode()
    assert "1200 embedding rows, 1 fit(s)" in out and f"default model now: {b}" in out
    st = Store.open(st.path)
    assert model_ids(st) == [b] and st.model().model_id == b
    assert table not in st._table_names()
    assert st.latest_fit(st.model(b)) is None and len(sample_ids(st)) == 1200   # samples stay
    assert_stats_match_vectors(st, b)
    # ingesting the removed model again starts from nothing (its source units were forgotten)
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    st = Store.open(st.path)
    assert st.count_rows(st.model(a)) == 1200
    assert_stats_match_vectors(st, a)


def test_delete_downdates_statistics_exactly_and_marks_fits_stale(two_models):
    st, _ = two_models
    a, b = model_ids(st)
    cli("stats", "fit", str(st.path), "--model", a, "--reference-size", "200")
    where = "id LIKE '000%' AND CAST(substr(id, 4) AS INTEGER) % 3 = 0"
    dry = cli("delete", str(st.path), "--where", where, "--dry-run").stdout.decode()
    assert "would delete 200 samples" in dry
    assert Store.open(st.path).count_rows(st.model(a)) == 1200
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
    from queries.curation.fit import staleness
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
        assert st.count_rows(m) == 0 and st.stats(m).n == 0


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
        assert st.stats(m).n == st.count_rows(m)
        assert_stats_match_vectors(st, m.model_id)
    if point.startswith("delete"):
        assert st.count_rows(st.model(a)) == 1200        # not committed: nothing deleted
        cli(*args)                                       # the next writer rolls back, then deletes
        st = Store.open(st.path)
        assert st.count_rows(st.model(a)) == 600 and len(sample_ids(st)) == 600
        for m in (a, b):
            assert_stats_match_vectors(st, m)
    else:
        assert model_ids(st) == [b]                      # committed: the model is gone ...
        cli("optimize", str(st.path))                    # ... and the next writer removes its table
        assert st.model(b).table_name in Store.open(st.path)._table_names()
        assert not any(n.startswith("emb_") and n != st.model(b).table_name
                       for n in Store.open(st.path)._table_names())


def write_csv(path, captions, extra=None):
    cols = {"key": [f"k{i}" for i in range(len(captions))], "image": [f"img{i}.png" for i in range(len(captions))],
            "caption": captions}
    cols.update(extra or {})
    pcsv.write_csv(pa.table(cols), path)
