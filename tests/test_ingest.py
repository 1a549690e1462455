"""The local ingest pipeline: idempotent, incremental, rejects, metadata, kills. The pipeline's
tests run on the torch-free `fake_encoder` (conftest), which counts what it encoded; the tiny
open_clip model stays where loading or running open_clip is the point (DataLoader workers, the
device summary, a killed CLI run, two real model kinds)."""
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsql.ingest.columnar import vector_matrix
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.errors import ModelError, StoreLocked
from clipsql.store.reads import count_rows
from clipsql.store.stats import saved_stats
from clipsql.store.store import Store

from conftest import (ROOT, assert_stats_match_vectors, sample_ids, stored_vectors, wait_for, write_image_folder,
                      write_pool)
from datacomp_pool import write_datacomp_pool

FAST = IngestOptions(batch_size=8, workers=0, progress=False)


def test_folder_ingest_is_idempotent_and_stats_match(store, image_folder, fake_encoder):
    fake = fake_encoder
    s1 = ingest(store, str(image_folder), model=fake.model, options=fake.options(batch_size=8))
    assert s1.added == 40 and s1.skipped == 0 and s1.rejected == {}
    assert set(s1.seconds) >= {"encode", "write", "stats"}
    assert (fake.loads, fake.images, fake.texts) == (1, 40, 40)
    s2 = ingest(store, str(image_folder), model=fake.model, options=fake.options(batch_size=8))
    assert s2.added == 0 and s2.skipped == 40
    assert (fake.loads, fake.images, fake.texts) == (1, 40, 40)      # nothing loaded or encoded again
    assert count_rows(store, store.model()) == 40
    assert_stats_match_vectors(store)
    # raw vectors are stored (normalize=False): norms are not all 1
    _, img, _ = stored_vectors(store)
    assert not np.allclose(np.linalg.norm(img, axis=1), 1.0)


def test_incremental_ingest_adds_only_new_rows(store, tmp_path, fake_encoder):
    fake = fake_encoder
    folder = write_image_folder(tmp_path / "d", 20)
    ingest(store, str(folder), model=fake.model, options=fake.options(batch_size=8))
    assert fake.images == 20
    write_image_folder(tmp_path / "d2", 30, seed=0)   # same first 20 files (same seed) + 10 new
    s = ingest(store, str(tmp_path / "d2"), model=fake.model, options=fake.options(batch_size=8))
    assert s.added == 10 and s.skipped == 20
    assert fake.images == 30 and fake.texts == 30     # the 20 known rows are read, not encoded
    assert_stats_match_vectors(store)


def _count_decodes(monkeypatch) -> list:
    """Counts image decodes of the local pipeline (workers=0: in this process)."""
    from clipsql.ingest import encode
    calls = []
    real = encode.load_image

    def counted(data, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return real(data, *a, **kw)
    monkeypatch.setattr(encode, "load_image", counted)
    return calls


def test_stored_ids_are_skipped_before_decoding_and_before_loading_the_model(store, tmp_path, fake_encoder,
                                                                             monkeypatch):
    """Rows the store holds (the ledger does not know this copy of the folder) are neither decoded nor
    encoded, and when every row is stored the model is not even loaded."""
    import shutil
    fake, decodes = fake_encoder, _count_decodes(monkeypatch)
    folder = write_image_folder(tmp_path / "d", 20)
    ingest(store, str(folder), model=fake.model, options=fake.options(batch_size=8))
    assert (fake.loads, fake.images, len(decodes)) == (1, 20, 20)
    shutil.copytree(folder, tmp_path / "copy")               # the same items, units the ledger lacks
    s = ingest(store, str(tmp_path / "copy"), model=fake.model, options=fake.options(batch_size=8))
    assert (s.added, s.skipped, s.units_skipped, s.rejected) == (0, 20, 0, {})
    assert (fake.loads, fake.images, fake.texts, len(decodes)) == (1, 20, 20, 20)   # no load, no decode
    write_image_folder(tmp_path / "more", 30)                # the same 20 items + 10 new ones
    s = ingest(store, str(tmp_path / "more"), model=fake.model, options=fake.options(batch_size=8))
    assert (s.added, s.skipped) == (10, 20)
    assert (fake.loads, fake.images, len(decodes)) == (2, 30, 30)    # only the new ones decoded and encoded
    assert count_rows(store, store.model()) == 30
    assert_stats_match_vectors(store)


def test_parallel_workers_give_same_rows(tmp_path, image_folder, tiny_model):
    a, b = Store.init(tmp_path / "a"), Store.init(tmp_path / "b")
    ingest(a, str(image_folder), model=tiny_model, options=FAST)
    ingest(b, str(image_folder), model=tiny_model, options=IngestOptions(batch_size=8, workers=2, progress=False))
    ia, xa, ya = stored_vectors(a)
    ib, xb, yb = stored_vectors(b)
    assert ia == ib
    np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6)


def test_two_models_in_one_store(store, image_folder, fake_encoder, fake_siglip):
    ingest(store, str(image_folder), model=fake_encoder.model, options=fake_encoder.options(batch_size=8))
    s = ingest(store, str(image_folder), model=fake_siglip.model, options=fake_siglip.options(batch_size=8))
    assert s.added == 40
    models = store.list_models()
    assert len(models) == 2
    assert {m.kind for m in models} == {"clip", "siglip"}
    assert store.model().model_id == models[0].model_id        # first model stays the default
    from clipsql import queries
    con = queries.connect(store)
    counts = dict(con.sql("SELECT model, count(*) FROM embeddings GROUP BY model").fetchall())
    assert sorted(counts.values()) == [40, 40]
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 40
    assert_stats_match_vectors(store, models[1].model_id)


def test_unknown_model_fails_before_writing(store, image_folder):
    with pytest.raises(ModelError, match="unknown model"):
        ingest(store, str(image_folder), model="ViT-Nope-99", options=FAST)
    with pytest.raises(ModelError, match="`pretrained`"):
        ingest(store, str(image_folder), model="RN50", options=FAST)
    with pytest.raises(ModelError, match="known tags"):
        ingest(store, str(image_folder), model="RN50", pretrained="no-such-tag", options=FAST)
    with pytest.raises(ModelError, match="does not exist"):
        ingest(store, str(image_folder), model="RN50", checkpoint="/no/such/file.pt", options=FAST)
    with pytest.raises(ModelError, match="does not exist"):
        ingest(store, str(image_folder), model="local-dir:/no/such/dir", options=FAST)
    assert store.list_models() == []


def test_pretrained_tag_that_cannot_be_fetched_fails_fast(store, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not cached on this machine"):
        ingest(store, str(image_folder), model="RN50", pretrained="openai", options=FAST)
    assert store.list_models() == []


def test_concurrent_ingest_is_refused(store, image_folder, fake_encoder):
    with Store.open(store.path).lock():
        with pytest.raises(StoreLocked):
            ingest(store, str(image_folder), model=fake_encoder.model, options=fake_encoder.options())
    assert fake_encoder.loads == 0


def test_metadata_columns_from_a_table_are_visible_in_samples(store, tmp_path, fake_encoder):
    folder = write_image_folder(tmp_path / "imgs", 6)
    rows = [{"image": f"imgs/img{i:04d}.png", "caption": f"caption {i}", "kind": "normal" if i % 2 else "blank",
             "n_attributes": i, "score": i / 2} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    s = ingest(store, str(tmp_path / "t.parquet"), model=fake_encoder.model, options=fake_encoder.options())
    assert s.added == 6
    from clipsql import queries
    con = queries.connect(store)
    got = con.sql("SELECT kind, n_attributes, score, width FROM samples ORDER BY n_attributes").fetchall()
    assert got[0] == ("blank", 0, 0.0, 24) and got[5] == ("normal", 5, 2.5, 24)
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE samples)").fetchall())
    assert types["n_attributes"] == "BIGINT" and types["kind"] == "VARCHAR"
    del folder


def test_bad_inputs_are_rejected_not_fatal(store, tmp_path, fake_encoder):
    d = write_image_folder(tmp_path / "bad", 4)
    (d / "zero.png").write_bytes(b"")
    (d / "zero.txt").write_text("empty file")
    good = (d / "img0000.png").read_bytes()
    (d / "trunc.png").write_bytes(good[: len(good) // 2])
    (d / "trunc.txt").write_text("truncated")
    (d / "notimg.png").write_text("hello, not an image")
    (d / "notimg.txt").write_text("text file")
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(d / "cmyk.jpg")
    (d / "cmyk.jpg").with_suffix(".txt").write_text("a cmyk image")
    Image.new("P", (20, 20)).save(d / "pal.png")
    (d / "pal.txt").write_text("a palette image")
    Image.new("RGBA", (20, 20), (255, 0, 0, 10)).save(d / "rgba.png")
    (d / "rgba.txt").write_text("a transparent image")
    Image.new("I;16", (20, 20)).save(d / "deep.png")
    (d / "deep.txt").write_text("a 16-bit image")
    Image.new("RGB", (20, 20)).save(d / "nocap.png")            # no caption file
    Image.new("RGB", (21, 20)).save(d / "empty.png")
    (d / "empty.txt").write_text("   \n")
    Image.new("RGB", (22, 20)).save(d / "latin1.png")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    Image.new("RGB", (23, 20)).save(d / "long.png")
    (d / "long.txt").write_text(" ".join(["word"] * 200))
    (d / "dup.png").write_bytes(good)
    (d / "dup.txt").write_bytes((d / "img0000.txt").read_bytes())
    fake = fake_encoder
    s = ingest(store, str(d), model=fake.model, options=fake.options(batch_size=8))
    from clipsql import queries
    con = queries.connect(store)
    reasons = dict(con.sql("SELECT location, reason FROM rejects").fetchall())
    by_name = {Path(k).stem: v for k, v in reasons.items()}
    assert by_name["zero"] == "empty_file"
    assert by_name["trunc"] == "corrupt_image"
    assert by_name["notimg"] == "not_an_image"
    assert by_name["nocap"] == "missing_caption"
    assert by_name["empty"] == "empty_caption"
    assert by_name["latin1"] == "caption_not_utf8"
    assert "duplicate_id" in reasons.values()
    # converted, not rejected: CMYK, palette, RGBA, 16-bit; long caption truncated and noted
    kept = dict(con.sql("SELECT regexp_extract(uri, '([a-z0-9]+)\\.[a-z]+$', 1), caption_truncated "
                        "FROM samples").fetchall())
    for name in ("cmyk", "pal", "rgba", "deep", "long"):
        assert name in kept, name
    assert kept["long"] is True and kept["cmyk"] is False
    assert s.added == 4 + 5 and fake.images == 4 + 5
    # re-running records no duplicate rejects and adds nothing
    s2 = ingest(store, str(d), model=fake.model, options=fake.options(batch_size=8))
    assert s2.added == 0 and fake.images == 4 + 5
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == len(reasons)


def _write_precomputed(folder: Path, n: int, dim: int, rng) -> tuple[np.ndarray, np.ndarray]:
    (folder / "img_emb").mkdir(parents=True)
    (folder / "text_emb").mkdir()
    (folder / "metadata").mkdir()
    img = rng.normal(size=(n, dim)).astype(np.float32)
    txt = rng.normal(size=(n, dim)).astype(np.float32)
    np.save(folder / "img_emb" / "img_emb_0.npy", img)
    np.save(folder / "text_emb" / "text_emb_0.npy", txt)
    pq.write_table(pa.table({"url": [f"http://x/{i}.jpg" for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}),
                   folder / "metadata" / "metadata_0.parquet")
    return img, txt


def test_precomputed_embeddings_with_bad_vectors(store, tmp_path, fake_encoder):
    rng = np.random.default_rng(0)
    img, txt = _write_precomputed(tmp_path / "pre", 12, 16, rng)
    img[1, 3] = np.nan
    txt[2, 0] = np.inf
    img[3] = 0
    np.save(tmp_path / "pre" / "img_emb" / "img_emb_0.npy", img)
    np.save(tmp_path / "pre" / "text_emb" / "text_emb_0.npy", txt)
    s = ingest(store, str(tmp_path / "pre"), model=fake_encoder.model, options=fake_encoder.options())
    assert s.added == 9 and fake_encoder.images == fake_encoder.texts == 0    # the vectors are the source's
    assert s.rejected == {"non_finite_vector": 2, "zero_vector": 1}
    ids, got_img, _ = stored_vectors(store)
    assert len(ids) == 9
    assert_stats_match_vectors(store)


def test_vector_matrix_reads_npy_rows_in_place_and_copies_other_layouts(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
    x[2, 1], x[4] = np.inf, 0
    np.save(tmp_path / "v.npy", x)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    for col, in_place in ((mapped, True), (x.astype(">f4"), False), (x.astype(np.float64), False),
                          (np.asfortranarray(x), False), (mapped[:, :2], None)):
        dim = col.shape[1]
        got, reasons = vector_matrix(col, 6, dim)
        if in_place is None:          # a non-contiguous view: copied
            assert not np.shares_memory(got, mapped)
        else:
            assert np.shares_memory(got, col) == in_place
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.aligned
        np.testing.assert_array_equal(got, x[:, :dim])
        assert [r and r.split("\t")[0] for r in reasons] == \
            [None, None, "non_finite_vector" if dim > 1 else None, None, "zero_vector", None]


def test_precomputed_wrong_dim_is_refused(store, tmp_path, fake_encoder):
    from clipsql.errors import DimensionMismatch
    _write_precomputed(tmp_path / "pre", 5, 7, np.random.default_rng(0))
    with pytest.raises(DimensionMismatch, match="16"):
        ingest(store, str(tmp_path / "pre"), model=fake_encoder.model, options=fake_encoder.options())
    assert store.list_models() == []


def _run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "clipsql", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("kill_at", [pytest.param(0, marks=pytest.mark.slow), 12, pytest.param(60, marks=pytest.mark.slow)],
                         ids=["model-registered", "first-commit", "mid-run"])     # ~45 s each measured
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tiny_model, kill_at):
    """SIGKILL the CLI once a reader sees `kill_at` committed rows (0: once the model is registered,
    before the first commit); whatever it was doing then, a re-run gives the uninterrupted store."""
    data = write_image_folder(tmp_path / "data", 120, seed=3)
    ref = Store.init(tmp_path / "ref")
    ingest(ref, str(data), model=tiny_model, options=FAST)
    Store.init(tmp_path / "s")
    args = ["ingest", str(tmp_path / "s"), str(data), "--model", tiny_model, "--batch-size", "4",
            "--workers", "0", "--no-progress", "--commit-rows", "12"]
    p = _run_cli(*args)
    st = Store.open(tmp_path / "s")

    def reached() -> bool:
        return p.poll() is not None or bool(st.list_models()) and count_rows(st, st.model()) >= kill_at
    wait_for(reached, f"{kill_at} committed rows", deadline=300)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if st.list_models():     # what a reader sees after the kill: whole commits, statistics current
        assert saved_stats(st, st.model()).n == count_rows(st, st.model())
        assert_stats_match_vectors(st)
    rerun = _run_cli(*args)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    st = Store.open(tmp_path / "s")
    ids, img, txt = stored_vectors(st)
    rids, rimg, rtxt = stored_vectors(ref)
    assert ids == rids                      # no duplicates, nothing lost
    np.testing.assert_allclose(img, rimg, rtol=1e-5, atol=1e-6)
    assert sample_ids(st) == sample_ids(ref)
    assert_stats_match_vectors(st)


def test_default_workers_leave_the_cpu_forward_its_cores():
    from clipsql.ingest.pipeline import default_workers
    assert [default_workers("cpu", n) for n in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 2, 4, 4]
    assert [default_workers("cuda:0", n) for n in (1, 2, 16, 64)] == [1, 1, 8, 8]


def test_summary_reports_device_and_workers(tmp_path, image_folder, tiny_model):
    st = Store.init(tmp_path / "s")
    s = ingest(st, str(image_folder), model=tiny_model, options=IngestOptions(batch_size=8, progress=False))
    from clipsql.ingest.pipeline import default_workers
    assert s.device == "cpu" and s.workers == default_workers("cpu")


def test_a_non_utf8_file_name_is_one_reject_not_a_lost_batch(store, tmp_path, fake_encoder):
    """`caf\\xe9.png` aborted the whole folder ingest (pa.table refused the surrogates)."""
    data = write_image_folder(tmp_path / "data", 6)
    raw = os.fsencode(str(data))
    os.rename(os.path.join(raw, b"img0002.png"), os.path.join(raw, b"caf\xe9.png"))
    os.rename(os.path.join(raw, b"img0002.txt"), os.path.join(raw, b"caf\xe9.txt"))
    fake = fake_encoder
    s = ingest(store, str(data), model=fake.model, options=fake.options(batch_size=8))
    assert s.added == 5 and s.rejected == {"path_not_utf8": 1}
    from clipsql.queries.sql.db import connect
    rows = connect(store).sql("SELECT location, reason, detail FROM rejects").fetchall()
    assert rows[0][0] == "caf\\xe9.png" and rows[0][1] == "path_not_utf8" and "rename" in rows[0][2]
    again = ingest(store, str(data), model=fake.model, options=fake.options(batch_size=8))   # a re-run is as quiet
    assert again.added == 0 and again.skipped == 5 and fake.images == 5


def test_images_without_captions_allowed_and_faults_reported_first(tmp_path, fake_encoder):
    """an image's own fault comes before its missing caption; --allow-missing-captions
    keeps captionless images with a NULL text embedding (image scores work, text/pair are NULL)."""
    from clipsql.queries.sql.db import connect
    folder = write_image_folder(tmp_path / "d", 10)
    for i in (1, 2, 3):
        (folder / f"img{i:04d}.txt").unlink()
    (folder / "img0004.txt").write_text("   \u200b ")          # empty once cleaned
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)   # corrupt, no caption
    st = Store.init(tmp_path / "plain")
    fake = fake_encoder
    s = ingest(st, str(folder), model=fake.model, options=fake.options())
    assert s.added == 6 and s.rejected.get("corrupt_image") == 1
    assert s.rejected.get("missing_caption") == 3
    st2 = Store.init(tmp_path / "allowed")
    s2 = ingest(st2, str(folder), model=fake.model, options=fake.options(allow_missing_captions=True))
    assert s2.added == 10 and s2.rejected == {"corrupt_image": 1}
    ids, img, txt = stored_vectors(st2)
    assert np.isnan(txt[:, 0]).sum() == 4 and not np.isnan(img).any()
    assert_stats_match_vectors(st2)
    state = saved_stats(st2, st2.model())
    assert state.moments[("image", "raw")].n == 10 and state.moments[("text", "raw")].n == 6
    from clipsql.store.fits import fit_stats
    fit_stats(st2, reference_size=100)
    con = connect(st2)
    rows = con.sql("SELECT caption IS NULL AS nocap, image_info_gain, text_info_gain, clip_score "
                   "FROM scores").fetchall()
    assert len(rows) == 10
    for nocap, iig, tig, cs in rows:
        assert iig is not None
        assert (tig is None) == nocap and (cs is None) == nocap
    # content ids: the same image with no caption is one sample, re-runs add nothing
    encoded = (fake.images, fake.texts)
    assert encoded == (6 + 10, 6 + 6)                  # captionless images: no text encoded
    again = ingest(st2, str(folder), model=fake.model, options=fake.options(allow_missing_captions=True))
    assert again.added == 0 and (fake.images, fake.texts) == encoded


def test_the_fake_encoder_is_what_the_store_holds(store, tmp_path, fake_encoder):
    """The seam: the vectors stored are the injected encoder's (raw, float32), and a caption's text
    vector is the encoder's vector of that caption; the Ray engine refuses an injected encoder."""
    from clipsql.engines.ingest import ingest_ray
    from clipsql.ingest.images import load_image
    fake = fake_encoder
    folder = write_image_folder(tmp_path / "d", 5)
    ingest(store, str(folder), model=fake.model, options=fake.options())
    rows = store.samples_table().to_table(columns=["id", "uri", "caption"]).to_pylist()
    ids, img, txt = stored_vectors(store)
    for r in rows:
        i = ids.index(r["id"])
        image = load_image((folder / os.path.basename(r["uri"])).read_bytes())
        np.testing.assert_array_equal(img[i], fake.vector("image", fake.preprocess(image)))
        np.testing.assert_array_equal(txt[i], fake.vector("text", r["caption"].encode()))
    assert sorted(fake.captions) == sorted(r["caption"] for r in rows)
    with pytest.raises(ValueError, match="encoder_factory"):
        ingest_ray(Store.init(tmp_path / "ray"), str(folder), model=fake.model, options=fake.options())


def test_a_ray_tasks_payload_does_not_grow_with_the_number_of_units(tmp_path):
    """Each Ray ingest task deserialised the whole list of units and the source (which lists every
    shard): ~2.2 µs per unit per task. A task now receives its own unit with a source describing only
    it, and the shared context has no source: the pickled bytes are the same at 3 and at 40 units, and
    the task reads exactly what the full source reads."""
    from clipsql.engines.tasks import RunContext, shared_context, unit_payload, unit_task
    from clipsql.ingest.registry import open_source
    sizes = {}
    for n in (3, 40):
        write_pool(tmp_path / f"pool{n}", shards=n, rows=8, row_group=8, dim=4)
        write_datacomp_pool(tmp_path / f"dc{n}", n_shards=n, rows=6)
        for kind, src in (("precomputed", open_source(tmp_path / f"pool{n}", id_column="key")),
                          ("datacomp", open_source(tmp_path / f"dc{n}", datacomp_features="b32"))):
            todo = [(u, src.unit_key(u)) for u in src.units()]
            assert len(todo) == n
            ctx = RunContext(store_path="s", rec=None, source=src, versions={}, shifts={}, seq=1, storage_versions={})
            payloads = [unit_payload(src, unit, key) for unit, key in todo]
            sizes[kind, n] = (max(map(len, payloads)), len(pickle.dumps(shared_context(ctx), protocol=5)))
            task_ctx, unit, key = unit_task(shared_context(ctx), payloads[-1])
            assert key == todo[-1][1] and task_ctx.source.canonical() == src.canonical()
            dim = 4 if kind == "precomputed" else 512
            mine, full = task_ctx.source.read_columns(unit, dim), src.read_columns(todo[-1][0], dim)
            assert mine.ids.equals(full.ids) and np.array_equal(mine.image, full.image)
    for kind in ("precomputed", "datacomp"):
        (task3, shared3), (task40, shared40) = sizes[kind, 3], sizes[kind, 40]
        assert task40 <= task3 + 8 and shared40 == shared3, sizes      # + 8: longer shard numbers


def test_the_ray_shards_reject_the_ids_a_local_run_rejects_and_merge_partials_exactly(store):
    """The Ray ingest's run state lives in K shard actors (engines.shards), not in the driver: each
    checks the ids whose fingerprint falls to it, in unit order, and merges the partials of the units
    whose key falls to it. Split over 3 shards, the rows found to repeat an earlier row of the run are
    exactly those a plain first-occurrence scan finds (a repeat within a unit keeps its first row, as
    locally), and the merged partial of a commit's units is the float64 mean and covariance of their rows."""
    from clipsql.engines.shards import Duplicates, RunShard, id_shards, key_shard
    from clipsql.store.stats import StatsState, new_moments, update_moments
    rec = store.register_model(model_id="test/d4", kind="clip", dim=4, logit_scale=100.0, logit_bias=None,
                               context_length=77, spec={})
    rng = np.random.default_rng(7)
    units = [[f"id{int(x)}" for x in rng.integers(0, 120, size=40)] for _ in range(8)]
    shards = [RunShard(str(store.path), rec) for _ in range(3)]
    seen, got, want = set(), [], []
    for u, ids in enumerate(units):
        expect = []
        for i in ids:                     # the reference: a row is a duplicate when its id occurred before
            expect.append(i in seen)
            seen.add(i)
        want.append(expect)
        arr = pa.array(ids, pa.string())
        part = id_shards(arr, 3)
        for p in range(3):
            if (part == p).any():
                shards[p].stage(f"u{u}", arr.filter(pa.array(part == p)))
        found = [s.check(f"u{u}") for s in shards]
        dup = Duplicates(frozenset().union(*(d.earlier for d in found)), frozenset().union(*(d.repeated for d in found)))
        got.append(dup.rows(arr).tolist())
    assert got == want and sum(map(sum, want)) > 50
    assert len(set(units[0])) < len(units[0])       # ids new to the run repeated within a unit, too
    assert sum(s.received for s in shards) == sum(map(len, units)) and max(s.received for s in shards) < 200
    rows = [rng.normal(size=(n, 4)).astype(np.float32) for n in (5, 9, 3, 7)]
    for u, X in enumerate(rows):
        state = StatsState(rec.model_id, new_moments(4, None), 0)
        update_moments(state, X, X[:, ::-1])
        shards[key_shard(f"c{u}", 3)].put(f"c{u}", state.moments)
    keys = [[f"c{u}" for u in range(4) if key_shard(f"c{u}", 3) == p] for p in range(3)]
    merged = shards[0].merge(*[s.take(k) for s, k in zip(shards, keys)])
    allx = np.concatenate(rows).astype(np.float64)
    m = merged[("image", "raw")]
    assert m.n == 24 and not any(s.partials for s in shards)
    np.testing.assert_allclose(m.mean, allx.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.cov, np.cov(allx, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
