"""ingest.sources: every source kind end to end on tiny generated data."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsql.ingest.registry import open_source
from clipsql.ingest.sources import Item, Reject
from clipsql.errors import SourceError

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def png(i: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]).save(buf, "PNG")
    return buf.getvalue()


def write(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def everything(source) -> list:
    return [rec for unit in source.units() for rec in source.read(unit)]


def by_location(records) -> dict:
    return {r.location: r for r in records}


def assert_each_once(source, expected_locations):
    locations = [r.location for r in everything(source)]
    assert sorted(locations) == sorted(expected_locations)
    assert len(set(locations)) == len(locations)


def assert_picklable(source):
    everything(source)  # fill any per-process cache first
    clone = pickle.loads(pickle.dumps(source))
    assert type(clone) is type(source) and clone.describe() == source.describe()
    assert [r.location for r in everything(clone)] == [r.location for r in everything(source)]


# ------------------------------------------------------------------ folder


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    write(root / "a.png", png(0))
    write(root / "a.txt", b"  a red square\n")
    write(root / "a.json", json.dumps({"key": "k-a", "w": 8, "tags": ["x", "y"]}))
    write(root / "sub" / "b.PNG", png(1))
    write(root / "sub" / "b.txt", "a green square")
    write(root / "c.png", png(2))  # no caption
    write(root / "orphan.txt", "caption with no image")
    write(root / "notes.pdf", b"%PDF-1.4")
    write(root / "odd.jfif", png(3))  # unusual extension, but captioned: it is a sample
    write(root / "odd.txt", "odd one")
    write(root / "lonely.json", "{}")  # a sidecar without image: ignored
    write(root / ".hidden.png", png(4))
    write(root / ".cache" / "x.png", png(5))
    return root


def test_folder_end_to_end(folder):
    src = open_source(folder, id_column="key")
    assert src.kind == "folder" and not src.precomputed
    recs = everything(src)
    assert [r.location for r in recs] == ["a.png", "c.png", "notes.pdf", "odd.jfif", "orphan.txt", "sub/b.PNG"]
    got = by_location(recs)
    a = got["a.png"]
    assert isinstance(a, Item)
    assert a.caption_raw == b"  a red square\n" and a.image_bytes == png(0)
    assert a.uri == str(folder / "a.png") and os.path.isabs(a.uri)
    assert a.id == "k-a" and a.meta == {"w": 8, "tags": '["x", "y"]'}
    assert got["sub/b.PNG"].caption_raw == b"a green square" and got["sub/b.PNG"].id is None
    assert_picklable(src)


def test_folder_missing_caption_is_an_item_without_caption(folder):
    c = by_location(everything(open_source(folder)))["c.png"]
    assert isinstance(c, Item) and c.caption_raw is None


def test_folder_orphan_txt(folder):
    r = by_location(everything(open_source(folder)))["orphan.txt"]
    assert isinstance(r, Reject) and r.reason == "missing_image"


def test_folder_unsupported_file(folder):
    r = by_location(everything(open_source(folder)))["notes.pdf"]
    assert isinstance(r, Reject) and r.reason == "unsupported_file"


def test_folder_captioned_odd_extension_flows_through(folder):
    odd = by_location(everything(open_source(folder)))["odd.jfif"]
    assert isinstance(odd, Item) and odd.caption_raw == b"odd one"


def test_folder_bad_json_sidecar(tmp_path):
    write(tmp_path / "a.png", png())
    write(tmp_path / "a.txt", "cap")
    write(tmp_path / "a.json", "[1, 2")
    recs = everything(open_source(tmp_path))
    assert [(r.location, getattr(r, "reason", None)) for r in recs] == [("a.json", "bad_metadata"), ("a.png", None)]
    assert recs[1].meta == {}


def test_folder_units_cover_every_file_once(folder):
    src = open_source(folder)
    src.files_per_unit = 2
    assert len(src.units()) == 3
    assert_each_once(src, ["a.png", "c.png", "notes.pdf", "odd.jfif", "orphan.txt", "sub/b.PNG"])


def test_folder_without_images(tmp_path):
    write(tmp_path / "readme.txt", "nothing here")
    with pytest.raises(SourceError, match="no image files"):
        open_source(tmp_path)


# ------------------------------------------------------------------ table


@pytest.fixture
def table_dir(tmp_path):
    write(tmp_path / "images" / "0.png", png(0))
    write(tmp_path / "images" / "1.png", png(1))
    abs_img = write(tmp_path / "elsewhere" / "2.png", png(2))
    rows = [
        {"image": "images/0.png", "caption": "red", "sid": 10, "source": "a"},
        {"image": "images/1.png", "caption": None, "sid": 11, "source": "b"},
        {"image": abs_img, "caption": "blue", "sid": 12, "source": "c"},
        {"image": "images/missing.png", "caption": "gone", "sid": 13, "source": "d"},
        {"image": "https://example.com/x.jpg", "caption": "remote", "sid": 14, "source": "e"},
    ]
    return tmp_path, rows


def check_table_rows(recs, name):
    got = by_location(recs)
    first = got[f"{name}:row 1"]
    assert isinstance(first, Item) and first.image_bytes == png(0) and first.id == "10"
    assert first.caption_raw in ("red", b"red")
    assert first.meta == {"source": "a"}
    assert got[f"{name}:row 2"].caption_raw is None
    assert os.path.isabs(got[f"{name}:row 3"].uri) and got[f"{name}:row 3"].image_bytes == png(2)
    assert got[f"{name}:row 4"].reason == "missing_file"
    remote = got[f"{name}:row 5"]
    assert remote.reason == "remote_uri_unsupported" and "img2dataset" in remote.detail


def test_table_parquet(table_dir):
    d, rows = table_dir
    pq.write_table(pa.Table.from_pylist(rows), d / "t.parquet", row_group_size=2)
    src = open_source(d / "t.parquet", id_column="sid")
    assert src.kind == "table" and len(src.units()) == 3  # row groups
    recs = everything(src)
    check_table_rows(recs, "t.parquet")
    assert by_location(recs)["t.parquet:row 1"].uri == str(d / "images" / "0.png")
    assert_each_once(src, [f"t.parquet:row {i}" for i in range(1, 6)])
    assert_picklable(src)


def test_table_csv(table_dir):
    d, rows = table_dir
    lines = ["image,caption,sid,source"] + [
        f"{r['image']},{r['caption'] or ''},{r['sid']},{r['source']}" for r in rows]
    write(d / "t.csv", "\n".join(lines) + "\n")
    src = open_source(d / "t.csv", id_column="sid")
    src.rows_per_unit = 2
    recs = everything(src)
    got = by_location(recs)
    assert got["t.csv:row 1"].caption_raw == b"red" and got["t.csv:row 1"].id == "10"
    assert got["t.csv:row 2"].caption_raw == b""  # CSV has no NULL: an empty caption
    assert got["t.csv:row 4"].reason == "missing_file"
    assert got["t.csv:row 5"].reason == "remote_uri_unsupported"
    assert len(src.units()) == 3
    assert_each_once(src, [f"t.csv:row {i}" for i in range(1, 6)])
    assert_picklable(src)


def test_table_csv_non_utf8_caption_is_left_to_clean_caption(tmp_path):
    write(tmp_path / "0.png", png())
    write(tmp_path / "t.csv", b"image,caption\n0.png,caf\xe9\n")
    (item,) = everything(open_source(tmp_path / "t.csv"))
    assert item.caption_raw == b"caf\xe9"


def test_table_csv_malformed_row(tmp_path):
    write(tmp_path / "0.png", png())
    write(tmp_path / "t.csv", "image,caption\n0.png,ok\n0.png,too,many,fields\n0.png,fine\n")
    recs = everything(open_source(tmp_path / "t.csv"))
    assert [(r.location, getattr(r, "reason", "item")) for r in recs] == [
        ("t.csv:line 3", "bad_row"), ("t.csv:row 1", "item"), ("t.csv:row 2", "item")]


def test_table_jsonl_with_bom(tmp_path):
    write(tmp_path / "0.png", png())
    write(tmp_path / "t.jsonl", b"\xef\xbb\xbf" + json.dumps({"image": "0.png", "caption": "c"}).encode() + b"\n")
    (item,) = everything(open_source(tmp_path / "t.jsonl"))
    assert isinstance(item, Item) and item.caption_raw == "c"


def test_table_jsonl(table_dir):
    d, rows = table_dir
    write(d / "t.jsonl", "\n".join(json.dumps(r) for r in rows[:3]) + "\n\nnot json\n" +
          "\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    src = open_source(d / "t.jsonl", id_column="sid")
    src.rows_per_unit = 2
    recs = everything(src)
    got = by_location(recs)
    assert got["t.jsonl:line 1"].caption_raw == "red" and got["t.jsonl:line 1"].id == "10"
    assert got["t.jsonl:line 2"].caption_raw is None
    assert got["t.jsonl:line 5"].reason == "bad_row"
    assert got["t.jsonl:line 6"].reason == "missing_file"
    assert got["t.jsonl:line 7"].reason == "remote_uri_unsupported"
    assert_each_once(src, [f"t.jsonl:line {i}" for i in (1, 2, 3, 5, 6, 7)])
    assert_picklable(src)


def test_table_json_lines_with_json_extension(tmp_path):
    write(tmp_path / "0.png", png())
    write(tmp_path / "t.json", json.dumps({"image": "0.png", "caption": "x", "extra": {"a": [1]}}) + "\n")
    (item,) = everything(open_source(tmp_path / "t.json"))
    assert item.caption_raw == "x" and item.meta == {"extra": '{"a": [1]}'}


def test_table_column_options(tmp_path):
    write(tmp_path / "pics" / "0.png", png())
    write(tmp_path / "t.csv", "path,text,uid\npics/0.png,hello,abc\n")
    src = open_source(tmp_path / "t.csv", image_column="path", caption_column="text", id_column="uid")
    (item,) = everything(src)
    assert (item.caption_raw, item.id, item.meta, item.image_bytes) == (b"hello", "abc", {}, png())


def test_table_embedded_image_bytes(tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": png(), "path": "x.png"}], "caption": ["c"]}), tmp_path / "t.parquet")
    (item,) = everything(open_source(tmp_path / "t.parquet"))
    assert item.image_bytes == png() and item.uri is None


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_table_missing_column_error(tmp_path, fmt):
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        write(path, "path,text\na.png,hi\n")
    elif fmt == "parquet":
        pq.write_table(pa.table({"path": ["a.png"], "text": ["hi"]}), path)
    else:
        write(path, json.dumps({"path": "a.png", "text": "hi"}) + "\n")
    with pytest.raises(SourceError, match=r"no column 'image'.*path, text.*image_column"):
        open_source(path)
    with pytest.raises(SourceError, match=r"no column 'caption'.*caption_column"):
        open_source(path, image_column="path")
    with pytest.raises(SourceError, match=r"no column 'nope'.*id_column"):
        open_source(path, image_column="path", caption_column="text", id_column="nope")


def test_table_json_array_is_refused(tmp_path):
    write(tmp_path / "t.json", json.dumps([{"image": "a.png", "caption": "c"}]))
    with pytest.raises(SourceError, match="JSON lines"):
        open_source(tmp_path / "t.json")


# ------------------------------------------------------------------ webdataset


def make_tar(path, samples) -> str:
    """samples: list of (member name, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def shard_samples(offset=0):
    k = [f"{offset + i:06d}" for i in range(4)]
    return [
        (f"{k[0]}.jpg", png(0)), (f"{k[0]}.txt", b"red"), (f"{k[0]}.json", b'{"uid": "u0", "w": 8}'),
        (f"{k[1]}.png", png(1)),  # no caption
        (f"{k[2]}.txt", b"no image here"), (f"{k[2]}.cls", b"3"),
        (f"dir/{k[3]}.a.webp", png(2)), (f"dir/{k[3]}.a.txt", b"multi-dot"),
        ("README", b"no extension"), ("._000000.jpg", b"macos junk"),
    ]


def test_webdataset_end_to_end(tmp_path):
    shard = make_tar(tmp_path / "shard-00000.tar", shard_samples())
    src = open_source(shard, id_column="uid")
    assert src.kind == "webdataset" and src.units() == [shard]
    recs = everything(src)
    got = by_location(recs)
    first = got["shard-00000.tar:000000"]
    assert first.image_bytes == png(0) and first.caption_raw == b"red"
    assert first.id == "u0" and first.meta == {"w": 8}
    assert first.uri == f"{shard}::000000.jpg"
    assert got["shard-00000.tar:000001"].caption_raw is None
    assert got["shard-00000.tar:000002"].reason == "missing_image"
    assert got["shard-00000.tar:dir/000003"].caption_raw == b"multi-dot"
    assert got["shard-00000.tar:README"].reason == "unsupported_file"
    assert len(recs) == 5
    assert_picklable(src)


def test_webdataset_dotted_keys_never_pair_wrongly_nor_drop_images(tmp_path):
    """Members sub/dir/odd.key.<i>.<ext> share webdataset's key (the name up to the first dot): 20 images
    and 13 captions used to become one sample (image odd.key.0.jpg with the caption of odd.key.1.txt) and
    19 images vanished.  Each full stem with one image and one caption is a sample; the rest is a reject."""
    exts = ["jpg", "bmp", "png", "webp"]
    members = []
    for i in range(20):
        members.append((f"sub/dir/odd.key.{i}.{exts[i % 4]}", png(i)))
        if 1 <= i <= 13:
            members.append((f"sub/dir/odd.key.{i}.txt", f"caption {i}".encode()))
    members += [("plain.jpg", png(0)), ("plain.png", png(1)), ("plain.txt", b"which image?"),
                ("multi.jpg", png(2)), ("multi.txt", b"the caption"), ("multi.de.txt", b"die Beschriftung")]
    shard = make_tar(tmp_path / "s.tar", members)
    recs = everything(open_source(shard))
    items = [r for r in recs if isinstance(r, Item)]
    rejects = [r for r in recs if isinstance(r, Reject)]
    odd = {r.location: r for r in items if r.location.startswith("s.tar:sub/")}
    assert sorted(odd) == sorted(f"s.tar:sub/dir/odd.key.{i}" for i in range(1, 14))
    for i in range(1, 14):
        r = odd[f"s.tar:sub/dir/odd.key.{i}"]
        assert r.caption_raw == f"caption {i}".encode() and r.image_bytes == png(i)
        assert r.uri == f"{shard}::sub/dir/odd.key.{i}.{exts[i % 4]}"
    # webdataset's own fields: one image (jpg) and the caption field txt; de.txt is another field
    multi = by_location(items)["s.tar:multi"]
    assert multi.caption_raw == b"the caption" and multi.image_bytes == png(2)
    assert len(items) == 14
    by = by_location(rejects)
    assert {r.reason for r in rejects} == {"ambiguous_sample"} and sorted(by) == ["s.tar:plain", "s.tar:sub/dir/odd"]
    for i in (0, 14, 15, 16, 17, 18, 19):      # every unpaired image is named in a reject
        assert f"sub/dir/odd.key.{i}.{exts[i % 4]}" in by["s.tar:sub/dir/odd"].detail
    assert "odd.key.1." not in by["s.tar:sub/dir/odd"].detail
    assert all(m in by["s.tar:plain"].detail for m in ("plain.jpg", "plain.png", "plain.txt"))


def test_webdataset_directory_and_patterns(tmp_path):
    d = tmp_path / "shards"
    for s in range(3):
        make_tar(d / f"shard-{s:05d}.tar", shard_samples(offset=10 * s))
    expected = [f"shard-{s:05d}.tar:{10 * s + i:06d}" for s in range(3) for i in range(3)]
    expected += [f"shard-{s:05d}.tar:dir/{10 * s + 3:06d}" for s in range(3)]
    expected += [f"shard-{s:05d}.tar:README" for s in range(3)]
    for spec in (d, d / "*.tar", d / "shard-{00000..00002}.tar"):
        src = open_source(spec)
        assert src.kind == "webdataset" and len(src.units()) == 3
        assert_each_once(src, expected)
    with pytest.raises(SourceError, match="do not exist"):
        open_source(d / "shard-{00000..00005}.tar")


def test_webdataset_truncated_tar_keeps_earlier_samples(tmp_path):
    good = make_tar(tmp_path / "good.tar", shard_samples())
    data = open(good, "rb").read()
    bad = write(tmp_path / "bad.tar", data[:4000])  # inside the third member's data
    recs = everything(open_source(bad))
    assert [r.location for r in recs if isinstance(r, Item)] == ["bad.tar:000000"]
    (rej,) = [r for r in recs if isinstance(r, Reject)]
    assert rej.reason == "corrupt_tar" and "1 sample(s)" in rej.detail


def test_webdataset_truncated_at_a_header_is_detected(tmp_path):
    good = make_tar(tmp_path / "good.tar", [("000000.png", b"x" * 1000), ("000000.txt", b"c"), ("000001.png", b"y")])
    data = open(good, "rb").read()
    # 000000.png: header 512 + data padded to 1024; cut in the middle of the next header
    bad = write(tmp_path / "bad.tar", data[: 512 + 1024 + 300])
    recs = everything(open_source(bad))
    assert [getattr(r, "reason", "item") for r in recs] == ["corrupt_tar"]  # 000000 lost its .txt: not kept


def test_webdataset_garbage_tar(tmp_path):
    bad = write(tmp_path / "junk.tar", b"this is not a tar archive at all" * 40)
    (rej,) = everything(open_source(bad))
    assert (rej.location, rej.reason) == ("junk.tar", "corrupt_tar")


# ------------------------------------------------------------------ precomputed


def make_laion(root, sizes, dim=4, mismatch=False):
    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        write(root / "img_emb" / f"img_emb_{i}.npy", b"")
        np.save(root / "img_emb" / f"img_emb_{i}.npy", rng.standard_normal((n + mismatch, dim)).astype(np.float16))
        write(root / "text_emb" / f"text_emb_{i}.npy", b"")
        np.save(root / "text_emb" / f"text_emb_{i}.npy", rng.standard_normal((n, dim)).astype(np.float16))
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": [f"http://x/{i}/{j}.jpg" for j in range(n)],
                                 "caption": [f"cap {i} {j}" for j in range(n)],
                                 "similarity": [0.3] * n}),
                       root / "metadata" / f"metadata_{i}.parquet", row_group_size=2)


def test_precomputed_npy_layout(tmp_path):
    make_laion(tmp_path / "emb", [3, 2])
    src = open_source(tmp_path / "emb")
    assert src.kind == "precomputed" and src.precomputed
    assert len(src.units()) == 3  # row groups (2 + 1) and (2)
    recs = everything(src)
    assert [r.location for r in recs] == [f"metadata_0.parquet:row {i}" for i in (1, 2, 3)] + \
        [f"metadata_1.parquet:row {i}" for i in (1, 2)]
    img = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    txt = np.load(tmp_path / "emb" / "text_emb" / "text_emb_1.npy")
    assert np.array_equal(recs[2].image_embedding, img[2]) and np.array_equal(recs[4].text_embedding, txt[1])
    r = recs[3]
    assert (r.uri, r.caption_raw, r.image_bytes, r.meta) == ("http://x/1/0.jpg", "cap 1 0", None, {"similarity": 0.3})
    assert_picklable(src)


def test_precomputed_row_count_mismatch(tmp_path):
    make_laion(tmp_path / "emb", [3], mismatch=True)
    with pytest.raises(SourceError, match="rows"):
        open_source(tmp_path / "emb")


def test_precomputed_parquet(tmp_path):
    img = pa.array([[1.0, 0.0], [0.0, 1.0], None], pa.list_(pa.float32()))
    txt = pa.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], pa.list_(pa.float32(), 2))
    table = pa.table({"image_embedding": img, "text_embedding": txt, "caption": ["a", "b", "c"],
                      "image_path": ["0.png", "1.png", "2.png"], "key": [1, 2, 3], "w": [8, 8, 8]})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=2)
    src = open_source(tmp_path / "e.parquet", id_column="key")
    assert src.kind == "precomputed" and len(src.units()) == 2
    recs = everything(src)
    assert [r.id for r in recs] == ["1", "2", "3"]
    assert recs[1].image_embedding.tolist() == [0.0, 1.0] and recs[2].image_embedding is None
    assert recs[2].text_embedding.tolist() == [3.0, 3.0]
    assert recs[0].uri == "0.png" and recs[0].meta == {"w": 8}
    assert_picklable(src)


def test_precomputed_parquet_custom_column_names(tmp_path):
    table = pa.table({"iv": [[1.0]], "tv": [[2.0]], "caption": ["a"], "image": ["a.png"]})
    pq.write_table(table, tmp_path / "e.parquet")
    assert open_source(tmp_path / "e.parquet").kind == "table"  # default names absent
    src = open_source(tmp_path / "e.parquet", image_embeddings="iv", text_embeddings="tv")
    (r,) = everything(src)
    assert (r.image_embedding.tolist(), r.text_embedding.tolist(), r.uri) == ([1.0], [2.0], "a.png")
    with pytest.raises(SourceError, match=r"no column 'nope'.*image_embeddings"):
        open_source(tmp_path / "e.parquet", image_embeddings="nope")


# ------------------------------------------------------------------ detection


def test_detection_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nothing")
    write(tmp_path / "x.xlsx", b"PK")
    with pytest.raises(SourceError, match="supported layouts"):
        open_source(tmp_path / "x.xlsx")
    with pytest.raises(SourceError, match="unknown source kind"):
        open_source(tmp_path, kind="zip")
    write(tmp_path / "a.png", png())
    with pytest.raises(SourceError):
        open_source(tmp_path, kind="table")
    with pytest.raises(SourceError):
        open_source(tmp_path / "a.png", kind="folder")


def test_kind_forces_layout(tmp_path):
    make_tar(tmp_path / "s.tar", shard_samples())
    write(tmp_path / "a.png", png())
    assert open_source(tmp_path).kind == "folder"  # images at the top level win
    assert open_source(tmp_path, kind="webdataset").kind == "webdataset"


def test_rejects_are_recorded_once_however_the_source_is_named(tmp_path, fake_encoder, monkeypatch):
    """`data/photos` and its absolute path with a trailing slash recorded every reject twice;
    webdataset shards given as a file, a directory, a brace pattern and a glob, four times."""
    import tarfile

    from clipsql.ingest.pipeline import ingest
    from clipsql.queries.sql.db import connect
    from clipsql.store.store import Store

    from conftest import write_image_folder
    opts, model = fake_encoder.options(batch_size=8), fake_encoder.model
    st = Store.init(tmp_path / "s")
    data = write_image_folder(tmp_path / "data" / "photos", 3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "broken.txt").write_text("a broken image")
    monkeypatch.chdir(tmp_path)
    ingest(st, "data/photos", model=model, options=opts)
    ingest(st, str(data) + "/", model=model, options=opts)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        with tarfile.open(shards / f"shard-{k:05d}.tar", "w") as tar:
            for name, payload in ((f"s{k}.png", b"not a png"), (f"s{k}.txt", b"bad sample")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                import io
                tar.addfile(info, io.BytesIO(payload))
    for spec in (str(shards / "shard-00000.tar"), str(shards), str(shards / "shard-{00000..00001}.tar"),
                 str(shards / "*.tar")):
        ingest(st, spec, model=model, options=opts)
    rows = connect(st).sql("SELECT source, location, reason FROM rejects ORDER BY location").fetchall()
    assert rows == [(str(data.resolve()), "broken.png", "corrupt_image"),
                    (str(shards.resolve()), "shard-00000.tar:s0", "not_an_image"),
                    (str(shards.resolve()), "shard-00001.tar:s1", "not_an_image")]
