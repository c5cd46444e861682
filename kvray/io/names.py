"""Safe names under an output prefix: untrusted ids (from a manifest) become path components only once
checked, so that no id can leave its directory or name another filesystem."""

from __future__ import annotations

import re

MAX_NAME_BYTES = 255  # longest file name on common local filesystems (S3 keys allow 1024 in all)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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

    ``prefix`` is trusted (it comes from configuration, e.g. ``root`` of :func:`~kvray.io.opening.open_fs`);
    the names are not (ids from a manifest). ``safe_join(root, "videos", f"{video_id}.mp4")``.
    """
    if not names:
        raise ValueError("safe_join needs at least one name")
    tail = "/".join(check_name(name) for name in names)
    if not prefix:
        return tail
    return prefix + tail if prefix.endswith("/") else f"{prefix}/{tail}"
