"""`clipsql demo`: generated data → ingest with the bundled model → fit → curation queries.

Everything runs offline on the project's own model (models/fixture_models/demo-clip,
trained by training/train_demo_model.py on the generator in ingest/demo.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clipsql.ingest.demo import write_dataset
from clipsql.ingest.pipeline import IngestOptions, ingest
from clipsql.models.loading import DEMO_NOTICE
from clipsql.queries.present.gallery import write_gallery
from clipsql.queries.sql.cli_query import run_query
from clipsql.store.fit_rows import latest_fit
from clipsql.store.fits import fit_stats
from clipsql.store.reads import count_rows
from clipsql.store.store import Store

DEMO_ROWS = 2000
DEMO_SEED = 0
SHOW = "uri, caption, kind"

QUERIES: list[tuple[str, str]] = [
    ("Lowest image Information Gain (blank and placeholder images sink here)",
     "SELECT regexp_extract(scores.uri, '[^/]+$') AS file, kind, scores.caption, round(image_info_gain, 4) AS image_info_gain\n"
     "FROM scores JOIN samples USING (id)\nORDER BY image_info_gain LIMIT 10"),
    ("Highest image Information Gain",
     "SELECT regexp_extract(scores.uri, '[^/]+$') AS file, kind, scores.caption, round(image_info_gain, 4) AS image_info_gain\n"
     "FROM scores JOIN samples USING (id)\nORDER BY image_info_gain DESC LIMIT 10"),
    ("Lowest text Information Gain (generic captions sink here)",
     "SELECT kind, scores.caption, round(text_info_gain, 4) AS text_info_gain\n"
     "FROM scores JOIN samples USING (id)\nORDER BY text_info_gain LIMIT 10"),
    ("Highest text Information Gain",
     "SELECT kind, scores.caption, round(text_info_gain, 4) AS text_info_gain\n"
     "FROM scores JOIN samples USING (id)\nORDER BY text_info_gain DESC LIMIT 10"),
    ("Highest image conformity (the most 'average' images)",
     "SELECT regexp_extract(scores.uri, '[^/]+$') AS file, kind, scores.caption, round(image_conformity, 4) AS image_conformity\n"
     "FROM scores JOIN samples USING (id)\nORDER BY image_conformity DESC LIMIT 10"),
    ("Lowest image conformity",
     "SELECT regexp_extract(scores.uri, '[^/]+$') AS file, kind, scores.caption, round(image_conformity, 4) AS image_conformity\n"
     "FROM scores JOIN samples USING (id)\nORDER BY image_conformity LIMIT 10"),
    ("How well the covariance-weighted norm approximates exact Information Gain (R², slope)",
     "SELECT 'image' AS modality, round(regr_r2(image_info_gain_approx, image_info_gain), 4) AS r2,\n"
     "       round(regr_slope(image_info_gain_approx, image_info_gain), 3) AS slope FROM scores\n"
     "UNION ALL\n"
     "SELECT 'text', round(regr_r2(text_info_gain_approx, text_info_gain), 4),\n"
     "       round(regr_slope(text_info_gain_approx, text_info_gain), 3) FROM scores"),
    ("Share of each kind in the bottom 20% by image / text Information Gain",
     "WITH r AS (SELECT kind, percent_rank() OVER (ORDER BY image_info_gain) AS img_rank,\n"
     "                  percent_rank() OVER (ORDER BY text_info_gain) AS txt_rank\n"
     "           FROM scores JOIN samples USING (id))\n"
     "SELECT kind, count(*) AS n, round(avg((img_rank < 0.2)::INT), 3) AS in_bottom20_image,\n"
     "       round(avg((txt_rank < 0.2)::INT), 3) AS in_bottom20_text\nFROM r GROUP BY kind ORDER BY kind"),
]


@dataclass
class DemoResult:
    store: Path
    seconds: dict[str, float] = field(default_factory=dict)
    tables: list[tuple[str, str, str]] = field(default_factory=list)   # (title, sql, rendered table)
    gallery: Path | None = None


def run_demo(store_path: str | Path = "clipsql-demo-store", rows: int = DEMO_ROWS, workers: int | None = None,
             progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Build (or reuse) the demo store and print the curation queries. Idempotent."""

    path = Path(store_path)
    res = DemoResult(path)
    t0 = time.perf_counter()
    st = Store.init(path)
    data_dir = path / "sources" / f"demo-{rows}-seed{DEMO_SEED}"
    table = data_dir / "demo.parquet"
    if not table.exists():
        echo(f"generating {rows} demo image–caption pairs into {data_dir} …")
        write_dataset(data_dir, n=rows, seed=DEMO_SEED)
    res.seconds["generate"] = time.perf_counter() - t0
    t = time.perf_counter()
    echo(f"note: {DEMO_NOTICE}")
    summary = ingest(st, str(table), model="clipsql-demo",
                     options=IngestOptions(batch_size=256, workers=workers, progress=progress))
    echo(f"ingest: added {summary.added}, skipped {summary.skipped}, rejected {sum(summary.rejected.values())} "
         f"({summary.rows_per_second:.0f} rows/s)")
    res.seconds["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = st.model("clipsql-demo")
    fit = latest_fit(st, rec, with_arrays=False)
    if fit is None or fit.n_rows != count_rows(st, rec):
        f = fit_stats(st, rec.model_id, reference_size=10_000, seed=0)
        echo(f"stats fit: reference M={f.reference_size} (scale a=1, posterior-mean prior) in {f.seconds:.2f}s")
    res.seconds["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    for title, sql in QUERIES:
        text = run_query(st, sql, max_rows=0)
        res.tables.append((title, sql, text))
        echo(f"\n== {title}\n-- {sql.replace(chr(10), chr(10) + '-- ')}\n{text}")
    res.seconds["queries"] = time.perf_counter() - t
    t = time.perf_counter()
    n_show = max(12, rows // 10)          # 200 of 2,000: where the blank and placeholder images sit
    gallery = write_gallery(st, "SELECT id, kind, image_info_gain FROM scores JOIN samples USING (id)",
                            path / "gallery-image-info-gain.html", top_bottom=("image_info_gain", n_show),
                            thumb=64, title=f"clipsql demo: the {n_show} lowest and highest image Information Gain")
    res.seconds["gallery"] = time.perf_counter() - t
    res.seconds["total"] = time.perf_counter() - t0
    echo(f"\ndemo store: {path}  (try: clipsql query {path} \"SELECT uri, caption FROM scores "
         f"ORDER BY image_info_gain LIMIT 20\")")
    echo("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items()))
    echo(f"gallery of the lowest and highest image Information Gain (blank and placeholder images at the low "
         f"end): {gallery.path}")
    res.gallery = Path(gallery.path)
    return res
