"""The three sampling loops of Kandinsky Video 1.1, for a batch of R requests per call.

Each mirrors an official loop (`kandinsky_video/model/diffusion.py`): `sample_first_frame` =
`p_sample_loop_image`, `sample_keyframes` = `p_sample_loop`, `sample_interpolation` =
`p_sample_loop_interpolation` (and `interpolate` adds the re-assembly of `interpolate_base_frames`).

Batch layout. For one request the U-Net batch is exactly the official one: a block of B guidance
branches x K samples (first frame: 2 x 1; keyframes: 3 x F frames; interpolation: 2 x G groups).
Requests are concatenated block after block ("request-major"). The U-Nets' temporal layers treat every
K consecutive samples as one clip (`(b t)` with t = F frames, or t = G groups for the interpolation
U-Net), so every clip stays one request's branch: for R requests the keyframe U-Net sees b = 3R clips
of F frames, the interpolation U-Net b = 2R clips of G groups, with its temporal mask [1]*G + [0]*G per
request (temporal mixing off in each unconditional half).

Text contexts of different lengths are zero-padded (mask 0) to the longest one of the batch, and the
U-Net then gets `context_lengths` (each sample's own length): the official U-Nets pool the text with
the mean over ALL context positions of the prompt's own (cut) context, so the mean must divide by that
length, not by the padded one (`AttentionPolling`). Attention gives padded positions exactly zero
weight. A request therefore goes through the same computation alone or in any batch, in one U-Net
call per step; only the rounding inside batched float32 kernels differs (~1e-7 relative per U-Net
call, which many guided steps can amplify). `context_lengths` is passed only when lengths differ, so a
batch of equal lengths (and every official replay) calls the U-Net exactly as the official loop.

The denoiser is any callable with the U-Nets' signature (`KeyframeUNet`, `InterpolationUNet`, or a
wrapper around them); the loops run it under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .config import FIRST_FRAME_SAMPLER, INTERPOLATION_SAMPLER, KEYFRAME_SAMPLER, GuidanceConfig, SamplerConfig, motion_score
from .guidance import guide_2way, guide_3way
from .noise import NoiseSource
from .schedulers import add_noise, make_stepper

LATENT_CHANNELS = 4
FRAMES_PER_GROUP = 3  # the interpolation U-Net predicts 3 frames between each pair of input frames

# callback(step_index, num_steps, timestep), called after every step (progress bars).
StepCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class TextCondition:
    """One request's encoded prompt: `context` (L, D) and `mask` (L,) (nonzero = attended)."""

    context: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.context.dim() != 2 or self.mask.dim() != 1 or self.mask.shape[0] != self.context.shape[0]:
            raise ValueError(
                f"TextCondition wants context (L, D) and mask (L,), got {tuple(self.context.shape)} and {tuple(self.mask.shape)}"
            )

    @classmethod
    def from_batch(cls, context: torch.Tensor, mask: torch.Tensor, lengths=None) -> list[TextCondition]:
        """Splits an encoder output (B, L, D), (B, L). With `lengths` (each prompt's own context length,
        as the official encoder cuts a single prompt: real tokens + 1), each row is cut to it; without,
        every request keeps the batch's padded length, which changes the U-Nets' text pooling."""
        if lengths is None:
            return [cls(c, m) for c, m in zip(context, mask)]
        return [cls(c[: int(n)], m[: int(n)]) for c, m, n in zip(context, mask, lengths)]

    def to(self, device) -> TextCondition:
        return TextCondition(self.context.to(device), self.mask.to(device))

    @property
    def length(self) -> int:
        return self.context.shape[0]

    def unconditional(self, null_embedding: torch.Tensor) -> TextCondition:
        """The official `_get_unconditional_context`: zeros with the learnt null token at position 0."""
        context = torch.zeros_like(self.context)
        mask = torch.zeros_like(self.mask)
        context[0] = null_embedding
        mask[0] = 1
        return TextCondition(context, mask)


def _per_request(value, count: int, what: str) -> list:
    """A value for every request: one value is shared, a sequence must have one per request."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{len(value)} {what} for {count} requests")
        return list(value)
    return [value] * count


def _check_noise(noise: NoiseSource, count: int) -> None:
    if count == 0:
        raise ValueError("no requests")
    if noise.num_requests != count:
        raise ValueError(f"the noise source serves {noise.num_requests} requests, the batch has {count}")


def _null_embedding(denoiser, null_embedding):
    if null_embedding is None:
        null_embedding = getattr(denoiser, "null_embedding", None)
    if null_embedding is None:
        raise ValueError("pass null_embedding: the denoiser has no `null_embedding` attribute")
    return null_embedding.reshape(-1)


def _stack_latents(latents) -> torch.Tensor:
    stacked = latents if isinstance(latents, torch.Tensor) else torch.stack(list(latents))
    return stacked.to(torch.float32)


def _padded(text: TextCondition, length: int) -> TextCondition:
    """Zero context rows and mask 0 appended up to `length`."""
    extra = length - text.length
    if extra == 0:
        return text
    return TextCondition(F.pad(text.context, (0, 0, 0, extra)), F.pad(text.mask, (0, extra)))


def _batch_inputs(texts: Sequence[TextCondition], uncond: Sequence[TextCondition], branches: str, k: int, dtype):
    """Per request: the contexts of its B = len(branches) guidance branches ('c' text, 'u' null), each
    repeated for the k samples of the branch: context (B*k, L, D), bool mask (B*k, L), and, when the
    requests' lengths differ, context_lengths (B*k,) of the unpadded length. Contexts are padded to the
    longest of the batch."""
    longest = max(text.length for text in texts)
    mixed = any(text.length != longest for text in texts)
    out = []
    for text, null in zip(texts, uncond):
        chosen = [_padded(text if b == "c" else null, longest) for b in branches]
        block = {
            "context": torch.cat([repeat(c.context, "l d -> k l d", k=k) for c in chosen]).to(dtype),
            "context_mask": torch.cat([repeat(c.mask, "l -> k l", k=k) for c in chosen]).bool(),
        }
        if mixed:
            # The unconditional context has the request's length too (official: zeros_like(context)).
            block["context_lengths"] = torch.full((len(branches) * k,), text.length, dtype=torch.int64, device=text.context.device)
        out.append(block)
    return out


def _concat(blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-request loop-constant inputs as one U-Net batch, request after request."""
    return {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}


def _context_args(static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"context_lengths": static["context_lengths"]} if "context_lengths" in static else {}


def _model_dtype(denoiser, texts: Sequence[TextCondition], model_dtype):
    """The dtype of the U-Net inputs (x, contexts, float time): given, else the denoiser's floating
    parameters' (an `nn.Module`), else the contexts' (the official loops cast to the context dtype)."""
    if model_dtype is not None:
        return model_dtype
    if isinstance(denoiser, torch.nn.Module):
        for param in denoiser.parameters():
            if param.is_floating_point():
                return param.dtype
    return texts[0].context.dtype


@torch.no_grad()
def sample_first_frame(
    denoiser,
    texts: Sequence[TextCondition],
    latent_size: tuple[int, int],
    noise: NoiseSource,
    *,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    sampler: SamplerConfig = FIRST_FRAME_SAMPLER,
    null_embedding: torch.Tensor | None = None,
    model_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Text to first-frame latent with the keyframe U-Net in image mode (official `p_sample_loop_image`).

    `latent_size` (H, W): the official pipeline samples at (height // 4, width // 4), twice the video
    latent. Returns (R, 4, H, W) float32. Guidance: `(w + 1) cond - w uncond`, w = key_frame_guidance_scale.
    """
    count = len(texts)
    _check_noise(noise, count)
    guidance = _per_request(guidance, count, "guidance configs")
    dtype = _model_dtype(denoiser, texts, model_dtype)
    device = texts[0].context.device
    null = _null_embedding(denoiser, null_embedding)
    uncond = [t.unconditional(null) for t in texts]
    stepper = make_stepper(sampler)
    height, width = latent_size

    x = noise.randn((1, LATENT_CHANNELS, height, width), device=device)  # (R, 1, C, H, W)
    blocks = _batch_inputs(texts, uncond, "cu", 1, dtype)
    for block in blocks:  # condition and mask channels: zeros (no frame to condition on)
        block["cond"] = torch.zeros(2, LATENT_CHANNELS + 1, height, width, device=device)
    static = _concat(blocks)

    steps = len(stepper.timesteps)
    for index, t in enumerate(stepper.timesteps):
        x_in = torch.cat([repeat(x, "r k c h w -> (r b k) c h w", b=2), static["cond"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=dtype, device=device)
        # No temporal_embed: image mode (image_in_layer, temporal layers skipped).
        out = denoiser(x_in, time, static["context"], static["context_mask"], **_context_args(static))
        out = rearrange(out.float(), "(r b k) c h w -> r b k c h w", r=count, b=2)
        eps = [guide_2way(o[0], o[1], g.key_frame_guidance_scale) for o, g in zip(out, guidance)]
        x = stepper.step(torch.stack(eps), index, x, noise)
        if callback is not None:
            callback(index, steps, t)
    return rearrange(x, "r 1 c h w -> r c h w").to(torch.float32)


@torch.no_grad()
def sample_keyframes(
    denoiser,
    texts: Sequence[TextCondition],
    first_frames: torch.Tensor | Sequence[torch.Tensor],
    noise: NoiseSource,
    *,
    motion: str | int | Sequence[str | int] = "medium",
    num_frames: int = 12,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    noise_augmentation: int = 20,
    sampler: SamplerConfig = KEYFRAME_SAMPLER,
    null_embedding: torch.Tensor | None = None,
    model_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Keyframe latents conditioned on each request's first frame (official `p_sample_loop`).

    `first_frames`: (R, 4, h, w) latents (the image MoVQ encoding of the first frame). Each is noised
    with UNIFORM noise to t = `noise_augmentation` and conditions frame 0 of branches A (text + frame)
    and B (frame only); branch C has neither. `motion`: a name of `MOTION_SCORES` or an int score, per
    request or shared. Returns (R, num_frames, 4, h, w) float32.
    """
    count = len(texts)
    _check_noise(noise, count)
    guidance = _per_request(guidance, count, "guidance configs")
    scores = [motion_score(m) for m in _per_request(motion, count, "motions")]
    first_frames = _stack_latents(first_frames)
    if first_frames.shape[0] != count or first_frames.dim() != 4:
        raise ValueError(f"first_frames must be ({count}, C, h, w), got {tuple(first_frames.shape)}")
    _, channels, height, width = first_frames.shape
    frames = num_frames
    dtype = _model_dtype(denoiser, texts, model_dtype)
    device = texts[0].context.device
    first_frames = first_frames.to(device)
    null = _null_embedding(denoiser, null_embedding)
    uncond = [t.unconditional(null) for t in texts]
    stepper = make_stepper(sampler)

    # Official draw order: x_T, then the key-frame augmentation noise, then one draw per step with t > 0.
    x = noise.randn((frames, channels, height, width), device=device)  # (R, F, C, h, w)
    augmentation = noise.rand((channels, height, width), device=device)  # uniform, as the official code
    key_frames = add_noise(first_frames, augmentation, noise_augmentation)

    blocks = _batch_inputs(texts, uncond, "cuu", frames, dtype)
    for block, key_frame, score in zip(blocks, key_frames, scores):
        condition = torch.zeros(frames, channels + 1, height, width, device=device)
        condition[0, :channels] = key_frame
        condition[0, channels] = 1  # mask channel
        # Branches A and B see the first frame, C sees zeros.
        block["cond"] = torch.cat([condition, condition, torch.zeros_like(condition)])
        block["temporal_embed"] = repeat(torch.arange(frames, device=device), "f -> (b f)", b=3).to(dtype)
        block["noise_aug_time"] = torch.full((3 * frames,), noise_augmentation, dtype=torch.int32, device=device)
        block["motion_score"] = torch.full((3 * frames,), score, dtype=torch.int32, device=device)
    static = _concat(blocks)

    steps = len(stepper.timesteps)
    for index, t in enumerate(stepper.timesteps):
        x_in = torch.cat([repeat(x, "r f c h w -> (r b f) c h w", b=3), static["cond"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=dtype, device=device)
        out = denoiser(
            x_in, time, static["context"], static["context_mask"],
            temporal_embed=static["temporal_embed"], num_frames=frames,
            noise_aug_time=static["noise_aug_time"], motion_score=static["motion_score"], **_context_args(static),
        )
        out = rearrange(out.float(), "(r b f) c h w -> r b f c h w", r=count, b=3)
        eps = [
            guide_3way(o[0], o[1], o[2], g.guidance_weight_prompt, g.guidance_weight_image)
            for o, g in zip(out, guidance)
        ]
        x = stepper.step(torch.stack(eps), index, x, noise)
        if callback is not None:
            callback(index, steps, t)
    return x.to(torch.float32)


@torch.no_grad()
def sample_interpolation(
    denoiser,
    texts: Sequence[TextCondition],
    frames: torch.Tensor | Sequence[torch.Tensor],
    noise: NoiseSource,
    *,
    skip_frames: int,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    sampler: SamplerConfig = INTERPOLATION_SAMPLER,
    null_embedding: torch.Tensor | None = None,
    model_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The 3 frames between each pair of consecutive frames (official `p_sample_loop_interpolation`).

    `frames`: (R, N, 4, h, w); G = N - 1 groups per request, all denoised jointly (the U-Net's temporal
    layers mix neighbouring groups of the conditional half). `skip_frames`: 3 for the first pass, 1 for
    the second ('high' fps). Returns the groups (R, G, 12, h, w), frame-major channels; `interpolate`
    re-assembles them into videos.
    """
    count = len(texts)
    _check_noise(noise, count)
    guidance = _per_request(guidance, count, "guidance configs")
    frames = _stack_latents(frames)
    if frames.shape[0] != count or frames.dim() != 5 or frames.shape[1] < 2:
        raise ValueError(f"frames must be ({count}, N >= 2, C, h, w), got {tuple(frames.shape)}")
    _, num, channels, height, width = frames.shape
    groups_per_request = num - 1
    dtype = _model_dtype(denoiser, texts, model_dtype)
    device = texts[0].context.device
    frames = frames.to(device)
    null = _null_embedding(denoiser, null_embedding)
    uncond = [t.unconditional(null) for t in texts]
    stepper = make_stepper(sampler)

    x = noise.randn((groups_per_request, FRAMES_PER_GROUP * channels, height, width), device=device)  # (R, G, 3C, h, w)

    blocks = _batch_inputs(texts, uncond, "cu", groups_per_request, dtype)
    two_g = 2 * groups_per_request
    for block, video in zip(blocks, frames):
        # Conditional half: the frames on either side of each group; unconditional half: zeros.
        block["left"] = torch.cat([video[:-1], torch.zeros_like(video[:-1])])
        block["right"] = torch.cat([video[1:], torch.zeros_like(video[1:])])
        block["temporal_mask"] = torch.cat([torch.ones(groups_per_request), torch.zeros(groups_per_request)]).to(device)
        block["skip_frames"] = torch.full((two_g,), skip_frames, dtype=torch.int32, device=device)
        block["perturbation_time"] = torch.zeros(two_g, dtype=torch.int32, device=device)
    static = _concat(blocks)

    steps = len(stepper.timesteps)
    for index, t in enumerate(stepper.timesteps):
        noisy = repeat(x, "r g c h w -> (r b g) c h w", b=2)
        x_in = torch.cat([static["left"], noisy, static["right"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=device)  # int64, as the official loop
        out = denoiser(
            x_in, time, static["context"], static["context_mask"],
            num_predicted_groups=groups_per_request, perturbation_time=static["perturbation_time"],
            skip_frames=static["skip_frames"], temporal_mask=static["temporal_mask"], **_context_args(static),
        )
        out = rearrange(out.float(), "(r b g) c h w -> r b g c h w", r=count, b=2)
        eps = [guide_2way(o[0], o[1], g.interpolation_guidance_scale) for o, g in zip(out, guidance)]
        x = stepper.step(torch.stack(eps), index, x, noise)
        if callback is not None:
            callback(index, steps, t)
    return x.to(torch.float32)


def assemble_interpolated(frames: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """One video: N frames (N, C, h, w) and the G = N - 1 generated groups (G, 3C, h, w) -> (4N - 3, C, h, w),
    input frames at indices 0, 4, 8, ... (official `interpolate_base_frames` re-ordering)."""
    between = rearrange(groups, "g (t c) h w -> g t c h w", t=FRAMES_PER_GROUP)
    if between.shape[0] != frames.shape[0] - 1:
        raise ValueError(f"{between.shape[0]} groups for {frames.shape[0]} frames")
    segments = torch.cat([frames[:-1, None].to(between.dtype), between], dim=1)  # (G, 4, C, h, w)
    return torch.cat([rearrange(segments, "g k c h w -> (g k) c h w"), frames[-1:].to(between.dtype)])


def interpolate(denoiser, texts, frames, noise, *, skip_frames: int, **kwargs) -> torch.Tensor:
    """`sample_interpolation` then re-assembly: (R, N, C, h, w) -> (R, 4N - 3, C, h, w)."""
    frames = _stack_latents(frames)
    groups = sample_interpolation(denoiser, texts, frames, noise, skip_frames=skip_frames, **kwargs)
    return torch.stack([assemble_interpolated(f, g) for f, g in zip(frames.to(groups.device), groups)])
