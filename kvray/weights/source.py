"""Where weights come from: a local directory, a Hugging Face repo id, or an fsspec URL.

Remote files are fetched once per node and checked, whatever number of processes (stage actors) ask
for them at once: a file lock per target, a unique temporary name in the target's directory, a rename
when the file is whole and verified. What is verified depends on what the source offers:

- fsspec URLs: the size, and the strongest digest available: a ``<file>.sha256`` sidecar next to the
  file (``sha256sum`` format, or the bare hex digest), else S3's full-object ChecksumSHA256, else S3's
  ETag when it is the content's MD5 (a single-part upload without SSE-KMS / SSE-C), else S3's
  full-object ChecksumCRC32. A cached copy is reused while the source's ETag / modification time and
  size are unchanged and the copy's own size and mtime are what was verified; otherwise it is hashed
  again against the recorded sha256, and fetched again if it differs.
- Hugging Face repos: huggingface_hub's own cache (``HF_HUB_CACHE`` / ``HF_HOME``, default
  ``~/.cache/huggingface/hub``; ``--cache-dir DIR`` puts it at ``DIR/hub``), with its own lock,
  temporary ``.incomplete`` file and size check; kvray checks each LFS blob against its sha256 (the
  blob's name) once per blob, and downloads it again if it differs.
- local directories: used in place, unchecked (the user's own files).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import uuid
import zlib
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from ..io.opening import storage_options_for

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
SIDECAR_SUFFIX = ".sha256"
_CHUNK = 8 << 20


class WeightsNotFound(FileNotFoundError):
    pass


class WeightsCorrupt(OSError):
    """A fetched file does not match the digest its source gives for it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVRAY_CACHE", Path.home() / ".cache" / "kvray"))


def hub_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """Where Hugging Face downloads go: huggingface_hub's own cache (None) unless a cache dir is given
    (``--cache-dir DIR`` -> ``DIR/hub``). Weights and tokenizers use the same one."""
    return str(Path(cache_dir) / "hub") if cache_dir else None


class _Digests:
    """sha256 of a file (kept in the stamp), and the source's own digest kind when it has another, in one pass."""

    def __init__(self, path: Path, kind: str | None):
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if kind == "md5" else None
        self.crc32 = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                self.sha256.update(chunk)
                if self.md5 is not None:
                    self.md5.update(chunk)
                if kind == "crc32-base64":
                    self.crc32 = zlib.crc32(chunk, self.crc32)

    def matches(self, kind: str, expected: str) -> bool:
        if kind == "sha256":
            return self.sha256.hexdigest() == expected
        if kind == "sha256-base64":
            return base64.b64encode(self.sha256.digest()).decode() == expected
        if kind == "md5":
            return self.md5 is not None and self.md5.hexdigest() == expected
        if kind == "crc32-base64":
            return base64.b64encode(self.crc32.to_bytes(4, "big")).decode() == expected
        raise ValueError(f"unknown digest kind {kind}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_json(path: Path, data: dict) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    temp.write_text(json.dumps(data, sort_keys=True, default=str))
    os.replace(temp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _still_verified(local: Path, stamp_path: Path, source: dict[str, Any] | None) -> bool:
    """Whether ``local`` is the verified copy its stamp describes (re-hashed if its size or mtime moved;
    ``source``, when given, must be the source identity the stamp recorded)."""
    stamp = _read_json(stamp_path)
    if not stamp or not local.is_file() or (source is not None and stamp.get("source") != source):
        return False
    if stamp.get("local") == _stat_stamp(local):
        return True
    if _file_sha256(local) != stamp.get("sha256"):
        log.warning("%s differs from the copy verified when it was fetched (sha256): fetching it again", local)
        return False
    _write_json(stamp_path, {**stamp, "local": _stat_stamp(local)})
    return True


class WeightsSource:
    """Resolves file names of one source to local paths, fetching and caching remote files once.

    - a path that exists locally (or `file://...`): used in place;
    - `scheme://...` (s3://, gs://, memory://, ...): copied into the cache through fsspec, verified;
    - `owner/name`: a Hugging Face repo, through `hf_hub_download` (honours HF_HUB_OFFLINE, HF_HUB_CACHE,
      HF_HOME; `cache_dir` puts the hub cache at `cache_dir/hub`).
    `cache_dir`: kvray's cache (default KVRAY_CACHE, else ~/.cache/kvray) for fsspec copies and stamps.
    """

    def __init__(self, uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 storage_options: dict | None = None, revision: str | None = None):
        self.uri = str(uri)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.hub_cache_dir = hub_cache_dir(cache_dir)
        self.storage_options = storage_options or {}
        self.revision = revision
        if self.uri.startswith("file://"):
            self.kind, self.root = "local", self.uri[len("file://"):]
        elif Path(self.uri).expanduser().exists():
            self.kind, self.root = "local", str(Path(self.uri).expanduser())
        elif "://" in self.uri:
            self.kind, self.root = "fsspec", self.uri.rstrip("/")
        elif _REPO_ID.match(self.uri):
            self.kind, self.root = "hub", self.uri
        else:
            raise WeightsNotFound(
                f"weights source {self.uri!r} is not an existing directory, an fsspec URL (scheme://...) "
                "or a Hugging Face repo id (owner/name)"
            )

    def __repr__(self) -> str:
        return f"WeightsSource({self.uri!r})"

    def _fs(self, url: str):
        return fsspec.core.url_to_fs(url, **storage_options_for(url, self.storage_options))

    def exists(self, filename: str) -> bool:
        if self.kind == "local":
            return (Path(self.root) / filename).is_file()
        if self.kind == "fsspec":
            fs, path = self._fs(f"{self.root}/{filename}")
            return fs.isfile(path)
        try:
            self.path(filename)
            return True
        except WeightsNotFound:
            return False

    def path(self, filename: str) -> Path:
        """A local path holding `filename` of this source (WeightsCorrupt if it cannot be fetched intact)."""
        if self.kind == "local":
            path = Path(self.root) / filename
            if not path.is_file():
                raise WeightsNotFound(f"{filename} not found in {self.root}")
            return path
        if self.kind == "fsspec":
            return self._fetch_fsspec(filename)
        return self._fetch_hub(filename)

    # ------------------------------------------------------------------------------------- hub

    def _hub_download(self, filename: str, force: bool = False) -> Path:
        try:
            return Path(hf_hub_download(self.root, filename, revision=self.revision, cache_dir=self.hub_cache_dir,
                                        force_download=force))
        except (EntryNotFoundError, LocalEntryNotFoundError) as err:
            raise WeightsNotFound(f"{filename} not found in the Hugging Face repo {self.root}: {err}") from err

    def _fetch_hub(self, filename: str) -> Path:
        path = self._hub_download(filename)
        blob = path.resolve()
        if not _SHA256_HEX.match(blob.name):
            return path  # a file kept in git (configs), named by its git hash: huggingface_hub checked its size
        stamp = self.cache_dir / "verified" / f"{blob.name}.json"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{stamp}.lock"):
            if _still_verified(blob, stamp, None):
                return path
            for attempt in range(2):
                if _file_sha256(blob) == blob.name:
                    _write_json(stamp, {"sha256": blob.name, "blob": str(blob), "local": _stat_stamp(blob)})
                    return path
                if attempt == 0:
                    log.warning("%s of %s: the cached blob does not match its sha256; downloading it again",
                                filename, self.root)
                    try:
                        path = self._hub_download(filename, force=True)
                    except Exception as err:  # offline, unreachable: the cached copy stays refused
                        raise WeightsCorrupt(f"{filename} of the Hugging Face repo {self.root}: the cached blob {blob} "
                                             f"does not match its sha256, and downloading it again failed: {err}") from err
                    blob = path.resolve()
        raise WeightsCorrupt(f"{filename} of the Hugging Face repo {self.root}: the download does not match its "
                             f"sha256 {blob.name} (twice)")

    # ---------------------------------------------------------------------------------- fsspec

    def _fetch_fsspec(self, filename: str) -> Path:
        url = f"{self.root}/{filename}"
        fs, remote = self._fs(url)
        try:
            info = fs.info(remote)
        except FileNotFoundError:
            info = None
        if info is None or info.get("type") != "file":
            raise WeightsNotFound(f"{url} not found")
        source = _source_identity(info)
        local = self.cache_dir / "fsspec" / hashlib.sha256(self.root.encode()).hexdigest()[:16] / filename
        stamp = local.with_name(f".{local.name}.verified.json")
        local.parent.mkdir(parents=True, exist_ok=True)
        # One fetch per target on this node; the others wait, then find it verified.
        with FileLock(local.with_name(f".{local.name}.lock")):
            if _still_verified(local, stamp, source):
                return local
            check = _expected_digest(fs, remote, info)
            temp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:12]}.partial")
            log.info("fetching %s (%.1f MB) into %s", url, info["size"] / 2**20, local)
            try:
                fs.get_file(remote, str(temp))
                size = temp.stat().st_size
                if size != info["size"]:
                    raise WeightsCorrupt(f"{url}: fetched {size} bytes, the source has {info['size']}")
                digests = _Digests(temp, check[0] if check else None)
                if check is not None and not digests.matches(*check[:2]):
                    raise WeightsCorrupt(f"{url}: the fetched file does not match its {check[2]} ({check[1]})")
                os.replace(temp, local)  # whole and verified, or not there at all
            finally:
                temp.unlink(missing_ok=True)
            _write_json(stamp, {"source": source, "sha256": digests.sha256.hexdigest(), "local": _stat_stamp(local),
                                "checked": check[2] if check else "size only"})
        return local


def _source_identity(info: dict) -> dict[str, Any]:
    """What tells a remote file's versions apart: size and whatever version marks the filesystem gives."""
    keys = ("size", "ETag", "etag", "VersionId", "LastModified", "mtime", "last_modified", "created", "md5Hash",
            "generation")
    return {k: str(info[k]) for k in keys if info.get(k) is not None}


def _expected_digest(fs, remote: str, info: dict) -> tuple[str, str, str] | None:
    """(kind, value, where it comes from) of the strongest digest the source gives for ``remote``."""
    sidecar = remote + SIDECAR_SUFFIX
    try:
        text = fs.cat_file(sidecar).decode().split()
    except (FileNotFoundError, UnicodeDecodeError):
        text = []
    if text and _SHA256_HEX.match(text[0].lower()):
        return "sha256", text[0].lower(), f"sidecar {fs.unstrip_protocol(sidecar)}"
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"s3", "s3a"}:
        return None
    bucket, key, _ = fs.split_path(remote)
    head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    full_object = head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    sha256 = head.get("ChecksumSHA256")
    if sha256 and full_object and "-" not in sha256:
        return "sha256-base64", sha256, "S3 ChecksumSHA256"
    etag = _MD5_ETAG.match(head.get("ETag", ""))
    if etag and head.get("ServerSideEncryption") in (None, "AES256") and not head.get("SSECustomerAlgorithm"):
        return "md5", etag.group(1), "S3 ETag (MD5)"
    crc32 = head.get("ChecksumCRC32")
    if crc32 and full_object and "-" not in crc32:
        return "crc32-base64", crc32, "S3 ChecksumCRC32"
    return None
