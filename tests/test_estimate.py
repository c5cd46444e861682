"""Full size without a GPU: the kv11 stages under fake tensors, their FLOPs and memory, and what the planner
and the GPU check make of them."""

from __future__ import annotations

import re

import pytest
import torch

from kvray.config import KV11, TINY, RuntimeConfig
from kvray.config.models import ModelSource
from kvray.pipeline import VideoPipeline, VideoRequest
from kvray.sizing import estimate as E
from kvray.sizing.meter import DryRun

TFLOP = 1e12
LATENT = 8  # pixels per latent position
# The dry run's matrix in the suite: every mode, fps and size users ask for, and a batch of two, chosen so
# that few network calls have shapes of their own (a stage traces each distinct call once). Step counts do
# not change shapes: the first two cases take the official 50 / 10 (for the FLOP counts), the others 2 (and
# 1 interpolation step). Prompts of 20 tokens, as a short prompt is.
SUITE = [
    E.Case("text2video", 512, 512, "medium", 1),
    E.Case("text2video", 512, 512, "low", 2),
    E.Case("image2video", 640, 384, "high", 1),
    E.Case("text2video", 384, 640, "low", 1),
    E.Case("movie", 512, 512, "medium", 1),
    E.Case("animation", 640, 640, "low", 1),
    E.Case("text2video", 2048, 2048, "low", 1),
    E.Case("image2video", 2048, 2048, "medium", 1),
]
OFFICIAL_STEPS = 2  # cases 0 and 1
PROMPT_TOKENS = 20


def _batches():
    out = []
    for index, case in enumerate(SUITE):
        steps = (None, None) if index < OFFICIAL_STEPS else (5 if case.mode == "animation" else 2, 1)
        out.append(E.request_batch(case.request(*steps), case.batch, PROMPT_TOKENS))
    return out


@pytest.fixture(scope="module")
def suite():
    return E.estimate_cases("kv11", _batches())


def _frames(case: E.Case) -> int:
    per_scene = {"low": 12, "medium": 45, "high": 177}[case.fps]
    return 96 if case.mode == "animation" else per_scene * (E.MOVIE_SCENES if case.mode == "movie" else 1)


@pytest.mark.slow
def test_every_mode_fps_and_size_runs_through_the_four_stages_at_full_size(suite):
    for case, result in zip(SUITE, suite):
        assert list(result) == ["text", "keyframes", "interpolate", "decode"], case
        latent = 4 * (case.height // LATENT) * (case.width // LATENT) * 4  # one float32 latent frame
        text = result["text"].output_bytes
        scenes = E.MOVIE_SCENES if case.mode == "movie" else 1
        keyframes = 25 if case.mode == "animation" else 12 * scenes
        assert result["keyframes"].output_bytes == text + keyframes * latent, case
        assert result["interpolate"].output_bytes == _frames(case) * latent, case
        for stage, e in result.items():
            assert e.weights_bytes > 0 and e.peak_bytes >= e.weights_bytes, (case, stage)
        assert result["decode"].flops_per_video > 0 and result["keyframes"].flops_per_video > 0
    assert suite[3]["interpolate"].flops_per_video == 0  # fps low: no interpolation pass
    # Memory grows with the size; batch-invariant calls (the default) hold one request each, so two videos
    # per stage call peak where one does; FLOPs per video do not depend on the batch.
    assert suite[6]["decode"].peak_bytes > 5 * suite[3]["decode"].peak_bytes
    assert suite[1]["keyframes"].peak_bytes == pytest.approx(suite[0]["keyframes"].peak_bytes, rel=1e-3)
    assert suite[1]["keyframes"].flops_per_video == pytest.approx(suite[0]["keyframes"].flops_per_video, rel=1e-9)


@pytest.mark.slow
def test_flops_of_one_512_medium_text2video_match_an_independent_count(suite):
    """50 steps x 2 branches at 1024x1024 pixels for the first frame, 50 x 3 x 12 frames for the keyframes,
    10 steps of 22 groups for one interpolation pass, 9 chunks of 5 frames for the decoder, and the text
    encoder's 2 x 8.6e9 weights x 128 tokens = 2.2 TFLOP."""
    result = suite[0]
    calls = {(network, shape): c for e in result.values() for (network, _, shape), c in e.calls.items()}
    first_frame = calls[("KeyframeUNet", (2, 9, 128, 128))]
    keyframes = calls[("KeyframeUNet", (36, 9, 64, 64))]
    interpolation = calls[("InterpolationUNet", (22, 20, 64, 64))]
    decode = calls[("MoVQ", (5, 4, 64, 64))]
    assert (first_frame.count, keyframes.count, interpolation.count, decode.count) == (50, 50, 10, 9)
    for got, expected in [(first_frame.flops, 316), (keyframes.flops, 1762), (interpolation.flops, 258),
                          (decode.flops, 1021), (result["text"].flops_per_video, 2.2)]:
        assert got / TFLOP == pytest.approx(expected, rel=0.1)
    total = sum(e.flops_per_video for e in result.values()) / TFLOP
    assert total == pytest.approx(3360 + 38, rel=0.1)  # + the image MoVQ: decode 1024x1024, encode 512x512


def test_a_wrong_shape_at_full_size_fails_the_dry_run(monkeypatch):
    from kvray.config import presets

    # A keyframe U-Net that predicts 8 channels for 4-channel latents: the first sampling step cannot combine them.
    broken = KV11.model_copy(update={"name": "kv11-broken",
                                     "keyframe_unet": KV11.keyframe_unet.model_copy(update={"out_channels": 8})})
    monkeypatch.setitem(presets.PRESETS, "kv11-broken", broken)
    request = VideoRequest(prompt="x", seed=0, steps=1)
    with pytest.raises(RuntimeError, match="broadcast a dimension of length 8"):
        E.estimate_stages("kv11-broken", [request], stages=("keyframes",))


@pytest.mark.slow
def test_replayed_network_calls_cost_what_traced_ones_cost():
    # Repeats: sampling steps of both U-Nets, decoder chunks (a movie's later scenes repeat the same calls again,
    # at three times the cost of tracing them).
    cases = [E.request_batch(E.Case("text2video", 64, 64, "medium", 1).request(2, 2), 1)]
    replayed, traced = (E.estimate_cases("tiny", cases, replay=replay)[0] for replay in (True, False))
    for stage in replayed:
        fast, slow = replayed[stage], traced[stage]
        assert (fast.flops, fast.peak_bytes) == (slow.flops, slow.peak_bytes), stage
        assert {k: (c.count, c.flops) for k, c in fast.calls.items()} == {k: (c.count, c.flops) for k, c in slow.calls.items()}
    assert all(max(c.count for c in replayed[s].calls.values()) > 1 for s in ("keyframes", "interpolate", "decode"))


def test_the_dry_run_counts_what_flop_counter_mode_counts():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from kvray.weights import random_network

    def call(unet):
        x = torch.zeros(2, 9, 16, 16)
        return unet(x, torch.full((2,), 10.0), torch.zeros(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))

    # FlopCounterMode has no formula for the CPU's fused attention: the math kernel's two products count the same.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(random_network("keyframe_unet", TINY.keyframe_unet))
    with torch.inference_mode(), DryRun() as meter:
        call(random_network("keyframe_unet", TINY.keyframe_unet))
    assert sum(meter.flops.values()) == counter.get_total_flops() > 0


@pytest.mark.slow
def test_the_accountant_matches_the_measured_cpu_peak_of_the_tiny_pipeline():
    from kvray.bench.memcheck import estimate_cpu, measure_cpu

    request = VideoRequest(prompt="a red car drifting on a mountain road", fps="medium", seed=0, steps=1,
                           interpolation_steps=1, width=64, height=64)

    def run():
        VideoPipeline(ModelSource(preset="tiny"), RuntimeConfig(device="cpu")).generate([request])

    measured = measure_cpu(run)
    estimated = estimate_cpu(run)
    assert measured.peak >= measured.boundary_peak > 0
    assert estimated == pytest.approx(measured.boundary_peak, rel=0.1)


@pytest.mark.slow
def test_plans_for_8_gpus_of_24_80_and_141_gib(capsys):
    from kvray.cli import main
    from kvray.distributed import planner as P

    assert main(["plan", "--gpus", "8", "--gpu-memory", "24", "--preset", "kv11"]) == 2
    refusal = capsys.readouterr().err
    assert "one text actor needs 33." in refusal and "still too much" not in refusal
    int8 = re.search(r"text_encoder=int8 \(([0-9.]+) GiB\)", refusal)
    assert int8 and 8 < float(int8.group(1)) < 10  # ~8.7 GB of int8 weights, bfloat16 embeddings and activations
    for memory in (80, 141):
        assert main(["plan", "--gpus", "8", "--gpu-memory", str(memory), "--preset", "kv11"]) == 0
        assert "profile: estimated for kv11 512x512 fps medium" in capsys.readouterr().out
        profile = E.estimated_profile("kv11", E.planning_request("kv11"), gpu_memory_gib=memory)
        chosen = P.plan(profile, 8, memory)
        for gpu in chosen.layout:  # every mix of actors on a GPU fits it, by the estimate
            assert sum(profile.memory(s) + P.DEFAULT_CONTEXT_GIB for s in gpu) <= memory
    # In bf16 the text encoder fits a 24 GiB GPU.
    assert main(["plan", "--gpus", "8", "--gpu-memory", "24", "--preset", "kv11", "--dtype", "text_encoder=bfloat16"]) == 0


def test_the_gpu_check_refuses_without_cuda_and_its_render_fits_one_80_gib_gpu(capsys, tmp_path):
    from kvray.bench import gpu
    from kvray.cli import main
    from kvray.distributed.planner import DEFAULT_CONTEXT_GIB

    if not torch.cuda.is_available():
        assert main(["bench", "gpu"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "needs a CUDA GPU" in err
    steps = gpu.check_plan()
    assert [s.name for s in steps] == ["official", "bf16", "render"]
    assert steps[0].dtypes["keyframe_unet"] == "float16" and set(steps[1].dtypes.values()) == {"bfloat16"}
    job = gpu.render_job(str(tmp_path / "out"), str(tmp_path / "m.parquet"))
    assert all(job.deployment.stage(s).gpus == gpu.RENDER_GPU_SHARE for s in E.STAGE_NETWORKS)
    peaks = E.cached_estimate("kv11", gpu.check_request(), steps[-1].dtypes)
    assert sum(p.peak_gib + DEFAULT_CONTEXT_GIB for p in peaks.values()) <= 80


def test_int8_and_bf16_text_encoders_are_offered_and_stay_close_to_fp32(golden_dir):
    from kvray.bench.precision import golden_differences, tiny_differences
    from kvray.config.runtime import parse_dtype_setting
    from kvray.pipeline.stages import EncodeText

    assert parse_dtype_setting("text_encoder=int8") == {"text_encoder": "int8"}
    with pytest.raises(ValueError, match="keyframe_unet: int8 is offered for text_encoder only"):
        parse_dtype_setting("keyframe_unet=int8")
    with pytest.raises(ValueError, match="keyframe_unet: int8 is offered"):
        RuntimeConfig(keyframe_unet_dtype="int8")
    prompts = ["a red car", "waves on a beach at dawn"]
    full, _ = EncodeText.from_source(ModelSource(preset="tiny"), RuntimeConfig(device="cpu"))(prompts)
    int8, _ = EncodeText.from_source(ModelSource(preset="tiny"), RuntimeConfig(device="cpu", text_encoder_dtype="int8"))(prompts)
    for a, b in zip(full, int8):
        assert b.context.dtype == torch.float32 and b.context.shape == a.context.shape
        assert (b.context - a.context).norm() / a.context.norm() < 0.05
    limits = {"float32": 1e-6, "float16": 0.005, "bfloat16": 0.02, "int8": 0.03}
    for row in tiny_differences() + golden_differences(golden_dir):
        assert row.relative_rms <= limits[row.dtype] and row.min_cosine > 0.999, row
