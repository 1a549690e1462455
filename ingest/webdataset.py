"""WebDataset .tar shards as a clipsql source (see ingest.sources)."""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from typing import Any, Iterator


from clipsql.errors import SourceError


from clipsql.ingest.sources import (IMAGE_EXTS, Item, Reject, Source, SUPPORTED_LAYOUTS, json_meta, too_large)


_WDS_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # as webdataset's base_plus_ext
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class WebDatasetSource(Source):
    """WebDataset tar shards; one unit per shard.

    Consecutive members sharing a key (the path up to the first dot of the
    basename, as webdataset groups them) form a sample: its one image member
    (``key.jpg``, or ``key.x.jpg``: any extension ending in an image type), the
    caption ``txt`` (else the one member ending in ``.txt``), ``json`` read as
    metadata (its ``id_column`` field, if set, becomes the id).  A key with
    several images is split by full stem or rejected (see ``_sample``), never
    guessed.  Other members are ignored; hidden members (``._x``) are skipped.
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
        return getattr(self, "shards_dir", None) or \
            os.path.commonpath([os.path.dirname(os.path.realpath(s)) for s in self.shards])

    def for_unit(self, unit) -> tuple[Source, Any]:
        return self._with(shards=[unit], shards_dir=self.canonical()), unit

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
        """The sample(s) of one webdataset key.  ``members`` maps each extension (everything after the
        key's first dot, lower case) to ``(member name, bytes or None when rejected already)``.

        One image member (any extension ending in an image type) is the sample's image; its caption is
        the ``txt`` field, else the only member ending in ``.txt``.  A key holding several images (or one
        image and several non-``txt`` captions) is not guessed at: each full stem (the member name less
        its last extension) with exactly one image and one caption is a sample of its own, and every
        other image / caption member is named in one ``ambiguous_sample`` reject."""
        where = f"{name}:{key}"
        images = [e for e in members if _is_image(e)]
        captions = [e for e in members if _final_ext(e) == "txt"]
        if not images:
            yield Reject(where, "missing_image", f"sample has members {sorted(members)} but no image")
            return
        if len(images) == 1:
            caption = "txt" if "txt" in members else captions[0] if len(captions) == 1 else None
            if caption is not None or not captions:
                yield from self._item(shard, name, where, members[images[0]],
                                      None if caption is None else members[caption], members.get("json"))
                return
        stems: dict[str, list[str]] = {}
        for ext in members:
            stems.setdefault(ext.rpartition(".")[0], []).append(ext)
        unpaired = []
        for stem, exts in stems.items():
            imgs = [e for e in exts if _is_image(e)]
            caps = [e for e in exts if _final_ext(e) == "txt"]
            if len(imgs) == 1 and len(caps) == 1:
                meta = next((members[e] for e in exts if _final_ext(e) == "json"), None)
                yield from self._item(shard, name, f"{name}:{key}.{stem}" if stem else where,
                                      members[imgs[0]], members[caps[0]], meta)
            else:
                unpaired += [members[e][0] for e in imgs + caps]
        if unpaired:
            shown = ", ".join(repr(m) for m in unpaired[:_SHOWN])
            more = f" and {len(unpaired) - _SHOWN} more" if len(unpaired) > _SHOWN else ""
            yield Reject(where, "ambiguous_sample",
                         f"the key {key!r} has {len(images)} image and {len(captions)} caption members; which "
                         f"image goes with which caption is not guessed: members {shown}{more} were not "
                         f"ingested (the key's members whose full names pair one image with one caption were)")

    def _item(self, shard, name, where, image, cap, meta_member) -> Iterator[Item | Reject]:
        """One sample from its (member name, bytes) pairs; a member whose bytes are None was rejected
        already (too large, a link) and so is the sample, without a second reject."""
        if image[1] is None or (cap is not None and cap[1] is None):
            return
        meta, sid = {}, None
        if meta_member is not None and meta_member[1] is not None:
            try:
                meta, sid = json_meta(meta_member[1], self.id_column)
            except ValueError as e:
                yield Reject(f"{name}:{meta_member[0]}", "bad_metadata",
                             f"{e}; the image is ingested without this metadata")
        yield Item(where, f"{shard}::{image[0]}", None if cap is None else cap[1], image[1], sid, meta)

    def describe(self) -> str:
        more = f" … {os.path.basename(self.shards[-1])}" if len(self.shards) > 1 else ""
        return f"webdataset {len(self.shards)} shard(s): {self.shards[0]}{more}"


_SHOWN = 40     # members named in an ambiguous_sample reject


def _final_ext(ext: str) -> str:
    return ext.rpartition(".")[2]


def _is_image(ext: str) -> bool:
    return "." + _final_ext(ext) in IMAGE_EXTS


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
