"""The four stages of Kandinsky Video 1.1, Ray-free, each over a batch of requests.

| stage       | networks                    | in                                 | out                          |
|-------------|-----------------------------|------------------------------------|------------------------------|
| EncodeText  | T5 encoder + projections    | prompts (a scene list: its prompts)| one text per prompt (list)   |
| Keyframes   | keyframe U-Net + image MoVQ | requests, texts, first images      | (12, 4, h, w) latents each   |
| Interpolate | interpolation U-Net         | requests, texts, keyframe latents  | (12/45/177, 4, h, w) each    |
| Decode      | temporal MoVQ decoder       | one video's latents                | uint8 frames (f, h, w, c)    |

Reproducibility. Every request draws its noise from its own generators, seeded from its seed and the
stage, and (with `RuntimeConfig.batch_invariant`, the default) every network call holds one request:
its guidance branches batched together, never another request's samples. A request's frames then
depend only on the request, the weights and the software/hardware stack (device, kernel library
versions, and on the CPU the thread count), never on the other requests of its batch, its position in
it, a retry, or how the stages are spread over processes. Batched kernels round differently for
different batch shapes, and the samplers amplify a 1e-7 difference into a different video, so mixing
requests in one call (`batch_invariant: false`) trades this guarantee for speed.

Mini-movies (`request.scenes`) and animations run through the same four stages, each stage doing all of
a request's work in one visit:

* A request's "text" is a TextCondition, or a tuple of them, one per scene (`EncodeText` given the
  request's `prompts`); `text_tensors` / `text_from_tensors` pack either for transport.
* Keyframes: scene 1 as a plain request; then each later scene as image2video from the previous
  scene's LAST keyframe, decoded with the image MoVQ and re-encoded exactly as a user's image (the last
  keyframe is the scene's last frame: interpolation keeps keyframes). Scenes run one after the other
  (a dependency), batched across the requests of the batch. Out: the scenes' keyframes, concatenated.
  Animation: frame 0 as text2video / image2video, then 24 redrawn keyframes (`animation.py`).
* Interpolate: every scene on its own (no frames are made across a scene cut), all scenes of all
  requests in one batch per shape; animation: one pass over its 25 keyframes (or the warp fill at
  strength 0), the extra last frame dropped -> 96.
* Decode: with `request`, each scene is chunked as its own video.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config.models import ModelSource
from ..config.presets import ModelPreset
from ..config.runtime import RuntimeConfig
from ..config.sampling import SamplingConfig, interpolation_passes
from ..requests.request import ANIMATION_FRAMES, VideoRequest
from ..sampling import GeneratorNoise, TextCondition, interpolate, sample_first_frame, sample_keyframes
from ..weights.stage_models import load_model, load_tokenizer
from .animation import FILL_SKIP_FRAMES, animate_keyframes, frame_poses, keyframe_poses, warp_fill
from .device import Denoiser, network_dtype, prepare, torch_device
from .frames import decode_chunks, image_to_tensor, to_uint8

# progress(stage, step_index, num_steps)
Progress = Callable[[str, int, int], None]


def stage_seed(seed: int, stage: str) -> int:
    """An independent 63-bit seed per (request seed, stage): stages may run in different processes."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generators(requests: Sequence[VideoRequest], stage: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(stage_seed(r.seed, stage)) for r in requests]


def _groups(items: Sequence, key: Callable[[object], object], runtime: RuntimeConfig) -> list[list[int]]:
    """Indices of the items that share network calls: each item alone when batch invariant, else the
    items that agree on `key` (same latent size, same step counts, ...)."""
    if runtime.batch_invariant:
        return [[index] for index in range(len(items))]
    groups: dict[object, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    return list(groups.values())


def _step_callback(progress: Progress | None, stage: str):
    return None if progress is None else (lambda index, steps, _t: progress(stage, index, steps))


# One request's encoded text: one TextCondition, or one per scene of a mini-movie.
Text = TextCondition | tuple[TextCondition, ...]


def scene_texts(text: Text, request: VideoRequest | None = None) -> tuple[TextCondition, ...]:
    """The per-scene texts of one request (checked against its scene count when `request` is given)."""
    texts = (text,) if isinstance(text, TextCondition) else tuple(text)
    if request is not None and len(texts) != request.num_scenes:
        raise ValueError(f"a request of {request.num_scenes} scene(s) came with {len(texts)} encoded prompt(s): "
                         "EncodeText must be given each request's `prompts`")
    return texts


def text_tensors(text: Text) -> dict[str, torch.Tensor]:
    """One request's text as named tensors (for safetensors): `context`, `mask` for the first scene (the
    layout of a plain request), `context.1`, `mask.1`, ... for the later ones."""
    out = {}
    for index, scene in enumerate(scene_texts(text)):
        suffix = f".{index}" if index else ""
        out[f"context{suffix}"] = scene.context.contiguous()
        out[f"mask{suffix}"] = scene.mask.contiguous()
    return out


def text_from_tensors(tensors: dict[str, torch.Tensor]) -> Text:
    """The inverse of `text_tensors` (other entries, such as latents, are ignored)."""
    scenes = [TextCondition(tensors["context"], tensors["mask"])]
    while f"context.{len(scenes)}" in tensors:
        scenes.append(TextCondition(tensors[f"context.{len(scenes)}"], tensors[f"mask.{len(scenes)}"]))
    return scenes[0] if len(scenes) == 1 else tuple(scenes)


def _scene_stage(stage: str, scene: int) -> str:
    """The generator name of a scene's stage: the plain name for the first scene (a one-scene movie is
    the plain request, draw for draw)."""
    return stage if scene == 0 else f"{stage}/scene-{scene + 1}"


def load_networks(models: ModelSource, runtime: RuntimeConfig, names: Sequence[str]) -> list[nn.Module]:
    """A stage's networks from `models`, on the runtime's device in its dtypes (the runtime's thread
    count and precision settings applied first): what every stage's `from_source` does."""
    device = torch_device(runtime)
    prepare(runtime, device)
    return [load_model(models, name, device, network_dtype(runtime, name, device)) for name in names]


def _device_of(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def _with_steps(sampler, steps: int | None):
    return sampler if steps is None else sampler.model_copy(update={"num_steps": steps})


class EncodeText:
    """Each distinct prompt of a batch is encoded once; every request gets its own, uncut-by-batch context."""

    networks = ("text_encoder",)

    def __init__(self, encoder: nn.Module, tokenizer, tokens_length: int, runtime: RuntimeConfig = RuntimeConfig()):
        self.encoder, self.tokenizer, self.tokens_length, self.runtime = encoder, tokenizer, tokens_length, runtime
        self.device = _device_of(encoder)

    @classmethod
    def from_source(cls, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig(), tokenizer=None) -> EncodeText:
        """`tokenizer`: instead of the preset's (estimates run offline with a stand-in)."""
        (encoder,) = load_networks(models, runtime, cls.networks)
        return cls(encoder, tokenizer if tokenizer is not None else load_tokenizer(models),
                   models.model_preset.text_encoder.tokens_length, runtime)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str | Sequence[str]]) -> tuple[list[Text], list[bool]]:
        """Contexts (float32, on the CPU: they travel between stages) and, per item, whether a prompt was
        truncated. An item is a prompt (-> a TextCondition) or a sequence of scene prompts, such as
        `request.prompts` (-> a tuple of TextConditions, one per scene)."""
        flat = [p for item in prompts for p in ((item,) if isinstance(item, str) else item)]
        texts, truncated = self._encode(flat) if flat else ([], [])
        out, cut, start = [], [], 0
        for item in prompts:
            if isinstance(item, str):
                out.append(texts[start])
                cut.append(truncated[start])
                start += 1
            else:
                out.append(tuple(texts[start:start + len(item)]))
                cut.append(any(truncated[start:start + len(item)]))
                start += len(item)
        return out, cut

    def _encode(self, prompts: Sequence[str]) -> tuple[list[TextCondition], list[bool]]:
        unique = list(dict.fromkeys(prompts))
        by_prompt = {}
        for group in _groups(unique, lambda prompt: None, self.runtime):
            batch = [unique[i] for i in group]
            by_prompt.update(zip(batch, zip(*self._encode_batch(batch))))
        return [by_prompt[p][0] for p in prompts], [by_prompt[p][1] for p in prompts]

    def _encode_batch(self, prompts: Sequence[str]) -> tuple[list[TextCondition], tuple[bool, ...]]:
        from ..models.text_encoder import tokenize

        # Every prompt is padded to tokens_length, so a call's shape does not depend on the prompt.
        tokens = tokenize(self.tokenizer, prompts, self.tokens_length)
        # Each prompt cut to its own length (real tokens + 1), as the official encoder cuts a prompt alone;
        # the lengths come from the tokens on the host, so the encoder need not read them off the device.
        lengths = (tokens.attention_mask.sum(-1) + 1).clamp(max=self.tokens_length)
        context, mask = self.encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device),
                                     length=int(lengths.max()))
        return TextCondition.from_batch(context.float().cpu(), mask.cpu(), lengths), tokens.truncated


def _keyframe_group(request: VideoRequest) -> tuple:
    """What requests must share to share the Keyframes stage's U-Net calls."""
    if request.mode == "animation":
        return ("animation", request.width, request.height, request.steps, request.denoise_strength)
    return ("video", request.width, request.height, request.steps)


class Keyframes:
    """The first frame (drawn in image mode at twice the size, or the user's image) and 12 keyframes per
    scene; for an animation, the first frame and its redrawn keyframes."""

    networks = ("keyframe_unet", "image_movq")

    def __init__(self, unet: nn.Module, movq: nn.Module, preset: ModelPreset, runtime: RuntimeConfig = RuntimeConfig(),
                 sampling: SamplingConfig = SamplingConfig()):
        self.unet, self.movq, self.preset, self.runtime = unet, movq, preset, runtime
        self.sampling = sampling.for_keyframe_unet(preset.keyframe_prediction)
        self.device = _device_of(unet)

    @classmethod
    def from_source(cls, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig(),
                    sampling: SamplingConfig = SamplingConfig()) -> Keyframes:
        return cls(*load_networks(models, runtime, cls.networks), models.model_preset, runtime, sampling)

    def __call__(self, requests: Sequence[VideoRequest], texts: Sequence[Text],
                 images: Sequence[Image.Image | None], progress: Progress | None = None):
        """Per request, its keyframe latents float32 on the CPU: (12, 4, h, w) per scene, the scenes
        concatenated; (25, 4, h, w) for an animation. `images`: the first frame of each image2video (or
        animation from an image) request, None where it is drawn from the prompt."""
        latents: list[torch.Tensor | None] = [None] * len(requests)
        texts = [scene_texts(t, r) for t, r in zip(texts, requests)]
        for group in _groups(requests, _keyframe_group, self.runtime):
            run = self._animation if requests[group[0]].mode == "animation" else self._group
            out = run([requests[i] for i in group], [texts[i] for i in group], [images[i] for i in group], progress)
            for i, latent in zip(group, out):
                latents[i] = latent
        return latents

    @torch.inference_mode()
    def _group(self, requests, texts, images, progress):
        """Text2video / image2video requests of one size, scene after scene."""
        texts = [[t.to(self.device) for t in scenes] for scenes in texts]
        generators = _generators(requests, "keyframes")
        conditions = self._first_frames(requests, [t[0] for t in texts], images, generators, progress)
        keyframes = self._keyframes(requests, [t[0] for t in texts], conditions, generators, progress)
        scenes = [[k] for k in keyframes]
        for scene in range(1, max(r.num_scenes for r in requests)):
            # Each later scene is image2video from the previous scene's last frame (its last keyframe),
            # decoded and re-encoded as a user's image would be.
            active = [i for i, r in enumerate(requests) if r.num_scenes > scene]
            last = [Image.fromarray(self._decode_image(scenes[i][-1][-1:])[0]) for i in active]
            conditions = self._encode_images(last, requests[0].width, requests[0].height)
            generators = _generators([requests[i] for i in active], _scene_stage("keyframes", scene))
            keyframes = self._keyframes([requests[i] for i in active], [texts[i][scene] for i in active],
                                        conditions, generators, progress)
            for i, k in zip(active, keyframes):
                scenes[i].append(k)
        return [torch.cat(s).cpu() for s in scenes]

    @torch.inference_mode()
    def _animation(self, requests, texts, images, progress):
        """Animations of one size and strength: frame 0, then the redrawn keyframes."""
        texts = [t[0].to(self.device) for t in texts]
        request = requests[0]
        generators = _generators(requests, "keyframes")
        first = self._first_frames(requests, texts, images, generators, progress)
        denoiser = self.denoiser
        keyframes = animate_keyframes(
            denoiser, texts, first, torch.stack([keyframe_poses(r) for r in requests]), GeneratorNoise(generators),
            size=(request.width, request.height), strength=request.denoise_strength,
            guidance=[r.guidance for r in requests], sampler=_with_steps(self.sampling.first_frame, request.steps),
            progress=None if progress is None else (lambda index, total: progress("animation", index, total)),
            options=denoiser.options(),
        )
        return keyframes.cpu()

    def _first_frames(self, requests, texts, images, generators, progress) -> torch.Tensor:
        """The first frames' latents (R, 4, h, w): the given images, or drawn in image mode (text2video)."""
        request = requests[0]
        drawn = [i for i, image in enumerate(images) if image is None]
        if drawn:
            # text2video: the first frame's latents at `first_frame_scale` times the video's (kv11: twice,
            # height/4 x width/4), decoded, then resized to the video's size and encoded again.
            scale, factor = self.preset.first_frame_scale, self.preset.latent_factor
            denoiser = self.denoiser
            latents = sample_first_frame(
                denoiser, [texts[i] for i in drawn], (scale * request.height // factor, scale * request.width // factor),
                GeneratorNoise([generators[i] for i in drawn]), guidance=[requests[i].guidance for i in drawn],
                sampler=_with_steps(self.sampling.first_frame, request.steps),
                options=denoiser.options(_step_callback(progress, "first frame")),
            )
            images = list(images)
            for i, latent in zip(drawn, latents):
                # One image per decode: the MoVQ attention modulates a batch with its first latent.
                images[i] = Image.fromarray(self._decode_image(latent[None])[0])
        return self._encode_images(images, request.width, request.height)

    def _encode_images(self, images, width: int, height: int) -> torch.Tensor:
        # One image per encode too: batched convolutions round differently, and the keyframe sampling
        # amplifies a 1e-7 difference of its condition a thousandfold.
        return torch.cat([
            self.movq.encode(image_to_tensor(image, width, height).to(self.device, self._movq_dtype()))
            for image in images
        ]).float()

    def _keyframes(self, requests, texts, conditions, generators, progress) -> torch.Tensor:
        denoiser = self.denoiser
        return sample_keyframes(
            denoiser, texts, conditions, GeneratorNoise(generators),
            motion=[r.motion for r in requests], num_frames=self.sampling.num_keyframes,
            guidance=[r.guidance for r in requests], noise_augmentation=[r.noise_augmentation for r in requests],
            sampler=_with_steps(self.sampling.keyframes, requests[0].steps),
            options=denoiser.options(_step_callback(progress, "keyframes")),
        )

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.runtime, self.device)

    def _movq_dtype(self) -> torch.dtype:
        return next(self.movq.parameters()).dtype

    def _decode_image(self, latent: torch.Tensor) -> np.ndarray:
        return to_uint8(self.movq.decode(latent.to(self.device, self._movq_dtype())))


class Interpolate:
    """0, 1 or 2 interpolation passes (fps low / medium / high): 12 -> 45 -> 177 latent frames per scene;
    animation: 25 keyframes -> 96 frames."""

    networks = ("interpolation_unet",)

    def __init__(self, unet: nn.Module, preset: ModelPreset, runtime: RuntimeConfig = RuntimeConfig(),
                 sampling: SamplingConfig = SamplingConfig()):
        self.unet, self.runtime = unet, runtime
        self.sampling = sampling.for_interpolation_unet(preset.interpolation_prediction)
        self.device = _device_of(unet)

    @classmethod
    def from_source(cls, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig(),
                    sampling: SamplingConfig = SamplingConfig()) -> Interpolate:
        return cls(*load_networks(models, runtime, cls.networks), models.model_preset, runtime, sampling)

    @torch.inference_mode()
    def __call__(self, requests: Sequence[VideoRequest], texts: Sequence[Text],
                 keyframes: Sequence[torch.Tensor], progress: Progress | None = None) -> list[torch.Tensor]:
        """Per request, its latent video (T, 4, h, w) float32 on the CPU."""
        # One clip per scene (an animation is one clip): no frame is made across a scene cut.
        clips: list[_Clip] = []
        parts: list[list[torch.Tensor | None]] = []
        for index, (request, text, frames) in enumerate(zip(requests, texts, keyframes)):
            scenes = scene_texts(text, request)
            parts.append([None] * request.num_scenes)
            if request.mode == "animation" and request.denoise_strength == 0:
                # No diffusion at all: the frames between keyframes are warps of them.
                size = (request.width, request.height)
                parts[index][0] = warp_fill(frames.to(self.device), frame_poses(request), size).cpu()
            elif request.mode == "animation":
                clips.append(_Clip(index, 0, (FILL_SKIP_FRAMES,), frames, scenes[0]))
            else:
                if frames.shape[0] % request.num_scenes:
                    raise ValueError(f"{frames.shape[0]} keyframes for {request.num_scenes} scenes")
                for scene, clip in enumerate(frames.chunk(request.num_scenes)):
                    clips.append(_Clip(index, scene, interpolation_passes(request.fps), clip, scenes[scene]))

        def key(clip: _Clip):
            r = requests[clip.request]
            return clip.passes, r.width, r.height, r.interpolation_steps, clip.frames.shape[0]

        for group in _groups(clips, key, self.runtime):
            members = [clips[c] for c in group]
            frames = torch.stack([m.frames for m in members]).to(self.device)
            owners = [requests[m.request] for m in members]
            if members[0].passes:
                noise = GeneratorNoise([
                    torch.Generator().manual_seed(stage_seed(r.seed, _scene_stage("interpolation", m.scene)))
                    for r, m in zip(owners, members)
                ])
                sampler = _with_steps(self.sampling.interpolation, owners[0].interpolation_steps)
                clip_texts = [m.text.to(self.device) for m in members]
                denoiser = Denoiser(self.unet, self.runtime, self.device)
                for skip_frames in members[0].passes:
                    frames = interpolate(
                        denoiser, clip_texts, frames, noise, skip_frames=skip_frames,
                        guidance=[r.guidance for r in owners], sampler=sampler,
                        options=denoiser.options(_step_callback(progress, "interpolation")),
                    )
            for member, video in zip(members, frames):
                parts[member.request][member.scene] = video.cpu()
        videos = [torch.cat(scenes) for scenes in parts]
        # Animation: 4 * 25 - 3 = 97 frames, the last one (past the clip) dropped.
        return [v[:ANIMATION_FRAMES] if r.mode == "animation" else v for r, v in zip(requests, videos)]


class _Clip(NamedTuple):
    """What one interpolation run gets: a scene of a request (or an animation)."""

    request: int  # index in the batch
    scene: int
    passes: tuple[int, ...]  # skip_frames of each pass
    frames: torch.Tensor  # keyframes (N, 4, h, w)
    text: TextCondition


class Decode:
    """Latents to uint8 frames with the temporal MoVQ, in the official chunks of 4 to 5 frames."""

    networks = ("video_movq",)

    def __init__(self, movq: nn.Module):
        self.movq = movq
        self.device = _device_of(movq)

    @classmethod
    def from_source(cls, models: ModelSource, runtime: RuntimeConfig = RuntimeConfig()) -> Decode:
        return cls(*load_networks(models, runtime, cls.networks))

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, progress: Progress | None = None,
                 request: VideoRequest | None = None) -> np.ndarray:
        """One video (T, 4, h, w) -> (T, H, W, 3) uint8. A chunk is one clip to the temporal layers.
        With the `request`, each scene of a mini-movie is chunked as its own video (the official chunks
        of one scene); without, the whole video is (the same but at fps 'high', where the chunks of a
        multi-scene movie would straddle the cuts)."""
        dtype = next(self.movq.parameters()).dtype
        frames, start = [], 0
        scenes = request.num_scenes if request is not None else 1
        if latents.shape[0] % scenes:
            raise ValueError(f"{latents.shape[0]} latent frames for {scenes} scenes")
        sizes = [size for _ in range(scenes) for size in decode_chunks(latents.shape[0] // scenes)]
        for index, size in enumerate(sizes):
            chunk = latents[start:start + size].to(self.device, dtype)
            frames.append(to_uint8(self.movq.decode(chunk)))
            start += size
            if progress is not None:
                progress("decode", index, len(sizes))
        return np.concatenate(frames)
