"""Run records: one `ingest_runs` row per ingest (started, finished, or aborted when its writer was
killed) and the rejects a run recorded (one row per source, location and reason)."""
from __future__ import annotations

import time

import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.faults import fault


def start_run(engine: sa.Engine, model_id: str, source: str, source_kind: str) -> int:
    with engine.begin() as conn:
        res = conn.execute(cat.ingest_runs.insert().values(
            model_id=model_id, source=source, source_kind=source_kind, status="running",
            started_at=time.time(), added=0, skipped=0, rejected=0))
        return int(res.inserted_primary_key[0])


def abort_dead_runs(engine: sa.Engine) -> list[int]:
    """Writers only (under the lock, so no other run is alive): runs still `running` were killed.
    Mark them `aborted`, with `added` counted from their committed ledger entries."""
    r, c = cat.ingest_runs, cat.commits
    with engine.begin() as conn:
        dead = [int(x) for x in conn.execute(sa.select(r.c.run_id).where(r.c.status == "running")).scalars()]
        for run_id in dead:
            added = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.c.rows), 0)).where(
                c.c.run_id == run_id)).scalar()
            conn.execute(sa.update(r).where(r.c.run_id == run_id).values(
                status="aborted", added=int(added), finished_at=time.time()))
    return dead


def finish_run(engine: sa.Engine, run_id: int, status: str, skipped: int, summary: dict) -> None:
    fault("run:finish")
    with engine.begin() as conn:
        conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == run_id).values(
            status=status, finished_at=time.time(), skipped=skipped, summary=cat.to_json(summary)))


def record_rejects(conn: sa.Connection, run_id: int, model_id: str | None, source: str,
                    rejects: list[tuple[str, str, str]]) -> None:
    now = time.time()
    for location, reason, detail in rejects:
        location, detail = printable_text(location), printable_text(detail)
        exists = conn.execute(sa.select(cat.rejects.c.reject_id).where(
            cat.rejects.c.source == source, cat.rejects.c.location == location,
            cat.rejects.c.reason == reason)).first()
        if exists is None:
            conn.execute(cat.rejects.insert().values(
                run_id=run_id, model_id=model_id, source=source, location=location, reason=reason,
                detail=detail, created_at=now))


def printable_text(text: str | None) -> str | None:
    """Text the catalog can store: lone surrogates (undecodable file-name bytes) as \\x escapes."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
