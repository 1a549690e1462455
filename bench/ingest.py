"""Ingest throughput: the whole pipeline against the bare encoder forward.

    python bench/ingest.py                      # 4000 demo rows, clipsql-demo, batch 256, default workers
    python bench/ingest.py --rows 2000 --repeats 3 --json ingest.json
    python bench/ingest.py --random-arch ViT-S-32 --rows 256 --batch-size 64 --repeats 2 --real-arch ''
    python bench/ingest.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --device cuda

Figures (see bench/README.md):

* ``ratio`` = pipeline rows/s ÷ bare-forward rows/s on the same images, model, device
  and batch size (target ≥ 0.9).  *Bare forward*: every image decoded and
  preprocessed and every caption tokenized up front (not timed), then only
  ``encode_image`` + ``encode_text`` (normalize=False, no_grad, autocast on cuda) over
  the same batches.  *Pipeline*: ``ingest()`` into a fresh store, wall time minus
  model loading (``summary.seconds['load_model']``), exactly as the product runs it.
* ``stats_share`` = the running-statistics update (``store.update_moments``: raw and
  normalized moments of both modalities) per 1k rows ÷ encode time per 1k rows
  (target ≤ 5 %), at the model's dim and at d=512 (what a real CLIP's vectors cost),
  the latter also against the forward of a real-size CLIP architecture (random weights,
  no download) on this device; and, from the pipeline's own summary, the main
  thread's ``stats`` seconds and the background fold's ``stats (background)`` CPU seconds,
  each ÷ the ``encode`` seconds.

The sides are interleaved and repeated; each keeps its best repetition, so the ratio
holds on a loaded machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import _common as C

BARE = "bare forward"
BARE_1T = "bare forward, 1 torch thread"
PIPELINE = "pipeline"


# --------------------------------------------------------------------------- data
def make_data(tmp: Path, rows: int, seed: int) -> Path:
    """The demo dataset as `clipsql demo` generates it (64×64 PNGs + one parquet of paths and captions)."""
    from clipsql.ingest import demo
    return demo.write_dataset(tmp / "data", rows, seed)


def source_units(parquet: Path) -> int:
    """How many units the product's TableSource cuts the parquet into (what the DataLoader workers share)."""
    from clipsql.ingest.sources import TableSource
    return len(TableSource(parquet).units())


def prepared_batches(loaded: Any, parquet: Path, batch_size: int) -> list[tuple[Any, Any]]:
    """Decode + preprocess every image and tokenize every caption (untimed), in batches."""
    import pyarrow.parquet as pq
    import torch

    from clipsql.ingest.images import clean_caption, load_image
    rows = pq.read_table(parquet, columns=["image", "caption"]).to_pylist()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pixels = torch.stack([loaded.preprocess(load_image((parquet.parent / r["image"]).read_bytes()))
                              for r in chunk])
        tokens = loaded.tokenizer([clean_caption(r["caption"]) for r in chunk])
        out.append((pixels, tokens))
    return out


def bare_forward(loaded: Any, batches: list[tuple[Any, Any]]) -> int:
    import torch
    dev = loaded.device
    amp = dev.startswith("cuda")
    n = 0
    with torch.no_grad(), torch.autocast(device_type="cuda", enabled=amp):
        for pixels, tokens in batches:
            img = loaded.model.encode_image(pixels.to(dev, non_blocking=True), normalize=False)
            txt = loaded.model.encode_text(tokens.to(dev, non_blocking=True), normalize=False)
            img.float().cpu(), txt.float().cpu()   # the pipeline needs the vectors on the host too
            n += len(pixels)
    if amp:
        torch.cuda.synchronize()
    return n


def build_random_model(folder: Path, arch: str, seed: int = 0) -> str:
    """A `local-dir:` model of open_clip architecture `arch` with seeded random weights (no download):
    the forward costs what the real model costs, the vectors mean nothing."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SystemExit(f"--random-arch: unknown open_clip architecture {arch!r}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD)}}))
    return f"local-dir:{folder}"


# --------------------------------------------------------------------------- pipeline runs
_RUN = [0]


def pipeline_run(tmp: Path, source: Path, args: argparse.Namespace, *, workers: int | None = None) -> Any:
    """One ingest into a fresh store, as the product runs it; returns the summary (seconds measured from it)."""
    from clipsql.ingest.pipeline import IngestOptions, ingest
    from clipsql.store.store import Store
    _RUN[0] += 1
    path = tmp / f"store{_RUN[0]}"
    st = Store.init(path)
    try:
        s = ingest(st, str(source), model=args.model, pretrained=args.pretrained,
                   options=IngestOptions(batch_size=args.batch_size,
                                         workers=args.workers if workers is None else workers,
                                         device=args.device, progress=False))
    finally:
        st.engine.dispose()
        shutil.rmtree(path, ignore_errors=True)
    if s.added != args.rows:
        raise SystemExit(f"pipeline added {s.added} rows, expected {args.rows} (rejected: {s.rejected})")
    return s


def pipeline_seconds(s: Any) -> float:
    return s.wall_seconds - s.seconds.get("load_model", 0.0)


def with_threads(n: int, fn: Any) -> Any:
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- stats cost
def stats_update_seconds(dim: int, rows: int, repeats: int, seed: int = 0) -> float:
    """Best time of `update_moments` (raw + normalized, image + text) for `rows` rows of dim `dim`."""
    from clipsql.kernels.moments import RunningMoments
    from clipsql.store.stats import StatsState, new_moments, update_moments
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32)
    img = (mean + rng.normal(size=(rows, dim))).astype(np.float32)
    txt = (mean[::-1] + rng.normal(size=(rows, dim))).astype(np.float32)
    state = StatsState("bench", new_moments(dim), 0)
    update_moments(state, img, txt)      # first batch sets the shift
    return min(C.timed(lambda: update_moments(state, img, txt))[0] for _ in range(repeats))


def save_stats_seconds(tmp: Path, dim: int, repeats: int) -> float:
    """Best time of one `stats.save_stats` (the periodic flush, every stats_flush_seconds) at dim."""
    from clipsql.kernels.moments import RunningMoments
    from clipsql.store.stats import StatsState, new_moments, save_stats, update_moments
    from clipsql.store.store import Store
    st = Store.init(tmp / f"stats-store-{dim}")
    rec = st.register_model(model_id=f"bench-{dim}", kind="clip", dim=dim, logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={})
    state = StatsState(rec.model_id, new_moments(dim), 0)
    X = np.random.default_rng(1).normal(size=(64, dim)).astype(np.float32) + 1
    update_moments(state, X, X)
    try:
        return min(C.timed(lambda: save_stats(st, state))[0] for _ in range(repeats))
    finally:
        st.engine.dispose()


def real_clip_encode_seconds_per_1k(arch: str, device: str, rows: int, repeats: int) -> float | None:
    """Forward time per 1k rows of a real-size open_clip architecture, random weights (no download)."""
    import open_clip
    import torch

    from clipsql.models.loading import pick_device
    dev = pick_device(device)
    try:
        model = open_clip.create_model(arch, pretrained=None, device=dev).eval()
        tok = open_clip.get_tokenizer(arch)
    except Exception as e:  # noqa: BLE001 - a reference figure only
        print(f"  (real-arch reference skipped: {e.__class__.__name__}: {e})")
        return None
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(rows, 3, *size)
    tokens = tok(["a photo of a large red circle on the left and a small blue square"] * rows)
    loaded = type("L", (), {"model": model, "device": dev})()
    bare_forward(loaded, [(pixels, tokens)])         # warm-up
    best_s = min(C.timed(lambda: bare_forward(loaded, [(pixels, tokens)]))[0] for _ in range(repeats))
    del model
    return best_s / rows * 1000


# --------------------------------------------------------------------------- main
STAGES = [("wait", "read+decode (wait)"), ("read(w)", "read (workers)"), ("decode(w)", "decode (workers)"),
          ("encode", "encode"), ("write", "write"), ("stats", "stats"), ("stats(bg)", "stats (background)")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--model", default="clipsql-demo")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers of the pipeline (default: the product's, ingest.pipeline.default_workers)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each side is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alt", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the pipeline with the other choice of workers (0 if it uses some, else 2)")
    p.add_argument("--real-arch", default="ViT-B-32",
                   help="real-size architecture whose forward (random weights) prices the d=512 stats update; "
                        "'' to skip")
    p.add_argument("--real-rows", type=int, default=32, help="images the real architecture encodes (0: skip it)")
    p.add_argument("--random-arch", default=None,
                   help="run the pipeline with this open_clip architecture and random weights instead of "
                        "--model (a realistic forward cost without a download), e.g. ViT-B-32")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--tmp", default=None, help="work directory (default: a temporary one, removed)")
    args = p.parse_args(argv)

    import torch

    from clipsql.models import loading as models

    with C.work_dir(args.tmp) as tmp:
        t0 = time.perf_counter()
        source = make_data(tmp, args.rows, args.seed)
        gen_s = time.perf_counter() - t0
        if args.random_arch:
            args.model, args.pretrained = build_random_model(tmp / "random-model", args.random_arch), None
        spec = models.resolve(args.model, args.pretrained)
        loaded = models.load(spec, args.device)
        dev = loaded.device
        cpu = not dev.startswith("cuda")
        units = source_units(source)
        batches = prepared_batches(loaded, source, args.batch_size)
        main_threads = torch.get_num_threads()   # the pipeline leaves torch's thread count as it is
        from clipsql.ingest.pipeline import default_workers
        workers = default_workers(dev) if args.workers is None else args.workers
        alt_workers = 0 if workers else 2
        alt_name = f"pipeline, workers={alt_workers}"
        print(f"clipsql ingest bench: {args.rows} demo rows (generated in {gen_s:.1f}s, {units} source unit(s)), "
              f"model {spec.model_id} (dim {loaded.dim}) on {dev}, batch {args.batch_size}, "
              f"workers {workers}{' (product default)' if args.workers is None else ''} "
              f"(used: {min(workers, units)}), torch threads: bare "
              f"{torch.get_num_threads()}, pipeline main {main_threads}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {args.repeats} interleaved rounds, "
              f"machine {C.machine()}")
        bare_forward(loaded, batches[:1])   # warm-up (allocator, autotuning)

        variants: dict[str, Any] = {
            BARE: lambda: bare_forward(loaded, batches),
            PIPELINE: lambda: pipeline_run(tmp, source, args),
        }
        if cpu:
            variants[BARE_1T] = lambda: with_threads(1, lambda: bare_forward(loaded, batches))
        if args.alt:
            variants[alt_name] = lambda: pipeline_run(tmp, source, args, workers=alt_workers)
        runs = C.interleaved(variants, args.repeats)

        def is_bare(name: str) -> bool:
            return name.startswith("bare")

        def secs(name: str, r: tuple[float, Any]) -> float:
            return r[0] if is_bare(name) else pipeline_seconds(r[1])

        best_s = {name: min(secs(name, r) for r in rs) for name, rs in runs.items()}
        best_run = {name: min(rs, key=lambda r: secs(name, r))[1] for name, rs in runs.items()}
        bare_s = best_s[BARE]
        rps = {name: args.rows / s for name, s in best_s.items()}
        ratio = rps[PIPELINE] / rps[BARE]
        fastest_bare = max(v for k, v in rps.items() if is_bare(k))
        per_round = [pipeline_seconds(r[1]) for r in runs[PIPELINE]]
        round_ratios = [b[0] / ps for b, ps in zip(runs[BARE], per_round)]

        rows_tbl = []
        for name in variants:
            stage = ([best_run[name].seconds.get(k, 0.0) for _, k in STAGES] if not is_bare(name)
                     else ["", "", "", best_s[name], "", "", ""])
            rows_tbl.append([name, best_s[name], rps[name], rps[name] / rps[BARE], *stage])
        print()
        print(C.table(rows_tbl, [f"run (best of {args.repeats})", "s", "rows/s", "÷bare", *(h for h, _ in STAGES)]))
        print("  wait = main process blocked on the DataLoader; read(w)/decode(w) = summed over workers (decode\n"
              "  includes preprocessing and tokenization); stats = main thread (queueing folds, flushes);\n"
              "  stats(bg) = the fold's CPU on the background threads; pipeline s = wall − load_model;\n"
              "  ÷bare = rows/s ÷ the bare forward (default torch threads)")

        # ------------------------------------------------ stats-update cost
        reps = max(5, args.repeats)
        enc_per_1k = bare_s / args.rows * 1000
        upd_model = stats_update_seconds(loaded.dim, 1000, reps)
        upd_512 = stats_update_seconds(512, 1000, reps) if loaded.dim != 512 else upd_model
        save_model = save_stats_seconds(tmp, loaded.dim, reps)
        save_512 = save_stats_seconds(tmp, 512, reps) if loaded.dim != 512 else save_model
        base = best_run[PIPELINE]
        enc_in_pipe = max(base.seconds.get("encode", 0.0), 1e-9)
        main_stats = base.seconds.get("stats", 0.0)
        bg_stats = base.seconds.get("stats (background)", 0.0)
        real_per_1k = None
        if args.real_arch and args.real_rows > 0:
            real_per_1k = real_clip_encode_seconds_per_1k(args.real_arch, args.device, args.real_rows, 2)
        print()
        stat_rows = [
            [f"update_moments, d={loaded.dim} (this model)", upd_model * 1e3, enc_per_1k * 1e3,
             upd_model / enc_per_1k],
            ["update_moments, d=512", upd_512 * 1e3, enc_per_1k * 1e3, upd_512 / enc_per_1k],
        ]
        if real_per_1k:
            stat_rows.append([f"update_moments, d=512 vs {args.real_arch} forward", upd_512 * 1e3,
                              real_per_1k * 1e3, upd_512 / real_per_1k])
        per_1k = 1000 / args.rows
        stat_rows.append([f"in the pipeline, main thread: stats ÷ encode (d={loaded.dim})",
                          main_stats * per_1k * 1e3, enc_in_pipe * per_1k * 1e3, main_stats / enc_in_pipe])
        stat_rows.append([f"in the pipeline, background fold ÷ encode (d={loaded.dim})",
                          bg_stats * per_1k * 1e3, enc_in_pipe * per_1k * 1e3, bg_stats / enc_in_pipe])
        print(C.table(stat_rows, ["stats update per 1k rows", "ms", "encode ms/1k", "share"]))
        print("  the update_moments rows divide by the bare forward, the in-the-pipeline rows by the pipeline's own 'encode'")
        print(f"  save_stats (one flush, every {5.0:g}s of ingest and at the end): {save_model * 1e3:.1f} ms "
              f"at d={loaded.dim}, {save_512 * 1e3:.1f} ms at d=512")

        figures = {
            "rows": args.rows, "model": spec.model_id, "dim": loaded.dim, "device": dev,
            "batch_size": args.batch_size, "workers": workers, "source_units": units,
            "torch_threads": torch.get_num_threads(), "pipeline_main_threads": main_threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "bare_rows_per_s": round(rps[BARE], 1),
            "pipeline_rows_per_s": round(rps[PIPELINE], 1),
            "ratio": round(ratio, 3),
            "ratio_vs_fastest_bare": round(rps[PIPELINE] / fastest_bare, 3),
            "ratio_per_round": [round(r, 3) for r in round_ratios],
            "pipeline_encode_vs_bare": round(base.seconds.get("encode", 0.0) / bare_s, 3),
            "encode_ms_per_1k": round(enc_per_1k * 1e3, 2),
            "stats_ms_per_1k": round(upd_model * 1e3, 3),
            "stats_share": round(upd_model / enc_per_1k, 4),
            "stats_ms_per_1k_d512": round(upd_512 * 1e3, 3),
            "stats_share_d512": round(upd_512 / enc_per_1k, 4),
            "stats_share_in_pipeline": round(main_stats / enc_in_pipe, 4),
            "stats_share_in_pipeline_background": round(bg_stats / enc_in_pipe, 4),
            "save_stats_ms": round(save_model * 1e3, 2),
            "save_stats_ms_d512": round(save_512 * 1e3, 2),
        }
        if cpu:
            figures["bare_1thread_rows_per_s"] = round(rps[BARE_1T], 1)
        if alt_name in rps:
            figures[f"workers{alt_workers}_rows_per_s"] = round(rps[alt_name], 1)
            figures[f"ratio_workers{alt_workers}"] = round(rps[alt_name] / rps[BARE], 3)
        if real_per_1k:
            figures[f"real_encode_ms_per_1k_{args.real_arch}"] = round(real_per_1k * 1e3, 1)
            figures["stats_share_d512_real"] = round(upd_512 / real_per_1k, 5)
        print()
        print(C.key_values({k: v for k, v in figures.items() if not isinstance(v, list)}))
        C.write_json(args.json, {"figures": figures, "machine": C.machine(),
                                 "runs": {name: {"best_seconds": best_s[name], "rows_per_s": rps[name],
                                                 "all_seconds": [secs(name, r) for r in runs[name]],
                                                 "stage_seconds": (None if is_bare(name)
                                                                   else best_run[name].seconds)}
                                          for name in variants}})
        return figures


if __name__ == "__main__":
    main()
