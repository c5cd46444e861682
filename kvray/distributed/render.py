"""The render job: read the manifest, plan every row, run the pending ones through the stage pools,
write videos, metadata, results and the run record.

    read_parquet -> plan_rows (validate, ids, seed, skip existing) -> [pending rows]
        -> EncodeText -> Keyframes -> Interpolate -> DecodeAndWrite  (one actor pool each)
    -> results/*.parquet (one row per input row), run.json
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from ..config.job import STAGES, RenderJob
from ..io.manifest import manifest_files
from ..io.storage import open_fs, redact_storage_options, write_atomic, write_json
from .cluster import StageRegistry, connect
from .planner import plan_job, plan_summary
from .workers import ERROR, OK, PENDING, RESULT_COLUMNS, SKIPPED, STAGE_NAMES, WORKERS, plan_rows

log = logging.getLogger(__name__)


@dataclass
class RenderSummary:
    run_id: str
    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    seconds: float = 0.0  # rendering wall time, from the first pending row to the last result
    startup_seconds: float = 0.0  # Ray start (or join) and planning
    busy_seconds: dict[str, float] = field(default_factory=dict)  # per stage, summed over rows
    stages: dict = field(default_factory=dict)  # the registry's report: actors (GPU ids), model calls
    results: list[str] = field(default_factory=list)

    @property
    def videos_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"rows {self.rows}: ok {self.ok}, error {self.error}, skipped {self.skipped}",
            f"start-up {self.startup_seconds:.1f} s; rendering {self.seconds:.1f} s, {self.videos_per_second:.3f} videos/s",
        ]
        for stage in STAGE_NAMES:
            actors = self.stages.get("actors", {}).get(stage, [])
            gpus = ",".join(g for a in actors for g in a["gpu_ids"]) or "-"
            out.append(f"  {stage:<12} busy {self.busy_seconds.get(stage, 0.0):8.2f} s, {len(actors)} actor(s), GPUs {gpus}")
        return out


def _run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def render(job: RenderJob) -> RenderSummary:
    """Runs the job to the end; one clear `ManifestError` before anything starts if the manifest is unusable."""
    manifest_fs, files = manifest_files(job.manifest, job.storage_options)
    fs, root = open_fs(job.out, job.storage_options)
    summary = RenderSummary(_run_id())
    record = {"run_id": summary.run_id, "status": "running", "started_at": datetime.now(timezone.utc).isoformat(),
              "job": _redacted(job), "manifest_files": [manifest_fs.unstrip_protocol(f) for f in files]}
    write_json(fs, f"{root}/run.json", record)

    start = time.perf_counter()
    started_ray = connect(job.ray)
    try:
        job, chosen = plan_job(job, int(ray.cluster_resources().get("GPU", 0)))
    except ValueError:  # no plan fits the cluster (DoesNotFit, too few GPUs): nothing was started
        if started_ray:
            ray.shutdown()
        raise
    if chosen is not None:
        for line in chosen.lines():
            log.info("%s", line)
        record["plan"] = plan_summary(chosen)
    registry_name = f"kvray-registry-{summary.run_id}"
    registry = StageRegistry.options(name=registry_name).remote()
    try:
        job_json = job.model_dump_json()
        planned = ray.data.read_parquet(
            files, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(manifest_fs))
        ).map_batches(plan_rows, fn_kwargs={"job_json": job_json}, batch_format="pyarrow", num_cpus=0.25).materialize()
        planned = _refuse_duplicate_ids(planned)
        pending = planned.filter(expr=col("status") == PENDING).materialize()
        finished = planned.filter(expr=col("status") != PENDING)
        count = pending.count()
        summary.startup_seconds = time.perf_counter() - start
        render_start = time.perf_counter()
        streams = [finished]
        if count:
            streams.append(model_stages(pending, count, job, registry_name,
                                        options=PoolOptions(tasks_per_actor=queued_calls(chosen))))
        summary.results = _write_results(streams, fs, root, summary, job.results_per_file)
        _remove_temporaries(fs, root)
        summary.seconds = time.perf_counter() - render_start
        summary.stages = ray.get(registry.report.remote())
    finally:
        ray.kill(registry)
        if started_ray:
            ray.shutdown()
    write_json(fs, f"{root}/run.json", {**record, "status": "finished", "finished_at": datetime.now(timezone.utc).isoformat(),
                                        "summary": _summary_record(summary)})
    return summary


def _refuse_duplicate_ids(planned):
    """Rows that share an id are all errors: results are keyed by id, and no choice between them is
    safe (explicit ids repeated, or identical rows without ids, whose derived ids coincide)."""
    counts = planned.groupby("id").count().filter(expr=col("count()") > 1).to_pandas()
    if counts.empty:
        return planned
    repeated = dict(zip(counts["id"], counts["count()"]))
    return planned.map_batches(_mark_duplicates, fn_kwargs={"repeated": repeated}, batch_format="pandas").materialize()


def _mark_duplicates(batch: pd.DataFrame, repeated: dict) -> pd.DataFrame:
    hit = batch["id"].isin(list(repeated))
    batch.loc[hit, "status"] = ERROR
    batch.loc[hit, "uri"] = ""
    batch.loc[hit, "error"] = [f"id {i!r} is not unique ({repeated[i]} rows): give each row its own id" for i in batch.loc[hit, "id"]]
    return batch


DEEP_QUEUE = 1.2  # a pool fed this many times as fast as it works has work waiting in front of it


def queued_calls(plan=None) -> dict[str, int]:
    """Calls queued on each actor of each pool. 2, so that the next batch reaches an actor while the
    current one computes, where work waits in front of the pool: the first pool (its input is all there
    from the start), and a pool that the pools before it feed `DEEP_QUEUE` times as fast as it works
    (per the planner's `plan`); and in a pool of one actor. 1 elsewhere: Ray Data hands a queued call
    to a busy actor, and when the queue in front of a pool is short, the video waits there while
    another actor runs dry (`kvray bench pipeline --simulate` measured 6% of the bound lost so on 32
    GPUs). The price of 1 is the time from one call's end to the next call's start, some tenths of a
    second on a loaded machine."""
    calls = {}
    for index, stage in enumerate(STAGES):
        if index == 0:
            calls[stage] = 2
        elif plan is None:
            calls[stage] = 1
        else:
            feed = min(plan.stages[s].videos_per_second for s in STAGES[:index])
            deep = feed >= DEEP_QUEUE * plan.stages[stage].videos_per_second
            calls[stage] = 2 if deep or plan.stages[stage].actors == 1 else 1
    return calls


@dataclass(frozen=True)
class PoolOptions:
    """How the stage pools run. The defaults are the renderer's; `kvray bench pipeline` turns each off to
    measure what it is worth."""

    # Every pool at its full size from the start; off: pools grow from one actor as work queues up.
    full_pools: bool = True
    # Per stage, calls queued on each actor (see `queued_calls`).
    tasks_per_actor: dict[str, int] = field(default_factory=queued_calls)
    # After a stage with larger batches than the next, its output blocks are cut to the next stage's
    # batch size (streaming): a call's output is one block, which would go to one actor of the next pool.
    split_blocks: bool = True


def model_stages(pending, count: int, job: RenderJob, registry_name: str, workers=WORKERS,
                 options: PoolOptions = PoolOptions()):
    """The four actor pools over the pending rows. `workers`: the stage callables (benchmarks substitute
    stand-ins with the same constructor arguments: job_json, registry_name, emit_rows)."""
    job_json = job.model_dump_json()
    # Enough blocks that every actor of the widest pool gets work (a one-file manifest is one block).
    widest = max(job.deployment.stage(s).actors * job.deployment.stage(s).batch_size for s in STAGES)
    ds = pending.repartition(min(count, max(1, widest * 2)))
    for index, stage in enumerate(STAGES):
        deployment = job.deployment.stage(stage)
        following = job.deployment.stage(STAGES[index + 1]) if index + 1 < len(STAGES) else deployment
        if options.full_pools:
            pool = {"size": deployment.actors}
        else:
            pool = {"min_size": 1, "max_size": deployment.actors}
        ds = ds.map_batches(
            workers[stage],
            fn_constructor_kwargs={"job_json": job_json, "registry_name": registry_name,
                                   "emit_rows": following.batch_size},
            batch_format="pandas",
            batch_size=deployment.batch_size,
            compute=ray.data.ActorPoolStrategy(**pool, max_tasks_in_flight_per_actor=options.tasks_per_actor[stage]),
            num_gpus=deployment.gpus,
            num_cpus=deployment.cpus,
        )
        if options.split_blocks and index + 1 < len(STAGES) and deployment.batch_size > following.batch_size:
            ds = ds.repartition(target_num_rows_per_block=following.batch_size)
    return ds


def _write_results(streams, fs, root: str, summary: RenderSummary, rows_per_file: int) -> list[str]:
    """Streams every row's result into results/<run>-<part>.parquet; older runs' result files are removed
    once this run's are complete, so results/ always holds one row per input row."""
    written, buffer = [], []

    def flush():
        table = pa.Table.from_pandas(pd.concat(buffer)[RESULT_COLUMNS], preserve_index=False)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = f"{root}/results/{summary.run_id}-{len(written):05d}.parquet"
        write_atomic(fs, path, sink.getvalue().to_pybytes())
        written.append(fs.unstrip_protocol(path))
        buffer.clear()

    buffered = 0
    for stream in streams:
        for batch in stream.iter_batches(batch_format="pandas", batch_size=None):
            _tally(batch, summary)
            buffer.append(batch.drop(columns=["payload", "request", "gpus"]))
            buffered += len(batch)
            if buffered >= rows_per_file:
                flush()
                buffered = 0
    if buffer or not written:
        if not buffer:
            buffer.append(pd.DataFrame({c: [] for c in RESULT_COLUMNS}))
        flush()
    for old in fs.glob(f"{root}/results/*.parquet"):
        if not old.rsplit("/", 1)[-1].startswith(summary.run_id):
            fs.rm(old)
    return written


def _remove_temporaries(fs, root: str) -> None:
    """Temporary files of writers that were killed mid-write (their batch was retried and written
    whole since). One run per output prefix at a time: another run's in-flight files would go too."""
    for folder in ("videos", "meta", "results"):
        if not fs.isdir(f"{root}/{folder}"):
            continue
        for path in fs.ls(f"{root}/{folder}", detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                fs.rm(path)


def _tally(batch: pd.DataFrame, summary: RenderSummary) -> None:
    summary.rows += len(batch)
    for status in (OK, ERROR, SKIPPED):
        setattr(summary, status, getattr(summary, status) + int((batch["status"] == status).sum()))
    for stage in STAGE_NAMES:
        summary.busy_seconds[stage] = summary.busy_seconds.get(stage, 0.0) + float(batch[f"seconds_{stage}"].sum())


def _redacted(job: RenderJob) -> dict:
    data = job.model_dump(mode="json")
    data["storage_options"] = redact_storage_options(data["storage_options"])
    return data


def _summary_record(summary: RenderSummary) -> dict:
    return {
        "rows": summary.rows, "ok": summary.ok, "error": summary.error, "skipped": summary.skipped,
        "startup_seconds": round(summary.startup_seconds, 3), "render_seconds": round(summary.seconds, 3),
        "videos_per_second": summary.videos_per_second, "busy_seconds": summary.busy_seconds,
        "stages": summary.stages, "results": summary.results,
    }
