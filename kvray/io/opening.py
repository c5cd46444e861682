"""Opening storage: a URI to an fsspec filesystem and a path on it, with kvray's S3 retry policy.

Paths handed to the storage helpers are the filesystem's own paths (``bucket/key`` for S3, absolute
paths locally), as returned in ``root`` by :func:`open_fs` and extended with
:func:`~kvray.io.names.safe_join`.

Credentials: s3fs (through botocore) reads the standard AWS environment variables, shared config
files and ``AWS_ENDPOINT_URL[_S3]`` itself; nothing here copies them. Explicit options come from
:func:`~kvray.io.storage_options.parse_storage_options`.

S3 gets kvray's retry policy and timeouts (:data:`S3_POLICY`, see docs/storage.md) unless the user's
options say otherwise, so that a stalled endpoint fails within a bounded time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

S3_PROTOCOLS = frozenset({"s3", "s3a"})


def protocols(fs: AbstractFileSystem) -> set[str]:
    """Every protocol name ``fs`` answers to (fsspec gives one name or a tuple)."""
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


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
    parent directories appear on the first :func:`~kvray.io.atomic.write_atomic`.
    """
    if not uri:
        raise ValueError("empty storage URI")
    fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
    if protocols(fs) & S3_PROTOCOLS:
        fs.retries = S3_POLICY.s3fs_retries
    if root != "/":
        root = root.rstrip("/")
    return fs, root


def uri_of(fs: AbstractFileSystem, path: str) -> str:
    """The full URI of ``path`` on ``fs`` (with its protocol), for result rows and logs."""
    return fs.unstrip_protocol(path)
