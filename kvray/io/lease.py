"""One run per output prefix: a lease object, ``{root}/lease.json``, that a run holds while it writes there.

    lease = Lease.acquire(fs, root, run_id)        # LeaseHeld when another live run holds the prefix
    with lease.renewer() as renewer:               # renews every ttl/3 in a thread
        ...                                        # renewer.check() between batches: LeaseLost if taken
    lease.release()

The lease names its holder (run id, host, pid, token) and when it was last renewed; a lease that has not
been renewed for longer than its ``ttl_s`` belongs to a dead run (a killed driver, a lost node) and the
next run takes it over. Every change is conditional (:mod:`kvray.io.lease_stores`), so that two runs racing
for a prefix cannot both win:

- S3: create with ``If-None-Match: *`` (``pipe_file(mode="create")``), renew and take over with
  ``If-Match: <ETag>``, release with a conditional DELETE (``If-Match``);
- local disk: create by ``link()``-ing a complete temporary file to the lease's name (fails if the name
  exists, also on NFS); renew, take over and release compare the content under an flock of the lease file
  itself (no lock file is left behind);
- any other filesystem: the same checks under a lock of this process only (exact for ``memory://``,
  best effort elsewhere, logged as such).

Expiry compares the holder's ``renewed_at`` with this host's clock: hosts sharing a prefix need clocks
within a small fraction of the TTL of each other (NTP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Self

from fsspec import AbstractFileSystem

from .atomic import dumps_json
from .failures import storage_errors
from .lease_stores import Conflict, LeaseStore, lease_store
from .names import safe_join
from .opening import uri_of

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
DEFAULT_TTL_S = 120.0
WAIT_POLL_S = 1.0  # how often a run waiting for a lease looks whether it was released


class LeaseHeld(RuntimeError):
    """The prefix is held by another run whose lease has not expired; `holder` is its record."""

    def __init__(self, uri: str, holder: LeaseRecord | None, message: str | None = None):
        self.uri, self.holder = uri, holder
        if message is None:
            message = (f"{uri} is in use by run {holder.run_id} (host {holder.host}, pid {holder.pid}); its lease "
                       f"was renewed at {_iso(holder.renewed_at)} and expires at {_iso(holder.expires_at)} unless "
                       "renewed: wait for that run to end, or, if it is dead, for its lease to expire (or take it over)")
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.uri, self.holder, str(self))


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or removed) by another run: it must stop writing to the prefix."""


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    token: str  # unique per acquisition: tells this holder's own writes apart from anyone else's
    started_at: float
    renewed_at: float
    ttl_s: float

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def expired(self, now: float) -> bool:
        return now > self.expires_at

    def as_dict(self) -> dict[str, Any]:
        """The record as stored (and for run.json): the fields, and its times as UTC text as well."""
        data = dataclasses.asdict(self)
        data.update({f"{k}_utc": _iso(getattr(self, k)) for k in ("started_at", "renewed_at", "expires_at")})
        return data

    def to_bytes(self) -> bytes:
        return dumps_json(self.as_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """The record in ``data``; ValueError when it is not one."""
        try:
            raw = json.loads(data)
            return cls(run_id=str(raw["run_id"]), host=str(raw["host"]), pid=int(raw["pid"]), token=str(raw["token"]),
                       started_at=float(raw["started_at"]), renewed_at=float(raw["renewed_at"]),
                       ttl_s=float(raw["ttl_s"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"not a lease record: {err}") from None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------- the lease


class Lease:
    """A held lease on one output prefix. Make one with :meth:`acquire`."""

    def __init__(self, store: LeaseStore, record: LeaseRecord, version: str, clock: Callable[[], float]):
        self._store, self.record, self._version, self._clock = store, record, version, clock
        self._lock = threading.Lock()  # renew (renewer thread) and release (driver) never interleave
        self.released = False

    @property
    def uri(self) -> str:
        return uri_of(self._store.fs, self._store.path)

    @property
    def expires_at(self) -> float:
        return self.record.expires_at

    def __repr__(self) -> str:
        return f"Lease({self.uri!r}, run {self.record.run_id}, expires {_iso(self.expires_at)})"

    @classmethod
    def acquire(cls, fs: AbstractFileSystem, root: str, run_id: str, *, ttl_s: float = DEFAULT_TTL_S,
                take_over: bool = False, wait_s: float = 0.0, clock: Callable[[], float] = time.time) -> Lease:
        """The lease on ``root`` for ``run_id``; :class:`LeaseHeld` naming the holder when another run holds it.

        A lease not renewed for longer than its own TTL is taken over (logged, naming the run it belonged
        to). ``take_over=True`` takes a live one too: for a holder known to be dead, its TTL not yet run out.
        ``wait_s``: how long to wait for a held lease to be released or to expire before giving up.
        Storage failures raise :class:`~kvray.io.failures.StorageError`.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        store = lease_store(fs, safe_join(root, LEASE_NAME))
        now = clock()
        record = LeaseRecord(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                             started_at=now, renewed_at=now, ttl_s=float(ttl_s))
        deadline = time.monotonic() + wait_s
        uri = uri_of(fs, store.path)
        with storage_errors(fs, store.path):
            while True:
                try:
                    return cls(store, record, store.create(record.to_bytes()), clock)
                except FileExistsError:
                    pass
                try:
                    data, version = store.read()
                except FileNotFoundError:
                    continue  # released in between
                try:
                    holder = LeaseRecord.from_bytes(data)
                except ValueError as err:
                    log.warning("%s is not a lease (%s): taking it over", uri, err)
                    holder = None
                if holder is not None and holder.token == record.token:
                    # Our create reached the store but its answer was lost, and its retry found our lease.
                    return cls(store, record, version, clock)
                if holder is None or take_over or holder.expired(clock()):
                    fresh = dataclasses.replace(record, started_at=clock(), renewed_at=clock())
                    try:
                        version = store.replace(fresh.to_bytes(), version)
                    except Conflict:
                        continue  # someone else changed it first: look again
                    if holder is not None:
                        why = "as asked" if take_over and not holder.expired(clock()) else (
                            f"not renewed since {_iso(holder.renewed_at)}, TTL {holder.ttl_s:g} s")
                        log.warning("%s: took over the lease of run %s (host %s, pid %s): %s", uri, holder.run_id,
                                    holder.host, holder.pid, why)
                    return cls(store, fresh, version, clock)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LeaseHeld(uri, holder)
                # Until it expires, or is released (looked at every WAIT_POLL_S), within the wait.
                time.sleep(max(0.05, min(left, holder.expires_at - clock() + 0.05, WAIT_POLL_S)))

    def renew(self) -> None:
        """Extends the lease by its TTL from now; :class:`LeaseLost` if another run holds it now."""
        with self._lock:
            if self.released:
                raise LeaseLost(f"{self.uri}: the lease of run {self.record.run_id} was released")
            renewed = dataclasses.replace(self.record, renewed_at=self._clock())
            with storage_errors(self._store.fs, self._store.path):
                try:
                    self._version = self._store.replace(renewed.to_bytes(), self._version)
                except Conflict:
                    self._version = self._adopt_own_write()
            self.record = renewed

    def _adopt_own_write(self) -> str:
        """After a conflict: the version of the lease if it is still ours (a write of ours that landed
        while its answer was lost), else LeaseLost naming who holds it now."""
        try:
            data, version = self._store.read()
        except FileNotFoundError:
            raise LeaseLost(f"{self.uri}: the lease of run {self.record.run_id} was removed by someone else") from None
        try:
            holder = LeaseRecord.from_bytes(data)
        except ValueError:
            holder = None
        if holder is not None and holder.token == self.record.token:
            return version
        who = f"run {holder.run_id} (host {holder.host}, pid {holder.pid})" if holder else "something that is not a lease"
        raise LeaseLost(f"{self.uri}: the lease of run {self.record.run_id} was taken over by {who}")

    def release(self) -> None:
        """Removes the lease if this run still holds it (a lease taken over is left to its new holder).
        Releasing twice is harmless."""
        with self._lock:
            if self.released:
                return
            with storage_errors(self._store.fs, self._store.path):
                try:
                    self._store.delete(self._version)
                except Conflict:
                    try:
                        self._store.delete(self._adopt_own_write())
                    except (LeaseLost, Conflict) as err:
                        log.warning("not releasing %s: %s", self.uri, err)
            self.released = True

    def renewer(self, interval_s: float | None = None,
                on_lost: Callable[[LeaseLost], None] | None = None) -> LeaseRenewer:
        """A background renewer for this lease (started by ``with`` or :meth:`LeaseRenewer.start`)."""
        return LeaseRenewer(self, interval_s=interval_s, on_lost=on_lost)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LeaseRenewer:
    """Renews a lease every ``interval_s`` (default: a third of its TTL) in a daemon thread.

    A failed renewal (storage down) is logged, kept in ``failures`` and tried again at the next tick;
    once the lease has expired without a successful renewal, or another run has taken it, ``lost`` is
    set (a LeaseLost), ``on_lost`` is called once and the thread ends. The driver calls :meth:`check`
    between units of work, which raises ``lost``. ``stop()`` ends the thread (it does not release).
    """

    def __init__(self, lease: Lease, interval_s: float | None = None,
                 on_lost: Callable[[LeaseLost], None] | None = None):
        self.lease = lease
        self.interval_s = interval_s if interval_s is not None else lease.record.ttl_s / 3
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {self.interval_s}")
        self.on_lost = on_lost
        self.lost: LeaseLost | None = None
        self.failures: list[str] = []
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-renewer-{lease.record.run_id}", daemon=True)

    def start(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def check(self) -> None:
        """Raises LeaseLost if the lease is lost."""
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.lease.renew()
                self.renewals += 1
                continue
            except LeaseLost as err:
                lost = err
            except Exception as err:  # noqa: BLE001 - a renewer never dies silently: recorded, tried again
                self.failures.append(str(err))
                log.warning("renewing %s failed (tried again in %.0f s): %s", self.lease.uri, self.interval_s, err)
                if not self.lease.record.expired(self.lease._clock()):
                    continue
                lost = LeaseLost(f"{self.lease.uri}: the lease of run {self.lease.record.run_id} expired at "
                                 f"{_iso(self.lease.expires_at)}: renewing it failed since ({err})")
            self.lost = lost
            log.error("%s", lost)
            if self.on_lost is not None:
                self.on_lost(lost)
            return


def read_lease(fs: AbstractFileSystem, root: str) -> LeaseRecord | None:
    """The lease on ``root`` now (None when there is none, or it is not a lease): for status displays."""
    path = safe_join(root, LEASE_NAME)
    with storage_errors(fs, path):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
    try:
        return LeaseRecord.from_bytes(data)
    except ValueError:
        return None
