"""Where a render's images may come from and how large they may be: the guard against untrusted manifests.

Every Keyframes worker fetches the image a manifest row names, with the job's credentials and from
inside the cluster's network. A manifest written by someone else must not make it read other buckets,
local files, the cloud metadata service or services on the private network, nor exhaust its memory.
`kvray.io.images.load_image` enforces this policy; the user's own `kvray generate --image` runs without one.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_GLOB = re.compile(r"[*?\[]")

# Decoders for the still-image formats people use; others (EPS runs Ghostscript, and the long tail of
# rarely used decoders) are refused unless the job names them.
DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (multi-picture JPEG)


def uri_scheme(source: str) -> str | None:
    """The lower-case scheme of `scheme://...`; None for a plain path."""
    match = _URI.match(source)
    return match.group(1).lower() if match else None


def is_local(source: str) -> bool:
    """A plain path or a `file://` URI."""
    return uri_scheme(source) in (None, "file")


def local_path(source: str) -> str:
    """The absolute path of a plain path or `file://` URI (not following links: see `os.path.realpath`)."""
    return os.path.abspath(source[len("file://"):] if uri_scheme(source) == "file" else source)


def normalized_uri(uri: str) -> str:
    """`scheme://host/path` with the scheme and host lower-cased and without user info, query or fragment:
    the form in which URIs are compared with prefixes (and recorded, credentials never included)."""
    parts = urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme.lower(), host, parts.path, "", ""))


def _is_file_name(name: str) -> bool:
    """A manifest's last path component names a file (it has an extension), not a directory."""
    return bool(os.path.splitext(name)[1])


def manifest_location(manifest: str) -> str:
    """The directory (or bucket prefix) a manifest lives in, ending in "/": the manifest itself when it
    names a directory, else the directory of its file or of its glob's first wildcard. A relative local
    manifest gives a relative directory: it is resolved where images are read, as the rows' relative
    image paths are (a job's working directory on each node)."""
    if is_local(manifest) and not os.path.isabs(manifest.removeprefix("file://")):
        path = os.path.normpath(manifest.removeprefix("file://"))
        parts = path.split("/")
        keep = next((i for i, part in enumerate(parts) if _GLOB.search(part)), len(parts))
        if keep == len(parts) and _is_file_name(parts[-1]) and not os.path.isdir(path):
            keep -= 1
        return ("/".join(parts[:keep]) or ".") + "/"
    if is_local(manifest):
        scheme, path = "", local_path(manifest)
    else:
        scheme, path = normalized_uri(manifest).split("://", 1)
        scheme += "://"
    parts = path.rstrip("/").split("/")
    keep = next((i for i, part in enumerate(parts) if _GLOB.search(part)), len(parts))
    if keep == len(parts) and _is_file_name(parts[-1]):
        keep -= 1
    # Never above the bucket (remote) or "/" (local).
    return scheme + "/".join(parts[:max(keep, 1)]) + "/"


class ImagePolicy(BaseModel):
    """Which image sources a render's rows may use, and the limits on each image.

    An image is allowed when it is under one of `prefixes`, or its scheme is one of `schemes`
    ("http"/"https": any public host). http(s) hosts are resolved and every address checked;
    loopback, private and other non-global addresses need `allow_private_network`, link-local
    ones and cloud metadata services `allow_link_local`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    prefixes: tuple[str, ...] | None = Field(
        None, description="where rows' images may be: URI prefixes (s3://bucket/images/, https://cdn.example/img/) "
                          "and local directories; default (None): the manifest's own directory or bucket prefix")
    schemes: tuple[str, ...] = Field(
        ("http", "https"), description="schemes allowed outside the prefixes: http/https for public web images; "
                                       "\"s3\" (...) for any bucket the job's credentials reach; \"file\" for any "
                                       "local file")
    allow_private_network: bool = Field(False, description="http(s) hosts on loopback, private or other "
                                                           "non-global addresses")
    allow_link_local: bool = Field(False, description="http(s) hosts on link-local addresses, where cloud "
                                                      "metadata services answer (169.254.169.254, fd00:ec2::254, ...)")
    max_bytes: int = Field(64 * 2**20, ge=1, description="largest image file, in bytes")
    max_pixels: int = Field(50_000_000, ge=1, description="largest image, width x height, checked before decoding")
    formats: tuple[str, ...] = Field(DEFAULT_FORMATS, description="Pillow formats that may be decoded")
    timeout_s: float = Field(30.0, gt=0, description="http(s): longest fetch, connection and every read included")
    max_redirects: int = Field(5, ge=0, description="http(s) redirects followed, each checked as a new source")

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, prefixes: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if prefixes is None:
            return None
        normalized = []
        for prefix in prefixes:
            if not prefix or "::" in prefix or "\x00" in prefix:
                raise ValueError(f"not a usable image prefix: {prefix!r}")
            if is_local(prefix) and not os.path.isabs(prefix.removeprefix("file://")):
                # Kept relative: resolved where images are read, against that process's working directory
                # (a job's working_dir on each node), as the rows' relative image paths are.
                normalized.append(os.path.normpath(prefix.removeprefix("file://")).rstrip("/") + "/")
            elif is_local(prefix):
                normalized.append(local_path(prefix).rstrip("/") + "/")
            else:
                if not urlsplit(prefix).hostname:
                    raise ValueError(f"image prefix {prefix!r} names no host or bucket")
                normalized.append(normalized_uri(prefix).rstrip("/") + "/")
        return tuple(normalized)

    @field_validator("schemes")
    @classmethod
    def _schemes(cls, schemes: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in schemes if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", s)]
        if bad:
            raise ValueError(f"not URI schemes: {bad} (write s3, not s3://)")
        return tuple(s.lower() for s in schemes)

    @field_validator("formats")
    @classmethod
    def _formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        upper = tuple(f.upper() for f in formats)
        unknown = [f for f in upper if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"Pillow cannot open {unknown}; it can open {', '.join(sorted(Image.OPEN))}")
        return upper

    def for_manifest(self, manifest: str) -> ImagePolicy:
        """This policy, with the default prefix (None) made the manifest's own location."""
        if self.prefixes is not None:
            return self
        return self.model_copy(update={"prefixes": (manifest_location(manifest),)})

    @property
    def local_roots(self) -> tuple[str, ...]:
        return tuple(p for p in self.prefixes or () if is_local(p))

    @property
    def uri_prefixes(self) -> tuple[str, ...]:
        return tuple(p for p in self.prefixes or () if not is_local(p))
