"""Tags (store.tags): a versioned table committed through the ledger, the `tags` view, select --where,
snapshots, crash safety (SIGKILL between the Lance commit and the ledger transaction), optimize/doctor."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.errors import StoreLocked, TagError
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store import tags
from clipsql.store.ledger import committed_versions
from clipsql.store.store import Store

from conftest import clip_like
from conftest import ROOT, cli

N = 120


def write_precomputed(path, n, seed=0, urls=None):
    img, txt = clip_like(n, np.random.default_rng(seed))
    pq.write_table(pa.table({
        "id": [f"r{i:04d}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "url": urls if urls is not None else [f"file:///x/{i}.jpg" for i in range(n)],
        "kind": ["a" if i % 3 else "b" for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), img.shape[1]),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), txt.shape[1]),
    }), path)
    return path


@pytest.fixture
def tag_store(tmp_path, tiny_model):
    st = Store.init(tmp_path / "store")
    ingest(st, str(write_precomputed(tmp_path / "e.parquet", N)), model=tiny_model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    return Store.open(st.path)


def tagged(store, tag):
    con = queries.connect(store)
    try:
        return [r[0] for r in con.execute("SELECT id FROM samples JOIN tags USING (id) WHERE tag = ? ORDER BY id",
                                          [tag]).fetchall()]
    finally:
        con.close()


def test_add_remove_and_read_back_through_sql(tag_store):
    st = tag_store
    assert tagged(st, "reject") == []                       # the view exists (empty) before any tag
    out = tags.add_tags(st, ["r0003", "r0001", "r0002", "r0001"], "reject")
    assert (out["added"], out["already"]) == (3, 0) and out["commit_id"] is not None
    assert tagged(st, "reject") == ["r0001", "r0002", "r0003"]
    again = tags.add_tags(st, ["r0002", "r0004"], " reject ")   # names are stripped; one row per (id, tag)
    assert (again["added"], again["already"]) == (1, 1)
    tags.add_tags(st, ["r0002"], "keep")
    assert tags.remove_tags(st, ["r0002", "r0099"], "reject")["removed"] == 1
    assert tagged(st, "reject") == ["r0001", "r0003", "r0004"] and tagged(st, "keep") == ["r0002"]
    assert tags.remove_tags(st, ["r0001"], "never-used")["commit_id"] is None
    tbl = tags.read(st)
    assert tbl.num_rows == 4 and tbl.schema.field("tagged_at").type == pa.timestamp("us", tz="UTC")
    p = cli("query", str(st.path), "SELECT count(*) AS n FROM samples JOIN tags USING (id) WHERE tag = 'reject'",
            "--format", "json")
    assert json.loads(p.stdout)[0]["n"] == 3


def test_bad_tags_and_unknown_ids_change_nothing(tag_store):
    st = tag_store
    for bad in ("", "   ", "x" * 201, "a\nb", None, 3):
        with pytest.raises(TagError):
            tags.add_tags(st, ["r0001"], bad)
    with pytest.raises(TagError, match="not samples of this store"):
        tags.add_tags(st, ["r0001", "nope"], "reject")
    assert tagged(st, "reject") == []
    assert "tags" not in committed_versions(st) or tags.read(st).num_rows == 0


def test_a_reader_keeps_its_snapshot_and_the_next_one_sees_the_commit(tag_store):
    st = tag_store
    tags.add_tags(st, ["r0001"], "reject")
    before = queries.connect(st)
    tags.add_tags(st, ["r0002"], "reject")
    after = queries.connect(st)
    q = "SELECT list(id ORDER BY id) FROM tags WHERE tag = 'reject'"
    assert before.execute(q).fetchall()[0][0] == ["r0001"]
    assert after.execute(q).fetchall()[0][0] == ["r0001", "r0002"]


def test_select_where_on_tags(tag_store, tmp_path):
    """`select --where` reads the tags view, with a recipe and with --sql (which ignored --where before)."""
    st = tag_store
    tags.add_tags(st, pa.array(["r0005", "r0007", "r0009"]), "keep")
    where = "id IN (SELECT id FROM tags WHERE tag = 'keep')"
    out = tmp_path / "kept.txt"
    cli("select", str(st.path), "--sql", "SELECT id FROM samples ORDER BY id DESC", "--where", where, "-o", str(out))
    assert out.read_text().split() == ["r0009", "r0007", "r0005"]
    side = json.loads((tmp_path / "kept.txt.json").read_text())
    assert side["counts"]["pool"] == 3 and side["where"] == where
    cli("stats", "fit", str(st.path), "--reference-size", "50")
    cli("select", str(st.path), "--recipe", "clip-score", "--limit", "10", "--where", where, "-o", str(out))
    assert sorted(out.read_text().split()) == ["r0005", "r0007", "r0009"]


def test_tag_commit_takes_the_writer_lock(tag_store):
    st = tag_store
    with st.lock():
        with pytest.raises(StoreLocked):
            tags.add_tags(Store.open(st.path), ["r0001"], "reject")
    assert tagged(st, "reject") == []


def test_large_id_sets_are_arrow_arrays(tag_store):
    """"Select all matching the filter": ids as one Arrow array above the lookup-filter size."""
    st = tag_store
    ids = pa.array([f"r{i:04d}" for i in range(N)])
    old = tags.LOOKUP_FILTER_MAX
    tags.LOOKUP_FILTER_MAX = 10                    # take the whole-scan branch on a small store
    try:
        assert tags.add_tags(st, ids, "all")["added"] == N
        assert tags.add_tags(st, ids, "all")["added"] == 0
        assert tags.remove_tags(st, ids.slice(0, 50), "all")["removed"] == 50
    finally:
        tags.LOOKUP_FILTER_MAX = old
    assert len(tagged(st, "all")) == N - 50


@pytest.mark.parametrize("action", ["add", "remove"])
def test_a_kill_between_lance_and_the_ledger_loses_nothing_committed(tag_store, action):
    """SIGKILL after the Lance commit of a tag change, before its ledger transaction: readers keep seeing
    the committed tags, doctor finds a consistent store, the next writer rolls the Lance version back."""
    st = tag_store
    tags.add_tags(st, ["r0001", "r0002"], "reject")
    code = (f"from clipsql.store import tags; from clipsql.store.store import Store; "
            f"tags.{action}_tags(Store.open({str(st.path)!r}), ['r0002', 'r0003'], 'reject')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300,
                       env=dict(os.environ, CLIPSQL_FAULT="tags:after-lance"))
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    import lance
    assert lance.dataset(st.table_uri("tags")).version > committed_versions(st)["tags"]   # a version beyond the ledger
    assert tagged(st, "reject") == ["r0001", "r0002"]
    d = cli("doctor", str(st.path), "--format", "json", check=False)
    rep = json.loads(d.stdout)
    assert d.returncode == 0, [f for f in rep["findings"] if f["level"] == "error"]
    assert any(f["check"] == "table tags" and f["level"] == "warn" for f in rep["findings"])
    tags.add_tags(Store.open(st.path), ["r0010"], "keep")          # the next writer recovers first
    assert lance.dataset(st.table_uri("tags")).version == committed_versions(st)["tags"]
    assert tagged(st, "reject") == ["r0001", "r0002"] and tagged(st, "keep") == ["r0010"]
    d = cli("doctor", str(st.path), "--format", "json", check=False)
    assert d.returncode == 0 and json.loads(d.stdout)["warnings"] == 0


def test_optimize_compacts_the_tags_table_and_keeps_its_rows(tag_store):
    st = tag_store
    for i in range(5):
        tags.add_tags(st, [f"r{i:04d}"], "reject")
    before = tags.read(st).num_rows
    cli("optimize", str(st.path), "--retention-hours", "0")
    st = Store.open(st.path)
    assert len(st.dataset("tags").get_fragments()) == 1
    assert tags.read(st).num_rows == before == 5
    assert tagged(st, "reject") == [f"r{i:04d}" for i in range(5)]
