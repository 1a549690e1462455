"""WebDataset .tar shards as a clipsql source (see ingest.sources)."""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from typing import Iterator


from clipsql.errors import SourceError


from clipsql.ingest.sources import (IMAGE_EXTS, Item, Reject, Source, SUPPORTED_LAYOUTS, json_meta, too_large)


_WDS_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # as webdataset's base_plus_ext
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class WebDatasetSource(Source):
    """WebDataset tar shards; one unit per shard.

    Consecutive members sharing a key (the path up to the first dot of the
    basename) form a sample: the image is the first member with an image
    extension (``IMAGE_EXTS`` order; ``key.x.jpg`` counts as a ``jpg`` when
    there is no plain one), the caption is ``txt`` (likewise), ``json`` is read
    as metadata (its ``id_column`` field, if set, becomes the id).  Other
    members of a sample are ignored; hidden members (``._x``) are skipped.
    """

    kind = "webdataset"

    def __init__(self, shards, *, id_column: str | None = None):
        self.shards = [os.path.abspath(os.fspath(s)) for s in shards]
        self.id_column = id_column
        if not self.shards:
            raise SourceError(f"no .tar shards given; {SUPPORTED_LAYOUTS}")

    def units(self) -> list:
        return list(self.shards)

    def unit_files(self, unit) -> list[str]:
        return [unit]

    def canonical(self) -> str:
        """The directory holding the shards (locations are `shard.tar:member`), however the shards
        were named: one file, the directory, a brace pattern or a glob."""
        return os.path.commonpath([os.path.dirname(os.path.realpath(s)) for s in self.shards])

    def read(self, unit) -> Iterator[Item | Reject]:
        shard, name = unit, os.path.basename(unit)
        key, members, kept = None, {}, 0
        try:
            with _decompressed(shard) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                for m in tf:
                    if m.issym() or m.islnk():
                        match = _WDS_KEY.match(m.name)
                        yield Reject(f"{name}:{m.name}", "link_member", f"a {'symbolic' if m.issym() else 'hard'} "
                                     f"link to {m.linkname!r}: tar links are not followed; store the file itself")
                        if match is not None and match.group(1) == key:
                            members.setdefault(match.group(2).lower(), (m.name, None))
                        elif match is not None:
                            if key is not None:
                                kept += 1
                                yield from self._sample(shard, name, key, members)
                            key, members = match.group(1), {match.group(2).lower(): (m.name, None)}
                        continue
                    if not m.isfile():
                        continue
                    match = _WDS_KEY.match(m.name)
                    if match is None:
                        if not os.path.basename(m.name).startswith("."):
                            yield Reject(f"{name}:{m.name}", "unsupported_file", "tar member without an extension")
                        continue
                    if match.group(1) != key:
                        if key is not None:
                            kept += 1
                            yield from self._sample(shard, name, key, members)
                        key, members = match.group(1), {}
                    if m.size > self.max_file_bytes:      # not read: a huge (or sparse) member
                        yield Reject(f"{name}:{m.name}", "file_too_large", too_large(m.size, self.max_file_bytes))
                        members.setdefault(match.group(2).lower(), (m.name, None))   # its sample: no 2nd reject
                        continue
                    ext = match.group(2).lower()
                    if ext in members:
                        yield Reject(f"{name}:{m.name}", "duplicate_member", f"the sample already has a "
                                     f"{ext!r} member ({members[ext][0]!r}); the first one is kept")
                        continue
                    members[ext] = (m.name, tf.extractfile(m).read())
                end = tf.offset
                # stream-mode tarfile stops quietly where a compressed shard is cut short; reading the
                # decompressor to its end checks the stream's trailer (EOFError when truncated)
                while raw.read(1 << 20):
                    pass
            _check_tar_end(shard, end)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            lost = f"; the incomplete sample {key!r} was skipped" if key is not None else ""
            yield Reject(f"{name}:{key}" if key else name, "corrupt_tar",
                         f"{e}; {kept} sample(s) read before the damage were kept{lost}")
            return
        if key is not None:
            yield from self._sample(shard, name, key, members)

    def _sample(self, shard, name, key, members) -> Iterator[Item | Reject]:
        where = f"{name}:{key}"
        image = _pick(members, [e[1:] for e in IMAGE_EXTS])
        if image is None:
            yield Reject(where, "missing_image", f"sample has members {sorted(members)} but no image")
            return
        if image[1] is None:        # its image was rejected as too large
            return
        meta, sid = {}, None
        if "json" in members:
            try:
                meta, sid = json_meta(members["json"][1], self.id_column)
            except ValueError as e:
                yield Reject(f"{name}:{members['json'][0]}", "bad_metadata",
                             f"{e}; the image is ingested without this metadata")
        cap = _pick(members, ["txt"])
        if cap is not None and cap[1] is None:
            return                  # its caption was rejected as too large
        caption = None if cap is None else cap[1]
        yield Item(where, f"{shard}::{image[0]}", caption, image[1], sid, meta)

    def describe(self) -> str:
        more = f" … {os.path.basename(self.shards[-1])}" if len(self.shards) > 1 else ""
        return f"webdataset {len(self.shards)} shard(s): {self.shards[0]}{more}"


def _pick(members: dict, exts: list[str]):
    """The member whose extension is exts[0], exts[1], ... or, failing that, ends in one (``a.webp``)."""
    for e in exts:
        if e in members:
            return members[e]
    return next((members[m] for e in exts for m in members if m.endswith("." + e)), None)


def _decompressed(path: str):  # noqa: ANN202 - a binary file object
    """The shard's tar bytes: gzip / bzip2 / xz are decompressed by modules that raise EOFError at a
    truncated stream (tarfile's own stream mode ends quietly there)."""
    import bz2
    import gzip
    import lzma
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(path, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(path)
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(path)
    return open(path, "rb")


def _check_tar_end(path: str, offset: int) -> None:
    """tarfile stops quietly at a truncated or garbled header; catch that.

    A complete uncompressed tar has a zero block where reading stopped.
    """
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED):
            return
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated or damaged tar header at byte {offset}")


def expand_braces(spec: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    a, b = m.group(1), m.group(2)
    out = []
    for i in range(int(a), int(b) + 1):
        out += expand_braces(spec[:m.start()] + str(i).zfill(len(a)) + spec[m.end():])
    return out


# --------------------------------------------------------------------------- precomputed
