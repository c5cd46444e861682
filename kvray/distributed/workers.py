"""The four model stages as Ray Data actor callables (one actor pool each), over the rows of `rows.py`."""

from __future__ import annotations

import json
import pickle
import time

import pandas as pd
from safetensors.torch import load as unpack_tensors
from safetensors.torch import save as pack_tensors

from ..config.runtime import RuntimeConfig
from ..config.stages import STAGES
from ..io.atomic import write_atomic, write_json
from ..io.layout import meta_path, video_path
from ..io.opening import open_fs
from ..io.posters import write_stills
from ..io.video import CONTENT_TYPES
from ..pipeline import VideoRequest, load_first_frames
from ..pipeline.device import stack_description, torch_device
from ..pipeline.pipeline import Video
from ..pipeline.samples import dataset_sample, video_metadata
from ..pipeline.stages import Decode, EncodeText, Interpolate, Keyframes, text_from_tensors, text_tensors
from .rows import FILTERED, OK, StageWorker


class ModelWorker(StageWorker):
    """A stage that runs networks: fixes its CPU thread count (on the CPU the frames depend on it), keeps
    an actor without GPUs off the GPUs of its host, and records the stack it computes on."""

    def setup(self) -> None:
        runtime = self.job.runtime
        if not self.gpu_ids and runtime.device == "auto":
            # An actor without GPUs may still see every GPU of its host: keep it off them.
            runtime = runtime.model_copy(update={"device": "cpu"})
        if runtime.threads is None:
            runtime = runtime.model_copy(update={"threads": max(1, round(self.deployment.cpus))})
        self.load(runtime)
        self.placement["stack"] = stack_description(runtime, torch_device(runtime))

    def load(self, runtime: RuntimeConfig) -> None:
        raise NotImplementedError


def _requests(rows: pd.DataFrame) -> list[VideoRequest]:
    return [VideoRequest.model_validate_json(r) for r in rows["request"]]


def _texts(rows: pd.DataFrame):
    """Each row's text: a TextCondition, or one per scene of a mini-movie (`text_tensors` layout)."""
    return [text_from_tensors(unpack_tensors(p)) for p in rows["payload"]]


class EncodeTextWorker(ModelWorker):
    stage = "text"

    def load(self, runtime):
        self.encode = EncodeText.from_source(self.job.models, runtime)

    def process(self, rows):
        texts, truncated = self.encode([r.prompts for r in _requests(rows)])
        return {
            i: {"payload": pack_tensors(text_tensors(t)), "prompt_truncated": cut}
            for i, t, cut in zip(rows.index, texts, truncated)
        }


class KeyframesWorker(ModelWorker):
    stage = "keyframes"

    def load(self, runtime):
        self.keyframes = Keyframes.from_source(self.job.models, runtime)

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
                outcome[i] = {"payload": pack_tensors({**text_tensors(texts[k]), "latents": latent.contiguous()})}
        return outcome


class InterpolateWorker(ModelWorker):
    stage = "interpolate"

    def load(self, runtime):
        self.interpolate = Interpolate.from_source(self.job.models, runtime)

    def process(self, rows):
        payloads = [unpack_tensors(p) for p in rows["payload"]]
        texts = [text_from_tensors(p) for p in payloads]
        videos = self.interpolate(_requests(rows), texts, [p["latents"] for p in payloads])
        # The text is not needed any more: only the latents travel on.
        return {i: {"payload": pack_tensors({"latents": v.contiguous()})} for i, v in zip(rows.index, videos)}


class DecodeAndWriteWorker(ModelWorker):
    """The last model stage: frames, quality signals and filters, then the outputs of the job's layout.
    Files: the video (unless filtered out and not kept), then its metadata, the commit record. WebDataset:
    the finished sample travels on to the shard writer, which commits it."""

    stage = "decode"

    def load(self, runtime):
        self.decode = Decode.from_source(self.job.models, runtime)
        self.fs, self.root = open_fs(self.job.out, self.job.storage_options)
        self.dataset = self.job.dataset

    def process(self, rows):
        outcome = {}
        for i, request in zip(rows.index, _requests(rows)):
            row = rows.loc[i]
            path = video_path(self.root, row["video_id"], self.job.video_format)
            uri = self.fs.unstrip_protocol(path)
            if self.dataset.layout == "files" and self.fs.exists(meta_path(self.root, row["video_id"])):
                # A retried task (its actor died after writing) or the same request twice: written once.
                outcome[i] = {"status": OK, "uri": uri, "payload": b""}
                continue
            start = time.perf_counter()
            latents = unpack_tensors(row["payload"])["latents"]
            video = Video(request, self.decode(latents, request=request), bool(row["prompt_truncated"]))
            encoded = video.encode(self.job.video_format)
            seconds = {s: float(row[f"seconds_{s}"]) for s in STAGES}
            seconds["decode"] = time.perf_counter() - start
            metadata = video_metadata(video, row_id=row["id"], video_id=row["video_id"],
                                      model_version=self.job.models.version, video_format=self.job.video_format,
                                      seconds=seconds, placement={**json.loads(row["placement"]), "decode": self.placement},
                                      uri=uri)
            sample = dataset_sample(video, metadata, self.dataset, encoded=encoded, latents=latents)
            status = FILTERED if sample.filtered else OK
            reasons = "; ".join(sample.metadata["filter_reasons"])
            write_stills(self.fs, self.root, row["video_id"], video.frames, video.fps)
            if self.dataset.layout == "webdataset":
                outcome[i] = {"status": status, "error": reasons, "payload": pickle.dumps(sample.to_row())}
                continue
            kept = status == OK or self.dataset.keep_filtered
            if kept:
                write_atomic(self.fs, path, encoded, content_type=CONTENT_TYPES[self.job.video_format])
            # The metadata is written last: its presence marks the video as done (resume skips it).
            write_json(self.fs, meta_path(self.root, row["video_id"]), {**sample.metadata, "uri": uri if kept else None})
            outcome[i] = {"status": status, "uri": uri if kept else "", "error": reasons, "payload": b""}
        return outcome


WORKERS = {w.stage: w for w in (EncodeTextWorker, KeyframesWorker, InterpolateWorker, DecodeAndWriteWorker)}
