"""The sampling loops of Kandinsky Video 1.1, for a batch of R requests per call.

One walker, `denoise`, runs every loop (k-diffusion style): a stepper (the solver and its timesteps),
a model function that builds one U-Net call from the current latents and guides its outputs, the
noise source, and the index of the first step. Each mode is a thin function that builds its model
function and its starting latents; they mirror the official loops (`kandinsky_video/model/diffusion.py`):
`sample_first_frame` = `p_sample_loop_image`, `sample_keyframes` = `p_sample_loop`,
`sample_interpolation` = `p_sample_loop_interpolation` (and `interpolate` adds the re-assembly of
`interpolate_base_frames`); `redraw` is image-to-image in image mode (animation), the first frame's
loop started part-way. See `batching.py` for the layout of a batch.

The denoiser is any callable with the U-Nets' signature (`KeyframeUNet`, `InterpolationUNet`, or a
wrapper around them, e.g. one that autocasts); the loops run it under `torch.no_grad()`.

How a loop runs its network is one `LoopOptions`, the same for every loop. Precision: `model_dtype`
is the dtype of the U-Net inputs (default: the denoiser's parameters'). `guidance_dtype` is the dtype
the guidance combination is computed in: float32 by default; None keeps the U-Net's output dtype, as
the official code does under autocast (guidance in fp16, the DDPM step then promoted to float32 by
the float32 latents).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from ..config.sampling import (
    FIRST_FRAME_SAMPLER,
    INTERPOLATION_SAMPLER,
    KEYFRAME_SAMPLER,
    GuidanceConfig,
    SamplerConfig,
    motion_score,
)
from .batching import (
    LATENT_CHANNELS,
    TextCondition,
    branch_inputs,
    check_noise,
    concat_blocks,
    context_args,
    model_dtype_of,
    null_embedding_of,
    per_request,
    stack_latents,
)
from .guidance import guide_2way, guide_3way
from .noise import NoiseSource
from .schedulers import Stepper, add_noise, make_stepper

FRAMES_PER_GROUP = 3  # the interpolation U-Net predicts 3 frames between each pair of input frames

# callback(step_index, num_steps, timestep), called after every step (progress bars).
StepCallback = Callable[[int, int, int], None]
# model(x, t): x (R, K, C, h, w) latents at timestep t -> the guided prediction, same shape.
ModelFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class LoopOptions:
    """How a loop runs its network: what every loop takes beside its inputs, sampler and guidance."""

    null_embedding: torch.Tensor | None = None  # the unconditional branch's token; default the denoiser's
    model_dtype: torch.dtype | None = None  # the U-Net inputs' dtype; default the denoiser's parameters'
    guidance_dtype: torch.dtype | None = torch.float32  # None: the U-Net's output dtype (official autocast)
    callback: StepCallback | None = None


DEFAULT_OPTIONS = LoopOptions()


def denoise(stepper: Stepper, model: ModelFn, x: torch.Tensor, noise: NoiseSource, *, start: int = 0,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Walks `stepper.timesteps[start:]` from `x` (R, K, C, h, w); returns the float32 result."""
    steps = len(stepper.timesteps)
    for index in range(start, steps):
        t = stepper.timesteps[index]
        x = stepper.step(model(x, t), index, x, noise)
        if callback is not None:
            callback(index, steps, t)
    return x.to(torch.float32)


def _guided(out: torch.Tensor, guidance_dtype: torch.dtype | None) -> torch.Tensor:
    return out if guidance_dtype is None else out.to(guidance_dtype)


def image_mode_model(denoiser, texts: Sequence[TextCondition], guidance: Sequence[GuidanceConfig],
                     latent_size: tuple[int, int], options: LoopOptions = DEFAULT_OPTIONS) -> ModelFn:
    """The keyframe U-Net in image mode (no frame to condition on, no temporal layers), 2 branches
    (prompt, null) per request, `(w + 1) cond - w uncond` with w = key_frame_guidance_scale."""
    count = len(texts)
    dtype = model_dtype_of(denoiser, texts, options.model_dtype)
    device = texts[0].context.device
    height, width = latent_size
    blocks = branch_inputs(texts, null_embedding_of(denoiser, options.null_embedding), "cu", 1, dtype)
    for block in blocks:  # condition and mask channels: zeros, as the official first frame
        block["cond"] = torch.zeros(2, LATENT_CHANNELS + 1, height, width, device=device)
    static = concat_blocks(blocks)

    def model(x, t):
        x_in = torch.cat([repeat(x, "r k c h w -> (r b k) c h w", b=2), static["cond"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=dtype, device=device)
        # No temporal_embed: image mode (image_in_layer, temporal layers skipped).
        out = denoiser(x_in, time, static["context"], static["context_mask"], **context_args(static))
        out = rearrange(_guided(out, options.guidance_dtype), "(r b k) c h w -> r b k c h w", r=count, b=2)
        return torch.stack([guide_2way(o[0], o[1], g.key_frame_guidance_scale) for o, g in zip(out, guidance)])

    return model


@torch.no_grad()
def sample_first_frame(
    denoiser,
    texts: Sequence[TextCondition],
    latent_size: tuple[int, int],
    noise: NoiseSource,
    *,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    sampler: SamplerConfig = FIRST_FRAME_SAMPLER,
    options: LoopOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Text to first-frame latent with the keyframe U-Net in image mode (official `p_sample_loop_image`).

    `latent_size` (H, W): the official pipeline samples at (height // 4, width // 4), twice the video
    latent. Returns (R, 4, H, W) float32.
    """
    check_noise(noise, len(texts))
    model = image_mode_model(denoiser, texts, per_request(guidance, len(texts), "guidance configs"), latent_size, options)
    height, width = latent_size
    x = noise.randn((1, LATENT_CHANNELS, height, width), device=texts[0].context.device)  # (R, 1, C, H, W)
    x = denoise(make_stepper(sampler), model, x, noise, callback=options.callback)
    return rearrange(x, "r 1 c h w -> r c h w")


def redraw_start(num_steps: int, strength: float) -> int:
    """Index of the first timestep run by image-to-image at `strength` (== num_steps: none is run)."""
    run = min(int(num_steps * strength), num_steps)
    return num_steps - run


@torch.no_grad()
def redraw(
    denoiser,
    texts: Sequence[TextCondition],
    latents: torch.Tensor,
    noise: NoiseSource,
    *,
    strength: float,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    sampler: SamplerConfig = FIRST_FRAME_SAMPLER,
    options: LoopOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Image-to-image with the keyframe U-Net in image mode: (R, 4, h, w) latents noised to the start of
    the last `int(steps * strength)` steps (diffusers' img2img convention), then denoised with the prompt
    as `sample_first_frame`. Draws: randn(1, 4, h, w) for the noising, then one per step with t > 0.
    strength 0: the latents unchanged, nothing drawn."""
    check_noise(noise, len(texts))
    stepper = make_stepper(sampler)
    first = redraw_start(len(stepper.timesteps), strength)
    latents = latents.to(torch.float32)
    if first >= len(stepper.timesteps):
        return latents
    device = texts[0].context.device
    model = image_mode_model(denoiser, texts, per_request(guidance, len(texts), "guidance configs"),
                             tuple(latents.shape[-2:]), options)
    clean = latents[:, None].to(device)  # (R, 1, C, h, w)
    x = add_noise(clean, noise.randn(clean.shape[1:], device=device), stepper.timesteps[first])
    return denoise(stepper, model, x, noise, start=first, callback=options.callback)[:, 0]


def video_mode_model(denoiser, texts: Sequence[TextCondition], guidance: Sequence[GuidanceConfig],
                     key_frames: torch.Tensor, scores: Sequence[int], augmentations: Sequence[int], frames: int,
                     options: LoopOptions = DEFAULT_OPTIONS) -> ModelFn:
    """The keyframe U-Net in video mode, 3 branches per request: (A) prompt and first frame, (B) null text
    and first frame, (C) neither; guided by `guide_3way`. `key_frames` (R, C, h, w): the noised first frames."""
    count, (channels, height, width) = len(texts), key_frames.shape[1:]
    dtype = model_dtype_of(denoiser, texts, options.model_dtype)
    device = texts[0].context.device
    blocks = branch_inputs(texts, null_embedding_of(denoiser, options.null_embedding), "cuu", frames, dtype)
    for block, key_frame, score, level in zip(blocks, key_frames, scores, augmentations):
        condition = torch.zeros(frames, channels + 1, height, width, device=device)
        condition[0, :channels] = key_frame
        condition[0, channels] = 1  # mask channel
        # Branches A and B see the first frame, C sees zeros.
        block["cond"] = torch.cat([condition, condition, torch.zeros_like(condition)])
        block["temporal_embed"] = repeat(torch.arange(frames, device=device), "f -> (b f)", b=3).to(dtype)
        block["noise_aug_time"] = torch.full((3 * frames,), level, dtype=torch.int32, device=device)
        block["motion_score"] = torch.full((3 * frames,), score, dtype=torch.int32, device=device)
    static = concat_blocks(blocks)

    def model(x, t):
        x_in = torch.cat([repeat(x, "r f c h w -> (r b f) c h w", b=3), static["cond"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=dtype, device=device)
        out = denoiser(
            x_in, time, static["context"], static["context_mask"],
            temporal_embed=static["temporal_embed"], num_frames=frames,
            noise_aug_time=static["noise_aug_time"], motion_score=static["motion_score"], **context_args(static),
        )
        out = rearrange(_guided(out, options.guidance_dtype), "(r b f) c h w -> r b f c h w", r=count, b=3)
        return torch.stack([
            guide_3way(o[0], o[1], o[2], g.guidance_weight_prompt, g.guidance_weight_image)
            for o, g in zip(out, guidance)
        ])

    return model


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
    noise_augmentation: int | Sequence[int] = 20,
    sampler: SamplerConfig = KEYFRAME_SAMPLER,
    options: LoopOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Keyframe latents conditioned on each request's first frame (official `p_sample_loop`).

    `first_frames`: (R, 4, h, w) latents (the image MoVQ encoding of the first frame). Each is noised
    with UNIFORM noise to t = `noise_augmentation` and conditions frame 0 of branches A (text + frame)
    and B (frame only); branch C has neither. `motion`: a name of `MOTION_SCORES` or an int score;
    `motion` and `noise_augmentation` per request or shared. Returns (R, num_frames, 4, h, w) float32.
    """
    count = len(texts)
    check_noise(noise, count)
    guidance = per_request(guidance, count, "guidance configs")
    scores = [motion_score(m) for m in per_request(motion, count, "motions")]
    augmentations = [int(a) for a in per_request(noise_augmentation, count, "noise augmentations")]
    first_frames = stack_latents(first_frames)
    if first_frames.shape[0] != count or first_frames.dim() != 4:
        raise ValueError(f"first_frames must be ({count}, C, h, w), got {tuple(first_frames.shape)}")
    device = texts[0].context.device
    first_frames = first_frames.to(device)

    # Official draw order: x_T, then the key-frame augmentation noise, then one draw per step with t > 0.
    x = noise.randn((num_frames, *first_frames.shape[1:]), device=device)  # (R, F, C, h, w)
    augmentation = noise.rand(first_frames.shape[1:], device=device)  # uniform, as the official code
    key_frames = torch.stack([add_noise(f[None], a[None], t)[0]
                              for f, a, t in zip(first_frames, augmentation, augmentations)])
    model = video_mode_model(denoiser, texts, guidance, key_frames, scores, augmentations, num_frames, options)
    return denoise(make_stepper(sampler), model, x, noise, callback=options.callback)


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
    options: LoopOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """The 3 frames between each pair of consecutive frames (official `p_sample_loop_interpolation`).

    `frames`: (R, N, 4, h, w); G = N - 1 groups per request, all denoised jointly (the U-Net's temporal
    layers mix neighbouring groups of the conditional half; its temporal mask [1]*G + [0]*G per request
    turns the mixing off in the unconditional half). `skip_frames`: 3 for the first pass, 1 for the
    second ('high' fps). Returns the groups (R, G, 12, h, w), frame-major channels; `interpolate`
    re-assembles them into videos.
    """
    count = len(texts)
    check_noise(noise, count)
    guidance = per_request(guidance, count, "guidance configs")
    frames = stack_latents(frames)
    if frames.shape[0] != count or frames.dim() != 5 or frames.shape[1] < 2:
        raise ValueError(f"frames must be ({count}, N >= 2, C, h, w), got {tuple(frames.shape)}")
    _, num, channels, height, width = frames.shape
    groups = num - 1
    dtype = model_dtype_of(denoiser, texts, options.model_dtype)
    device = texts[0].context.device
    frames = frames.to(device)

    x = noise.randn((groups, FRAMES_PER_GROUP * channels, height, width), device=device)  # (R, G, 3C, h, w)

    blocks = branch_inputs(texts, null_embedding_of(denoiser, options.null_embedding), "cu", groups, dtype)
    for block, video in zip(blocks, frames):
        # Conditional half: the frames on either side of each group; unconditional half: zeros.
        block["left"] = torch.cat([video[:-1], torch.zeros_like(video[:-1])])
        block["right"] = torch.cat([video[1:], torch.zeros_like(video[1:])])
        block["temporal_mask"] = torch.cat([torch.ones(groups), torch.zeros(groups)]).to(device)
        block["skip_frames"] = torch.full((2 * groups,), skip_frames, dtype=torch.int32, device=device)
        block["perturbation_time"] = torch.zeros(2 * groups, dtype=torch.int32, device=device)
    static = concat_blocks(blocks)

    def model(x, t):
        noisy = repeat(x, "r g c h w -> (r b g) c h w", b=2)
        x_in = torch.cat([static["left"], noisy, static["right"]], dim=1).to(dtype)
        time = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=device)  # int64, as the official loop
        out = denoiser(
            x_in, time, static["context"], static["context_mask"],
            num_predicted_groups=groups, perturbation_time=static["perturbation_time"],
            skip_frames=static["skip_frames"], temporal_mask=static["temporal_mask"], **context_args(static),
        )
        out = rearrange(_guided(out, options.guidance_dtype), "(r b g) c h w -> r b g c h w", r=count, b=2)
        return torch.stack([guide_2way(o[0], o[1], g.interpolation_guidance_scale) for o, g in zip(out, guidance)])

    return denoise(make_stepper(sampler), model, x, noise, callback=options.callback)


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
    frames = stack_latents(frames)
    groups = sample_interpolation(denoiser, texts, frames, noise, skip_frames=skip_frames, **kwargs)
    return torch.stack([assemble_interpolated(f, g) for f, g in zip(frames.to(groups.device), groups)])
