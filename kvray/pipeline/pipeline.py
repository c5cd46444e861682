"""Text2video, image2video, animation and mini-movies in one process: the four stages back to back on one device."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image

from ..config import RuntimeConfig
from ..config.images import ImagePolicy
from ..config.models import ModelSource
from ..io.images import load_image
from ..io.video import clip_fps, encode_video
from ..requests.request import ANIMATION_FPS, VideoRequest
from ..sampling import SamplingConfig
from .stages import Decode, EncodeText, Interpolate, Keyframes, Progress

log = logging.getLogger(__name__)


@dataclass
class Video:
    request: VideoRequest  # with its seed resolved
    frames: np.ndarray  # (f, h, w, 3) uint8 RGB
    prompt_truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, this video's share

    @property
    def fps(self) -> Fraction:
        """Animation: 24 fps. Otherwise each scene lasts about 5.5 s whatever its frame count, as the
        official clips (a 3-scene movie: 16.5 s)."""
        if self.request.mode == "animation":
            return Fraction(ANIMATION_FPS)
        return clip_fps(max(1, len(self.frames) // self.request.num_scenes))

    @property
    def scenes(self) -> list[dict]:
        """Each scene's prompt and frames (first and last inclusive) and times in seconds; one entry for a
        plain video or an animation. For the metadata JSON."""
        per_scene = len(self.frames) // self.request.num_scenes
        fps = self.fps
        return [
            {"scene": index + 1, "prompt": prompt, "first_frame": index * per_scene,
             "last_frame": (index + 1) * per_scene - 1, "frames": per_scene,
             "start_seconds": round(float(index * per_scene / fps), 4),
             "end_seconds": round(float((index + 1) * per_scene / fps), 4)}
            for index, prompt in enumerate(self.request.prompts)
        ]

    def encode(self, format: str | None = None, path: str | None = None, fps: float | Fraction | None = None) -> bytes:
        return encode_video(self.frames, fps or self.fps, format, path=path)


def with_seed(request: VideoRequest) -> VideoRequest:
    """The request with a seed: its own, or a fresh random one that the result records."""
    return request if request.seed is not None else request.model_copy(update={"seed": secrets.randbits(63)})


def load_first_frames(requests: Sequence[VideoRequest], storage_options: dict | None = None,
                      policy: ImagePolicy | None = None) -> list[Image.Image | None]:
    """The image of each image2video request (None for text2video); raises `ImageError` on a bad one.
    `policy`: where untrusted requests' images may come from (None: the caller's own requests)."""
    return [load_image(r.image, storage_options, policy) if r.image else None for r in requests]


class VideoPipeline:
    """All four stages in one process. `generate` batches its requests through every network."""

    def __init__(self, models: ModelSource = ModelSource(), runtime: RuntimeConfig = RuntimeConfig(),
                 sampling: SamplingConfig = SamplingConfig()):
        self.models = models
        self.encode_text = EncodeText.from_source(models, runtime)
        self.keyframes = Keyframes.from_source(models, runtime, sampling)
        self.interpolate = Interpolate.from_source(models, runtime, sampling)
        self.decode = Decode.from_source(models, runtime)

    def generate(self, requests: Sequence[VideoRequest], *, images: Sequence[Image.Image | None] | None = None,
                 progress: Progress | None = None) -> list[Video]:
        """One video per request, in order. `images`: preloaded first frames (see `load_first_frames`)."""
        requests = [with_seed(r) for r in requests]
        if images is None:
            images = load_first_frames(requests)
        timings: dict[str, float] = {}

        def timed(stage, fn, *args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
            return out

        texts, truncated = timed("text", self.encode_text, [r.prompts for r in requests])
        keyframes = timed("keyframes", self.keyframes, requests, texts, images, progress)
        latents = timed("interpolate", self.interpolate, requests, texts, keyframes, progress)
        frames = [timed("decode", self.decode, video, progress, request=r) for video, r in zip(latents, requests)]
        share = {stage: seconds / len(requests) for stage, seconds in timings.items()}
        return [Video(r, f, t, dict(share)) for r, f, t in zip(requests, frames, truncated)]
