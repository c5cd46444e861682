"""Conditional operations on a lease object, one store per kind of filesystem (see :mod:`kvray.io.lease`).

A version is whatever the store compares: S3's ETag, elsewhere a digest of the content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .atomic import write_atomic
from .opening import S3_PROTOCOLS, protocols, uri_of

log = logging.getLogger(__name__)


class Conflict(Exception):
    """A conditional write or delete found another version than expected."""


class LeaseStore:
    """Conditional operations on one lease object."""

    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> str:
        """Writes ``data`` if there is no lease; FileExistsError if there is. Returns the new version."""
        raise NotImplementedError

    def read(self) -> tuple[bytes, str]:
        """The lease's bytes and version; FileNotFoundError if there is none."""
        raise NotImplementedError

    def replace(self, data: bytes, version: str) -> str:
        """Writes ``data`` if the lease is still at ``version``, else Conflict. Returns the new version."""
        raise NotImplementedError

    def delete(self, version: str) -> None:
        """Removes the lease if it is still at ``version``, else Conflict; nothing if it is gone."""
        raise NotImplementedError


def lease_store(fs: AbstractFileSystem, path: str) -> LeaseStore:
    """The store for the lease at ``path`` on ``fs``: the strongest conditional operations ``fs`` has."""
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, fs._strip_protocol(path))
    if protocols(fs) & S3_PROTOCOLS:
        return _S3Store(fs, path)
    return _ProcessLockedStore(fs, path)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[bool]:
    """Holds an flock on the file at ``path`` itself, so that no lock file is left next to it; yields False
    when there is no file. Holders replace or remove the file, so a waiter can get the lock on a file that
    is no longer at ``path``: it opens the name again. (A separate lock file could not be removed on release:
    a waiter holding it open would lock a removed file while a newcomer locks a new one.)"""
    while True:
        try:
            fd = os.open(path, os.O_RDWR)  # NFS emulates flock with POSIX locks, which need a writable file
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_at(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)  # and with it the lock


def _still_at(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# A creator's file lives for a moment outside the lease's lock: one older than this is a killed creator's.
STALE_CREATE_S = 60.0


class _LocalStore(LeaseStore):
    """Create by link() (atomic, also on NFS); replace and delete compare the content under an flock."""

    def create(self, data):
        directory, name = os.path.split(self.path)
        os.makedirs(directory, exist_ok=True)
        # `.new`, not write_atomic's `.tmp`: `_remove_leftovers` tells a creator's file from a replacer's.
        temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.new")
        with open(temp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temp, self.path)  # atomic, and the lease appears complete
        finally:
            os.unlink(temp)
        with _locked(self.path):
            self._remove_leftovers(directory, name)
        return _digest(data)

    @staticmethod
    def _remove_leftovers(directory: str, name: str) -> None:
        """The temporary files of earlier holders killed mid-write (SIGKILL skips their clean-up), removed by
        the new holder under the lease's lock. A replace writes its file only under that lock, after finding
        its own version, which no earlier holder still has: every such file is a dead writer's."""
        now = time.time()
        for entry in os.scandir(directory):
            if not entry.name.startswith(f".{name}."):
                continue
            # A live creator that lost the race removes its own file at any moment, also between the listing
            # and the stat: a file gone is a file not to remove (on a busy machine this window was hit).
            with contextlib.suppress(FileNotFoundError):
                if entry.name.endswith(".tmp") or (
                        entry.name.endswith(".new") and now - entry.stat().st_mtime > STALE_CREATE_S):
                    os.unlink(entry.path)

    def read(self):
        with open(self.path, "rb") as fh:
            data = fh.read()
        return data, _digest(data)

    def replace(self, data, version):
        with _locked(self.path) as present:
            if not present or self.read()[1] != version:
                raise Conflict
            write_atomic(self.fs, self.path, data)
        return _digest(data)

    def delete(self, version):
        with _locked(self.path) as present:
            if not present:
                return
            if self.read()[1] != version:
                raise Conflict
            os.unlink(self.path)


class _S3Store(LeaseStore):
    def create(self, data):
        response = self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: * -> FileExistsError
        return response["ETag"]

    def read(self):
        from s3fs.utils import FileExpired

        for attempt in range(3):
            self.fs.invalidate_cache(self.path)
            # An S3File reads with If-Match on the ETag it found: content and version belong together.
            try:
                with self.fs.open(self.path, "rb", cache_type="none") as fh:
                    return fh.read(), fh.details["ETag"]
            except FileExpired:  # replaced between the HEAD and the GET: read the new one
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def replace(self, data, version):
        try:
            response = self.fs.pipe_file(self.path, data, IfMatch=version)
        except FileNotFoundError:
            raise Conflict from None
        except OSError as err:
            if _precondition_failed(err):
                raise Conflict from None
            raise
        return response["ETag"]

    def delete(self, version):
        bucket, key, _ = self.fs.split_path(self.path)
        self.fs.invalidate_cache(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return
        except OSError as err:
            if _precondition_failed(err):
                raise Conflict from None
            raise


def _precondition_failed(err: OSError) -> bool:
    """S3's 412 PreconditionFailed, or 409 ConditionalRequestConflict (a concurrent conditional write)."""
    cause = err.__cause__ or err.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


_PROCESS_LOCK = threading.Lock()


class _ProcessLockedStore(LeaseStore):
    """Filesystems without conditional writes: exact within this process (memory://), best effort across."""

    def __init__(self, fs, path):
        super().__init__(fs, path)
        log.warning("the lease on %s is checked within this process only: two drivers racing for it on this "
                    "filesystem might both start", uri_of(fs, path))

    def create(self, data):
        with _PROCESS_LOCK:
            if self.fs.exists(self.path):
                raise FileExistsError(self.path)
            write_atomic(self.fs, self.path, data)
        return _digest(data)

    def read(self):
        data = self.fs.cat_file(self.path)
        return data, _digest(data)

    def replace(self, data, version):
        with _PROCESS_LOCK:
            try:
                if self.read()[1] != version:
                    raise Conflict
            except FileNotFoundError:
                raise Conflict from None
            write_atomic(self.fs, self.path, data)
        return _digest(data)

    def delete(self, version):
        with _PROCESS_LOCK:
            try:
                if self.read()[1] != version:
                    raise Conflict
            except FileNotFoundError:
                return
            self.fs.rm_file(self.path)
