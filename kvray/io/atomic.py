"""Whole files on any fsspec storage: writes that appear whole or not at all, reads that give all of a
file or an error (never short data), as bytes or canonical JSON. Storage that fails raises
:class:`~kvray.io.failures.StorageError`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from fractions import Fraction
from pathlib import PurePath
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .failures import storage_errors
from .opening import S3_PROTOCOLS, protocols

log = logging.getLogger(__name__)

# Stores where one upload (single PUT, or a multipart upload completed in one call) publishes the
# whole object at once, so writing straight to the final key is atomic. "memory" commits on close.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, *, content_type: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file (or none) or the whole new one.

    * local: a temporary file in the same directory, fsync, ``os.replace`` (then fsync of the directory);
    * object stores (S3, GCS, Azure) and memory: one upload to the final key is already atomic;
    * other filesystems: a temporary name in the same directory, then ``fs.mv`` onto ``path``.
    A failed write removes its temporary file; storage failures raise :class:`~kvray.io.failures.StorageError`.
    ``content_type`` (e.g. ``text/html; charset=utf-8``) is stored with S3 and GCS objects, so that a
    browser shows them instead of downloading them; other filesystems keep no content type.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes bytes, got {type(data).__name__}")
    data = bytes(data)
    names = protocols(fs)
    with storage_errors(fs, path):
        if isinstance(fs, LocalFileSystem):
            _write_local_atomic(fs._strip_protocol(path), data)
        elif names & ATOMIC_PUT_PROTOCOLS:
            fs.pipe_file(path, data, **_content_type_option(names, content_type))
        else:
            _write_via_rename(fs, path, data)


def _content_type_option(names: set[str], content_type: str | None) -> dict[str, str]:
    """The upload keyword that sets an object's content type, where the store keeps one."""
    if content_type is None:
        return {}
    if names & S3_PROTOCOLS:
        return {"ContentType": content_type}  # put_object's own parameter, passed on by s3fs
    if names & {"gs", "gcs"}:
        return {"content_type": content_type}
    return {}


def _temp_name(path: str) -> str:
    parent, _, base = path.rpartition("/")
    temp = f".{base}.{uuid.uuid4().hex[:12]}.tmp"
    return f"{parent}/{temp}" if parent else temp


def _write_local_atomic(path: str, data: bytes) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, _temp_name(os.path.basename(path)))
    # O_EXCL: never write into someone else's file; 0o666 & ~umask like an ordinary open().
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(parent)


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable; not every platform or filesystem allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_via_rename(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    temp = _temp_name(path)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)  # filesystems with real directories (sftp, hdfs, dir-wrapped local)
    try:
        fs.pipe_file(temp, data)
        fs.mv(temp, path)
    except BaseException:
        try:
            if fs.exists(temp):
                fs.rm_file(temp)
        except Exception:  # keep the original error
            log.warning("could not remove temporary file %s", temp, exc_info=True)
        raise


def exists(fs: AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists on ``fs``; :class:`~kvray.io.failures.StorageError` when the storage cannot say."""
    with storage_errors(fs, path):
        return fs.exists(path)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """The whole content of ``path`` (FileNotFoundError if there is none, :class:`~kvray.io.failures.StorageError`
    if the storage fails). A body cut short is retried by s3fs, then an error: never short data."""
    with storage_errors(fs, path):
        return fs.cat_file(path)


def list_files(fs: AbstractFileSystem, prefix: str) -> list[str]:
    """Every file under ``prefix`` (recursively), sorted; [] when there is none."""
    with storage_errors(fs, prefix):
        return sorted(fs.find(prefix))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Fraction):
        return float(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "model_dump"):  # pydantic models
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any) -> bytes:
    """Canonical, readable JSON bytes: sorted keys, 2-space indent, trailing newline, no NaN."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_default)
    return (text + "\n").encode()


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as JSON with :func:`write_atomic`."""
    write_atomic(fs, path, dumps_json(obj))


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    """The JSON document at ``path``."""
    return json.loads(read_bytes(fs, path))
