"""A small synthetic DataComp pool in the exact on-disk layout (importable by any test).

DataComp's download_upstream.py puts, per shard, `<stem>.parquet` (uid, url, text,
original_width, original_height, clip_b32_similarity_score, clip_l14_similarity_score,
face_bboxes, sha256) and `<stem>.npz` (b32_img, b32_txt: 512-d; l14_img, l14_txt: 768-d;
rows aligned with the parquet) into DATA_DIR/metadata/. Stems on the hub are 32 hex
characters; `numbered=True` writes 00000000, 00000001, ... instead.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIMS = {"b32": 512, "l14": 768}


def _unit_rows(rng: np.random.Generator, n: int, d: int, dtype) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def write_datacomp_pool(folder, n_shards: int = 2, rows: int | list[int] = 40, seed: int = 0, *,
                        first_shard: int = 0, dtype=np.float16, compressed: bool = False,
                        numbered: bool = False, bad_rows: bool = False, row_group_size: int | None = None) -> dict:
    """Write shards `first_shard .. first_shard + n_shards - 1` into `folder`; returns
    {stem: {"parquet", "npz", "uid", "text", "url", "b32_img", "b32_txt", "l14_img", "l14_txt"}}
    (the arrays exactly as written). Shard k is seeded by (seed, k), so a later call with
    `first_shard=n` adds new shards to the same pool.

    `bad_rows` damages the first shard written: row 1 gets a malformed uid, row 2 a NaN in
    b32_img (l14 stays finite), row 3 repeats row 0's uid, row 4 has an empty caption.
    `compressed` writes np.savez_compressed instead of np.savez."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = rows if isinstance(rows, list) else [rows] * n_shards
    out = {}
    for j, n in enumerate(sizes):
        k = first_shard + j
        rng = np.random.default_rng([seed, k])
        stem = f"{k:08d}" if numbered else hashlib.md5(f"pool-{seed}-{k}".encode()).hexdigest()
        uid = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(n)]
        text = [f"a photo of thing {k}-{i}" for i in range(n)]
        url = [f"https://example.com/{k}/{i}.jpg" for i in range(n)]
        arrays = {f"{f}_{m}": _unit_rows(rng, n, d, dtype) for f, d in DIMS.items() for m in ("img", "txt")}
        if bad_rows and j == 0 and n >= 5:
            uid[1] = "not-a-uid"
            arrays["b32_img"][2, 7] = np.nan
            uid[3] = uid[0]
            text[4] = "   "
        bboxes = [[[0.1, 0.2, 0.3, 0.4]] if i % 3 == 0 else [] for i in range(n)]
        table = pa.table({
            "uid": pa.array(uid, pa.string()), "url": url, "text": text,
            "original_width": pa.array(rng.integers(64, 2048, n), pa.int64()),
            "original_height": pa.array(rng.integers(64, 2048, n), pa.int64()),
            "clip_b32_similarity_score": pa.array(rng.uniform(0.1, 0.4, n), pa.float32()),
            "clip_l14_similarity_score": pa.array(rng.uniform(0.1, 0.4, n), pa.float32()),
            "face_bboxes": pa.array(bboxes, pa.list_(pa.list_(pa.float64()))),
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in url],
        })
        parquet, npz = folder / f"{stem}.parquet", folder / f"{stem}.npz"
        pq.write_table(table, parquet, row_group_size=row_group_size)
        (np.savez_compressed if compressed else np.savez)(npz, **arrays)
        out[stem] = {"parquet": parquet, "npz": npz, "uid": uid, "text": text, "url": url, **arrays}
    return out


def damage_npz(path) -> None:
    """Truncate an npz to half its size (its zip directory is lost)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_npz_rows(path, k: int = 1) -> None:
    """Rewrite an npz with its last `k` rows gone (the parquet keeps them): a row-count mismatch."""
    path = Path(path)
    with np.load(path) as z:
        arrays = {key: z[key][:-k] for key in z.files}
    np.savez(path, **arrays)
