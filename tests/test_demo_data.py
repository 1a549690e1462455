"""ingest.demo: deterministic procedural demo data."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsql.ingest import demo


@pytest.fixture(scope="module")
def samples():
    return demo.generate_samples(2000, seed=0)


def test_module_does_not_import_torch():
    import subprocess

    code = "import sys, clipsql.ingest.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_same_seed_same_samples(samples):
    again = demo.generate_samples(300, seed=0)
    for a, b in zip(samples[:300], again):
        assert np.array_equal(a.image, b.image)
        assert (a.caption, a.kind, a.n_attributes, a.n_shapes) == (b.caption, b.kind, b.n_attributes, b.n_shapes)


def test_different_seed_differs(samples):
    other = demo.generate_samples(50, seed=1)
    assert [s.caption for s in other] != [s.caption for s in samples[:50]]
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(other, samples[:50]))


def test_images_are_64x64_rgb_uint8(samples):
    for s in samples:
        assert s.image.shape == (64, 64, 3)
        assert s.image.dtype == np.uint8


def test_kind_proportions(samples):
    counts = Counter(s.kind for s in samples)
    assert set(counts) <= set(demo.KINDS)
    for kind in ("blank", "placeholder", "generic_caption"):
        assert 0.03 <= counts[kind] / len(samples) <= 0.08, (kind, counts)


def _mentioned(caption: str) -> int:
    words = caption.replace(",", " ").replace(":", " ").split()
    n = sum(w in demo.SHAPES or w in demo.COLORS or w in demo.SIZES for w in words)
    n += sum(caption.count(phrase) for _, phrase in demo.POSITIONS.values())
    return n


def test_captions_mention_attributes(samples):
    for s in samples:
        if s.kind == "generic_caption":
            assert s.n_attributes == 0
            continue
        assert s.n_attributes >= 2  # colour + shape at least
        assert s.n_attributes == _mentioned(s.caption), s.caption
        assert not demo.is_generic_caption(s.caption)


def test_normal_shape_counts(samples):
    for s in samples:
        if s.kind in ("normal", "generic_caption"):
            assert 1 <= s.n_shapes <= 3
            assert not (s.image == s.image[0, 0]).all()  # something drawn
        else:
            assert s.n_shapes == 0
    for n in (1, 2, 3):
        assert any(s.n_shapes == n for s in samples)


def test_generic_captions_from_list(samples):
    generic = [s.caption for s in samples if s.kind == "generic_caption"]
    assert generic
    assert all(demo.is_generic_caption(c) for c in generic)
    assert any(c.startswith("IMG_") for c in generic)
    fixed = {g for g in demo.GENERIC_CAPTIONS if "{" not in g}
    assert all(c in fixed or (c.startswith("IMG_") and c[4:8].isdigit() and c.endswith(".jpg")) for c in generic)


def test_blank_images_are_flat(samples):
    blanks = [s for s in samples if s.kind == "blank"]
    assert blanks
    for s in blanks:
        assert (s.image == s.image[0, 0]).all()
        assert s.caption and not demo.is_generic_caption(s.caption)


def test_placeholders_are_few_variants(samples):
    ph = [s.image.tobytes() for s in samples if s.kind == "placeholder"]
    assert 2 <= len(set(ph)) <= 8


def test_write_dataset_deterministic(tmp_path):
    p1 = demo.write_dataset(tmp_path / "a", n=60, seed=3)
    p2 = demo.write_dataset(tmp_path / "b", n=60, seed=3)
    p3 = demo.write_dataset(tmp_path / "c", n=60, seed=4)
    t1, t2 = pq.read_table(p1), pq.read_table(p2)
    assert t1.column_names == ["image", "caption", "kind", "n_attributes", "n_shapes"]
    assert t1.equals(t2)
    assert t1.num_rows == 60
    assert t1.column("image")[0].as_py() == "images/000000.png"
    for rel in t1.column("image").to_pylist():
        assert (p1.parent / rel).read_bytes() == (p2.parent / rel).read_bytes()
    assert (p1.parent / "images/000000.png").read_bytes() != (p3.parent / "images/000000.png").read_bytes()

    from PIL import Image

    expect = demo.generate_samples(60, seed=3)
    img = np.asarray(Image.open(p1.parent / "images/000007.png"))
    assert np.array_equal(img, expect[7].image)
    assert t1.column("caption").to_pylist() == [s.caption for s in expect]


def test_scene_and_caption_matching(samples):
    for s in samples[:500]:
        assert len(s.scene) == s.n_shapes
        if s.kind == "normal":
            assert demo.caption_matches(s.caption, s.scene)
        if s.kind == "generic_caption":
            assert demo.parse_caption(s.caption) == []
            assert not demo.caption_matches(s.caption, s.scene)
    scene = (("circle", "red", "large", "left"), ("star", "blue", "small", "top"))
    assert demo.caption_matches("two shapes: a blue star and a large red circle on the left", scene)
    assert not demo.caption_matches("a large red circle on the left", scene)  # one object missing
    assert not demo.caption_matches("a small red circle and a blue star", scene)  # wrong size
    assert not demo.caption_matches("a red circle and a blue star on the right", scene)  # wrong position
