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

import logging
import secrets
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import ray

from ..config.job import RenderJob
from ..config.stages import STAGES
from ..io.atomic import read_json, write_atomic, write_json
from ..io.dataset_card import dataset_counts, write_dataset_card
from ..io.layout import done_keys, latest_run_path, remove_temporaries, results_dir, run_record_path
from ..io.lease import Lease, read_lease
from ..io.manifest import Manifest, open_manifest
from ..io.opening import open_fs
from ..io.redaction import redact_job, redact_url
from ..io.shards import remove_orphans
from ..weights.adapters import resolve_adapters
from .cluster import check_resources, connect, on_this_node
from .deferred_workers import DEFERRED_WORKERS
from .false_alarms import dropped_from_stderr
from .monitor import Monitor, Signals, StallError
from .planner import plan_job, plan_summary, resolve_pools
from .pools import PoolOptions, block_bytes, execution_context, model_stages, queued_calls
from .row_planning import REPEAT, NothingToRender, PlanInputs, plan_in_process, planned_dataset, scan_manifest, write_planned
from .rows import ERROR, FILTERED, OK, SKIPPED, RunLedger, results_table

log = logging.getLogger(__name__)

FINISHED, FAILED, INTERRUPTED = "finished", "failed", "interrupted"
FIRST_ERRORS = 5


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
               + (f", identical to an earlier row {self.repeats}" if self.repeats else "")
               + (f", not reached (--limit, or the run stopped) {self.rows - self.done}" if self.rows > self.done else ""),
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


def _tally(batch: pd.DataFrame, summary: RenderSummary, error_rows: list[tuple[int, str, str]]) -> None:
    for status in (OK, ERROR, FILTERED):
        setattr(summary, status, getattr(summary, status) + int((batch["status"] == status).sum()))
    for stage in STAGES:
        summary.busy_seconds[stage] = summary.busy_seconds.get(stage, 0.0) + float(batch[f"seconds_{stage}"].sum())
    errors = batch.loc[batch["status"] == ERROR]
    _keep_first_errors(error_rows, errors)


def _keep_first_errors(error_rows: list[tuple[int, str, str]], errors: pd.DataFrame) -> None:
    """Adds `errors` (rows with `row`, `id`, `error`) to `error_rows`, keeping only the FIRST_ERRORS lowest
    rows: the driver holds a few error rows whatever the manifest's size."""
    error_rows.extend(zip(errors["row"].tolist(), errors["id"], errors["error"]))
    error_rows[:] = sorted(error_rows)[:FIRST_ERRORS]


def _planned_rows(fs, root: str, summary: RenderSummary, error_rows: list[tuple[int, str, str]]) -> None:
    """The skipped and error rows of the planning tasks, counted from their results files."""
    folder = results_dir(root, summary.run_id)
    if not fs.isdir(folder):
        return
    for path in sorted(p for p in fs.ls(folder, detail=False) if p.rpartition("/")[2].startswith("plan-")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "row", "id", "error"]).to_pandas()
        summary.skipped += int((table["status"] == SKIPPED).sum())
        errors = table.loc[table["status"] == ERROR]
        summary.error += len(errors)
        _keep_first_errors(error_rows, errors)
        summary.results.append(fs.unstrip_protocol(path))


def collapsed_rows(job: RenderJob, scan):
    """The rows `collapse_duplicate_prompts` leaves out, for the planning tasks (None when it is off)."""
    if not job.collapse_duplicate_prompts or not scan.prompts.duplicate_rows:
        return None
    return ray.put((scan.prompts.positions, scan.prompts.firsts))


PROBE_ROWS = 2_000
# Manifests up to this many rows are planned in the driver first: with nothing to render, Ray never starts.
IN_PROCESS_ROWS = PROBE_ROWS


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
    `workers` (default `deferred_workers.DEFERRED_WORKERS`), the `pool_options` (default: the renderer's, with the plan's
    queued calls) and watch the finished rows (`on_rows(batch)`).

    The job's LoRA adapters are read here (their digests name its videos: `resolve_adapters`)."""
    job = job.model_copy(update={"models": resolve_adapters(job.models)})
    if job.runtime.device.startswith("cuda") and not job.ray.address:
        from ..pipeline.device import torch_device

        torch_device(job.runtime)  # a local Ray on a machine without CUDA: one clear DeviceError, now
    manifest = open_manifest(job.manifest, job.storage_options)
    fs, root = open_fs(job.out, job.storage_options)
    run_id = new_run_id()
    summary = RenderSummary(run_id, fs.unstrip_protocol(root), rows=manifest.rows)
    start = time.perf_counter()
    done = done_keys(fs, root, job.dataset.layout)
    nothing = plan_in_process(job, manifest, done) if manifest.rows <= IN_PROCESS_ROWS else None
    started_ray = nothing is None and connect(job.ray, verbose)
    try:
        chosen = None
        if nothing is None:
            # The pools are sized and checked against the cluster before the prefix is touched.
            rows = manifest.rows if limit is None else min(limit, manifest.rows)
            job = resolve_pools(job, rows=rows)
            job, chosen = plan_job(job, int(ray.cluster_resources().get("GPU", 0)), rows)
            check_resources(job)
        before = read_lease(fs, root)
        lease = Lease.acquire(fs, root, run_id, ttl_s=job.lease_ttl_s, take_over=take_over, wait_s=wait_for_lease_s)
        if before is not None and before.run_id != run_id:
            _record_lost(fs, root, before.run_id, run_id)
        renewer = lease.renewer().start()
        try:
            run = RenderRun(job, manifest, fs, root, summary, start)
            if nothing is not None:
                return run.record_nothing_to_render(nothing)
            return run.on_ray(chosen, done, renewer, limit=limit, verbose=verbose, progress=progress, workers=workers,
                              pool_options=pool_options, on_rows=on_rows)
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


class RenderRun:
    """One run of a job on its output prefix, the lease held: `start` records it, `on_ray` streams the
    planned rows through the pools (or `record_nothing_to_render` records a run with none), and
    `finish` counts the planned rows and records how it ended."""

    def __init__(self, job: RenderJob, manifest, fs, root: str, summary: RenderSummary, start: float):
        self.job, self.manifest, self.fs, self.root, self.summary = job, manifest, fs, root, summary
        self.started = start
        self.record: RunRecord | None = None
        self.error_rows: list[tuple[int, str, str]] = []  # (row, id, error): the FIRST_ERRORS lowest rows so far

    def start(self, plan: dict | None = None) -> None:
        remove_temporaries(self.fs, self.root)  # of writers killed mid-write: the lease says no other run writes here
        if self.job.dataset.layout == "webdataset":
            remove_orphans(self.fs, self.root)  # shards of a writer killed before their index part: render them again
        self.record = RunRecord(self.fs, self.root, self.summary.run_id, self.job, self.manifest)
        if plan is not None:
            self.record.data["plan"] = plan
        self.record.update()

    def finish(self) -> None:
        """The planned rows counted, the first errors chosen, the dataset card refreshed, the end recorded."""
        summary = self.summary
        _planned_rows(self.fs, self.root, summary, self.error_rows)
        summary.first_errors = [f"row {r} ({i}): {e}" for r, i, e in self.error_rows]
        if self.job.dataset.layout == "webdataset":
            summary.results.append(_card(self.fs, self.root, self.job, summary))
        self.record.update(status=summary.status, finished_at=_now(), reason=summary.reason, summary=summary.record())

    def record_nothing_to_render(self, nothing: NothingToRender) -> RenderSummary:
        """A run that `plan_in_process` found nothing to render in: its skipped and error rows in its
        results, as a run on Ray would have written them; no Ray, no pool."""
        summary = self.summary
        self.start()
        try:
            for part, finished in nothing.finished:
                write_planned(self.job, summary.run_id, part, finished)
            summary.repeats = nothing.counts[REPEAT]
            summary.prompts = nothing.scan.prompts.line()
            summary.startup_seconds = time.perf_counter() - self.started
            summary.status = FINISHED
        except Exception as err:
            summary.status, summary.reason = FAILED, f"{type(err).__name__}: {err}"
            raise
        finally:
            self.finish()
        return summary

    def on_ray(self, chosen, done, renewer, *, limit, verbose, progress, workers, pool_options, on_rows) -> RenderSummary:
        summary, job = self.summary, self.job
        ledger = monitor = None
        try:
            if chosen is not None:
                for line in chosen.lines():
                    log.info("%s", line)
            self.start(plan_summary(chosen) if chosen is not None else None)
            if pool_options is None:
                pool_options = PoolOptions(tasks_per_actor=queued_calls(chosen, job.deployment))
            workers = workers or DEFERRED_WORKERS
            quiet = nullcontext() if verbose else dropped_from_stderr()
            with quiet, Signals() as signals, execution_context(pool_options, verbose=verbose) as context:
                try:
                    ledger = RunLedger.options(name=self._ledger_name,
                                               scheduling_strategy=on_this_node()).remote()
                    planned = self._plan(done, limit, pool_options, context)
                    summary.startup_seconds = time.perf_counter() - self.started
                    monitor = Monitor(job, ledger, summary, progress)
                    with monitor:
                        stream = None if planned is None else model_stages(
                            planned, job, self._ledger_name, workers, pool_options)
                        self._drain(stream, monitor, renewer, on_rows)
                    summary.status = FINISHED
                except KeyboardInterrupt:
                    stalled = monitor.watchdog.reason if monitor is not None else ""
                    summary.status = FAILED if stalled else INTERRUPTED
                    summary.reason = stalled or (f"stopped by {signal.Signals(signals.received).name}"
                                                 if signals.received else "interrupted")
                    if stalled:
                        raise StallError(stalled) from None
        except Exception as err:
            summary.status = FAILED
            summary.reason = summary.reason or f"{type(err).__name__}: {err}"
            raise
        finally:
            if ledger is not None:
                ray.kill(ledger)
            if self.record is not None:
                self.finish()
        return summary

    @property
    def _ledger_name(self) -> str:
        return f"kvray-ledger-{self.summary.run_id}"

    def _plan(self, done, limit, pool_options: PoolOptions, context):
        """The id pass, then the planning tasks' stream of pending rows (None: nothing to render)."""
        job, summary = self.job, self.summary
        scan = scan_manifest(self.manifest, job.storage_options, planning_tasks(alone=True))
        summary.repeats = len(scan.repeats)
        summary.prompts = scan.prompts.line()
        inputs = PlanInputs(job.model_dump_json(), summary.run_id, self._ledger_name, ray.put(scan.duplicates),
                            ray.put(scan.repeats), ray.put(done), collapsed_rows(job, scan))
        planned = planned_dataset(self.manifest.parts, inputs, planning_tasks())
        if limit is not None:
            planned = planned.limit(limit)
        first_batch = next(iter(job.deployment.actor_pools().values())).batch_size
        planned, row_bytes = _probe(planned, first_batch)
        if pool_options.small_blocks and row_bytes:
            context.target_max_block_size = block_bytes(row_bytes, first_batch)
        return planned

    def _drain(self, stream, monitor: Monitor, renewer, on_rows) -> None:
        """The finished rows out of the pools, into the results, until the stream ends."""
        summary = self.summary
        writer = ResultsWriter(self.fs, self.root, summary.run_id, self.job.results_per_file)
        batches = iter(()) if stream is None else iter(stream.iter_batches(batch_format="pandas", batch_size=None))
        render_start = time.perf_counter()
        try:
            for batch in batches:
                renewer.check()  # LeaseLost: another run took the prefix over
                monitor.rows_out()
                if on_rows is not None:
                    on_rows(batch)
                writer.add(batch)
                _tally(batch, summary, self.error_rows)
        finally:
            getattr(batches, "close", lambda: None)()
            writer.flush()
            summary.results.extend(writer.written)
            summary.seconds = time.perf_counter() - render_start
            summary.stages = monitor.refresh()


def _card(fs, root: str, job: RenderJob, summary: RenderSummary) -> str:
    """The dataset card of a webdataset output, from its committed index (every run so far)."""
    return write_dataset_card(fs, root, counts=dataset_counts(fs, root), errors=summary.error, dataset=job.dataset,
                              model_version=job.models.version, preset=job.models.preset,
                              defaults=job.defaults.model_dump(mode="json"), video_format=job.video_format,
                              storage_options=job.storage_options)
