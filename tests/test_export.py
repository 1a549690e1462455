"""`clipsql export`: one committed snapshot as a DuckDB file or a parquet folder that tools without
clipsql read (the reading part runs in a separate Python that never imports clipsql), equal to the
store's own answers, exactly one committed version while a writer commits, and OUT written
atomically (absent or complete; never over something that exists)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsql.ingest.pipeline import ingest
from clipsql.queries.curation import export as export_mod
from clipsql.queries.curation.dedup import semdedup
from clipsql.queries.curation.export import export_store
from clipsql.queries.sql.db import connect
from clipsql.queries.sql.materialize import materialize_scores
from clipsql.store.fits import fit_stats
from clipsql.store.ledger import committed_versions
from clipsql.store.store import Store
from clipsql.store.writer import CommitPolicy

from conftest import FakeEncoder, cli, write_image_folder

ROOT_USER = os.geteuid() == 0
READER = r"""
import json, sys
import duckdb, pandas, pyarrow.parquet as pq
out = sys.argv[1]
res = {}
if out.endswith(".duckdb"):
    con = duckdb.connect(out, read_only=True)
    res["tables"] = sorted(r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall())
    res["samples"] = con.sql("SELECT id, caption, width FROM samples ORDER BY id").fetchall()
    res["embeddings"] = con.sql("SELECT model, id, image_embedding::DOUBLE[], text_embedding::DOUBLE[] "
                                "FROM embeddings ORDER BY model, id").fetchall()
    res["types"] = dict(con.sql("SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                                "WHERE column_name LIKE '%_embedding'").fetchall())
    res["meta"] = con.sql("SELECT table_name, kind, model, lance_table, lance_version, rows, store_id, commit_id, "
                          "clipsql_version, manifest FROM clipsql_export ORDER BY table_name").fetchall()
    res["stored"] = {t: con.sql(f'SELECT * EXCLUDE (computed_at) FROM "{t}" ORDER BY id').fetchall()
                     for t in res["tables"] if t.startswith(("stored_scores_", "semdedup_"))}
else:
    import glob, os
    res["files"] = sorted(os.listdir(out))
    df = pandas.read_parquet(os.path.join(out, "samples.parquet"))
    res["samples"] = [list(r) for r in df.sort_values("id")[["id", "caption", "width"]].itertuples(index=False)]
    res["embeddings"] = []
    for f in sorted(glob.glob(os.path.join(out, "embeddings_*.parquet"))):
        t = pq.read_table(f).sort_by("id")
        res["embeddings"] += [[m, i, list(map(float, a)), list(map(float, b))] for m, i, a, b in zip(
            *(t.column(c).to_pylist() for c in ("model", "id", "image_embedding", "text_embedding")))]
    con = duckdb.connect()
    res["duck_count"] = con.sql(f"SELECT count(*) FROM read_parquet('{out}/samples.parquet')").fetchall()[0][0]
    res["stored"] = {}
    for f in sorted(glob.glob(os.path.join(out, "stored_scores_*.parquet")) +
                    glob.glob(os.path.join(out, "semdedup_*.parquet"))):
        t = pq.read_table(f).drop_columns(["computed_at"]).sort_by("id")
        res["stored"][os.path.basename(f)[:-8]] = [list(r.values()) for r in t.to_pylist()]
    res["manifest"] = json.load(open(os.path.join(out, "_clipsql_export.json")))
assert not [m for m in sys.modules if m.split(".")[0] == "clipsql"], "the reader imported clipsql"
print(json.dumps(res, default=str))
"""


def read_without_clipsql(out: Path, cwd: Path) -> dict:
    """Open the export in a fresh Python that imports only duckdb / pandas / pyarrow."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", READER, str(out)], capture_output=True, cwd=cwd, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with two models of different dimensions, a fit, stored scores and SemDeDup columns."""
    root = tmp_path_factory.mktemp("export")
    st = Store.init(root / "store")
    data = write_image_folder(root / "data", 60)
    fa = FakeEncoder(root / "fake-a", dim=16, seed=0)
    fb = FakeEncoder(root / "fake-b", dim=8, seed=1)
    ingest(st, str(data), model=fa.model, options=fa.options())
    ingest(st, str(data), model=fb.model, options=fb.options())
    a, b = st.model("fake-a").model_id, st.model("fake-b").model_id
    st.set_setting("default_model", a)
    fit_stats(st, a, reference_size=30, seed=0)
    materialize_scores(st, ["image_info_gain", "clip_score"], a)
    semdedup(st, a, clusters=4, seed=0)
    return st, root, a, b


def store_answers(st, where=None):
    """What the store itself answers (its own DuckDB views), in the reader's shape."""
    con = connect(st)
    filt = f" WHERE {where}" if where else ""
    ids = f"(SELECT id FROM samples{filt})"
    samples = [list(r) for r in con.sql(f"SELECT id, caption, width FROM samples{filt} ORDER BY id").fetchall()]
    emb = [[m, i, list(map(float, x)), list(map(float, y))] for m, i, x, y in con.sql(
        f"SELECT model, id, image_embedding, text_embedding FROM embeddings WHERE id IN {ids} "
        "ORDER BY model, id").fetchall()]
    stored = con.sql(f"SELECT * EXCLUDE (computed_at) FROM stored_scores WHERE id IN {ids} ORDER BY id").fetchall()
    dedup = con.sql(f"SELECT * FROM semdedup WHERE id IN {ids} ORDER BY id").fetchall()
    return samples, emb, [list(r) for r in stored], [list(r) for r in dedup]


def key(st, model):
    return st.model(model).table_name[len("emb_"):]


def test_duckdb_file_opens_in_bare_duckdb_and_equals_the_store(built, tmp_path):
    st, root, a, b = built
    out = tmp_path / "snap.duckdb"
    p = cli("export", st.path, out, "--no-progress")
    assert "exported commit" in p.stdout.decode()
    got = read_without_clipsql(out, tmp_path)
    samples, emb, stored, dedup = store_answers(st)
    assert got["samples"] == samples and len(samples) == 60
    assert got["embeddings"] == emb and len(emb) == 120
    ka, kb = key(st, a), key(st, b)
    assert {"samples", f"embeddings_{ka}", f"embeddings_{kb}", f"stored_scores_{ka}", f"semdedup_{ka}",
            "clipsql_export", "embeddings"} <= set(got["tables"])
    assert got["types"][f"embeddings_{ka}.image_embedding"] == "FLOAT[16]"
    assert got["types"][f"embeddings_{kb}.text_embedding"] == "FLOAT[8]"
    assert got["types"]["embeddings.image_embedding"] == "FLOAT[]"      # two dimensions: one list type
    assert [r[:-1] for r in got["stored"][f"stored_scores_{ka}"]] == [r[:-1] for r in stored]
    assert got["stored"][f"semdedup_{ka}"] == [r for r in dedup]
    # the record: store id, the ledger's commit, each table's committed version, clipsql's version
    versions = committed_versions(st)
    meta = {r[0]: r for r in got["meta"]}
    assert meta["samples"][4] == versions["samples"] and meta["samples"][5] == 60
    assert meta[f"embeddings_{ka}"][2:5] == [a,
                                              st.model(a).table_name, versions[st.model(a).table_name]]
    assert {r[6] for r in got["meta"]} == {st.get_setting("store_id")}
    manifest = json.loads(got["meta"][0][9])
    assert manifest["commit_id"] == got["meta"][0][7] == last_commit(st)
    assert manifest["table_versions"] == {k: versions[k] for k in sorted(versions)}
    assert {m["model"] for m in manifest["models"]} == {a, b}


def last_commit(st):
    import sqlalchemy as sa
    from clipsql.store import catalog as cat
    with st.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(cat.commits.c.commit_id))).scalar()


def test_parquet_folder_reads_with_pandas_pyarrow_and_duckdb(built, tmp_path):
    st, root, a, b = built
    out = tmp_path / "snap"
    res = export_store(st, out, progress=False)
    assert res.format == "parquet" and res.commit_id == last_commit(st) and res.path == str(out)
    assert res.to_dict()["tables"] == res.manifest()["tables"] and "seconds" not in res.manifest()
    got = read_without_clipsql(out, tmp_path)
    samples, emb, stored, dedup = store_answers(st)
    assert got["samples"] == samples and got["duck_count"] == 60
    assert got["embeddings"] == emb
    ka = key(st, a)
    assert [r[:-1] for r in got["stored"][f"stored_scores_{ka}"]] == [r[:-1] for r in stored]
    assert got["stored"][f"semdedup_{ka}"] == dedup
    assert "_clipsql_export.json" in got["files"] and not [f for f in got["files"] if ".tmp" in f]
    man = got["manifest"]
    assert man["store_id"] == st.get_setting("store_id") and man["clipsql_version"]
    assert {t["table"]: t["rows"] for t in man["tables"]}["samples"] == 60
    # fixed-size vectors survive the round trip for Arrow readers
    t = pq.read_table(out / f"embeddings_{ka}.parquet")
    assert t.schema.field("image_embedding").type.list_size == 16


def test_where_columns_and_model_follow_by_id(built, tmp_path):
    st, root, a, b = built
    where = "caption LIKE '%red%'"
    out = tmp_path / "red.duckdb"
    res = export_store(st, out, where=where, columns=["caption", "width"], model=a, progress=False)
    samples, emb, stored, dedup = store_answers(st, where)
    assert 0 < len(samples) < 60
    import duckdb
    con = duckdb.connect(str(out), read_only=True)
    assert [d[0] for d in con.sql("DESCRIBE samples").fetchall()] == ["id", "caption", "width"]
    assert [list(r) for r in con.sql("SELECT id, caption, width FROM samples ORDER BY id").fetchall()] == samples
    ka, kb = key(st, a), key(st, b)
    tables = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert f"embeddings_{kb}" not in tables                       # --model: that model only
    ids = [r[0] for r in samples]
    assert [r[0] for r in con.sql(f'SELECT id FROM "embeddings_{ka}" ORDER BY id').fetchall()] == ids
    assert [r[0] for r in con.sql(f'SELECT id FROM "stored_scores_{ka}" ORDER BY id').fetchall()] == ids
    assert con.sql("SELECT DISTINCT where_clause FROM clipsql_export").fetchall() == [(where,)]
    assert res.where == where


@pytest.mark.parametrize("when", ["between the ledger read and the views", "while the tables are written"])
def test_an_export_during_a_writers_commits_shows_one_committed_version(tmp_path, monkeypatch, when):
    st = Store.init(tmp_path / "s")
    fake = FakeEncoder(tmp_path / "fake", dim=16)
    fake_id = "fake"
    first, more = write_image_folder(tmp_path / "d1", 30, seed=1), write_image_folder(tmp_path / "d2", 50, seed=2)
    ingest(st, str(first), model=fake.model, options=fake.options())
    before_versions, before_commit = committed_versions(st), last_commit(st)
    writer = Store.open(st.path)
    commits = []

    def commit_more():          # another writer commits 50 more rows
        if not commits:
            commits.append(ingest(writer, str(more), model=fake.model,
                                  options=fake.options(policy=CommitPolicy(rows=20, seconds=3600))))

    if when.startswith("between"):
        real = export_mod.connect

        def connect_late(*args, **kw):
            commit_more()
            return real(*args, **kw)
        monkeypatch.setattr(export_mod, "connect", connect_late)
    else:
        real_batches = export_mod._batches

        def batches_late(con, part, bar, rows):
            reader = real_batches(con, part, bar, rows)
            if part.kind == "embeddings":
                commit_more()
            return reader
        monkeypatch.setattr(export_mod, "_batches", batches_late)
    out = tmp_path / "snap"
    res = export_store(Store.open(st.path, read_only=True), out, progress=False)
    assert commits and commits[0].commits >= 1 and last_commit(st) > before_commit   # the writer did commit
    assert res.commit_id == before_commit and res.table_versions == before_versions
    samples = pq.read_table(out / "samples.parquet").column("id").to_pylist()
    emb = pq.read_table(out / f"embeddings_{key(st, fake_id)}.parquet").column("id").to_pylist()
    assert len(samples) == 30 and sorted(emb) == sorted(samples)
    assert connect(st).sql("SELECT count(*) FROM samples").fetchall()[0][0] == 80


def one_line(p):
    err = p.stderr.decode()
    return p.returncode == 1 and "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1


def test_bad_out_is_one_line_and_nothing_is_touched(built, tmp_path):
    st, root, a, b = built
    existing = tmp_path / "have.duckdb"
    existing.write_bytes(b"keep me")
    folder = tmp_path / "have"
    folder.mkdir()
    (folder / "x").write_text("keep")
    (tmp_path / "afile").write_text("")
    for out, says in [(existing, "already exists"), (folder, "already exists"),
                      (tmp_path / "no" / "such" / "x.duckdb", "does not exist"),
                      (tmp_path / "afile" / "x.duckdb", "is not a folder"),
                      (st.path / "inside", "inside the store")]:
        p = cli("export", st.path, out, "--no-progress", check=False)
        assert one_line(p) and says in p.stderr.decode(), (out, p.stderr.decode())
    assert existing.read_bytes() == b"keep me" and (folder / "x").read_text() == "keep"
    p = cli("export", st.path, tmp_path / "y.duckdb", "--columns", "id,nope", "--no-progress", check=False)
    assert one_line(p) and "nope" in p.stderr.decode()
    p = cli("export", st.path, tmp_path / "y.duckdb", "--where", "caption = 'no such caption'", "--no-progress",
            check=False)
    assert one_line(p) and "selects no samples" in p.stderr.decode()
    assert not list(tmp_path.glob("y.duckdb*")) and not list(tmp_path.glob(".y.duckdb*"))


def test_an_unwritable_folder_is_one_line(built, tmp_path):
    st, root, a, b = built
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    prefix = ()
    if ROOT_USER:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to drop root's capabilities")
        prefix = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    try:
        probe = subprocess.run([*prefix, "sh", "-c", f"touch '{ro}/probe'"], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this process cannot be kept from writing a folder")
        p = subprocess.run([*prefix, sys.executable, "-m", "clipsql", "export", str(st.path), str(ro / "x.duckdb"),
                            "--no-progress"], capture_output=True, cwd=Path(__file__).resolve().parents[1],
                           timeout=300)
        assert one_line(p) and "not writable" in p.stderr.decode(), p.stderr.decode()
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


@pytest.mark.parametrize("suffix", [".duckdb", ""])
def test_a_failed_export_leaves_nothing_and_the_next_sweeps_temporaries(built, tmp_path, monkeypatch, suffix):
    st, root, a, b = built
    out = tmp_path / f"snap{suffix}"
    stale = tmp_path / f".snap{suffix}.tmp-999999999-dead"    # a killed export's temporary (no such process)
    stale.mkdir() if not suffix else stale.write_bytes(b"half")
    real_batches = export_mod._batches

    def fail_on_embeddings(con, part, bar, rows):
        if part.kind == "embeddings":
            raise KeyboardInterrupt
        return real_batches(con, part, bar, rows)
    monkeypatch.setattr(export_mod, "_batches", fail_on_embeddings)
    with pytest.raises(KeyboardInterrupt):
        export_store(st, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # the stale one swept, ours removed
    monkeypatch.setattr(export_mod, "_batches", real_batches)
    export_store(st, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
