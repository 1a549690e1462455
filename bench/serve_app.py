"""The curation app's requests at scale: p50 / p95 latency over HTTP against a store of `--rows` rows.

    .venv/bin/python bench/serve_app.py [--rows 1000000] [--requests 40] [--tmp DIR] [--json serve_app.json]

Builds (once; `--tmp DIR` keeps and reuses it) a store of `--rows` precomputed rows for the bundled
demo model (d = 64, so a text prompt can be encoded offline), in clip-retrieval layout with
metadata `kind` (5 values) and `width`, uris naming `--images` generated PNG files (each shared by
many rows; 1% missing files), fits the statistics (the default reference of 10,000 rows) and
builds the vector index (`clipsql index`). Then serves it with uvicorn in a child process
(`clipsql.serve.app.create_app`, loopback) and times, from this process over HTTP:

* `cold_*`: the first grid page (the default view's ids), the first histogram of each timed
  column (computing it over every row once; later requests read the cached column), the first
  prompt (the server process imports torch and loads the text tower);
* `page`: a grid page (100 rows, thumbnails not included) at seeded random offsets of the default view,
  unfiltered, then with a brush on `clip_score`, then sorted by `clip_score`;
* `hist`: the histogram of a score column under a seeded random brush on another;
* `search`: a text prompt through `nearest` (the vector index), new prompts; `search_again`: new
  prompts again, once the index partitions the first ones read are in Lance's cache;
* `tag`: a tag commit of 3 ids (the writer lock, one Lance append, one ledger transaction);
* `thumb`: a thumbnail (first read of a file, then the cache).

Target: p95 ≤ 300 ms for a grid page and a histogram on 2 cores (the figures `page_p95_ms`,
`hist_p95_ms`). Absolute times on a shared machine: see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment)
import numpy as np

from _common import key_values, machine, table, write_json

SHARD_ROWS = 250_000
KINDS = np.array(["photo", "drawing", "diagram", "screenshot", "text"])
WORDS = np.array(["red", "green", "blue", "circle", "square", "triangle", "small", "large", "star", "dog",
                  "cat", "house", "tree", "car", "boat", "sky", "sea", "field", "street", "face"])


# ----------------------------------------------------------------------------- the store
def write_images(folder: Path, n: int, seed: int) -> list[str]:
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (96, 96), tuple(int(x) for x in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, 70, 2))
            d.ellipse([x, y, x + 25, y + 25], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        p = folder / f"img{i:05d}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def generate(folder: Path, rows: int, dim: int, images: list[str], seed: int) -> None:
    """A clip-retrieval pool (img_emb, text_emb, metadata) of clustered vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim)).astype(np.float32)
    uris = np.array(images + [str(Path(images[0]).parent / "missing.png")] * max(1, len(images) // 100))
    for s, lo in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - lo)
        c = rng.integers(0, len(centres), n)
        z = centres[c] + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
        np.save(folder / "img_emb" / f"img_emb_{s}.npy", z + 0.4 * rng.standard_normal((n, dim), dtype=np.float32))
        np.save(folder / "text_emb" / f"text_emb_{s}.npy", z + 0.4 * rng.standard_normal((n, dim), dtype=np.float32))
        keys = np.char.add("k", np.arange(lo, lo + n).astype(str))
        w = WORDS[rng.integers(0, len(WORDS), (n, 3))]
        captions = np.char.add(np.char.add(np.char.add("a ", w[:, 0]), np.char.add(" ", w[:, 1])),
                               np.char.add(" ", w[:, 2]))
        pq.write_table(pa.table({"key": keys, "url": uris[rng.integers(0, len(uris), n)], "caption": captions,
                                 "kind": KINDS[c % len(KINDS)], "width": rng.integers(64, 2048, n)}),
                       folder / "metadata" / f"metadata_{s}.parquet", row_group_size=SHARD_ROWS)


def cli(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "clipsql", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"clipsql {args[0]} failed:\n{p.stderr[-3000:]}")


def build(root: Path, rows: int, n_images: int, seed: int) -> tuple[Path, dict]:
    store = root / "store"
    done = root / f".built-{rows}"
    times: dict[str, float] = {}
    if done.exists():
        return store, json.loads(done.read_text())
    if store.exists():
        shutil.rmtree(store)
    t0 = time.perf_counter()
    images = write_images(root / "images", n_images, seed)
    generate(root / "pool", rows, 64, images, seed)
    times["generate_s"] = time.perf_counter() - t0
    for name, args in (("ingest_s", ["ingest", str(store), str(root / "pool"), "--model", "clipsql-demo",
                                     "--id-column", "key", "--no-progress"]),
                       ("fit_s", ["stats", "fit", str(store)]),
                       ("index_s", ["index", str(store)])):
        t0 = time.perf_counter()
        if name == "ingest_s":
            cli("init", str(store))
        cli(*args)
        times[name] = round(time.perf_counter() - t0, 2)
        print(f"{name.removesuffix('_s')}: {times[name]} s", flush=True)
    shutil.rmtree(root / "pool")
    done.write_text(json.dumps(times))
    return store, times


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = """
import sys, uvicorn
from clipsql.serve.app import create_app
uvicorn.run(create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--requests", type=int, default=40, help="timed requests of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="keep the store here (and reuse it when it is there)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="clipsql-bench-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        store, build_times = build(root, args.rows, args.images, args.seed)
        if args.build_only:
            print(f"store: {store}")
            return
        figures, timings = run(store, args)
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    rows = [[k, f"{v['p50_ms']:.0f}", f"{v['p95_ms']:.0f}", v["n"]] for k, v in timings.items()]
    print(table(rows, ["request", "p50 ms", "p95 ms", "n"]))
    print(key_values(figures))
    write_json(args.json, {"figures": figures, "timings": timings, "build": build_times, "machine": machine(),
                           "args": vars(args)})


def pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": 1000 * statistics.median(xs), "p95_ms": 1000 * xs[min(len(xs) - 1, int(0.95 * len(xs)))],
            "n": len(xs)}


def run(store: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(store), str(port)])
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(args.seed)
    timings: dict[str, dict] = {}
    figures: dict[str, float] = {"rows": args.rows}
    try:
        client = httpx.Client(base_url=base, timeout=3600)
        for _ in range(600):
            try:
                if client.get("/api/info").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        def post(path: str, body: dict) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = client.post(path, json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise SystemExit(f"{path} {body}: {r.status_code} {r.text[:500]}")
            return dt, r.json()

        def get(path: str) -> float:
            t0 = time.perf_counter()
            r = client.get(path)
            r.read()
            return time.perf_counter() - t0

        n = args.requests
        figures["cold_page_s"], first = post("/api/page", {"state": {}, "offset": 0, "limit": 100})
        total = first["total"]
        for col in ("clip_score", "image_conformity", "image_info_gain_approx"):
            figures[f"cold_hist_{col}_s"], _ = post("/api/histogram", {"state": {}, "column": col})
        offsets = rng.integers(0, max(1, total - 100), n)
        timings["page"] = pct([post("/api/page", {"state": {}, "offset": int(o), "limit": 100})[0] for o in offsets])
        brushes = [sorted(rng.uniform(0.05, 0.35, 2).tolist()) for _ in range(n)]
        timings["page_brushed"] = pct([post("/api/page", {"state": {"brushes": {"clip_score": b}}, "offset": 0,
                                                          "limit": 100})[0] for b in brushes])
        timings["page_sorted"] = pct([post("/api/page", {"state": {"sort": {"column": "clip_score", "desc": True}},
                                                         "offset": int(o), "limit": 100})[0] for o in offsets])
        timings["hist"] = pct([post("/api/histogram", {"state": {"brushes": {"clip_score": b}},
                                                       "column": "image_conformity"})[0] for b in brushes])
        figures["cold_search_s"], _ = post("/api/page", {"state": {"search": {"text": "a red circle"}}, "offset": 0,
                                                         "limit": 100})     # loads the text tower once
        print(f"cold: {figures}", flush=True)
        prompts = [" ".join(WORDS[rng.integers(0, len(WORDS), 3)]) for _ in range(n)]
        timings["search"] = pct([post("/api/page", {"state": {"search": {"text": p}}, "offset": 0,
                                                    "limit": 100})[0] for p in prompts])
        timings["search_again"] = pct([post("/api/page", {"state": {"search": {"text": p + " again"}}, "offset": 0,
                                                          "limit": 100})[0] for p in prompts])
        ids = [r["id"] for r in post("/api/page", {"state": {}, "offset": 0, "limit": 100})[1]["rows"]]
        timings["tag"] = pct([post("/api/tags", {"action": "add", "tag": f"bench{i % 4}",
                                                 "ids": ids[3 * (i % 30): 3 * (i % 30) + 3]})[0] for i in range(n)])
        timings["thumb_first"] = pct([get(f"/api/thumb?id={i}&size=160") for i in ids[:n]])
        timings["thumb_cached"] = pct([get(f"/api/thumb?id={i}&size=160") for i in ids[:n]])
        timings["page_after_tags"] = pct([post("/api/page", {"state": {}, "offset": int(o), "limit": 100})[0]
                                          for o in offsets[: max(5, n // 4)]])
        figures["page_p95_ms"] = timings["page"]["p95_ms"]
        figures["page_brushed_p95_ms"] = timings["page_brushed"]["p95_ms"]
        figures["hist_p95_ms"] = timings["hist"]["p95_ms"]
        figures["search_p95_ms"] = timings["search"]["p95_ms"]
        figures["tag_p95_ms"] = timings["tag"]["p95_ms"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return figures, timings


if __name__ == "__main__":
    os.environ.setdefault("CLIPSQL_SPILL_GB", "8")
    main()
