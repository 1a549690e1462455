"""`doctor --repair` after a lost Lance data file or a damaged manifest: it keeps every row still
readable (a lost file costs its own rows, never later commits'), never deletes intact embeddings,
forgets the source units whose rows it dropped (so re-running the ingest restores them: the store
then equals an uninterrupted ingest), reports what it could not keep as lost and marks the fits
that covered lost rows stale."""
import glob
import json
import os

import lance
import numpy as np
import pytest

from clipsql.store.fit_rows import latest_fit
from clipsql.store.ledger import committed_versions
from clipsql.store.reads import count_rows
from clipsql.store.store import Store

from conftest import assert_stats_match_vectors, sample_ids
from conftest import MODEL, assert_same_store, cli, write_pool

ROWS, COMMIT = 600, 100          # 2 shards × 300 rows, units of 50 rows, a commit every 100 rows: 6 commits


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(folder, shards=2, rows=ROWS // 2, row_group=50)
    return folder


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    st = Store.init(tmp_path_factory.mktemp("ref") / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    return Store.open(st.path)


def ingest_args(st, pool):
    return ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress",
            "--commit-rows", str(COMMIT)]


@pytest.fixture
def store(pool, tmp_path):
    st = Store.init(tmp_path / "s")
    out = cli(*ingest_args(st, pool)).stdout.decode()
    assert f"added {ROWS}" in out and f"{ROWS // COMMIT} commit(s)" in out, out
    cli("stats", "fit", str(st.path), "--reference-size", "100")
    return Store.open(st.path)


def doctor_json(st, *args):
    p = cli("doctor", str(st.path), "--format", "json", *args, check=False)
    assert "Traceback" not in p.stderr.decode(), p.stderr.decode()
    return p.returncode, json.loads(p.stdout)


def table_of(st, which):
    return st.model().table_name if which == "embeddings" else "samples"


def lose_data_file(st, which, k=2):
    """Delete the data file of the k-th fragment (one commit's rows) of the committed version."""
    uri = st.table_uri(table_of(st, which))
    frag = lance.dataset(uri, version=committed_versions(st)[table_of(st, which)]).get_fragments()[k]
    assert frag.count_rows() == COMMIT
    os.unlink(os.path.join(uri, "data", frag.data_files()[0].path))


def truncate_newest_manifest(st, which):
    name = table_of(st, which)
    uri = st.table_uri(name)
    committed = committed_versions(st)[name]
    mf = [m for m in glob.glob(f"{uri}/_versions/*.manifest")
          if int(os.path.basename(m)[:-len(".manifest")]) == (1 << 64) - 1 - committed][0]
    data = open(mf, "rb").read()
    open(mf, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("which", ["embeddings", "samples"])
@pytest.mark.parametrize("damage", ["data file", "manifest"])
def test_repair_keeps_what_reads_and_a_reingest_restores_the_rest(store, pool, reference, which, damage):
    st = store
    (lose_data_file if damage == "data file" else truncate_newest_manifest)(st, which)
    rc, rep = doctor_json(st)
    assert rc == 1, rep
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0, rep
    st = Store.open(st.path)
    rec = st.model()
    # a lost file costs its own commit's rows, a damaged newest manifest the last commit's: no more
    if which == "embeddings":
        assert (count_rows(st, rec), len(sample_ids(st))) == (ROWS - COMMIT, ROWS)
    else:        # intact embeddings are never deleted: only their samples were lost
        assert (count_rows(st, rec), len(sample_ids(st))) == (ROWS, ROWS - COMMIT)
    assert rep.get("lost_rows") == COMMIT, rep
    lost = [f for f in rep["findings"] if f["check"].startswith("lost")]
    assert lost and str(COMMIT) in lost[0]["detail"] and "ingest" in lost[0]["detail"], rep
    assert_stats_match_vectors(st)                      # recomputed exactly over what remains
    if which == "embeddings":                           # the fit covered lost rows: stale
        from clipsql.store.fits import staleness
        assert "stale" in (staleness(st, rec) or ""), staleness(st, rec)
        show = cli("stats", "show", str(st.path)).stdout.decode()
        assert "is stale" in show and "-100 rows added" not in show, show
    # afterwards doctor says what is missing and why, not "left by models rm"
    rc, rep = doctor_json(st)
    assert rc == 0 and rep["warnings"] >= 1, rep
    text = cli("doctor", str(st.path), check=False).stdout.decode()
    assert "lost" in text and "left by `models rm`" not in text, text
    assert text.strip().endswith("re-run the ingest named above to restore the lost rows"), text
    # re-running the same ingest restores exactly the lost rows
    out = cli(*ingest_args(st, pool)).stdout.decode()
    assert (f"added {COMMIT}," if which == "embeddings" else f"{COMMIT} samples restored") in out, out
    assert_same_store(Store.open(st.path), reference)
    rc, rep = doctor_json(st)
    assert rc == 0 and rep["warnings"] == 0, rep
    again = cli(*ingest_args(st, pool)).stdout.decode()  # and then the ledger is whole again
    assert "added 0" in again and "source unit(s) already ingested" in again, again


@pytest.mark.parametrize("pruned", [False, True])
def test_repair_of_a_lost_data_file_after_compaction(pool, reference, tmp_path, pruned):
    """A compacted fragment holds the rows of every commit. While the compaction's inputs are kept
    (the retention window) its rows are read back from them and nothing is lost; once pruned, all
    its rows are lost, every unit that held them is forgotten and a re-ingest restores them."""
    st = Store.init(tmp_path / "s")
    cli(*ingest_args(st, pool))
    cli("optimize", str(st.path), *(["--retention-hours", "0"] if pruned else []))
    st = Store.open(st.path)
    name = st.model().table_name
    uri = st.table_uri(name)
    frags = lance.dataset(uri, version=committed_versions(st)[name]).get_fragments()
    assert len(frags) == 1 and frags[0].count_rows() == ROWS
    os.unlink(os.path.join(uri, "data", frags[0].data_files()[0].path))
    rc, rep = doctor_json(st, "--repair")
    st = Store.open(st.path)
    assert len(sample_ids(st)) == ROWS
    if not pruned:
        assert rc == 0 and rep.get("lost_rows") == 0, rep
        assert_same_store(st, reference)
        rc, rep = doctor_json(st)
        assert rc == 0 and rep["warnings"] == 0, rep
        return
    assert count_rows(st, st.model()) == 0
    assert rc == 0 and rep.get("lost_rows") == ROWS, rep
    cli(*ingest_args(st, pool))
    assert_same_store(Store.open(st.path), reference)


def test_a_rollback_past_a_delete_deletes_the_rows_again(store):
    """A damaged manifest made by a delete: the table goes back to the version before it, and the
    deletions record (kept) has the repair delete those rows again — nothing deleted comes back."""
    st = store
    out = cli("delete", str(st.path), "--where", "CAST(substr(id, 4) AS INTEGER) % 20 = 0").stdout.decode()
    assert "deleted 30 samples" in out, out
    truncate_newest_manifest(st, "embeddings")
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0 and rep.get("lost_rows") == 0, rep
    again = [f for f in rep["findings"] if f["check"] == "deletions"]
    assert again and "30 ids recorded as deleted are stored again" in again[0]["detail"] and again[0]["repaired"]
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == ROWS - 30 and len(sample_ids(st)) == ROWS - 30
    assert_stats_match_vectors(st)
    rc, rep = doctor_json(st)
    assert rc == 0 and rep["warnings"] == 0, rep


def flip_blob(st, table, column, where, offsets=(0.5,)):
    """Flip one byte (at each relative offset) of a blob in the SQLite catalog, as bad sectors would."""
    import sqlite3
    st.engine.dispose()
    con = sqlite3.connect(st.path / "catalog.sqlite")
    blob = bytearray(con.execute(f"SELECT {column} FROM {table} WHERE {where}").fetchone()[0])
    for at in offsets:
        blob[int(len(blob) * at) if at >= 0 else int(at)] ^= 0xFF
    con.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (bytes(blob),))
    con.commit()
    con.close()


def one_line_error(p):
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_damaged_catalog_blobs_are_found_dropped_or_rebuilt_and_readers_say_so_in_one_line(store):
    """Flipped bytes in a fit's arrays, a target's second moment and the running statistics:
    readers fail in one line naming the fit / target / statistics and `doctor --repair`; doctor
    reads every blob back and reports them; --repair drops the fit (saying what to refit), rebuilds
    the target's moment and the statistics from the stored rows; then the store is consistent and
    every score either works or says to refit."""
    path = str(store.path)
    cli("target", "add", path, "t", "--query", "SELECT image_embedding FROM embeddings LIMIT 50")
    cli("score", path, "--columns", "image_info_gain")
    st = Store.open(store.path)
    fit = latest_fit(st, st.model(), with_arrays=False).fit_id
    before = cli("query", path, "SELECT round(norm_sim_2(image_embedding, 't'), 9) FROM embeddings ORDER BY id "
                 "LIMIT 5", "--format", "csv").stdout
    flip_blob(st, "fits", "arrays", f"fit_id = {fit}")
    flip_blob(st, "targets", "second_moment", "name = 't'", offsets=(-1,))      # the last float's exponent
    flip_blob(st, "running_stats", "sum", "modality = 'image' AND space = 'raw'", offsets=(0.7,))
    err = one_line_error(cli("query", path, "SELECT image_info_gain FROM scores LIMIT 3", check=False))
    assert f"fit #{fit}" in err and "doctor" in err and "--repair" in err and "stats fit" in err, err
    rc, rep = doctor_json(st)
    bad = {f["check"] for f in rep["findings"] if f["level"] == "error"}
    assert rc != 0 and not rep["consistent"] and {f"fit #{fit}", "target t"} <= bad, rep
    assert any(c.startswith("statistics") for c in bad), rep
    rc, rep = doctor_json(st, "--repair")
    repaired = {f["check"]: f["repaired"] for f in rep["findings"] if f["level"] == "error"}
    assert "dropped" in repaired[f"fit #{fit}"] and "stats fit" in repaired[f"fit #{fit}"], repaired
    assert "score" in repaired[f"fit #{fit}"] and "recomputed" in repaired["target t"], repaired
    rc, rep = doctor_json(st)
    assert rc == 0 and rep["consistent"], [f for f in rep["findings"] if f["level"] != "ok"]
    st = Store.open(store.path)
    assert latest_fit(st, st.model(), with_arrays=False) is None
    assert_stats_match_vectors(st)
    err = one_line_error(cli("query", path, "SELECT image_info_gain FROM scores LIMIT 3", check=False))
    assert "stats fit" in err, err
    after = cli("query", path, "SELECT round(norm_sim_2(image_embedding, 't'), 9) FROM embeddings ORDER BY id "
                "LIMIT 5", "--format", "csv").stdout
    got, want = (np.array(x.decode().splitlines()[1:], float) for x in (after, before))
    np.testing.assert_allclose(got, want, rtol=1e-6)      # rebuilt from the target's float32 rows
    cli("stats", "fit", path, "--reference-size", "100")
    cli("query", path, "SELECT image_info_gain FROM scores LIMIT 3")
