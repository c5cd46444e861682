"""Camera motion for animations: the pose of every frame along a path, and the warps between poses.

Paths are `kvray.requests.camera_path` (effects, keyframes, the pose fields). Between keyframes x, y and
angle are interpolated linearly and zoom geometrically (linearly in log zoom, so a zoom between two
keyframes runs at a steady speed); before the first and after the last keyframe the pose holds (the
camera stands still). Only changes of pose matter: frame 0 always shows the first image, and frame t
is frame t-1 warped by the change of pose from t-1 to t.

Warps are affine maps applied with `F.affine_grid` + `F.grid_sample` (bilinear; what comes into view
beyond the borders repeats the border, Deforum's default "replicate", for the redrawing to repaint:
reflection would bring mirrored copies of the scene's objects into view). They act on any `b c h w`
tensor, latents included: coordinates are normalised, so a latent and its decoded image warp alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..requests.camera_path import IDENTITY, CameraPath, effect_path


def camera_poses(camera: str | CameraPath, num_frames: int) -> torch.Tensor:
    """Per-frame poses (num_frames, 4) float64: zoom, x, y, angle (degrees)."""
    path = effect_path(camera, num_frames) if isinstance(camera, str) else camera
    # Fill left-out fields with the previous keyframe's values.
    keys, current = [], IDENTITY
    for key in path:
        current = tuple(c if v is None else float(v) for c, v in zip(current, (key.zoom, key.x, key.y, key.angle)))
        keys.append((key.frame, current))
    frames = torch.tensor([f for f, _ in keys], dtype=torch.float64)
    values = torch.tensor([v for _, v in keys], dtype=torch.float64)
    values[:, 0] = values[:, 0].log()  # zoom interpolates in log space
    t = torch.arange(num_frames, dtype=torch.float64)
    poses = torch.stack([_interp(t, frames, values[:, i]) for i in range(4)], dim=1)
    poses[:, 0] = poses[:, 0].exp()
    return poses


def _interp(t: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation, constant outside [xs[0], xs[-1]] (numpy.interp)."""
    if len(xs) == 1:
        return ys.expand_as(t).clone()
    index = torch.searchsorted(xs, t, right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    weight = ((t - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + weight * (y1 - y0)


def extend_poses(poses: torch.Tensor, extra: int) -> torch.Tensor:
    """`extra` poses past the end at the last frame's speed (log zoom, x, y, angle): the anchor of the
    last in-between frames, never shown."""
    if extra <= 0:
        return poses
    logs = poses.clone()
    logs[:, 0] = logs[:, 0].log()
    step = logs[-1] - logs[-2] if len(logs) > 1 else torch.zeros_like(logs[-1])
    more = logs[-1] + step * torch.arange(1, extra + 1, dtype=logs.dtype)[:, None]
    more[:, 0] = more[:, 0].exp()
    return torch.cat([poses, more])


def _screen_map(pose: Sequence[float], width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World point P (pixels from the first frame's centre, y down) -> screen S = z A (P - C) of a pose:
    the linear part z A and the camera position C."""
    zoom, x, y, angle = (float(v) for v in pose)
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # A camera rolling clockwise turns the picture anticlockwise; in y-down coordinates that is [[c, s], [-s, c]].
    rotate = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    position = torch.tensor([x * width, -y * height], dtype=torch.float64)  # y is upwards, pixels downwards
    return zoom * rotate, position


def warp_theta(source: Sequence[float], target: Sequence[float], width: int, height: int) -> torch.Tensor:
    """The `affine_grid` matrix (2, 3) that shows the target pose's view from the source pose's frame:
    for every pixel of the target view, where to sample the source frame (normalised coordinates)."""
    lin_s, pos_s = _screen_map(source, width, height)
    lin_t, pos_t = _screen_map(target, width, height)
    # S_t = L_t (P - C_t)  =>  P = C_t + L_t^-1 S_t  =>  S_s = L_s L_t^-1 S_t + L_s (C_t - C_s)
    matrix = lin_s @ torch.linalg.inv(lin_t)
    shift = lin_s @ (pos_t - pos_s)
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64)  # pixels = normalised * half
    theta = torch.cat([matrix * half[None, :] / half[:, None], (shift / half)[:, None]], dim=1)
    return theta


def warp(images: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """`b c h w` images warped by `b 2 3` matrices of `warp_theta` (bilinear, border pixels repeated outside)."""
    thetas = thetas.to(device=images.device, dtype=torch.float32)
    grid = F.affine_grid(thetas, list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.to(images.dtype)


def warp_between(images: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, width: int,
                 height: int) -> torch.Tensor:
    """Each image `b c h w`, seen at pose sources[i], re-seen at pose targets[i]. `width`, `height`: the
    video's size (sets the aspect ratio of pans and rolls; the images may be latents)."""
    thetas = torch.stack([warp_theta(s, t, width, height) for s, t in zip(sources, targets)])
    return warp(images, thetas)


def request_poses(request) -> torch.Tensor:
    """An animation request's camera pose of every frame, (num_frames, 4): zoom, x, y, angle."""
    if request.camera is None:
        raise ValueError(f"a {request.mode} request has no camera")
    return camera_poses(request.camera, request.num_frames)
