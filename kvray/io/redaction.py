"""Secrets masked before anything is logged or recorded: storage options, URLs with credentials,
render jobs and command lines. ``@env:`` / ``@file:`` references are kept: they name a secret, they
do not hold it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .storage_options import is_reference

REDACTED = "***"
SENSITIVE_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature")
# Query parameters of signed URLs (S3 presigned, Azure SAS, GCS signed) that carry a credential.
SENSITIVE_QUERY_NAMES = frozenset({"sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                                   "x-goog-signature", "x-goog-credential"})

# Options whose next argument (or ``=value``) is always secret, and those holding ``key=value`` pairs.
SECRET_FLAGS = frozenset({"--auth-token", "--password", "--token"})
KEY_VALUE_FLAGS = frozenset({"--storage-option", "--env"})
ALL_SECRET_FLAGS = frozenset({"--env"})  # every value of these is secret, whatever its key


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
    ``"***"`` (``@env:`` / ``@file:`` references are kept), and credentials inside URLs are masked.
    The input is not modified."""
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
