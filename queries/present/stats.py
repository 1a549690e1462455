"""Reports on a model's running statistics (`clipsql stats show`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from clipsql.store.snapshot import Snapshot
from clipsql.store.stats import MODALITIES
from clipsql.store.store import Store


def stats_report(st: Store, model: str | None = None, top: int = 5) -> dict[str, Any]:
    snap = Snapshot.read(st)       # statistics, rows, fit and its staleness: one commit
    rec = snap.model(model)
    state = snap.stats[rec.model_id]
    rows = snap.rows(rec)
    report: dict[str, Any] = {
        "model": rec.model_id, "rows": rows, "covered_rows": state.n, "covered_seq": state.covered_seq,
        "current": state.n == rows,
        "data_version": snap.embeddings_table(rec).version,
        "modalities": {},
    }
    if state.n != rows:
        report["hint"] = (f"{rows - state.n} stored rows are not in the statistics (an interrupted ingest?): "
                          "run `clipsql stats refresh STORE` or any ingest to fold them in")
    for mo in MODALITIES:
        raw, nrm = state.moments[(mo, "raw")], state.moments[(mo, "normalized")]
        if raw.n == 0:
            report["modalities"][mo] = {"n": 0}
            continue
        eig = np.linalg.eigvalsh(raw.cov)[::-1]
        mean = raw.mean
        report["modalities"][mo] = {
            "n": raw.n,
            "mean_norm": float(np.linalg.norm(mean)),
            "mean_of_normalized_norm": float(np.linalg.norm(nrm.mean)),
            "rms_norm": float(np.sqrt(np.trace(raw.s2) / raw.n + 2 * raw.shift @ (raw.s1 / raw.n)
                                      + raw.shift @ raw.shift)),
            "trace_cov": float(np.trace(raw.cov)),
            "top_eigenvalues": [float(x) for x in eig[:top]],
            "mean": [float(x) for x in mean],
        }
    fit = snap.fit(rec)
    if fit is not None:
        share = (rows - fit["n_rows"]) / rows if rows else 0.0
        report["fit"] = {"fit_id": fit["fit_id"], "n_rows": fit["n_rows"], "reference_size": fit["reference_size"],
                         "options": fit["options"], "rows_added_since": rows - fit["n_rows"],
                         "share_added_since": share}
        warning = snap.staleness(rec)
        if warning:
            report["fit"]["stale"] = warning
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']}: {r['rows']} rows, statistics cover {r['covered_rows']} "
             f"({'current' if r['current'] else 'NOT current'}), data version {r['data_version']}"]
    if "hint" in r:
        lines.append(f"  ! {r['hint']}")
    for mo, m in r["modalities"].items():
        if not m.get("n"):
            lines.append(f"  {mo}: no vectors")
            continue
        head = ", ".join(f"{x:.4g}" for x in m["mean"][:4])
        lines.append(f"  {mo}: n={m['n']} ‖mean‖={m['mean_norm']:.4g} rms‖x‖={m['rms_norm']:.4g} "
                     f"‖mean of x̂‖={m['mean_of_normalized_norm']:.4g} tr(C)={m['trace_cov']:.4g}")
        lines.append(f"      mean[:4]=[{head}, …]  top eigenvalues: "
                     + ", ".join(f"{x:.4g}" for x in m["top_eigenvalues"]))
    if "fit" in r:
        f = r["fit"]
        since = (f"{f['rows_added_since']} rows added since ({100 * f['share_added_since']:.1f}%)"
                 if f["rows_added_since"] >= 0 else f"{-f['rows_added_since']} fewer rows since (deleted or lost)")
        lines.append(f"  fit #{f['fit_id']}: reference M={f['reference_size']} from {f['n_rows']} rows, "
                     f"{since}, options {f['options']}")
        if f.get("stale"):
            lines.append(f"  ! {f['stale']}")
    return "\n".join(lines)
