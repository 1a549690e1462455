"""Readers and writers without write access to the store: a read-only bind mount (a container,
a backup) and a process that may not write the store's files (another user). Readers answer
exactly as the store does; writers say in one line that they cannot write.

A process "without write permission" is, when the tests run as root, root with every
capability dropped (`setpriv`) on a store whose files belong to another user (an unprivileged
user could not start this Python, which lives under /root); otherwise the store is made
read-only with chmod. The read-only mount is made in a private mount namespace (`unshare`)."""
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store.fits import fit_stats
from clipsql.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
ROOT_USER = os.geteuid() == 0
D = 16
ROWS = 120
DELETED = "id < 'r0037'"            # 37 rows


def write_parquet(path, n=ROWS, seed=7):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, D))
    img = (shared + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    txt = (shared + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    pq.write_table(pa.table({
        "id": [f"r{i:04d}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), D),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), D),
    }), path)
    return path


def make_store(root, model, recipe_fit=False):
    """A store built in this process, which keeps it open (an analyst's session): its catalog
    connections stay open after each writer finished."""
    st = Store.init(root / "s")
    ingest(st, str(write_parquet(root / "emb.parquet")), model=model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=40, seed=3)
    if recipe_fit:
        fit_stats(st, reference_size=40, seed=3, recipe="kl-guided")
    return st


def run(args, prefix=(), env=None):
    return subprocess.run([*prefix, sys.executable, "-m", "clipsql", *map(str, args)], cwd=ROOT,
                          capture_output=True, env=dict(os.environ, **(env or {})), timeout=300)


class NoWriteUser:
    """Runs commands as a process that may read the store but not write it."""
    name = "user"

    def __init__(self, store: Path):
        self.store = store
        if ROOT_USER:
            if not shutil.which("setpriv"):
                pytest.skip("setpriv (util-linux) is needed to drop root's capabilities")
            self.prefix = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
            for folder, dirs, files in os.walk(store):
                for name in [folder, *(os.path.join(folder, f) for f in files)]:
                    os.chown(name, 65534, 65534)
        else:
            self.prefix = ()
            for folder, dirs, files in os.walk(store):
                for name in [folder, *(os.path.join(folder, f) for f in files)]:
                    os.chmod(name, os.stat(name).st_mode & ~0o222)
        probe = subprocess.run([*self.prefix, "sh", "-c", f"touch '{store}/probe'"], capture_output=True)
        if probe.returncode == 0:
            os.unlink(store / "probe")
            pytest.skip("this process cannot be kept from writing the store")

    def __call__(self, *args):
        return run([a if a != "STORE" else self.store for a in args], self.prefix)

    def restore(self):
        if not ROOT_USER:
            for folder, dirs, files in os.walk(self.store):
                for name in [folder, *(os.path.join(folder, f) for f in files)]:
                    os.chmod(name, os.stat(name).st_mode | 0o200)


class ReadOnlyMount:
    """Runs commands on a read-only bind mount of the store (in a private mount namespace)."""
    name = "mount"

    def __init__(self, store: Path):
        self.store = store
        self.mount = store.parent / "ro-mount"
        self.mount.mkdir(exist_ok=True)
        self.prefix = ("unshare", "-m", *(() if ROOT_USER else ("-r",)), "sh", "-c",
                       f"mount --bind '{store}' '{self.mount}' && mount -o remount,ro,bind '{self.mount}' "
                       f"&& exec \"$@\"", "sh")
        if not shutil.which("unshare"):
            pytest.skip("unshare (util-linux) is needed for a private read-only bind mount")
        probe = subprocess.run([*self.prefix, "sh", "-c", f"touch '{self.mount}/probe'"], capture_output=True)
        if b"Read-only file system" not in probe.stderr:
            pytest.skip(f"a read-only bind mount cannot be made here: {probe.stderr.decode().strip()[-200:]}")

    def __call__(self, *args):
        return run([a if a != "STORE" else self.mount for a in args], self.prefix)

    def restore(self):
        pass


@pytest.fixture(params=[NoWriteUser, ReadOnlyMount], ids=["other-user", "read-only-mount"])
def without_write(request):
    made = []

    def make(store):
        made.append(request.param(store))
        return made[-1]
    yield make
    for m in made:
        m.restore()


def one_line(p):
    err = p.stderr.decode()
    return p.returncode == 1 and "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1


def wal_size(st):
    wal = st.path / "catalog.sqlite-wal"
    return wal.stat().st_size if wal.exists() else 0


def test_readers_without_write_access_read_a_store_whose_session_is_open(tmp_path, tiny_model, without_write):
    """The issue's first case: the store's builder is still connected (a notebook), so no writer was
    ever the last to close the catalog and SQLite never checkpointed: the whole catalog lived in the
    WAL and the main file had no tables. A reader that cannot write opened the main file alone
    (immutable=1) and failed with "no such table: schema_migrations". Now every writer moves its
    commits into the main file when it finishes, and such readers read the WAL where it is."""
    st = make_store(tmp_path, tiny_model)
    sql = "SELECT count(*), count(DISTINCT model), round(avg(clip_score), 9) FROM scores"
    owner_query, owner_stats = run(["query", st.path, sql]), run(["stats", "show", st.path])
    assert owner_query.returncode == 0 and f"{ROWS} " in owner_query.stdout.decode()
    reader = without_write(st.path)
    q, s = reader("query", "STORE", sql), reader("stats", "show", "STORE")
    assert q.returncode == 0 and s.returncode == 0, (q.stderr.decode()[-800:], s.stderr.decode()[-800:])
    assert q.stdout == owner_query.stdout and q.stderr == owner_query.stderr
    assert s.stdout.decode().replace(str(reader.store), str(st.path)) == owner_stats.stdout.decode()
    assert wal_size(st) == 0                      # each writer checkpointed as it finished: the main
    with sqlite3.connect(f"file:{st.path / 'catalog.sqlite'}?immutable=1", uri=True) as con:   # file is whole
        assert con.execute("SELECT count(*) FROM fits").fetchone()[0] == 1


def delete_while_a_query_runs(st):
    """Delete 37 rows while another query reads the store: the delete's commit stays in the WAL."""
    st.engine.dispose()                           # the builder's session ends
    held = sqlite3.connect(f"file:{st.path / 'catalog.sqlite'}?mode=ro", uri=True)
    held.execute("BEGIN")
    held.execute("SELECT count(*) FROM commits").fetchone()
    p = run(["delete", st.path, "--where", DELETED])
    assert p.returncode == 0, p.stderr.decode()[-800:]
    held.close()
    assert wal_size(st) > 0                       # the delete's commit is in the WAL alone


def test_readers_without_write_access_see_a_delete_made_while_a_query_ran(tmp_path, tiny_model, without_write):
    """The issue's second case: after a checkpoint, a delete commits while another query still reads
    an older snapshot, so its commit stays in the WAL. Such a reader answered every row, with the
    old fit and no warning; now it answers as the store does: the rows left and the stale-fit
    warning. Also from a copy of the store without its -shm (a backup): read from a private copy."""
    st = make_store(tmp_path, tiny_model)
    delete_while_a_query_runs(st)
    sql = "SELECT count(*) FROM samples"
    owner = run(["query", st.path, sql])
    assert f"{ROWS - 37} " in owner.stdout.decode() and "stale" in owner.stderr.decode()
    backup = tmp_path / "backup"
    shutil.copytree(st.path, backup / "s", symlinks=True)
    (backup / "s" / "catalog.sqlite-shm").unlink()
    for store in (st.path, backup / "s"):
        reader = without_write(store)
        q = reader("query", "STORE", sql)
        assert q.returncode == 0, q.stderr.decode()[-800:]
        assert q.stdout == owner.stdout and q.stderr.decode().replace(str(reader.store), str(st.path)) == \
            owner.stderr.decode(), (store, q.stdout.decode(), q.stderr.decode())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model):
    """A store with a kl-guided fit; its builder's session closed."""
    root = tmp_path_factory.mktemp("ro")
    st = make_store(root, tiny_model, recipe_fit=True)
    st.engine.dispose()
    return st


def test_writers_on_a_store_they_cannot_write_say_so_in_one_line(fitted, tmp_path, without_write):
    """Writers got tracebacks (PermissionError / OSError: [Errno 30] Read-only file system:
    '…/.write.lock'); now one line that says so and what to do."""
    reader = without_write(fitted.path)
    for args in (("optimize", "STORE"), ("stats", "fit", "STORE", "--reference-size", "20"),
                 ("delete", "STORE", "--where", DELETED), ("models", "default", "STORE", "tiny"),
                 ("ingest", "STORE", tmp_path / "emb.parquet", "--id-column", "id", "--no-progress")):
        if args[0] == "ingest":
            write_parquet(tmp_path / "emb.parquet", seed=8)
        p = reader(*args)
        assert one_line(p), (args, p.returncode, p.stderr.decode()[-1500:])
        assert "cannot be written" in p.stderr.decode() and "a user who can write the store" in p.stderr.decode()
    assert run(["query", fitted.path, "SELECT count(*) FROM samples"]).stdout.decode().count(f"{ROWS} ") == 1


def test_kl_guided_select_on_a_read_only_store_uses_its_fit(fitted, tmp_path, without_write):
    """`select --recipe kl-guided` failed on a read-only store although its fit existed (it opened
    the store as a writer); reading needs no writer and no lock."""
    out = tmp_path / "out"
    out.mkdir()
    owner = run(["select", fitted.path, "--recipe", "kl-guided", "-o", out / "owner.txt"])
    assert owner.returncode == 0, owner.stderr.decode()[-800:]
    reader = without_write(fitted.path)
    p = reader("select", "STORE", "--recipe", "kl-guided", "-o", out / "reader.txt")
    assert p.returncode == 0, p.stderr.decode()[-1500:]
    assert (out / "reader.txt").read_text() == (out / "owner.txt").read_text() != ""


def test_a_wal_this_process_cannot_read_is_refused_in_one_line(tmp_path, tiny_model):
    """Commits in a WAL that cannot be read (no -shm beside it, and the WAL itself unreadable for
    this user): one line saying who can fix it and how, never an old answer."""
    st = make_store(tmp_path, tiny_model)
    delete_while_a_query_runs(st)
    (st.path / "catalog.sqlite-shm").unlink()
    reader = NoWriteUser(st.path)
    wal = st.path / "catalog.sqlite-wal"
    os.chmod(wal, 0o600 if ROOT_USER else 0)
    try:
        p = reader("query", "STORE", "SELECT count(*) FROM samples")
    finally:
        os.chmod(wal, 0o644)
        reader.restore()
    assert one_line(p), p.stderr.decode()[-1500:]
    assert "catalog.sqlite-wal" in p.stderr.decode() and "clipsql optimize" in p.stderr.decode()
