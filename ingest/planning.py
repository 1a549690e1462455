"""Which units of a source a run must ingest, decided from the ledger before any file is opened.

For a source that lists its groups of units (`Source.groups`: DataComp shards, precomputed
metadata files), each group is judged by the `unit_stamps` the ledger holds for it (store.units):

* its files' current (size, mtimes), from one stat each, match the stamps of all its parts, every
  one still marked ingested: the group is done; none of its files is opened;
* they differ (a copy, a `touch`, a changed file) but the ledger holds all its parts: its content
  is hashed (`Source.content_hash`); the same content is done, its units not listed (the stamps
  move to the new size and mtimes, so the next run skips it unhashed); other content is planned
  unit by unit as below;
* otherwise (new, partly ingested, or ingested before stamps existed): the group is opened, its
  units are fingerprinted (`Source.unit_key`) and looked up in `ingested_units`; the units found
  there are done (and get their stamps now), the others are to do, their stamps recorded when
  their commit marks them ingested.

A group is hashed once when first planned (DataComp: the parquet's bytes and the npz's zip
directory; other kinds: every byte), so later runs can tell a touched file from a changed one.
A source without groups plans as before: every unit listed (`Source.units`, which may open
files) and looked up by its fingerprint.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from clipsql.store import units as ledger_units
from clipsql.store.ledger import done_units
from clipsql.store.store import Store
from clipsql.store.units import UnitStamp


@dataclass
class UnitPlan:
    todo: list                                    # [(unit, unit_key)]
    done: dict                                    # {unit_key: (rows, rejected)}
    stamps: dict = field(default_factory=dict)    # {unit_key: UnitStamp} of the units to do
    opened: int = 0                               # groups whose files were opened
    hashed: int = 0                               # groups whose content was hashed


def file_stamp(files: list[str]) -> tuple[int, str]:
    """(total size, modification times in ns, comma-separated; '-' for a missing file)."""
    size, times = 0, []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            times.append("-")
            continue
        size += st.st_size
        times.append(str(st.st_mtime_ns))
    return size, ",".join(times)


@contextmanager
def _no_cycle_collection():
    """Planning makes a few objects per unit and frees none until it returns: with CPython's cyclic
    collector on, each of its full collections walks every object alive, which made planning grow
    as units^1.22 over 1k-30k units (bench/growth.py --only plan; 1.06 paused). Nothing here makes
    cycles, so it pauses meanwhile and leaves the collector as it found it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan_units(store: Store, model: Any, source: Any) -> UnitPlan:
    """The units of `source` that `model` (None: not in the store yet) lacks (module docstring).
    Writes the stamps of units found done by fingerprint (the caller holds the writer lock)."""
    with _no_cycle_collection():
        return _plan_units(store, model, source)


def _plan_units(store: Store, model: Any, source: Any) -> UnitPlan:
    groups = source.groups()
    if groups is None:
        units = source.units()
        keys = [source.unit_key(u) for u in units]
        done = done_units(store, model, keys) if model is not None else {}
        return UnitPlan([(u, k) for u, k in zip(units, keys) if k not in done], done)
    variant = source.variant()
    held = ledger_units.known(store.engine, model.model_id, variant) if model is not None else {}
    plan = UnitPlan([], {})
    adopt: dict[str, UnitStamp] = {}
    for location, files in groups:
        size, mtime = file_stamp(files)
        rows = held.get(location, [])
        same = [r for r in rows if (r.stamp.size, r.stamp.mtime) == (size, mtime)]
        if _whole(same):
            plan.done.update({r.unit_key: (r.rows, r.rejected) for r in same})
            continue
        content = source.content_hash(files)
        plan.hashed += 1
        match = [r for r in rows if r.stamp.content == content]
        if _whole(match):       # the same content under a new size / mtime: done, stamped anew
            plan.done.update({r.unit_key: (r.rows, r.rejected) for r in match})
            anew = UnitStamp(variant, location, size, mtime, content, match[0].stamp.parts)
            adopt.update({r.unit_key: anew for r in match})
            continue
        units = source.group_units(location)
        plan.opened += 1
        stamp = UnitStamp(variant, location, size, mtime, content, len(units))
        keys = [source.unit_key(u) for u in units]
        found = done_units(store, model, keys) if model is not None else {}
        for u, k in zip(units, keys):
            if k in found:
                plan.done[k] = found[k]
                adopt[k] = stamp
            else:
                plan.todo.append((u, k))
                plan.stamps[k] = stamp
    if model is not None:
        ledger_units.record(store.engine, model.model_id, adopt)
    return plan


def _whole(rows: list) -> bool:
    """Rows of every part of one group, with one stamp."""
    return bool(rows) and len({r.unit_key for r in rows}) == rows[0].stamp.parts and \
        len({(r.stamp.size, r.stamp.mtime, r.stamp.content, r.stamp.parts) for r in rows}) == 1
