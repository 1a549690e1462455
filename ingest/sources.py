"""Source readers: turn a folder, table, WebDataset or precomputed layout into items.

This module holds the base class and the folder and table kinds; the other kinds are
ingest.webdataset, ingest.precomputed and ingest.datacomp, and ingest.registry opens a path
as the kind its layout is (`open_source`).

A :class:`Source` holds only paths and options (it is picklable and is sent to
DataLoader workers).  ``units()`` splits the work into independent, picklable
units; ``read(unit)`` opens files lazily and yields :class:`Item` (one sample,
not yet validated) or :class:`Reject` (one sample the source itself cannot
produce).  A source that cannot be read at all raises
:class:`clipsql.errors.SourceError`.

Items carry *raw* data: ``caption_raw`` is bytes or str exactly as stored and
the pipeline cleans it with :func:`ingest.images.clean_caption`; image bytes
are decoded by :func:`ingest.images.load_image`; precomputed vectors are
checked by :func:`ingest.images.check_vector`.

Reject reason codes produced here:

``missing_image``          a caption (folder ``.txt``) or tar sample with no
                           image, or an empty image cell in a table
``unsupported_file``       a folder file that is neither an image nor a
                           caption and has no ``<stem>.txt`` (or a tar member
                           without an extension)
``missing_file``           a table row whose image path does not exist
``remote_uri_unsupported`` a table row whose image is a URL (http, s3, ...)
``unreadable_file``        a file that exists but could not be read (OSError)
``bad_metadata``           a ``.json`` sidecar / tar member that is not a JSON
                           object (the sample itself is still ingested)
``bad_row``                a malformed CSV row or JSON line
``corrupt_tar``            a damaged or truncated tar shard (the samples read
                           before the damage are kept)
``ambiguous_sample``       a tar key whose members do not form one image and
                           one caption (e.g. ``k.0.jpg``, ``k.1.jpg``,
                           ``k.1.txt``): the unpaired members are named
``path_not_utf8``          a folder file whose name is not valid UTF-8 (its
                           location shows the bytes as \\xNN escapes)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clipsql.errors import SourceError
from clipsql.store.runs import printable_text

__all__ = ["Item", "Reject", "Source", "FolderSource", "TableSource", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                 ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
FILES_PER_UNIT = 256
ROWS_PER_UNIT = 1024

SUPPORTED_LAYOUTS = (
    "supported layouts: "
    "folder (a directory of .jpg/.jpeg/.png/.webp/.gif/.bmp/.tif/.tiff images with <stem>.txt captions); "
    "table (a .csv/.tsv/.parquet/.jsonl file with image-path and caption columns); "
    "webdataset (a .tar (or .tar.gz/.tgz/.tar.bz2/.tar.xz) shard, a directory of shards, or a pattern such as shard-{00000..00009}.tar or *.tar); "
    "precomputed (a directory with img_emb/*.npy, text_emb/*.npy and metadata/*.parquet as written by "
    "clip-retrieval, or a parquet with image_embedding/text_embedding columns); "
    "datacomp (a DataComp pool: <stem>.parquet + <stem>.npz shards, in the folder or its metadata/)"
)


@dataclass
class Item:
    """One sample as the source holds it (nothing validated yet).

    location         where it is in the source, for logs and rejects:
                     ``img/cat.jpg``, ``table.csv:row 17``, ``shard-00001.tar:000123``
    uri              what the store records as the sample's uri: an absolute
                     path, ``/abs/shard.tar::member`` for tar members, the
                     metadata's url/path for precomputed rows, ``None`` for
                     image bytes embedded in a table
    caption_raw      the raw caption (bytes or str) or ``None`` when there is
                     none; the pipeline calls ``clean_caption`` on it
    image_bytes      the encoded image, ``None`` for precomputed rows
    id               the value of the source's id column as str, else ``None``
    meta             extra metadata: str/int/float/bool/None values only
                     (nested values are JSON-encoded strings)
    image_embedding  precomputed sources only: the raw row (not validated)
    text_embedding   precomputed sources only: the raw row (not validated)
    """

    location: str
    uri: str | None
    caption_raw: bytes | str | None
    image_bytes: bytes | None = None
    id: str | None = None
    meta: dict = field(default_factory=dict)
    image_embedding: np.ndarray | None = None
    text_embedding: np.ndarray | None = None


@dataclass
class Reject:
    """A sample the source could not produce; recorded by the pipeline."""

    location: str
    reason: str
    detail: str = ""


# --------------------------------------------------------------------------- helpers


def scalar_value(v, nested=False):
    """A metadata value as str/int/float/bool/None; lists and dicts become JSON text.

    Bytes are decoded as UTF-8 (bad bytes backslash-escaped), dates and times
    become ISO strings, anything else its ``str()``.
    """
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, (dict, list, tuple)):
        return v if nested else json.dumps(v, ensure_ascii=False, default=lambda o: scalar_value(o, True))
    return str(v)


def _jsonable(u):
    return [_jsonable(x) for x in u] if isinstance(u, (list, tuple)) else u


def id_value(v) -> str | None:
    return None if v is None else str(scalar_value(v))


def caption_value(v):
    return v if v is None or isinstance(v, (bytes, str)) else str(scalar_value(v))


def _loads(data: bytes):
    return json.loads(data.removeprefix(b"\xef\xbb\xbf"))  # json refuses a UTF-8 BOM


def json_meta(data: bytes, id_column: str | None) -> tuple[dict, str | None]:
    """Parse a JSON sidecar into (meta, id); ValueError when it is not a JSON object."""
    obj = _loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    sid = id_value(obj.pop(id_column, None)) if id_column else None
    return {str(k): scalar_value(v) for k, v in obj.items()}, sid


DEFAULT_MAX_FILE_BYTES = 256 << 20   # an image (or caption) file larger than this is rejected unread


class FileTooLarge(OSError):
    """A file or tar member over the source's `max_file_bytes` (recorded as `file_too_large`)."""


def too_large(size: int, limit: int) -> str:
    return (f"{size:,} bytes is over the limit of {limit:,} bytes (raise it with --max-file-mb "
            "if such files are real images)")


def _read_bytes(path: str, limit: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The file's bytes, never more than `limit` read (FileTooLarge beyond: a huge or sparse file
    must not exhaust memory)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLarge(too_large(size, limit))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(too_large(len(data), limit))
    return data


def unreadable(where: str, e: OSError) -> "Reject":
    if isinstance(e, FileTooLarge):
        return Reject(where, "file_too_large", str(e))
    return Reject(where, "unreadable_file", str(e))


def require_column(columns, name, option, what, where):
    if name not in columns:
        raise SourceError(
            f"{where} has no column {name!r} (available columns: {', '.join(map(str, columns)) or 'none'}); "
            f"set `{option}` to the column that holds {what}", param=option
        )


class Source:
    """Base class.  Subclasses set ``kind`` and implement the three methods.

    Attributes whose name starts with ``_cache`` are per-process caches (open
    file handles, a parsed CSV) and are dropped when the source is pickled.
    """

    kind: str = ""
    precomputed: bool = False
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES   # set per run (IngestOptions.max_file_bytes)

    def units(self) -> list:
        """Independent, picklable work units, in a deterministic order."""
        raise NotImplementedError

    def read(self, unit) -> Iterator[Item | Reject]:
        """Yield the items and rejects of one unit."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs."""
        raise NotImplementedError

    def unit_files(self, unit) -> list[str]:
        """The files a unit reads (their size and mtime go into its fingerprint)."""
        raise NotImplementedError

    def for_unit(self, unit) -> tuple["Source", object]:
        """(a source describing only what `unit` reads, the unit as that source names it): what a
        worker receives with one unit, the same size whatever the number of units. A source whose
        units carry their own files (folders, tables) is compact already: itself."""
        return self, unit

    def _with(self, **changes) -> "Source":
        """A copy with some attributes replaced (the per-process caches not copied)."""
        one = object.__new__(type(self))
        one.__dict__.update(self.__getstate__(), **changes)
        return one

    def canonical(self) -> str:
        """The source as the store records it (samples.source, rejects.source): the resolved path
        of its root, so `data/photos`, `/abs/data/photos/` and a symlink to it are one source and
        a second run records no reject twice. Locations are relative to it."""
        return os.path.realpath(getattr(self, "root", None) or getattr(self, "path"))

    def options(self) -> dict:
        """The options that change what a unit yields (part of its fingerprint)."""
        return {k: v for k, v in sorted(self.__dict__.items())
                if k.endswith("_column") or k.endswith("_embeddings")}

    def unit_key(self, unit) -> str:
        """A unit's fingerprint: the kind, the options, the unit and, for every file it reads, the
        resolved path, size and mtime. The commit ledger keys ingested units by it, so a re-run
        skips a unit without reading it, and a changed file is read again."""
        files = []
        for f in self.unit_files(unit):
            try:
                st = os.stat(f)
                files.append((os.path.realpath(f), st.st_size, st.st_mtime_ns))
            except OSError:
                files.append((os.path.realpath(f), None, None))
        blob = json.dumps([self.kind, self.options(), _jsonable(unit), files], sort_keys=True,
                          ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    # -- planning from the ledger (ingest.planning): groups of units listed without opening a file
    def groups(self) -> list[tuple[str, list[str]]] | None:
        """[(location, files)]: the groups of units (a shard, a metadata file with its vectors) and
        the files each reads, listed without opening any. None: this kind plans by `units()`."""
        return None

    def group_units(self, location: str) -> list:
        """The units of one group (opens its files), as `units()` gives them."""
        raise NotImplementedError

    def variant(self) -> str:
        """The kind and options, hashed: what else besides the files decides what a unit yields."""
        blob = json.dumps([self.kind, self.options()], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def content_hash(self, files: list[str]) -> str:
        """A hash of the files' content (every byte; a kind may use a cheaper exact summary)."""
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.basename(f).encode("utf-8", "surrogateescape") + b"\0")
            try:
                with open(f, "rb") as fh:
                    h.update(hashlib.file_digest(fh, "sha256").digest())
            except OSError:
                h.update(b"missing")
        return h.hexdigest()[:40]

    def __iter__(self) -> Iterator[Item | Reject]:
        for unit in self.units():
            yield from self.read(unit)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}

    def __repr__(self):
        return f"<{type(self).__name__} {self.describe()}>"


# --------------------------------------------------------------------------- folder


class FolderSource(Source):
    """A directory tree of images with ``<stem>.txt`` captions beside them.

    Walked recursively in sorted order; hidden files and directories (names
    starting with ``.``) are skipped.  For every file, by extension:

    * an image (``IMAGE_EXTS``, any case): an Item; its caption is the bytes of
      ``<stem>.txt`` in the same directory, or ``None`` when there is none (the
      pipeline then records ``missing_caption``); a ``<stem>.json`` object is
      read as metadata (``id_column``, if set, is taken from it as the id);
    * ``.txt`` with no image or other file of the same stem: Reject ``missing_image``;
    * ``.json``: only ever read as a sidecar, otherwise ignored;
    * anything else: an Item if it has a ``<stem>.txt`` caption (it may be an
      image with an unusual extension; ``load_image`` decides), otherwise
      Reject ``unsupported_file``.  Nothing else is dropped silently.

    Several images sharing one stem (``cat.jpg``, ``cat.png``) share its caption.
    """

    kind = "folder"

    def __init__(self, root, *, id_column: str | None = None, files_per_unit: int = FILES_PER_UNIT):
        self.root = os.path.abspath(os.fspath(root))
        self.id_column = id_column
        self.files_per_unit = files_per_unit
        if not os.path.isdir(self.root):
            raise SourceError(f"{self.root} is not a directory")
        if not _has_image(self.root):
            raise SourceError(
                f"{self.root} contains no image files ({' '.join(IMAGE_EXTS)}); {SUPPORTED_LAYOUTS}"
            )

    def _entries(self) -> list[tuple]:
        """Sorted (rel_path, tag, txt_rel, json_rel) for every file that matters."""
        entries = []

        def unreadable(err: OSError) -> None:     # os.walk skips such a directory silently otherwise
            rel = os.path.relpath(err.filename or self.root, self.root).replace(os.sep, "/")
            entries.append((rel, "unreadable_dir", err.strerror or str(err), None))

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unreadable):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            prefix = "" if rel_dir == "." else rel_dir + "/"
            groups: dict[str, dict[str, list[str]]] = {}
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                stem, ext = os.path.splitext(name)
                groups.setdefault(stem, {}).setdefault(ext.lower(), []).append(prefix + name)
            for files in groups.values():
                txt = files.get(".txt", [None])[0]
                js = files.get(".json", [None])[0]
                samples = [(p, e) for e, ps in files.items() if e not in (".txt", ".json") for p in ps]
                for path, ext in samples:
                    if ext in IMAGE_EXTS or txt is not None:
                        entries.append((path, "sample", txt, js))
                    else:
                        entries.append((path, "unsupported", None, None))
                if txt is not None and not samples:
                    entries.append((txt, "orphan_txt", None, None))
        entries.sort()
        return entries

    def units(self) -> list:
        e = self._entries()
        n = self.files_per_unit
        return [tuple(e[i:i + n]) for i in range(0, len(e), n)]

    def read(self, unit) -> Iterator[Item | Reject]:
        for rel, tag, txt, js in unit:
            shown = printable_text(rel)
            if shown != rel:
                yield Reject(shown, "path_not_utf8", "the file name is not valid UTF-8 (shown with \\x escapes), "
                             "so it cannot be stored as a uri; rename it, e.g. convmv -f latin1 -t utf8 --notest")
                continue
            if tag == "unreadable_dir":
                yield Reject(rel, "unreadable_directory", f"cannot list this directory ({txt}); its files "
                                                          "were not read")
                continue
            if tag == "orphan_txt":
                yield Reject(rel, "missing_image", "caption file with no image of the same name beside it")
                continue
            if tag == "unsupported":
                yield Reject(rel, "unsupported_file",
                             f"not an image ({' '.join(IMAGE_EXTS)}) and no caption; "
                             "if it is an image, give it a <stem>.txt caption or an image extension")
                continue
            path = os.path.join(self.root, *rel.split("/"))
            try:
                data = _read_bytes(path, self.max_file_bytes)
                caption = _read_bytes(os.path.join(self.root, *txt.split("/")), self.max_file_bytes) if txt else None
            except OSError as e:
                yield unreadable(rel, e)
                continue
            meta, sid = {}, None
            if js:
                try:
                    meta, sid = json_meta(_read_bytes(os.path.join(self.root, *js.split("/")), self.max_file_bytes),
                                          self.id_column)
                except (OSError, ValueError) as e:
                    yield Reject(js, "bad_metadata", f"{e}; the image is ingested without this metadata")
            yield Item(location=rel, uri=path, caption_raw=caption, image_bytes=data, id=sid, meta=meta)

    def describe(self) -> str:
        return f"folder {self.root} (images with <stem>.txt captions)"

    def unit_files(self, unit) -> list[str]:
        return [os.path.join(self.root, *rel.split("/")) for entry in unit
                for rel in ((entry[0],) if entry[1] == "unreadable_dir" else (entry[0], entry[2], entry[3])) if rel]


def _has_image(root: str) -> bool:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(os.path.splitext(n)[1].lower() in IMAGE_EXTS for n in filenames if not n.startswith(".")):
            return True
    return False


# --------------------------------------------------------------------------- table

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class TableSource(Source):
    """A CSV/TSV, Parquet or JSON-lines table with one sample per row.

    The image column holds a path, relative to the table's directory or
    absolute (``file://`` URLs are accepted), or the encoded image itself
    (binary, or a ``{"bytes": ..., "path": ...}`` struct as Hugging Face
    datasets write).  Every column other than image, caption and id goes to
    ``meta``.  Units: ranges of ``rows_per_unit`` rows within parquet row groups;
    ranges of ``rows_per_unit`` rows for
    CSV (each worker process parses the CSV once and keeps it); ranges of
    lines for JSON lines (each unit reads only its byte range).

    Locations are ``name.csv:row N`` (N counts data rows from 1, header and
    malformed rows excluded) and ``name.jsonl:line N``.
    """

    kind = "table"

    def __init__(self, path, *, image_column="image", caption_column="caption",
                 id_column=None, rows_per_unit: int = ROWS_PER_UNIT):
        self.path = os.path.abspath(os.fspath(path))
        self.fmt = TABLE_FORMATS.get(os.path.splitext(self.path)[1].lower())
        if self.fmt is None:
            raise SourceError(f"{self.path}: not a table file (.csv .tsv .parquet .jsonl .json); {SUPPORTED_LAYOUTS}")
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column
        self.rows_per_unit = rows_per_unit
        self.name = os.path.basename(self.path)
        self.base_dir = os.path.dirname(self.path)
        columns = self._columns()
        where = f"table {self.name}"
        dups = sorted({c for c in columns if columns.count(c) > 1})
        if dups:   # a row as a dict would keep only the last of them, silently
            raise SourceError(f"{where} has the column name(s) {', '.join(map(repr, dups))} more than once; "
                              "rename them so each column has its own name")
        require_column(columns, image_column, "image_column", "the image paths", where)
        require_column(columns, caption_column, "caption_column", "the captions", where)
        if id_column is not None:
            require_column(columns, id_column, "id_column", "the sample ids", where)

    # -- reading the file
    def _columns(self) -> list[str]:
        try:
            if self.fmt == "parquet":
                return pq.read_schema(self.path).names
            if self.fmt in ("csv", "tsv"):
                return self._csv().column_names
            return list(_first_json_object(self.path).keys())
        except SourceError:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:
            raise SourceError(f"cannot read {self.fmt} table {self.path}: {e}") from None

    def _csv(self) -> pa.Table:
        table = getattr(self, "_cache_table", None)
        if table is None:
            bad: list = []
            parse = pacsv.ParseOptions(delimiter="\t" if self.fmt == "tsv" else ",",
                                       invalid_row_handler=lambda row: bad.append(row) or "skip")
            types = {self.caption_column: pa.binary(), self.image_column: pa.string()}
            if self.id_column:
                types[self.id_column] = pa.string()

            def read(threads=True):
                bad.clear()
                return pacsv.read_csv(self.path, parse_options=parse,
                                      read_options=pacsv.ReadOptions(use_threads=threads),
                                      convert_options=pacsv.ConvertOptions(column_types=types))
            try:
                table = read()
            except pa.ArrowInvalid:  # a type inferred from the first block failed later: all text
                names = pacsv.open_csv(self.path, parse_options=parse).schema.names
                types = {n: pa.string() for n in names} | {self.caption_column: pa.binary()}
                table = read()
            if bad:  # parse again on one thread: only then does Arrow know their line numbers
                table = read(threads=False)
            self._cache_table, self._cache_bad_rows = table, list(bad)
        return table

    def _parquet(self) -> pq.ParquetFile:
        if getattr(self, "_cache_pf", None) is None:
            self._cache_pf = pq.ParquetFile(self.path)
        return self._cache_pf

    def units(self) -> list:
        n = self.rows_per_unit
        if self.fmt == "parquet":
            md = self._parquet().metadata
            units, start = [], 0
            for i in range(md.num_row_groups):   # row groups, cut into ranges so every worker gets work
                rows = md.row_group(i).num_rows
                units += [("rg", i, start, lo, min(lo + n, rows)) for lo in range(0, rows, n)]
                start += rows
            return units
        if self.fmt in ("csv", "tsv"):
            total = self._csv().num_rows
            units = [("rows", s, min(s + n, total)) for s in range(0, total, n)]
            return units or [("rows", 0, 0)]  # unit 0 also reports malformed rows
        units, start, first, line_no = [], 0, 1, 0
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                line_no += 1
                pos += len(line)
                if line_no - first + 1 == n:
                    units.append(("bytes", start, pos, first))
                    start, first = pos, line_no + 1
            if pos > start:
                units.append(("bytes", start, pos, first))
        return units

    def read(self, unit) -> Iterator[Item | Reject]:
        if unit[0] == "rg":
            _, index, start, lo, hi = unit
            cached = getattr(self, "_cache_rg", None)
            if cached is None or cached[0] != index:   # a worker's units of one row group share one read
                cached = self._cache_rg = (index, self._parquet().read_row_group(index))
            for i, row in enumerate(cached[1].slice(lo, hi - lo).to_pylist()):
                yield self._row(row, f"{self.name}:row {start + lo + i + 1}")
        elif unit[0] == "rows":
            _, start, stop = unit
            table = self._csv()
            if start == 0:
                for bad in self._cache_bad_rows:
                    where = f"line {bad.number}" if bad.number else "unknown line"
                    yield Reject(f"{self.name}:{where}", "bad_row",
                                 f"expected {bad.expected_columns} columns, got {bad.actual_columns}: "
                                 f"{bad.text[:200]!r}")
            for i, row in enumerate(table.slice(start, stop - start).to_pylist()):
                yield self._row(row, f"{self.name}:row {start + i + 1}")
        else:
            _, start, stop, first = unit
            with open(self.path, "rb") as f:
                f.seek(start)
                chunk = f.read(stop - start)
            for i, line in enumerate(chunk.split(b"\n")):
                if not line.strip():
                    continue
                where = f"{self.name}:line {first + i}"
                try:
                    row = _loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                except ValueError as e:
                    yield Reject(where, "bad_row", str(e))
                    continue
                yield self._row(row, where)

    def _row(self, row: dict, where: str) -> Item | Reject:
        skip = (self.image_column, self.caption_column, self.id_column)
        meta = {str(k): scalar_value(v) for k, v in row.items() if k not in skip}
        sid = id_value(row.get(self.id_column)) if self.id_column else None
        caption = caption_value(row.get(self.caption_column))
        value = row.get(self.image_column)
        if isinstance(value, dict):  # {"bytes": b"...", "path": "..."}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return Item(where, None, caption, bytes(value), sid, meta)
        if value is None or value == "" or value == b"":
            return Reject(where, "missing_image", f"column {self.image_column!r} is empty")
        value = str(value)
        if _SCHEME.match(value):
            if not value.lower().startswith("file://"):
                return Reject(where, "remote_uri_unsupported",
                              f"{value}: download images first (e.g. img2dataset) and point the table at the files")
            value = unquote(urlparse(value).path)
        uri = os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))
        if not os.path.isfile(uri):
            return Reject(where, "missing_file", f"{uri} does not exist")
        try:
            data = _read_bytes(uri, self.max_file_bytes)
        except OSError as e:
            return unreadable(where, e)
        return Item(where, uri, caption, data, sid, meta)

    def unit_files(self, unit) -> list[str]:
        return [self.path]

    def describe(self) -> str:
        extra = f", id={self.id_column!r}" if self.id_column else ""
        return (f"table {self.path} ({self.fmt}; image={self.image_column!r}, "
                f"caption={self.caption_column!r}{extra})")


def _first_json_object(path: str) -> dict:
    """The first object of a JSON-lines file (its keys are taken as the columns)."""
    with open(path, "rb") as f:
        if f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            raise SourceError(f"{path} is a JSON array; convert it to JSON lines (one object per line), "
                              "e.g. jq -c '.[]' in.json > out.jsonl")
        f.seek(0)
        for line in itertools.islice(f, 100):
            try:
                obj = _loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    raise SourceError(f"{path}: no JSON object found in its first 100 lines; expected JSON lines")


# --------------------------------------------------------------------------- webdataset

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_shard_name(path: str) -> bool:
    """A webdataset shard: .tar, or a compressed tar (.tar.gz / .tgz / .tar.bz2 / .tar.xz)."""
    return path.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(path)


