"""`--engine ray` on a local multi-node Ray cluster: scaling and overhead, as ratios of one run.

    python bench/distributed.py [--rows 120000] [--images 600] [--repeats 2]

Starts `ray.cluster_utils.Cluster` (head with 0 CPUs + N worker nodes of 1 CPU each, loopback,
no dashboard) and measures, each side interleaved and the best repetition kept:

* precomputed ingest (d = 512, clip-retrieval layout) and image ingest (the bundled demo
  model): rows/s with 1 vs 2 worker nodes → the scaling ratio (ideal 2.0);
* `clipsql score --engine ray` (image_info_gain + clip_score) with 1 vs 2 workers;
* Ray (2 workers) vs the local engine on the same machine → the overhead ratio
  (local seconds ÷ Ray seconds at equal cores; target ≥ 0.8).

Every run drives the real CLI code path (`engines.ingest.ingest_ray`, `engines.scores.score_ray`)
against a fresh store. On a 2-core machine the head, the driver and two 1-CPU workers share the
cores, so the scaling ratio is bounded well below 2 here; a real cluster gives each worker its own.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import ROOT, best, interleaved  # noqa: F401

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("LANCE_LOG", "error")


def cluster(workers: int, temp: Path):  # noqa: ANN201
    from ray.cluster_utils import Cluster
    args = dict(object_store_memory=192 << 20, node_ip_address="127.0.0.1")
    c = Cluster(initialize_head=True, connect=False,
                head_node_args=dict(args, num_cpus=0, include_dashboard=False, temp_dir=str(temp)))
    for _ in range(workers):
        c.add_node(num_cpus=1, **args)
    c.wait_for_nodes()
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import ray
    from clipsql.engines.ingest import ingest_ray
    from clipsql.engines.scores import score_ray
    from clipsql.ingest.pipeline import IngestOptions, ingest
    from clipsql.store.fits import fit_stats
    from clipsql.store.store import Store
    from tests.conftest import write_image_folder
    from tests.test_ledger import write_pool

    work = Path(tempfile.mkdtemp(prefix="clipsql-bench-dist-"))
    shards = 4
    write_pool(work / "pool", shards=shards, rows=a.rows // shards, row_group=10_000)
    write_image_folder(work / "imgs", a.images)
    n = 0

    def fresh() -> Store:
        nonlocal n
        n += 1
        return Store.init(work / f"s{n}")

    opts = IngestOptions(progress=False, id_column="key", maintain=False)
    img_opts = IngestOptions(progress=False, maintain=False)
    model = dict(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    results: dict[str, dict[str, float]] = {}
    scored = None
    for workers in (1, 2):
        c = cluster(workers, work / f"ray{workers}")
        try:
            ray.init(address=c.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            from clipsql.engines.engine import _quiet_data
            _quiet_data()
            runs = interleaved({
                "precomputed": lambda: ingest_ray(fresh(), str(work / "pool"), options=opts, **model).added,
                "images": lambda: ingest_ray(fresh(), str(work / "imgs"), model="clipsql-demo",
                                             options=img_opts).added,
            }, a.repeats)
            if scored is None:
                scored = fresh()
                ingest(scored, str(work / "pool"), options=opts, **model)
                fit_stats(scored, reference_size=2000)
            runs.update(interleaved({"score": lambda: score_ray(scored, ["image_info_gain", "clip_score"])["rows"]},
                                    a.repeats))
            shutil.rmtree(scored.path / "lance" / f"scores_{scored.model().table_name}.lance", ignore_errors=True)
            results[f"ray{workers}"] = {k: best(v)[0] for k, v in runs.items()}
        finally:
            ray.shutdown()
            c.shutdown()
    local = interleaved({
        "precomputed": lambda: ingest(fresh(), str(work / "pool"), options=opts, **model).added,
        "images": lambda: ingest(fresh(), str(work / "imgs"), model="clipsql-demo", options=img_opts).added,
    }, a.repeats)
    results["local"] = {k: best(v)[0] for k, v in local.items()}
    rows = {"precomputed": a.rows, "images": a.images, "score": a.rows}
    print(f"\nrows: precomputed {a.rows} (d = 512), images {a.images} (bundled demo model), score {a.rows}")
    for k in ("precomputed", "images", "score"):
        r1, r2 = results["ray1"][k], results["ray2"][k]
        line = (f"{k:12s} ray 1 worker {rows[k] / r1:9.0f} rows/s | 2 workers {rows[k] / r2:9.0f} rows/s | "
                f"scaling ×{r1 / r2:.2f}")
        if k in results["local"]:
            line += f" | local {rows[k] / results['local'][k]:9.0f} rows/s | ray(2) ÷ local {results['local'][k] / r2:.2f}"
        print(line)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
