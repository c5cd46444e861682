"""fsspec storage for the renderer: open a URI, write files that appear whole or not at all, read them back.

Paths handed to these helpers are the filesystem's own paths (``bucket/key`` for S3, absolute paths
locally), as returned in ``root`` by :func:`open_fs` and extended with :func:`safe_join`.

Credentials: s3fs (through botocore) reads the standard AWS environment variables, shared config
files and ``AWS_ENDPOINT_URL[_S3]`` itself; nothing here copies them. Explicit options come from
``key=value`` strings (:func:`parse_storage_options`); log or record them only through
:func:`redact_storage_options`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

# Stores where one upload (single PUT, or a multipart upload completed in one call) publishes the
# whole object at once, so writing straight to the final key is atomic. "memory" commits on close.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})

REDACTED = "***"
SENSITIVE_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "auth")

MAX_NAME_BYTES = 255  # longest file name on common local filesystems (S3 keys allow 1024 in all)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ----------------------------------------------------------------------------- opening


def open_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path of ``uri`` on it, without a trailing slash.

    ``"s3://bucket/out/"`` -> (S3FileSystem, ``"bucket/out"``); ``"out"`` -> (LocalFileSystem, absolute path).
    Nothing is created: local parent directories appear on the first :func:`write_atomic`.
    """
    if not uri:
        raise ValueError("empty storage URI")
    fs, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if root != "/":
        root = root.rstrip("/")
    return fs, root


def uri_of(fs: AbstractFileSystem, path: str) -> str:
    """The full URI of ``path`` on ``fs`` (with its protocol), for result rows and logs."""
    return fs.unstrip_protocol(path)


# ----------------------------------------------------------------------------- names


def check_name(name: str) -> str:
    """``name`` if it is safe as a single path component under a prefix, else a ValueError saying why.

    Refused: empty names, ``.`` and ``..``, path separators (``/`` and ``\\``), anything that starts
    like a URL scheme or drive (``s3:``, ``file:``, ``C:``), control characters, and names over 255 bytes.
    """
    if not isinstance(name, str):
        raise ValueError(f"a name must be a string, got {type(name).__name__}: {name!r}")
    if not name or not name.strip():
        raise ValueError(f"empty name {name!r}")
    if name in (".", ".."):
        raise ValueError(f"name {name!r} would leave its directory")
    if "/" in name or "\\" in name:
        raise ValueError(f"name {name!r} contains a path separator: ids must be single path components")
    if _SCHEME.match(name):
        raise ValueError(f"name {name!r} looks like a URL scheme or drive; ids must be plain names")
    if _CONTROL.search(name):
        raise ValueError(f"name {name!r} contains control characters")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def safe_join(prefix: str, *names: str) -> str:
    """``prefix/name1/name2...`` where each name is checked with :func:`check_name`.

    ``prefix`` is trusted (it comes from configuration, e.g. ``root`` of :func:`open_fs`); the names
    are not (ids from a manifest). ``safe_join(root, "videos", f"{video_id}.mp4")``.
    """
    if not names:
        raise ValueError("safe_join needs at least one name")
    tail = "/".join(check_name(name) for name in names)
    if not prefix:
        return tail
    return prefix + tail if prefix.endswith("/") else f"{prefix}/{tail}"


# ----------------------------------------------------------------------------- writing and reading


def _protocols(fs: AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, *, content_type: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file (or none) or the whole new one.

    * local: a temporary file in the same directory, fsync, ``os.replace`` (then fsync of the directory);
    * object stores (S3, GCS, Azure) and memory: one upload to the final key is already atomic;
    * other filesystems: a temporary name in the same directory, then ``fs.mv`` onto ``path``.
    A failed write removes its temporary file. ``content_type`` (e.g. ``text/html; charset=utf-8``) is
    stored with S3 and GCS objects, so that a browser shows them instead of downloading them; other
    filesystems keep no content type.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes bytes, got {type(data).__name__}")
    data = bytes(data)
    protocols = _protocols(fs)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(fs._strip_protocol(path), data)
    elif protocols & ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data, **_content_type_option(protocols, content_type))
    else:
        _write_via_rename(fs, path, data)


def _content_type_option(protocols: set[str], content_type: str | None) -> dict[str, str]:
    """The upload keyword that sets an object's content type, where the store keeps one."""
    if content_type is None:
        return {}
    if protocols & {"s3", "s3a"}:
        return {"ContentType": content_type}  # put_object's own parameter, passed on by s3fs
    if protocols & {"gs", "gcs"}:
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
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
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
    """Whether ``path`` exists on ``fs``."""
    return fs.exists(path)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """The whole content of ``path``."""
    return fs.cat_file(path)


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


# ----------------------------------------------------------------------------- storage options


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_options(items: Iterable[str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options from ``key=value`` strings, merged over a copy of ``base``.

    Dotted keys nest: ``client_kwargs.endpoint_url=http://host:9000`` ->
    ``{"client_kwargs": {"endpoint_url": "http://host:9000"}}``. Values are JSON when they parse as
    JSON (``anon=true`` -> True, ``max_concurrency=4`` -> 4, ``config_kwargs={"a": 1}``), else strings;
    quote a value to keep it a string (``key="12345"``). A later item overrides an earlier one.
    """
    if isinstance(items, str):
        raise ValueError("parse_storage_options takes a list of 'key=value' strings, not one string")
    options = _deep_copy(base or {})
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"storage option {item!r} is not of the form key=value")
        parts = key.split(".")
        if any(not part for part in parts):
            raise ValueError(f"storage option key {key!r} has an empty component")
        node = options
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ValueError(f"storage option {key!r} nests under {where!r}, which is already set to a value")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return options


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value


def is_sensitive_key(key: Any) -> bool:
    """Whether an option named ``key`` may hold a secret (key, secret, token, password, credential, auth)."""
    lowered = str(key).lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info (``scheme://user:password@host``) replaced."""
    if "@" not in url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{REDACTED}@{netloc[2]}"))


def redact_storage_options(options: Any) -> Any:
    """A copy of ``options`` safe to log or record: values of sensitive keys (at any depth) become
    ``"***"``, and passwords inside URLs are masked. The input is not modified."""
    if isinstance(options, Mapping):
        return {
            k: (REDACTED if v is not None else None) if is_sensitive_key(k) else redact_storage_options(v)
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return [redact_storage_options(v) for v in options]
    if isinstance(options, str):
        return redact_url(options)
    return options
