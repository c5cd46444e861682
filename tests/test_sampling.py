"""Sampling: scheduler and loop parity with the official code, batching and seeding behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from pydantic import ValidationError
from safetensors.torch import load_file

from kvray.config import TINY
from kvray.config.presets import get_preset
from kvray.network_parity import build_golden_network
from kvray.sampling import (
    FIRST_FRAME_SAMPLER,
    INTERPOLATION_SAMPLER,
    KEYFRAME_SAMPLER,
    DDPMStepper,
    DPMSolverStepper,
    GeneratorNoise,
    GuidanceConfig,
    LoopOptions,
    RecordedNoise,
    SamplerConfig,
    SamplingConfig,
    TextCondition,
    add_noise,
    assemble_interpolated,
    check_schedulers_file,
    ddpm_scheduler,
    dpm_solver_scheduler,
    guide_2way,
    guide_3way,
    interpolate,
    interpolation_passes,
    motion_score,
    sample_first_frame,
    sample_interpolation,
    sample_keyframes,
)
from kvray.weights import random_network

E2E_ATOL = 1e-3  # loops fed the recorded draws (golden-e2e README)
MODEL_ATOL = 1e-4  # per-step model output given the recorded model input
# A request alone vs in a request-mixing batch (the `batch_invariant: false` layout), fp32 CPU, 2 steps:
# equal up to the rounding of batched kernels, which depends on the CPU (1.7e-5 seen on one machine).
# The bitwise guarantee comes from per-request calls (tests/test_pipeline.py).
BATCH_ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Schedulers


@pytest.mark.parametrize("golden", ["golden_dir", "golden_e2e_dir"])
def test_scheduler_golden(golden, request):
    checks = check_schedulers_file(request.getfixturevalue(golden) / "schedulers.json")
    assert all(c.ok for c in checks), "\n".join(c.line() for c in checks if not c.ok)
    names = {c.call.split(".", 1)[1] for c in checks}
    assert {"config", "timesteps", "alphas_cumprod", "step0", "step2", "out"} <= names
    assert sum(c.call.endswith(".out") for c in checks) == 1  # the key-frame noise augmentation


def test_default_timesteps():
    assert DDPMStepper(KEYFRAME_SAMPLER).timesteps == list(range(980, -1, -20))
    assert DDPMStepper(FIRST_FRAME_SAMPLER).timesteps == list(range(980, -1, -20))
    assert DDPMStepper(INTERPOLATION_SAMPLER).timesteps == list(range(999, 0, -100))
    assert INTERPOLATION_SAMPLER.prediction_type == "v_prediction" and KEYFRAME_SAMPLER.prediction_type == "epsilon"
    assert SamplingConfig().keyframes.solver == "ddpm"  # the multistep solver is an option only
    stepper = DDPMStepper(KEYFRAME_SAMPLER)
    assert stepper.scheduler.alphas_cumprod[-1] == 0  # zero terminal SNR


def test_a_v_keyframe_unet_is_sampled_from_t_999_and_kv11_as_the_official_one():
    official = SamplingConfig()
    assert official.for_keyframe_unet(get_preset("kv11").keyframe_prediction) is official
    toy = official.for_keyframe_unet(get_preset("toy").keyframe_prediction)
    for sampler in (toy.first_frame, toy.keyframes):
        assert sampler.prediction_type == "v_prediction"
        assert DDPMStepper(sampler).timesteps[0] == 999  # alpha_bar 0: a v network predicts x0 there
    assert toy.keyframes.num_steps == 50


def test_the_toys_interpolation_unet_is_sampled_for_the_frames_it_predicts_and_kv11_as_the_official_one():
    official = SamplingConfig()
    assert official.for_interpolation_unet(get_preset("kv11").interpolation_prediction) is official
    toy = official.for_interpolation_unet(get_preset("toy").interpolation_prediction)
    assert toy.interpolation == official.interpolation.model_copy(update={"prediction_type": "sample"})
    assert (toy.first_frame, toy.keyframes) == (official.first_frame, official.keyframes)


@pytest.mark.parametrize("config", [KEYFRAME_SAMPLER, INTERPOLATION_SAMPLER,
                                    KEYFRAME_SAMPLER.model_copy(update={"num_steps": 3})])
def test_step_equals_diffusers(config):
    """Our step with injected noise is diffusers' `DDPMScheduler.step` with a generator, bit for bit."""
    ours = DDPMStepper(config)
    theirs = DDPMScheduler(
        num_train_timesteps=1000, dynamic_thresholding_ratio=0.995, thresholding=True, variance_type="fixed_small_log",
        beta_schedule="squaredcos_cap_v2", prediction_type=config.prediction_type, rescale_betas_zero_snr=True,
        timestep_spacing=config.timestep_spacing,
    )
    theirs.set_timesteps(config.num_steps)
    sample, model_output = 1.5 * torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for index, t in enumerate(ours.timesteps):
        expected = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(index)).prev_sample
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(index)) if t > 0 else None
        got, _ = ours.step_frames(model_output, index, sample, noise)
        assert torch.equal(got, expected), (t, max_diff(got, expected))


def test_sampler_config_is_strict():
    with pytest.raises(ValidationError):
        SamplerConfig(prediction_type="epsilon", num_steps=50, timestep_spacing="leading", steps=3)
    with pytest.raises(ValidationError):
        SamplerConfig(prediction_type="epsilon", num_steps=0, timestep_spacing="leading")
    with pytest.raises(ValidationError):
        KEYFRAME_SAMPLER.num_steps = 3
    assert GuidanceConfig().model_dump() == {
        "key_frame_guidance_scale": 5.0, "guidance_weight_prompt": 5.0, "guidance_weight_image": 2.0,
        "interpolation_guidance_scale": 0.5,
    }


# ----------------------------------------------------------------------------------------------------
# Small pieces


def test_guidance():
    a, b, c = torch.randn(3, 2, 4)
    torch.testing.assert_close(guide_3way(a, b, c, 5.0, 2.0), c + 2.0 * (b - c) + 5.0 * (a - b))
    torch.testing.assert_close(guide_2way(a, c, 0.5), a + 0.5 * (a - c))


def test_motion_and_fps():
    assert [motion_score(m) for m in ("low", "medium", "high", "extreme")] == [1, 10, 50, 100]
    assert motion_score(7) == 7
    for bad in ("normal", "High", None):
        with pytest.raises(ValueError):
            motion_score(bad)
    assert interpolation_passes("low") == () and interpolation_passes("high") == (3, 1)
    with pytest.raises(ValueError):
        interpolation_passes("ultra")


def test_recorded_noise_is_strict():
    noise = RecordedNoise([torch.zeros(2, 3), torch.ones(4)], kinds=["randn", "rand"])
    with pytest.raises(RuntimeError, match="shape"):
        noise.randn((3, 2))
    assert noise.randn((2, 3)).shape == (1, 2, 3)
    with pytest.raises(RuntimeError, match="rand"):
        noise.randn((4,))
    assert torch.equal(noise.rand((4,)), torch.ones(1, 4)) and noise.remaining == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        noise.rand((4,))


def test_generator_noise_is_per_request():
    alone = GeneratorNoise.from_seeds([7])
    batch = GeneratorNoise.from_seeds([3, 7, 9])
    for _ in range(2):
        assert torch.equal(alone.randn((2, 5))[0], batch.randn((2, 5))[1])
        assert torch.equal(alone.rand((5,))[0], batch.rand((5,))[1])


def test_assemble_interpolated_matches_official_indexing():
    frames, groups = torch.randn(4, 2, 3, 3), torch.randn(3, 6, 3, 3)
    video = assemble_interpolated(frames, groups)
    # The official re-ordering, written with its index lists.
    between = torch.cat(list(groups.reshape(3, 3, 2, 3, 3)))
    expected = torch.zeros(13, 2, 3, 3)
    expected[[i for i in range(13) if i % 4 != 0]] = between
    expected[[i for i in range(13) if i % 4 == 0]] = frames
    assert torch.equal(video, expected)


def test_add_noise_is_uniform_augmentation_formula():
    x, u = torch.randn(4, 2, 2), torch.rand(4, 2, 2)
    torch.testing.assert_close(add_noise(x, u, 20), 0.9990567 * x + 0.0434255 * u, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Official loops replayed with the recorded draws (golden-e2e)


class Recorder:
    """Wraps a U-Net and keeps every call's arguments and output."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.null_embedding = module.null_embedding

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.fixture(scope="module")
def e2e(golden_e2e_dir):
    config = json.loads((golden_e2e_dir / "e2e.config.json").read_text())
    io = load_file(golden_e2e_dir / "e2e.io.safetensors")

    def network(name, kind):
        spec = json.loads((golden_e2e_dir / f"{name}.config.json").read_text())
        return build_golden_network(kind, spec["constructor_kwargs"], golden_e2e_dir / f"{name}.weights.safetensors").eval()

    networks = {"keyframe": network("keyframe_unet", "keyframe_unet"),
                "interpolation": network("interp_unet", "interpolation_unet")}
    return config, io, networks


def _recorded_noise(config, io, run):
    calls = config["runs"][run]["rng_calls"]
    kinds = ["rand" if c["func"] in ("torch.rand", "torch.rand_like") else "randn" for c in calls]
    return RecordedNoise([io[c["saved_as"]] for c in calls], kinds=kinds)


def _check_steps(recorder, io, run, constants):
    """Per step: our U-Net input within 1e-3 of the recorded one, time and loop constants exact, and our
    U-Net on the RECORDED input within 1e-4 of the recorded output."""
    assert len(recorder.calls) == len([k for k in io if k.startswith(f"{run}.step") and k.endswith(".model_x")])
    for step, (args, kwargs, _) in enumerate(recorder.calls):
        x, time, context, mask = args
        assert max_diff(x, io[f"{run}.step{step}.model_x"]) <= E2E_ATOL
        assert torch.equal(time, io[f"{run}.step{step}.model_time"]) and time.dtype == io[f"{run}.step{step}.model_time"].dtype
        assert torch.equal(context, io[f"{run}.large_context"]) and torch.equal(mask, io[f"{run}.large_context_mask"])
        for ours, recorded in constants.items():
            recorded_tensor = io[f"{run}.{recorded}"]
            assert torch.equal(kwargs[ours], recorded_tensor) and kwargs[ours].dtype == recorded_tensor.dtype, ours
        with torch.no_grad():
            out = recorder.module(io[f"{run}.step{step}.model_x"], time, context, mask, **kwargs)
        assert max_diff(out, io[f"{run}.step{step}.model_out"]) <= MODEL_ATOL, step


def _text(io):
    return TextCondition(io["inputs.context_1"][0], io["inputs.context_mask_1"][0])


def test_e2e_first_frame(e2e):
    config, io, nets = e2e
    run = config["runs"]["image"]
    recorder, noise = Recorder(nets["keyframe"]), _recorded_noise(config, io, "image")
    sampler = FIRST_FRAME_SAMPLER.model_copy(update={"num_steps": run["num_inference_steps"]})
    assert DDPMStepper(sampler).timesteps == run["timesteps"]
    out = sample_first_frame(recorder, [_text(io)], tuple(io["image.out"].shape[-2:]), noise, sampler=sampler)
    assert noise.remaining == 0
    assert max_diff(out, io["image.out"]) <= E2E_ATOL
    _check_steps(recorder, io, "image", {})


def test_e2e_keyframes(e2e):
    config, io, nets = e2e
    run = config["runs"]["keyframe"]
    recorder, noise = Recorder(nets["keyframe"]), _recorded_noise(config, io, "keyframe")
    sampler = KEYFRAME_SAMPLER.model_copy(update={"num_steps": run["num_inference_steps"]})
    num_frames = io["keyframe.out"].shape[0]
    out = sample_keyframes(
        recorder, [_text(io)], io["keyframe.key_frame"][None], noise, motion="medium", num_frames=num_frames,
        guidance=GuidanceConfig(guidance_weight_prompt=5.0, guidance_weight_image=2.0), noise_augmentation=20,
        sampler=sampler,
    )
    assert noise.remaining == 0
    assert max_diff(out[0], io["keyframe.out"]) <= E2E_ATOL
    constants = {"temporal_embed": "large_temporal", "noise_aug_time": "noise_aug_time", "motion_score": "motion_score"}
    _check_steps(recorder, io, "keyframe", constants)
    assert all(kwargs["num_frames"] == num_frames for _, kwargs, _ in recorder.calls)


def test_e2e_interpolation(e2e):
    config, io, nets = e2e
    run = config["runs"]["interpolation"]
    recorder, noise = Recorder(nets["interpolation"]), _recorded_noise(config, io, "interpolation")
    sampler = INTERPOLATION_SAMPLER.model_copy(update={"num_steps": run["num_inference_steps"]})
    assert DDPMStepper(sampler).timesteps == run["timesteps"]
    video = interpolate(
        recorder, [_text(io)], io["interpolation.base_frames"][None], noise, skip_frames=3,
        guidance=GuidanceConfig(interpolation_guidance_scale=0.5), sampler=sampler,
    )
    assert noise.remaining == 0
    assert max_diff(video[0], io["interpolation.out_video"]) <= E2E_ATOL
    constants = {"perturbation_time": "perturbation_time", "skip_frames": "skip_frames", "temporal_mask": "temporal_mask"}
    _check_steps(recorder, io, "interpolation", constants)
    assert all(kwargs["num_predicted_groups"] == run["num_predicted_groups"] for _, kwargs, _ in recorder.calls)


# ----------------------------------------------------------------------------------------------------
# Batches and seeds, with tiny random U-Nets


@pytest.fixture(scope="module")
def tiny():
    keyframe = random_network("keyframe_unet", TINY.keyframe_unet, seed=1)
    interpolation = random_network("interpolation_unet", TINY.interpolation_unet, seed=2)
    generator = torch.Generator().manual_seed(3)
    dim = TINY.keyframe_unet.context_dim

    def text(length, real):
        mask = torch.zeros(length, dtype=torch.int64)
        mask[:real] = 1
        return TextCondition(torch.randn(length, dim, generator=generator) * mask[:, None], mask)

    # Two contexts of one length and one of another: a batch pads them and passes context_lengths.
    texts = [text(5, 4), text(7, 6), text(5, 3)]
    latents = torch.randn(3, 5, 4, 8, 8, generator=generator)
    return keyframe, interpolation, texts, latents


SEEDS = [11, 22, 33]
GUIDANCE = [GuidanceConfig(), GuidanceConfig(guidance_weight_image=3.0, key_frame_guidance_scale=3.0),
            GuidanceConfig(interpolation_guidance_scale=1.0)]
FAST = {"num_steps": 2}


def _run_stage(stage, tiny, indices, seeds, sampler_update=FAST, callback=None):
    keyframe, interpolation, texts, latents = tiny
    texts = [texts[i] for i in indices]
    guidance = [GUIDANCE[i] for i in indices]
    noise = GeneratorNoise.from_seeds(seeds)
    options = LoopOptions(callback=callback)
    if stage == "first_frame":
        return sample_first_frame(keyframe, texts, (8, 8), noise, guidance=guidance,
                                  sampler=FIRST_FRAME_SAMPLER.model_copy(update=sampler_update), options=options)
    if stage == "keyframes":
        return sample_keyframes(keyframe, texts, latents[indices, 0], noise, motion=[["low", "high", 10][i] for i in indices],
                                num_frames=3, guidance=guidance, sampler=KEYFRAME_SAMPLER.model_copy(update=sampler_update),
                                options=options)
    return sample_interpolation(interpolation, texts, latents[indices, :3], noise, skip_frames=3, guidance=guidance,
                                sampler=INTERPOLATION_SAMPLER.model_copy(update=sampler_update), options=options)


@pytest.mark.parametrize("stage", ["first_frame", "keyframes", "interpolation"])
def test_a_mixed_batch_computes_each_request_as_alone(tiny, stage):
    batch = _run_stage(stage, tiny, [0, 1, 2], SEEDS)
    assert torch.isfinite(batch).all()
    for i in range(3):
        alone = _run_stage(stage, tiny, [i], [SEEDS[i]])
        assert max_diff(alone[0], batch[i]) <= BATCH_ATOL, (stage, i)
    # Another order, another batch composition: request 2 unchanged.
    swapped = _run_stage(stage, tiny, [2, 0], [SEEDS[2], SEEDS[0]])
    assert max_diff(swapped[0], batch[2]) <= BATCH_ATOL


@pytest.mark.parametrize("stage", ["first_frame", "keyframes", "interpolation"])
def test_seeds(tiny, stage):
    first = _run_stage(stage, tiny, [1], [5])
    assert torch.equal(first, _run_stage(stage, tiny, [1], [5]))
    assert max_diff(first, _run_stage(stage, tiny, [1], [6])) > 1e-3


def test_callback_and_shapes(tiny):
    seen = []
    out = _run_stage("keyframes", tiny, [0, 2], SEEDS[:2], sampler_update={"num_steps": 3},
                     callback=lambda i, n, t: seen.append((i, n, t)))
    assert out.shape == (2, 3, 4, 8, 8)
    assert seen == [(0, 3, 666), (1, 3, 333), (2, 3, 0)]
    keyframe, interpolation, texts, latents = tiny
    video = interpolate(interpolation, texts[:1], latents[:1, :3], GeneratorNoise.from_seeds([1]), skip_frames=1,
                        sampler=INTERPOLATION_SAMPLER.model_copy(update={"num_steps": 1}))
    assert video.shape == (1, 9, 4, 8, 8)
    assert torch.equal(video[0, ::4], latents[0, :3])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM-Solver
def test_dpm_solver_option(tiny):
    """The multistep solver: runs, needs no step noise (deterministic after the initial draw)."""
    update = {"solver": "dpmsolver++", "num_steps": 3}
    assert torch.isfinite(_run_stage("first_frame", tiny, [0, 1], SEEDS[:2], sampler_update=update)).all()
    keyframe, _, texts, _ = tiny
    noise = RecordedNoise([torch.randn(1, 4, 8, 8)])  # only x_T: a DDPM loop would ask for more
    sample_first_frame(keyframe, texts[:1], (8, 8), noise, sampler=FIRST_FRAME_SAMPLER.model_copy(update=update))
    assert noise.remaining == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM-Solver
@pytest.mark.parametrize("sampler", [FIRST_FRAME_SAMPLER, KEYFRAME_SAMPLER, INTERPOLATION_SAMPLER])
def test_dpm_solver_is_diffusers_own_on_the_official_schedule_one_request_at_a_time(sampler):
    """The multistep solver on the DDPM training schedule but for its last step: the official schedule ends
    at alphas_cumprod = 0 (zero terminal SNR, float32), where DPM-Solver's log-SNR is infinite, and
    diffusers sets it to 2**-24 there. Its steps are those of a diffusers scheduler of each request's own:
    a request's trajectory does not depend on its batch."""
    config = sampler.model_copy(update={"solver": "dpmsolver++", "num_steps": 6})
    dpm, ddpm = dpm_solver_scheduler(config).alphas_cumprod, ddpm_scheduler(config).alphas_cumprod
    assert torch.equal(dpm[:-1], ddpm[:-1]) and ddpm[-1] == 0 and dpm[-1] == 2**-24
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(2, 3, 4, 8, 8, generator=generator)
    outputs = [torch.randn(batch.shape, generator=generator) for _ in range(config.num_steps)]
    stepper = DPMSolverStepper(config)
    alone = [dpm_solver_scheduler(config) for _ in range(2)]
    ours, theirs = batch, batch.clone()
    for index, (t, output) in enumerate(zip(stepper.timesteps, outputs)):
        ours = stepper.step(output, index, ours, noise=None)
        theirs = torch.stack([s.step(o, t, x).prev_sample for s, o, x in zip(alone, output, theirs)])
        assert torch.equal(ours, theirs), t
    assert stepper.timesteps == [int(t) for t in alone[0].timesteps] and len(stepper.timesteps) == 6


def test_bad_batches(tiny):
    keyframe, _, texts, latents = tiny
    with pytest.raises(ValueError, match="noise source"):
        sample_first_frame(keyframe, texts[:2], (8, 8), GeneratorNoise.from_seeds([1]))
    with pytest.raises(ValueError, match="motion"):
        sample_keyframes(keyframe, texts[:1], latents[:1, 0], GeneratorNoise.from_seeds([1]), motion="normal", num_frames=3)


# ----------------------------------------------------------------------------------------------------
# The sampling stages of the whole official pipeline (golden-e2e `pipeline.*`), stage by stage: each stage
# fed its SAVED inputs and draws (the README's advice: the random networks are chaotic across stages).

PIPELINE_STAGES = [
    # run, stage, rng indices, text call, input, expected, options
    ("t2v", "first_frame", [0, 1, 2], 0, None, "key_frame_image.latent", {}),
    ("t2v", "keyframes", [3, 4, 5, 6], 1, "encode_image.latent", "base_frames", {"motion": "medium"}),
    ("t2v", "interpolation", [7, 8, 9], 2, "interp_pass0.base_frames", "interp_pass0.video", {"skip_frames": 3}),
    ("i2v", "keyframes", [0, 1, 2, 3], 0, "encode_image.latent", "base_frames", {"motion": "high"}),
    ("i2v", "interpolation", [4, 5, 6], 1, "interp_pass0.base_frames", "interp_pass0.video", {"skip_frames": 3}),
    ("i2v", "interpolation", [7, 8, 9], 2, "interp_pass1.base_frames", "interp_pass1.video", {"skip_frames": 1}),
]


@pytest.fixture(scope="module")
def pipeline_golden(golden_e2e_dir):
    config = json.loads((golden_e2e_dir / "pipeline.config.json").read_text())
    return config, load_file(golden_e2e_dir / "pipeline.io.safetensors")


@pytest.mark.parametrize("run, stage, rngs, call, source, expected, options", PIPELINE_STAGES)
def test_pipeline_stages(e2e, pipeline_golden, run, stage, rngs, call, source, expected, options):
    _, _, nets = e2e
    config, io = pipeline_golden
    draws = {c["saved_as"]: c for c in config["runs"][run]["rng_calls"]}
    names = [f"{run}.rng{i}" for i in rngs]
    noise = RecordedNoise([io[n] for n in names], kinds=["rand" if "rand_like" in draws[n]["func"] else "randn" for n in names])
    text = [TextCondition(io[f"{run}.text.call{call}.context"][0], io[f"{run}.text.call{call}.context_mask"][0])]
    reference = io[f"{run}.{expected}"]
    if stage == "first_frame":
        out = sample_first_frame(nets["keyframe"], text, tuple(reference.shape[-2:]), noise,
                                 sampler=FIRST_FRAME_SAMPLER.model_copy(update={"num_steps": 3}))
    elif stage == "keyframes":
        out = sample_keyframes(nets["keyframe"], text, io[f"{run}.{source}"], noise, num_frames=reference.shape[0],
                               sampler=KEYFRAME_SAMPLER.model_copy(update={"num_steps": 3}), **options)[0]
    else:
        out = interpolate(nets["interpolation"], text, io[f"{run}.{source}"][None], noise,
                          sampler=INTERPOLATION_SAMPLER.model_copy(update={"num_steps": 2}), **options)[0]
    assert noise.remaining == 0
    assert max_diff(out, reference) <= E2E_ATOL


# ----------------------------------------------------------------------------------------------------
# The batch layout, exactly: a stand-in U-Net with the real ones' batch contract


class ClipContract(torch.nn.Module):
    """Honours the U-Nets' batch contract with element-wise arithmetic only (no batch-size dependent
    kernels), so a request must come out of a batch exactly as alone, over any number of steps:

    - every `num_frames` (keyframes) or `num_predicted_groups` (interpolation) consecutive samples are
      one clip, mixed over time with its neighbours (gated by `temporal_mask`);
    - the text is pooled per sample over its own length (`context_lengths` when padded);
    - every per-sample condition (time, frame index, noise level, motion, skip frames, ...) enters.

    The real U-Nets agree with a batch only up to float32 summation order (`BATCH_ATOL`, few steps).
    """

    def __init__(self, context_dim: int, interpolation: bool):
        super().__init__()
        self.interpolation = interpolation
        self.register_buffer("null_embedding", torch.linspace(-1, 1, context_dim))

    def forward(self, x, time, context, context_mask, temporal_embed=None, num_frames=None, noise_aug_time=None,
                motion_score=None, num_predicted_groups=None, perturbation_time=None, skip_frames=None,
                temporal_mask=None, context_lengths=None):
        per_sample = lambda v: v.to(x.dtype).reshape(-1, 1, 1, 1)
        lengths = context_lengths if context_lengths is not None else torch.full((x.shape[0],), context.shape[1])
        text = (context * context_mask[..., None]).sum(dim=1)[:, :4].sum(dim=1) / lengths.to(x.dtype)
        if self.interpolation:
            left, noisy, right = x[:, :4], x[:, 4:16], x[:, 16:20]
            out = noisy + 0.3 * torch.cat([left, right, left - right], dim=1)
            clip, gate = num_predicted_groups, per_sample(temporal_mask)
            scalars = 0.1 * per_sample(skip_frames) + 0.01 * per_sample(perturbation_time)
        else:
            out = x[:, :4] + 0.5 * x[:, 4:8] * x[:, 8:9]
            if temporal_embed is None:  # image mode
                clip, gate, scalars = 1, 0.0, 0.0
            else:
                clip, gate = num_frames, 1.0
                scalars = 0.1 * per_sample(temporal_embed) + 0.01 * per_sample(noise_aug_time) + 0.001 * per_sample(motion_score)
        # Temporal mixing inside each clip only: the next sample of the same clip (cyclic).
        clips = out.reshape(-1, clip, *out.shape[1:])
        neighbour = torch.cat([clips[:, 1:], clips[:, :1]], dim=1).reshape(out.shape)
        out = out + 0.5 * gate * neighbour
        return torch.tanh(out + per_sample(time) / 1000 + scalars + per_sample(text))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM-Solver
@pytest.mark.parametrize("solver", ["ddpm", "dpmsolver++"])
@pytest.mark.parametrize("stage", ["first_frame", "keyframes", "interpolation"])
def test_batch_layout_is_exact(tiny, stage, solver):
    _, _, texts, latents = tiny
    contract = (ClipContract(TINY.keyframe_unet.context_dim, False), ClipContract(TINY.keyframe_unet.context_dim, True))
    stand_in = (*contract, texts, latents)
    update = {"num_steps": 10, "solver": solver}
    batch = _run_stage(stage, stand_in, [0, 1, 2], SEEDS, sampler_update=update)
    for i in range(3):
        assert torch.equal(_run_stage(stage, stand_in, [i], [SEEDS[i]], sampler_update=update)[0], batch[i]), (stage, i)
    assert max_diff(batch[0], batch[2]) > 1e-2  # the requests differ: the equalities above are not trivial


def test_padded_contexts(tiny):
    """Mixed lengths: one batch, contexts zero-padded, `context_lengths` = each request's own length;
    equal lengths: called exactly as the official loop (no `context_lengths`)."""
    _, _, texts, latents = tiny
    recorder = Recorder(ClipContract(TINY.keyframe_unet.context_dim, False))
    noise = GeneratorNoise.from_seeds(SEEDS)
    sample_keyframes(recorder, texts, latents[:, 0], noise, num_frames=3, sampler=KEYFRAME_SAMPLER.model_copy(update=FAST))
    (x, _, context, mask), kwargs, _ = recorder.calls[0]
    assert x.shape[0] == context.shape[0] == 3 * 3 * 3 and context.shape[1] == 7
    assert kwargs["context_lengths"].tolist() == [5] * 9 + [7] * 9 + [5] * 9
    assert not mask[:9, 5:].any() and not context[:9, 5:].any()
    recorder.calls.clear()
    sample_keyframes(recorder, [texts[0], texts[2]], latents[:2, 0], GeneratorNoise.from_seeds(SEEDS[:2]), num_frames=3,
                     sampler=KEYFRAME_SAMPLER.model_copy(update=FAST))
    assert "context_lengths" not in recorder.calls[0][1]
    # An encoder batch padded to its longest prompt, split back with the prompts' own lengths.
    padded = torch.stack([torch.nn.functional.pad(t.context, (0, 0, 0, 7 - t.length)) for t in texts])
    masks = torch.stack([torch.nn.functional.pad(t.mask, (0, 7 - t.length)) for t in texts])
    for ours, original in zip(TextCondition.from_batch(padded, masks, lengths=[5, 7, 5]), texts):
        assert torch.equal(ours.context, original.context) and torch.equal(ours.mask, original.mask)
