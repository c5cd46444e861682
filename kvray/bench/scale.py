"""`kvray bench scale`: a render of a manifest of N rows, some of them done already, as a large job sees it.

Makes an N-row manifest (tiny requests, so that the model work stays small) and, for a fraction F of
its rows, writes their videos' commit records itself (without rendering them); then measures, in one
process: planning rows/s (a dry run), storage requests per 1,000 rows for the done check (counted
with botocore's event hooks on S3; a local disk makes none), the time from the start of the render
to its first video, the driver's peak RSS, the object store's peak use and spilled bytes. With
`--finish`, the render runs to the end and the model calls per stage are counted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ..io.atomic import dumps_json, write_atomic
from ..io.opening import open_fs

FAST = {"width": 64, "height": 64, "steps": 1, "interpolation_steps": 1, "fps": "low"}


def make_manifest(fs, path: str, rows: int) -> None:
    """N rows without ids (so the id pass hashes every row's content), distinct prompts."""
    table = pa.table({"prompt": [f"scale prompt {i}" for i in range(rows)],
                      **{k: [v] * rows for k, v in FAST.items()}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(fs, path, sink.getvalue().to_pybytes())


def mark_done(fs, root: str, job, rows: int, fraction: float) -> int:
    """Commit records (metadata files) for the first `fraction` of the rows' videos."""
    from ..io.layout import meta_path
    from ..requests.manifest import plan_row

    preset = job.models.model_preset
    count = int(rows * fraction)
    batch: dict[str, bytes] = {}
    for i in range(count):
        planned = plan_row({"prompt": f"scale prompt {i}", **FAST}, job.defaults, job.models.version,
                           (preset.default_width, preset.default_height))
        batch[meta_path(root, planned.video_id)] = dumps_json({"video_id": planned.video_id, "marked": True})
        if len(batch) >= 1000 or i == count - 1:
            if isinstance(fs, LocalFileSystem):  # local files need their folders; object stores have none
                for parent in {os.path.dirname(p) for p in batch}:
                    fs.makedirs(parent, exist_ok=True)
            fs.pipe(batch)
            batch = {}
    return count


def count_done_check_requests(job) -> tuple[int | None, int]:
    """(storage requests, done videos) of one done check, on a filesystem of its own (on S3 the
    requests botocore sends are counted; None elsewhere)."""
    from ..io.layout import done_video_ids

    fs, root = open_fs(job.out, {**job.storage_options, "skip_instance_cache": True})
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None, len(done_video_ids(fs, root))
    requests = [0]
    fs.connect()
    fs.s3.meta.events.register("before-send.s3", lambda **_: requests.__setitem__(0, requests[0] + 1))
    done = done_video_ids(fs, root)
    return requests[0], len(done)


class Watcher:
    """Polls, while a render runs in this process: the first video under the output, this process's
    RSS, the object store's use. Interrupts the render (SIGINT) at its first video unless `finish`."""

    def __init__(self, job, finish: bool, interval: float = 0.5):
        self.fs, self.root = open_fs(job.out, job.storage_options)
        self.finish, self.interval = finish, interval
        self.start = time.perf_counter()
        self.first_video: float | None = None
        self.peak_rss = 0
        self.store_peak: int | None = None
        self.spilled: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _videos(self) -> bool:
        folder = f"{self.root}/videos"
        try:
            return bool(self.fs.isdir(folder) and self.fs.find(folder, maxdepth=2))
        finally:
            self.fs.invalidate_cache(folder)

    def _run(self) -> None:
        from ..distributed.cluster import connected, object_store_stats

        process = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            stats = object_store_stats() if connected() else None
            if stats is not None:
                self.store_peak = max(self.store_peak or 0, stats["used"])
                self.spilled = stats["spilled"]
            if self.first_video is None and self._videos():
                self.first_video = time.perf_counter() - self.start
                if not self.finish:
                    os.kill(os.getpid(), signal.SIGINT)


def bench_scale(rows: int, *, done_fraction: float = 0.0, out: str | None = None,
                storage_options: dict | None = None, finish: bool = False) -> dict:
    from ..config.job import RenderJob
    from ..distributed.dryrun import dry_run
    from ..distributed.render import render

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvray-scale-")
        out = tmp.name
    storage_options = storage_options or {}
    fs, root = open_fs(out, storage_options)
    manifest = f"{root}/manifest.parquet"
    make_manifest(fs, manifest, rows)
    job = RenderJob(manifest=fs.unstrip_protocol(manifest), out=fs.unstrip_protocol(f"{root}/render"),
                    storage_options=storage_options)
    _, render_root = open_fs(job.out, storage_options)
    marked = mark_done(fs, render_root, job, rows, done_fraction)
    requests, done = count_done_check_requests(job)
    report = dry_run(job)
    rss_before = psutil.Process().memory_info().rss
    with Watcher(job, finish) as watcher:
        summary = render(job)
    return {
        "rows": rows, "marked_done": marked, "done_found": done, "done_check_requests": requests,
        "requests_per_1000_rows": None if requests is None else 1000 * requests / rows,
        "dry_run_seconds": report.seconds, "planning_rows_per_second": rows / report.seconds,
        "dry_run": {"pending": report.pending, "skipped": report.skipped, "error": report.error},
        "first_video_seconds": watcher.first_video, "peak_rss_bytes": max(watcher.peak_rss, rss_before),
        "rss_before_render_bytes": rss_before, "object_store_peak_bytes": watcher.store_peak,
        "spilled_bytes": watcher.spilled, "status": summary.status,
        "ok": summary.ok, "skipped": summary.skipped, "model_calls": summary.stages.get("model_calls", {}),
        "startup_seconds": summary.startup_seconds,
    }


def add_scale_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "scale", help="a render of an N-row manifest: planning rate, done-check requests, first video, driver memory",
        description="Writes an N-row manifest (and the commit records of a fraction F of its videos, without "
                    "rendering them) under --out, then measures a dry run, the done check's storage requests, "
                    "and a render until its first video (or to the end with --finish).")
    p.add_argument("--rows", type=int, required=True, help="manifest rows")
    p.add_argument("--done-fraction", type=float, default=0.0, help="share of the rows already done (default 0)")
    p.add_argument("--out", help="where the manifest and the render go (local path or s3://...; default: a "
                   "temporary directory)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")
    p.add_argument("--finish", action="store_true", help="render every pending row instead of stopping at the first video")
    p.add_argument("--baseline-rows", type=int, metavar="N",
                   help="first the same measurement for an N-row manifest (e.g. 100), then the ratios of the two: "
                        "first video and driver peak RSS")
    p.set_defaults(run=run_scale_command)
    return p


def run_scale_command(args) -> int:
    from ..io.storage_options import parse_storage_options

    if args.rows < 1 or not 0 <= args.done_fraction <= 1 or (args.baseline_rows is not None and args.baseline_rows < 1):
        print("error: --rows and --baseline-rows must be >= 1 and --done-fraction between 0 and 1", file=sys.stderr)
        return 2
    options = parse_storage_options(args.storage_option or [])
    results = []
    for rows in ([args.baseline_rows] if args.baseline_rows else []) + [args.rows]:
        # Each measurement under a prefix of its own: the second must not find the first one's videos.
        out = None if args.out is None else f"{args.out.rstrip('/')}/rows-{rows}"
        if len(results):
            print()
        results.append(bench_scale(rows, done_fraction=args.done_fraction, out=out, storage_options=options,
                                   finish=args.finish))
        if not _print_scale(results[-1], args.finish):
            return 1
    if len(results) == 2 and all(r["first_video_seconds"] for r in results):
        base, big = results
        print(f"\n{big['rows']} rows against {base['rows']}: first video {big['first_video_seconds']:.1f} s against "
              f"{base['first_video_seconds']:.1f} s, ratio {big['first_video_seconds'] / base['first_video_seconds']:.2f}; "
              f"driver peak RSS {big['peak_rss_bytes'] / 2**20:.0f} MiB against {base['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"ratio {big['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}")
    return 0


def _print_scale(result: dict, finish: bool) -> bool:
    """Prints one measurement; False when there was nothing to measure (no video came out)."""
    requests = result["done_check_requests"]
    print(f"{result['rows']} rows, {result['marked_done']} marked done ({result['done_found']} found by listing)")
    print(f"dry run: {result['dry_run_seconds']:.1f} s, {result['planning_rows_per_second']:.0f} rows/s; "
          f"{result['dry_run']}")
    print("done check: " + ("no storage requests counted (not S3)" if requests is None else
                            f"{requests} requests, {result['requests_per_1000_rows']:.3f} per 1,000 rows"))
    first = result["first_video_seconds"]
    print(f"render: {result['status']}, first video after " + (f"{first:.1f} s" if first is not None else
                                                               "- (none came out)")
          + f" (start-up {result['startup_seconds']:.1f} s); ok {result['ok']}, skipped {result['skipped']}; "
          f"model calls {result['model_calls']}")
    store = result["object_store_peak_bytes"]
    print(f"driver peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (before the render "
          f"{result['rss_before_render_bytes'] / 2**20:.0f} MiB); object store peak "
          + ("unknown" if store is None else f"{store / 2**20:.1f} MiB")
          + "; spilled " + ("unknown" if result["spilled_bytes"] is None else f"{result['spilled_bytes']} bytes"))
    if first is None and not finish:
        print("error: the render produced no video: nothing measured", file=sys.stderr)
        return False
    return True
