"""The rows that flow through a render, and the one base class of every stage actor.

A row is one manifest row on its way to a result. It carries small things only (the request, its
status, timings, where each stage ran) and one `payload` of tensors between model stages (text
context, keyframe latents, video latents: at most a few MB). Decoded pixels are written to storage by
the last stage and never enter Ray's object store.

`StageWorker` holds the outcome handling every stage shares: rows that are not pending pass through
untouched, a failing call fails its rows (not the run), each updated row records its stage's seconds
and placement. Real stages (`workers.py`) and the benchmark's stand-ins (`kvray.bench.simulation`)
override only `setup` and `process`. This module imports no torch: stand-in actors start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import ray
from ray.util import metrics

from ..config.job import RenderJob
from ..config.stages import STAGES

log = logging.getLogger(__name__)

PENDING, OK, ERROR, SKIPPED, FILTERED = "pending", "ok", "error", "skipped", "filtered"
# A row's final status: rendered (ok, or filtered by a quality threshold), refused (error), or found
# done by an earlier run (skipped).
FINAL_STATUSES = (OK, ERROR, SKIPPED, FILTERED)

SECONDS = tuple(f"seconds_{stage}" for stage in STAGES)
# The columns of a planned row, with their Arrow types: what planning emits and every stage passes on.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row", pa.int64()),  # the row's position in the manifest (files in name order)
    ("video_id", pa.string()),
    ("status", pa.string()),
    ("uri", pa.string()),
    ("error", pa.string()),
    ("seed", pa.int64()),
    ("prompt", pa.string()),
    ("prompt_truncated", pa.bool_()),
    ("request", pa.string()),  # VideoRequest JSON ("" for an invalid row)
    *((name, pa.float64()) for name in SECONDS),
    ("placement", pa.string()),  # JSON: per stage, where it ran (GPU ids, node, threads, stack)
    ("payload", pa.binary()),  # tensors between model stages (safetensors bytes)
])
ROW_COLUMNS = tuple(ROW_SCHEMA.names)
# One row per input row in results/{run}/*.parquet.
RESULT_COLUMNS = ("id", "row", "video_id", "status", "uri", "error", "seed", "prompt", "prompt_truncated", *SECONDS)
RESULT_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in RESULT_COLUMNS])


def empty_row(row_id: str, position: int) -> dict:
    """A row with every column at its neutral value."""
    return {"id": row_id, "row": position, "video_id": "", "status": PENDING, "uri": "", "error": "", "seed": -1,
            "prompt": "", "prompt_truncated": False, "request": "", **{name: 0.0 for name in SECONDS},
            "placement": "{}", "payload": b""}


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly the row columns, in order (also when there are none)."""
    if not rows:
        return ROW_SCHEMA.empty_table().to_pandas()
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def results_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame[list(RESULT_COLUMNS)], schema=RESULT_SCHEMA, preserve_index=False)


class StageWorker:
    """One stage of the render on the resources Ray gave this actor. Subclasses set `stage` and
    implement `setup()` (load what the stage needs) and `process(rows) -> {row index: columns to update,
    or an error message}`; `self.job`, `self.gpu_ids` and `self.placement` are set before `setup`."""

    stage: str

    def __init__(self, job_json: str, ledger_name: str, emit_rows: int):
        start = time.perf_counter()
        # Output batches of the next stage's batch size, so that its actors share the work.
        self.emit_rows = emit_rows
        self.job = RenderJob.model_validate_json(job_json)
        self.deployment = self.job.deployment.stage(self.stage)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.placement = {"gpu_ids": self.gpu_ids, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        self.setup()
        # Ray's metrics (dashboard, Prometheus export): rows each stage finished or failed, seconds per row.
        self.rows_metric = metrics.Counter("kvray_rows", "rows a stage finished, by status", tag_keys=("stage", "status"))
        self.seconds_metric = metrics.Histogram("kvray_stage_seconds", "a stage's seconds per row", tag_keys=("stage",),
                                                boundaries=[0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600])
        self.ledger = ledger(ledger_name)
        if self.ledger is not None:
            self.ledger.register.remote(self.stage, {**self.placement, "load_seconds": round(time.perf_counter() - start, 3)})

    def setup(self) -> None:
        raise NotImplementedError

    def process(self, rows: pd.DataFrame) -> dict[int, dict | str]:
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> Iterator[pd.DataFrame]:
        batch = self.run(batch)
        for start in range(0, len(batch), self.emit_rows):
            yield batch.iloc[start:start + self.emit_rows]

    def run(self, batch: pd.DataFrame) -> pd.DataFrame:
        """The batch with its pending rows processed (`process`) and their outcomes recorded."""
        pending = batch.index[batch["status"] == PENDING]
        if len(pending) == 0:
            return batch
        if not batch["status"].to_numpy().flags.writeable:
            batch = batch.copy()  # a zero-copy view of a block in the object store
        start, started = time.perf_counter(), time.time()
        try:
            outcome = self.process(batch.loc[pending])
        except Exception as err:  # a failing batch fails its rows, not the run
            log.exception("%s failed on %d rows", self.stage, len(pending))
            outcome = {i: f"{self.stage}: {type(err).__name__}: {err}" for i in pending}
        seconds = (time.perf_counter() - start) / len(pending)
        call = {**self.placement, "started": started, "ended": time.time(), "videos": len(pending)}
        if self.ledger is not None:
            self.ledger.count.remote(self.stage, len(pending), call["started"], call["ended"], os.getpid())
        for i in pending:
            result = outcome[i]
            if isinstance(result, str):
                batch.at[i, "status"], batch.at[i, "error"], batch.at[i, "payload"] = ERROR, result, b""
                self.rows_metric.inc(tags={"stage": self.stage, "status": ERROR})
                continue
            self.rows_metric.inc(tags={"stage": self.stage, "status": result.get("status", OK)})
            self.seconds_metric.observe(seconds, tags={"stage": self.stage})
            for column, value in result.items():
                batch.at[i, column] = value
            batch.at[i, f"seconds_{self.stage}"] = seconds
            placement = json.loads(batch.at[i, "placement"])
            placement[self.stage] = {**call, **_digest(result.get("payload"))}  # where and when (wall clock) it ran
            batch.at[i, "placement"] = json.dumps(placement)
        return batch


def _digest(payload) -> dict:
    """A stage's output, fingerprinted: two renders of one request that should match and do not show
    in their metadata the first stage whose output differs."""
    if not isinstance(payload, bytes) or not payload:
        return {}
    return {"output_sha256": hashlib.sha256(payload).hexdigest()[:16]}


def ledger(name: str):
    """The run's ledger actor, or None when it is gone (bookkeeping never stops a stage)."""
    try:
        return ray.get_actor(name)
    except ValueError:
        log.warning("the run's ledger %s is not reachable: progress figures will be incomplete", name)
        return None


@ray.remote(num_cpus=0, max_restarts=-1)
class RunLedger:
    """Live bookkeeping of a run, for progress and the report only: stage actors (GPUs held, load
    seconds), model calls and their times, planning counts. Calls to it are fire-and-forget; if it is
    lost, it restarts empty and only the live figures suffer: results on storage are the record."""

    def __init__(self):
        self.actors: dict[str, list[dict]] = {}
        self.calls: dict[str, list[tuple[float, float, int, int]]] = {}
        self.planned: dict[str, int] = {}
        self.reasons: dict[str, list[str]] = {}

    def register(self, stage: str, placement: dict) -> None:
        self.actors.setdefault(stage, []).append({**placement, "at": time.time()})

    def count(self, stage: str, videos: int, start: float, end: float, pid: int) -> None:
        self.calls.setdefault(stage, []).append((start, end, pid, videos))

    def plan(self, counts: dict[str, int], reasons: dict[str, list[str]]) -> None:
        for status, n in counts.items():
            self.planned[status] = self.planned.get(status, 0) + n
        for status, some in reasons.items():
            kept = self.reasons.setdefault(status, [])
            kept.extend(some[:max(0, 5 - len(kept))])

    def report(self, with_calls: bool = False) -> dict:
        report = {"pid": os.getpid(), "actors": self.actors, "model_calls": {s: len(c) for s, c in self.calls.items()},
                  "planned": self.planned, "reasons": self.reasons,
                  "busy_seconds": {s: sum(e - b for b, e, _, _ in c) for s, c in self.calls.items()}}
        if with_calls:
            report["calls"] = self.calls
        return report
