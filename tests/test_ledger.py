"""The commit ledger: commits decoupled from batches, exact recovery after kills at every
commit boundary, unit skipping without reads, id checks without a set of the store, optimize.
The in-process runs file the pool's vectors under a torch-free fake model (conftest.FakeEncoder,
512-d), which counts its loads; the killed runs go through the CLI."""
import os

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql.ingest.pipeline import ingest
from clipsql.kernels.moments import RunningMoments
from clipsql.store.ledger import committed_versions, recover
from clipsql.store.reads import count_rows, read_embeddings
from clipsql.store.stats import saved_stats
from clipsql.store.store import Store
from clipsql.store.writer import CommitPolicy

from conftest import (D, MODEL, FakeEncoder, assert_same_store, assert_stats_match_vectors, cli, sample_ids,
                      stored_vectors, write_pool)


@pytest.fixture
def fake(tmp_path_factory):
    """A fake model of the pool's dimension (512)."""
    return FakeEncoder(tmp_path_factory.mktemp("fake") / "fake-512", dim=D)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(folder, shards=2, rows=1500)
    return folder


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    st = Store.init(tmp_path_factory.mktemp("ref") / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    return Store.open(st.path)


def assert_consistent_snapshot(st):
    """What any reader sees: samples and embeddings of the same commits, statistics current."""
    if not st.list_models():
        return
    rec = st.model()
    assert saved_stats(st, rec).n == count_rows(st, rec)
    emb = set(read_embeddings(st, rec, columns=("id",)).column("id").to_pylist())
    assert emb <= set(sample_ids(st))
    if emb:
        assert_stats_match_vectors(st)


def test_commits_are_decoupled_from_batches(pool, tmp_path, reference):
    st = Store.init(tmp_path / "s")
    p = cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress",
            "--commit-rows", "1000", "--batch-size", "64", "--format", "json")
    import json
    summary = json.loads(p.stdout)
    assert summary["added"] == 3000 and summary["commits"] == 3
    st = Store.open(st.path)
    ds = lance.dataset(st.table_uri(st.model().table_name))
    assert len(ds.versions()) <= 1 + 3 + 2          # create, 3 appends, maintenance (compact + index)
    assert_same_store(st, reference)


@pytest.mark.parametrize("point", ["commit:between-tables", "commit:after-lance"])
def test_kill_at_a_commit_boundary_then_rerun_is_exact(pool, tmp_path, reference, point):
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress",
            "--commit-rows", "1000"]
    # the second commit dies at the boundary: one whole commit is visible, nothing of the second
    p = cli(*args, env={"CLIPSQL_FAULT": f"{point}@2"}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    assert_consistent_snapshot(st)
    assert count_rows(st, st.model()) == 1000
    cli(*args)
    assert_same_store(Store.open(st.path), reference)


def test_a_long_run_keeps_every_table_under_the_fragment_bound(pool, tmp_path, reference, fake):
    """A commit every batch with a bound of 6 fragments: the writer compacts during the run (each
    compaction moved in the ledger as a commit), no commit leaves a table past the bound, the rows
    are exactly those of one uninterrupted run, and a reader holding an older version reads it."""
    import clipsql.store.writer as writer_mod
    seen = []                         # fragments of each table whenever a writer starts a new commit
    real = writer_mod.Writer._new_pending

    def watched(self, *a, **k):
        seen.append({n: len(self.store.dataset(n).get_fragments())
                     for n in ("samples", self.model.table_name)})
        return real(self, *a, **k)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(writer_mod.Writer, "_new_pending", watched)
    try:
        st = Store.init(tmp_path / "s")
        opts = fake.options(id_column="key", policy=CommitPolicy(rows=100, max_fragments=6), maintain=False)
        summary = ingest(st, str(pool), model=fake.model, options=opts)
    finally:
        monkeypatch.undo()
    assert summary.added == 3000 and summary.commits >= 10      # one commit per batch of 256 rows
    during = summary.maintenance.during_run
    assert len(during) >= 2 and {c["table"] for c in during} == {"samples", st.model().table_name}
    assert len(seen) > summary.commits and all(n <= 6 for counts in seen for n in counts.values())
    assert_same_store(st, reference)
    import json
    import sqlalchemy as sa
    from clipsql.store import catalog as cat
    with st.engine.connect() as conn:
        ledger = conn.execute(sa.select(cat.commits.c.kind, cat.commits.c.rows, cat.commits.c.versions)
                              .order_by(cat.commits.c.commit_id)).all()
    kinds = [k for k, _, _ in ledger]
    assert kinds.count("append") == summary.commits and kinds.count("compact") >= 1
    _, rows, versions = ledger[0]
    name = st.model().table_name
    old = lance.dataset(st.table_uri(name), version=json.loads(versions)[name])   # a reader of commit 1
    assert old.to_table(columns=["id"]).num_rows == rows           # its files are kept


def test_a_commit_writes_one_data_file_per_table_however_many_pieces(pool, tmp_path, reference, fake):
    """Rows reach the writer's I/O thread in pieces of `fragment_bytes` (64 KiB here: dozens a
    commit), all streamed into one data file: each commit adds one fragment per table."""
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key", policy=CommitPolicy(rows=1000, fragment_bytes=64 << 10), maintain=False)
    summary = ingest(st, str(pool), model=fake.model, options=opts)
    assert summary.commits == 3
    for name in ("samples", st.model().table_name):
        assert len(st.dataset(name).get_fragments()) == 3
    assert_same_store(st, reference)


def test_kill_during_a_compaction_of_a_long_run_loses_nothing(pool, tmp_path, reference):
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress",
            "--commit-rows", "500", "--max-fragments", "2"]
    p = cli(*args, env={"CLIPSQL_FAULT": "compact:after-lance"}, check=False)   # the 3rd commit's compaction
    assert p.returncode == -9
    st = Store.open(st.path)
    assert_consistent_snapshot(st)
    assert count_rows(st, st.model()) == 1500
    # `samples` was compacted in Lance (the first table past the bound), the ledger not moved
    assert lance.dataset(st.table_uri("samples")).version > committed_versions(st)["samples"]
    cli(*args)
    assert_same_store(Store.open(st.path), reference)


def test_kill_during_one_large_commit_leaves_nothing_visible(pool, tmp_path, reference):
    """All 3,000 rows in one commit (the default policy): data files all written, killed after
    the Lance commits and before the catalog transaction — no reader sees any of it, and the
    next writer rolls both tables back before the re-run adds exactly the uninterrupted rows."""
    st = Store.init(tmp_path / "s")
    args = ["ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress"]
    p = cli(*args, env={"CLIPSQL_FAULT": "commit:after-lance"}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    rec = st.model()
    assert count_rows(st, rec) == 0 and st.samples_table().count_rows() == 0
    assert lance.dataset(st.table_uri(rec.table_name)).count_rows() == 3000     # there, but not committed
    assert_consistent_snapshot(st)
    cli(*args)
    assert_same_store(Store.open(st.path), reference)


def test_rerun_skips_units_without_reading_or_loading_the_model(pool, tmp_path, monkeypatch, fake):
    from clipsql.ingest import precomputed as pre
    reads = []
    real_read = pre.PrecomputedSource.read_columns

    def counted(self, *a, **k):
        reads.append(a[0] if a else None)
        return real_read(self, *a, **k)
    monkeypatch.setattr(pre.PrecomputedSource, "read_columns", counted)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    first = ingest(st, str(pool), model=fake.model, options=opts)
    assert first.added == 3000 and fake.loads == 1 and len(reads) == 12
    again = ingest(st, str(pool), model=fake.model, options=opts)
    assert again.added == 0 and again.skipped == 3000 and again.units_skipped == 12 and again.commits == 0
    assert fake.loads == 1 and len(reads) == 12          # a no-op re-run loads no model and reads no unit


def _count_opens(monkeypatch):
    """Every way the planner can look into a precomputed source's files, counted."""
    from clipsql.ingest import precomputed as pre
    calls = {"parquet": 0, "units": 0, "hash": 0, "read": 0}
    real_pf = pre.pq.ParquetFile

    class Counted(real_pf):
        def __init__(self, *a, **k):
            calls["parquet"] += 1
            super().__init__(*a, **k)
    monkeypatch.setattr(pre.pq, "ParquetFile", Counted)
    for name, what in (("group_units", "units"), ("units", "units"), ("content_hash", "hash"),
                       ("read_columns", "read")):
        real = getattr(pre.PrecomputedSource, name)

        def counted(self, *a, _real=real, _what=what, **k):
            calls[_what] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(pre.PrecomputedSource, name, counted)
    return calls


def _touch(path, seconds=1):
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + seconds * 10**9))


def test_a_rerun_plans_from_the_ledger_without_opening_a_file(tmp_path, monkeypatch, fake):
    pool = tmp_path / "pool"
    write_pool(pool, shards=3, rows=500)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    assert ingest(st, str(pool), model=fake.model, options=opts).added == 1500
    calls = _count_opens(monkeypatch)
    again = ingest(st, str(pool), model=fake.model, options=opts)
    assert (again.added, again.skipped, again.units_skipped) == (0, 1500, 6)    # 2 row groups a file
    # no unit listed, hashed or read; the parquet footers read are the layout's own check when the
    # source is opened (a metadata file's rows against its npy files), one a file
    assert calls == {"parquet": 3, "units": 0, "hash": 0, "read": 0}


def test_planning_pauses_the_cycle_collector_and_restores_it(tmp_path, monkeypatch, fake):
    import gc
    from clipsql.ingest import precomputed as pre
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=100)
    st = Store.init(tmp_path / "s")
    seen, real = [], pre.PrecomputedSource.groups
    monkeypatch.setattr(pre.PrecomputedSource, "groups", lambda self: seen.append(gc.isenabled()) or real(self))
    assert gc.isenabled()
    assert ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key")).added == 100
    assert seen == [False] and gc.isenabled()
    gc.disable()                     # a caller that runs with the collector off keeps it off
    try:
        ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key"))
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_a_touched_file_with_the_same_content_is_rehashed_not_reingested(tmp_path, monkeypatch, fake):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=500)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    assert ingest(st, str(pool), model=fake.model, options=opts).added == 1000
    _touch(pool / "metadata" / "metadata_0.parquet")
    _touch(pool / "img_emb" / "img_emb_1.npy")
    calls = _count_opens(monkeypatch)
    again = ingest(st, str(pool), model=fake.model, options=opts)
    assert (again.added, again.skipped, again.units_skipped) == (0, 1000, 4)
    assert calls == {"parquet": 2, "units": 0, "hash": 2, "read": 0}
    third = ingest(st, str(pool), model=fake.model, options=opts)      # the new stamps were recorded
    assert (third.added, third.units_skipped) == (0, 4) and calls["hash"] == 2


def test_units_ingested_before_stamps_existed_get_them_on_the_next_run(tmp_path, monkeypatch, fake):
    """A store whose ledger has units but no stamps (written before them): the next run opens the
    files once, finds the units by fingerprint and stamps them; the run after opens nothing. A unit
    the ledger forgets (a repair, an undelete) is planned again although its stamp is still there."""
    import sqlalchemy as sa
    from clipsql.store import catalog as cat
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=500)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    assert ingest(st, str(pool), model=fake.model, options=opts).added == 1000
    with st.engine.begin() as conn:
        conn.execute(sa.delete(cat.unit_stamps))
    calls = _count_opens(monkeypatch)
    again = ingest(st, str(pool), model=fake.model, options=opts)
    assert (again.added, again.units_skipped) == (0, 4) and calls["units"] == 2 and calls["read"] == 0
    calls.update(units=0, hash=0)
    third = ingest(st, str(pool), model=fake.model, options=opts)
    assert (third.added, third.units_skipped) == (0, 4) and calls["units"] == 0 and calls["hash"] == 0
    with st.engine.begin() as conn:
        key = conn.execute(sa.select(cat.ingested_units.c.unit_key)).first()[0]
        conn.execute(sa.delete(cat.ingested_units).where(cat.ingested_units.c.unit_key == key))
    fourth = ingest(st, str(pool), model=fake.model, options=opts)
    assert fourth.units_skipped == 3 and calls["read"] == 1 and calls["units"] == 1


def test_a_changed_file_is_read_again_and_its_known_rows_skipped(tmp_path, monkeypatch, fake):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=500)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    assert ingest(st, str(pool), model=fake.model, options=opts).added == 1000
    meta = pool / "metadata" / "metadata_0.parquet"
    t = pq.read_table(meta)
    t = t.set_column(t.schema.get_field_index("key"), "key",
                     pa.array([f"{k}-new" if i < 10 else k for i, k in enumerate(t.column("key").to_pylist())]))
    pq.write_table(t, meta)
    calls = _count_opens(monkeypatch)
    again = ingest(st, str(pool), model=fake.model, options=opts)
    # the other file is skipped unopened; this one's one row group (one unit) is read, its known ids skipped
    assert (again.added, again.skipped, again.units_skipped) == (10, 990, 2)
    assert calls["hash"] == 1 and calls["read"] == 1
def test_ids_already_stored_are_found_through_the_index(tmp_path, monkeypatch, fake):
    """Another layout of the same rows: every id is found in the store (BTREE index + unindexed scan)."""
    from clipsql.store import maintenance as store_maintenance
    monkeypatch.setattr(store_maintenance, "INDEX_MIN_ROWS", 1000)
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=2000, row_group=500)
    st = Store.init(tmp_path / "s")
    opts = fake.options(id_column="key")
    ingest(st, str(pool), model=fake.model, options=opts)
    ds = st.embeddings_table(st.model())
    assert [i.field_names for i in ds.describe_indices()] == [["id"]]   # built after the first ingest
    tbl = pq.read_table(pool / "metadata" / "metadata_0.parquet")
    img = np.load(pool / "img_emb" / "img_emb_0.npy")
    txt = np.load(pool / "text_emb" / "text_emb_0.npy")
    fsl = lambda X: pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), D)  # noqa: E731
    pq.write_table(tbl.append_column("image_embedding", fsl(img)).append_column("text_embedding", fsl(txt)),
                   tmp_path / "same.parquet", row_group_size=700)
    s = ingest(st, str(tmp_path / "same.parquet"), model=fake.model, options=opts)
    assert s.added == 0 and s.skipped == 2000


def test_fingerprint_collisions_never_reject_a_row(tmp_path, monkeypatch, fake):
    from clipsql.ingest import dedup
    monkeypatch.setattr(dedup, "fingerprints", lambda ids: np.zeros(len(ids), dtype=np.uint64))
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=600, row_group=100)
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key", policy=CommitPolicy(rows=250)))
    assert s.added == 600 and not s.rejected


def test_duplicates_within_a_run_are_rejected_across_commits(tmp_path, fake):
    pool = tmp_path / "pool"
    write_pool(pool, shards=2, rows=300, row_group=100)
    # shard 1 repeats shard 0's keys: each is a duplicate of a row committed earlier in the run
    pq.write_table(pq.read_table(pool / "metadata" / "metadata_0.parquet"), pool / "metadata" / "metadata_1.parquet",
                   row_group_size=100)
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key", policy=CommitPolicy(rows=150)))
    assert s.added == 300 and s.rejected == {"duplicate_id": 300}


def test_readers_ignore_lance_versions_the_ledger_has_not_committed(pool, tmp_path, fake):
    st = Store.init(tmp_path / "s")
    ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key"))
    rec = st.model()
    before = count_rows(st, rec)
    ds = lance.dataset(st.table_uri(rec.table_name))
    lance.write_dataset(ds.to_table(limit=10), ds.uri, mode="append")     # a commit the catalog never saw
    assert count_rows(st, rec) == before
    from clipsql.queries.sql.db import connect
    assert connect(st).sql("SELECT count(*) FROM embeddings").fetchall()[0][0] == before
    with st.lock():
        assert recover(st) == {rec.table_name: 10}
    assert lance.dataset(ds.uri).count_rows() == before


@pytest.mark.parametrize("point", ["optimize:after-compact", "optimize:before-prune"])
def test_kill_during_optimize_loses_nothing(pool, tmp_path, reference, point):
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress", "--commit-rows", "500")
    p = cli("optimize", str(st.path), env={"CLIPSQL_FAULT": point}, check=False)
    assert p.returncode == -9
    st = Store.open(st.path)
    assert_consistent_snapshot(st)
    assert_same_store(st, reference)
    out = cli("optimize", str(st.path), "--retention-hours", "0", "--format", "json")
    import json
    report = json.loads(out.stdout)
    assert report["tables"][st.model().table_name]["fragments"] <= 2
    assert_same_store(Store.open(st.path), reference)


def test_optimize_keeps_versions_fits_were_computed_on(pool, tmp_path, fake):
    from clipsql.store.fits import fit_stats
    st = Store.init(tmp_path / "s")
    ingest(st, str(pool), model=fake.model,
           options=fake.options(id_column="key", policy=CommitPolicy(rows=500), maintain=False))
    f = fit_stats(st, reference_size=100)
    from clipsql.store.maintenance import optimize
    optimize(st, retention_hours=0)
    ds = lance.dataset(st.table_uri(st.model().table_name), version=f.data_version)
    assert ds.count_rows() == 3000
    assert f"fit-{f.fit_id}" in ds.tags.list()


def test_query_during_optimize_reads_its_snapshot(pool, tmp_path, fake):
    st = Store.init(tmp_path / "s")
    ingest(st, str(pool), model=fake.model,
           options=fake.options(id_column="key", policy=CommitPolicy(rows=300), maintain=False))
    from clipsql.queries.sql.db import connect
    con = connect(st)
    expected = con.sql("SELECT count(*), sum(hash(id)) FROM embeddings").fetchall()
    from clipsql.store.maintenance import optimize
    optimize(st, retention_hours=24)
    assert con.sql("SELECT count(*), sum(hash(id)) FROM embeddings").fetchall() == expected
    assert connect(st).sql("SELECT count(*), sum(hash(id)) FROM embeddings").fetchall() == expected


def test_merged_partials_equal_one_pass():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(900, 7)) * 3 + 10
    whole = RunningMoments(7)
    whole.update(X)
    merged = RunningMoments(7)
    for part in (X[:100], X[100:550], X[550:]):
        m = RunningMoments(7)
        m.update(part)                   # each partial with its own shift
        merged.merge(m)
    np.testing.assert_allclose(merged.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.cov, np.cov(X, rowvar=False, bias=True), rtol=1e-10)
    assert merged.n == whole.n == 900


def test_a_table_directory_without_a_version_is_no_table(pool, tmp_path, fake):
    """A writer killed while creating a table (or writing its first data files) leaves a directory
    with no manifest: nothing in it was committed, so recovery, readers and the next writer treat
    it as no table, and the next creation clears it."""
    from clipsql.store import tags
    from clipsql.store.doctor import doctor
    st = Store.init(tmp_path / "s")
    for name in ("samples", "tags", "deletions"):
        (st.path / "lance" / f"{name}.lance" / "data").mkdir(parents=True)
        (st.path / "lance" / f"{name}.lance" / "data" / "half-written.lance").write_bytes(b"\0" * 64)
    assert st.samples_table() is None and st.table_names() == []
    ingest(st, str(pool), model=fake.model, options=fake.options(id_column="key"))
    st = Store.open(st.path)
    assert count_rows(st, st.model()) == 3000 and st.samples_table().count_rows() == 3000
    assert not (st.path / "lance" / "samples.lance" / "data" / "half-written.lance").exists()
    assert tags.read(st).num_rows == 0
    tags.add_tags(st, sample_ids(st)[:2], "keep")
    assert tags.read(st).num_rows == 2
    assert doctor(st.path).consistent, doctor(st.path).to_dict()


def test_compaction_bounds_small_fragments_and_all_fragments_rewriting_little():
    """Two bounds: past `max_fragments` fragments smaller than a full-size one (`base` rows), those
    merge into full-size fragments; full-size ones are left as they are until the table holds
    more than `max_total` fragments in all, then they merge by size tiers (×4), halving the count.
    So a commit never pays for more than `max_total` fragments, and a row is rewritten about once
    while the table is under it, however many commits the run makes."""
    from clipsql.store.compaction import merge_target
    base = 1000
    assert merge_target([base] * 2000 + [10] * 6, 6, base, max_total=2048) is None   # full-size: not rewritten
    assert merge_target([base] * 2000 + [10] * 7, 6, base, max_total=2048) == base   # 7 small ones: merged
    assert merge_target([2 * base, base - 1] * 4, 3, base, max_total=2048) == base
    assert merge_target([base] * 3000, 6, base, max_total=2048) == 4 * base        # past the total: a tier up
    assert merge_target([base] * 3000 + [16 * base] * 10, 6, base, max_total=2048) == 4 * base
    # simulated runs of small commits under the default total bound: rows are rewritten at most
    # twice (the first merge, and the remainder of a merge once more), whatever the run's length

    def rewrites(commits: int) -> float:
        frags, rewritten = [], 0
        for _ in range(commits):
            frags.append(100)
            target = merge_target(frags, 6, base)
            if target is not None:
                small = sum(r for r in frags if r < target)
                rewritten += small
                frags = [r for r in frags if r >= target] + [target] * (small // target) \
                    + ([small % target] if small % target else [])
        assert sum(1 for r in frags if r < base) <= 6
        return rewritten / (commits * 100)
    short, long = rewrites(300), rewrites(18_000)        # 18k commits: 1,800 full-size fragments, under 2,048
    assert short <= 2 and long <= 2 and abs(long - short) < 0.1
