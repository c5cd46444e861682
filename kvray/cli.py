"""`kvray` command line: generate | render | submit | plan | bench | parity | layout | convert."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

log = logging.getLogger("kvray")


def _cmd_parity(args) -> int:
    from .parity import Unhandled, check_directory

    failures = 0
    try:
        for result in check_directory(args.golden_dir):
            print(result.line(), flush=True)
            failures += not result.ok
    except Unhandled as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("parity: all calls within tolerance" if not failures else f"parity: {failures} call(s) out of tolerance")
    return 1 if failures else 0


def _cmd_layout(args) -> int:
    from .config import get_preset
    from .weights.layout import check_layouts

    results = check_layouts(get_preset(args.preset), args.manifest_dir)
    for r in results:
        status = "ok" if r.ok else "MISMATCH"
        print(f"{r.network:<20} {r.manifest:<32} {r.parameters:>15,} params (manifest {r.expected_parameters:,}) {status}")
        if r.problem:
            print(f"  {r.problem}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    return 0 if all(r.ok for r in results) else 1


def _cmd_convert(args) -> int:
    from .config import get_preset
    from .weights.convert import convert
    from .weights.source import WeightsSource

    written = convert(
        WeightsSource(args.src, cache_dir=args.cache_dir),
        args.dst,
        get_preset(args.preset),
        t5_source=WeightsSource(args.t5, cache_dir=args.cache_dir) if args.t5 else None,
        networks=args.network or None,
    )
    for path in written:
        print(path)
    return 0


class ProgressBars:
    """One tqdm bar per stage, on stderr; the pipeline reports (stage, step, steps)."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stage, self.bar = None, None

    def __call__(self, stage: str, index: int, total: int) -> None:
        if stage != self.stage or index == 0:
            self.close()
            self.stage, self.bar = stage, self._tqdm(total=total, desc=f"{stage:<13}", unit="step")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _model_source(args):
    from .config.models import ModelSource

    return ModelSource(preset=args.preset, weights=args.weights, t5=args.t5, cache_dir=args.cache_dir)


def _camera(value: str | None) -> str | None:
    """--camera: an effect name, a JSON camera path, or @FILE holding the JSON."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:]) as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read the camera path {value[1:]!r}: {err}") from err


def _request(args):
    from .config import get_preset
    from .pipeline.request import VideoRequest, default_size

    preset = get_preset(args.preset)
    width, height = default_size(args.mode, (preset.default_width, preset.default_height))
    fields = dict(prompt=args.prompt, image=args.image, width=args.width or width, height=args.height or height,
                  fps=args.fps, motion=args.motion, seed=args.seed, steps=args.steps,
                  interpolation_steps=args.interpolation_steps, mode=args.mode, camera=_camera(args.camera),
                  strength=args.strength, scenes=[args.prompt, *args.scene] if args.scene else None)
    return VideoRequest(**{k: v for k, v in fields.items() if v is not None})


def _cmd_generate(args) -> int:
    from pydantic import ValidationError

    from .config.validation import validation_message
    from .io.images import ImageError
    from .io.storage import open_fs, write_atomic
    from .io.video import video_format
    from .pipeline import VideoPipeline, load_first_frames, with_seed

    # Everything a user can get wrong is checked before any model loads, and nothing is written on error.
    try:
        request = with_seed(_request(args))
        format = args.format or video_format(args.out)
        images = load_first_frames([request])
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except (ImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    models = _model_source(args)
    if models.is_random:
        print(f"note: preset {args.preset} with random weights (seed {models.random_seed}): expect noise, not a scene",
              file=sys.stderr)
    pipeline = VideoPipeline(models, _runtime(args))
    bars = ProgressBars()
    try:
        video = pipeline.generate([request], images=images, progress=bars)[0]
    finally:
        bars.close()
    fs, path = open_fs(args.out)
    write_atomic(fs, path, video.encode(format, fps=args.video_fps))
    print(f"wrote {args.out}: {len(video.frames)} frames {request.width}x{request.height}, seed {request.seed}")
    return 0


def _cmd_bench_generate(args) -> int:
    from .bench.generate import bench_generate

    request = _request(args)
    result = bench_generate(_model_source(args), _runtime(args), request, videos=args.videos, batch=args.batch,
                            warmup=args.warmup)
    print(f"preset {args.preset}, {request.width}x{request.height}, fps {request.fps} ({request.num_frames} frames), "
          f"device {result['device']}, batch {args.batch}, {args.videos} videos after {args.warmup} warm-up batch(es)")
    print(f"model load: {result['load_seconds']:.2f} s")
    for stage, seconds in result["stage_seconds_per_video"].items():
        print(f"  {stage:<12} {seconds:8.3f} s/video")
    print(f"total        {result['seconds_per_video']:8.3f} s/video")
    return 0


def _render_job(args):
    from .config.job import RenderJob
    from .io.storage import parse_storage_options

    overrides: dict = {"manifest": args.manifest, "out": args.out}
    models = {k: v for k, v in (("preset", args.preset), ("weights", args.weights), ("t5", args.t5),
                                 ("cache_dir", args.cache_dir)) if v is not None}
    if models:
        overrides["models"] = models
    ray_options = {k: v for k, v in (("address", args.address), ("num_gpus", args.num_gpus),
                                      ("num_cpus", args.num_cpus)) if v is not None}
    if ray_options:
        overrides["ray"] = ray_options
    if args.storage_option:
        overrides["storage_options"] = parse_storage_options(args.storage_option)
    if args.device:
        overrides["runtime"] = {"device": args.device}
    if args.costs:
        overrides["costs"] = args.costs
    if args.gpu_memory:
        overrides["gpu_memory_gib"] = args.gpu_memory
    if args.gpu:
        overrides["gpu"] = args.gpu
    if args.job:
        return RenderJob.from_yaml(args.job, **overrides)
    return RenderJob.model_validate(overrides)


def _cmd_render(args) -> int:
    from pydantic import ValidationError

    from .config.validation import validation_message
    from .io.manifest import ManifestError

    try:
        job = _render_job(args)
    except (ValidationError, ValueError, OSError) as err:
        message = validation_message(err, "request") if isinstance(err, ValidationError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    from .distributed.planner import DoesNotFit
    from .distributed.render import render

    try:
        summary = render(job)
    except (ManifestError, DoesNotFit) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # storage that keeps failing once its retries are spent
        print(f"error: storage failed: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


def _cmd_bench_soak(args) -> int:
    from .bench.soak import soak

    totals = soak(args.minutes, rows=args.rows, kill_every=args.kill_every, seed=args.seed, out=args.out)
    print(f"rounds {totals['rounds']}, rows {totals['rows']}: ok {totals['ok']}, error {totals['error']}; "
          f"actors killed {totals['kills']}")
    print(f"rows lost {totals['lost']}, rows duplicated {totals['duplicated']}")
    return 0 if totals["lost"] == totals["duplicated"] == 0 else 1


def _runtime(args):
    from .config import RuntimeConfig

    return RuntimeConfig(device=args.device)


def _add_model_options(p) -> None:
    p.add_argument("--preset", default="tiny", choices=["tiny", "kv11"], help="network sizes (default tiny)")
    p.add_argument("--weights", help="weights: local dir, hub repo id, fsspec URL, or 'random' "
                   "(default: random for tiny, ai-forever/KandinskyVideo_1_1 for kv11)")
    p.add_argument("--t5", help="T5 encoder checkpoint for official weights (default google/flan-ul2)")
    p.add_argument("--cache-dir", help="where remote weights are cached")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def _add_request_options(p) -> None:
    p.add_argument("--image", help="image2video: the first frame (path, URL or fsspec URI)")
    p.add_argument("--width", type=int, help="multiple of 64 (default: the preset's, 512 for kv11, 128 for tiny)")
    p.add_argument("--height", type=int, help="multiple of 64 (default: the preset's, 512 for kv11, 128 for tiny)")
    p.add_argument("--fps", help="low (12 frames), medium (45) or high (177); default low")
    p.add_argument("--motion", help="low, medium or high (default medium)")
    p.add_argument("--seed", type=int, help="default: random, printed")
    p.add_argument("--steps", type=int, help="first-frame and keyframe denoising steps (default 50)")
    p.add_argument("--interpolation-steps", type=int, help="interpolation denoising steps (default 10)")
    p.add_argument("--mode", choices=["text2video", "image2video", "animation"],
                   help="default: image2video with --image, else text2video")
    p.add_argument("--camera", help="animation: zoom-in, zoom-out, pan-left, pan-right, pan-up, pan-down, "
                   "rotate-clockwise, rotate-anticlockwise; or a camera path as JSON, e.g. "
                   "'[{\"frame\": 0}, {\"frame\": 95, \"zoom\": 1.5, \"x\": 0.2, \"angle\": 10}]', or @FILE with it")
    p.add_argument("--strength", type=float,
                   help="animation: re-noising of each redrawn frame, 0 (the camera move alone) to 1 (default 0.4)")
    p.add_argument("--scene", action="append", metavar="PROMPT",
                   help="mini-movie: the prompt of the next scene (repeatable; up to 3 scenes with the first prompt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description="Kandinsky Video 1.1 on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="one video from a prompt (text2video) or an image (image2video)")
    p.add_argument("prompt")
    p.add_argument("--out", required=True, help="output file (.mp4, .gif, .webp; local path or fsspec URL)")
    p.add_argument("--format", choices=["mp4", "gif", "webp"], help="default: from the --out extension")
    p.add_argument("--video-fps", type=float,
                   help="frame rate of the file (default: 24 for an animation, else each scene lasts about 5.5 s)")
    _add_request_options(p)
    _add_model_options(p)
    p.set_defaults(run=_cmd_generate)

    p = commands.add_parser("render", help="render a Parquet manifest of prompts on Ray (local or a cluster)")
    p.add_argument("manifest", help="Parquet file, directory or glob (local path or fsspec URI)")
    p.add_argument("--out", required=True, help="output prefix (local path, s3://bucket/prefix, ...)")
    p.add_argument("--job", help="job YAML (deployment per stage, defaults, ...); flags override it")
    p.add_argument("--address", help="join a Ray cluster: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the manifest and outputs, e.g. endpoint_url=http://... (repeatable)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: detected)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray (default: max(8, cores))")
    p.add_argument("--preset", choices=["tiny", "kv11"], help="network sizes (default tiny)")
    p.add_argument("--weights", help="weights source (default: random for tiny, the official hub repo for kv11)")
    p.add_argument("--t5", help="T5 encoder checkpoint for official weights (default google/flan-ul2)")
    p.add_argument("--cache-dir", help="where remote weights are cached")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--costs", help="cost profile for the planner (JSON of `kvray bench stages` or `kvray bench estimate`, "
                   "or stage=seconds,...): sizes the pools when the job fixes none (default for kv11: estimated for "
                   "the job's default request on --gpu)")
    p.add_argument("--gpu", help="named GPU of the estimated profile: h100 (default), a100, h200, l4, ... (docs/sizing.md)")
    p.add_argument("--gpu-memory", type=float, help="GiB of one GPU, for the planner (default: the profile's, else 80)")
    p.set_defaults(run=_cmd_render)

    from .distributed.submit import add_submit_parser

    add_submit_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks that print their figures").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("generate", help="seconds per stage and per video of the in-process pipeline")
    p.add_argument("--prompt", default="a red car drifting on a mountain road")
    p.add_argument("--videos", type=int, default=2, help="timed videos (default 2)")
    p.add_argument("--batch", type=int, default=1, help="requests per pipeline call (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    _add_request_options(p)
    _add_model_options(p)
    p.set_defaults(run=_cmd_bench_generate)

    p = bench.add_parser("soak", help="render for N minutes while stage actors are killed; rows lost / duplicated")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rows", type=int, default=12, help="rows per round (default 12)")
    p.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between SIGKILLs (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where rounds write (default: a temporary directory)")
    p.set_defaults(run=_cmd_bench_soak)

    from .bench.estimate import add_estimate_parser
    from .bench.gpu import add_gpu_parser
    from .bench.pipeline import add_pipeline_parser
    from .bench.precision import add_precision_parser
    from .bench.stages import add_stages_parser
    from .distributed.planner import add_plan_parser

    add_stages_parser(bench)
    add_estimate_parser(bench)
    add_precision_parser(bench)
    add_gpu_parser(bench)
    add_pipeline_parser(bench)
    add_plan_parser(commands)

    p = commands.add_parser("parity", help="replay the official networks' golden calls and compare")
    p.add_argument("golden_dir")
    p.set_defaults(run=_cmd_parity)

    p = commands.add_parser("layout", help="compare the full-size networks with the official state-dict manifests")
    p.add_argument("--check", dest="manifest_dir", required=True, metavar="MANIFEST_DIR")
    p.add_argument("--preset", default="kv11")
    p.set_defaults(run=_cmd_layout)

    p = commands.add_parser("convert", help="official checkpoints -> safetensors + architecture JSON per network")
    p.add_argument("src", help="official weights: local dir, hub repo id (ai-forever/KandinskyVideo_1_1) or fsspec URL")
    p.add_argument("dst", help="output directory (local path or fsspec URL)")
    p.add_argument("--preset", default="kv11", help="architecture of the official files (default kv11)")
    p.add_argument("--t5", help="T5 encoder checkpoint (default: none, skip the text encoder; google/flan-ul2 for the real one)")
    p.add_argument("--network", action="append", help="convert only this network (repeatable)")
    p.add_argument("--cache-dir", help="where remote files are cached")
    p.set_defaults(run=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers imports torchao when it is installed; its warnings (no Triton, deprecated pytree
    # registrations) concern kernels and APIs kvray never uses.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
