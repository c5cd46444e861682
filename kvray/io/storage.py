"""fsspec storage for the renderer: open a URI, write files that appear whole or not at all, read them back.

Paths handed to these helpers are the filesystem's own paths (``bucket/key`` for S3, absolute paths
locally), as returned in ``root`` by :func:`open_fs` and extended with :func:`safe_join`.

Credentials: s3fs (through botocore) reads the standard AWS environment variables, shared config
files and ``AWS_ENDPOINT_URL[_S3]`` itself; nothing here copies them. Explicit options come from
``key=value`` strings (:func:`parse_storage_options`, which also takes ``key=@env:NAME`` and
``key=@file:PATH`` so that secrets stay off command lines); log or record them only through
:func:`redact_storage_options`, :func:`redact_job` or :func:`redacted_argv`.

Failures: S3 gets kvray's retry policy and timeouts (:data:`S3_POLICY`, see docs/storage.md) unless
the user's options say otherwise, so that a stalled endpoint fails within a bounded time. Storage that
still fails once the retries are spent raises :class:`StorageError` (an OSError) from the helpers here
and from :func:`storage_errors`: one line naming the URI, the endpoint and what happened.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import PurePath
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

# Stores where one upload (single PUT, or a multipart upload completed in one call) publishes the
# whole object at once, so writing straight to the final key is atomic. "memory" commits on close.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})

S3_PROTOCOLS = frozenset({"s3", "s3a"})

REDACTED = "***"
SENSITIVE_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature")
# Query parameters of signed URLs (S3 presigned, Azure SAS, GCS signed) that carry a credential.
SENSITIVE_QUERY_NAMES = frozenset({"sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                                   "x-goog-signature", "x-goog-credential"})

MAX_NAME_BYTES = 255  # longest file name on common local filesystems (S3 keys allow 1024 in all)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ----------------------------------------------------------------------------- opening


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How S3 requests are retried and timed out, in two layers that multiply for some errors.

    botocore (inside one API call): ``mode`` with ``max_attempts`` retries after the first attempt
    (botocore's own meaning of ``max_attempts``), for connection errors, timeouts, truncated
    non-streamed answers, 5xx and throttling; backoff ``rand * min(2 ** n, 20)`` s before retry n+1,
    and a per-client retry quota that stops retrying under a sustained outage.
    s3fs (around each call, and around reading a streamed body): ``s3fs_retries`` passes in all, for
    read timeouts, closed connections, truncated bodies and SlowDown; not for 500s or refused connections.
    """

    mode: str = "standard"
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    s3fs_retries: int = 2

    @property
    def attempts_per_call(self) -> int:
        """botocore's attempts of one API call."""
        return self.max_attempts + 1

    @property
    def stall_bound_s(self) -> float:
        """Longest one call can take against an endpoint that accepts and never answers: every attempt of
        both layers waits for its timeouts, plus the longest backoffs."""
        backoff = sum(min(2.0**n, 20.0) for n in range(self.max_attempts))
        s3fs_sleep = sum(min(1.7**i * 0.1, 15.0) for i in range(self.s3fs_retries))
        per_pass = self.attempts_per_call * (self.connect_timeout_s + self.read_timeout_s) + backoff
        return self.s3fs_retries * per_pass + s3fs_sleep

    @property
    def refused_bound_s(self) -> float:
        """Longest one call can take against an endpoint that refuses connections (s3fs does not retry those)."""
        return sum(min(2.0**n, 20.0) for n in range(self.max_attempts)) + self.attempts_per_call * self.connect_timeout_s

    def storage_options(self) -> dict[str, Any]:
        """s3fs options carrying this policy (the s3fs layer is set on the instance: see :func:`open_fs`)."""
        return {"config_kwargs": {"retries": {"mode": self.mode, "max_attempts": self.max_attempts},
                                  "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s}}

    @classmethod
    def of(cls, fs: AbstractFileSystem) -> RetryPolicy:
        """The policy an S3 filesystem from :func:`open_fs` runs with (the user's options included)."""
        config = getattr(fs, "config_kwargs", {}) or {}
        retries = config.get("retries") or {}
        if "total_max_attempts" in retries:
            max_attempts = retries["total_max_attempts"] - 1
        else:
            max_attempts = retries.get("max_attempts", S3_POLICY.max_attempts)
        return cls(mode=retries.get("mode", S3_POLICY.mode), max_attempts=max_attempts,
                   connect_timeout_s=config.get("connect_timeout", S3_POLICY.connect_timeout_s),
                   read_timeout_s=config.get("read_timeout", S3_POLICY.read_timeout_s),
                   s3fs_retries=getattr(fs, "retries", S3_POLICY.s3fs_retries))


S3_POLICY = RetryPolicy()


def _aws_settings() -> set[str]:
    """Which of botocore's retry settings (``max_attempts``, ``retry_mode``) the environment
    (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``) or the AWS profile already set: those win over kvray's
    defaults, as they would for any AWS tool."""
    found = {name for name in ("max_attempts", "retry_mode") if os.environ.get(f"AWS_{name.upper()}")}
    if len(found) == 2:
        return found
    try:
        import botocore.session

        profile = botocore.session.Session().get_scoped_config()
    except Exception:  # a broken profile is botocore's to report, when it connects
        log.debug("cannot read the AWS profile", exc_info=True)
        return found
    return found | {name for name in ("max_attempts", "retry_mode") if profile.get(name) is not None}


def _merged_under(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over ``defaults``, dictionaries merged key by key at every depth."""
    merged = copy.deepcopy(defaults)
    for key, value in options.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merged_under(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def storage_options_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options :func:`open_fs` uses for ``uri``: for ``s3://`` / ``s3a://``, kvray's retry
    policy and timeouts (:data:`S3_POLICY`) under the user's own options, each of which wins (so do
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` and their config-file forms). Other schemes: the options as
    given. Chained URLs (``simplecache::s3://``) are passed as given. Pass the result to fsspec calls made
    outside :func:`open_fs` (``fsspec.open(uri, **options)``) so that they share the policy."""
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol not in S3_PROTOCOLS or "::" in uri:
        return options
    defaults = S3_POLICY.storage_options()
    retries = defaults["config_kwargs"]["retries"]
    configured = _aws_settings()
    if "max_attempts" in configured:
        del retries["max_attempts"]
    if "retry_mode" in configured:
        del retries["mode"]
    return _merged_under(defaults, options)


def open_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path of ``uri`` on it, without a trailing slash.

    ``"s3://bucket/out/"`` -> (S3FileSystem, ``"bucket/out"``); ``"out"`` -> (LocalFileSystem, absolute path).
    S3 gets kvray's retry policy (:func:`storage_options_for`; s3fs's own retries, which s3fs takes
    from an attribute and not from an option, are set on the instance). Nothing is created: local
    parent directories appear on the first :func:`write_atomic`.
    """
    if not uri:
        raise ValueError("empty storage URI")
    fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
    if _protocols(fs) & S3_PROTOCOLS:
        fs.retries = S3_POLICY.s3fs_retries
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


# ----------------------------------------------------------------------------- storage failures


class StorageError(OSError):
    """Storage that failed once its retries were spent (or a local disk error), in one line naming the
    URI, the endpoint and what happened. Raised by this module's helpers and by :func:`storage_errors`;
    missing or existing files keep their own errors (FileNotFoundError, FileExistsError, ...)."""


# What a caller tests for, not storage failures: the store answered.
_ANSWERS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the remote-storage stack that mean "the storage failed": botocore's own
    (connection, timeouts, truncated answers, credentials), aiohttp's, and urllib3's IncompleteRead."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError

        found.append(AiohttpClientError)
    except ImportError:  # pragma: no cover
        pass
    from http.client import HTTPException  # urllib3's IncompleteRead derives from it

    found.append(HTTPException)
    return tuple(found)


def is_storage_failure(err: BaseException) -> bool:
    """Whether ``err`` means the storage failed (and not a file that is missing or already there).

    Storage failures: every OSError but FileNotFoundError, FileExistsError, IsADirectoryError and
    NotADirectoryError (s3fs turns S3's error answers, 5xx and throttling among them, into OSError;
    ConnectionError and TimeoutError are OSErrors), botocore's BotoCoreError (EndpointConnectionError,
    ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ResponseStreamingError, NoCredentialsError,
    ...) but ParamValidationError, aiohttp's ClientError (ClientPayloadError: a truncated body), and
    http.client's HTTPException (urllib3's IncompleteRead)."""
    if isinstance(err, _ANSWERS):
        return False
    if isinstance(err, OSError):
        return True
    try:
        from botocore.exceptions import ParamValidationError

        if isinstance(err, ParamValidationError):
            return False
    except ImportError:  # pragma: no cover
        pass
    return isinstance(err, _transport_errors())


def _endpoint(fs: AbstractFileSystem) -> str:
    if not _protocols(fs) & S3_PROTOCOLS:
        return ""
    client_kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = (client_kwargs.get("endpoint_url") or getattr(fs, "endpoint_url", None)
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")
    return redact_url(str(endpoint))


def _what_happened(err: BaseException, fs: AbstractFileSystem) -> str:
    names = {cls.__name__ for cls in type(err).__mro__}
    if "ReadTimeoutError" in names:
        return f"no answer within the read timeout ({RetryPolicy.of(fs).read_timeout_s:g} s)"
    if names & {"ConnectTimeoutError", "EndpointConnectionError", "ClientConnectorError"}:
        return "cannot connect"
    if names & {"ClientPayloadError", "ResponseStreamingError", "IncompleteRead", "IncompleteReadError"}:
        return "answer cut short"
    if names & {"ConnectionClosedError", "ServerDisconnectedError", "ConnectionResetError"}:
        return "connection closed by the server"
    if "NoCredentialsError" in names or isinstance(err, PermissionError):
        return "access refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    return "failed"


def describe_storage_failure(err: BaseException, fs: AbstractFileSystem, path: str) -> str:
    """One line: ``URI at ENDPOINT: what happened (ErrorType: message); retries spent (up to N attempts)``."""
    uri = redact_url(uri_of(fs, path)) if path else "storage"
    endpoint = _endpoint(fs)
    where = f"{uri} at {endpoint}" if endpoint else uri
    detail = " ".join(str(err).split()) or type(err).__name__
    line = f"{where}: {_what_happened(err, fs)} ({type(err).__name__}: {detail})"
    if endpoint:
        policy = RetryPolicy.of(fs)
        line += f"; retries spent (up to {policy.attempts_per_call * policy.s3fs_retries} attempts)"
    return line


@contextlib.contextmanager
def storage_errors(fs: AbstractFileSystem, path: str = "") -> Iterator[None]:
    """Turns storage failures inside the block into one :class:`StorageError` naming ``path`` on ``fs``
    (see :func:`is_storage_failure`); other errors, and a StorageError already raised, pass unchanged.

        with storage_errors(fs, root):
            names = fs.ls(f"{root}/videos", detail=False)
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        if not is_storage_failure(err):
            raise
        raise StorageError(describe_storage_failure(err, fs, path)) from err


# ----------------------------------------------------------------------------- writing and reading


def _protocols(fs: AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes, *, content_type: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file (or none) or the whole new one.

    * local: a temporary file in the same directory, fsync, ``os.replace`` (then fsync of the directory);
    * object stores (S3, GCS, Azure) and memory: one upload to the final key is already atomic;
    * other filesystems: a temporary name in the same directory, then ``fs.mv`` onto ``path``.
    A failed write removes its temporary file; storage failures raise :class:`StorageError`.
    ``content_type`` (e.g. ``text/html; charset=utf-8``) is stored with S3 and GCS objects, so that a
    browser shows them instead of downloading them; other filesystems keep no content type.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes bytes, got {type(data).__name__}")
    data = bytes(data)
    protocols = _protocols(fs)
    with storage_errors(fs, path):
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
    """Whether ``path`` exists on ``fs``; :class:`StorageError` when the storage cannot say."""
    with storage_errors(fs, path):
        return fs.exists(path)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """The whole content of ``path`` (FileNotFoundError if there is none, :class:`StorageError` if the
    storage fails). A body cut short is retried by s3fs, then an error: never short data."""
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


# ----------------------------------------------------------------------------- storage options


ENV_REFERENCE, FILE_REFERENCE = "@env:", "@file:"


def is_reference(value: Any) -> bool:
    """Whether an option value names where its secret is (``@env:NAME``, ``@file:PATH``) instead of holding it."""
    return isinstance(value, str) and value.startswith((ENV_REFERENCE, FILE_REFERENCE))


def resolve_reference(key: str, raw: str) -> str:
    """The value ``@env:NAME`` / ``@file:PATH`` names: the variable, or the file's text without its
    trailing newline; a ValueError naming the option when it is not there."""
    if raw.startswith(ENV_REFERENCE):
        name = raw[len(ENV_REFERENCE):]
        if not name or name not in os.environ:
            raise ValueError(f"storage option {key}={raw}: the environment variable {name or '(empty name)'} is not set")
        return os.environ[name]
    path = os.path.expanduser(raw[len(FILE_REFERENCE):])
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except OSError as err:
        raise ValueError(f"storage option {key}={raw}: cannot read {path}: {err.strerror or err}") from None


def _parse_value(key: str, text: str) -> Any:
    if is_reference(text):
        return resolve_reference(key, text)
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

    Secrets need not appear on a command line (where ``ps`` and Ray's job records show them):
    ``secret=@env:NAME`` takes the value of the environment variable NAME, ``secret=@file:PATH`` the
    text of a file (without its trailing newline), both as strings, read here and now. A literal value
    that starts with ``@env:`` or ``@file:`` is written as JSON: ``key='"@env:x"'``.
    """
    if isinstance(items, str):
        raise ValueError("parse_storage_options takes a list of 'key=value' strings, not one string")
    options = copy.deepcopy(base or {})
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
        node[parts[-1]] = _parse_value(key, raw)
    return options


def is_sensitive_key(key: Any) -> bool:
    """Whether an option named ``key`` may hold a secret (key, secret, token, password, credential, auth,
    signature)."""
    lowered = str(key).lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info (``scheme://user:password@host``) and the values of
    credential query parameters (presigned S3 URLs, SAS tokens: signature, credential, token, ...) replaced."""
    if "://" not in url or ("@" not in url and "?" not in url):
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is not None:
        host = parts.netloc.rpartition("@")
        userinfo = host[0].split(":", 1)[0]
        parts = parts._replace(netloc=f"{userinfo}:{REDACTED}@{host[2]}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(name, REDACTED if _sensitive_query(name) else value) for name, value in query]
        if masked != query:
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts) if password is not None or parts.query != urlsplit(url).query else url


def _sensitive_query(name: str) -> bool:
    return name.lower() in SENSITIVE_QUERY_NAMES or is_sensitive_key(name)


def redact_storage_options(options: Any) -> Any:
    """A copy of ``options`` safe to log or record: values of sensitive keys (at any depth) become
    ``"***"`` (``@env:`` / ``@file:`` references are kept: they name a secret, they do not hold it), and
    credentials inside URLs are masked. The input is not modified."""
    if isinstance(options, Mapping):
        return {k: _redacted_value(v) if is_sensitive_key(k) else redact_storage_options(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact_storage_options(v) for v in options]
    if isinstance(options, str):
        return redact_url(options)
    return options


def _redacted_value(value: Any) -> Any:
    return value if value is None or is_reference(value) else REDACTED


def redact_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """A render job (``RenderJob.model_dump(mode="json")``, or any record holding one) safe to record:
    every ``storage_options`` mapping, at any depth, through :func:`redact_storage_options`; every other
    string through :func:`redact_url` (manifest, out, weights, addresses). Key names elsewhere are not
    judged: ``key_frame_guidance_scale`` is a number, not a secret."""
    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: redact_storage_options(v) if k == "storage_options" else walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return redact_url(value) if isinstance(value, str) else value

    return walk(job)


# Options whose next argument (or ``=value``) is always secret, and those holding ``key=value`` pairs.
SECRET_FLAGS = frozenset({"--auth-token", "--password", "--token"})
KEY_VALUE_FLAGS = frozenset({"--storage-option", "--env"})
ALL_SECRET_FLAGS = frozenset({"--env"})  # every value of these is secret, whatever its key


def redacted_argv(argv: Iterable[str]) -> list[str]:
    """A command line safe to show or record: ``--storage-option KEY=VALUE`` with a sensitive KEY (see
    :func:`is_sensitive_key`) gets ``KEY=***`` (``@env:``/``@file:`` references are kept), every
    ``--env KEY=VALUE`` gets ``KEY=***``, ``--auth-token X`` gets ``***``, and credentials inside URLs
    anywhere are masked. Both ``--flag value`` and ``--flag=value`` forms are understood."""
    out: list[str] = []
    pending: str | None = None  # the flag whose value comes next
    for arg in argv:
        arg = str(arg)
        if pending is not None:
            out.append(_redacted_flag_value(pending, arg))
            pending = None
            continue
        flag, eq, value = arg.partition("=")
        if flag in SECRET_FLAGS or flag in KEY_VALUE_FLAGS:
            if eq:
                out.append(f"{flag}={_redacted_flag_value(flag, value)}")
            else:
                out.append(arg)
                pending = flag
            continue
        out.append(redact_url(arg))
    return out


def _redacted_flag_value(flag: str, value: str) -> str:
    if flag in SECRET_FLAGS:
        return REDACTED
    key, sep, item = value.partition("=")
    if not sep:
        return redact_url(value)
    secret = flag in ALL_SECRET_FLAGS or is_sensitive_key(key.rsplit(".", 1)[-1])
    if secret and not is_reference(item):
        return f"{key}={REDACTED}"
    return f"{key}={redact_url(item)}"
