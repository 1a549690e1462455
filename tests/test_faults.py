"""Faults, kills and hostile input: each test reproduces one finding first."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.ledger import committed_versions
from clipsql.store.reads import count_rows
from clipsql.store.stats import save_stats, saved_stats
from clipsql.store.store import Store

from conftest import (MODEL, ROOT, FakeEncoder, assert_stats_match_vectors, cli, wait_for, write_image_folder,
                      write_pool)


@pytest.fixture
def fake512(tmp_path_factory):
    """A fake model of the 512-d vectors the in-process tests file (conftest.FakeEncoder)."""
    return FakeEncoder(tmp_path_factory.mktemp("fake") / "fake-512", dim=512)


@pytest.fixture
def pool_store(tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=400)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    cli("stats", "fit", str(st.path), "--reference-size", "100")
    return Store.open(st.path)


def norm_sim(st, name):
    from clipsql import queries
    con = queries.connect(st)
    return con.sql(f"SELECT count(*), avg(norm_sim_inf(image_embedding, '{name}')), "
                   f"avg(norm_sim_2(image_embedding, '{name}')) FROM embeddings").fetchall()[0]


@pytest.mark.parametrize("point", ["target:after-table", "target:after-switch"])
def test_target_replace_killed_leaves_one_whole_target(pool_store, point):
    """11.4: a killed `target add --replace` leaves the old target or the new one, never a mix."""
    st = pool_store
    cli("target", "add", str(st.path), "t", "--query", "SELECT image_embedding FROM embeddings LIMIT 50")
    old = norm_sim(st, "t")
    p = cli("target", "add", str(st.path), "t", "--replace", "--query",
            "SELECT image_embedding FROM embeddings ORDER BY id DESC LIMIT 120", env={"CLIPSQL_FAULT": point},
            check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    from clipsql.store.targets import get_target, target_rows
    t = get_target(st, "t")
    assert len(target_rows(st, t)) == t.n == (50 if point == "target:after-table" else 120)
    now = norm_sim(st, "t")
    assert now[1] is not None and now[2] is not None
    if point == "target:after-table":
        assert now == pytest.approx(old)
    cli("optimize", str(st.path))        # the next writer deletes the table nobody uses any more
    names = [n for n in Store.open(st.path).table_names() if n.startswith("target_")]
    assert names == [t.table_name]


def test_killed_runs_are_marked_aborted_with_counts_from_the_ledger(tmp_path):
    """11.6: a killed ingest does not stay `running` forever; its counters come from the ledger."""
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    st = Store.init(tmp_path / "s")
    p = cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress",
            "--commit-rows", "100", env={"CLIPSQL_FAULT": "commit:after-lance@3"}, check=False)
    assert p.returncode == -9
    runs = lambda: Store.open(st.path).engine.connect().execute(  # noqa: E731
        sa.select(cat.ingest_runs.c.status, cat.ingest_runs.c.added).order_by(cat.ingest_runs.c.run_id)).all()
    assert runs() == [("running", 200)]
    cli("optimize", str(st.path))                          # any writer marks it
    assert runs() == [("aborted", 200)]
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    assert runs()[-1] == ("done", 400) and count_rows(Store.open(st.path), Store.open(st.path).model()) == 600


def write_shard(path, n, seed=0):
    import io
    import tarfile
    from PIL import Image
    rng = np.random.default_rng(seed)
    mode = "w:gz" if str(path).endswith(".gz") else "w"
    with tarfile.open(path, mode) as tf:
        for i in range(n):
            b = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(b, format="PNG")
            for ext, data in (("png", b.getvalue()), ("txt", f"caption number {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("share", [0.4, "trailer"])
def test_truncated_tar_gz_is_recorded(tmp_path, fake_encoder, share):
    """11.7: a .tar.gz cut short records corrupt_tar (at any point, also inside the gzip trailer)."""
    from clipsql.ingest.pipeline import ingest
    shard = write_shard(tmp_path / "a.tar.gz", 20)
    data = shard.read_bytes()
    cut = int(len(data) * share) if share != "trailer" else len(data) - 4
    shard.write_bytes(data[:cut])
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(shard), model=fake_encoder.model, options=fake_encoder.options())
    assert s.rejected.get("corrupt_tar") == 1, s.rejected
    assert s.added + 1 >= (20 if share == "trailer" else 1)
    with st.engine.connect() as conn:
        detail = conn.execute(sa.select(cat.rejects.c.detail).where(cat.rejects.c.reason == "corrupt_tar")).scalar()
    assert "read before the damage were kept" in detail


@pytest.mark.parametrize("name", ["a.tar", "a.tar.gz"])
def test_gallery_on_a_damaged_shard_shows_broken_tiles(tmp_path, tiny_model, name):
    """11.8: samples whose shard was truncated afterwards are broken tiles, not a crash."""
    shard = write_shard(tmp_path / name, 12)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(shard), "--model", tiny_model, "--no-progress")
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    p = cli("gallery", str(st.path), "SELECT id FROM samples", "-o", str(tmp_path / "g.html"), check=False)
    assert p.returncode == 0, p.stderr.decode()
    assert "broken image" in p.stdout.decode()
    html = (tmp_path / "g.html").read_text()
    assert "unreadable shard" in html or "missing file" in html or "cannot decode" in html


def test_gallery_reads_only_the_stores_images_unless_allowed(tmp_path, tiny_model):
    """11.15: a query naming any local file in `uri` does not get it embedded."""
    from PIL import Image
    shard = write_shard(tmp_path / "a.tar", 3)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(shard), "--model", tiny_model, "--no-progress")
    secret = tmp_path / "private.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(secret)
    sql = f"SELECT 'x' AS id, '{secret}' AS uri, 'c' AS caption UNION ALL SELECT id, uri, caption FROM samples"
    out = tmp_path / "g.html"
    cli("gallery", str(st.path), sql, "-o", str(out))
    html = out.read_text()
    assert html.count("data:image/") == 3 and "not an image of this store" in html
    cli("gallery", str(st.path), sql, "-o", str(out), "--allow-external-access")
    assert out.read_text().count("data:image/") == 4


def test_extreme_aspect_ratio_is_rejected_before_preprocessing():
    """11.9: a 664-byte 1 x 300,000 PNG would be upscaled to 64 x 19.2M pixels by the preprocess."""
    import io
    from PIL import Image
    from clipsql.ingest.images import ItemRejected, load_image
    for size in ((1, 300_000), (300_000, 1), (1, 1_000_000)):
        buf = io.BytesIO()
        Image.new("RGB", size, (0, 0, 0)).save(buf, format="PNG")
        assert len(buf.getvalue()) < 5000
        with pytest.raises(ItemRejected) as e:
            load_image(buf.getvalue())
        assert e.value.reason == "extreme_aspect_ratio"
    buf = io.BytesIO()
    Image.new("RGB", (1000, 20), (0, 0, 0)).save(buf, format="PNG")      # a 50:1 banner is fine
    assert load_image(buf.getvalue()).size == (1000, 20)


def test_huge_members_and_files_are_rejected_unread(tmp_path, fake_encoder):
    """11.10: a tar with a 6 GB sparse member keeps its good sample; folder files over the cap
    are rejected by reason, without being read."""
    import subprocess
    from clipsql.ingest.pipeline import ingest
    work = tmp_path / "w"
    work.mkdir()
    write_image_folder(work, 1)
    with open(work / "big.png", "wb") as f:          # a sparse 6 GB file
        f.truncate(6 << 30)
    (work / "big.txt").write_text("a huge image")
    shard = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(shard), "-C", str(work), "img0000.png", "img0000.txt",
                    "big.png", "big.txt"], check=True)
    assert shard.stat().st_size < 1 << 20
    st = Store.init(tmp_path / "st")
    fake = fake_encoder
    s = ingest(st, str(shard), model=fake.model, options=fake.options())
    assert s.added == 1 and s.rejected == {"file_too_large": 1}, s.rejected
    st2 = Store.init(tmp_path / "st2")
    s = ingest(st2, str(work), model=fake.model, options=fake.options(max_file_bytes=1 << 20))
    assert s.added == 1 and s.rejected == {"file_too_large": 1}, s.rejected
    with st2.engine.connect() as conn:
        detail = conn.execute(sa.select(cat.rejects.c.detail)).scalar()
    assert "--max-file-mb" in detail


def test_precomputed_rows_without_uri_are_identified_by_their_vectors(tmp_path, fake512):
    """11.11: distinct vectors sharing a caption are distinct samples; a repeated pair is a duplicate."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipsql.ingest.pipeline import ingest
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 512)).astype(np.float32)
    Y = rng.normal(size=(6, 512)).astype(np.float32)
    X[5], Y[5] = X[4], Y[4]                         # row 6 repeats row 5 exactly
    caps = ["a photo"] * 4 + ["<PERSON>"] * 2
    pq.write_table(pa.table({"caption": caps, "image_embedding": list(X), "text_embedding": list(Y)}),
                   tmp_path / "e.parquet")
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(tmp_path / "e.parquet"), model=fake512.model, options=fake512.options())
    assert s.added == 5 and s.rejected == {"duplicate_id": 1}


def test_first_row_bad_vector_and_image_only_sources(tmp_path, fake512):
    """11.12: the dimension comes from the file, not row 0; an img_emb/ source without text_emb/
    is ingested with NULL text embeddings (image statistics only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipsql.ingest.pipeline import ingest
    rng = np.random.default_rng(1)
    X = [rng.normal(size=512).astype(np.float32) for _ in range(8)]
    Y = [rng.normal(size=512).astype(np.float32) for _ in range(8)]
    X[0] = np.ones(3, dtype=np.float32)             # a bad first row
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(8)], "caption": [f"c {i}" for i in range(8)],
                             "image_embedding": X, "text_embedding": Y}), tmp_path / "e.parquet")
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(tmp_path / "e.parquet"), model=fake512.model, options=fake512.options())
    assert s.added == 7 and s.rejected == {"wrong_dim": 1}
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=200)
    import shutil
    shutil.rmtree(pool / "text_emb")
    st2 = Store.init(tmp_path / "s2")
    p = cli("ingest", str(st2.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    assert "added 200" in p.stdout.decode()
    st2 = Store.open(st2.path)
    state = saved_stats(st2, st2.model())
    assert state.moments[("image", "raw")].n == 200 and state.moments[("text", "raw")].n == 0
    assert_stats_match_vectors(st2)
    from clipsql import queries
    con = queries.connect(st2)
    assert con.sql("SELECT count(*) FROM embeddings WHERE text_embedding IS NULL").fetchall() == [(200,)]
    assert con.sql("SELECT count(raw_norm(image_embedding)) FROM embeddings").fetchall() == [(200,)]
    fit = cli("stats", "fit", str(st2.path), check=False)
    assert fit.returncode == 1 and "both" in fit.stderr.decode() and "Traceback" not in fit.stderr.decode()


def test_silent_drops_are_recorded(tmp_path, fake_encoder, monkeypatch):
    """11.13: unreadable sub-directories, duplicate / link tar members, duplicate CSV headers and
    renamed metadata columns are all recorded, never dropped without a word."""
    import io
    import tarfile
    from clipsql.ingest.pipeline import ingest
    from clipsql.ingest.registry import open_source
    from clipsql.ingest.sources import FolderSource
    from clipsql.errors import SourceError
    # an unreadable sub-directory (root reads anything, so the listing failure is simulated)
    root = tmp_path / "f"
    write_image_folder(root, 2)
    write_image_folder(root / "locked", 2)
    real = os.scandir
    locked = str(root / "locked")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    src = FolderSource(root)
    rejects = [r for u in src.units() for r in src.read(u) if type(r).__name__ == "Reject"]
    assert [(r.location, r.reason) for r in rejects] == [("locked", "unreadable_directory")]
    monkeypatch.setattr(os, "scandir", real)
    # duplicate and link members in a shard
    shard = tmp_path / "s.tar"
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(b, format="PNG")
    with tarfile.open(shard, "w") as tf:
        for mname, data in (("a.png", b.getvalue()), ("a.txt", b"first"), ("a.txt", b"second"),
                            ("b.txt", b"caption of a link")):
            info = tarfile.TarInfo(mname)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tf.addfile(link)
    st = Store.init(tmp_path / "st")
    fake = fake_encoder
    s = ingest(st, str(shard), model=fake.model, options=fake.options())
    assert s.added == 1 and s.rejected == {"duplicate_member": 1, "link_member": 1}, s.rejected
    # a duplicate CSV header
    csv = tmp_path / "t.csv"
    csv.write_text("image,caption,caption\nx.png,a,b\n")
    with pytest.raises(SourceError, match="'caption' more than once"):
        open_source(str(csv))
    # metadata columns named like samples columns: renamed, and the summary says so
    imgs = write_image_folder(tmp_path / "imgs", 2)
    (tmp_path / "m.csv").write_text("image,caption,key,id,meta_id\n" + "".join(
        f"{imgs}/img{i:04d}.png,cap {i},k{i},{i},{10 + i}\n" for i in range(2)))
    st2 = Store.init(tmp_path / "st2")
    s = ingest(st2, str(tmp_path / "m.csv"), model=fake.model, options=fake.options(id_column="key"))
    assert s.notes == ["metadata column 'id' is 'meta_id_2' in the samples view (id is a samples column)"]
    from clipsql import queries
    row = queries.connect(st2).sql("SELECT meta_id, meta_id_2 FROM samples ORDER BY meta_id").fetchall()
    assert row == [(10, 0), (11, 1)]


def test_read_only_queries_spill_to_a_bounded_private_directory(pool_store, tmp_path, monkeypatch):
    """11.14: a read-only query never spills into the caller's working directory."""
    from clipsql import queries
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSQL_SPILL_GB", "0.5")
    con = queries.connect(pool_store)
    folder, limit = con.sql("SELECT current_setting('temp_directory'), "
                            "current_setting('max_temp_directory_size')").fetchall()[0]
    assert "clipsql-spill-" in folder and not folder.startswith(str(tmp_path)) and "512" in limit
    with pytest.raises(Exception):
        con.execute("SET temp_directory = '.tmp'")
    con.sql("SELECT id, image_embedding FROM embeddings ORDER BY image_embedding[1]").fetchall()
    assert not (tmp_path / ".tmp").exists()


def test_spill_folders_of_killed_processes_are_swept_by_the_next_connection(pool_store, tmp_path):
    """A process killed while its connection exists leaves its spill folder (named with its host and
    PID); the next process that opens a connection removes it, and leaves a live process's alone."""
    from clipsql.leftovers import owner_tag
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    live = tmp / f"clipsql-spill-{owner_tag(os.getpid())}-x"          # this test's process: alive
    live.mkdir()
    other = tmp / "clipsql-spill-unrelated"                          # not named by a process: kept
    other.mkdir()
    code = ("import os, signal, sys; from clipsql import queries; con = queries.connect(sys.argv[1]); "
            "print(con.sql(\"SELECT current_setting('temp_directory')\").fetchall()[0][0], flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL) if sys.argv[2] == 'kill' else None")
    env = dict(os.environ, TMPDIR=str(tmp))

    def connect(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(pool_store.path), how], cwd=ROOT, env=env,
                              capture_output=True, timeout=300)
    folders = []
    for _ in range(2):
        killed = connect("kill")
        assert killed.returncode == -9, killed.stderr.decode()[-500:]
        folders.append(killed.stdout.decode().strip())
        assert os.path.isdir(folders[-1]) and os.path.dirname(folders[-1]) == str(tmp), folders
        assert all(not os.path.exists(f) for f in folders[:-1]), folders       # the earlier one's: swept
    done = connect("exit")
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, other.name])


def test_full_disk_during_ingest_is_one_line_and_resumes(tmp_path):
    """11.17: a full disk ends the run with one line naming it (not a traceback of the cleanup that
    failed after it); the run is marked aborted by the next writer, and a re-run completes."""
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "100"]
    p = cli(*args, env={"CLIPSQL_FAULT": "writer:data-file@3=enospc,run:finish=enospc"}, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert [x for x in err.splitlines() if x.strip()] == [err.strip()] and "disk is full" in err
    assert "Traceback" not in err
    cli(*args)
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == 600
    assert_stats_match_vectors(st)
    with st.engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.select(cat.ingest_runs.c.status).order_by(
            cat.ingest_runs.c.run_id))] == ["aborted", "done"]


def test_readers_never_migrate_and_open_the_catalog_read_only(pool_store, monkeypatch, tmp_path):
    """11.16: a query opens the SQLite catalog read-only (where the directory cannot be written, as
    `catalog.sqlite_reader` says) and never migrates an older catalog; only a writer does."""
    st = pool_store
    with st.engine.begin() as conn:                    # make it look like a catalog from before migration 6
        conn.execute(sa.delete(cat.schema_migrations).where(cat.schema_migrations.c.version >= 6))
        conn.execute(sa.text("DROP TABLE stale_fits"))
        conn.execute(sa.text("DROP TABLE leases"))
    p = cli("query", str(st.path), "SELECT count(*) FROM samples", check=False)
    assert p.returncode == 1 and "readers never migrate" in p.stderr.decode() and "clipsql optimize" in p.stderr.decode()
    assert cat.schema_version(Store(st.path, st.catalog_url).engine) == 5
    cli("optimize", str(st.path))
    assert "400" in cli("query", str(st.path), "SELECT count(*) FROM samples").stdout.decode()
    ro = Store.open(st.path, read_only=True)
    assert "mode=ro" in str(ro.engine.url)
    with pytest.raises(Exception, match="readonly"):
        ro.set_setting("x", "y")
    # where the directory cannot be written: the WAL read in place (its -shm and -wal exist while this
    # process has the catalog open), or, for a catalog file alone (a writer checkpointed it as it
    # finished), that file, immutable (tests/test_readonly.py runs these for real)
    import shutil
    alone = tmp_path / "alone"
    alone.mkdir()
    cli("optimize", str(st.path))
    shutil.copy(st.path / "catalog.sqlite", alone / "catalog.sqlite")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) in (str(st.path), str(alone)) and m == os.W_OK
                        else real(p, m))
    im = Store.open(st.path, read_only=True)
    assert "mode=ro" in str(im.engine.url) and count_rows(im, im.model()) == 400
    assert cat.sqlite_reader(str(alone / "catalog.sqlite")) == (str(alone / "catalog.sqlite"), "immutable=1")
    engine = cat.make_engine(f"sqlite:///{alone / 'catalog.sqlite'}", read_only=True)
    assert "immutable=1" in str(engine.url) and committed_versions(im) == committed_versions(Store(
        st.path, f"sqlite:///{alone / 'catalog.sqlite'}", read_only=True))


@pytest.mark.parametrize("damage", ["{not json", "\x00\xff\xfe", '["format"]', '{"format": "1", "store_id": 7}'])
def test_doctor_repair_rewrites_a_damaged_marker_from_the_catalog(tmp_path, damage):
    """A damaged clipsql.json: doctor says so in one line and what rewrites it; --repair rewrites it
    from the catalog's store id, after which the store opens and is consistent."""
    st = Store.init(tmp_path / "s")
    marker = st.path / "clipsql.json"
    good = json.loads(marker.read_text())
    st.engine.dispose()
    marker.write_bytes(damage.encode("latin-1"))
    p = cli("query", str(st.path), "SELECT 1", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "damaged" in err and "doctor" in err and "--repair" in err, err
    rc, rep = doctor_json(st)
    assert rc != 0 and [f["check"] for f in rep["findings"] if f["level"] == "error"] == ["format"], rep
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0, rep
    assert "rewritten from the catalog" in [f for f in rep["findings"] if f["check"] == "format"][0]["repaired"]
    assert json.loads(marker.read_text()) == good
    rc, rep = doctor_json(st)
    assert rc == 0 and rep["consistent"], rep
    assert "0" in cli("query", str(st.path), "SELECT count(*) FROM samples").stdout.decode()
    st.path.joinpath("catalog.sqlite").rename(tmp_path / "elsewhere.sqlite")
    marker.write_text("{not json")
    p = cli("doctor", str(st.path), "--repair", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and len(err.strip().splitlines()) == 1 and "CLIPSQL_CATALOG_URL" in err, err
    p = cli("doctor", str(st.path), "--repair", env={"CLIPSQL_CATALOG_URL": f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"})
    assert json.loads(marker.read_text())["store_id"] == good["store_id"]


def test_damaged_store_files_give_one_line(pool_store, tmp_path):
    """11.18: damaged or missing catalog, damaged clipsql.json, newer formats: one line each."""
    import shutil
    st = pool_store
    marker = st.path / "clipsql.json"
    good = marker.read_text()
    for bad, want in (('{"format": 99}', "newer than this clipsql"), ("{not json", "clipsql.json is damaged")):
        marker.write_text(bad)
        p = cli("query", str(st.path), "SELECT 1", check=False)
        assert p.returncode == 1 and want in p.stderr.decode() and "Traceback" not in p.stderr.decode()
    marker.write_text(good)
    with st.engine.begin() as conn:
        conn.execute(cat.schema_migrations.insert().values(version=99, name="future", applied_at=0))
    for args in (("query", str(st.path), "SELECT 1"), ("optimize", str(st.path))):
        p = cli(*args, check=False)
        assert p.returncode == 1 and "schema version 99, newer" in p.stderr.decode(), p.stderr.decode()
    with st.engine.begin() as conn:
        conn.execute(sa.delete(cat.schema_migrations).where(cat.schema_migrations.c.version == 99))
    catalog = st.path / "catalog.sqlite"
    st.engine.dispose()
    backup = tmp_path / "catalog.bak"
    shutil.copy(catalog, backup)
    for f in st.path.glob("catalog.sqlite-*"):
        f.unlink()
    catalog.write_bytes(catalog.read_bytes()[:1000])              # truncated
    for args in (("query", str(st.path), "SELECT 1"), ("ingest", str(st.path), "x"), ("stats", "show", str(st.path))):
        p = cli(*args, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "doctor" in err
    catalog.unlink()                                              # deleted: refused, never recreated
    p = cli("ingest", str(st.path), "x", check=False)
    assert p.returncode == 1 and "is missing" in p.stderr.decode() and not catalog.exists()
    shutil.copy(backup, catalog)
    assert "400" in cli("query", str(st.path), "SELECT count(*) FROM samples").stdout.decode()


def doctor_json(st, *args, check=False):
    p = cli("doctor", str(st.path), "--format", "json", *args, check=False)
    assert "Traceback" not in p.stderr.decode(), p.stderr.decode()
    return p.returncode, json.loads(p.stdout)


def test_doctor_reports_a_healthy_store(pool_store):
    rc, rep = doctor_json(pool_store)
    assert rc == 0 and rep["consistent"] and rep["warnings"] == 0, rep
    assert any(f["check"].startswith("statistics") and f["level"] == "ok" for f in rep["findings"])
    assert "consistent" in cli("doctor", str(pool_store.path)).stdout.decode()


def test_doctor_repairs_damaged_lance_data_and_stale_statistics(pool_store):
    """11.18/11.19: a truncated manifest of the committed version and a deleted data file are rolled
    back to the newest readable version; statistics that disagree are recomputed."""
    import glob
    import lance
    pool = pool_store.path.parent / "pool3"
    write_pool(pool, shards=1, rows=400, row_group=100)
    st = Store.init(pool_store.path.parent / "s3")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "100")
    rec = st.model()
    uri = st.table_uri(rec.table_name)
    committed = committed_versions(st)[rec.table_name]
    mf = [m for m in glob.glob(f"{uri}/_versions/*.manifest") if int(os.path.basename(m)[:-9]) ==
          (1 << 64) - 1 - committed][0]
    data = open(mf, "rb").read()
    open(mf, "wb").write(data[:len(data) // 2])
    p = cli("query", str(st.path), "SELECT count(*) FROM embeddings", check=False)
    assert p.returncode == 1 and len(p.stderr.decode().strip().splitlines()) == 1, p.stderr.decode()
    rc, rep = doctor_json(st)
    assert rc == 1 and any("cannot be read" in f["detail"] for f in rep["findings"]), rep
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0, rep
    assert any(f["repaired"] and "rolled back" in f["repaired"] for f in rep["findings"])
    rc, rep = doctor_json(st)                         # consistent; the only warning: the rows it lost
    assert rc == 0 and [f["check"] for f in rep["findings"] if f["level"] == "warn"] == \
        [f"samples without embeddings {rec.model_id}"], rep
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == 300           # the last commit's manifest was lost
    assert_stats_match_vectors(st)
    # a deleted data file
    frag = lance.dataset(uri, version=committed_versions(st)[rec.table_name]).get_fragments()[-1]
    os.unlink(os.path.join(uri, "data", frag.data_files()[0].path))
    rc, rep = doctor_json(st)
    assert rc == 1 and any("missing" in f["detail"] for f in rep["findings"]), rep
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0 and doctor_json(st)[0] == 0, rep
    assert_stats_match_vectors(Store.open(st.path))
    # statistics that do not match the vectors
    st = Store.open(st.path)
    state = saved_stats(st, st.model())
    state.moments[("image", "raw")].s1 += 1.0
    save_stats(st, state)
    rc, rep = doctor_json(st)
    assert rc == 1 and any("differs from a recomputation" in f["detail"] for f in rep["findings"])
    assert doctor_json(st, "--repair")[0] == 0 and doctor_json(st)[0] == 0
    assert_stats_match_vectors(Store.open(st.path))


def test_doctor_rebuilds_a_lost_catalog(pool_store):
    st = pool_store
    before = Store.open(st.path)
    n = count_rows(before, before.model())
    st.engine.dispose()
    (st.path / "catalog.sqlite").unlink()
    for f in st.path.glob("catalog.sqlite-*"):
        f.unlink()
    rc, rep = doctor_json(st)
    assert rc == 1 and "missing" in rep["findings"][-1]["detail"]
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0, rep
    rebuilt = [f for f in rep["findings"] if f["repaired"] and "rebuilt" in f["repaired"]]
    assert rebuilt and "fits, targets" in rebuilt[0]["repaired"]
    st = Store.open(st.path)
    assert [m.model_id for m in st.list_models()] == [MODEL[1] + "/" + MODEL[3]]
    assert count_rows(st, st.model()) == n and saved_stats(st, st.model()).n == n
    assert_stats_match_vectors(st)
    assert doctor_json(st)[0] == 0
    pool = st.path.parent / "pool"
    out = cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress").stdout.decode()
    assert "added 0" in out                                 # the ledger of units is gone, the ids are not


def assert_doctor_consistent(st, when):
    rc, rep = doctor_json(st)
    assert rc == 0, (when, [f for f in rep["findings"] if f["level"] == "error"])
    stats = [f for f in rep["findings"] if f["check"].startswith("statistics")]
    assert all(f["level"] == "ok" for f in stats), (when, stats)
    assert stats or not st.list_models(), when


@pytest.mark.parametrize("first", [True, False], ids=["first-model", "second-model"])
def test_a_kill_between_a_model_table_and_its_catalog_rows_is_recovered(tmp_path, first):
    """A kill after a new model's Lance table is created and before the catalog records it broke the
    next ingest (KeyError: 'emb_…' in the ledger's commit, the run recorded failed). The next writer now
    adopts the empty table and the ingest completes."""
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=200)
    st = Store.init(tmp_path / "s")
    other = ["--model", "ViT-B-32", "--pretrained", "openai"]
    if not first:
        cli("ingest", str(st.path), str(pool), *other, "--id-column", "key", "--no-progress")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    p = cli(*args, env={"CLIPSQL_FAULT": "register:after-table"}, check=False)
    assert p.returncode == -9, p.stderr.decode()[-500:]
    assert len(Store.open(st.path).list_models()) == (0 if first else 1)
    p = cli(*args, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr.decode(), p.stderr.decode()[-1500:]
    st = Store.open(st.path)
    assert [count_rows(st, m) for m in st.list_models()] == [200] * (1 if first else 2)
    with st.engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.select(cat.ingest_runs.c.status))] == ["done"] * (1 if first else 2)
    assert_doctor_consistent(st, "after the re-run")
    for m in st.list_models():
        assert_stats_match_vectors(st, m.model_id)


@pytest.mark.slow          # ~30 CLI runs (4.5 min measured); each kill point also has its own test
def test_fault_injection_doctor_finds_a_consistent_store_after_every_kill(tmp_path):
    """SIGKILL at every commit boundary of ingest, optimize, stats fit, target
    add, score and select (and at three points of an ingest's progress); after each kill `clipsql
    doctor` reports a consistent store with current statistics, and re-running the command works."""
    import shutil
    import signal
    import subprocess
    import sys
    whole = tmp_path / "whole"
    write_pool(whole, shards=6, rows=400, row_group=100)
    pools = []
    for k in range(6):                     # one directory per shard: each ingest below has new data
        d = tmp_path / f"p{k}"
        for sub, name in (("img_emb", f"img_emb_{k}.npy"), ("text_emb", f"text_emb_{k}.npy"),
                          ("metadata", f"metadata_{k}.parquet")):
            (d / sub).mkdir(parents=True)
            shutil.copy(whole / sub / name, d / sub / name)
        pools.append(d)
    st = Store.init(tmp_path / "s")

    def ingest(k):
        return ["ingest", str(st.path), str(pools[k]), *MODEL, "--id-column", "key", "--no-progress",
                "--commit-rows", "100"]
    killed = 0
    for trial, rows in enumerate((0, 100, 200)):    # once a reader sees the model (no commit yet), 1, 2 commits
        proc = subprocess.Popen([sys.executable, "-m", "clipsql", *ingest(0)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def reached(rows=rows, proc=proc) -> bool:
            if proc.poll() is not None:
                return True
            seen = Store.open(st.path, read_only=True)
            return bool(seen.list_models()) and count_rows(seen, seen.model()) >= rows
        wait_for(reached, f"{rows} committed rows", deadline=300)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -9
        assert_doctor_consistent(st, f"kill {trial} (at {rows} rows)")
    assert killed >= 1
    cli(*ingest(0))
    for k, point in enumerate(["commit:between-tables@2", "commit:after-lance@3", "writer:data-file@2",
                               "run:finish"], start=1):
        p = cli(*ingest(k), env={"CLIPSQL_FAULT": point}, check=False)
        assert p.returncode == -9, (point, p.stderr.decode()[-500:])
        assert_doctor_consistent(st, point)
        cli(*ingest(k))
        assert_doctor_consistent(st, f"after re-running the ingest killed at {point}")
    steps = [
        (["optimize", str(st.path), "--retention-hours", "0"], ["optimize:after-compact", "optimize:before-prune"]),
        (["stats", "fit", str(st.path), "--reference-size", "200"], ["fit:before-save"]),
        (["target", "add", str(st.path), "t", "--replace", "--query",
          "SELECT image_embedding FROM embeddings LIMIT 300"], ["target:after-table", "target:after-switch"]),
        (["score", str(st.path), "--columns", "image_info_gain"], ["score:before-write"]),
        (["select", str(st.path), "--sql", "SELECT id FROM scores ORDER BY image_info_gain", "--limit", "50",
          "-o", str(tmp_path / "sel.parquet")], ["select:before-rename"]),
        (["delete", str(st.path), "--where", "id LIKE '003%'"], ["delete:after-lance"]),
    ]
    for args, points in steps:
        for point in points:
            p = cli(*args, env={"CLIPSQL_FAULT": point}, check=False)
            assert p.returncode == -9, (point, p.stderr.decode()[-500:])
            assert_doctor_consistent(st, point)
        cli(*args)
        assert_doctor_consistent(st, f"after {args[0]}")
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == 5 * 400 - 400        # shards 0-4, then shard 3 deleted
    assert_stats_match_vectors(st)
    rc, rep = doctor_json(st, "--repair")
    assert rc == 0 and doctor_json(st)[1]["warnings"] == 0


def test_damaged_bytes_and_missing_data_files_are_one_line(pool_store):
    """11.18: flipped catalog bytes and a deleted Lance data file give one line pointing to doctor."""
    import lance
    st = pool_store
    rec = st.model()
    uri = st.table_uri(rec.table_name)
    frag = lance.dataset(uri, version=committed_versions(st)[rec.table_name]).get_fragments()[0]
    os.unlink(os.path.join(uri, "data", frag.data_files()[0].path))
    for args in (("stats", "refresh", str(st.path)), ("query", str(st.path), "SELECT avg(raw_norm(image_embedding)) "
                                                                              "FROM embeddings")):
        p = cli(*args, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "doctor" in err or "not found" in err.lower(), err
    st.engine.dispose()
    catalog = st.path / "catalog.sqlite"
    data = bytearray(catalog.read_bytes())
    rng = np.random.default_rng(3)
    for i in rng.integers(100, len(data), 400):
        data[i] ^= 0xFF
    catalog.write_bytes(bytes(data))
    for args in (("query", str(st.path), "SELECT count(*) FROM samples"), ("stats", "show", str(st.path)),
                 ("models", str(st.path)), ("doctor", str(st.path))):
        p = cli(*args, check=False)                     # whatever the flips hit: never a traceback
        err = p.stderr.decode()
        assert "Traceback" not in err + p.stdout.decode(), err
        assert p.returncode == 0 or (p.returncode == 1 and len(err.strip().splitlines()) <= 1), err
    data[16:18] = b"\xff\xff"                           # a damaged header: no command can read it
    catalog.write_bytes(bytes(data))
    for args in (("query", str(st.path), "SELECT 1"), ("stats", "show", str(st.path)), ("doctor", str(st.path))):
        p = cli(*args, check=False)
        err = p.stderr.decode() + p.stdout.decode()
        assert p.returncode == 1 and "Traceback" not in err and "doctor" in err, err


def test_stop_ends_a_process_that_ignores_sigterm_and_never_this_one():
    """leftovers.stop: SIGTERM, and SIGKILL for what is still there after the grace (waited on, not slept)."""
    from clipsql.leftovers import stop
    code = "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('r', flush=True); sys.stdin.read()"
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    polite = subprocess.Popen([sys.executable, "-c", "import sys; print('r', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout.readline() == b"r\n" and polite.stdout.readline() == b"r\n"
        assert stop([stubborn.pid, polite.pid, os.getpid()], grace=0.2) == []
        assert stubborn.wait() == -9 and polite.wait() == -15
    finally:
        for p in (stubborn, polite):
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()


def test_the_local_ray_folder_keeps_its_socket_paths_within_the_unix_limit(monkeypatch):
    """A command's local Ray lives in `clipsql-ray-<host>-<pid>` under RAY_TMPDIR; where Ray's socket
    paths in it would pass the AF_UNIX limit (~107 bytes), Ray's own default folder is used instead."""
    from clipsql.engines.engine import ray_folder
    from clipsql.leftovers import owner_tag
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")
    assert ray_folder() == f"/tmp/clipsql-ray-{owner_tag()}"
    assert len(f"{ray_folder()}/session_2026-12-03_11-02-59_178398_{4194304}/sockets/plasma_store") <= 107
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/" + "x" * 60)
    assert ray_folder() is None
