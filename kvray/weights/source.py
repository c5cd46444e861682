"""Where weights come from: a local directory, a Hugging Face repo id, or an fsspec URL."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import fsspec
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsNotFound(FileNotFoundError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVRAY_CACHE", Path.home() / ".cache" / "kvray"))


class WeightsSource:
    """Resolves file names of one source to local paths, fetching and caching remote files once.

    - a path that exists locally (or `file://...`): used in place;
    - `scheme://...` (s3://, gs://, memory://, ...): copied into the cache through fsspec;
    - `owner/name`: a Hugging Face repo, through `hf_hub_download` (honours HF_HUB_OFFLINE and the cache dir).
    """

    def __init__(self, uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 storage_options: dict | None = None, revision: str | None = None):
        self.uri = str(uri)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
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

    def exists(self, filename: str) -> bool:
        if self.kind == "local":
            return (Path(self.root) / filename).is_file()
        if self.kind == "fsspec":
            fs, path = fsspec.core.url_to_fs(f"{self.root}/{filename}", **self.storage_options)
            return fs.isfile(path)
        try:
            self.path(filename)
            return True
        except WeightsNotFound:
            return False

    def path(self, filename: str) -> Path:
        """A local path holding `filename` of this source."""
        if self.kind == "local":
            path = Path(self.root) / filename
            if not path.is_file():
                raise WeightsNotFound(f"{filename} not found in {self.root}")
            return path
        if self.kind == "fsspec":
            return self._fetch_fsspec(filename)
        try:
            return Path(hf_hub_download(self.root, filename, revision=self.revision, cache_dir=self.cache_dir / "hub"))
        except (EntryNotFoundError, LocalEntryNotFoundError) as err:
            raise WeightsNotFound(f"{filename} not found in the Hugging Face repo {self.root}: {err}") from err

    def _fetch_fsspec(self, filename: str) -> Path:
        url = f"{self.root}/{filename}"
        fs, remote = fsspec.core.url_to_fs(url, **self.storage_options)
        if not fs.isfile(remote):
            raise WeightsNotFound(f"{url} not found")
        local = self.cache_dir / "fsspec" / hashlib.sha256(self.root.encode()).hexdigest()[:16] / filename
        size = fs.size(remote)
        if local.is_file() and local.stat().st_size == size:
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        log.info("fetching %s (%.1f MB) into %s", url, size / 2**20, local)
        fs.get_file(remote, str(partial))
        partial.replace(local)  # whole or not at all
        return local
