"""`kvray bench`: the benchmarks. `bench generate` is here; the others register their own parsers from kvray.bench."""

from __future__ import annotations

from ..bench.dataset import add_dataset_parser
from ..bench.estimate import add_estimate_parser
from ..bench.gpu import add_gpu_parser
from ..bench.pipeline import add_pipeline_parser
from ..bench.precision import add_precision_parser
from ..bench.scale import add_scale_parser
from ..bench.soak import add_soak_parser
from ..bench.stages import add_stages_parser
from ..bench.startup import add_startup_parser
from ..bench.toyworld import add_toyworld_parser
from ..options import add_model_options, add_request_options, model_source, runtime_config, video_request

# In the order of `kvray bench --help`, after `generate`.
BENCHMARKS = (add_stages_parser, add_estimate_parser, add_precision_parser, add_gpu_parser, add_pipeline_parser,
              add_scale_parser, add_soak_parser, add_dataset_parser, add_toyworld_parser,
              add_startup_parser)


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print their figures").add_subparsers(dest="bench", required=True)
    _add_generate_parser(bench)
    for add_benchmark in BENCHMARKS:
        add_benchmark(bench)


def _add_generate_parser(bench) -> None:
    p = bench.add_parser("generate", help="seconds per stage and per video of the in-process pipeline")
    p.add_argument("--prompt", default="a red car drifting on a mountain road")
    p.add_argument("--videos", type=int, default=2, help="timed videos (default 2)")
    p.add_argument("--batch", type=int, default=1, help="requests per pipeline call (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--mixing", action="store_true",
                   help="compare one request per network call with request-mixing batches of --batch, in one process")
    p.add_argument("--rounds", type=int, default=3, help="--mixing: alternating rounds; the fastest counts (default 3)")
    add_request_options(p)
    add_model_options(p, weights="random")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from ..bench.generate import bench_generate, bench_mixing

    request = video_request(args, args.prompt)
    if args.mixing:
        result = bench_mixing(model_source(args), runtime_config(args), request, videos=args.videos, batch=args.batch,
                              rounds=args.rounds)
        print(f"preset {args.preset}, {request.width}x{request.height}, fps {request.fps} ({request.num_frames} frames), "
              f"device {result['device']}, {args.videos} videos in batches of {args.batch}, fastest of {args.rounds} "
              "alternating rounds")
        for mode, label in (("invariant", "one request per network call (batch_invariant: true)"),
                            ("mixing", "requests mixed in network calls (batch_invariant: false)")):
            stages = ", ".join(f"{s} {v:.3f}" for s, v in result["stage_seconds_per_video"][mode].items())
            print(f"  {label}: {result['seconds_per_video'][mode]:.3f} s/video ({stages})")
        print(f"cost of batch invariance: {result['ratio']:.3f}x the time of mixing batches")
        return 0
    result = bench_generate(model_source(args), runtime_config(args), request, videos=args.videos, batch=args.batch,
                            warmup=args.warmup)
    print(f"preset {args.preset}, {request.width}x{request.height}, fps {request.fps} ({request.num_frames} frames), "
          f"device {result['device']}, batch {args.batch}, {args.videos} videos after {args.warmup} warm-up batch(es)")
    print(f"model load: {result['load_seconds']:.2f} s")
    for stage, seconds in result["stage_seconds_per_video"].items():
        print(f"  {stage:<12} {seconds:8.3f} s/video")
    print(f"total        {result['seconds_per_video']:8.3f} s/video")
    return 0
