"""Reports on a model's running statistics (`clipsql stats show`).

    report = stats_report(st)          # a StatsReport: report.modalities["image"].mean_norm, report.fit
    print(format_report(report))       # what `clipsql stats show` prints; report.as_dict() its --format json
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsql.store.snapshot import Snapshot
from clipsql.store.stats import MODALITIES
from clipsql.store.store import Store


@dataclass
class ModalityStats:
    """One modality's raw moments: only `n` (0) when it holds no vectors yet."""
    n: int
    mean_norm: float | None = None
    mean_of_normalized_norm: float | None = None
    rms_norm: float | None = None
    trace_cov: float | None = None
    top_eigenvalues: list[float] | None = None
    mean: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"n": self.n}
        return {"n": self.n, "mean_norm": self.mean_norm, "mean_of_normalized_norm": self.mean_of_normalized_norm,
                "rms_norm": self.rms_norm, "trace_cov": self.trace_cov, "top_eigenvalues": self.top_eigenvalues,
                "mean": self.mean}


@dataclass
class StatsFitInfo:
    """The model's latest fit and how far the data moved since it (`stale`: a warning, when stale)."""
    fit_id: int
    n_rows: int
    reference_size: int
    options: Any
    rows_added_since: int
    share_added_since: float
    stale: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"fit_id": self.fit_id, "n_rows": self.n_rows, "reference_size": self.reference_size,
               "options": self.options, "rows_added_since": self.rows_added_since,
               "share_added_since": self.share_added_since}
        if self.stale:
            out["stale"] = self.stale
        return out


@dataclass
class StatsReport:
    """A model's running statistics at one commit: rows stored and covered, per-modality moments,
    `hint` when the statistics miss rows, `fit` when a fit exists."""
    model: str
    rows: int
    covered_rows: int
    covered_seq: int
    current: bool
    data_version: int
    modalities: dict[str, ModalityStats] = field(default_factory=dict)
    hint: str | None = None
    fit: StatsFitInfo | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `clipsql stats show --format json` prints (`hint`, `fit` only when set)."""
        out: dict[str, Any] = {"model": self.model, "rows": self.rows, "covered_rows": self.covered_rows,
                               "covered_seq": self.covered_seq, "current": self.current,
                               "data_version": self.data_version,
                               "modalities": {mo: m.as_dict() for mo, m in self.modalities.items()}}
        if self.hint is not None:
            out["hint"] = self.hint
        if self.fit is not None:
            out["fit"] = self.fit.as_dict()
        return out


def stats_report(st: Store, model: str | None = None, top: int = 5) -> StatsReport:
    snap = Snapshot.read(st)       # statistics, rows, fit and its staleness: one commit
    rec = snap.model(model)
    state = snap.stats[rec.model_id]
    rows = snap.rows(rec)
    report = StatsReport(model=rec.model_id, rows=rows, covered_rows=state.n, covered_seq=state.covered_seq,
                         current=state.n == rows, data_version=snap.embeddings_table(rec).version)
    if state.n != rows:
        report.hint = (f"{rows - state.n} stored rows are not in the statistics (an interrupted ingest?): "
                       "run `clipsql stats refresh STORE` or any ingest to fold them in")
    for mo in MODALITIES:
        raw, nrm = state.moments[(mo, "raw")], state.moments[(mo, "normalized")]
        if raw.n == 0:
            report.modalities[mo] = ModalityStats(n=0)
            continue
        eig = np.linalg.eigvalsh(raw.cov)[::-1]
        mean = raw.mean
        report.modalities[mo] = ModalityStats(
            n=raw.n,
            mean_norm=float(np.linalg.norm(mean)),
            mean_of_normalized_norm=float(np.linalg.norm(nrm.mean)),
            rms_norm=float(np.sqrt(np.trace(raw.s2) / raw.n + 2 * raw.shift @ (raw.s1 / raw.n)
                                   + raw.shift @ raw.shift)),
            trace_cov=float(np.trace(raw.cov)),
            top_eigenvalues=[float(x) for x in eig[:top]],
            mean=[float(x) for x in mean])
    fit = snap.fit(rec)
    if fit is not None:
        share = (rows - fit.n_rows) / rows if rows else 0.0
        report.fit = StatsFitInfo(fit_id=fit.fit_id, n_rows=fit.n_rows, reference_size=fit.reference_size,
                                  options=fit.options, rows_added_since=rows - fit.n_rows,
                                  share_added_since=share, stale=snap.staleness(rec) or None)
    return report


def format_report(r: StatsReport) -> str:
    lines = [f"model {r.model}: {r.rows} rows, statistics cover {r.covered_rows} "
             f"({'current' if r.current else 'NOT current'}), data version {r.data_version}"]
    if r.hint is not None:
        lines.append(f"  ! {r.hint}")
    for mo, m in r.modalities.items():
        if not m.n:
            lines.append(f"  {mo}: no vectors")
            continue
        head = ", ".join(f"{x:.4g}" for x in m.mean[:4])
        lines.append(f"  {mo}: n={m.n} ‖mean‖={m.mean_norm:.4g} rms‖x‖={m.rms_norm:.4g} "
                     f"‖mean of x̂‖={m.mean_of_normalized_norm:.4g} tr(C)={m.trace_cov:.4g}")
        lines.append(f"      mean[:4]=[{head}, …]  top eigenvalues: "
                     + ", ".join(f"{x:.4g}" for x in m.top_eigenvalues))
    if r.fit is not None:
        f = r.fit
        since = (f"{f.rows_added_since} rows added since ({100 * f.share_added_since:.1f}%)"
                 if f.rows_added_since >= 0 else f"{-f.rows_added_since} fewer rows since (deleted or lost)")
        lines.append(f"  fit #{f.fit_id}: reference M={f.reference_size} from {f.n_rows} rows, "
                     f"{since}, options {f.options}")
        if f.stale:
            lines.append(f"  ! {f.stale}")
    return "\n".join(lines)
