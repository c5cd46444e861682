"""The driver's watch over a running render: progress from the run's ledger, a stall watchdog, and
SIGINT/SIGTERM turned into a clean stop."""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray

from ..config.job import RenderJob
from ..config.stages import STAGES

if TYPE_CHECKING:
    from .render import RenderSummary

log = logging.getLogger(__name__)


class StallError(RuntimeError):
    """No progress for the job's stall timeout: the reason is in the message."""


class Watchdog:
    """Interrupts the driver when nothing has moved for `timeout` seconds (no actor started, no model
    call, no row out), with the reason `explain()` gives."""

    def __init__(self, timeout: float, explain: Callable[[], str]):
        self.timeout, self.explain = timeout, explain
        self.last = time.monotonic()
        self.reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def moved(self) -> None:
        self.last = time.monotonic()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.reason = f"no progress for {self.timeout:g} s: {self.explain()}"
                _thread.interrupt_main()
                return


class Signals:
    """SIGINT and SIGTERM end the run cleanly: both become KeyboardInterrupt in the driver (which
    flushes its results and records the run as interrupted). Installed only in the main thread."""

    def __init__(self):
        self.received: int | None = None
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received = signum
        raise KeyboardInterrupt


class Monitor:
    """The driver's view of a running render, refreshed every `interval` s from the run's ledger:
    progress for the user, and the stall watchdog (anything that moves counts as progress)."""

    def __init__(self, job: RenderJob, ledger, summary: RenderSummary, progress, interval: float = 2.0):
        self.job, self.ledger, self.summary, self.progress = job, ledger, summary, progress
        self.interval = interval
        self.watchdog = Watchdog(job.stall_timeout_s, self.explain)
        self.report: dict = {}
        self._seen = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.watchdog.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.watchdog.__exit__(*exc)

    def rows_out(self) -> None:
        self.watchdog.moved()

    def refresh(self, timeout: float = 10.0) -> dict:
        try:
            self.report = ray.get(self.ledger.report.remote(), timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.warning("the run's ledger did not answer (%s): progress figures are incomplete", err)
        return self.report

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            report = self.refresh()
            state = (report.get("model_calls"), report.get("planned"),
                     {s: len(a) for s, a in report.get("actors", {}).items()})
            if state != self._seen:
                self._seen = state
                self.watchdog.moved()
            if self.progress is not None:
                self.progress(self.summary, report)

    def explain(self) -> str:
        actors = self.report.get("actors", {})
        pools = []
        for name, deployment in self.job.deployment.actor_pools().items():
            # A fused actor is up when its last stage has registered.
            started = len(actors.get(name if name in STAGES else STAGES[-1], []))
            if started < deployment.actors:
                pools.append(f"{name} {started} of {deployment.actors} actors up (each needs "
                             f"{deployment.gpus:g} GPU, {deployment.cpus:g} CPU)")
        free = ray.available_resources()
        where = "; ".join(pools) if pools else "every pool is up but no row finished"
        return (f"{where}; free in the cluster: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU "
                "(a lost node, or a pool that does not fit?)")
