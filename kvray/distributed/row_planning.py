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
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..config.job import RenderJob
from ..io.atomic import write_atomic
from ..io.layout import is_done, results_dir, video_path, where_in_sorted
from ..io.manifest import Manifest, ManifestPart, part_batches
from ..io.opening import open_fs
from ..requests.manifest import IdScan, PartIds, part_ids, plan_row, scan_ids
from .rows import ERROR, PENDING, SKIPPED, empty_row, ledger, results_table, rows_frame

REPEAT = "repeat"  # counted, never a row
FIRST_ERRORS = 5


@dataclass(frozen=True)
class PlanInputs:
    """What every planning task shares (object refs, resolved once per worker process)."""

    job_json: str
    run_id: str
    ledger_name: str  # "" for none (a dry run)
    duplicates: ray.ObjectRef  # dict: id -> count, for ids given to several rows
    repeats: ray.ObjectRef  # sorted int64 positions of repeats of identical rows without ids
    done: ray.ObjectRef  # sorted S32 ids of done videos
    collapsed: ray.ObjectRef | None = None  # (positions, positions of the rows they repeat), sorted by position
    dry_run: bool = False


@functools.lru_cache(maxsize=8)
def _job(job_json: str) -> RenderJob:
    return RenderJob.model_validate_json(job_json)


@dataclass(frozen=True)
class Shared:
    """PlanInputs' shared values, resolved."""

    duplicates: dict[str, int]
    repeats: np.ndarray
    done: np.ndarray
    collapsed: tuple[np.ndarray, np.ndarray]  # (positions, positions of the rows they repeat)


NOT_COLLAPSED = (np.array([], dtype=np.int64), np.array([], dtype=np.int64))


@functools.lru_cache(maxsize=8)
def _shared(duplicates: ray.ObjectRef, repeats: ray.ObjectRef, done: ray.ObjectRef,
            collapsed: ray.ObjectRef | None) -> Shared:
    return Shared(ray.get(duplicates), ray.get(repeats), ray.get(done), ray.get(collapsed) if collapsed else NOT_COLLAPSED)


def _resolved(inputs: PlanInputs) -> Shared:
    return _shared(inputs.duplicates, inputs.repeats, inputs.done, inputs.collapsed)


def _planned_frames(part: ManifestPart, job: RenderJob, shared: Shared, counts: dict[str, int],
                    shapes: Counter | None = None):
    """Every row of the part, planned, in DataFrames of a read batch each; repeats of identical rows
    without ids are counted in `counts` and left out. `shapes`, when given, counts the pending rows
    by (width, height, fps, mode, scenes)."""
    duplicates, repeats, done, (collapsed, firsts) = shared.duplicates, shared.repeats, shared.done, shared.collapsed
    manifest_fs = open_fs(job.manifest, job.storage_options)[0]
    out_fs, root = open_fs(job.out, job.storage_options)
    preset = job.models.model_preset
    size = (preset.default_width, preset.default_height)
    for start, records in part_batches(manifest_fs, part):
        positions = np.arange(start, start + records.num_rows, dtype=np.int64)
        repeated = where_in_sorted(repeats, positions) >= 0
        collapsed_at = where_in_sorted(collapsed, positions)
        rows, row_shapes = [], []
        for position, record, repeat, collapsed_index in zip(positions.tolist(), records.to_pylist(),
                                                             repeated.tolist(), collapsed_at.tolist()):
            if repeat:
                counts[REPEAT] += 1
                continue
            planned = plan_row(record, job.defaults, job.models.version, size)
            row = empty_row(planned.id, position)
            request = planned.request
            shape = None
            if collapsed_index >= 0 and request is not None:
                row.update(status=SKIPPED, prompt=request.prompt, seed=request.seed,
                           error=f"same prompt and seed as row {firsts[collapsed_index]} after normalisation: not "
                                 "rendered (collapse_duplicate_prompts)")
            elif request is None:
                row.update(status=ERROR, error=planned.error, prompt=str(record.get("prompt") or ""))
            elif planned.id in duplicates:
                row.update(status=ERROR, prompt=request.prompt,
                           error=f"id {planned.id!r} is not unique ({duplicates[planned.id]} rows): give each row its own id")
            else:
                row.update(video_id=planned.video_id, seed=request.seed, prompt=request.prompt,
                           request=request.model_dump_json())
                shape = (request.width, request.height, request.fps, request.mode, len(request.scenes or ()) or 1)
            rows.append(row)
            row_shapes.append(shape)
        frame = rows_frame(rows)
        pending = frame.index[frame["status"] == PENDING]
        done_before = pending[is_done(done, frame.loc[pending, "video_id"].tolist())]
        frame.loc[done_before, "status"] = SKIPPED
        if job.dataset.layout == "files":  # a webdataset sample's shard is in the index
            frame.loc[done_before, "uri"] = [out_fs.unstrip_protocol(video_path(root, v, job.video_format))
                                             for v in frame.loc[done_before, "video_id"]]
        if shapes is not None:
            shapes.update(shape for shape, status in zip(row_shapes, frame["status"]) if status == PENDING)
        for status in (PENDING, SKIPPED, ERROR):
            counts[status] += int((frame["status"] == status).sum())
        yield frame


def _first_errors(frame: pd.DataFrame, kept: list[str]) -> None:
    errors = frame.loc[frame["status"] == ERROR]
    for row, row_id, error in zip(errors["row"], errors["id"], errors["error"]):
        if len(kept) >= FIRST_ERRORS:
            return
        kept.append(f"row {row} ({row_id}): {error}")


def _part(batch: dict) -> ManifestPart:
    fields = json.loads(batch["part"][0])
    return ManifestPart(**{**fields, "row_groups": tuple(fields["row_groups"])})


def plan_part(batch: dict, inputs: PlanInputs):
    """Ray Data callable (batch_size=1: one part per call): yields the part's pending rows, a batch at a
    time, while it plans the rest; writes its skipped and error rows into the run's results and
    reports its counts to the run's ledger."""
    part = _part(batch)
    job = _job(inputs.job_json)
    counts = {PENDING: 0, SKIPPED: 0, ERROR: 0, REPEAT: 0}
    errors: list[str] = []
    finished: list[pd.DataFrame] = []  # skipped and error rows, for the results
    for frame in _planned_frames(part, job, _resolved(inputs), counts):
        _first_errors(frame, errors)
        finished.append(frame.loc[frame["status"] != PENDING].drop(columns=["payload"]))
        pending = frame.loc[frame["status"] == PENDING]
        if len(pending):
            yield pending
    write_planned(job, inputs.run_id, part, finished)
    book = ledger(inputs.ledger_name) if inputs.ledger_name else None
    if book is not None:
        book.plan.remote(counts, {ERROR: errors} if errors else {})


def dry_part(batch: dict, inputs: PlanInputs):
    """Ray Data callable of a dry run: the part's planning summed up in one row (JSON): its counts, its
    first errors, and how many pending rows have each shape (size, fps, mode, scenes)."""
    counts = {PENDING: 0, SKIPPED: 0, ERROR: 0, REPEAT: 0}
    errors: list[str] = []
    shapes: Counter = Counter()
    for frame in _planned_frames(_part(batch), _job(inputs.job_json), _resolved(inputs), counts, shapes):
        _first_errors(frame, errors)
    summary = {"counts": counts, "errors": errors, "shapes": {json.dumps(list(k)): n for k, n in shapes.items()}}
    yield pd.DataFrame({"summary": [json.dumps(summary)]})


def write_planned(job: RenderJob, run_id: str, part: ManifestPart, finished: list[pd.DataFrame]) -> None:
    """A part's skipped and error rows into the run's results (plan-{first row}.parquet), if it has any."""
    results = pd.concat(finished) if finished else None
    if results is not None and len(results):
        out_fs, root = open_fs(job.out, job.storage_options)
        write_atomic(out_fs, f"{results_dir(root, run_id)}/plan-{part.first_row:012d}.parquet", _parquet_bytes(results))


@dataclass
class NothingToRender:
    """A small manifest planned in the driver's process with no pending row: each part's finished
    (skipped and error) rows and the counts, ready to be written into a run's results without Ray."""

    scan: IdScan
    finished: list[tuple[ManifestPart, list[pd.DataFrame]]]
    counts: dict[str, int]


def plan_in_process(job: RenderJob, manifest: Manifest, done: np.ndarray) -> NothingToRender | None:
    """Plans the whole manifest here, without Ray, stopping at its first pending row (None): a re-run of
    a finished job then ends before Ray starts. For small manifests only; the rest plan on Ray."""
    scan = scan_ids(manifest)
    collapsed = NOT_COLLAPSED
    if job.collapse_duplicate_prompts and scan.prompts.duplicate_rows:
        collapsed = (scan.prompts.positions, scan.prompts.firsts)
    shared = Shared(scan.duplicates, scan.repeats, done, collapsed)
    counts = {PENDING: 0, SKIPPED: 0, ERROR: 0, REPEAT: 0}
    finished = []
    for part in manifest.parts:
        frames = []
        for frame in _planned_frames(part, job, shared, counts):
            if counts[PENDING]:
                return None
            frames.append(frame.drop(columns=["payload"]))
        finished.append((part, frames))
    return NothingToRender(scan, finished, counts)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(results_table(frame), sink)
    return sink.getvalue().to_pybytes()


def scan_manifest(manifest: Manifest, storage_options: dict, concurrency: int) -> IdScan:
    """`scan_ids` with each part's ids computed by a Ray task (no CPU asked), `concurrency` at a time."""
    scan_part = ray.remote(num_cpus=0)(_scan_part)
    parts, waiting = [None] * len(manifest.parts), {}
    for index, part in enumerate(manifest.parts):
        if len(waiting) >= concurrency:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            parts[waiting.pop(ready[0])] = ray.get(ready[0])
        waiting[scan_part.remote(manifest.uri, storage_options, part)] = index
    for ref, index in waiting.items():
        parts[index] = ray.get(ref)
    return scan_ids(manifest, parts)


def _scan_part(uri: str, storage_options: dict, part: ManifestPart) -> PartIds:
    return part_ids(open_fs(uri, storage_options)[0], part)


def parts_dataset(parts: list[ManifestPart]):
    """One block per part, so that each part is its own planning task."""
    items = [{"part": json.dumps(asdict(p))} for p in parts]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def planned_dataset(parts: list[ManifestPart], inputs: PlanInputs, concurrency: int):
    """The planned rows of every part, as a stream (see the module notes); a dry run's part summaries."""
    return parts_dataset(parts).map_batches(
        dry_part if inputs.dry_run else plan_part, fn_kwargs={"inputs": inputs}, batch_size=1, batch_format="numpy",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(concurrency, len(parts)))),
    )

