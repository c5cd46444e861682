"""Text2video and image2video end to end in one process, at tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kvray.cli import main
from kvray.config.models import ModelSource
from kvray.config.runtime import NETWORKS, RuntimeConfig
from kvray.io.video import read_video
from kvray.pipeline import VideoPipeline, VideoRequest
from kvray.pipeline.frames import image_to_tensor, to_uint8
from kvray.pipeline.stages import Decode
from kvray.sampling import GuidanceConfig

from .golden_e2e import load_case_file

FAST = dict(width=64, height=64, steps=2, interpolation_steps=2)


@pytest.fixture(scope="module")
def pipeline():
    return VideoPipeline(ModelSource(preset="tiny"))


def _request(prompt="a red car drifting on a mountain road", **fields):
    return VideoRequest(**{"prompt": prompt, "seed": 3, **FAST, **fields})


@pytest.mark.parametrize("fps, frames", [("low", 12), ("medium", 45), pytest.param("high", 177, marks=pytest.mark.slow)])
def test_frame_counts_and_sizes_in_the_written_mp4(pipeline, tmp_path, fps, frames):
    video = pipeline.generate([_request(fps=fps, width=128)])[0]
    path = tmp_path / f"{fps}.mp4"
    path.write_bytes(video.encode(path=str(path)))
    read, rate = read_video(path)
    assert read.shape == (frames, 64, 128, 3)
    assert abs(float(rate) * 5.5 - frames) < 1e-6  # the clip lasts 5.5 s, as the official examples
    assert np.abs(read.astype(float) - video.frames.astype(float)).mean() < 12  # lossy, but the same video


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}-threads")
def threads(request):
    """The checks hold for any intra-op thread count (the frames themselves depend on it on the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_a_request_gives_the_same_frames_alone_twice_or_anywhere_in_a_batch(pipeline, threads):
    """Batch invariance, bitwise: the same request alone, twice in one batch, and at another position
    beside requests of other prompts, sizes, motions and fps."""
    target = _request(fps="medium")
    others = [_request("snow falling on a quiet lake at dawn", seed=9, motion="high"),
              _request("x", seed=5, fps="low", width=128)]
    alone = pipeline.generate([target])[0].frames
    batch = pipeline.generate([others[0], target, target, others[1]])  # twice, and beside others
    assert np.array_equal(batch[1].frames, alone) and np.array_equal(batch[2].frames, alone)
    assert not np.array_equal(pipeline.generate([_request(seed=4, fps="medium")])[0].frames, alone)


def test_mixing_requests_is_an_explicit_opt_out(threads):
    """`batch_invariant: false` shares U-Net calls between requests: same shapes, close but not promised
    equal (the rounding of batched kernels depends on the CPU)."""
    mixing = VideoPipeline(ModelSource(preset="tiny"), RuntimeConfig(batch_invariant=False))
    a, b = _request(), _request("snow on a lake", seed=9)
    texts, _ = mixing.encode_text([a.prompt, b.prompt])
    calls = []
    hook = mixing.keyframes.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    mixing.keyframes([a, b], texts, [None, None])
    hook.remove()
    assert max(calls) == 2 * 3 * 12  # one call holds both requests' three guidance branches of 12 frames


def test_motion_and_noise_augmentation_reach_the_keyframe_unet(pipeline):
    seen = []
    hook = pipeline.keyframes.unet.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append((kwargs.get("motion_score"), kwargs.get("noise_aug_time"))), with_kwargs=True)
    try:
        requests = [_request(motion="extreme", noise_augmentation=7), _request(motion="low")]
        texts, _ = pipeline.encode_text([r.prompt for r in requests])
        pipeline.keyframes(requests, texts, [None, None])
    finally:
        hook.remove()
    video_calls = [(m.unique().tolist(), n.unique().tolist()) for m, n in seen if m is not None]
    assert video_calls[0] == ([100], [7]) and video_calls[-1] == ([1], [20])


@pytest.fixture(scope="module")
def float32_frames(pipeline):
    """The float32 frames of one request per fps, made once for every precision compared with them."""
    made = {}

    def frames(fps: str) -> np.ndarray:
        if fps not in made:
            made[fps] = pipeline.generate([_request(fps=fps)])[0].frames.astype(int)
        return made[fps]

    return frames


# float16 once, and at fps low: PyTorch's CPU float16 convolutions are slow (about 19 s a run at fps medium on
# the 2-core machine, 6 s at fps low), and autocast and the interpolation loop are the same code for both half
# types (the bfloat16 runs cover fps medium).
@pytest.mark.parametrize("dtype, precision, fps", [("bfloat16", "official", "medium"), ("bfloat16", "fast", "medium"),
                                                   ("float16", "fast", "low")])
def test_half_precision_end_to_end(float32_frames, dtype, precision, fps):
    """Every network in bfloat16 / float16, with autocast (official) or without (fast): no dtype error,
    and frames within 12/255 on average of float32 (random tiny networks; real weights are far closer)."""
    request, reference = _request(fps=fps), float32_frames(fps)
    runtime = RuntimeConfig(device="cpu", precision=precision, **{f"{n}_dtype": dtype for n in NETWORKS})
    try:
        half = VideoPipeline(ModelSource(preset="tiny"), runtime)
    except RuntimeError as err:  # pragma: no cover - a CPU without the kernels
        pytest.skip(f"{dtype} networks do not run on this CPU: {err}")
    autocast = []
    half.keyframes.unet.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    try:
        frames = half.generate([request])[0].frames.astype(int)
    except (RuntimeError, NotImplementedError) as err:
        if dtype == "float16" and "Half" in str(err):
            pytest.skip(f"float16 kernels missing on this CPU: {err}")
        raise
    assert next(half.interpolate.unet.parameters()).dtype == getattr(torch, dtype)
    assert set(autocast) == {precision == "official"}
    assert frames.shape == reference.shape
    assert np.abs(frames - reference).mean() < 12


class LatentOracle(torch.nn.Module):
    """A keyframe denoiser that predicts x0 = the conditioning frame (zeros when there is none)."""

    def __init__(self, context_dim):
        super().__init__()
        self.register_buffer("null_embedding", torch.zeros(context_dim))
        self.register_buffer("alphas", torch.empty(0))

    def forward(self, x, time, context, context_mask, *args, **kwargs):
        from kvray.config.sampling import KEYFRAME_SAMPLER
        from kvray.sampling.schedulers import ddpm_scheduler

        alphas = ddpm_scheduler(KEYFRAME_SAMPLER).alphas_cumprod[time.long()].reshape(-1, 1, 1, 1)
        x_t, condition, mask = x[:, :4], x[:, 4:8], x[:, 8:9]
        # Every frame of a clip takes the clip's conditioning frame (frame 0 carries it, mask 1).
        frames = kwargs.get("num_frames") or (args[1] if len(args) > 1 else 1)
        clip_condition = (condition * mask).reshape(-1, frames, *condition.shape[1:]).sum(1, keepdim=True)
        target = clip_condition.expand(-1, frames, -1, -1, -1).reshape_as(x_t)
        return (x_t - alphas.sqrt() * target) / (1 - alphas).clamp(min=1e-8).sqrt()


class PoolingAutoencoder(torch.nn.Module):
    """An 8x average-pool encoder and nearest-upsampling decoder: an autoencoder that keeps content."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * self.scale

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")


def test_image2video_keeps_the_given_first_frame(tmp_path):
    """The given image is what conditions the keyframes and what frame 0 shows; text2video draws its own.

    Random networks cannot show content, so the keyframe U-Net and both MoVQs are stand-ins that keep
    content; everything else (image loading, crop, encoding, conditioning, sampling loops,
    interpolation, chunked decoding) is the real pipeline.
    """
    pipe = VideoPipeline(ModelSource(preset="tiny"))
    pipe.keyframes.unet = LatentOracle(16)
    pipe.keyframes.movq = pipe.decode.movq = PoolingAutoencoder()
    yy, xx = np.mgrid[0:96, 0:160]
    picture = np.stack([xx * 255 // 160, yy * 255 // 96, np.full_like(xx, 200)], -1).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    # w_I = 1: the image-guided branch alone (w_I > 1 extrapolates away from the unconditional one).
    plain = GuidanceConfig(guidance_weight_image=1.0)
    i2v = pipe.generate([_request(image=str(tmp_path / "in.png"), steps=4, guidance=plain)])[0]
    t2v = pipe.generate([_request(steps=4, guidance=plain)])[0]
    reference = to_uint8(image_to_tensor(Image.fromarray(picture), 64, 64))[0].astype(float)
    error = lambda frame: np.abs(frame.astype(float) - reference).mean()
    assert error(i2v.frames[0]) < 10 < error(t2v.frames[0])


@pytest.mark.parametrize("args, message", [
    (["--width", "100"], "multiple of 64"),
    (["--fps", "fast"], "fps"),
    (["--motion", "wild"], "motion"),
    (["--image", "does-not-exist.png"], "does-not-exist.png"),
])
def test_bad_requests_give_one_clear_error_and_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "car.mp4"
    assert main(["generate", "a car", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_movie_from_scenes_alone_and_no_prompt_at_all(tmp_path, capsys):
    out = tmp_path / "movie.mp4"
    assert main(["generate", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: a prompt is needed (or --scene for each scene of a mini-movie)\n"
    args = ["--out", str(out), "--width", "64", "--height", "64", "--steps", "1", "--seed", "3"]
    assert main(["generate", "--scene", "a seed", "--scene", "a tree", *args]) == 0
    assert read_video(out.read_bytes())[0].shape == (24, 64, 64, 3)  # two scenes of 12 frames


def test_unreadable_image_is_an_error(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["generate", "a car", "--out", str(tmp_path / "o.mp4"), "--image", str(tmp_path / "broken.png")]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_generate_cli_writes_the_video(tmp_path, capsys):
    out = tmp_path / "car.webp"
    argv = ["generate", "a red car", "--out", str(out), "--fps", "low", "--seed", "1", "--steps", "2", "--height", "128"]
    assert main(argv) == 0
    frames, _ = read_video(out)
    assert frames.shape == (12, 128, 64, 3)  # the toy model's default width, the height given
    assert "seed 1" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- official pixels

@pytest.fixture(scope="module")
def pipeline_io(golden_e2e_dir):
    return load_file(golden_e2e_dir / "pipeline.io.safetensors")


def _close_uint8(got: np.ndarray, expected: np.ndarray) -> None:
    """The golden README's bound: off by at most 1 on fewer than 0.1% of the values."""
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_first_frame_pixels_and_reencoding_match_official(golden_e2e_dir, pipeline_io):
    movq, _, _ = load_case_file(golden_e2e_dir, "movq_image", "image_movq")
    io = pipeline_io
    with torch.inference_mode():
        decoded = movq.decode(io["t2v.key_frame_image.latent"])
    assert (decoded - io["t2v.key_frame_image.decoded"]).abs().max() <= 1e-4
    first = io["t2v.key_frame_image.pil_uint8"].numpy()
    _close_uint8(to_uint8(io["t2v.key_frame_image.decoded"])[0], first)
    for run, image, (width, height) in (("t2v", first, (128, 64)), ("i2v", io["i2v.input_image_uint8"].numpy(), (64, 64))):
        pixels = image_to_tensor(Image.fromarray(image), width, height)
        assert (pixels - io[f"{run}.encode_image.input"]).abs().max() <= 1e-6
        with torch.inference_mode():
            assert (movq.encode(pixels) - io[f"{run}.encode_image.latent"]).abs().max() <= 1e-4


def test_chunked_video_decoding_matches_official(golden_e2e_dir, pipeline_io):
    movq, _, _ = load_case_file(golden_e2e_dir, "movq_video", "video_movq")
    decode = Decode(movq)
    for run in ("t2v", "i2v"):
        _close_uint8(decode(pipeline_io[f"{run}.decode_video.input"]), pipeline_io[f"{run}.frames_uint8"].numpy())
