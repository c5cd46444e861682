"""One run per output prefix: the lease, on local disk and on S3 (moto), without Ray."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time

import pytest

from kvray.bench.fault_proxy import FaultyProxy
from kvray.io.lease import LEASE_NAME, Lease, LeaseHeld, LeaseLost, read_lease
from kvray.io.opening import open_fs

from .s3 import _ENV


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path):
    """(fs, root, storage options) of an empty output prefix."""
    if request.param == "local":
        fs, root = open_fs(str(tmp_path / "out"))
        return fs, root, {}
    bucket = request.getfixturevalue("s3_bucket")
    fs, root = open_fs(f"{bucket.uri}/out", bucket.storage_options)
    return fs, root, bucket.storage_options


def _on_disk(fs, root) -> dict:
    return json.loads(fs.cat_file(f"{root}/{LEASE_NAME}"))


def test_acquire_renew_release(prefix):
    fs, root, _ = prefix
    lease = Lease.acquire(fs, root, "run-a", ttl_s=30)
    record = _on_disk(fs, root)
    assert (record["run_id"], record["host"], record["pid"]) == ("run-a", socket.gethostname(), os.getpid())
    assert record["expires_at_utc"].endswith("Z") and record["ttl_s"] == 30
    time.sleep(0.01)
    lease.renew()
    assert _on_disk(fs, root)["renewed_at"] > record["renewed_at"]
    assert _on_disk(fs, root)["token"] == record["token"]
    lease.release()
    assert not fs.exists(f"{root}/{LEASE_NAME}") and read_lease(fs, root) is None
    lease.release()  # twice is harmless
    with pytest.raises(LeaseLost, match="released"):
        lease.renew()
    with Lease.acquire(fs, root, "run-b") as again:  # free again
        assert read_lease(fs, root) == again.record
    assert read_lease(fs, root) is None
    assert fs.find(root) == [], "a released lease leaves nothing in the prefix (no lock file either)"


def test_the_next_holder_removes_what_killed_writers_left(tmp_path):
    """SIGKILL skips a writer's clean-up: a renewal killed between its write and its rename leaves its
    temporary file, a creator killed before its link leaves its own. The next holder removes them (a
    creator's only when it is old: a live one's exists for a moment)."""
    from kvray.io.lease_stores import STALE_CREATE_S

    fs, root = open_fs(str(tmp_path / "out"))
    os.makedirs(root)
    renewal = tmp_path / "out" / f".{LEASE_NAME}.0123456789ab.tmp"
    old_creation, new_creation = (tmp_path / "out" / f".{LEASE_NAME}.{tag}.new" for tag in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"))
    for leftover in (renewal, old_creation, new_creation):
        leftover.write_bytes(b"{}")
    past = time.time() - STALE_CREATE_S - 1
    os.utime(old_creation, (past, past))
    with Lease.acquire(fs, root, "run-a"):
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([LEASE_NAME, new_creation.name])


def test_a_creators_file_gone_between_the_listing_and_its_stat_is_no_error(tmp_path, monkeypatch):
    """A racer that lost removes its `.new` file while the winner lists the directory for leftovers: the
    winner's acquire must not fail on the file's disappearance (seen under load: a racer's FileNotFoundError
    from `stat`)."""
    from kvray.io import lease_stores

    fs, root = open_fs(str(tmp_path / "out"))
    os.makedirs(root)
    vanishing = tmp_path / "out" / f".{LEASE_NAME}.cccccccccccc.new"
    vanishing.write_bytes(b"{}")
    listed = list(os.scandir(root))  # the listing sees it ...
    vanishing.unlink()  # ... then its creator removes it, before the stat
    scandir = os.scandir
    monkeypatch.setattr(lease_stores.os, "scandir", lambda directory: iter(listed) if os.path.abspath(directory) ==
                        os.path.abspath(root) else scandir(directory))
    with Lease.acquire(fs, root, "run-a"):
        assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".lock")) == [LEASE_NAME]


def test_a_second_run_is_refused_naming_the_holder(prefix):
    fs, root, _ = prefix
    held = Lease.acquire(fs, root, "run-a", ttl_s=60)
    with pytest.raises(LeaseHeld) as refused:
        Lease.acquire(fs, root, "run-b")
    message = str(refused.value)
    assert "in use by run run-a" in message and f"host {socket.gethostname()}" in message
    assert f"pid {os.getpid()}" in message and "expires at 20" in message
    assert refused.value.holder == held.record
    assert _on_disk(fs, root)["run_id"] == "run-a"  # untouched


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew(prefix, caplog):
    fs, root, _ = prefix
    dead = Lease.acquire(fs, root, "killed-driver", ttl_s=0.3)
    time.sleep(0.4)  # never renewed: its driver was killed
    taker = Lease.acquire(fs, root, "run-b", ttl_s=30)
    assert "took over the lease of run killed-driver" in caplog.text
    assert _on_disk(fs, root)["run_id"] == "run-b"
    with pytest.raises(LeaseLost, match="taken over by run run-b"):
        dead.renew()  # a driver that was only paused finds out, and must stop
    dead.release()  # leaves the new holder's lease alone
    assert read_lease(fs, root) == taker.record
    # A live lease is taken only when asked (its holder known to be dead).
    forced = Lease.acquire(fs, root, "run-c", take_over=True)
    with pytest.raises(LeaseLost, match="run-c"):
        taker.renew()
    forced.release()


def test_waiting_for_a_lease_to_be_released(prefix):
    fs, root, _ = prefix
    held = Lease.acquire(fs, root, "run-a", ttl_s=30)
    threading.Timer(0.3, held.release).start()
    start = time.monotonic()
    with pytest.raises(LeaseHeld):
        Lease.acquire(fs, root, "run-b", wait_s=0.1)
    waited = Lease.acquire(fs, root, "run-b", wait_s=20)
    assert 0.2 < time.monotonic() - start < 15 and read_lease(fs, root) == waited.record


def test_the_renewer_keeps_the_lease_and_reports_its_loss(prefix):
    fs, root, _ = prefix
    lease = Lease.acquire(fs, root, "run-a", ttl_s=0.6)
    lost = []
    with lease.renewer(on_lost=lost.append) as renewer:
        time.sleep(1.0)  # longer than the TTL: only renewals keep it
        with pytest.raises(LeaseHeld):
            Lease.acquire(fs, root, "run-b")
        assert renewer.renewals >= 2 and renewer.lost is None
        renewer.check()
        Lease.acquire(fs, root, "run-b", ttl_s=30, take_over=True)
        deadline = time.monotonic() + 5
        while renewer.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(lost) == 1 and "taken over by run run-b" in str(lost[0])
    with pytest.raises(LeaseLost):
        renewer.check()


def test_answers_lost_after_the_write_landed(s3_bucket):
    """Every other PUT reaches S3 and then its connection is reset: botocore's retry meets a lease that
    is already there or changed (412), which is this run's own write."""
    with FaultyProxy(s3_bucket.endpoint_url, fault="reset", after_upstream=True, methods=("PUT",), every=2) as proxy:
        fs, root = open_fs(f"{s3_bucket.uri}/out", {**s3_bucket.storage_options, "client_kwargs": {"endpoint_url": proxy.url}})
        lease = Lease.acquire(fs, root, "run-a")
        lease.renew()
        lease.release()
    assert proxy.faulted["PUT"] >= 2 and read_lease(fs, root) is None


# -------------------------------------------------------------------------------------- races


def _racer(uri, options, env, barrier, rounds, results):
    os.environ.update(env)
    from kvray.io.lease import Lease, LeaseHeld
    from kvray.io.opening import open_fs

    fs, root = open_fs(uri, options)
    for round_ in range(rounds):
        barrier.wait(timeout=60)
        try:
            Lease.acquire(fs, f"{root}/round-{round_}", f"racer-{os.getpid()}")
            results.put((round_, 1))
        except LeaseHeld:
            results.put((round_, 0))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_processes_exactly_one_wins(where, tmp_path, request):
    if where == "local":
        uri, options = str(tmp_path / "out"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_serial_endpoint")  # see its docstring: moto's race, not ours
        uri, options = f"{bucket.uri}/out", {**bucket.storage_options, "client_kwargs": {"endpoint_url": endpoint}}
    processes, rounds = 4, 5
    context = multiprocessing.get_context("spawn")  # no fork of s3fs's event-loop thread
    barrier, results = context.Barrier(processes), context.Queue()
    racers = [context.Process(target=_racer, args=(uri, options, _ENV, barrier, rounds, results))
              for _ in range(processes)]
    for racer in racers:
        racer.start()
    wins = [0] * rounds
    for _ in range(processes * rounds):
        round_, won = results.get(timeout=120)
        wins[round_] += won
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    assert wins == [1] * rounds
