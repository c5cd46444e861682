"""The training recipe: the loss falls, a killed run resumes to the same weights, exports load where
`--weights` reads them, and what does not fit is one clear error."""

from __future__ import annotations

import csv

import pytest
import torch

from kvray.config.presets import get_preset
from kvray.training import TrainConfig, train
from kvray.training.loop import export_work
from kvray.weights.networks import read_converted
from kvray.weights.source import WeightsSource


class Killed(Exception):
    pass


def _kill_at(step: int, total: int):
    """A progress callback that stops the run as a kill would: after step - 1 was checkpointed."""
    def progress(line):
        if f"step {step}/{total}," in line:
            raise Killed
    return progress


def _run(work, steps, progress=lambda line: None, **kwargs):
    # 32 x 32 frames, 2 per batch: the machinery at a fraction of the toy's cost.
    config = TrainConfig(step="image_movq", work=str(work), steps=steps, batch_size=2, size=32, warmup=5, lr=4e-3,
                         log_every=1, validate_every=1, checkpoint_every=kwargs.pop("checkpoint_every", 1000), **kwargs)
    return train(config, progress=progress)


def _losses(work, column="loss") -> list[float]:
    with open(work / "image_movq" / "loss.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def _weights(work) -> dict[str, torch.Tensor]:
    return read_converted(WeightsSource(str(work / "weights")), "image_movq")[1]


def test_loss_falls_and_a_resumed_run_ends_where_an_unbroken_one_does(tmp_path):
    _run(tmp_path / "straight", 40)
    losses = _losses(tmp_path / "straight")
    assert len(losses) == 40
    # The validation loss: one fixed batch of held-out scenes, fixed noise, after every step.
    validation = _losses(tmp_path / "straight", "validation_loss")
    assert sum(validation[-3:]) < 0.8 * sum(validation[:3]), validation

    # Killed during step 35, then resumed: a batch is a function of (seed, step), and the optimiser and EMA
    # come back with the weights.
    with pytest.raises(Killed):
        _run(tmp_path / "resumed", 40, checkpoint_every=1, progress=_kill_at(35, 40))
    _run(tmp_path / "resumed", 40, checkpoint_every=1)
    assert _losses(tmp_path / "resumed") == pytest.approx(losses, rel=1e-4)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    _run(tmp_path, 1, checkpoint_every=1)
    with pytest.raises(ValueError, match="seed=0"):
        _run(tmp_path, 2, seed=1)


def test_a_frame_size_that_does_not_fit_the_preset_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        train(TrainConfig(step="image_movq", work=str(tmp_path), steps=1, size=48))
    with pytest.raises(ValueError, match="multiple of 64"):
        train(TrainConfig(step="image_movq", work=str(tmp_path), steps=1, size=96, preset="tiny"))


def test_a_step_before_its_inputs_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_movq is not trained yet"):
        train(TrainConfig(step="first_frame", work=str(tmp_path), steps=1))


def test_export_writes_every_network_in_half_precision_with_a_digest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not trained"):
        export_work(str(tmp_path), str(tmp_path / "out"), torch.float16)
    _run(tmp_path, 1)
    # The other networks as a finished work directory would hold them (fresh weights suffice here).
    from kvray.training.loop import WEIGHTS_DIR
    from kvray.weights.convert import write_converted
    from kvray.weights.networks import get_network

    preset = get_preset("toy")
    for name in ("text_encoder", "keyframe_unet", "interpolation_unet", "video_movq"):
        module = get_network(name).build(getattr(preset, name))
        extras = {"null_embedding": torch.zeros(preset.keyframe_unet.context_dim)} if name.endswith("unet") else {}
        write_converted(str(tmp_path / WEIGHTS_DIR), name, "toy", getattr(preset, name), module.state_dict(), extras)
    written = export_work(str(tmp_path), str(tmp_path / "out"), torch.float16)
    assert len(written) == 11
    version = (tmp_path / "out" / "VERSION").read_text().strip()
    assert len(version) == 16
    # Exported again (safetensors orders its metadata differently each time): the same tensors, the same name.
    export_work(str(tmp_path), str(tmp_path / "again"), torch.float16)
    assert (tmp_path / "again" / "VERSION").read_text().strip() == version
    _, state, _ = read_converted(WeightsSource(str(tmp_path / "out")), "keyframe_unet")
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}


def test_gradient_checkpointing_gives_the_same_gradients():
    from kvray.config.presets import TINY
    from kvray.models.unet3d import KeyframeUNet
    from kvray.training.loop import enable_gradient_checkpointing

    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        unet = KeyframeUNet(TINY.keyframe_unet)
        if checkpointed:
            assert enable_gradient_checkpointing(unet) == 8
        x = torch.randn(2 * 3, 9, 16, 16, generator=torch.Generator().manual_seed(1))
        context = torch.randn(6, 5, TINY.keyframe_unet.context_dim, generator=torch.Generator().manual_seed(2))
        out = unet(x, torch.tensor([10.0] * 6), context, torch.ones(6, 5, dtype=torch.bool),
                   temporal_embed=torch.arange(3).repeat(2).float(), num_frames=3,
                   noise_aug_time=torch.zeros(6, dtype=torch.int32), motion_score=torch.ones(6, dtype=torch.int32))
        out.pow(2).mean().backward()
        return {name: p.grad for name, p in unet.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_video_mode_starts_as_image_mode_frame_by_frame():
    from kvray.training.steps import start_video_mode_as_image_mode
    from kvray.weights.networks import get_network

    torch.manual_seed(0)
    unet = get_network("keyframe_unet").build(get_preset("toy").keyframe_unet).eval()
    start_video_mode_as_image_mode(unet)
    frames, context = 3, torch.randn(1, 5, get_preset("toy").keyframe_unet.context_dim)
    latents = torch.randn(frames, 4, 8, 8)
    condition = torch.randn(frames, 5, 8, 8)  # the first frame's condition: ignored at the start
    time = torch.full((frames,), 500.0)
    with torch.no_grad():
        video = unet(torch.cat([latents, condition], 1), time, context.expand(frames, -1, -1),
                     temporal_embed=torch.arange(frames, dtype=torch.float32), num_frames=frames,
                     noise_aug_time=torch.full((frames,), 20), motion_score=torch.full((frames,), 10))
        image = unet(torch.cat([latents, torch.zeros_like(condition)], 1), time, context.expand(frames, -1, -1))
    assert torch.allclose(video, image, atol=1e-5)


@pytest.mark.parametrize("preset", ["kv11", "toy"])
@pytest.mark.parametrize("network", ["keyframe_unet", "interpolation_unet"])
def test_each_unet_learns_the_target_its_sampler_reads(preset, network):
    """A network that outputs its training target exactly gives the sampler the clean latents back, at every
    timestep the preset's sampler walks (so training and sampling agree on what the U-Net predicts)."""
    from kvray.config.sampling import SamplingConfig
    from kvray.sampling.schedulers import DDPMStepper
    from kvray.training.diffusion import add_noise, alphas_cumprod
    from kvray.training.steps import unet_target

    if network == "keyframe_unet":
        prediction = get_preset(preset).keyframe_prediction
        sampler = SamplingConfig().for_keyframe_unet(prediction).keyframes
    else:
        prediction = get_preset(preset).interpolation_prediction
        sampler = SamplingConfig().for_interpolation_unet(prediction).interpolation
    stepper = DDPMStepper(sampler)
    acp = alphas_cumprod()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 4, 8, 8, generator=generator) * 1.6 - 0.8  # inside the sampler's x0 clipping
    noise = torch.randn(x0.shape, generator=generator)
    for index, t in enumerate(stepper.timesteps):
        if prediction == "epsilon" and acp[t] < 1e-3:
            continue  # x0 = (x - eps) / sqrt(alpha_bar) is ill-conditioned where kv11 starts; float32 cannot recover it
        times = torch.full((2,), t)
        sample = add_noise(acp, x0, noise, times)
        _, predicted = stepper.step_frames(unet_target(prediction, acp, x0, noise, times), index, sample,
                                           variance_noise=torch.zeros_like(x0))
        torch.testing.assert_close(predicted, x0, atol=2e-4, rtol=0)


def test_interpolation_starts_from_the_keyframe_unets_spatial_layers():
    """The spatial layers, time embedding and text pooling come from the trained keyframe U-Net; the input
    and output convolutions (their own channel counts) and the temporal layers stay a fresh network's."""
    from kvray.training.steps import start_interpolation_from_keyframe_unet
    from kvray.weights.networks import get_network

    torch.manual_seed(0)
    preset = get_preset("toy")
    keyframe_unet = get_network("keyframe_unet").build(preset.keyframe_unet)
    unet = get_network("interpolation_unet").build(preset.interpolation_unet)
    fresh = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    start_interpolation_from_keyframe_unet(unet, keyframe_unet)
    source, started = keyframe_unet.state_dict(), unet.state_dict()
    copied = {name for name in started if not torch.equal(started[name], fresh[name])}
    assert "down_samples.1.resnet_attn_blocks.0.1.attention.to_query.weight" in copied or len(copied) > 300
    assert all(torch.equal(started[name], source[name]) for name in copied)
    assert not any("temporal" in name or name in ("in_layer.weight", "out_layer.2.weight", "out_layer.2.bias") for name in copied)


def test_the_motion_step_continues_from_the_keyframe_unet_with_times_drawn_towards_high_noise(tmp_path):
    """`keyframes_motion` takes the keyframe U-Net as `keyframes` left it (no layer reset to its start) and
    draws three quarters of its diffusion times above t = 630, where the layout of the keyframes is decided."""
    from kvray.training.data import ToyData
    from kvray.training.steps import STEPS, Context
    from kvray.weights.convert import write_converted
    from kvray.weights.networks import get_network

    preset = get_preset("toy")
    torch.manual_seed(0)
    written = {}
    for name in ("text_encoder", "image_movq", "keyframe_unet"):
        module = get_network(name).build(getattr(preset, name))
        extras = {"null_embedding": torch.randn(preset.keyframe_unet.context_dim)} if name == "keyframe_unet" else {}
        write_converted(str(tmp_path), name, "toy", getattr(preset, name), module.state_dict(), extras)
        written[name] = module.state_dict()
    step = STEPS["keyframes_motion"](Context(preset, ToyData(), str(tmp_path)))
    loaded = step.networks["keyframe_unet"].state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in written["keyframe_unet"].items())

    times = step.timesteps(20_000, torch.Generator().manual_seed(0))
    assert int(times.min()) >= 0 and int(times.max()) <= 999
    assert (times > 630).float().mean() == pytest.approx(0.75, abs=0.02)
    step.batch_size = 1
    loss = step.loss(0, torch.Generator().manual_seed(0))  # a video-mode batch
    assert torch.isfinite(loss) and loss.requires_grad
