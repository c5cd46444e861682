"""`kvray bench pipeline`: how close the renderer's Ray Data plan comes to the throughput bound.

`--simulate`: the renderer's own stage pools (`kvray.distributed.render.model_stages`: operators,
pools, batch sizes, logical-GPU requests) with stand-in stage actors that sleep the profiled cost
(kvray.distributed.simulate), on a local Ray with N logical GPUs. Each throughput lever can be turned
off to measure what it is worth (`--lever NAME=off`, or `--each-lever`).

Without `--simulate`: the real Ray renderer against an in-process loop over the same requests (tiny
preset on the CPU by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, replace

from ..config.stages import STAGES

log = logging.getLogger(__name__)

SIMULATED_VIDEOS = 400
RENDERED_VIDEOS = 8  # tiny videos on the CPU, through the renderer and in-process


@dataclass(frozen=True)
class Levers:
    """What keeps the bottleneck busy. All on by default; `off()` turns some off."""

    # Pools sized by the planner; off: equal pools (a quarter of the GPUs each, whole GPUs).
    planner: bool = True
    # Light stages share GPUs (fractions of a GPU); off: every actor holds whole GPUs.
    shared_gpus: bool = True
    # Batch sizes per stage from the planner (few enough calls that Ray's per-call cost stays small);
    # off: the job defaults (text 8, the others 1).
    batch_sizes: bool = True
    # Pools at full size from the start (min = max = initial size); off: autoscale up from one actor.
    full_pools: bool = True
    # Two calls queued per actor where work waits in front of a pool or calls are short (the first pool,
    # pools fed much faster than they work, pools of short calls: `kvray.distributed.pools.queued_calls`),
    # so that the next batch is fetched while the current one computes; off: one call per actor everywhere.
    prefetch: bool = True
    # Rows with a payload travel one per block (`kvray.distributed.pools.ROW_BLOCK_BYTES`), so that
    # every actor of a pool gets work; off: Ray Data's default block size, so one actor of the next
    # pool gets a whole batch's output while the others wait.
    small_blocks: bool = True
    # The text encoder runs once per distinct prompt of a batch; off: once per video.
    text_once_per_prompt: bool = True
    # Decoded frames go to storage from the decode actor; off: they travel on in the rows.
    frames_stay_out: bool = True

    def off(self, *names: str) -> Levers:
        unknown = [n for n in names if n not in asdict(self)]
        if unknown:
            raise ValueError(f"unknown lever(s) {', '.join(unknown)}; levers: {', '.join(asdict(self))}")
        return replace(self, **{n: False for n in names})


LEVERS = tuple(asdict(Levers()))


def pool_options(levers: Levers, plan, deployment, time_scale: float = 1.0):
    """The renderer's `PoolOptions` for `plan` and its `deployment` with these levers."""
    from ..distributed.pools import PoolOptions, queued_calls

    calls = queued_calls(plan, deployment, time_scale) if levers.prefetch else {s: 1 for s in STAGES}
    return PoolOptions(full_pools=levers.full_pools, tasks_per_actor=calls, small_blocks=levers.small_blocks)


def frames_bytes(width: int = 512, height: int = 512, frames: int = 12) -> int:
    return frames * height * width * 3


def auto_time_scale(plan, videos: int, cores: int | None = None, *, videos_per_core: float = 2.5,
                    call_seconds: float = 20.0, max_seconds: float = 300.0) -> float:
    """Wall seconds per profiled second for a simulated run of `videos` videos with `plan` (a planner
    Plan), from three rules:

    - a video on an actor of the bottleneck pool takes `call_seconds` of wall time. From one call's
      end to the next call's start Ray takes about 0.2 s on 2 busy cores; real models' calls last
      seconds to minutes, so that time must be a small share of a call here too;
    - but the run sleeps for at most about `max_seconds`;
    - and whatever those say, at most `videos_per_core` videos per second per CPU core flow through
      Ray: each costs it tens of milliseconds of CPU per stage, which a real cluster spreads over many
      cores and this machine must fit in a few, beside one idle-polling process per actor."""
    import os

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    by_cpu = plan.bound / (videos_per_core * cores)
    by_call = call_seconds / plan.stages[plan.bottleneck].seconds_per_video
    by_length = max_seconds * plan.videos_per_second / videos
    return float(f"{max(by_cpu, min(by_call, by_length)):.3g}")


def simulated_pipeline(costs, gpus: int, videos: int, *, levers: Levers = Levers(),
                       time_scale: float | str = "auto", tolerance: float | None = None, slack: float | None = None,
                       max_share: int | None = None,
                       max_actors: int | None = None, prompts: int | None = None,
                       payload_bytes: dict[str, int] | None = None, batch_sizes: dict[str, int] | None = None,
                       calls_per_second: float | None = None, label: str = ""):
    """One simulated run with the given levers; returns a `SimulationResult`."""
    from ..distributed import planner
    from .simulation import default_payload_bytes, simulate

    costs = planner.parse_costs(costs)
    if not levers.planner:
        chosen = planner.equal_plan(costs, gpus)
    else:
        options = {k: v for k, v in (("tolerance", tolerance), ("slack", slack), ("max_share", max_share),
                                     ("max_actors", max_actors)) if v is not None}
        if not levers.shared_gpus:
            options["max_share"] = 1
        chosen = planner.plan(costs, gpus, **options)
    if time_scale == "auto":
        time_scale = auto_time_scale(chosen, videos)
    if levers.batch_sizes:
        # Calls per profiled second: the harness's wall-clock limit times the time scale.
        rate = (calls_per_second or planner.DEFAULT_CALLS_PER_SECOND) * time_scale
        sizes = {**planner.suggest_batch_sizes(chosen, costs, videos=videos, calls_per_second=rate),
                 **(batch_sizes or {})}
    else:
        sizes = None  # the job's defaults
    deployment = planner.to_deployment(chosen, batch_sizes=sizes)
    if payload_bytes is None:
        measured = {s: c.output_bytes for s, c in costs.stages.items() if c.output_bytes is not None}
        payload_bytes = measured if len(measured) == len(STAGES) else default_payload_bytes()
    if not levers.frames_stay_out:
        payload_bytes = {**payload_bytes, "decode": frames_bytes()}
    return simulate(costs, gpus, videos, deployment=deployment, time_scale=time_scale, payload_bytes=payload_bytes,
                    prompts=prompts, dedupe_prompts=levers.text_once_per_prompt,
                    pool_options=pool_options(levers, chosen, deployment, time_scale),
                    label=label or ("equal pools" if not levers.planner else "planned pools"))


# ---------------------------------------------------------------------------------------------------------
# The real renderer against the in-process loop


def ray_vs_local(videos: int = 8, preset: str = "tiny", *, width: int | None = None, height: int | None = None,
                 fps: str = "low", steps: int | None = None, interpolation_steps: int | None = None,
                 num_cpus: int | None = None, deployment: dict | None = None, warmup: int = 1) -> dict:
    """Videos/s of `kvray.distributed.render.render` (a local Ray, one actor pool per stage, CPU) and of
    an in-process loop of `VideoPipeline.generate` over the same requests (one at a time, after `warmup`
    untimed ones). Same seeds, sizes and steps."""
    import tempfile
    import time
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..config import RuntimeConfig, get_preset
    from ..config.job import RenderJob
    from ..config.models import ModelSource
    from ..distributed.render import render
    from ..pipeline import VideoPipeline, VideoRequest

    p = get_preset(preset)
    width, height = width or p.default_width, height or p.default_height
    prompts = [f"a red car drifting on a mountain road, take {i}" for i in range(videos)]
    common = {"width": width, "height": height, "fps": fps, "steps": steps, "interpolation_steps": interpolation_steps}
    common = {k: v for k, v in common.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="kvray-bench-") as tmp:
        manifest = Path(tmp) / "prompts.parquet"
        table = {"id": [f"v{i}" for i in range(videos)], "prompt": prompts, "seed": list(range(videos)),
                 **{k: [v] * videos for k, v in common.items()}}
        pq.write_table(pa.table(table), manifest)
        job = RenderJob(manifest=str(manifest), out=str(Path(tmp) / "out"), models=ModelSource(preset=preset),
                        runtime=RuntimeConfig(device="cpu"),
                        ray={"num_cpus": num_cpus, "object_store_memory": 300_000_000},
                        deployment=deployment or {})
        summary = render(job)

    models = ModelSource(preset=preset)
    pipeline = VideoPipeline(models, RuntimeConfig(device="cpu"))
    requests = [VideoRequest(prompt=prompt, seed=i, **common) for i, prompt in enumerate(prompts)]
    for request in requests[:warmup]:
        pipeline.generate([request.model_copy(update={"seed": 10_000 + request.seed})])
    start = time.perf_counter()
    for request in requests:
        pipeline.generate([request])
    local_seconds = time.perf_counter() - start
    return {
        "videos": videos, "preset": preset, "size": f"{width}x{height}", "fps": fps,
        "ray_ok": summary.ok, "ray_seconds": summary.seconds, "ray_startup_seconds": summary.startup_seconds,
        "ray_videos_per_second": summary.videos_per_second, "local_seconds": local_seconds,
        "local_videos_per_second": videos / local_seconds, "ray_busy_seconds": summary.busy_seconds,
        "ray_actors": {s: len(a) for s, a in summary.stages.get("actors", {}).items()},
    }


# ---------------------------------------------------------------------------------------------------------
# Command line


def _lever(text: str) -> str:
    name, _, value = text.partition("=")
    if name not in LEVERS or value not in ("off", ""):
        raise argparse.ArgumentTypeError(f"--lever NAME=off, NAME one of {', '.join(LEVERS)}")
    return name


def _time_scale(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError("--time-scale: a positive number or auto")
    return value


def _batch_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for item in filter(None, text.split(",")):
        stage, _, value = item.partition("=")
        if stage not in STAGES or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--batch-sizes: {item!r} is not STAGE=N with STAGE one of {', '.join(STAGES)}")
        sizes[stage] = int(value)
    return sizes


def add_pipeline_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Registers `kvray bench pipeline` on `kvray bench`'s subparsers."""
    p = bench_subparsers.add_parser(
        "pipeline", help="the renderer's throughput against the bound (simulated stages, or the tiny renderer)",
        description="--simulate: the renderer's Ray Data plan on N logical GPUs with stand-in actors that sleep "
                    "the profiled cost per video (cost / f on a fraction f of a GPU). Prints the measured videos/s "
                    "once the pools are up, the bound N / sum(costs), start-up and whole-run figures, spilled "
                    "bytes, and last `efficiency=E throughput=T bound=B`. Without --simulate: the Ray renderer "
                    "against an in-process loop over the same requests.")
    p.add_argument("--simulate", action="store_true", help="stand-in stages on logical GPUs")
    p.add_argument("--gpus", type=int, default=16, help="logical GPUs (default 16)")
    p.add_argument("--costs", default="text=0.001,keyframes=0.62,interpolate=0.08,decode=0.30",
                   help="cost profile: a JSON file from `kvray bench stages`, or stage=seconds,... (default: %(default)s)")
    p.add_argument("--videos", type=int, help=f"videos (default {SIMULATED_VIDEOS}; {RENDERED_VIDEOS} without --simulate)")
    p.add_argument("--time-scale", type=_time_scale, default="auto",
                   help="wall seconds slept per profiled second; figures stay in profiled seconds (default auto: a "
                        "video takes 20 s on a bottleneck actor, the run sleeps at most about 5 minutes, and at most "
                        "2.5 videos per second per CPU core pass through Ray)")
    p.add_argument("--pools", choices=["planned", "equal", "both"], default="planned",
                   help="planner's pools, naive equal pools, or both one after the other (default planned)")
    p.add_argument("--lever", action="append", type=_lever, default=[], metavar="NAME=off",
                   help=f"turn a lever off (repeatable): {', '.join(LEVERS)}")
    p.add_argument("--each-lever", action="store_true", help="run all levers on, then each one off in turn")
    p.add_argument("--prompts", type=int, help="distinct prompts among the videos (default: all distinct)")
    p.add_argument("--timeline", help="write the run's raw timeline (JSON: completions, actor starts, calls) here")
    p.add_argument("--batch-sizes", type=_batch_sizes, metavar="STAGE=N,...", help="videos per call for some stages")
    p.add_argument("--calls-per-second", type=float, help="most calls per wall second per stage when the "
                   "planner suggests batch sizes (default 8)")
    p.add_argument("--tolerance", type=float, help="planner: throughput given up for fewer actors")
    p.add_argument("--slack", type=float, help="planner: extra capacity of every stage but the bottleneck")
    p.add_argument("--max-share", type=int, help="planner: most actors on one GPU")
    p.add_argument("--max-actors", type=int, help="planner: most actors in all")
    p.add_argument("--preset", default="tiny", help="without --simulate: model preset (default tiny)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, help="without --simulate: denoising steps")
    p.add_argument("--interpolation-steps", type=int)
    p.set_defaults(run=run_pipeline_command)
    return p


def run_pipeline_command(args) -> int:
    from ..distributed.planner import CostError

    if not args.simulate:
        result = ray_vs_local(args.videos or RENDERED_VIDEOS, args.preset, width=args.width,
                              height=args.height, steps=args.steps, interpolation_steps=args.interpolation_steps)
        print(f"{result['videos']} videos, preset {result['preset']} {result['size']} fps {result['fps']}, CPU")
        print(f"ray renderer: {result['ray_videos_per_second']:.4g} videos/s ({result['ray_seconds']:.1f} s rendering, "
              f"{result['ray_startup_seconds']:.1f} s start-up, actors {result['ray_actors']})")
        print(f"in-process loop: {result['local_videos_per_second']:.4g} videos/s ({result['local_seconds']:.1f} s)")
        print(f"ratio ray/in-process: {result['ray_videos_per_second'] / result['local_videos_per_second']:.3f}")
        return 0
    try:
        runs: list[tuple[str, Levers]] = []
        base = Levers().off(*args.lever)
        if args.each_lever:
            runs = [("all levers on", base)] + [(f"{name} off", base.off(name)) for name in LEVERS if getattr(base, name)]
        elif args.pools == "both":
            runs = [("planned pools", base), ("equal pools", base.off("planner"))]
        else:
            runs = [("equal pools" if args.pools == "equal" else "planned pools",
                     base.off("planner") if args.pools == "equal" else base)]
        results = []
        for label, levers in runs:
            result = simulated_pipeline(args.costs, args.gpus, args.videos or SIMULATED_VIDEOS, levers=levers,
                                        time_scale=args.time_scale, tolerance=args.tolerance, slack=args.slack,
                                        max_share=args.max_share,
                                        max_actors=args.max_actors, prompts=args.prompts, batch_sizes=args.batch_sizes,
                                        calls_per_second=args.calls_per_second,
                                        label=label)
            results.append((label, result))
            if args.timeline:
                import json

                path = args.timeline if len(runs) == 1 else f"{args.timeline}.{len(results)}"
                with open(path, "w") as f:
                    json.dump({"label": label, "lines": result.lines(), **(result.timeline or {})}, f)
            if len(runs) > 1:
                print(f"== {label}")
            for line in result.lines():
                print(line, flush=True)
    except (CostError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(results) > 1:
        print("== summary")
        for label, r in results:
            print(f"{label:<26} efficiency {r.efficiency:.3f} ({r.steady_videos_per_second:.4g} videos/s), after pools up "
                  f"{r.after_pools_efficiency:.3f}, whole run {r.whole_run_efficiency:.3f}, spilled {r.spilled_bytes}")
        print(results[0][1].lines()[-1])
    # A run too short or too disturbed to measure says so on its last line and fails, never a figure.
    return 1 if any(r.unmeasured for _, r in results) else 0
