"""Storage options from ``key=value`` strings (``--storage-option``), with secrets read from where
they are kept (``key=@env:NAME``, ``key=@file:PATH``) so that they stay off command lines. Log or record
options only through :mod:`kvray.io.redaction`."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

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
