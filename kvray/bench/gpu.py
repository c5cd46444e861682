"""`kvray bench gpu`: the one check a machine with a GPU runs, within about 8 minutes.

1. Each kv11 stage with random weights at 512x512, fps medium (one text2video), alone on the GPU as
   a renderer actor runs it, in the official precision (U-Nets fp16, text encoder and MoVQs fp32)
   and in bf16 (every network), and with `--compile` also compiled: seconds per video after one
   warm-up call, peak memory (`torch.cuda.max_memory_allocated`), and the achieved TFLOP/s against
   the dry run's FLOP count (`kvray bench estimate`), with the dry run's memory beside the measured.
2. Two videos through the Ray renderer on this GPU (the four stage actors share it), checked: both
   rows ok, two mp4 files of 45 frames of 512x512.

Without CUDA it says so in one line and exits 2: it never prints a figure it did not measure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config.stages import STAGES

PRECISIONS = ("official", "bf16")
RENDER_VIDEOS = 2
# The render's actors share the one GPU; the text encoder in bf16 leaves room for the three others on an
# 80 GiB GPU (official fp32 alone is 33 GiB).
RENDER_DTYPES = {"text_encoder": "bfloat16"}
RENDER_GPU_SHARE = 0.25


@dataclass(frozen=True)
class Step:
    """One part of the check: a precision's stage timings, or the render."""

    name: str
    dtypes: dict[str, str]
    compile: bool = False


def check_plan(compile: bool = False) -> list[Step]:
    """What the check runs, in order."""
    from ..sizing.estimate import PRECISIONS as NAMED
    from ..sizing.estimate import resolved_dtypes

    steps = [Step(p, resolved_dtypes(NAMED[p])) for p in PRECISIONS]
    if compile:
        steps.append(Step("official, compiled", resolved_dtypes(NAMED["official"]), compile=True))
    return steps + [Step("render", resolved_dtypes(RENDER_DTYPES))]


def check_request():
    from ..sizing.estimate import planning_request

    return planning_request("kv11", fps="medium")


def render_job(out: str, manifest: str):
    """The render of `RENDER_VIDEOS` videos: every stage one actor on a quarter of the one GPU."""
    from ..config.job import RenderJob

    request = check_request()
    share = {"actors": 1, "gpus": RENDER_GPU_SHARE, "batch_size": 1}
    return RenderJob(
        manifest=manifest, out=out, models={"preset": "kv11", "weights": "random"},
        runtime={"device": "auto", **{f"{n}_dtype": d for n, d in RENDER_DTYPES.items()}},
        defaults={"fps": request.fps, "width": request.width, "height": request.height},
        deployment=dict.fromkeys(STAGES, share), ray={"num_gpus": 1},
    )


def _gpu_name_and_memory():
    import torch

    properties = torch.cuda.get_device_properties(0)
    return properties.name, properties.total_memory / 2**30


def _known_spec(device_name: str):
    """The named GPU whose datasheet figures apply, if the device is one of them."""
    from ..config.gpus import GPUS

    lowered = device_name.lower().replace(" ", "")
    for key in sorted(GPUS, key=len, reverse=True):
        if key.split("-")[0].replace("rtx", "") in lowered:
            return GPUS[key]
    return None


def run_check(compile: bool = False, say=print) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: kvray bench gpu needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
            "nothing was measured", file=sys.stderr)
        return 2
    from ..config import RuntimeConfig
    from ..config.models import ModelSource
    from ..sizing.estimate import cached_estimate
    from .stages import bench_stages

    start = time.perf_counter()
    name, memory = _gpu_name_and_memory()
    spec = _known_spec(name)
    request = check_request()
    say(f"GPU: {name}, {memory:.1f} GiB; kv11 random weights, one text2video {request.width}x{request.height} "
        f"fps {request.fps} ({request.num_frames} frames), 50/10 steps")
    models = ModelSource(preset="kv11", weights="random")
    for step in check_plan(compile)[:-1]:
        estimate = cached_estimate("kv11", request, step.dtypes, dict.fromkeys(STAGES, 1))
        result = bench_stages(models, RuntimeConfig(device="cuda", **{f"{n}_dtype": d for n, d in step.dtypes.items()}),
                              request, warmup=1, repeats=1, compile=step.compile,
                              progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        say(f"{step.name}:")
        say(f"  {'stage':<12}{'s/video':>9}{'TFLOP/s':>9}{'of peak':>9}{'peak GiB':>10}{'dry run GiB':>13}")
        for stage in STAGES:
            measured, e = result["stages"][stage], estimate[stage]
            achieved = e.flops_per_video / measured["seconds"] / 1e12
            # The share of the datasheet peak reached: what `--utilisation` should be on this GPU.
            ideal = spec.seconds({k: v / e.videos for k, v in e.flops.items()}, 1.0) if spec else 0.0
            share = f"{ideal / measured['seconds']:.0%}" if ideal else "n/a"
            say(f"  {stage:<12}{measured['seconds']:>9.3f}{achieved:>9.1f}{share:>9}"
                f"{measured['peak_memory_gib']:>10.2f}{e.peak_gib:>13.2f}")
        total = sum(result["stages"][s]["seconds"] for s in STAGES)
        say(f"  total {total:.2f} s per video on one GPU ({time.perf_counter() - start:.0f} s into the check)")
    return _check_render(say, start)


def _check_render(say, start: float) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..distributed.render import render
    from ..io.video import read_video

    request = check_request()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"id": [f"check-{i}" for i in range(RENDER_VIDEOS)],
                                 "prompt": ["a red car drifting on a mountain road", "waves on a beach at dawn"]}),
                       manifest)
        summary = render(render_job(str(Path(tmp) / "out"), str(manifest)))
        videos = sorted((Path(tmp) / "out" / "videos").glob("*.mp4"))
        shapes = [read_video(v)[0].shape for v in videos]
    expected = (request.num_frames, request.height, request.width, 3)
    ok = summary.ok == RENDER_VIDEOS and len(videos) == RENDER_VIDEOS and all(tuple(s) == expected for s in shapes)
    say(f"render: {summary.ok} of {RENDER_VIDEOS} rows ok, videos {[tuple(s) for s in shapes]} (want {expected}); "
        f"{summary.videos_per_second:.3f} videos/s after {summary.startup_seconds:.0f} s of start-up")
    say(f"check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


def add_gpu_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "gpu", help="the one-GPU check: each kv11 stage in the official precision and bf16, then a 2-video render",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="also time the official precision with torch.compile")
    p.set_defaults(run=lambda args: run_check(args.compile))
    return p
