"""Precomputed embeddings as a clipsql source (see ingest.sources)."""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipsql.errors import SourceError
from clipsql.ingest.columnar import (Columns, caption_text, clean_captions, content_ids, image_size, locations,
                                     metadata_json, vector_matrix)
from clipsql.ingest.sources import (Item, Reject, Source, caption_value, id_value, require_column, scalar_value)
from clipsql.store.catalog import NPY_LOCK

ROWS_PER_UNIT = 65_536      # rows a unit holds in memory at once: 256 MiB of vectors at d = 512


class PrecomputedSource(Source):
    """Rows with precomputed embeddings; ``image_bytes`` is always ``None``.

    Two layouts:

    * ``npy``: a clip-retrieval / LAION directory, ``img_emb/*.npy`` (+ optional
      ``text_emb/*.npy``) + ``metadata/*.parquet``, files paired by the number
      at the end of their name, rows in order.  The npy files are memory-mapped.
    * ``parquet``: one parquet file with embedding columns (lists of numbers).

    Units are ranges of at most ``ROWS_PER_UNIT`` rows of a parquet row group (of
    the metadata file, with the matching npy row range).  caption, id and uri come from the metadata: uri from the
    ``image_column`` if present, else ``image_path``, else ``url``, stored as
    is (the images are not read).  Other metadata columns go to ``meta``.
    """

    kind = "precomputed"
    precomputed = True

    def __init__(self, path, layout, files, *, image_column="image", caption_column="caption",
                 id_column=None, image_embeddings=None, text_embeddings=None):
        self.path, self.layout = os.path.abspath(os.fspath(path)), layout
        self.files = files  # [(metadata.parquet, img.npy | None, text.npy | None)]
        self.rows_per_unit = ROWS_PER_UNIT
        self.caption_column, self.id_column = caption_column, id_column
        self.image_embeddings = image_embeddings or "image_embedding"
        self.text_embeddings = text_embeddings or "text_embedding"
        for meta_path, _, _ in files:
            names = _schema_names(meta_path)
            where = f"{'parquet' if layout == 'parquet' else 'metadata'} {os.path.basename(meta_path)}"
            require_column(names, caption_column, "caption_column", "the captions", where)
            if id_column is not None:
                require_column(names, id_column, "id_column", "the sample ids", where)
            if layout == "parquet":  # named columns must exist; by default one of the two
                for col, opt in ((image_embeddings, "image_embeddings"), (text_embeddings, "text_embeddings")):
                    if col is not None:
                        require_column(names, col, opt, "the embeddings", where)
                if self.image_embeddings not in names and self.text_embeddings not in names:
                    require_column(names, self.image_embeddings, "image_embeddings", "the image embeddings", where)
            self.uri_column = next((c for c in (image_column, "image_path", "url") if c in names), None)
            if layout == "parquet" and self.image_embeddings not in names:
                raise SourceError(f"{where} has text embeddings but no image embedding column "
                                  f"{self.image_embeddings!r} (name it with `image_embeddings`): clipsql stores "
                                  "image-text pairs, or images alone, but not texts alone", param="image_embeddings")
        # image-only sources (no text_emb/ files, no text column) store NULL text embeddings
        self.image_only = (all(t is None for _, _, t in files) if layout == "npy" else
                           all(self.text_embeddings not in _schema_names(m) for m, _, _ in files))

    @staticmethod
    def is_npy_layout(path) -> bool:
        return bool(glob.glob(os.path.join(glob.escape(path), "img_emb", "*.npy"))
                    and glob.glob(os.path.join(glob.escape(path), "metadata", "*.parquet")))

    @classmethod
    def from_parquet(cls, path, **opts) -> "PrecomputedSource":
        return cls(path, "parquet", [(os.path.abspath(path), None, None)], **opts)

    @classmethod
    def from_npy_dir(cls, path, **opts) -> "PrecomputedSource":
        def by_number(sub, ext):
            found = {}
            for f in sorted(glob.glob(os.path.join(glob.escape(path), sub, "*" + ext))):
                m = re.search(r"(\d*)$", os.path.splitext(os.path.basename(f))[0])
                num = int(m.group(1)) if m.group(1) else -1
                if num in found:
                    raise SourceError(f"{found[num]} and {f} have the same number; cannot pair files")
                found[num] = os.path.abspath(f)
            return found

        img, txt, meta = by_number("img_emb", ".npy"), by_number("text_emb", ".npy"), by_number("metadata", ".parquet")
        if set(img) != set(meta) or (txt and set(txt) != set(img)):
            raise SourceError(f"{path}: img_emb/, text_emb/ and metadata/ files do not pair up by number "
                              f"(img_emb {sorted(img)}, text_emb {sorted(txt)}, metadata {sorted(meta)})")
        files = [(meta[n], img[n], txt.get(n)) for n in sorted(img)]
        for meta_path, *npys in files:
            rows = pq.ParquetFile(meta_path).metadata.num_rows
            for npy in filter(None, npys):
                try:
                    shape = _npy(npy).shape
                except (OSError, ValueError) as e:
                    raise SourceError(f"cannot read {npy}: {e}") from None
                if len(shape) != 2 or shape[0] != rows:
                    raise SourceError(f"{npy} has shape {shape} but {meta_path} has {rows} rows; "
                                      "each npy must hold one embedding row per metadata row, in order")
        return cls(path, "npy", files, **opts)

    def units(self) -> list:
        """(file, row group, first row of the group in the file, lo, hi): ranges of at most
        `rows_per_unit` rows of a row group (metadata parquets often hold 1M-row groups)."""
        return [u for f in range(len(self.files)) for u in self._file_units(f)]

    def _file_units(self, f: int) -> list:
        units, step = [], self.rows_per_unit
        md, start = pq.ParquetFile(self.files[f][0]).metadata, 0
        for g in range(md.num_row_groups):
            rows = md.row_group(g).num_rows
            units += [(f, g, start, lo, min(lo + step, rows)) for lo in range(0, rows, step)]
            start += rows
        return units

    def groups(self) -> list[tuple[str, list[str]]]:
        """One group per metadata file (resolved), with the npy files of its vectors."""
        return [(os.path.realpath(meta), [p for p in (meta, img, txt) if p]) for meta, img, txt in self.files]

    def group_units(self, location: str) -> list:
        index = getattr(self, "_cache_locations", None)
        if index is None:
            index = self._cache_locations = {os.path.realpath(m): f for f, (m, _, _) in enumerate(self.files)}
        return self._file_units(index[location])

    def _row_group(self, f: int, g: int) -> pa.Table:
        """A row group, cached: the units of one group are read in order by one reader."""
        cached = getattr(self, "_cache_rg", None)
        if cached is None or cached[0] != (f, g):
            cached = self._cache_rg = ((f, g), pq.ParquetFile(self.files[f][0]).read_row_group(g))
        return cached[1]

    def read(self, unit) -> Iterator[Item | Reject]:
        f, group, first, lo, hi = unit
        start, stop = first + lo, first + hi
        meta_path, img_npy, txt_npy = self.files[f]
        table = self._row_group(f, group).slice(lo, hi - lo)
        n = table.num_rows
        if self.layout == "npy":
            img = list(np.array(_npy(img_npy)[start:stop]))
            txt = list(np.array(_npy(txt_npy)[start:stop])) if txt_npy else [None] * n
            if len(img) != n or len(txt) != n:
                raise SourceError(f"{meta_path} row group {group} does not match its npy rows")
        else:
            img, txt = _vectors(table, self.image_embeddings, n), _vectors(table, self.text_embeddings, n)
        skip = {self.caption_column, self.id_column, self.uri_column, self.image_embeddings, self.text_embeddings}
        name = os.path.basename(meta_path)
        vectors = [c for c in table.column_names if c in (self.image_embeddings, self.text_embeddings)]
        for i, row in enumerate(table.drop_columns(vectors).to_pylist()):
            uri = row.get(self.uri_column) if self.uri_column else None
            yield Item(location=f"{name}:row {start + i + 1}", uri=None if uri is None else str(scalar_value(uri)),
                       caption_raw=caption_value(row.get(self.caption_column)), image_bytes=None,
                       id=id_value(row.get(self.id_column)) if self.id_column else None,
                       meta={str(k): scalar_value(v) for k, v in row.items() if k not in skip},
                       image_embedding=img[i], text_embedding=txt[i])

    def unit_files(self, unit) -> list[str]:
        return [p for p in self.files[unit[0]] if p]

    def for_unit(self, unit) -> tuple[Source, Any]:
        return self._with(files=[self.files[unit[0]]]), (0, *unit[1:])

    def dim(self) -> int:
        """The vectors' width, from the files' shape (npy) or the first non-NULL list (parquet)."""
        for meta_path, img_npy, txt_npy in self.files:
            for npy in (img_npy, txt_npy):
                if npy:
                    return int(_npy(npy).shape[1])
            pf = pq.ParquetFile(meta_path)
            for g in range(pf.metadata.num_row_groups):
                for column in (self.image_embeddings, self.text_embeddings):
                    if column not in pf.schema_arrow.names:
                        continue
                    arr = pf.read_row_group(g, columns=[column]).column(column).combine_chunks()
                    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
                            or pa.types.is_fixed_size_list(arr.type)):
                        continue
                    lengths = pc.list_value_length(arr).drop_null()
                    if len(lengths):
                        return int(pc.mode(lengths)[0]["mode"].as_py())
        raise SourceError(f"{self.describe()}: no embeddings found to ingest")

    def read_columns(self, unit, dim: int) -> "Columns":
        """One unit as columns (ingest.columnar): the vectorised equivalent of `read` + the per-item
        checks, with the same ids, captions, metadata and reject reasons."""
        f, group, first, lo, hi = unit
        start, stop = first + lo, first + hi
        meta_path, img_npy, txt_npy = self.files[f]
        table = self._row_group(f, group).slice(lo, hi - lo)
        n = table.num_rows
        name = os.path.basename(meta_path)
        loc = locations(name, start + 1, n)
        if self.layout == "npy":
            img_src = _npy(img_npy)[start:stop]
            txt_src = _npy(txt_npy)[start:stop] if txt_npy else None
            if len(img_src) != n or (txt_src is not None and len(txt_src) != n):
                raise SourceError(f"{meta_path} row group {group} does not match its npy rows")
        else:
            img_src = table.column(self.image_embeddings) if self.image_embeddings in table.column_names else None
            txt_src = table.column(self.text_embeddings) if self.text_embeddings in table.column_names else None
        cap_col = table.column(self.caption_column).combine_chunks()
        captions, cap_rejects = clean_captions(cap_col)
        raw_caps = caption_text(cap_col)
        bad: dict[int, tuple[str, str]] = {i: (r, d) for i, r, d in cap_rejects}
        img, img_bad = vector_matrix(img_src, n, dim)
        if txt_src is None and self.image_only:     # no text embeddings at all: NULL text vectors
            txt, txt_bad = np.full((n, dim), np.nan, dtype=np.float32), [None] * n
        else:
            txt, txt_bad = vector_matrix(txt_src, n, dim)
        for i in (range(n) if (any(img_bad) or any(txt_bad)) else ()):
            a, b = img_bad[i], txt_bad[i]
            if i in bad or not (a or b):
                continue
            if (a or "").startswith("missing_vector") or (b or "").startswith("missing_vector"):
                bad[i] = ("missing_vector", "row has no image or text embedding")
            else:
                reason, _, detail = (a or b).partition("\t")
                bad[i] = (reason, detail)
        if self.uri_column:
            uri_col = table.column(self.uri_column).combine_chunks()
            uris = uri_col if pa.types.is_string(uri_col.type) else pa.array(
                [None if v is None else str(scalar_value(v)) for v in uri_col.to_pylist()], pa.string())
        else:
            uris = pa.nulls(n, pa.string())
        given = table.column(self.id_column).combine_chunks() if self.id_column else None
        if given is not None and not (pa.types.is_string(given.type) or pa.types.is_integer(given.type)):
            given = pa.array([id_value(v) for v in given.to_pylist()], pa.string())
        skip = {self.caption_column, self.id_column, self.uri_column, self.image_embeddings, self.text_embeddings}
        meta_cols = [c for c in table.column_names if c not in skip]
        metadata, meta_types = metadata_json(table.select(meta_cols))
        width, height = image_size(table.select(meta_cols))     # images are not decoded: the source's size
        keep = np.ones(n, dtype=bool)
        rejects = []
        if bad:
            idx = np.array(sorted(bad), dtype=np.int64)
            keep[idx] = False
            locs = loc.take(pa.array(idx)).to_pylist()
            rejects = [(locs[j], *bad[int(i)]) for j, i in enumerate(idx)]
        if keep.all():
            ids = content_ids(captions, uris, given, img)
            return Columns(ids, uris, captions, loc, metadata, img, txt, meta_types, rejects, width, height, raw_caps)
        rows = np.flatnonzero(keep)
        t = pa.array(rows, pa.int64())
        caps, us = captions.take(t), uris.take(t)
        ids = content_ids(caps, us, None if given is None else given.take(t), img[rows])
        return Columns(ids, us, caps, loc.take(t), metadata.take(t), img[rows], txt[rows],
                       meta_types, rejects, None if width is None else width.take(t),
                       None if height is None else height.take(t), None if raw_caps is None else raw_caps.take(t))

    def describe(self) -> str:
        if self.layout == "npy":
            return f"precomputed {self.path} (clip-retrieval npy layout, {len(self.files)} file set(s))"
        return (f"precomputed {self.path} (parquet; image={self.image_embeddings!r}, "
                f"text={self.text_embeddings!r}, caption={self.caption_column!r})")


def _schema_names(path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read parquet {path}: {e}") from None


def _vectors(table: pa.Table, column: str, n: int) -> list:
    """One numpy row (or None for a null) per table row of a list-of-numbers column."""
    if column not in table.column_names:
        return [None] * n
    arr = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type))
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return arr.to_pylist()  # not a list column: check_vector rejects it as bad_vector
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(n)]


def _npy(path: str) -> np.ndarray:
    """Memory-map an .npy file (under NPY_LOCK: np.load's header parse is not thread-safe on 3.11)."""
    with NPY_LOCK:
        return np.load(path, mmap_mode="r")
