"""Planning: manifest parts -> planned rows, streamed into the stage pools as they are planned.

One Ray task per manifest part (`kvray.io.manifest.ManifestPart`) reads its rows, validates each one
(`plan_row`: request, id, seed, video_id), and sorts it:

* pending: yielded into the pipeline, block after block, while the rest of the part is planned;
* skipped (its video's commit record exists), error (invalid, or an id given to several rows):
  written straight into the run's results by the planning task (they never enter a stage pool) and
  counted in the run's ledger;
* a repeat of an identical row without an id: dropped (the first occurrence is the row) and counted.

What the tasks need to know about the whole manifest and the output (`PlanInputs`: the ids that
repeat, the done videos) is computed once by the driver and shared through Ray's object store.
Planning tasks ask for no CPU: whatever the stage pools hold, planning can always run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..config.job import RenderJob
from ..io.layout import is_done, results_dir, video_path
from ..io.manifest import ManifestPart, part_batches
from ..io.storage import open_fs, write_atomic
from ..requests.manifest import plan_row
from .rows import ERROR, PENDING, SKIPPED, empty_row, ledger, results_table, rows_frame

REPEAT = "repeat"  # counted, never a row


@dataclass(frozen=True)
class PlanInputs:
    """What every planning task shares (object refs, resolved once per worker process)."""

    job_json: str
    run_id: str
    ledger_name: str  # "" for none (a dry run)
    duplicates: ray.ObjectRef  # dict: id -> count, for ids given to several rows
    repeats: ray.ObjectRef  # sorted int64 positions of repeats of identical rows without ids
    done: ray.ObjectRef  # sorted S32 ids of done videos
    dry_run: bool = False


@functools.lru_cache(maxsize=8)
def _job(job_json: str) -> RenderJob:
    return RenderJob.model_validate_json(job_json)


@functools.lru_cache(maxsize=8)
def _shared(duplicates: ray.ObjectRef, repeats: ray.ObjectRef, done: ray.ObjectRef):
    return ray.get(duplicates), ray.get(repeats), ray.get(done)


def plan_part(batch: dict, inputs: PlanInputs):
    """Ray Data callable (batch_size=1: one part per call): yields the part's planned rows as DataFrames
    (pending rows only, or every row in a dry run)."""
    job = _job(inputs.job_json)
    duplicates, repeats, done = _shared(inputs.duplicates, inputs.repeats, inputs.done)
    fields = json.loads(batch["part"][0])
    part = ManifestPart(**{**fields, "row_groups": tuple(fields["row_groups"])})
    manifest_fs = open_fs(job.manifest, job.storage_options)[0]
    out_fs, root = open_fs(job.out, job.storage_options)
    preset = job.models.model_preset
    size = (preset.default_width, preset.default_height)
    counts = {PENDING: 0, SKIPPED: 0, ERROR: 0, REPEAT: 0}
    reasons: dict[str, list[str]] = {}
    finished: list[pd.DataFrame] = []  # skipped and error rows, for the results
    for start, records in part_batches(manifest_fs, part):
        rows = []
        for offset, record in enumerate(records.to_pylist()):
            position = start + offset
            if _in_sorted(repeats, position):
                counts[REPEAT] += 1
                continue
            planned = plan_row(record, job.defaults, job.models.version, size)
            row = empty_row(planned.id, position)
            request = planned.request
            if request is None:
                row.update(status=ERROR, error=planned.error, prompt=str(record.get("prompt") or ""))
            elif planned.id in duplicates:
                row.update(status=ERROR, prompt=request.prompt,
                           error=f"id {planned.id!r} is not unique ({duplicates[planned.id]} rows): give each row its own id")
            else:
                row.update(video_id=planned.video_id, seed=request.seed, prompt=request.prompt,
                           request=request.model_dump_json())
            rows.append(row)
        frame = rows_frame(rows)
        pending = frame["status"] == PENDING
        finished_before = is_done(done, frame.loc[pending, "video_id"].tolist())
        done_index = frame.index[pending][finished_before]
        frame.loc[done_index, "status"] = SKIPPED
        frame.loc[done_index, "uri"] = [out_fs.unstrip_protocol(video_path(root, v, job.video_format))
                                        for v in frame.loc[done_index, "video_id"]]
        for status in (PENDING, SKIPPED, ERROR):
            counts[status] += int((frame["status"] == status).sum())
        errors = frame.loc[frame["status"] == ERROR]
        if len(errors):
            kept = reasons.setdefault(ERROR, [])
            kept.extend(f"row {r} ({i}): {e}" for r, i, e in zip(errors["row"], errors["id"], errors["error"])
                        if len(kept) < 5)
        if inputs.dry_run:
            yield frame
            continue
        finished.append(frame.loc[frame["status"] != PENDING].drop(columns=["payload"]))
        pending_rows = frame.loc[frame["status"] == PENDING]
        if len(pending_rows):
            yield pending_rows
    if not inputs.dry_run and finished:
        results = pd.concat(finished)
        if len(results):
            sink = _parquet_bytes(results)
            write_atomic(out_fs, f"{results_dir(root, inputs.run_id)}/plan-{part.first_row:012d}.parquet", sink)
    book = ledger(inputs.ledger_name) if inputs.ledger_name else None
    if book is not None:
        book.plan.remote(counts, reasons)


def _in_sorted(sorted_values: np.ndarray, value: int) -> bool:
    index = np.searchsorted(sorted_values, value)
    return index < len(sorted_values) and sorted_values[index] == value


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(results_table(frame), sink)
    return sink.getvalue().to_pybytes()


def parts_dataset(parts: list[ManifestPart]):
    """One block per part, so that each part is its own planning task."""
    items = [{"part": json.dumps(asdict(p))} for p in parts]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def planned_dataset(parts: list[ManifestPart], inputs: PlanInputs, concurrency: int):
    """The planned rows of every part, as a stream (see the module notes)."""
    return parts_dataset(parts).map_batches(
        plan_part, fn_kwargs={"inputs": inputs}, batch_size=1, batch_format="numpy", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(concurrency, len(parts)))),
    )

