"""DataComp pools in (two models from one pool) and out (uid files the resharder reads)."""
import hashlib
import subprocess
import sys
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipsql import queries
from clipsql.ingest.datacomp import DataCompSource, is_datacomp_pool, pick_features
from clipsql.ingest.pipeline import ingest_pool
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.ingest.registry import open_source
from clipsql.queries.curation.datacomp import load_uids, save_uids, uid_array
from clipsql.errors import SelectionError, SourceError
from clipsql.kernels.arrays import to_numpy
from clipsql.store.reads import count_rows, read_embeddings

from conftest import write_pool
from datacomp_pool import damage_npz, drop_npz_rows, write_datacomp_pool

FAST = IngestOptions(progress=False)
MODELS = {"b32": "ViT-B-32/openai", "l14": "ViT-L-14/openai"}


def embeddings(st, model):
    tbl = read_embeddings(st, st.model(model)).sort_by("id")
    return tbl.column("id").to_pylist(), to_numpy(tbl.column("image_embedding")), \
        to_numpy(tbl.column("text_embedding"))


def rejects(st):
    return queries.connect(st).sql("SELECT model, reason, location, detail FROM rejects ORDER BY location").fetchall()


def test_pool_goes_in_as_two_models(store, tmp_path):
    pool = write_datacomp_pool(tmp_path / "pool" / "metadata", n_shards=2, rows=[30, 25], row_group_size=10)
    summaries = ingest_pool(store, tmp_path / "pool", options=FAST)     # DATA_DIR: the shards are in metadata/
    assert [(s.model_id, s.added, s.rejected, s.status) for s in summaries] == \
        [(MODELS["b32"], 55, {}, "done"), (MODELS["l14"], 55, {}, "done")]
    recs = {m.model_id: m for m in store.list_models()}
    assert {k: (r.dim, r.logit_scale, r.kind) for k, r in recs.items()} == \
        {MODELS["b32"]: (512, 100.0, "clip"), MODELS["l14"]: (768, 100.0, "clip")}
    by_uid = {}
    for shard in pool.values():
        for i, uid in enumerate(shard["uid"]):
            by_uid[uid] = (shard, i)
    for feat, model in MODELS.items():
        ids, img, txt = embeddings(store, model)
        assert ids == sorted(by_uid)
        want_img = np.stack([by_uid[u][0][f"{feat}_img"][by_uid[u][1]] for u in ids]).astype(np.float32)
        want_txt = np.stack([by_uid[u][0][f"{feat}_txt"][by_uid[u][1]] for u in ids]).astype(np.float32)
        assert img.dtype == np.float32 and np.array_equal(img, want_img) and np.array_equal(txt, want_txt)
    con = queries.connect(store)
    rows = con.sql("SELECT id, uri, caption, original_width, face_bboxes, sha256, clip_l14_similarity_score "
                   "FROM samples").fetchall()
    assert len(rows) == 55
    for uid, uri, caption, width, bboxes, sha, score in rows:
        shard, i = by_uid[uid]
        assert (uri, caption) == (shard["url"][i], shard["text"][i])
        assert sha == hashlib.sha256(uri.encode()).hexdigest() and width >= 64 and 0.1 <= score <= 0.4
        assert bboxes == ("[[0.1,0.2,0.3,0.4]]" if i % 3 == 0 else "[]")
    # the images are not decoded: the pool's original size is the samples' width / height
    sizes = con.sql("SELECT count(width), count(height), count(*) FILTER (WHERE width IS DISTINCT FROM "
                    "original_width OR height IS DISTINCT FROM original_height) FROM samples").fetchall()
    assert sizes == [(55, 55, 0)]


def test_reingest_adds_nothing_and_a_new_shard_adds_only_its_rows(store, tmp_path):
    write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=20)
    ingest_pool(store, tmp_path / "pool", options=FAST)
    again = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.skipped, s.units_skipped) for s in again] == [(0, 40, 2), (0, 40, 2)]
    new = write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=15, first_shard=2)
    later = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.units_skipped) for s in later] == [(15, 2), (15, 2)]
    assert {s.model_id: count_rows(store, store.model(s.model_id)) for s in later} == \
        {MODELS["b32"]: 55, MODELS["l14"]: 55}
    ids, img, _ = embeddings(store, MODELS["l14"])
    (shard,) = new.values()
    at = {u: i for i, u in enumerate(ids)}
    assert np.array_equal(img[[at[u] for u in shard["uid"]]], shard["l14_img"].astype(np.float32))


def test_a_rerun_opens_no_shard_and_a_touched_shard_is_rehashed_not_reingested(store, tmp_path, monkeypatch):
    """Planning asks the ledger first: shards whose size and mtimes match are not opened at all;
    a touched shard of the same content is hashed (the parquet's bytes, the npz's zip directory),
    not read again; a shard whose content changed is read."""
    from clipsql.ingest import datacomp as dc
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=3, rows=20)
    ingest_pool(store, tmp_path / "pool", options=FAST)
    opens = []
    real_pf, real_zip = dc.pq.ParquetFile, dc.zipfile.ZipFile

    class PF(real_pf):
        def __init__(self, path, *a, **k):
            opens.append(("parquet", os.path.basename(str(path))))
            super().__init__(path, *a, **k)

    class Zip(real_zip):
        def __init__(self, path, *a, **k):
            opens.append(("npz", os.path.basename(str(path))))
            super().__init__(path, *a, **k)
    monkeypatch.setattr(dc.pq, "ParquetFile", PF)
    monkeypatch.setattr(dc.zipfile, "ZipFile", Zip)
    again = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.skipped, s.units_skipped) for s in again] == [(0, 60, 3), (0, 60, 3)]
    assert opens == []
    first, second = list(pool.values())[:2]
    os.utime(first["npz"], ns=(0, os.stat(first["npz"]).st_mtime_ns + 10**9))
    touched = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.units_skipped) for s in touched] == [(0, 3), (0, 3)]
    stem = os.path.basename(first["npz"])[:-4]
    assert sorted(set(opens)) == [("npz", stem + ".npz")]      # its directory only, once per feature set
    opens.clear()
    with np.load(second["npz"]) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["b32_img"][0, 0] += 1                 # new content (known uids: the rows are skipped by id)
    np.savez(second["npz"], **arrays)
    changed = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.units_skipped) for s in changed] == [(0, 2), (0, 2)]   # the changed shard is read again
    assert ("parquet", os.path.basename(second["parquet"])) in opens
    assert {s.model_id: count_rows(store, store.model(s.model_id)) for s in changed} == \
        {MODELS["b32"]: 60, MODELS["l14"]: 60}


def test_bad_rows_are_recorded_rejections(store, tmp_path):
    write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=12, bad_rows=True)
    b32, l14 = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert b32.rejected == {"bad_uid": 1, "non_finite_vector": 1, "duplicate_id": 1, "empty_caption": 1}
    assert l14.rejected == {"bad_uid": 1, "duplicate_id": 1, "empty_caption": 1}   # its row 2 is finite
    assert (b32.added, l14.added) == (8, 9)
    got = {(m, r, loc) for m, r, loc, _ in rejects(store)}
    stem = next(tmp_path.joinpath("pool").glob("*.parquet")).stem
    assert (MODELS["b32"], "bad_uid", f"{stem}.parquet:row 2") in got
    assert (MODELS["b32"], "non_finite_vector", f"{stem}.parquet:row 3") in got
    assert (MODELS["b32"], "duplicate_id", f"{stem}.parquet:row 4") in got
    assert len(got) == 4     # the store keeps a (location, reason) once: the l14 run's rejects are the same rows


def test_damaged_shards_are_recorded_not_fatal_and_a_fixed_shard_goes_in(store, tmp_path):
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=4, rows=10)
    broken, short, orphan, good = pool.values()
    damage_npz(broken["npz"])
    drop_npz_rows(short["npz"])
    os.unlink(orphan["npz"])
    b32, l14 = ingest_pool(store, tmp_path / "pool", options=FAST)
    for s in (b32, l14):
        assert s.status == "done" and s.added == 10
        assert s.rejected == {"bad_npz": 1, "row_count_mismatch": 1, "missing_npz": 1}
    rows = rejects(store)
    assert len(rows) == 3        # one per shard: the l14 run found the same (location, reason)
    where = {reason: (loc, detail) for _, reason, loc, detail in rows}
    assert where["bad_npz"][0] == f"{Path(broken['npz']).name}" and "10 rows were not ingested" in where["bad_npz"][1]
    assert "9 rows" in where["row_count_mismatch"][1] and "has 10" in where["row_count_mismatch"][1]
    assert where["missing_npz"][0] == Path(orphan["parquet"]).name and "--download_npz" in where["missing_npz"][1]
    # a re-run records nothing twice; re-downloaded shards go in (their files changed)
    ingest_pool(store, tmp_path / "pool", options=FAST)
    assert len(rejects(store)) == 3
    write_datacomp_pool(tmp_path / "pool", n_shards=3, rows=10)
    fixed = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.rejected) for s in fixed] == [(30, {}), (30, {})]
    assert count_rows(store, store.model(MODELS["l14"])) == 40


def test_compressed_npz_numbered_stems_and_one_feature_set(store, tmp_path):
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=9, compressed=True, numbered=True,
                               dtype=np.float32, row_group_size=4)
    assert sorted(p.name for p in (tmp_path / "pool").iterdir())[:2] == ["00000000.npz", "00000000.parquet"]
    src = open_source(tmp_path / "pool", datacomp_features="l14")
    assert src.kind == "datacomp" and src.precomputed and len(src.units()) == 6
    (s,) = ingest_pool(store, tmp_path / "pool", features="l14", options=FAST)
    assert s.model_id == MODELS["l14"] and s.added == 18 and [m.model_id for m in store.list_models()] == [s.model_id]
    ids, img, txt = embeddings(store, MODELS["l14"])
    want = {u: (sh["l14_img"][i], sh["l14_txt"][i]) for sh in pool.values() for i, u in enumerate(sh["uid"])}
    assert np.array_equal(img, np.stack([want[u][0] for u in ids]))
    assert np.array_equal(txt, np.stack([want[u][1] for u in ids]))
    items = [r for u in src.units() for r in src.read(u)]     # the item path reads the same rows
    assert sorted(i.id for i in items) == ids and items[0].meta["original_width"] > 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_memory_mapped_npz_of_any_float_dtype_goes_in(store, tmp_path, dtype):
    """float32 is what np.savez of CLIP outputs gives: its members, memory-mapped in place at an offset
    that is not a multiple of 4, crashed the ingest with a Rust panic (memory pointer not aligned)."""
    from clipsql.ingest.datacomp import npz_members
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=[7, 5], dtype=dtype)
    members = npz_members(str(next(iter(pool.values()))["npz"]))
    assert members["b32_img"][1] == np.dtype(dtype) and members["b32_img"][3] is not None    # stored: mapped
    summaries = ingest_pool(store, tmp_path / "pool", options=FAST)
    assert [(s.added, s.rejected, s.status) for s in summaries] == [(12, {}, "done")] * 2
    for feat, model in MODELS.items():
        ids, img, txt = embeddings(store, model)
        want = {u: (sh[f"{feat}_img"][i], sh[f"{feat}_txt"][i])
                for sh in pool.values() for i, u in enumerate(sh["uid"])}
        assert img.dtype == np.float32 and ids == sorted(want)
        # float16 and float32 exactly; float64 rounded to the store's float32, as for every source
        assert np.array_equal(img, np.stack([want[u][0] for u in ids]).astype(np.float32))
        assert np.array_equal(txt, np.stack([want[u][1] for u in ids]).astype(np.float32))


def test_the_model_picks_the_features_and_a_wrong_model_is_refused(store, tmp_path):
    write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=6)
    assert is_datacomp_pool(tmp_path / "pool") and not is_datacomp_pool(tmp_path)
    s = ingest(store, str(tmp_path / "pool"), model="ViT-L-14", pretrained="openai", options=FAST)
    assert s.model_id == MODELS["l14"] and s.added == 6
    with pytest.raises(SourceError, match="ViT-B-32/openai .b32. and ViT-L-14/openai"):
        ingest(store, str(tmp_path / "pool"), model="ViT-B-16", pretrained="openai", options=FAST)
    assert pick_features("all", "ViT-B/32", None) == ["b32"] and pick_features(None) == ["b32", "l14"]
    with pytest.raises(SourceError, match="neither"):
        pick_features("b32", "ViT-L-14", "openai")
    with pytest.raises(SourceError, match="choose b32, l14 or all"):
        pick_features("h14")
    with pytest.raises(SourceError, match="not a DataComp pool"):
        DataCompSource(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- uids out

def resharder_lookup(path, uids):
    """DataComp resharder.py, load_subset + the lookup in copy_worker, reimplemented: the count
    of every uid in the subset file (how many times the resharder would write the sample)."""
    u16 = np.dtype("u8,u8")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            subset = np.load(path, mmap_mode="r")
            assert subset.dtype == u16
        else:
            subset = np.memmap(path, u16, mode="r")
    counts = []
    for key_str in uids:
        key_u16 = np.array([divmod(int(key_str, 16), 2**64)], u16)[0]
        counts.append(int(np.searchsorted(subset, key_u16, "right") - np.searchsorted(subset, key_u16, "left")))
    return counts


def test_save_uids_is_what_the_resharder_reads(tmp_path):
    rng = np.random.default_rng(3)
    uids = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(500)] + ["0" * 32, "f" * 32]
    path = tmp_path / "subset.npy"
    digest = save_uids(uids, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["subset.npy"]          # no temp file left
    arr = np.load(path)
    assert arr.dtype == np.dtype("u8,u8") and arr.dtype.names == ("f0", "f1")
    want = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    want.sort()                                                               # apply_filter.py: uids.sort()
    assert np.array_equal(arr, want)
    assert resharder_lookup(path, uids) == [1] * len(uids)
    others = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(20)]
    assert resharder_lookup(path, others) == [0] * 20
    assert list(load_uids(path)) == sorted(uids)
    # numpy and Arrow inputs and upper-case hex give the same file; the raw-memmap form reads too
    import pyarrow as pa
    assert save_uids(np.array([u.upper() for u in uids]), tmp_path / "b.npy") == digest
    assert save_uids(pa.chunked_array([uids[:100], uids[100:]]), tmp_path / "c.npy") == digest
    raw = tmp_path / "subset.bin"
    raw.write_bytes(want.tobytes())
    assert resharder_lookup(raw, uids[:5]) == [1] * 5 and list(load_uids(raw)) == sorted(uids)
    save_uids([], tmp_path / "empty.npy")
    assert np.load(tmp_path / "empty.npy").dtype == np.dtype("u8,u8") and len(load_uids(tmp_path / "empty.npy")) == 0


def test_save_uids_refuses_what_is_not_a_uid_and_load_refuses_unsorted(tmp_path):
    with pytest.raises(SelectionError, match="not DataComp uids .*'3f2a'.*ingested from a DataComp pool") as e:
        save_uids(["0" * 32, "3f2a"], tmp_path / "x.npy")
    assert "\n" not in str(e.value) and not (tmp_path / "x.npy").exists()
    with pytest.raises(SelectionError, match="not DataComp uids"):
        save_uids(["g" * 32], tmp_path / "x.npy")
    with pytest.raises(SelectionError, match="cannot write"):
        save_uids(["0" * 32], tmp_path / "no-such-dir" / "x.npy")
    unsorted = uid_array(["0" * 31 + "1", "0" * 32])[::-1].copy()
    np.save(tmp_path / "u.npy", unsorted)
    with pytest.raises(SelectionError, match="not sorted"):
        load_uids(tmp_path / "u.npy")
    np.save(tmp_path / "w.npy", np.zeros(3, np.uint64))
    with pytest.raises(SelectionError, match="u8,u8"):
        load_uids(tmp_path / "w.npy")


def test_a_stores_ids_go_out_as_the_pools_uids(store, tmp_path):
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=10)
    ingest_pool(store, tmp_path / "pool", features="b32", options=FAST)
    ids = queries.connect(store).sql("SELECT id FROM samples WHERE original_width > 0").to_arrow_table().column("id")
    save_uids(ids, tmp_path / "all.npy")
    everything = [u for sh in pool.values() for u in sh["uid"]]
    assert resharder_lookup(tmp_path / "all.npy", everything) == [1] * 20


# --------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tmp_path):
    from clipsql.cli import app
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    write_datacomp_pool(tmp_path / "pool" / "metadata", n_shards=2, rows=8)
    assert "DataComp pools" in invoke("ingest", "--help").output
    assert invoke("init", tmp_path / "s").exit_code == 0
    r = invoke("ingest", tmp_path / "s", tmp_path / "pool", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "[ViT-B-32/openai] done: added 16" in r.output and "[ViT-L-14/openai] done: added 16" in r.output
    assert "demo model" not in r.output
    r = invoke("ingest", tmp_path / "s", tmp_path / "pool", "--no-progress", "--format", "json")
    assert r.exit_code == 0, r.output
    import json
    assert [(s["model_id"], s["added"]) for s in json.loads(r.output)] == [(MODELS["b32"], 0), (MODELS["l14"], 0)]
    assert invoke("init", tmp_path / "t").exit_code == 0
    r = invoke("ingest", tmp_path / "t", tmp_path / "pool", "--datacomp-features", "l14", "--kind", "datacomp",
               "--no-progress")
    assert r.exit_code == 0 and "ViT-B-32" not in r.output and "added 16" in r.output, r.output
    r = invoke("models", tmp_path / "t")
    assert "ViT-L-14/openai" in r.output and "ViT-B-32" not in r.output
    (tmp_path / "empty").mkdir()
    r = invoke("ingest", tmp_path / "t", tmp_path / "empty", "--kind", "datacomp", "--no-progress")
    assert r.exit_code == 1 and "not a DataComp pool" in r.output and "Traceback" not in r.output
    r = invoke("ingest", tmp_path / "t", tmp_path / "empty", "--datacomp-features", "b32", "--no-progress")
    assert r.exit_code == 1 and "DataComp pools only" in r.output
    r = invoke("ingest", tmp_path / "t", tmp_path / "pool", "--datacomp-features", "h14", "--no-progress")
    assert r.exit_code == 1 and "choose b32, l14 or all" in r.output


def test_a_pool_in_and_datacomps_clip_score_baseline_out(store, tmp_path):
    """End to end: a DataComp-layout pool goes in, `select --recipe clip-score --model ViT-L-14/openai`
    writes the uid file, and the resharder's lookup finds exactly DataComp's top 30% by the L/14
    cosine computed from the npz itself (ties by uid; DataComp's own threshold keeps one more row)."""
    from clipsql.cli import app
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=2, rows=[40, 35])
    r = CliRunner().invoke(app, ["ingest", str(store.path), str(tmp_path / "pool"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["select", str(store.path), "--model", MODELS["l14"], "--recipe", "clip-score",
                                 "-o", str(tmp_path / "uids.npy")])
    assert r.exit_code == 0 and "selected 22 of 75" in r.output, r.output
    uids = [u for sh in pool.values() for u in sh["uid"]]
    img = np.concatenate([sh["l14_img"] for sh in pool.values()]).astype(np.float64)
    txt = np.concatenate([sh["l14_txt"] for sh in pool.values()]).astype(np.float64)
    cos = np.einsum("ij,ij->i", img, txt) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    want = set(sorted(uids, key=lambda u: (-cos[uids.index(u)], u))[:int(0.3 * 75)])
    found = resharder_lookup(tmp_path / "uids.npy", uids)
    assert {u for u, k in zip(uids, found) if k} == want and max(found) == 1


def test_a_uid_file_is_refused_unless_every_selected_id_came_from_a_datacomp_pool(store, tmp_path):
    """A .npy "DataComp uid" file from a store whose ids are not DataComp uids was written without a
    word: content-hash ids are 32 hex characters too, and match nothing in any pool."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsql.cli import app
    from clipsql.queries.curation.selection import select
    pool = write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=12)
    ingest_pool(store, tmp_path / "pool", features="b32", options=FAST)
    rng = np.random.default_rng(3)          # the same model's vectors from a plain precomputed parquet
    def vec():
        return pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(5 * 512).astype(np.float32)), 512)
    pq.write_table(pa.table({"caption": [f"other {i}" for i in range(5)], "url": [f"http://o/{i}" for i in range(5)],
                             "image_embedding": vec(), "text_embedding": vec()}), tmp_path / "other.parquet")
    s = ingest(store, str(tmp_path / "other.parquet"), model="ViT-B-32", pretrained="openai",
               options=dataclasses.replace(FAST, model_given=True))
    assert s.added == 5
    ids = [r[0] for r in queries.connect(store).sql("SELECT id FROM samples").fetchall()]
    assert len(ids) == 17 and all(len(i) == 32 for i in ids)      # every id looks like a uid
    out = tmp_path / "uids.npy"
    with pytest.raises(SelectionError, match=r"5 of the 17 selected ids did not come from a DataComp pool") as e:
        select(store, sql="SELECT id FROM samples ORDER BY id", output=out)
    assert "\n" not in str(e.value) and "`format` parquet" in str(e.value)
    assert not out.exists() and not Path(str(out) + ".json").exists()
    r = CliRunner().invoke(app, ["select", str(store.path), "--sql", "SELECT id FROM samples", "-o", str(out)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "5 of the 17" in r.output, r.output
    assert not out.exists()
    # every other format is fine; and the pool's own rows go out as uids
    select(store, sql="SELECT id FROM samples ORDER BY id", output=tmp_path / "all.txt")
    assert len((tmp_path / "all.txt").read_text().split()) == 17
    side = select(store, sql="SELECT id FROM samples WHERE original_width IS NOT NULL", output=out)
    assert side.counts["selected"] == 12
    uids = [u for sh in pool.values() for u in sh["uid"]]
    assert resharder_lookup(out, uids) == [1] * 12


def test_a_precomputed_ingest_imports_neither_open_clip_nor_torch(tmp_path):
    """The model that made precomputed vectors is named from open_clip's config files (read, not
    imported) and the user's flags: a precomputed ingest never imports open_clip or torch."""
    write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=12)
    write_pool(tmp_path / "pre", shards=1, rows=20)            # clip-retrieval layout, 512-d
    code = ("import sys; from clipsql.store.store import Store; "
            "from clipsql.ingest.pipeline import IngestOptions, ingest, ingest_pool; "
            f"st = Store.init({str(tmp_path / 'store')!r}); o = IngestOptions(progress=False); "
            f"a = ingest_pool(st, {str(tmp_path / 'pool')!r}, options=o); "
            f"b = ingest(st, {str(tmp_path / 'pre')!r}, model='ViT-B-32', pretrained='laion2b_s34b_b79k', options=o); "
            "print([s.added for s in a], b.added, b.model_id, "
            "sorted(m for m in ('open_clip', 'torch', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[12,", "12]", "20", "ViT-B-32/laion2b_s34b_b79k", "[]"], out.stdout


def test_open_clip_models_named_without_importing_it_match_open_clip():
    """The tags and configs read from open_clip's files are open_clip's own, for every architecture."""
    open_clip = pytest.importorskip("open_clip")
    from clipsql.models import loading

    for arch in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        for tag in tags:
            assert loading._known_without_open_clip(arch, tag) == open_clip.get_model_config(arch), (arch, tag)
        assert loading._known_without_open_clip(arch, "no-such-tag") is None
    assert loading.resolve("ViT-B-32", "openai") == loading.ModelSpec(
        "ViT-B-32/openai", "ViT-B-32", "openai", False, open_clip.get_model_config("ViT-B-32"))
