"""A finished video as the dataset holds it: its metadata, its caption, its quality fields, its latents.

The decode stage calls `video_metadata` (the content of meta/{video_id}.json) and, for the webdataset
layout, `dataset_sample` (what the shard stage commits with `kvray.io.shards.write_samples`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import save as pack_tensors

from ..config.dataset import DatasetConfig
from ..config.sampling import FIRST_FRAME_SAMPLER, INTERPOLATION_SAMPLER
from ..io.shards import Sample
from .pipeline import Video
from .quality import quality_fields


def resolved_settings(request) -> dict:
    """The settings a request ran with, defaults filled in (a request leaves its step counts None)."""
    return {"steps": request.steps or FIRST_FRAME_SAMPLER.num_steps,
            "interpolation_steps": request.interpolation_steps or INTERPOLATION_SAMPLER.num_steps,
            "guidance": request.guidance.model_dump(), "motion": request.motion,
            "noise_augmentation": request.noise_augmentation}


def video_metadata(video: Video, *, row_id: str, video_id: str, model_version: str, video_format: str,
                   seconds: Mapping[str, float], placement: Mapping[str, Mapping], uri: str) -> dict:
    """Request and the settings it resolved to, seed, model version, frames, size, frame rate (an exact
    fraction as text), scenes with their times, seconds per stage, where and on what each stage ran
    (GPU ids, node, wall-clock times, the software stack), and where the video lies."""
    request = video.request
    return {
        "id": row_id, "video_id": video_id, "request": request.model_dump(mode="json"),
        "resolved": resolved_settings(request), "seed": request.seed,
        "mode": request.mode, "model_version": model_version, "frames": int(video.frames.shape[0]),
        "frames_sha256": hashlib.sha256(video.frames.tobytes()).hexdigest()[:16],
        "width": request.width, "height": request.height, "fps": str(video.fps), "scenes": video.scenes,
        "format": video_format, "prompt_truncated": video.prompt_truncated, "seconds": dict(seconds),
        "placement": {stage: dict(where) for stage, where in placement.items()}, "uri": uri,
    }


def caption(scenes: Sequence[Mapping]) -> str:
    """The caption of a video from its scenes (`Video.scenes`): one scene -> its prompt; several -> one
    line per scene, `[0.00s-5.50s] prompt`."""
    if not scenes:
        raise ValueError("a video has at least one scene")
    if len(scenes) == 1:
        return scenes[0]["prompt"]
    return "\n".join(f"[{s['start_seconds']:.2f}s-{s['end_seconds']:.2f}s] {s['prompt']}" for s in scenes)


def dataset_sample(video: Video, metadata: Mapping, dataset: DatasetConfig, *, encoded: bytes,
                   latents: torch.Tensor | None = None) -> Sample:
    """The sample of a decoded video: its metadata with the quality fields (signals, `ok` or `filtered`
    and why), its caption, the encoded video and, with `dataset.with_latents`, the latents the decoder got
    (`latents` in a safetensors file)."""
    scene_starts = [scene["first_frame"] for scene in video.scenes[1:]]
    full = {**metadata, **quality_fields(video.frames, dataset.filters, scene_starts=scene_starts)}
    packed = None
    if dataset.with_latents:
        if latents is None:
            raise ValueError("with_latents is set but no latents were given")
        packed = pack_tensors({"latents": latents.detach().cpu().contiguous()})
    return Sample(key=full["video_id"], video=encoded, metadata=full, caption=caption(video.scenes), latents=packed,
                  video_format=full["format"])
