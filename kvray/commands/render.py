"""`kvray render`: a manifest of prompts rendered on Ray, with a progress display and a dry run."""

from __future__ import annotations

import sys
import time

from ..options import add_device_option, add_preset_option, add_storage_options, add_weights_options
from .common import checked_models, note_weights


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("render", help="render a manifest of prompts on Ray (local or a cluster)")
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
    _add_dataset_options(p.add_argument_group("dataset output (see README: Synthesize a dataset)"))
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
    p.set_defaults(run=run)


def _add_dataset_options(data) -> None:
    data.add_argument("--layout", help="files (default: videos/ and meta/, one object each) or webdataset (tar shards, "
                      "a Parquet index, a dataset card)")
    data.add_argument("--shard-size", type=int, help="webdataset: samples per shard, at most (default 256)")
    data.add_argument("--shard-bytes", help="webdataset: bytes per shard, at most (default 512MiB)")
    data.add_argument("--with-latents", action="store_true", help="webdataset: also store the latents the decoder got")
    data.add_argument("--filter", action="append", metavar="SIGNAL>=VALUE",
                      help="quality threshold, repeatable, ANDed (quote it: 'motion>=0.5'); a video that fails one is "
                           "`filtered`, with the reason")
    data.add_argument("--drop-filtered", action="store_true", help="leave filtered videos out (default: keep them, marked)")


def _render_job(args):
    from ..config.job import RenderJob
    from ..io.storage_options import parse_storage_options

    overrides: dict = {"manifest": args.manifest, "out": args.out}
    models = {k: v for k, v in (("preset", args.preset), ("weights", args.weights), ("t5", args.t5),
                                 ("cache_dir", args.cache_dir), ("loras", args.lora)) if v is not None}
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
    return job.model_copy(update={"models": checked_models(job.models)})


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
    from ..distributed.cluster import ResourceError
    from ..distributed.planner import DoesNotFit
    from ..distributed.render import StallError
    from ..io.layout import LegacyLayout
    from ..io.lease import LeaseHeld, LeaseLost
    from ..io.manifest import ManifestError
    from ..pipeline.device import DeviceError

    return (ManifestError, LegacyLayout, ResourceError, StallError, DeviceError, LeaseHeld, LeaseLost, DoesNotFit)


def run(args) -> int:
    from pydantic import ValidationError

    from ..config.validation import validation_message

    try:
        job = _render_job(args)
    except (ValidationError, ValueError, OSError) as err:
        message = validation_message(err, "job") if isinstance(err, ValidationError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(job, args)
    note_weights(job.models)
    from ..distributed.render import render
    from ..io.manifest import open_manifest

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
    from ..config.costs import CostError, parse_costs
    from ..distributed.dryrun import dry_run
    from ..distributed.planner import job_costs

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
