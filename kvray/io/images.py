"""Reading user images (image2video first frames) from a path, URL or fsspec URI, within an `ImagePolicy`.

Without a policy (the user's own `--image`) any source is read. With one (every manifest row), the
source is checked before anything is fetched, at most `max_bytes + 1` bytes are read, the header's
size is checked before any pixel is decoded, and every failure is an `ImageError` naming the source:
an error of that row alone.

http(s) is fetched here rather than through fsspec, for three reasons: the host is resolved once and
every address checked, then the connection goes to a checked address (a DNS answer that changes
between the check and the fetch, "DNS rebinding", cannot redirect it); redirects are followed one at
a time, each checked as a new source; and the job's storage credentials are never sent to a web host.
Limits: an HTTP proxy is not used (urllib3 reads no proxy settings), and a host's address is checked,
not what answers there; a cluster that must keep workers off the metadata service entirely should
also block it in its network policy.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import time
from urllib.parse import unquote, urljoin, urlsplit

import fsspec
import urllib3
from PIL import Image

from ..config.images import (
    ImagePolicy,
    is_local,
    local_path,
    normalized_uri,
    uri_scheme,
)
from .redaction import redact_url

# Cloud metadata services outside the link-local range (AWS IPv6, Alibaba, Oracle): refused as link-local.
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")))
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16
_SHOWN = 200  # characters of a source quoted in an error


class ImageError(ValueError):
    """An image that is refused, cannot be read or cannot be decoded."""


def shown(source: str) -> str:
    """`source` as quoted in messages: its password masked, cut to a readable length."""
    text = redact_url(source)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def load_image(source: str, storage_options: dict | None = None, policy: ImagePolicy | None = None) -> Image.Image:
    """The image at `source` (local path, http(s) URL, s3://, ...), decoded, in its own mode.

    The mode is kept (RGBA, P, L, CMYK, I;16, ...): the pipeline resizes and crops in it and converts
    to RGB last, as the official code does. `policy`: None for a source the user gave themselves;
    a render passes the job's. Raises `ImageError` for a refused, unreadable or undecodable image.
    """
    if policy is None:
        try:
            with fsspec.open(source, "rb", **(storage_options or {})) as f:
                data = f.read()
        except Exception as err:  # any filesystem's own error: the message is what the user needs
            raise ImageError(f"cannot read image {shown(source)}: {err}") from err
    else:
        data = _fetch(source, storage_options, policy)
    return _decode(source, data, policy)


# ----------------------------------------------------------------------------- which sources


def refused_address(address: str, policy: ImagePolicy) -> str | None:
    """Why an http(s) host's address is refused (None: allowed)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("%eth0") is no part of the address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local or ip in METADATA_ADDRESSES:
        return None if policy.allow_link_local else "a link-local or cloud metadata address (images.allow_link_local)"
    if not ip.is_global:
        return None if policy.allow_private_network else \
            "a loopback, private or reserved address (images.allow_private_network)"
    return None


def check_source(source: str, policy: ImagePolicy) -> str:
    """The source as it will be read (a local file's real path, else the URI), or `ImageError` if the
    policy refuses it. http(s) addresses are checked when fetched (`refused_address`)."""
    if not source or "\x00" in source:
        raise ImageError(f"not an image source: {shown(source)}")
    scheme = uri_scheme(source)
    if "::" in source and scheme not in ("http", "https"):  # fsspec would chain filesystems (simplecache::s3://...)
        raise ImageError(f"chained fsspec URLs are not allowed as images: {shown(source)}")
    if is_local(source):
        real = os.path.realpath(local_path(source))  # links followed: a link out of a root is outside it
        if "file" in policy.schemes or any(_under_root(real, root) for root in policy.local_roots):
            return real
        roots = ", ".join(policy.local_roots) or "none"
        raise ImageError(f"local image {shown(source)} is outside the allowed directories ({roots}); "
                         "add its directory to images.prefixes")
    try:
        parts = urlsplit(source)
        uri = normalized_uri(source)
    except ValueError as err:
        raise ImageError(f"not a valid URI: {shown(source)}: {err}") from err
    segments = parts.path.split("/")
    if {".", ".."} & {*segments, *map(unquote, segments)}:
        raise ImageError(f"image URI with '.' or '..' segments: {shown(source)}")
    if scheme in ("http", "https") and not parts.hostname:
        raise ImageError(f"image URL without a host: {shown(source)}")
    if scheme in policy.schemes or any(uri.startswith(prefix) for prefix in policy.uri_prefixes):
        return source
    allowed = ", ".join(policy.uri_prefixes) or "none"
    raise ImageError(f"image {shown(source)} is outside the allowed prefixes ({allowed}) and {scheme}:// is not "
                     "in images.schemes")


def _under_root(real: str, root: str) -> bool:
    root_real = os.path.realpath(root)
    return os.path.commonpath([real, root_real]) == root_real


# ----------------------------------------------------------------------------- reading


def _fetch(source: str, storage_options: dict | None, policy: ImagePolicy) -> bytes:
    target = check_source(source, policy)
    if uri_scheme(source) in ("http", "https"):
        return _fetch_http(source, policy)
    try:
        if is_local(source):
            if not os.path.isfile(target):  # no devices, pipes or directories
                raise ImageError(f"image {shown(source)} is not a file")
            with open(target, "rb") as f:
                data = f.read(policy.max_bytes + 1)
        else:
            with fsspec.open(source, "rb", **(storage_options or {})) as f:
                data = f.read(policy.max_bytes + 1)
    except ImageError:
        raise
    except Exception as err:  # any filesystem's own error: the message is what the user needs
        raise ImageError(f"cannot read image {shown(source)}: {err}") from err
    if len(data) > policy.max_bytes:
        raise ImageError(f"image {shown(source)} is larger than images.max_bytes ({policy.max_bytes} bytes)")
    return data


def _fetch_http(url: str, policy: ImagePolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        data, location = _get_pinned(url, policy, deadline)
        if location is None:
            return data
        url = urljoin(url, location)
        if uri_scheme(url) not in ("http", "https"):
            raise ImageError(f"image redirected to a non-http(s) URL: {shown(url)}")
        check_source(url, policy)
    raise ImageError(f"image {shown(url)}: more than {policy.max_redirects} redirects (images.max_redirects)")


def _get_pinned(url: str, policy: ImagePolicy, deadline: float) -> tuple[bytes, str | None]:
    """GET `url` from one of its host's checked addresses: (body, None), or (b"", location) for a redirect."""
    parts = urlsplit(url)
    host, https = parts.hostname, parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as err:
        raise ImageError(f"image {shown(url)}: cannot resolve {host!r}: {err}") from err
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:  # every address: the connection below may use any of them
        reason = refused_address(address, policy)
        if reason:
            where = f"{address} is" if address == host else f"{host} resolves to {address}, which is"
            raise ImageError(f"image {shown(url)}: {where} {reason}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The Host header and TLS name are the URL's host; the connection goes to the checked address.
    headers = {"Host": parts.netloc.rpartition("@")[2], "Accept-Encoding": "identity", "User-Agent": "kvray"}
    tls = {"server_hostname": host, "assert_hostname": host} if https else {}
    pool_type = urllib3.HTTPSConnectionPool if https else urllib3.HTTPConnectionPool
    error: Exception | None = None
    for address in addresses:
        left = max(0.001, deadline - time.monotonic())
        timeout = urllib3.Timeout(connect=left, read=left)
        with pool_type(address, port, timeout=timeout, retries=False, **tls) as pool:
            try:
                response = pool.urlopen("GET", path, headers=headers, redirect=False, preload_content=False,
                                        decode_content=False, assert_same_host=False)
            except urllib3.exceptions.NewConnectionError as err:  # this address does not answer: the next one
                error = err
                continue
            except urllib3.exceptions.HTTPError as err:
                raise ImageError(f"cannot read image {shown(url)}: {err}") from err
            try:
                if response.status in _REDIRECTS and response.headers.get("Location"):
                    return b"", response.headers["Location"]
                if response.status != 200:
                    raise ImageError(f"image {shown(url)}: HTTP {response.status}")
                return _read_capped(response, url, policy, deadline), None
            finally:
                response.release_conn()
    raise ImageError(f"cannot read image {shown(url)}: {error}")


def _read_capped(response: urllib3.BaseHTTPResponse, url: str, policy: ImagePolicy, deadline: float) -> bytes:
    too_large = f"image {shown(url)} is larger than images.max_bytes ({policy.max_bytes} bytes)"
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageError(too_large)
    data = bytearray()
    try:
        for chunk in response.stream(_CHUNK, decode_content=False):
            data += chunk
            if len(data) > policy.max_bytes:
                raise ImageError(too_large)
            if time.monotonic() > deadline:
                raise ImageError(f"image {shown(url)}: not fetched within images.timeout_s ({policy.timeout_s} s)")
    except urllib3.exceptions.HTTPError as err:
        raise ImageError(f"cannot read image {shown(url)}: {err}") from err
    return bytes(data)


# ----------------------------------------------------------------------------- decoding


def _decode(source: str, data: bytes, policy: ImagePolicy | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=policy.formats if policy else None)
        if policy is not None and image.width * image.height > policy.max_pixels:
            raise ImageError(f"image {shown(source)} is {image.width} x {image.height} pixels, more than "
                             f"images.max_pixels ({policy.max_pixels})")
        image.load()
        # The pipeline resizes and converts later, inside a batched network call: a mode that Pillow
        # cannot resize or convert to RGB must fail here, as an error of this row only.
        image.crop((0, 0, 1, 1)).resize((2, 2)).convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {shown(source)} is too large to decode: {err}") from err
    except Exception as err:  # Pillow's decoders raise many types (SyntaxError, struct.error, ...) on bad data
        raise ImageError(f"{shown(source)} is not a readable image: {type(err).__name__}: {err}") from err
    return image
