"""The store's marker, STORE/clipsql.json: its format version, the catalog URL (None: catalog.sqlite
inside the store) and the store id (also in the catalog's `settings`: one catalog holds one store)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from clipsql.errors import MarkerDamaged, StoreNotFound
from clipsql.store.location import is_remote, store_path

MARKER = "clipsql.json"
FORMAT_VERSION = 1


def read_marker(path: Path) -> dict:
    """The store's clipsql.json, checked: present, valid JSON, a format this clipsql reads.
    MarkerDamaged when it is there but unreadable (doctor --repair rewrites it from the catalog)."""
    marker_path = store_path(path) / MARKER
    if not marker_path.exists():
        raise StoreNotFound(f"no clipsql store at {path}: create one with `clipsql init {path}`")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
        if not isinstance(marker.get("format", FORMAT_VERSION), int) or \
                not isinstance(marker.get("store_id", ""), (str, type(None))) or \
                not isinstance(marker.get("catalog"), (str, type(None))):
            raise ValueError("a field has the wrong type")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise MarkerDamaged(f"{marker_path} is damaged ({str(e).splitlines()[0][:120]}): `clipsql doctor {path} "
                            "--repair` rewrites it from the catalog (which records the store id); a catalog "
                            "database outside the store: set CLIPSQL_CATALOG_URL to it first") from None
    fmt = marker.get("format", FORMAT_VERSION)
    if fmt > FORMAT_VERSION:
        raise StoreNotFound(f"{path} is a store of format {fmt!r}, newer than this clipsql reads ({FORMAT_VERSION}): "
                            "upgrade clipsql")
    return marker


def write_marker(path: Path, catalog_url: str | None, store_id: str) -> dict:
    """Write the store's clipsql.json (a local one through a temporary file and a rename)."""
    marker = {"format": FORMAT_VERSION, "catalog": catalog_url, "store_id": store_id}
    text = json.dumps(marker, indent=2) + "\n"
    target = store_path(path) / MARKER
    if is_remote(target):
        target.write_text(text)
        return marker
    tmp = Path(str(target) + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return marker
