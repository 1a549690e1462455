"""The source kinds, declared once: `open_source(path)` detects a path's layout (or takes `kind`).

Each kind is one `SourceKind` row of `REGISTRY`: how it opens a directory, a file and a glob /
brace pattern (None: it never is one). Every opener has the same shape, `(spec, options,
forced) -> Source | None`: with `forced` (the user named the kind) it opens the path or raises
SourceError saying why it cannot; without, it opens the path only when it recognises its layout
and otherwise returns None. Detection tries the kinds in `DIRECTORY_ORDER` / `FILE_ORDER`:

* a directory (or its ``metadata/``) of DataComp ``<stem>.parquet`` + ``<stem>.npz`` shards
  -> ``datacomp`` (one feature set, ``datacomp_features`` b32 | l14; see ingest.datacomp)
* a directory with ``img_emb/*.npy`` (+ ``text_emb/*.npy``) + ``metadata/*.parquet``
  -> ``precomputed`` (the clip-retrieval layout)
* a directory of ``*.tar`` shards (and no images at its top level) -> ``webdataset``
* any other directory -> ``folder`` (images with sidecar ``.txt`` captions)
* ``*.tar`` (and compressed tars), a glob or a ``{00000..00009}`` brace pattern -> ``webdataset``
* a parquet holding the ``image_embeddings`` / ``text_embeddings`` columns (default names
  ``image_embedding`` / ``text_embedding``) -> ``precomputed``
* ``*.csv`` / ``*.tsv`` / ``*.parquet`` / ``*.jsonl`` / ``*.json`` (JSON lines) -> ``table``

The source classes live in their own modules below this one (ingest.sources: folder and table;
ingest.webdataset, ingest.precomputed, ingest.datacomp); adding a kind is one class and one row.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from clipsql.errors import SourceError
from clipsql.ingest.datacomp import DataCompSource, find_pool
from clipsql.ingest.precomputed import PrecomputedSource
from clipsql.ingest.sources import (
    IMAGE_EXTS,
    SUPPORTED_LAYOUTS,
    TABLE_FORMATS,
    FolderSource,
    Source,
    TableSource,
    is_shard_name,
)
from clipsql.ingest.webdataset import WebDatasetSource, expand_braces

Opener = Callable[[str, dict, bool], "Source | None"]


@dataclass(frozen=True)
class SourceKind:
    name: str
    directory: Opener | None = None     # opens a directory of this layout
    file: Opener | None = None          # opens a file of this layout
    pattern: Opener | None = None       # opens a glob / brace pattern that names no existing path


# --------------------------------------------------------------------------- openers
def _datacomp_dir(spec: str, o: dict, forced: bool) -> Source | None:
    found = find_pool(spec)
    if forced or found:
        return DataCompSource(spec, o["datacomp_features"], found)
    return None


def _precomputed_dir(spec: str, o: dict, forced: bool) -> Source | None:
    laion = PrecomputedSource.is_npy_layout(spec)
    if forced and not laion:
        raise SourceError(f"{spec} has no img_emb/*.npy + metadata/*.parquet; {SUPPORTED_LAYOUTS}")
    return PrecomputedSource.from_npy_dir(spec, **_columns(o)) if laion else None


def _webdataset_dir(spec: str, o: dict, forced: bool) -> Source | None:
    tars = sorted(p for p in glob.glob(os.path.join(glob.escape(spec), "*")) if is_shard_name(p))
    if forced and not tars:
        raise SourceError(f"{spec} contains no .tar shards")
    if forced or (tars and not _top_level_images(spec)):
        return WebDatasetSource(tars, id_column=o["id_column"])
    return None


def _folder_dir(spec: str, o: dict, forced: bool) -> Source | None:
    return FolderSource(spec, id_column=o["id_column"])


def _webdataset_file(spec: str, o: dict, forced: bool) -> Source | None:
    if forced or is_shard_name(spec):
        return WebDatasetSource([spec], id_column=o["id_column"])
    return None


def _webdataset_pattern(spec: str, o: dict, forced: bool) -> Source | None:
    shards = sorted({p for s in expand_braces(spec) for p in (glob.glob(s) if re.search(r"[*?\[]", s) else [s])})
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise SourceError(f"{len(missing)} shard(s) of {spec} do not exist, e.g. {missing[0]}")
    if not shards:
        raise SourceError(f"no files match {spec}")
    not_tar = [s for s in shards if not is_shard_name(s)]
    if not_tar:
        raise SourceError(f"{spec} matches files that are not .tar shards, e.g. {not_tar[0]}; {SUPPORTED_LAYOUTS}")
    return WebDatasetSource(shards, id_column=o["id_column"])


def _precomputed_file(spec: str, o: dict, forced: bool) -> Source | None:
    if os.path.splitext(spec)[1].lower() == ".parquet":
        try:
            names = pq.read_schema(spec).names
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read parquet {spec}: {e}") from None
        img_col = o["image_embeddings"] or "image_embedding"
        txt_col = o["text_embeddings"] or "text_embedding"
        explicit = o["image_embeddings"] is not None or o["text_embeddings"] is not None
        if forced or img_col in names or txt_col in names or explicit:
            return PrecomputedSource.from_parquet(spec, image_embeddings=o["image_embeddings"],
                                                  text_embeddings=o["text_embeddings"], **_columns(o))
    if forced:
        raise SourceError(f"{spec}: a precomputed source is a parquet file or an img_emb/ directory")
    return None


def _table_file(spec: str, o: dict, forced: bool) -> Source | None:
    if os.path.splitext(spec)[1].lower() not in TABLE_FORMATS:
        return None
    if o["image_embeddings"] is not None or o["text_embeddings"] is not None:
        raise SourceError(f"{spec}: embedding columns are only read from parquet files")
    return TableSource(spec, **_columns(o))


def _columns(o: dict) -> dict:
    return dict(image_column=o["image_column"], caption_column=o["caption_column"], id_column=o["id_column"])


def _top_level_images(path: str) -> bool:
    return any(os.path.splitext(n)[1].lower() in IMAGE_EXTS for n in os.listdir(path) if not n.startswith("."))


# --------------------------------------------------------------------------- the registry
REGISTRY: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("folder", directory=_folder_dir),
    SourceKind("table", file=_table_file),
    SourceKind("webdataset", directory=_webdataset_dir, file=_webdataset_file, pattern=_webdataset_pattern),
    SourceKind("precomputed", directory=_precomputed_dir, file=_precomputed_file),
    SourceKind("datacomp", directory=_datacomp_dir),
)}
KINDS = tuple(REGISTRY)
DIRECTORY_ORDER = ("datacomp", "precomputed", "webdataset", "folder")    # the first that recognises a directory
FILE_ORDER = ("webdataset", "precomputed", "table")                      # … a file


def open_source(path: Any, *, image_column: str = "image", caption_column: str = "caption",
                id_column: str | None = None, image_embeddings: str | None = None,
                text_embeddings: str | None = None, kind: str | None = None,
                datacomp_features: str | None = None) -> Source:
    """Open ``path`` as a source, detecting its layout (see the module doc) or forcing ``kind``.

    Raises SourceError for a path that matches no layout, a missing column, or
    a ``kind`` that does not fit the path.
    """
    spec = os.fspath(path)
    if kind is not None and kind not in REGISTRY:
        raise SourceError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    o = dict(image_column=image_column, caption_column=caption_column, id_column=id_column,
             image_embeddings=image_embeddings, text_embeddings=text_embeddings, datacomp_features=datacomp_features)
    forced = kind is not None
    if re.search(r"[*?\[]|\{\d+\.\.\d+\}", spec) and not os.path.exists(spec):
        openers = [REGISTRY[k].pattern for k in ([kind] if forced else KINDS)]
        openers = [f for f in openers if f is not None]
        if not openers:
            raise SourceError(f"a pattern ({spec}) can only name webdataset shards")
        return openers[0](spec, o, True)
    if not os.path.exists(spec):
        raise SourceError(f"{spec} does not exist; {SUPPORTED_LAYOUTS}")
    if os.path.isdir(spec):
        for name in [kind] if forced else DIRECTORY_ORDER:
            opener = REGISTRY[name].directory
            if opener is None:
                raise SourceError(f"{spec} is a directory, a {kind} source must be a file; {SUPPORTED_LAYOUTS}")
            src = opener(spec, o, forced)
            if src is not None:
                return src
    for name in [kind] if forced else FILE_ORDER:
        opener = REGISTRY[name].file
        if opener is None:
            raise SourceError(f"{spec} is a file, a {kind} source must be a directory")
        src = opener(spec, o, forced)
        if src is not None:
            return src
    ext = os.path.splitext(spec)[1].lower()
    raise SourceError(f"{spec}: unsupported file type {ext or '(no extension)'!r}; {SUPPORTED_LAYOUTS}")
