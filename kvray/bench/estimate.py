"""`kvray bench estimate`: every stage at full size without a GPU (`kvray.sizing.estimate`), printed as a
table per stage or for the matrix of requests users ask for; `--out` writes the cost profile."""

from __future__ import annotations

import argparse
import sys
import time

from ..config.gpus import get_gpu
from ..sizing.estimate import (
    GIB,
    MODES,
    MOVIE_SCENES,
    PRECISIONS,
    STAGES,
    Case,
    add_profile_options,
    dtype_setting,
    estimate_matrix,
    estimate_stages,
    estimated_profile,
    matrix,
    planning_request,
    request_batch,
    resolved_dtypes,
)


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes, e.g. 1,2,4")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(filter(None, text.split(",")))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: modes are {', '.join(MODES)}")
    return modes




def add_estimate_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "estimate", help="every stage at full size without a GPU: FLOPs, peak memory, bytes out, seconds on a named GPU",
        description="Runs the four stages' own code at the preset's full size under torch's fake tensors (no memory, "
                    "no compute) and prints, per stage, the FLOPs per video at the real step counts, the peak device "
                    "memory (weights + activations), the bytes handed on, and seconds on a named GPU at a stated "
                    "share of its peak. --out writes the cost profile `kvray plan --costs` and `kvray render --costs` "
                    "read. --matrix runs every mode, fps and size users ask for.")
    add_profile_options(p)
    p.add_argument("--mode", default="text2video", choices=list(MODES),
                   help=f"movie: {MOVIE_SCENES} scenes (default text2video)")
    p.add_argument("--batch", type=int, default=1, help="videos per stage call (default 1)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="every network's dtype at once (--dtype overrides)")
    p.add_argument("--steps", type=int, help="first-frame and keyframe steps (default the official 50)")
    p.add_argument("--interpolation-steps", type=int, help="interpolation steps (default the official 10)")
    p.add_argument("--out", help="write the cost profile here (JSON)")
    p.add_argument("--matrix", action="store_true", help="every mode x fps x size (--batches) instead of one request")
    p.add_argument("--batches", type=_batches, default=(1,), help="--matrix: batch sizes, e.g. 1,2,4 (default 1)")
    p.add_argument("--modes", type=_modes, default=MODES, help=f"--matrix: modes (default {','.join(MODES)})")
    p.add_argument("--validate", action="store_true",
                   help="instead: the tiny pipeline on this CPU, its measured peak memory against its dry run")
    p.set_defaults(run=run_estimate_command)
    return p


def _dtypes_of(args) -> dict[str, str]:
    return {**(PRECISIONS[args.precision] if args.precision else {}), **args.dtype}


def run_estimate_command(args) -> int:
    from pydantic import ValidationError

    from ..config.validation import validation_message

    try:
        spec = get_gpu(args.gpu)
        if args.validate:
            return _print_validation()
        if args.matrix:
            return _print_matrix(args, spec)
        width, height = args.size or (None, None)
        request = planning_request(args.preset, width=width, height=height, fps=args.fps,
                                   mode="text2video" if args.mode == "movie" else args.mode, steps=args.steps,
                                   interpolation_steps=args.interpolation_steps)
        if args.mode == "movie":
            request = Case("movie", request.width, request.height, args.fps, 1).request(args.steps, args.interpolation_steps)
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtypes = resolved_dtypes(_dtypes_of(args))
    start = time.perf_counter()
    estimates = estimate_stages(args.preset, request_batch(request, args.batch, args.prompt_tokens), dtypes)
    label = Case(args.mode, request.width, request.height, request.fps, args.batch).label
    print(f"estimate (dry run, fake tensors) for {args.preset} {label}, "
          f"{request.steps or 50}/{request.interpolation_steps or 10} steps, prompts of {args.prompt_tokens} tokens; "
          f"dtypes {dtype_setting(dtypes)}; seconds on {spec.name} at {args.utilisation:g} of its peak")
    print(f"  {'stage':<12}{'TFLOP/video':>12}{'weights GiB':>13}{'peak GiB':>10}{'out bytes':>12}{'s/video':>9}")
    total_flops = total_seconds = 0.0
    for stage, e in estimates.items():
        seconds = spec.seconds({k: v / e.videos for k, v in e.flops.items()}, args.utilisation)
        total_flops, total_seconds = total_flops + e.flops_per_video, total_seconds + seconds
        print(f"  {stage:<12}{e.flops_per_video / 1e12:>12.1f}{e.weights_bytes / GIB:>13.2f}{e.peak_gib:>10.2f}"
              f"{e.output_bytes:>12}{seconds:>9.3g}")
        for (network, entry, shape), calls in e.calls.items():
            print(f"      {network}.{entry} {tuple(shape)}: {calls.count} call(s), "
                  f"{calls.flops / e.videos / 1e12:.1f} TFLOP/video")
    print(f"  {'total':<12}{total_flops / 1e12:>12.1f}{'':>35}{total_seconds:>9.3g}")
    print(f"dry run: {time.perf_counter() - start:.1f} s")
    if args.out:
        from ..io.atomic import write_atomic
        from ..io.opening import open_fs

        profile = estimated_profile(args.preset, request, dtypes=dtypes, gpu=args.gpu, utilisation=args.utilisation,
                                    batch_sizes=dict.fromkeys(STAGES, args.batch),
                                    prompt_tokens=args.prompt_tokens)
        fs, path = open_fs(args.out)
        write_atomic(fs, path, profile.to_json().encode())
        print(f"wrote {args.out}: {profile.inline()}")
    return 0


def _print_matrix(args, spec) -> int:
    cases = matrix(args.batches, args.modes)
    dtypes = resolved_dtypes(_dtypes_of(args))
    start = time.perf_counter()
    results = estimate_matrix(args.preset, cases, dtypes, steps=args.steps, interpolation_steps=args.interpolation_steps,
                              prompt_tokens=args.prompt_tokens)
    print(f"estimate (dry run, fake tensors) for {args.preset}, dtypes {dtype_setting(dtypes)}, prompts of "
          f"{args.prompt_tokens} tokens; peak GiB per stage actor, TFLOP and seconds per video on {spec.name} at "
          f"{args.utilisation:g} of its peak")
    stages = list(STAGES)
    print(f"  {'case':<38}" + "".join(f"{s + ' GiB':>16}" for s in stages) + f"{'TFLOP':>9}{'s/video':>9}")
    for case, result in zip(cases, results):
        flops = sum(e.flops_per_video for e in result.values())
        seconds = sum(spec.seconds({k: v / e.videos for k, v in e.flops.items()}, args.utilisation) for e in result.values())
        print(f"  {case.label:<38}" + "".join(f"{result[s].peak_gib:>16.2f}" for s in stages)
              + f"{flops / 1e12:>9.0f}{seconds:>9.1f}")
    worst = {s: max(r[s].peak_gib for r in results) for s in stages}
    print("  largest peak per stage: " + ", ".join(f"{s} {g:.1f} GiB" for s, g in worst.items()))
    print(f"dry run of {len(cases)} cases: {time.perf_counter() - start:.1f} s")
    return 0


def _print_validation() -> int:
    from ..config import RuntimeConfig
    from ..config.models import ModelSource
    from ..pipeline import VideoPipeline, VideoRequest
    from .memcheck import estimate_cpu, measure_cpu

    request = VideoRequest(prompt="a red car drifting on a mountain road", fps="medium", seed=0, steps=2,
                           interpolation_steps=1, width=128, height=128)

    def run():
        VideoPipeline(ModelSource(preset="tiny"), RuntimeConfig(device="cpu")).generate([request])

    measured, estimated = measure_cpu(run), estimate_cpu(run)
    mib = 2**20
    print(f"tiny pipeline, one {request.width}x{request.height} fps {request.fps} text2video, all four stages resident:")
    print(f"  measured on this CPU: {measured.boundary_peak / mib:.2f} MiB held between ops "
          f"({measured.peak / mib:.2f} MiB with the CPU kernels' own buffers)")
    print(f"  dry run: {estimated / mib:.2f} MiB, {estimated / measured.boundary_peak - 1:+.1%}")
    return 0 if abs(estimated / measured.boundary_peak - 1) <= 0.1 else 1
