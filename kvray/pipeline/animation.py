"""Camera-motion animation of a still scene, Deforum-style, with the Kandinsky Video 1.1 networks.

    frame 0 (the given image, or drawn from the prompt as for text2video)
    for k = 1 .. 24:  keyframe k = redraw(warp(keyframe k-1, camera from frame 4k-4 to frame 4k), strength)
    fill: 3 frames between each pair of keyframes (the interpolation U-Net) -> 97 frames, the last dropped

* Warps act on LATENTS (`camera.warp`: bilinear, border pixels repeated). The MoVQ latent is a
  continuous, spatially local 4-channel map at 1/8 of the image size, so warping it moves the decoded
  picture the same way; it keeps the four-stage split (Keyframes holds the keyframe U-Net, Interpolate
  needs no MoVQ) and needs no image decode + encode per redrawn frame, whose round trips drift in
  colour. The cost is some softness of the warped latent, which the redrawing repaints. Without
  redrawing (strength 0) every keyframe is warped straight from frame 0: chained warps of a warp would
  blur and, at 1/8 resolution, shift small features (measured: 1-3 px at 256 px over the clip).
* `redraw` is image-to-image with the keyframe U-Net in image mode (the first frame's network and
  2-way guidance, `key_frame_guidance_scale`): the warped latent is noised with Gaussian noise to the
  timestep where the last `int(steps * strength)` steps of the schedule begin (diffusers' img2img
  convention), then denoised over those steps with the prompt. strength 0 runs no step at all.
* Frame counts: 4 s at 24 fps = 96 frames. The interpolation U-Net inserts 3 frames between 2, so 25
  keyframes at frames 0, 4, ..., 96 give 4 * 25 - 3 = 97 frames; frame 96 (the right anchor of frames
  93-95, one past the clip, its camera pose extrapolated at the last frame's speed) is dropped.
* Fill: the interpolation U-Net (one pass, skip_frames 3, as the official 'medium' fps) in the
  Interpolate stage. At strength 0 no network denoises anything: every in-between frame is the blend
  of its two neighbouring keyframes warped to its own camera pose (`warp_fill`, weights by distance):
  a pure camera move over the first frame ("Ken Burns"), exact up to resampling, no U-Net call at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config.sampling import FIRST_FRAME_SAMPLER, GuidanceConfig, SamplerConfig
from ..requests.request import ANIMATION_FRAMES, VideoRequest
from ..sampling.batching import TextCondition
from ..sampling.loops import DEFAULT_OPTIONS, LoopOptions, redraw, redraw_start
from ..sampling.noise import NoiseSource
from ..sampling.schedulers import make_stepper
from .camera_motion import extend_poses, request_poses, warp_between

# The interpolation U-Net puts 3 frames between 2: every 4th frame is redrawn.
KEYFRAME_STRIDE = 4
ANIMATION_KEYFRAMES = ANIMATION_FRAMES // KEYFRAME_STRIDE + 1  # 25, frames 0, 4, ..., 96
FILLED_FRAMES = KEYFRAME_STRIDE * ANIMATION_KEYFRAMES - (KEYFRAME_STRIDE - 1)  # 97, the last one dropped
FILL_SKIP_FRAMES = 3  # the interpolation U-Net's `skip_frames` for 3 in-betweens (official first pass)


def frame_poses(request: VideoRequest) -> torch.Tensor:
    """Camera poses (97, 4) of frames 0 .. 96: the clip's 96 and the extrapolated anchor."""
    return extend_poses(request_poses(request), FILLED_FRAMES - ANIMATION_FRAMES)


def keyframe_poses(request: VideoRequest) -> torch.Tensor:
    """Camera poses (25, 4) of the redrawn frames 0, 4, ..., 96."""
    return frame_poses(request)[::KEYFRAME_STRIDE]


def animate_keyframes(
    denoiser,
    texts: Sequence[TextCondition],
    first: torch.Tensor,
    poses: torch.Tensor,
    noise: NoiseSource,
    *,
    size: tuple[int, int],
    strength: float,
    guidance: GuidanceConfig | Sequence[GuidanceConfig] = GuidanceConfig(),
    sampler: SamplerConfig = FIRST_FRAME_SAMPLER,
    progress: Callable[[int, int], None] | None = None,
    options: LoopOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """The redrawn keyframes of R animations: `first` (R, 4, h, w) latents of frame 0, `poses` (R, K, 4)
    camera poses of the K keyframes, `size` the video's (width, height). Keyframe k is keyframe k-1
    warped to pose k, then `redraw`n (without redrawing: frame 0 warped to pose k). Returns
    (R, K, 4, h, w) float32."""
    width, height = size
    frames = [first.to(torch.float32)]
    # Without a redrawing step (strength 0, or int(steps * strength) == 0), every keyframe is warped
    # straight from frame 0 rather than from a warp of a warp: resampling a latent again and again
    # blurs it and biases where small features land.
    num_steps = len(make_stepper(sampler).timesteps)
    redraws = redraw_start(num_steps, strength) < num_steps
    steps = poses.shape[1] - 1
    for k in range(1, poses.shape[1]):
        source = k - 1 if redraws else 0
        warped = warp_between(frames[source], poses[:, source], poses[:, k], width, height)
        if redraws:
            warped = redraw(denoiser, texts, warped, noise, strength=strength, guidance=guidance, sampler=sampler,
                            options=options)
        frames.append(warped)
        if progress is not None:
            progress(k - 1, steps)
    return torch.stack(frames, dim=1)


def warp_fill(keyframes: torch.Tensor, poses: torch.Tensor, size: tuple[int, int],
              stride: int = KEYFRAME_STRIDE) -> torch.Tensor:
    """The frames between keyframes without a network: (K, C, h, w) keyframes at frames 0, stride, ...
    and `poses` ((K - 1) * stride + 1, 4) of every frame -> the frames (same count). Frame f between
    keyframes k (at a) and k + 1 (at b) is (1 - w) warp(k, a -> f) + w warp(k + 1, b -> f), w = (f - a) / stride."""
    width, height = size
    count = keyframes.shape[0]
    if poses.shape[0] != (count - 1) * stride + 1:
        raise ValueError(f"{poses.shape[0]} poses for {count} keyframes {stride} frames apart")
    out = [keyframes[0]]
    for k in range(count - 1):
        a, b = k * stride, (k + 1) * stride
        between = torch.arange(a + 1, b)
        if len(between):
            left = warp_between(keyframes[k].expand(len(between), -1, -1, -1), poses[a].expand(len(between), -1),
                                poses[between], width, height)
            right = warp_between(keyframes[k + 1].expand(len(between), -1, -1, -1), poses[b].expand(len(between), -1),
                                 poses[between], width, height)
            weight = ((between - a).float() / stride).reshape(-1, 1, 1, 1).to(left.device)
            out.extend((1 - weight) * left + weight * right)
        out.append(keyframes[k + 1])
    return torch.stack(out)
