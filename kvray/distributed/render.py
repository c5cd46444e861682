"""The render job: a manifest streamed through the stage pools into videos, metadata and results.

    manifest parts -> planning tasks -> [pending rows] -> text -> keyframes -> interpolate -> decode
                                  \\-> skipped / error rows -> results
    finished rows -> the driver -> results/{run}/*.parquet, runs/{run}.json, run.json

Before anything streams, the driver makes one pass over the manifest's ids (`scan_ids`: ids given to
several rows, identical rows without ids) and one listing of the done videos (`done_video_ids`); both
are shared with the planning tasks, and rows flow into the pools as soon as they are planned. The
driver holds no row longer than it takes to buffer a results file, so its memory stays flat whatever
the manifest's size.

Every run is recorded (`runs/{run_id}.json`, the latest also as `run.json`): running, then finished,
failed or interrupted, with its counts, the first error rows, timings and plan. A render that cannot
make progress for `stall_timeout_s` stops with the reason instead of waiting forever.
"""

from __future__ import annotations

import _thread
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import ray

from ..config.job import RenderJob
from ..config.stages import STAGES
from ..io.dataset_card import dataset_counts, write_dataset_card
from ..io.layout import done_keys, latest_run_path, remove_temporaries, results_dir, run_record_path
from ..io.lease import Lease, read_lease
from ..io.manifest import Manifest, open_manifest
from ..io.shards import remove_orphans
from ..io.storage import open_fs, read_json, redact_job, redact_url, write_atomic, write_json
from .cluster import check_resources, connect, on_this_node
from .plan import PlanInputs, planned_dataset, scan_manifest
from .planner import plan_job, plan_summary
from .pools import PoolOptions, block_bytes, execution_context, model_stages, queued_calls
from .rows import ERROR, FILTERED, OK, SKIPPED, RunLedger, results_table

log = logging.getLogger(__name__)

FINISHED, FAILED, INTERRUPTED = "finished", "failed", "interrupted"
FIRST_ERRORS = 5


class StallError(RuntimeError):
    """No progress for the job's stall timeout: the reason is in the message."""


@dataclass
class RenderSummary:
    run_id: str
    out: str
    status: str = "running"
    rows: int = 0  # manifest rows
    ok: int = 0
    error: int = 0
    skipped: int = 0
    filtered: int = 0
    repeats: int = 0  # identical rows without ids, folded into their first occurrence
    seconds: float = 0.0  # rendering wall time, from the first planned row to the last result
    startup_seconds: float = 0.0  # Ray start (or join), the id pass, the done listing, planning the pools
    busy_seconds: dict[str, float] = field(default_factory=dict)  # per stage, summed over rows
    stages: dict = field(default_factory=dict)  # the ledger's report: actors (GPU ids), model calls
    results: list[str] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    reason: str = ""  # why a run failed or stopped
    prompts: str = ""  # duplicates among the prompts, after normalisation

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped + self.filtered + self.repeats

    @property
    def videos_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 finished clean, 1 finished with error rows, 2 failed, 130 interrupted."""
        if self.status == FINISHED:
            return 1 if self.error else 0
        return 130 if self.status == INTERRUPTED else 2

    def lines(self) -> list[str]:
        out = [f"{self.status}: {self.out} (run {self.run_id})",
               f"rows {self.rows}: ok {self.ok}, error {self.error}, skipped {self.skipped}"
               + (f", filtered {self.filtered}" if self.filtered else "")
               + (f", identical to an earlier row {self.repeats}" if self.repeats else ""),
               f"start-up {self.startup_seconds:.1f} s; rendering {self.seconds:.1f} s, "
               f"{self.videos_per_second:.3f} videos/s"]
        for stage in STAGES:
            actors = self.stages.get("actors", {}).get(stage, [])
            gpus = ",".join(g for a in actors for g in a["gpu_ids"]) or "-"
            out.append(f"  {stage:<12} busy {self.busy_seconds.get(stage, 0.0):8.2f} s, {len(actors)} actor(s), GPUs {gpus}")
        if self.prompts:
            out.append(self.prompts)
        if self.first_errors:
            out.append(f"first error rows (all in {self.out}/results/{self.run_id}/):")
            out.extend(f"  {e}" for e in self.first_errors)
        if self.reason:
            out.append(f"reason: {self.reason}")
        return out

    def record(self) -> dict:
        return {"rows": self.rows, "ok": self.ok, "error": self.error, "skipped": self.skipped,
                "filtered": self.filtered, "repeats": self.repeats,
                "startup_seconds": round(self.startup_seconds, 3), "render_seconds": round(self.seconds, 3),
                "videos_per_second": self.videos_per_second, "busy_seconds": self.busy_seconds,
                "stages": self.stages, "results": self.results, "first_errors": self.first_errors,
                "prompts": self.prompts}


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across drivers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class RunRecord:
    """runs/{run_id}.json and run.json, rewritten whole at every change of the run's state."""

    def __init__(self, fs, root: str, run_id: str, job: RenderJob, manifest: Manifest):
        self.fs, self.root, self.run_id = fs, root, run_id
        # Nothing recorded carries a secret: storage options, passwords or signatures in URIs.
        self.data = {"run_id": run_id, "status": "running", "started_at": _now(),
                     "job": redact_job(job.model_dump(mode="json")),
                     "manifest_files": [redact_url(uri) for uri in manifest.file_uris()], "manifest_rows": manifest.rows}

    def update(self, **fields) -> None:
        self.data.update(fields)
        write_json(self.fs, run_record_path(self.root, self.run_id), self.data)
        write_json(self.fs, latest_run_path(self.root), {**self.data, "latest": self.run_id})


class ResultsWriter:
    """The rows that come out of the pools, into results/{run}/done-NNNNN.parquet: a file every
    `rows_per_file` rows or `flush_seconds`, so a killed driver loses at most that much of its report
    (never an output: a video's commit record is its metadata)."""

    def __init__(self, fs, root: str, run_id: str, rows_per_file: int, flush_seconds: float = 60.0):
        self.fs, self.folder = fs, results_dir(root, run_id)
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.buffer: list[pd.DataFrame] = []
        self.buffered = 0
        self.written: list[str] = []
        self.last_flush = time.monotonic()

    def add(self, batch: pd.DataFrame) -> None:
        self.buffer.append(batch.drop(columns=["payload", "request", "placement"]))
        self.buffered += len(batch)
        if self.buffered >= self.rows_per_file or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        pq.write_table(results_table(pd.concat(self.buffer)), sink)
        path = f"{self.folder}/done-{len(self.written):05d}.parquet"
        write_atomic(self.fs, path, sink.getvalue().to_pybytes())
        self.written.append(self.fs.unstrip_protocol(path))
        self.buffer, self.buffered = [], 0


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
        for stage in STAGES:
            deployment = self.job.deployment.stage(stage)
            started = len(actors.get(stage, []))
            if started < deployment.actors:
                pools.append(f"{stage} {started} of {deployment.actors} actors up (each needs "
                             f"{deployment.gpus:g} GPU, {deployment.cpus:g} CPU)")
        free = ray.available_resources()
        where = "; ".join(pools) if pools else "every pool is up but no row finished"
        return (f"{where}; free in the cluster: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU "
                "(a lost node, or a pool that does not fit?)")


def _tally(batch: pd.DataFrame, summary: RenderSummary) -> None:
    for status in (OK, ERROR, FILTERED):
        setattr(summary, status, getattr(summary, status) + int((batch["status"] == status).sum()))
    for stage in STAGES:
        summary.busy_seconds[stage] = summary.busy_seconds.get(stage, 0.0) + float(batch[f"seconds_{stage}"].sum())
    errors = batch.loc[batch["status"] == ERROR]
    for row, row_id, error in zip(errors["row"], errors["id"], errors["error"]):
        if len(summary.first_errors) < FIRST_ERRORS:
            summary.first_errors.append(f"row {row} ({row_id}): {error}")


def _planned_rows(fs, root: str, run_id: str, summary: RenderSummary) -> None:
    """The skipped and error rows of the planning tasks, counted from their results files."""
    folder = results_dir(root, run_id)
    if not fs.isdir(folder):
        return
    for path in sorted(p for p in fs.ls(folder, detail=False) if p.rpartition("/")[2].startswith("plan-")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "row", "id", "error"]).to_pandas()
        summary.skipped += int((table["status"] == SKIPPED).sum())
        errors = table.loc[table["status"] == ERROR]
        summary.error += len(errors)
        summary.first_errors.extend(f"row {r} ({i}): {e}" for r, i, e in
                                    zip(errors["row"][:FIRST_ERRORS], errors["id"], errors["error"]))
        summary.results.append(fs.unstrip_protocol(path))
    summary.first_errors = sorted(summary.first_errors, key=_row_of)[:FIRST_ERRORS]


def _row_of(line: str) -> int:
    return int(line.split(" ", 2)[1])


def collapsed_rows(job: RenderJob, scan):
    """The rows `collapse_duplicate_prompts` leaves out, for the planning tasks (None when it is off)."""
    if not job.collapse_duplicate_prompts or not scan.prompts.duplicate_rows:
        return None
    return ray.put((scan.prompts.positions, scan.prompts.firsts))


PROBE_ROWS = 2_000


def _probe(planned, first_batch: int):
    """Plans ahead before any pool starts, until PROBE_ROWS pending rows are found: none, and no pool
    starts (a finished job re-run ends in seconds); a few, the pools get just those, in blocks of the
    first pool's batch (`first_batch`); more, the render streams as usual, planning again from the start
    (its results files are rewritten, not added). Returns (the planned rows or None, their mean bytes)."""
    found, count = [], 0
    for batch in planned.iter_batches(batch_format="pandas", batch_size=None):
        found.append(batch)
        count += len(batch)
        if count > PROBE_ROWS:
            return planned, _mean_bytes(found)
    if not count:
        return None, 0.0
    rows = pd.concat(found)
    return ray.data.from_pandas([rows.iloc[i:i + first_batch] for i in range(0, count, first_batch)]), _mean_bytes(found)


def _mean_bytes(frames: list[pd.DataFrame]) -> float:
    return sum(int(f.memory_usage(index=True, deep=True).sum()) for f in frames) / max(1, sum(map(len, frames)))


def planning_tasks(*, alone: bool = False) -> int:
    """Planning tasks at a time: one per CPU when nothing else runs (the id pass before the pools
    start, a dry run), else half the CPUs, enough to stay ahead of the pools."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(64, cpus) if alone else min(16, cpus // 2))


def render(job: RenderJob, *, limit: int | None = None, verbose: bool = False, take_over: bool = False,
           wait_for_lease_s: float = 0.0, progress: Callable[[RenderSummary, dict], None] | None = None,
           workers: dict[str, type] | None = None, pool_options: PoolOptions | None = None,
           on_rows: Callable[[pd.DataFrame], None] | None = None) -> RenderSummary:
    """Runs the job to the end (or `limit` pending rows); returns its summary whether it finished or was
    interrupted (`status`, `exit_code`). Raises before anything is written if the manifest or the output
    prefix is unusable (`ManifestError`, `LegacyLayout`) or the pools cannot fit the cluster
    (`ResourceError`, the planner's `DoesNotFit`); a run that fails later is recorded as failed, then its error raised.

    One run at a time per output prefix: the run holds its lease (`LeaseHeld` names the run that holds
    it); `wait_for_lease_s` waits that long for it to be released or to expire, `take_over` takes a
    live one (its holder is known to be dead). A run whose lease it takes is recorded as interrupted.

    `progress(summary, ledger_report)` is called every few seconds. Benchmarks replace the stages'
    `workers` (default `workers.WORKERS`), the `pool_options` (default: the renderer's, with the plan's
    queued calls) and watch the finished rows (`on_rows(batch)`)."""
    if job.runtime.device.startswith("cuda") and not job.ray.address:
        from ..pipeline.device import torch_device

        torch_device(job.runtime)  # a local Ray on a machine without CUDA: one clear DeviceError, now
    manifest = open_manifest(job.manifest, job.storage_options)
    fs, root = open_fs(job.out, job.storage_options)
    run_id = new_run_id()
    summary = RenderSummary(run_id, fs.unstrip_protocol(root), rows=manifest.rows)
    start = time.perf_counter()
    done = done_keys(fs, root, job.dataset.layout)
    started_ray = connect(job.ray, verbose)
    try:
        # The pools are sized and checked against the cluster before the prefix is touched.
        job, chosen = plan_job(job, int(ray.cluster_resources().get("GPU", 0)))
        check_resources(job)
        before = read_lease(fs, root)
        lease = Lease.acquire(fs, root, run_id, ttl_s=job.lease_ttl_s, take_over=take_over, wait_s=wait_for_lease_s)
        if before is not None and before.run_id != run_id:
            _record_lost(fs, root, before.run_id, run_id)
        renewer = lease.renewer().start()
        try:
            return _render(job, chosen, manifest, fs, root, summary, done, start, renewer, limit=limit, verbose=verbose,
                           progress=progress, workers=workers, pool_options=pool_options, on_rows=on_rows)
        finally:
            renewer.stop()
            lease.release()
    finally:
        if started_ray:
            ray.shutdown()


def _record_lost(fs, root: str, lost: str, by: str) -> None:
    """The record of a run whose lease was taken over: it stopped without a word (its driver killed, or
    its node lost), unless it had recorded how it ended."""
    path = run_record_path(root, lost)
    if fs.exists(path):
        data = read_json(fs, path)
        if data.get("status") == "running":
            data.update(status=INTERRUPTED, reason=f"its driver stopped without a word (killed, or its node lost); "
                        f"its lease was taken over by run {by}", finished_at=_now())
            write_json(fs, path, data)


def _render(job, chosen, manifest, fs, root, summary, done, start, renewer, *, limit, verbose, progress, workers,
            pool_options, on_rows) -> RenderSummary:
    remove_temporaries(fs, root)  # of writers killed mid-write: the lease says no other run writes here
    run_id = summary.run_id
    ledger_actor = monitor = record = None
    try:
        if job.dataset.layout == "webdataset":
            remove_orphans(fs, root)  # shards of a writer killed before their index part: render them again
        record = RunRecord(fs, root, run_id, job, manifest)
        if chosen is not None:
            for line in chosen.lines():
                log.info("%s", line)
            record.data["plan"] = plan_summary(chosen)
        record.update()
        if pool_options is None:
            pool_options = PoolOptions(tasks_per_actor=queued_calls(chosen, job.deployment))
        if workers is None:
            from .workers import WORKERS as workers
        with Signals() as signals, execution_context(pool_options, verbose=verbose) as context:
            try:
                scan = scan_manifest(manifest, job.storage_options, planning_tasks(alone=True))
                summary.repeats = len(scan.repeats)
                ledger_name = f"kvray-ledger-{run_id}"
                ledger_actor = RunLedger.options(name=ledger_name, scheduling_strategy=on_this_node()).remote()
                inputs = PlanInputs(job.model_dump_json(), run_id, ledger_name, ray.put(scan.duplicates),
                                    ray.put(scan.repeats), ray.put(done), collapsed_rows(job, scan))
                summary.prompts = scan.prompts.line()
                planned = planned_dataset(manifest.parts, inputs, planning_tasks())
                if limit is not None:
                    planned = planned.limit(limit)
                first_batch = job.deployment.stage(STAGES[0]).batch_size
                planned, row_bytes = _probe(planned, first_batch)
                if pool_options.small_blocks and row_bytes:
                    context.target_max_block_size = block_bytes(row_bytes, first_batch)
                writer = ResultsWriter(fs, root, run_id, job.results_per_file)
                summary.startup_seconds = time.perf_counter() - start
                render_start = time.perf_counter()
                monitor = Monitor(job, ledger_actor, summary, progress)
                with monitor:
                    if planned is None:
                        batches = iter(())
                    else:
                        stream = model_stages(planned, job, ledger_name, workers, pool_options)
                        batches = iter(stream.iter_batches(batch_format="pandas", batch_size=None))
                    try:
                        for batch in batches:
                            renewer.check()  # LeaseLost: another run took the prefix over
                            monitor.rows_out()
                            if on_rows is not None:
                                on_rows(batch)
                            writer.add(batch)
                            _tally(batch, summary)
                    finally:
                        getattr(batches, "close", lambda: None)()
                        writer.flush()
                        summary.results.extend(writer.written)
                        summary.seconds = time.perf_counter() - render_start
                        summary.stages = monitor.refresh()
                summary.status = FINISHED
            except KeyboardInterrupt:
                stalled = monitor.watchdog.reason if monitor is not None else ""
                summary.status = FAILED if stalled else INTERRUPTED
                summary.reason = stalled or (f"stopped by {signal.Signals(signals.received).name}" if signals.received
                                             else "interrupted")
                if stalled:
                    raise StallError(stalled) from None
    except Exception as err:
        summary.status = FAILED
        summary.reason = summary.reason or f"{type(err).__name__}: {err}"
        raise
    finally:
        if ledger_actor is not None:
            ray.kill(ledger_actor)
        if record is not None:
            _planned_rows(fs, root, run_id, summary)
            if job.dataset.layout == "webdataset":
                summary.results.append(_card(fs, root, job, summary))
            record.update(status=summary.status, finished_at=_now(), reason=summary.reason, summary=summary.record())
    return summary


def _card(fs, root: str, job: RenderJob, summary: RenderSummary) -> str:
    """The dataset card of a webdataset output, from its committed index (every run so far)."""
    return write_dataset_card(fs, root, counts=dataset_counts(fs, root), errors=summary.error, dataset=job.dataset,
                              model_version=job.models.version, preset=job.models.preset,
                              defaults=job.defaults.model_dump(mode="json"), video_format=job.video_format,
                              storage_options=job.storage_options)
