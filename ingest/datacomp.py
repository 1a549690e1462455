"""DataComp pools as a clipsql source: `<stem>.parquet` + `<stem>.npz` per shard, two models.

DataComp's `download_upstream.py` (github.com/mlfoundations/datacomp) snapshots the pool's
metadata from the Hugging Face hub into `DATA_DIR/metadata/` (`*.parquet`, and with
`--download_npz` the `*.npz` of the same stem). A parquet holds `uid` (128-bit hex), `url`,
`text`, `original_width`, `original_height`, `clip_b32_similarity_score`,
`clip_l14_similarity_score`, `face_bboxes`, `sha256`; its npz holds, row-aligned, the OpenAI
CLIP features `b32_img` / `b32_txt` (ViT-B/32, 512-d) and `l14_img` / `l14_txt` (ViT-L/14,
768-d) (read by key in baselines/apply_filter.py and baselines/image_based_clustering.py).

One `DataCompSource` reads one feature set; `ingest_pool` (ingest.pipeline) runs one ingest per set, filing
them as the open_clip models `ViT-B-32/openai` and `ViT-L-14/openai` (logit scale 100) in
one store: ids are the uids, caption the text, uri the url, metadata the other columns.

Units are row ranges of a shard's parquet row groups (with the same npz rows), so the
ledger makes re-runs and new shards O(new data). npz members stored uncompressed (np.savez)
are memory-mapped in place; compressed ones (np.savez_compressed) are read once per shard.
A shard that cannot be used is one recorded reject, never a failed run: `missing_npz`,
`missing_parquet`, `bad_parquet`, `bad_npz`, `row_count_mismatch`. Bad rows are rejected
as `bad_uid` (not 32 hex characters), then as any precomputed row (`missing_caption`,
`non_finite_vector`, ... see ingest.columnar); a repeated uid is a `duplicate_id`.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipsql.errors import SourceError
from clipsql.ingest.columnar import (
    Columns,
    caption_text,
    clean_captions,
    duck_connection,
    image_size,
    locations,
    metadata_json,
    quote_ident,
    vector_matrix,
)
from clipsql.ingest.sources import Item, Reject, Source
from clipsql.store.catalog import NPY_LOCK

# feature set -> (open_clip architecture, pretrained tag, embedding width)
FEATURES = {"b32": ("ViT-B-32", "openai", 512), "l14": ("ViT-L-14", "openai", 768)}
CHOICES = ("b32", "l14", "all")
UID_PATTERN = r"^[0-9a-f]{32}$"
ROWS_PER_UNIT = 65_536
_BAD_SHARD = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, pa.ArrowException)
HOW = "download the pool's features with DataComp's download_upstream.py --download_npz"


def model_id(features: str) -> str:
    arch, tag, _ = FEATURES[features]
    return f"{arch}/{tag}"


def pool_dir(path: Any) -> str | None:
    """The folder holding the pool's `<stem>.parquet` + `<stem>.npz` pairs: `path` itself or
    `path/metadata` (download_upstream.py's DATA_DIR); None when neither holds a pair."""
    found = find_pool(path)
    return None if found is None else found[0]


def find_pool(path: Any) -> tuple[str, set, set] | None:
    """(pool folder, parquet stems, npz stems) from one listing of the folder, or None (see
    `pool_dir`). A source opened from it lists its folder no second time."""
    path = os.fspath(path)
    for d in (path, os.path.join(path, "metadata")):
        if os.path.isdir(d):
            pq_, npz = _stems(d)
            if pq_ & npz:
                return os.path.abspath(d), pq_, npz
    return None


def is_datacomp_pool(path: Any) -> bool:
    return pool_dir(path) is not None


def _stems(folder: str) -> tuple[set, set]:
    parquets, npzs = set(), set()
    try:
        names = os.listdir(folder)
    except OSError:
        return parquets, npzs
    for name in names:
        if name.startswith("."):
            continue
        stem, ext = os.path.splitext(name)
        if ext == ".parquet":
            parquets.add(stem)
        elif ext == ".npz":
            npzs.add(stem)
    return parquets, npzs


def npz_members(path: str) -> dict[str, tuple]:
    """{key: (shape, dtype, fortran_order, data offset in the file or None when compressed)},
    from the zip directory and each member's .npy header only (no array data is read)."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f, NPY_LOCK:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                header_len = f.tell()
            offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                n, m = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + n + m + header_len
            out[info.filename[:-4]] = (shape, dtype, fortran, offset)
    return out


class DataCompSource(Source):
    """One feature set (`b32` or `l14`) of a DataComp pool folder; `features=None` until
    `bind_model` picks it from the model the run files the vectors under."""

    kind = "datacomp"
    precomputed = True
    image_only = False

    def __init__(self, path: Any, features: str | None = None, found: tuple[str, set, set] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        found = found or find_pool(self.path)
        if found is None:
            raise SourceError(f"{self.path} is not a DataComp pool: no <stem>.parquet + <stem>.npz pairs in it "
                              f"or in its metadata/ folder; {HOW}")
        if features is not None and features not in FEATURES:
            raise SourceError(f"unknown DataComp feature set {features!r}; choose b32 or l14")
        root, parquets, npzs = found
        self.root, self.features = root, features
        self.rows_per_unit = ROWS_PER_UNIT
        self.shards = [(s, os.path.join(root, s + ".parquet") if s in parquets else None,
                        os.path.join(root, s + ".npz") if s in npzs else None) for s in sorted(parquets | npzs)]

    # -- the model the vectors belong to
    def bind_model(self, model: str) -> None:
        """Check (or pick, when unset) the feature set against the model id of the run."""
        match = [k for k in FEATURES if model_id(k) == model]
        if self.features is None and match:
            self.features = match[0]
        elif self.features is None or model_id(self.features) != model:
            what = f"its {self.features} features are {model_id(self.features)}" if self.features else \
                "its features are ViT-B-32/openai (b32) and ViT-L-14/openai (l14)"
            raise SourceError(f"{self.root} is a DataComp pool and {what}, not {model}: ingest it without `model` "
                              "(both feature sets) or with `features` b32|l14", param="model")

    def _keys(self) -> tuple[str, str]:
        if self.features is None:
            raise SourceError("a DataComp pool holds two feature sets: pick one (`features` b32|l14)", param="features")
        return f"{self.features}_img", f"{self.features}_txt"

    def options(self) -> dict:
        return {"datacomp_features": self.features}

    def dim(self) -> int:
        self._keys()
        return FEATURES[self.features][2]

    # -- units
    def _check_shard(self, s: int) -> tuple[str, str, str] | None:
        """(location, reason, detail) when shard `s` cannot be ingested, else None."""
        stem, parquet, npz = self.shards[s]
        if parquet is None:
            return f"{stem}.npz", "missing_parquet", f"{stem}.npz has no {stem}.parquet beside it (its uids and " \
                                                      "captions); re-download the shard"
        try:
            md = pq.ParquetFile(parquet).metadata
            names = md.schema.to_arrow_schema().names
        except _BAD_SHARD as e:
            return f"{stem}.parquet", "bad_parquet", f"cannot read it: {e}"
        rows = md.num_rows
        lost = f"; its {rows} rows were not ingested"
        for col in ("uid", "text"):
            if col not in names:
                return f"{stem}.parquet", "bad_parquet", f"no {col!r} column (columns: {', '.join(names)}){lost}"
        if npz is None:
            return f"{stem}.parquet", "missing_npz", f"no {stem}.npz beside it{lost}; {HOW}"
        try:
            members = npz_members(npz)
        except _BAD_SHARD as e:
            return f"{stem}.npz", "bad_npz", f"cannot read it ({type(e).__name__}: {e}){lost}"
        dim = self.dim()
        for key in self._keys():
            if key not in members:
                return f"{stem}.npz", "bad_npz", f"no {key} array (arrays: {', '.join(sorted(members))}){lost}"
            shape, dtype, _, _ = members[key]
            if len(shape) != 2 or shape[1] != dim or dtype.kind not in "iuf":
                return f"{stem}.npz", "bad_npz", f"{key} is {dtype} of shape {shape}, expected real numbers of " \
                                                 f"shape (rows, {dim}){lost}"
            if shape[0] != rows:
                return f"{stem}.npz", "row_count_mismatch", f"{key} has {shape[0]} rows but {stem}.parquet has " \
                                                            f"{rows}: they are not one shard; re-download both{lost}"
        return None

    def units(self) -> list:
        """("bad", shard, location, reason, detail) for a shard that cannot be used; else
        (shard, row group, first row of the group, lo, hi) ranges of its row groups."""
        return [u for s in range(len(self.shards)) for u in self._shard_units(s)]

    def _shard_units(self, s: int) -> list:
        problem = self._check_shard(s)
        if problem is not None:
            return [("bad", s, *problem)]
        units, md, start = [], pq.ParquetFile(self.shards[s][1]).metadata, 0
        for g in range(md.num_row_groups):
            rows = md.row_group(g).num_rows
            units += [(s, g, start, lo, min(lo + self.rows_per_unit, rows))
                      for lo in range(0, rows, self.rows_per_unit)]
            start += rows
        return units

    def groups(self) -> list[tuple[str, list[str]]]:
        """One group per shard: its stem (resolved), with its parquet and npz."""
        root = os.path.realpath(self.root)
        return [(os.path.join(root, stem), self._shard_files(s)) for s, (stem, _, _) in enumerate(self.shards)]

    def group_units(self, location: str) -> list:
        index = getattr(self, "_cache_stems", None)
        if index is None:
            index = self._cache_stems = {stem: s for s, (stem, _, _) in enumerate(self.shards)}
        return self._shard_units(index[os.path.basename(location)])

    def content_hash(self, files: list[str]) -> str:
        """The parquet's bytes and the npz's zip directory: each member's name, sizes and CRC-32
        (of its data, written by the zip writer), so the vectors are checked without reading them.
        A file that is not a readable zip is hashed whole."""
        h = hashlib.sha256(super().content_hash(files[:1]).encode())
        try:
            with zipfile.ZipFile(files[1]) as z:
                for i in z.infolist():
                    h.update(f"{i.filename}\0{i.CRC}\0{i.file_size}\0{i.compress_size}\0{i.compress_type}\n"
                             .encode("utf-8", "surrogateescape"))
        except (OSError, zipfile.BadZipFile, ValueError):
            h.update(super().content_hash(files[1:]).encode())
        return h.hexdigest()[:40]

    def _shard_files(self, s: int) -> list[str]:
        stem, parquet, npz = self.shards[s]
        return [parquet or os.path.join(self.root, stem + ".parquet"), npz or os.path.join(self.root, stem + ".npz")]

    def for_unit(self, unit) -> tuple[Source, Any]:
        s = unit[1] if unit[0] == "bad" else unit[0]
        one = self._with(shards=[self.shards[s]])
        return one, (("bad", 0, *unit[2:]) if unit[0] == "bad" else (0, *unit[1:]))

    def unit_files(self, unit) -> list[str]:
        return self._shard_files(unit[1] if unit[0] == "bad" else unit[0])

    # -- reading
    def _row_group(self, s: int, g: int) -> pa.Table:
        cached = getattr(self, "_cache_rg", None)
        if cached is None or cached[0] != (s, g):
            cached = self._cache_rg = ((s, g), pq.ParquetFile(self.shards[s][1]).read_row_group(g))
        return cached[1]

    def _rows(self, npz: str, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one npz array: a memory map of a stored member, else the member
        read whole (kept for the shard's next units)."""
        cache = getattr(self, "_cache_npz", None)
        if cache is None or cache[0] != npz:
            cache = self._cache_npz = (npz, npz_members(npz), {})
        shape, dtype, fortran, offset = cache[1][key]
        if offset is not None:
            arr = np.memmap(npz, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        else:
            if key not in cache[2]:
                with np.load(npz) as z:
                    cache[2][key] = z[key]
            arr = cache[2][key]
        return arr[start:stop]

    def read_columns(self, unit, dim: int) -> Any:
        """One unit as columns (ingest.columnar), rows that fail a check as rejects."""
        if unit[0] == "bad":
            return _empty(dim, [tuple(unit[2:])])
        s, g, first, lo, hi = unit
        stem, _, npz = self.shards[s]
        start, stop = first + lo, first + hi
        img_key, txt_key = self._keys()
        try:
            table = self._row_group(s, g).slice(lo, hi - lo)
            img_src, txt_src = self._rows(npz, img_key, start, stop), self._rows(npz, txt_key, start, stop)
            n = table.num_rows
            if len(img_src) != n or len(txt_src) != n:
                return _empty(dim, [(f"{stem}.npz:rows {start + 1}-{stop}", "row_count_mismatch",
                                     f"{stem}.npz has fewer rows than {stem}.parquet; re-download both")])
            img, img_bad = vector_matrix(img_src, n, dim)
            txt, txt_bad = vector_matrix(txt_src, n, dim)
        except _BAD_SHARD as e:
            return _empty(dim, [(f"{stem}.npz:rows {start + 1}-{stop}", "bad_npz",
                                 f"cannot read these rows ({type(e).__name__}: {e})")])
        loc = locations(f"{stem}.parquet", start + 1, n)
        uids, uid_ok = _uids(table.column("uid").combine_chunks())
        text_col = table.column("text").combine_chunks()
        captions, cap_rejects = clean_captions(text_col)
        raw_caps = caption_text(text_col)
        bad: dict[int, tuple[str, str]] = {}
        for i in np.flatnonzero(~uid_ok):
            raw = table.column("uid")[int(i)].as_py()
            bad[int(i)] = ("bad_uid", f"uid {raw!r} is not 32 hex characters")
        for i, reason, detail in cap_rejects:
            bad.setdefault(i, (reason, detail))
        for i in (np.flatnonzero([a is not None or b is not None for a, b in zip(img_bad, txt_bad)])
                  if any(img_bad) or any(txt_bad) else ()):
            reason, _, detail = (img_bad[i] or txt_bad[i]).partition("\t")
            bad.setdefault(int(i), (reason, detail))
        uri = table.column("url").combine_chunks().cast(pa.string()) if "url" in table.column_names else \
            pa.nulls(n, pa.string())
        meta_table = table.drop_columns([c for c in ("uid", "text", "url") if c in table.column_names])
        metadata, meta_types = metadata_json(_flat_metadata(meta_table))
        width, height = image_size(meta_table)      # original_width / original_height
        rejects = []
        if bad:
            idx = np.array(sorted(bad), dtype=np.int64)
            keep = np.ones(n, dtype=bool)
            keep[idx] = False
            locs = loc.take(pa.array(idx)).to_pylist()
            rejects = [(locs[j], *bad[int(i)]) for j, i in enumerate(idx)]
            rows = pa.array(np.flatnonzero(keep), pa.int64())
            kept = np.flatnonzero(keep)
            return Columns(uids.take(rows), uri.take(rows), captions.take(rows), loc.take(rows),
                           metadata.take(rows), img[kept], txt[kept], meta_types, rejects,
                           None if width is None else width.take(rows), None if height is None else height.take(rows),
                           None if raw_caps is None else raw_caps.take(rows))
        return Columns(uids, uri, captions, loc, metadata, img, txt, meta_types, rejects, width, height, raw_caps)

    def read(self, unit) -> Iterator[Item | Reject]:
        """The columnar rows as Items (validated already) and Rejects: for tools that iterate."""
        cols = self.read_columns(unit, self.dim())
        for location, reason, detail in cols.rejects:
            yield Reject(location, reason, detail)
        metas = cols.metadata.to_pylist()
        for i, (sid, uri, cap, where) in enumerate(zip(cols.ids.to_pylist(), cols.uri.to_pylist(),
                                                       cols.caption.to_pylist(), cols.location.to_pylist())):
            yield Item(where, uri, cap, None, sid, json.loads(metas[i]) if metas[i] else {},
                       cols.image[i], cols.text[i])

    def describe(self) -> str:
        which = f"{self.features} features, model {model_id(self.features)}" if self.features else "features unset"
        return f"DataComp pool {self.root} ({len(self.shards)} shard(s), {which})"


def _empty(dim: int, rejects: list) -> Any:
    e = pa.array([], pa.string())
    z = np.zeros((0, dim), dtype=np.float32)
    return Columns(e, e, e, e, e, z, z.copy(), {}, rejects)


def _uids(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(lower-case uid strings, per row whether it is 32 hex characters)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        try:
            col = col.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return pa.nulls(len(col), pa.string()), np.zeros(len(col), dtype=bool)
    low = pc.utf8_lower(col.cast(pa.string()))
    ok = pc.fill_null(pc.match_substring_regex(low, UID_PATTERN), False).to_numpy(zero_copy_only=False)
    return low, ok


def _flat_metadata(table: pa.Table) -> pa.Table:
    """Nested columns (face_bboxes: list<list<double>>) as JSON text, by DuckDB in one pass."""
    nested = [c for c in table.column_names if pa.types.is_nested(table.schema.field(c).type)]
    if not nested:
        return table
    con = duck_connection()
    con.register("_clipsql_nested", table.select(nested))
    try:
        sel = ", ".join(f"to_json({quote_ident(c)})::VARCHAR AS {quote_ident(c)}" for c in nested)
        js = con.sql(f"SELECT {sel} FROM _clipsql_nested").to_arrow_table()
    finally:
        con.unregister("_clipsql_nested")
    for c in nested:
        table = table.set_column(table.column_names.index(c), c, js.column(c).cast(pa.string()))
    return table


# --------------------------------------------------------------------------- which feature sets

def pick_features(features: str | None, model: str | None = None, pretrained: str | None = None) -> list[str]:
    """The feature sets a run ingests: `features` (b32 | l14 | all, default all), or the one
    `--model ARCH --pretrained openai` names."""
    features = features or "all"
    if features not in CHOICES:
        raise SourceError(f"unknown `features` {features!r}; choose b32, l14 or all", param="features")
    keys = list(FEATURES) if features == "all" else [features]
    if model is None:
        return keys
    name = model.replace("/", "-")
    named = [k for k in FEATURES if FEATURES[k][0] == name and (pretrained or "openai") == FEATURES[k][1]]
    if not named or named[0] not in keys:
        raise SourceError(f"a DataComp pool's features are ViT-B-32/openai (b32) and ViT-L-14/openai (l14); "
                          f"`model` {model}{' `pretrained` ' + pretrained if pretrained else ''} is neither "
                          f"(of `features` {features}): drop `model`, or pick with `features`", param="model")
    return named


