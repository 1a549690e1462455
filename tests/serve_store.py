"""A small store for the curation app's tests: precomputed vectors (the tiny test model, so prompts
encode offline), fitted statistics, and uris of every kind a tile meets: local PNG files, missing
files, https URLs (a URL-based pool), members of a tar shard, a file that is not an image, and NULL."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.store.fits import fit_stats
from clipsql.store.store import Store

from conftest import clip_like

N = 120
LOCAL = range(0, 100)
MISSING = range(100, 105)
REMOTE = range(105, 110)
TAR = range(110, 115)
NOT_IMAGE = 115
NULL_URI = range(116, 120)


def png(color: tuple[int, int, int], size: int = 24) -> bytes:
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(im).rectangle([4, 4, size // 2, size // 2], fill=(255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def build(root: Path, model: str, n: int = N) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    images = root / "images"
    images.mkdir()
    urls: list[str | None] = []
    shard = root / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for i in TAR:
            data = png(tuple(int(x) for x in rng.integers(0, 255, 3)))
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for i in range(n):
        if i in LOCAL:
            p = images / f"{i:04d}.png"
            p.write_bytes(png(tuple(int(x) for x in rng.integers(0, 255, 3))))
            urls.append(str(p))
        elif i in MISSING:
            urls.append(str(images / f"gone-{i}.png"))
        elif i in REMOTE:
            urls.append(f"https://images.example.invalid/{i}.jpg")
        elif i in TAR:
            urls.append(f"{shard}::{i:04d}.png")
        elif i == NOT_IMAGE:
            p = images / "notes.png"
            p.write_bytes(b"this is not an image")
            urls.append(str(p))
        else:
            urls.append(None)
    img, txt = clip_like(n, np.random.default_rng(21))
    table = pa.table({
        "id": [f"r{i:04d}" for i in range(n)],
        "caption": [f"a {['red', 'green', 'blue'][i % 3]} shape number {i}" for i in range(n)],
        "url": pa.array(urls, pa.string()),
        "kind": ["photo" if i % 3 else "drawing" for i in range(n)],
        "rating": [int(i % 5) for i in range(n)],
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), img.shape[1]),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), txt.shape[1]),
    })
    pq.write_table(table, root / "pool.parquet")
    st = Store.init(root / "store")
    ingest(st, str(root / "pool.parquet"), model=model,
           options=IngestOptions(batch_size=64, workers=0, progress=False, id_column="id"))
    fit_stats(st, reference_size=60, seed=1)
    return st.path
