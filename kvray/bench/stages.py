"""`kvray bench stages`: each stage's seconds per video and peak device memory, as a cost profile.

The stages run one after another on the current device, each alone (its networks loaded, warmed up,
timed, then freed), fed by the previous stage's outputs, exactly as the renderer's stage actors run
them. The profile (JSON, `kvray.distributed.planner.CostProfile`) is what `kvray plan`, the renderer
and `kvray bench pipeline --simulate` read. Random weights are fine for timing: the compute is the same.

Per stage: seconds per video (a timed call's wall time over its videos, after `warmup` calls), peak
device memory (CUDA: `torch.cuda.max_memory_allocated` from loading the stage to its last call; the
CUDA context is not included), and the bytes a video carries to the next stage in the renderer (the
packed tensors; nothing after decoding). The decode stage includes encoding the video file, as the
renderer's decode actor does.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import shlex
import sys
import time

from ..config.runtime import NETWORKS
from ..options import add_model_options, add_request_options, model_source, runtime_config, video_request
from ..sizing.estimate import dtype_argument

log = logging.getLogger(__name__)



def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _compile(stage, names: tuple[str, ...]) -> None:
    import torch

    for name in names:
        setattr(stage, name, torch.compile(getattr(stage, name)))


def bench_stages(models, runtime, request, *, batch: int = 1, warmup: int = 1, repeats: int = 2,
                 compile: bool = False, video_format: str = "mp4", progress=None) -> dict:
    """Times the four stages on `runtime`'s device for `batch` copies of `request` (distinct prompts and
    seeds). Returns {"stages": {stage: {...}}, "device": ..., "device_memory_gib": ..., "meta": {...}}."""
    import torch
    from safetensors.torch import save as pack_tensors

    from ..pipeline.device import torch_device
    from ..pipeline.pipeline import Video
    from ..pipeline.stages import Decode, EncodeText, Interpolate, Keyframes

    device = torch_device(runtime)
    say = progress or (lambda message: None)
    requests = [request.model_copy(update={"prompt": f"{request.prompt} #{i}", "seed": (request.seed or 0) + i})
                for i in range(batch)]
    warm = [request.model_copy(update={"prompt": f"{request.prompt} (warm-up {i})", "seed": 10_000 + i})
            for i in range(batch)]
    timer = _StageTimer(device, requests, warm, warmup=warmup, repeats=repeats, compile=compile, say=say)
    results, timed = timer.results, timer.timed

    texts = timed("text", lambda: EncodeText.from_source(models, runtime),
                  lambda w, rs: w([r.prompt for r in rs])[0], ("encoder",))
    results["text"]["output_bytes"] = _mean(len(pack_tensors({"context": t.context.contiguous(), "mask": t.mask.contiguous()}))
                                            for t in texts)
    keyframes = timed("keyframes", lambda: Keyframes.from_source(models, runtime),
                      lambda w, rs: w(rs, texts, [None] * len(rs)), ("unet", "movq"))
    results["keyframes"]["output_bytes"] = _mean(
        len(pack_tensors({"context": t.context.contiguous(), "mask": t.mask.contiguous(), "latents": k.contiguous()}))
        for t, k in zip(texts, keyframes))
    videos = timed("interpolate", lambda: Interpolate.from_source(models, runtime),
                   lambda w, rs: w(rs, texts, keyframes), ("unet",))
    results["interpolate"]["output_bytes"] = _mean(len(pack_tensors({"latents": v.contiguous()})) for v in videos)

    def decode(w, rs):
        return [Video(r, w(v)).encode(video_format) for r, v in zip(rs, videos)]

    timed("decode", lambda: Decode.from_source(models, runtime), decode, ("movq",))
    results["decode"]["output_bytes"] = 0  # the video goes to storage; only its URI travels on

    device_memory = None
    if device.type == "cuda":
        device_memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "stages": results, "device": name, "device_memory_gib": device_memory,
        "meta": {"preset": models.preset, "weights": models.resolved_weights, "width": request.width,
                 "height": request.height, "fps": request.fps, "frames": request.num_frames, "steps": request.steps,
                 "interpolation_steps": request.interpolation_steps, "batch_size": batch, "warmup": warmup,
                 "repeats": repeats, "compile": compile, "torch": torch.__version__,
                 "dtypes": {n: runtime.dtype_name(n, device.type == "cuda") for n in NETWORKS},
                 "host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
    }


class _StageTimer:
    """Builds a stage, warms it up, then times its calls on the same requests; `results[stage]` holds the
    figures per video."""

    def __init__(self, device, requests, warm, *, warmup: int, repeats: int, compile: bool, say):
        self.device, self.requests, self.warm, self.say = device, requests, warm, say
        self.warmup, self.repeats, self.compile = warmup, repeats, compile
        self.results: dict[str, dict] = {}

    def timed(self, stage: str, build, call, networks: tuple[str, ...]):
        """`call(worker, requests)`'s output of the last timed call."""
        device, batch = self.device, len(self.requests)
        _reset_peak(device)
        start = time.perf_counter()
        worker = build()
        if self.compile:
            _compile(worker, networks)
        _sync(device)
        load = time.perf_counter() - start
        self.say(f"{stage}: loaded in {load:.1f} s; {self.warmup} warm-up and {self.repeats} timed call(s) "
                 f"of {batch} video(s)")
        for _ in range(self.warmup):
            call(worker, self.warm)
            _sync(device)
        seconds, out = [], None
        for _ in range(self.repeats):
            start = time.perf_counter()
            out = call(worker, self.requests)
            _sync(device)
            seconds.append(time.perf_counter() - start)
        self.results[stage] = {"seconds": min(seconds) / batch, "seconds_all": [s / batch for s in seconds],
                               "peak_memory_gib": _peak_gib(device), "load_seconds": load, "batch_size": batch}
        del worker
        _reset_peak(device)
        return out


def _mean(values) -> int:
    values = list(values)
    return round(sum(values) / len(values)) if values else 0


def to_profile(result: dict, command: str | None = None):
    """The benchmark's result as a planner `CostProfile`."""
    from ..distributed.planner import CostProfile, StageCost

    stages = {s: StageCost(seconds=r["seconds"], peak_memory_gib=r["peak_memory_gib"] or None,
                           output_bytes=r["output_bytes"], batch_size=r["batch_size"])
              for s, r in result["stages"].items()}
    meta = dict(result["meta"])
    meta["seconds_all"] = {s: r["seconds_all"] for s, r in result["stages"].items()}
    meta["load_seconds"] = {s: r["load_seconds"] for s, r in result["stages"].items()}
    if command:
        meta["command"] = command
    return CostProfile(stages=stages, device=result["device"], device_memory_gib=result["device_memory_gib"], meta=meta)


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_stages_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Registers `kvray bench stages` on `kvray bench`'s subparsers."""
    p = bench_subparsers.add_parser(
        "stages", help="seconds per video and peak memory of each stage: a cost profile for the planner",
        description="Times each stage alone on the current device (after warm-up) at the given size, as the "
                    "renderer's stage actors run them, and writes the cost profile (JSON) that `kvray plan`, "
                    "`kvray render --costs` and `kvray bench pipeline --simulate --costs` read.")
    p.add_argument("--out", help="write the profile here (JSON); default: print it only")
    add_model_options(p, weights="random")  # random weights: the compute is the same as with real ones
    p.add_argument("--dtype", type=dtype_argument, default={}, metavar="NETWORK=DTYPE,...",
                   help=f"per-network dtype ({', '.join(NETWORKS)}): float32, float16, bfloat16, or int8 for the text "
                        "encoder (weight-only, torchao); default auto: the official dtypes on a GPU (U-Nets fp16, "
                        "text encoder and MoVQs fp32), fp32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage's networks (warm-up compiles)")
    p.add_argument("--prompt", default="a red car drifting on a mountain road")
    add_request_options(p)
    p.add_argument("--batch", type=int, default=1, help="videos per call (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls; the fastest counts (default 2)")
    p.set_defaults(run=run_stages_command)
    return p


def run_stages_command(args) -> int:
    from pydantic import ValidationError

    from ..config.validation import validation_message

    try:
        request = video_request(args, args.prompt)
        if request.seed is None:  # timings of one fixed draw
            request = request.model_copy(update={"seed": 0})
        models = model_source(args)
        runtime = runtime_config(args, **{f"{n}_dtype": d for n, d in args.dtype.items()})
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = bench_stages(models, runtime, request, batch=args.batch, warmup=args.warmup, repeats=args.repeats,
                          compile=args.compile, progress=lambda m: print(m, file=sys.stderr, flush=True))
    profile = to_profile(result, command="kvray " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None)
    print(f"device {profile.device}; preset {args.preset}, {request.width}x{request.height}, fps {request.fps} "
          f"({request.num_frames} frames), batch {args.batch}, dtypes {result['meta']['dtypes']}")
    print(f"  {'stage':<12}{'s/video':>10}{'peak GiB':>10}{'out bytes':>12}{'load s':>8}")
    for stage, cost in profile.stages.items():
        r = result["stages"][stage]
        peak = f"{cost.peak_memory_gib:.2f}" if cost.peak_memory_gib else "n/a"
        print(f"  {stage:<12}{cost.seconds:>10.4g}{peak:>10}{cost.output_bytes:>12}{r['load_seconds']:>8.1f}")
    print(f"total {profile.total_seconds:.4g} s/video on one device; inline: {profile.inline()}")
    if args.out:
        from ..io.atomic import write_atomic
        from ..io.opening import open_fs

        fs, path = open_fs(args.out)
        write_atomic(fs, path, profile.to_json().encode())
        print(f"wrote {args.out}")
    return 0
