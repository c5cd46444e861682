"""Ray Data callables: planning rows (tasks) and the four model stages (one actor pool each).

Rows carry small things only: the request, status, timings, and one `payload` of tensors between
model stages (text context, keyframe latents, video latents: at most a few MB). Decoded pixels are
written to storage by the last stage and never enter Ray's object store.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import pandas as pd
import pyarrow as pa
import ray
import torch
from safetensors.torch import load as unpack_tensors
from safetensors.torch import save as pack_tensors

from ..config.job import RenderJob
from ..config.runtime import RuntimeConfig
from ..io.storage import open_fs, write_atomic, write_json
from ..pipeline import VideoRequest, load_first_frames
from ..pipeline.manifest import plan_row
from ..pipeline.stages import Decode, EncodeText, Interpolate, Keyframes, text_from_tensors, text_tensors
from ..sampling import TextCondition

log = logging.getLogger(__name__)

PENDING, OK, ERROR, SKIPPED = "pending", "ok", "error", "skipped"
STAGE_NAMES = ("text", "keyframes", "interpolate", "decode")
RESULT_COLUMNS = ["id", "video_id", "status", "uri", "error", "seed", "prompt_truncated",
                  *(f"seconds_{s}" for s in STAGE_NAMES)]


def video_path(job_out_root: str, video_id: str, fmt: str) -> str:
    return f"{job_out_root}/videos/{video_id}.{fmt}"


def meta_path(job_out_root: str, video_id: str) -> str:
    return f"{job_out_root}/meta/{video_id}.json"


@functools.lru_cache(maxsize=4)
def _job(job_json: str) -> RenderJob:
    return RenderJob.model_validate_json(job_json)


def plan_rows(batch: pa.Table, job_json: str) -> pd.DataFrame:
    """Manifest rows -> planned rows: validated request, ids, and `skipped` where the video already exists."""
    job = _job(job_json)
    fs, root = open_fs(job.out, job.storage_options)
    preset = job.models.model_preset
    rows = []
    for row in batch.to_pylist():
        planned = plan_row(row, job.defaults, job.models.version, (preset.default_width, preset.default_height))
        status, uri = (ERROR, "") if planned.request is None else (PENDING, "")
        if planned.request is not None and fs.exists(meta_path(root, planned.video_id)):
            status, uri = SKIPPED, fs.unstrip_protocol(video_path(root, planned.video_id, job.video_format))
        rows.append({
            "id": planned.id, "video_id": planned.video_id, "status": status, "uri": uri, "error": planned.error,
            "seed": planned.request.seed if planned.request else -1, "prompt_truncated": False,
            "request": planned.request.model_dump_json() if planned.request else "",
            **{f"seconds_{s}": 0.0 for s in STAGE_NAMES}, "gpus": "{}", "payload": b"",
        })
    return pd.DataFrame(rows)


class StageWorker:
    """One model stage on the GPUs Ray gave this actor; rows that are not pending pass through."""

    stage: str

    def __init__(self, job_json: str, registry_name: str, emit_rows: int):
        start = time.perf_counter()
        # Output blocks of the next stage's batch size, so that every actor of its pool gets work.
        self.emit_rows = emit_rows
        self.job = _job(job_json)
        deployment = self.job.deployment.stage(self.stage)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        torch.set_num_threads(max(1, round(deployment.cpus)))
        runtime = self.job.runtime
        if not self.gpu_ids and runtime.device == "auto":
            # An actor without GPUs may still see every GPU of its host: keep it off them.
            runtime = runtime.model_copy(update={"device": "cpu"})
        self.setup(runtime)
        self.registry = ray.get_actor(registry_name)
        self.registry.register.remote(self.stage, self.gpu_ids, os.getpid(), ray.get_runtime_context().get_node_id(),
                                      time.perf_counter() - start)

    def setup(self, runtime: RuntimeConfig) -> None:
        raise NotImplementedError

    def process(self, rows: pd.DataFrame) -> dict[int, dict | str]:
        """For each row index: the columns to update, or an error message."""
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame):
        batch = self._run(batch)
        for start in range(0, len(batch), self.emit_rows):
            yield batch.iloc[start:start + self.emit_rows]

    def _run(self, batch: pd.DataFrame) -> pd.DataFrame:
        pending = batch.index[batch["status"] == PENDING]
        if len(pending) == 0:
            return batch
        start = time.perf_counter()
        try:
            outcome = self.process(batch.loc[pending])
        except Exception as err:  # a failing batch fails its rows, not the run
            log.exception("%s failed on %d rows", self.stage, len(pending))
            outcome = {i: f"{self.stage}: {type(err).__name__}: {err}" for i in pending}
        seconds = (time.perf_counter() - start) / len(pending)
        self.registry.count.remote(self.stage)
        for i in pending:
            result = outcome[i]
            if isinstance(result, str):
                batch.at[i, "status"], batch.at[i, "error"], batch.at[i, "payload"] = ERROR, result, b""
                continue
            for column, value in result.items():
                batch.at[i, column] = value
            batch.at[i, f"seconds_{self.stage}"] = seconds
            gpus = json.loads(batch.at[i, "gpus"])
            gpus[self.stage] = self.gpu_ids
            batch.at[i, "gpus"] = json.dumps(gpus)
        return batch


def _requests(rows: pd.DataFrame) -> list[VideoRequest]:
    return [VideoRequest.model_validate_json(r) for r in rows["request"]]


def _texts(rows: pd.DataFrame) -> list[TextCondition | tuple[TextCondition, ...]]:
    """Each row's text: a TextCondition, or one per scene of a mini-movie (`text_tensors` layout)."""
    return [text_from_tensors(unpack_tensors(p)) for p in rows["payload"]]


class EncodeTextWorker(StageWorker):
    stage = "text"

    def setup(self, runtime):
        self.encode = EncodeText(self.job.models, runtime)

    def process(self, rows):
        texts, truncated = self.encode([r.prompts for r in _requests(rows)])
        return {
            i: {"payload": pack_tensors(text_tensors(t)), "prompt_truncated": cut}
            for i, t, cut in zip(rows.index, texts, truncated)
        }


class KeyframesWorker(StageWorker):
    stage = "keyframes"

    def setup(self, runtime):
        self.keyframes = Keyframes(self.job.models, runtime)

    def process(self, rows):
        requests, texts = _requests(rows), _texts(rows)
        outcome, images, good = {}, [], []
        for i, request in zip(rows.index, requests):
            try:
                images.append(load_first_frames([request], self.job.storage_options, self.job.images)[0])
                good.append(i)
            except ValueError as err:
                outcome[i] = f"image: {err}"
        keep = [rows.index.get_loc(i) for i in good]
        if keep:
            latents = self.keyframes([requests[k] for k in keep], [texts[k] for k in keep], images)
            for i, k, latent in zip(good, keep, latents):
                t = texts[k]
                outcome[i] = {"payload": pack_tensors({**text_tensors(t), "latents": latent.contiguous()})}
        return outcome


class InterpolateWorker(StageWorker):
    stage = "interpolate"

    def setup(self, runtime):
        self.interpolate = Interpolate(self.job.models, runtime)

    def process(self, rows):
        payloads = [unpack_tensors(p) for p in rows["payload"]]
        texts = [text_from_tensors(p) for p in payloads]
        videos = self.interpolate(_requests(rows), texts, [p["latents"] for p in payloads])
        # The text is not needed any more: only the latents travel on.
        return {i: {"payload": pack_tensors({"latents": v.contiguous()})} for i, v in zip(rows.index, videos)}


class DecodeAndWriteWorker(StageWorker):
    stage = "decode"

    def setup(self, runtime):
        self.decode = Decode(self.job.models, runtime)
        self.fs, self.root = open_fs(self.job.out, self.job.storage_options)

    def process(self, rows):
        from ..pipeline.pipeline import Video

        outcome = {}
        for i, request in zip(rows.index, _requests(rows)):
            row = rows.loc[i]
            path = video_path(self.root, row["video_id"], self.job.video_format)
            if self.fs.exists(meta_path(self.root, row["video_id"])):
                # A retried task (its actor died after writing) or the same request twice: written once.
                outcome[i] = {"status": OK, "uri": self.fs.unstrip_protocol(path), "payload": b""}
                continue
            start = time.perf_counter()
            latents = unpack_tensors(row["payload"])["latents"]
            video = Video(request, self.decode(latents, request=request), bool(row["prompt_truncated"]))
            data = video.encode(self.job.video_format)
            write_atomic(self.fs, path, data)
            timings = {s: float(row[f"seconds_{s}"]) for s in STAGE_NAMES}
            timings["decode"] = time.perf_counter() - start
            gpus = {**json.loads(row["gpus"]), "decode": self.gpu_ids}
            # The metadata is written last: its presence marks the video as done (resume skips it).
            write_json(self.fs, meta_path(self.root, row["video_id"]), {
                "id": row["id"], "video_id": row["video_id"], "request": request.model_dump(mode="json"),
                "seed": request.seed, "mode": request.mode, "model_version": self.job.models.version,
                "frames": int(video.frames.shape[0]), "width": request.width, "height": request.height,
                "fps": str(video.fps), "scenes": video.scenes, "format": self.job.video_format,
                "prompt_truncated": video.prompt_truncated,
                "seconds": timings, "gpu_ids": gpus, "uri": self.fs.unstrip_protocol(path),
            })
            outcome[i] = {"status": OK, "uri": self.fs.unstrip_protocol(path), "payload": b""}
        return outcome


WORKERS = {w.stage: w for w in (EncodeTextWorker, KeyframesWorker, InterpolateWorker, DecodeAndWriteWorker)}
