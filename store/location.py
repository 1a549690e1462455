"""Where a store lives: a local directory (pathlib.Path) or object storage (`s3://bucket/prefix`).

`store_path(spec)` returns a `Path` for a local store and an `ObjectPath` for an object-store
URI. `ObjectPath` offers the few pathlib operations a store needs (`/`, `exists`, `is_dir`,
`read_text`, `write_text`, `iterdir`, `glob("*.lance")`, `mkdir`, `rmtree`) through
`pyarrow.fs`, so the store code is the same for both. Lance, pyarrow and DuckDB reach the
objects with the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP for a plain-HTTP endpoint such as MinIO or moto).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from clipsql.errors import ObjectStoreError

import pyarrow.fs as pafs

SCHEMES = ("s3://", "gs://", "az://")

# how pyarrow's S3 client words an endpoint it cannot reach, and a refusal of the credentials
_UNREACHABLE = re.compile(r"NETWORK_CONNECTION|curlCode|Could(?: not|n't) (?:connect|resolve)|When resolving region|"
                          r"Connection refused|Timeout was reached|timed out", re.I)
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|INVALID_ACCESS_KEY|SignatureDoesNotMatch|"
                     r"HTTP status 403", re.I)


def object_store_error(uri: str, e: BaseException) -> ObjectStoreError | None:
    """One line for an object store that cannot be reached or refuses the credentials (what to
    check), or None for any other error (a missing object stays what it is)."""
    text = str(e)
    first = (text.strip().splitlines() or [type(e).__name__])[0][:300]
    s3 = uri.startswith("s3://")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "When resolving region" in text and s3 and not endpoint:
        return ObjectStoreError(f"cannot find the region of the bucket of {uri} ({first}): set AWS_REGION to the "
                                "bucket's region, and AWS_ENDPOINT_URL for an S3-compatible server such as MinIO")
    if _UNREACHABLE.search(text):
        where = endpoint or "AWS" if s3 else uri.partition("://")[0]
        hint = ("check that the server is running and that AWS_ENDPOINT_URL and AWS_REGION are right (a "
                "plain-HTTP endpoint such as MinIO also needs AWS_ALLOW_HTTP=true)") if s3 else \
            "check the network and the storage account settings"
        return ObjectStoreError(f"cannot reach the object store of {uri} at {where} ({first}): {hint}")
    if _DENIED.search(text):
        hint = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" if s3 else "the credentials"
        return ObjectStoreError(f"the object store refused access to {uri} ({first}): check {hint} and the "
                                "bucket's permissions")
    return None


def is_remote(spec: Any) -> bool:
    return isinstance(spec, ObjectPath) or str(spec).startswith(SCHEMES)


def store_path(spec: Any) -> "Path | ObjectPath":
    if isinstance(spec, ObjectPath):
        return spec
    text = os.fspath(spec) if not isinstance(spec, str) else spec
    if text.startswith(SCHEMES):
        return ObjectPath(text.rstrip("/"))
    return Path(text)


class ObjectPath:
    """A path on object storage, with the pathlib subset a store uses."""

    def __init__(self, uri: str):
        self.uri = uri
        self.scheme, _, self.key = uri.partition("://")

    # -- pathlib-like ------------------------------------------------------------------
    def __truediv__(self, part: str) -> "ObjectPath":
        return ObjectPath(f"{self.uri}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.uri.rsplit("/", 1)[0])

    def resolve(self) -> "ObjectPath":
        return self

    def _call(self, fn: Callable, *args: Any) -> Any:
        """fn(*args), with an unreachable store or refused credentials as one ObjectStoreError (not an
        OSError: callers that read an OSError as "not there" must not take an outage for that)."""
        try:
            return fn(*args)
        except OSError as e:
            err = object_store_error(self.uri, e)
            if err is None:
                raise
            raise err from None

    def _fs(self) -> Any:
        fs, path = self._call(pafs.FileSystem.from_uri, self.uri)
        return fs, path

    def _info(self) -> Any:
        fs, path = self._fs()
        return self._call(fs.get_file_info, path)

    def exists(self) -> bool:
        if self._info().type != pafs.FileType.NotFound:
            return True
        return self.is_dir()

    def is_dir(self) -> bool:
        fs, path = self._fs()
        if self._call(fs.get_file_info, path).type == pafs.FileType.Directory:
            return True
        try:       # object stores have no directories: a prefix with objects under it is one
            return bool(self._call(fs.get_file_info, pafs.FileSelector(path, recursive=False)))
        except (FileNotFoundError, OSError):
            return False

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_bytes(self) -> bytes:
        fs, path = self._fs()
        try:
            with self._call(fs.open_input_stream, path) as f:
                return self._call(f.read)
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"{self.uri}: {e}") from None

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        fs, path = self._fs()
        data = text.encode(encoding)
        with self._call(fs.open_output_stream, path) as f:
            self._call(f.write, data)
        return len(data)

    def iterdir(self) -> Iterator["ObjectPath"]:
        fs, path = self._fs()
        try:
            infos = self._call(fs.get_file_info, pafs.FileSelector(path, recursive=False))
        except (FileNotFoundError, OSError):
            return iter(())
        return iter(ObjectPath(f"{self.scheme}://{i.path}") for i in infos)

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        return (p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        return None          # prefixes need no creation

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._fs()
        try:
            self._call(fs.delete_file, path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def rmtree(path: "Path | ObjectPath | str") -> None:
    """Delete a directory tree (a local one or every object under a prefix); missing is fine."""
    p = store_path(path)
    if isinstance(p, ObjectPath):
        fs, key = p._fs()
        try:
            p._call(fs.delete_dir, key)
        except (FileNotFoundError, OSError):
            pass
        return
    shutil.rmtree(p, ignore_errors=True)


def exists(path: "Path | ObjectPath | str") -> bool:
    return store_path(path).exists()


def versions_desc(uri: "Path | ObjectPath | str") -> list[int]:
    """The Lance versions of the table at `uri` whose manifest files are present, newest first (a
    directory listing: no Lance import, no manifest read). Lance writes a manifest whole under its
    final name (rename / put-if-absent), so a listed manifest is a committed Lance version."""
    folder = store_path(uri) / "_versions"
    try:
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n in names:
        stem = n[:-len(".manifest")]
        if n.endswith(".manifest") and stem.isdigit():
            v = int(stem)
            out.append((1 << 64) - 1 - v if v > 1 << 62 else v)      # V2 paths count down from u64::MAX
    return sorted(out, reverse=True)


def table_created(uri: "Path | ObjectPath | str") -> bool:
    """Whether the Lance table at `uri` has a version: a manifest under `_versions`. A writer killed
    while creating a table, or while writing the data files of its first commit, leaves a directory
    without one; that is no table yet (nothing in it was ever committed)."""
    return bool(versions_desc(uri))


def move(src: "Path | ObjectPath | str", dst: "Path | ObjectPath | str") -> None:
    s, d = store_path(src), store_path(dst)
    if isinstance(s, ObjectPath):
        fs, a = s._fs()
        _, b = d._fs()
        fs.move(a, b)
        return
    Path(d).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(s), str(d))
