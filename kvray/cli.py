"""`kvray` command line: generate | render | submit | plan | bench | train | parity | layout | convert."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

from .options import (
    add_device_option,
    add_model_options,
    add_preset_option,
    add_request_options,
    add_storage_options,
    add_weights_options,
    model_source,
    runtime_config,
    video_request,
)

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
    """One tqdm bar per stage on a terminal; elsewhere (a log file) one plain line per finished stage, since
    a bar's carriage returns garble logs. The pipeline reports (stage, step, steps)."""

    def __init__(self, stream=None):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.stage, self.bar = None, None

    def __call__(self, stage: str, index: int, total: int) -> None:
        if not self.terminal:
            if index == total - 1:
                print(f"{stage}: {total} steps done", file=self.stream, flush=True)
            return
        if stage != self.stage or index == 0:
            self.close()
            self.stage, self.bar = stage, self._tqdm(total=total, desc=f"{stage:<13}", unit="step", file=self.stream)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None








def _cmd_generate(args) -> int:
    from pydantic import ValidationError

    from .config.validation import validation_message
    from .io.images import ImageError
    from .io.storage import open_fs, parse_storage_options, write_atomic
    from .io.video import video_format
    from .pipeline import VideoPipeline, load_first_frames, with_seed
    from .pipeline.device import torch_device

    # Everything a user can get wrong is checked before any model loads, and nothing is written on error.
    try:
        request = with_seed(video_request(args, args.prompt))
        format = args.format or video_format(args.out)
        runtime = runtime_config(args)
        torch_device(runtime)
        storage_options = parse_storage_options(args.storage_option)
        images = load_first_frames([request], storage_options)
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except (ImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    models = model_source(args)
    try:
        _check_weights(models)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _note_weights(models)
    pipeline = VideoPipeline(models, runtime)
    bars = ProgressBars()
    try:
        video = pipeline.generate([request], images=images, progress=bars)[0]
    finally:
        bars.close()
    fs, path = open_fs(args.out, storage_options)
    write_atomic(fs, path, video.encode(format, fps=args.video_fps))
    print(f"wrote {args.out}: {len(video.frames)} frames {request.width}x{request.height}, seed {request.seed}")
    return 0


def _cmd_bench_generate(args) -> int:
    from .bench.generate import bench_generate, bench_mixing

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
    for name, value in (("costs", args.costs), ("gpu", args.gpu), ("gpu_memory_gib", args.gpu_memory),
                        ("stall_timeout_s", args.stall_timeout)):
        if value is not None:
            overrides[name] = value
    dataset = {k: v for k, v in (("layout", args.layout), ("shard_size", args.shard_size),
                                  ("shard_bytes", args.shard_bytes), ("filters", args.filter)) if v is not None}
    if args.with_latents:
        dataset["with_latents"] = True
    if args.drop_filtered:
        dataset["keep_filtered"] = False
    if dataset:
        overrides["dataset"] = dataset
    job = RenderJob.from_yaml(args.job, **overrides) if args.job else RenderJob.model_validate(overrides)
    _check_weights(job.models)
    return job


def _note_weights(models) -> None:
    """One line on stderr where the weights are not a model of the real world: random, or the shipped toy."""
    if models.is_random:
        print(f"note: preset {models.preset} with random weights (seed {models.random_seed}): expect noise, not scenes",
              file=sys.stderr)
    elif models.is_shipped_toy:
        print("note: the embedded toy model (shipped weights, trained on kvray's procedural world of coloured shapes): "
              "prompts like 'a red circle moves left on a black background'; --preset kv11 for the real model",
              file=sys.stderr)


def _check_weights(models) -> None:
    """A weights source that cannot exist (a local path that is not there, and neither a URL nor a hub repo
    id) is one clear error before any model loads (WeightsNotFound, a FileNotFoundError)."""
    from .weights.source import WeightsSource

    if not models.is_random:
        WeightsSource(models.resolved_weights, cache_dir=models.cache_dir)
        if models.t5:
            WeightsSource(models.t5, cache_dir=models.cache_dir)


class RenderProgress:
    """One progress display for `kvray render`, on stderr: a bar on a terminal, else a line every
    `every` seconds (a log stays readable: never more than a line a second)."""

    def __init__(self, total: int, every: float = 10.0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.every = total, every
        self.start = time.monotonic()
        self.last = 0.0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", file=self.stream, dynamic_ncols=True)

    def __call__(self, summary, report: dict) -> None:
        planned = report.get("planned", {})
        skipped, bad = planned.get("skipped", 0), planned.get("error", 0)
        done = summary.ok + summary.error + summary.filtered + skipped + bad + summary.repeats
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = summary.ok / elapsed
        left = self.total - done
        eta = f"{left / rate / 60:.1f} min" if rate > 0 and left > 0 else "-"
        busy = report.get("busy_seconds", {})
        actors = {s: max(1, len(a)) for s, a in report.get("actors", {}).items()}
        shares = " ".join(f"{s} {busy.get(s, 0.0) / (elapsed * actors.get(s, 1)):.2f}" for s in actors)
        text = (f"{done}/{self.total} rows (ok {summary.ok}, error {summary.error + bad}, skipped {skipped}), "
                f"{rate:.3g} videos/s, ETA {eta}" + (f"; busy: {shares}" if shares else ""))
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(text.partition("), ")[2], refresh=True)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _render_errors():
    """The errors a render reports as one line and exit status 2."""
    from .distributed.cluster import ResourceError
    from .distributed.planner import DoesNotFit
    from .distributed.render import StallError
    from .io.layout import LegacyLayout
    from .io.lease import LeaseHeld, LeaseLost
    from .io.manifest import ManifestError
    from .pipeline.device import DeviceError

    return (ManifestError, LegacyLayout, ResourceError, StallError, DeviceError, LeaseHeld, LeaseLost, DoesNotFit)


def _cmd_render(args) -> int:
    from pydantic import ValidationError

    from .config.validation import validation_message

    try:
        job = _render_job(args)
    except (ValidationError, ValueError, OSError) as err:
        message = validation_message(err, "job") if isinstance(err, ValidationError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(job, args)
    _note_weights(job.models)
    from .distributed.render import render
    from .io.manifest import open_manifest

    progress = None
    try:
        progress = RenderProgress(open_manifest(job.manifest, job.storage_options).rows)
        summary = render(job, limit=args.limit, verbose=args.verbose, take_over=args.take_over,
                         wait_for_lease_s=args.wait_for_lease, progress=progress)
    except _render_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # storage that keeps failing once its retries are spent
        print(f"error: storage failed: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failure inside Ray: the run is recorded as failed, with the error
        if args.verbose:
            raise
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"error: the render failed: {first} (the run's record is in {job.out}/runs/; -v shows the whole "
              "error)", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    for line in summary.lines():
        print(line)
    return summary.exit_code


def _dry_run(job, args) -> int:
    from .config.costs import CostError, parse_costs
    from .distributed.dryrun import dry_run
    from .distributed.planner import job_costs

    try:
        costs = parse_costs(args.costs) if args.costs else job_costs(job)
        report = dry_run(job, costs=costs, gpus=args.gpus, verbose=args.verbose)
    except CostError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _render_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: storage failed: {err}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0


def _cmd_migrate(args) -> int:
    from .io.layout import migrate_legacy
    from .io.storage import open_fs, parse_storage_options

    fs, root = open_fs(args.out, parse_storage_options(args.storage_option or []))
    moved = migrate_legacy(fs, root)
    print(f"moved {moved['videos']} videos, {moved['meta']} metadata files and {moved['results']} results files "
          f"into the current layout of {args.out}")
    return 0


def _cmd_results(args) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .io.layout import latest_results
    from .io.storage import open_fs, parse_storage_options, write_atomic

    fs, root = open_fs(args.out, parse_storage_options(args.storage_option or []))
    table = latest_results(fs, root)
    if table.num_rows == 0:
        print(f"no results under {args.out}", file=sys.stderr)
        return 1
    if args.status:
        table = table.filter(pc.is_in(table.column("status"), value_set=pa_strings(args.status)))
    counts = table.group_by("status").aggregate([("id", "count")]).to_pylist()
    if table.num_rows == 0:
        print(f"no rows with status {' or '.join(args.status)} under {args.out}")
        return 0
    print(", ".join(f"{c['status']} {c['id_count']}" for c in sorted(counts, key=lambda c: c["status"])))
    if args.save:
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out_fs, path = open_fs(args.save)
        write_atomic(out_fs, path, sink.getvalue().to_pybytes())
        print(f"wrote {table.num_rows} rows to {args.save}")
    else:
        for row in table.slice(0, args.show).to_pylist():
            print(f"{row['id']}\t{row['status']}\t{row['uri'] or row['error']}")
    return 0


def pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())








def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvray")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description="Kandinsky Video 1.1 on Ray")
    parser.add_argument("--version", action="version", version=f"kvray {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; Ray's and its workers' logs and Ray Data's progress bars too")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="one video from a prompt (text2video) or an image (image2video)")
    p.add_argument("prompt", nargs="?", help="the text (or --scene for each scene of a mini-movie)")
    p.add_argument("--out", required=True, help="output file (.mp4, .gif, .webp; local path or fsspec URL)")
    p.add_argument("--format", choices=["mp4", "gif", "webp"], help="default: from the --out extension")
    p.add_argument("--video-fps", type=float,
                   help="frame rate of the file (default: 24 for an animation, else each scene lasts about 5.5 s)")
    add_request_options(p)
    add_model_options(p)
    add_storage_options(p)
    p.set_defaults(run=_cmd_generate)

    p = commands.add_parser("render", help="render a manifest of prompts on Ray (local or a cluster)")
    p.add_argument("manifest", help="Parquet, CSV, JSON Lines or .txt file, a directory or a glob (local path or "
                   "fsspec URI)")
    p.add_argument("--out", required=True, help="output prefix (local path, s3://bucket/prefix, ...)")
    p.add_argument("--job", help="job YAML (deployment per stage, defaults, ...); flags override it")
    p.add_argument("--address", help="join a running Ray: 'auto' or the head's HOST:PORT (6379; default: start a "
                   "local Ray). To send a render to a cluster's dashboard (http://HEAD:8265), use `kvray submit`")
    add_storage_options(p)
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: detected)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray (default: max(8, cores))")
    add_preset_option(p, default=None, help_default="toy, or the job file's")
    add_weights_options(p)
    add_device_option(p, default=None)
    p.add_argument("--costs", help="cost profile for the planner (JSON of `kvray bench stages` or `kvray bench estimate`, "
                   "or stage=seconds,...): sizes the pools when the job fixes none (default for kv11: estimated for "
                   "the job's default request on --gpu)")
    p.add_argument("--gpu", help="named GPU of the estimated profile: h100 (default), a100, h200, l4, ... (docs/sizing.md)")
    p.add_argument("--gpu-memory", type=float, help="GiB of one GPU, for the planner (default: the profile's, else 80)")
    data = p.add_argument_group("dataset output (see README: Synthesize a dataset)")
    data.add_argument("--layout", help="files (default: videos/ and meta/, one object each) or webdataset (tar shards, "
                      "a Parquet index, a dataset card)")
    data.add_argument("--shard-size", type=int, help="webdataset: samples per shard, at most (default 256)")
    data.add_argument("--shard-bytes", help="webdataset: bytes per shard, at most (default 512MiB)")
    data.add_argument("--with-latents", action="store_true", help="webdataset: also store the latents the decoder got")
    data.add_argument("--filter", action="append", metavar="SIGNAL>=VALUE",
                      help="quality threshold, repeatable, ANDed (quote it: 'motion>=0.5'); a video that fails one is "
                           "`filtered`, with the reason")
    data.add_argument("--drop-filtered", action="store_true", help="leave filtered videos out (default: keep them, marked)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every row and count pending, done and bad rows (with a cost profile: the GPU-hours "
                        "and the wall time on --gpus GPUs they need); writes nothing")
    p.add_argument("--gpus", type=int, help="--dry-run: GPUs to estimate the wall time on (default 1)")
    p.add_argument("--limit", type=int, help="render only the first N pending rows (a cheap first look)")
    p.add_argument("--stall-timeout", type=float, help="stop with the reason when nothing moves for this many "
                   "seconds (default 3600)")
    p.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                   help="when another run holds --out, wait this long for it to end or for its lease to expire "
                        "(a killed driver's expires 2 minutes after its last renewal)")
    p.add_argument("--take-over", action="store_true",
                   help="take the lease of a run known to be dead (its driver killed) without waiting for it to expire")
    p.set_defaults(run=_cmd_render)

    p = commands.add_parser("results", help="the latest status of every row of an output prefix")
    p.add_argument("out", help="the render's output prefix")
    p.add_argument("--status", action="append", help="only rows with this status (repeatable): ok, error, skipped, ...")
    p.add_argument("--save", metavar="URI", help="write the rows as Parquet here instead of printing them")
    p.add_argument("--show", type=int, default=20, help="rows to print (default 20)")
    add_storage_options(p)
    p.set_defaults(run=_cmd_results)

    p = commands.add_parser("migrate", help="move the outputs of kvray 0.1 (flat keys) into the current layout")
    p.add_argument("out", help="the output prefix")
    add_storage_options(p)
    p.set_defaults(run=_cmd_migrate)

    from .distributed.submit import add_submit_parser

    add_submit_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks that print their figures").add_subparsers(dest="bench", required=True)
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
    p.set_defaults(run=_cmd_bench_generate)

    from .bench.dataset import add_dataset_parser
    from .bench.estimate import add_estimate_parser
    from .bench.gpu import add_gpu_parser
    from .bench.pipeline import add_pipeline_parser
    from .bench.precision import add_precision_parser
    from .bench.scale import add_scale_parser
    from .bench.soak import add_soak_parser
    from .bench.stages import add_stages_parser
    from .bench.toyworld import add_toyworld_parser
    from .distributed.planner import add_plan_parser
    from .gallery.command import add_gallery_parser
    from .training.command import add_train_parser

    add_stages_parser(bench)
    add_estimate_parser(bench)
    add_precision_parser(bench)
    add_gpu_parser(bench)
    add_pipeline_parser(bench)
    add_scale_parser(bench)
    add_soak_parser(bench)
    add_dataset_parser(bench)
    add_toyworld_parser(bench)
    add_plan_parser(commands)
    add_gallery_parser(commands)
    add_train_parser(commands)

    p = commands.add_parser("parity", help="replay the official networks' golden calls and compare")
    p.add_argument("golden_dir")
    p.set_defaults(run=_cmd_parity)

    p = commands.add_parser("layout", help="compare the full-size networks with the official state-dict manifests")
    p.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder of the official state-dict manifests")
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
