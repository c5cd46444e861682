"""The four stages of Kandinsky Video 1.1, Ray-free, each over a batch of requests.

| stage       | networks                    | in                                 | out                          |
|-------------|-----------------------------|------------------------------------|------------------------------|
| EncodeText  | T5 encoder + projections    | prompts                            | one TextCondition per prompt |
| Keyframes   | keyframe U-Net + image MoVQ | requests, texts, first images      | (12, 4, h, w) latents each   |
| Interpolate | interpolation U-Net         | requests, texts, keyframe latents  | (12/45/177, 4, h, w) each    |
| Decode      | temporal MoVQ decoder       | one video's latents                | uint8 frames (f, h, w, c)    |

Every request draws its noise from its own generators, seeded from its seed and the stage, so a
request gives the same video alone or in any batch, in one process or spread over machines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import RuntimeConfig
from ..sampling import GeneratorNoise, SamplingConfig, TextCondition, interpolate, interpolation_passes
from ..sampling.loops import sample_first_frame, sample_keyframes
from ..config.models import ModelSource
from ..weights.bundle import load_model, load_tokenizer
from .frames import decode_chunks, image_to_tensor, to_uint8
from .request import VideoRequest

# progress(stage, step_index, num_steps)
Progress = Callable[[str, int, int], None]


def stage_seed(seed: int, stage: str) -> int:
    """An independent 63-bit seed per (request seed, stage): stages may run in different processes."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generators(requests: Sequence[VideoRequest], stage: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(stage_seed(r.seed, stage)) for r in requests]


def _groups(requests: Sequence[VideoRequest], key: Callable[[VideoRequest], object]) -> list[list[int]]:
    """Indices of requests that can share U-Net calls (same latent size, same step counts, ...)."""
    groups: dict[object, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(key(request), []).append(index)
    return list(groups.values())


def _step_callback(progress: Progress | None, stage: str):
    return None if progress is None else (lambda index, steps, _t: progress(stage, index, steps))


class EncodeText:
    """Each distinct prompt of a batch is encoded once; every request gets its own, uncut-by-batch context."""

    networks = ("text_encoder",)

    def __init__(self, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig()):
        self.device = runtime.torch_device()
        self.encoder = load_model(models, "text_encoder", self.device, runtime.dtype("text_encoder"))
        self.tokenizer = load_tokenizer(models)
        self.tokens_length = models.model_preset.text_encoder.tokens_length

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> tuple[list[TextCondition], list[bool]]:
        """Contexts (float32, on the CPU: they travel between stages) and, per prompt, whether it was truncated."""
        from ..models.text_encoder import tokenize

        unique = list(dict.fromkeys(prompts))
        tokens = tokenize(self.tokenizer, unique, self.tokens_length)
        context, mask = self.encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        # Each prompt cut to its own length (real tokens + 1), as the official encoder cuts a prompt alone.
        lengths = (tokens.attention_mask.sum(-1) + 1).clamp(max=self.tokens_length)
        texts = TextCondition.from_batch(context.float().cpu(), mask.cpu(), lengths)
        by_prompt = {p: (t, truncated) for p, t, truncated in zip(unique, texts, tokens.truncated)}
        return [by_prompt[p][0] for p in prompts], [by_prompt[p][1] for p in prompts]


class Keyframes:
    """The first frame (drawn in image mode at twice the size, or the user's image) and 12 keyframes."""

    networks = ("keyframe_unet", "image_movq")

    def __init__(self, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig(),
                 sampling: SamplingConfig = SamplingConfig()):
        self.device = runtime.torch_device()
        self.unet = load_model(models, "keyframe_unet", self.device, runtime.dtype("keyframe_unet"))
        self.movq = load_model(models, "image_movq", self.device, runtime.dtype("image_movq"))
        self.sampling = sampling

    def __call__(self, requests: Sequence[VideoRequest], texts: Sequence[TextCondition],
                 images: Sequence[Image.Image | None], progress: Progress | None = None):
        """Per request, its keyframe latents (12, 4, h, w) float32 on the CPU. `images`: the first frame of
        each image2video request, None for text2video."""
        latents: list[torch.Tensor | None] = [None] * len(requests)
        for group in _groups(requests, lambda r: (r.width, r.height, r.steps)):
            out = self._group([requests[i] for i in group], [texts[i] for i in group], [images[i] for i in group], progress)
            for i, latent in zip(group, out):
                latents[i] = latent
        return latents

    @torch.inference_mode()
    def _group(self, requests, texts, images, progress):
        request = requests[0]
        texts = [t.to(self.device) for t in texts]
        generators = _generators(requests, "keyframes")
        drawn = [i for i, image in enumerate(images) if image is None]
        if drawn:
            # text2video: the first frame at (height/4, width/4) latents, i.e. twice the video's size.
            sampler = self.sampling.first_frame
            if request.steps is not None:
                sampler = sampler.model_copy(update={"num_steps": request.steps})
            latents = sample_first_frame(
                self.unet, [texts[i] for i in drawn], (request.height // 4, request.width // 4),
                GeneratorNoise([generators[i] for i in drawn]), guidance=[requests[i].guidance for i in drawn],
                sampler=sampler, callback=_step_callback(progress, "first frame"),
            )
            images = list(images)
            for i, latent in zip(drawn, latents):
                # One image per decode: the MoVQ attention modulates a batch with its first latent.
                images[i] = Image.fromarray(self._decode_image(latent[None])[0])
        # One image per encode too: batched convolutions round differently, and the keyframe sampling
        # amplifies a 1e-7 difference of its condition a thousandfold.
        conditions = torch.cat([
            self.movq.encode(image_to_tensor(image, request.width, request.height).to(self.device, self._movq_dtype()))
            for image in images
        ]).float()
        sampler = self.sampling.keyframes
        if request.steps is not None:
            sampler = sampler.model_copy(update={"num_steps": request.steps})
        keyframes = sample_keyframes(
            self.unet, texts, conditions, GeneratorNoise(generators),
            motion=[r.motion for r in requests], num_frames=self.sampling.num_keyframes,
            guidance=[r.guidance for r in requests], noise_augmentation=self.sampling.noise_augmentation,
            sampler=sampler, callback=_step_callback(progress, "keyframes"),
        )
        return keyframes.cpu()

    def _movq_dtype(self) -> torch.dtype:
        return next(self.movq.parameters()).dtype

    def _decode_image(self, latent: torch.Tensor) -> np.ndarray:
        return to_uint8(self.movq.decode(latent.to(self.device, self._movq_dtype())))


class Interpolate:
    """0, 1 or 2 interpolation passes (fps low / medium / high): 12 -> 45 -> 177 latent frames."""

    networks = ("interpolation_unet",)

    def __init__(self, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig(),
                 sampling: SamplingConfig = SamplingConfig()):
        self.device = runtime.torch_device()
        self.unet = load_model(models, "interpolation_unet", self.device, runtime.dtype("interpolation_unet"))
        self.sampling = sampling

    @torch.inference_mode()
    def __call__(self, requests: Sequence[VideoRequest], texts: Sequence[TextCondition],
                 keyframes: Sequence[torch.Tensor], progress: Progress | None = None) -> list[torch.Tensor]:
        """Per request, its latent video (T, 4, h, w) float32 on the CPU."""
        videos: list[torch.Tensor] = list(keyframes)
        for group in _groups(requests, lambda r: (r.fps, r.width, r.height, r.interpolation_steps)):
            request = requests[group[0]]
            sampler = self.sampling.interpolation
            if request.interpolation_steps is not None:
                sampler = sampler.model_copy(update={"num_steps": request.interpolation_steps})
            noise = GeneratorNoise(_generators([requests[i] for i in group], "interpolation"))
            frames = torch.stack([videos[i] for i in group]).to(self.device)
            group_texts = [texts[i].to(self.device) for i in group]
            for skip_frames in interpolation_passes(request.fps):
                frames = interpolate(
                    self.unet, group_texts, frames, noise, skip_frames=skip_frames,
                    guidance=[requests[i].guidance for i in group], sampler=sampler,
                    callback=_step_callback(progress, "interpolation"),
                )
            for i, video in zip(group, frames):
                videos[i] = video.cpu()
        return videos


class Decode:
    """Latents to uint8 frames with the temporal MoVQ, in the official chunks of 4 to 5 frames."""

    networks = ("video_movq",)

    def __init__(self, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig()):
        self.device = runtime.torch_device()
        self.movq = load_model(models, "video_movq", self.device, runtime.dtype("video_movq"))

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, progress: Progress | None = None) -> np.ndarray:
        """One video (T, 4, h, w) -> (T, H, W, 3) uint8. A chunk is one clip to the temporal layers."""
        dtype = next(self.movq.parameters()).dtype
        frames, start = [], 0
        sizes = decode_chunks(latents.shape[0])
        for index, size in enumerate(sizes):
            chunk = latents[start:start + size].to(self.device, dtype)
            frames.append(to_uint8(self.movq.decode(chunk)))
            start += size
            if progress is not None:
                progress("decode", index, len(sizes))
        return np.concatenate(frames)
