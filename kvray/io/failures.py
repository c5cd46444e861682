"""Storage failures: telling "the storage failed" apart from "the store answered" (a missing file), and
saying it in one line. Storage that still fails once the retries of :mod:`kvray.io.opening` are spent
raises :class:`StorageError` (an OSError) from the storage helpers and from :func:`storage_errors`: one
line naming the URI, the endpoint and what happened."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from fsspec import AbstractFileSystem

from .opening import S3_PROTOCOLS, RetryPolicy, protocols, uri_of
from .redaction import redact_url


class StorageError(OSError):
    """Storage that failed once its retries were spent (or a local disk error), in one line naming the
    URI, the endpoint and what happened. Raised by the storage helpers and by :func:`storage_errors`;
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
    if not protocols(fs) & S3_PROTOCOLS:
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
