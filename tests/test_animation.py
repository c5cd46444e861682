"""Camera-motion animations and multi-prompt mini-movies, at tiny size.

Random networks show no content, so the geometry and continuity checks swap the networks that would
have to keep content for stand-ins that do (an average-pooling "MoVQ", a keyframe "U-Net" that predicts
a known clean frame); everything else is the real pipeline: image loading and cropping, encoding,
camera poses and latent warps, the redraw loop, the fill, the scene chaining, chunked decoding.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from kvray.config.models import ModelSource
from kvray.config.sampling import KEYFRAME_SAMPLER
from kvray.io.video import read_video
from kvray.pipeline import VideoPipeline, VideoRequest
from kvray.pipeline.animation import ANIMATION_KEYFRAMES, keyframe_poses, redraw_start, warp_fill
from kvray.pipeline.camera_motion import camera_poses, warp_between
from kvray.pipeline.stages import text_from_tensors, text_tensors
from kvray.requests.camera_path import parse_camera
from kvray.sampling import GuidanceConfig, TextCondition
from kvray.sampling.schedulers import ddpm_scheduler

SIZE = 256  # the geometry checks measure a marker's centroid in pixels: 32 x 32 latents


@pytest.fixture(scope="module")
def pipeline():
    return VideoPipeline(ModelSource(preset="tiny"))


@pytest.fixture(scope="module")
def warping_pipeline():
    """A pipeline of its own whose MoVQs keep content (the geometry checks); the real `pipeline` keeps
    its networks whatever order the tests run in."""
    warping = VideoPipeline(ModelSource(preset="tiny"))
    warping.keyframes.movq = warping.decode.movq = SmoothAutoencoder()
    return warping


class SmoothAutoencoder(torch.nn.Module):
    """MoVQ stand-in that keeps content: 8x average pooling (plus a mean channel), bilinear upsampling."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter, for the stages' dtype look-up

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="bilinear", align_corners=False)


class ShiftingOracle(torch.nn.Module):
    """Keyframe U-Net stand-in: frame f of a clip is the clip's conditioning frame rolled f latent
    pixels to the right (so a scene's last frame differs from its first)."""

    def __init__(self, context_dim=16):
        super().__init__()
        self.register_buffer("null_embedding", torch.zeros(context_dim))
        self.register_buffer("alphas", ddpm_scheduler(KEYFRAME_SAMPLER).alphas_cumprod.clone())

    def forward(self, x, time, context, context_mask, temporal_embed=None, num_frames=None, **kwargs):
        alphas = self.alphas[time.long()].reshape(-1, 1, 1, 1)
        x_t, condition, mask = x[:, :4], x[:, 4:8], x[:, 8:9]
        frames = num_frames or 1
        clip = (condition * mask).reshape(-1, frames, *condition.shape[1:]).sum(1)
        target = torch.stack([torch.roll(clip, f, dims=-1) for f in range(frames)], dim=1).reshape_as(x_t)
        return (x_t - alphas.sqrt() * target) / (1 - alphas).clamp(min=1e-8).sqrt()


def _marker_image(path, offset=(0.25, 0.0)):
    """Dark picture with one green 32 x 32 square, `offset` (right, down) from the centre in widths."""
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    picture[..., 0] = 60
    x, y = SIZE // 2 + round(offset[0] * SIZE), SIZE // 2 + round(offset[1] * SIZE)
    picture[y - 16:y + 16, x - 16:x + 16, 1] = 255
    Image.fromarray(picture).save(path)
    return str(path)


def _marker(frames):
    """Per frame: the green marker's centroid (x right, y UP, pixels from the centre), distance and angle
    (degrees, anticlockwise on screen)."""
    weight = frames[..., 1].astype(float)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    mass = weight.sum((1, 2))
    x = (weight * xs).sum((1, 2)) / mass - (frames.shape[2] - 1) / 2
    y = -((weight * ys).sum((1, 2)) / mass - (frames.shape[1] - 1) / 2)
    return x, y, np.hypot(x, y), np.degrees(np.arctan2(y, x))


def _warp_only(pipeline, tmp_path, camera, offset=(0.25, 0.0)):
    request = VideoRequest(prompt="a test card", mode="animation", camera=camera, strength=0, width=SIZE, height=SIZE,
                           image=_marker_image(tmp_path / "card.png", offset), seed=1)
    video = pipeline.generate([request])[0]
    assert video.frames.shape == (96, SIZE, SIZE, 3)
    return _marker(video.frames)


# ------------------------------------------------------------------------------------------ requests

@pytest.mark.parametrize("fields, message", [
    (dict(scenes=["a", "b", "c", "d"]), "at most 3 scenes"),
    (dict(prompt="x", scenes=["a", "b"]), "first scene's prompt"),
    (dict(scenes=["a", " "]), "scene 2 prompt is empty"),
    (dict(prompt="a", mode="animation", camera="spin-around"), "unknown camera effect 'spin-around'"),
    (dict(prompt="a", mode="animation"), "animation needs a camera"),
    (dict(prompt="a", mode="animation", camera='[{"frame": 0}, {"frame": 10, "zoom": 0}]'), "keyframe 1 zoom"),
    (dict(prompt="a", mode="animation", camera='[{"frame": 10}, {"frame": 5}]'), "frames must increase"),
    (dict(prompt="a", mode="animation", camera='[{"frame": 0, "zom": 2}]'), "keyframe 0 zom"),
    (dict(prompt="a", mode="animation", camera='[{"frame": 0, "x": 1'), "not valid JSON"),
    (dict(prompt="a", mode="animation", camera="[]"), "no keyframes"),
    (dict(prompt="a", mode="animation", camera='[{"frame": 96, "x": 1}]'), "past the animation's last frame"),
    (dict(prompt="a", mode="animation", camera="zoom-in", strength=1.5), "strength"),
    (dict(prompt="a", camera="zoom-in"), "camera applies to mode animation only"),
    (dict(prompt="a", mode="animation", camera="zoom-in", scenes=["a", "b"]), "an animation has one prompt"),
    (dict(prompt="a", mode="image2video"), "image2video needs an image"),
])
def test_bad_requests_have_clear_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        VideoRequest(**fields)


def test_request_fields_modes_and_defaults():
    assert VideoRequest(prompt="a").mode == "text2video"
    assert VideoRequest(prompt="a", image="x.png").mode == "image2video"
    animation = VideoRequest(prompt="a", mode="animation", camera="Zoom_In")
    assert (animation.camera, animation.width, animation.height, animation.num_frames) == ("zoom-in", 640, 640, 96)
    assert animation.denoise_strength == 0.4
    movie = VideoRequest(scenes=["a cat", "a dog", "a bird"], fps="medium")
    assert movie.prompt == "a cat" and movie.prompts == ("a cat", "a dog", "a bird") and movie.num_frames == 135
    assert VideoRequest(scenes=["solo"]) == VideoRequest(prompt="solo")  # one scene is a plain request
    keys = [{"frame": 0}, {"frame": 95, "zoom": 1.5, "x": 0.2}]
    path = VideoRequest(prompt="a", mode="animation", camera=keys)
    assert VideoRequest.model_validate_json(path.model_dump_json()) == path  # travels between stages as JSON
    assert VideoRequest(prompt="a", mode="animation", camera=json.dumps(keys)) == path
    assert "camera" not in VideoRequest(prompt="a").identity()  # plain requests keep their video ids


def test_camera_paths_interpolate_and_hold():
    path = parse_camera('[{"frame": 0}, {"frame": 10, "zoom": 4, "x": 0.5}, {"frame": 20, "angle": 30}]')
    poses = camera_poses(path, 30)
    assert torch.allclose(poses[5], torch.tensor([2.0, 0.25, 0.0, 0.0], dtype=poses.dtype))  # zoom geometric
    assert torch.allclose(poses[15], torch.tensor([4.0, 0.5, 0.0, 15.0], dtype=poses.dtype))  # fields held
    assert torch.equal(poses[20], poses[29])  # the camera stops after the last keyframe
    zoom = camera_poses("zoom-in", 96)[:, 0]
    assert zoom[0] == 1 and abs(zoom[95] - 2) < 1e-9 and torch.allclose(zoom[1:] / zoom[:-1], zoom[1] / zoom[0])


def test_warps_compose():
    images = torch.rand(1, 3, 64, 96)
    a, b, c = (torch.tensor([pose]) for pose in ([1.0, 0, 0, 0], [1.3, 0.05, -0.02, 4.0], [1.6, 0.1, 0.03, 9.0]))
    twice = warp_between(warp_between(images, a, b, 96, 64), b, c, 96, 64)
    once = warp_between(images, a, c, 96, 64)
    inner = (slice(None), slice(None), slice(16, 48), slice(24, 72))  # away from the repeated borders
    assert (twice - once)[inner].abs().mean() < 0.05
    assert warp_fill(torch.rand(3, 4, 8, 8), camera_poses("pan-left", 9), (64, 64)).shape == (9, 4, 8, 8)


def test_texts_of_scenes_pack_and_unpack():
    texts = tuple(TextCondition(torch.rand(n, 16), torch.ones(n)) for n in (3, 5))
    tensors = text_tensors(texts)
    assert set(tensors) == {"context", "mask", "context.1", "mask.1"}
    back = text_from_tensors({**tensors, "latents": torch.zeros(1)})
    assert all(torch.equal(a.context, b.context) for a, b in zip(texts, back))
    assert isinstance(text_from_tensors(text_tensors(texts[0])), TextCondition)  # a plain request's layout


def test_strength_sets_the_steps_run():
    assert [redraw_start(50, s) for s in (0, 0.4, 1)] == [50, 30, 0]


# ------------------------------------------------------------------------------------------ animation

def test_animation_is_96_frames_at_24_fps_in_the_mp4(pipeline, tmp_path):
    # 2 steps at strength 0.5: one redrawing step per keyframe; the fill is the interpolation U-Net.
    request = VideoRequest(prompt="a lighthouse on a cliff", mode="animation", camera="zoom-in", strength=0.5,
                           width=64, height=64, steps=2, interpolation_steps=2, seed=2)
    video = pipeline.generate([request])[0]
    path = tmp_path / "zoom.mp4"
    path.write_bytes(video.encode(path=str(path)))
    frames, rate = read_video(path)
    assert frames.shape == (96, 64, 64, 3) and rate == 24 and video.fps == 24
    assert video.scenes == [{"scene": 1, "prompt": request.prompt, "first_frame": 0, "last_frame": 95, "frames": 96,
                             "start_seconds": 0.0, "end_seconds": 4.0}]
    assert keyframe_poses(request).shape == (ANIMATION_KEYFRAMES, 4) == (25, 4)  # frames 0, 4, ..., 96


def test_zoom_in_moves_content_away_from_the_centre(warping_pipeline, tmp_path):
    _, _, distance, angle = _warp_only(warping_pipeline, tmp_path, "zoom-in", offset=(0.15, 0.0))
    assert (np.diff(distance) > 0).all()  # frame by frame
    assert distance[-1] / distance[0] == pytest.approx(2.0, rel=0.05)  # the preset zooms 2x over the clip
    assert np.abs(angle).max() < 0.5
    _, _, distance, _ = _warp_only(warping_pipeline, tmp_path, "zoom-out", offset=(0.15, 0.0))
    assert (np.diff(distance) < 0).all() and distance[-1] / distance[0] == pytest.approx(0.5, rel=0.05)


def test_pan_right_moves_content_left(warping_pipeline, tmp_path):
    x, y, _, _ = _warp_only(warping_pipeline, tmp_path, "pan-right")
    assert (np.diff(x) < 0).all()
    assert x[0] - x[-1] == pytest.approx(SIZE / 2, rel=0.03)  # half a frame over the clip
    assert np.abs(y).max() < 0.5
    x, y, _, _ = _warp_only(warping_pipeline, tmp_path, "pan-up", offset=(0.0, -0.2))
    assert (np.diff(y) < 0).all() and np.abs(x).max() < 0.5  # the camera goes up, the scene down


@pytest.mark.parametrize("camera, sign", [("rotate-clockwise", 1), ("rotate-anticlockwise", -1)])
def test_rotation_rotates_content(warping_pipeline, tmp_path, camera, sign):
    _, _, distance, angle = _warp_only(warping_pipeline, tmp_path, camera)
    # The camera rolls clockwise: the scene turns anticlockwise on screen (and the other way round).
    assert (sign * np.diff(angle) > 0).all()
    assert sign * angle[-1] == pytest.approx(45, abs=2.5)
    assert np.abs(distance - distance[0]).max() < 1.5  # about the centre


def test_keyframed_camera_path(warping_pipeline, tmp_path):
    path = [{"frame": 0}, {"frame": 47, "x": -0.25}, {"frame": 95, "y": -0.1}]  # x holds from frame 47 on
    x, y, _, _ = _warp_only(warping_pipeline, tmp_path, path, offset=(0.0, 0.0))
    assert (np.diff(x[:48]) > 0).all() and x[47] - x[0] == pytest.approx(SIZE / 4, rel=0.03)  # camera left: scene right
    assert np.abs(np.diff(x[48:])).max() < 0.2  # ... then it stops
    assert (np.diff(y[48:]) > 0).all() and y[95] - y[47] == pytest.approx(0.1 * SIZE, rel=0.05)  # camera down: scene up


# ------------------------------------------------------------------------------------------ mini-movies

def _stripes(path):
    xs = np.arange(SIZE // 2)
    picture = np.zeros((SIZE // 2, SIZE // 2, 3), np.uint8)
    picture[..., 0] = np.where((xs // 32) % 2, 230, 20)[None, :]
    picture[..., 2] = (xs * 255 // (SIZE // 2))[None, :]
    Image.fromarray(picture).save(path)
    return str(path)


def test_three_scene_movie_is_continuous(tmp_path):
    movie = VideoPipeline(ModelSource(preset="tiny"))
    movie.keyframes.unet = ShiftingOracle()
    movie.keyframes.movq = movie.decode.movq = SmoothAutoencoder()
    request = VideoRequest(scenes=["a fox in the snow", "the fox runs", "the fox sleeps"], image=_stripes(tmp_path / "fox.png"),
                           width=SIZE // 2, height=SIZE // 2, steps=4, seed=7,
                           guidance=GuidanceConfig(guidance_weight_image=1.0))  # w_I 1: the frame-guided branch alone
    video = movie.generate([request])[0]
    path = tmp_path / "fox.mp4"
    path.write_bytes(video.encode(path=str(path)))
    frames, rate = read_video(path)
    assert frames.shape[0] == video.frames.shape[0] == 3 * 12 and rate == Fraction(24, 11)  # each scene lasts 5.5 s
    assert [(s["prompt"], s["first_frame"], s["last_frame"]) for s in video.scenes] == [
        ("a fox in the snow", 0, 11), ("the fox runs", 12, 23), ("the fox sleeps", 24, 35)]
    error = lambda a, b: np.abs(video.frames[a].astype(float) - video.frames[b].astype(float)).mean()  # noqa: E731
    step = error(11, 10)  # the stand-in moves the content a latent pixel per frame
    for first in (12, 24):
        assert error(first, first - 1) < min(8, step / 3)  # starts from the last frame of the scene before
        assert error(first, first - 12) > 40  # ... not from that scene's start (the content has moved on)


# ------------------------------------------------------------------------------------------ kvray render

@pytest.mark.slow
def test_render_manifest_with_animations_and_a_movie(ray_cluster, tmp_path):
    """The same requests as manifest rows, through the Ray stages (random tiny weights: shapes, rates and
    metadata; the content checks are above)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kvray.config.job import RenderJob
    from kvray.distributed.render import render

    path = json.dumps([{"frame": 0}, {"frame": 95, "zoom": 1.5, "x": 0.1, "angle": 10}])
    rows = [  # id, prompt, mode, camera, strength, scenes, expected frames or error
        ("zoom", "a lighthouse on a cliff", "animation", "zoom-in", 0.5, None, 96),
        ("path", "a forest road", "animation", path, 0.0, None, 96),
        ("movie", None, None, None, None, ["a fox in the snow", "the fox runs", "the fox sleeps"], 36),
        ("many", None, None, None, None, ["a", "b", "c", "d"], "at most 3 scenes"),
        ("spin", "a cat", "animation", "spin-around", None, None, "unknown camera effect"),
        ("crooked", "a cat", "animation", '[{"frame": 0, "zoom": -2}]', None, None, "zoom"),
    ]
    columns = ("id", "prompt", "mode", "camera", "strength", "scenes")
    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(columns)}
                     | {"width": [64] * len(rows), "height": [64] * len(rows), "steps": [2] * len(rows),
                        "interpolation_steps": [2] * len(rows)})
    assert pa.types.is_list(table.schema.field("scenes").type)
    pq.write_table(table, tmp_path / "rows.parquet")
    job = RenderJob(manifest=str(tmp_path / "rows.parquet"), out=str(tmp_path / "out"))
    summary = render(job)
    assert (summary.ok, summary.error) == (3, 3)
    results = {r["id"]: r for f in (tmp_path / "out" / "results" / summary.run_id).glob("*.parquet")
               for r in pq.read_table(f).to_pylist()}
    for row_id, prompt, _mode, _camera, _strength, scenes, expected in rows:
        result = results[row_id]
        if isinstance(expected, str):
            assert result["status"] == "error" and expected in result["error"], result
            continue
        assert result["status"] == "ok", result
        with fsspec.open(result["uri"], "rb") as f:
            frames, rate = read_video(f.read())
        assert frames.shape == (expected, 64, 64, 3)
        video_id = result["video_id"]
        meta = json.loads((tmp_path / "out" / "meta" / video_id[:2] / f"{video_id}.json").read_text())
        assert meta["frames"] == expected
        if scenes:
            assert rate == Fraction(24, 11) and meta["mode"] == "text2video"
            assert [(s["prompt"], s["first_frame"], s["last_frame"]) for s in meta["scenes"]] == [
                (scenes[0], 0, 11), (scenes[1], 12, 23), (scenes[2], 24, 35)]
        else:
            assert rate == 24 and meta["fps"] == "24" and meta["mode"] == "animation"
            assert meta["scenes"] == [{"scene": 1, "prompt": prompt, "first_frame": 0, "last_frame": 95, "frames": 96,
                                       "start_seconds": 0.0, "end_seconds": 4.0}]
