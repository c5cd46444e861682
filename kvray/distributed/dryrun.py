"""`kvray render --dry-run`: what a render would do, and what it would cost, writing nothing.

The same planning as a render (every row validated, ids checked, done videos found by listing), on
the same Ray (local by default), without the stage pools; the planned rows are only counted. Given a
cost profile, the pending rows' GPU time is estimated from the profile's seconds per video, scaled to
each row's size and frame count (pixels x frames for decoding, pixels x interpolated groups for
interpolation, pixels for the keyframes, prompts for the text): an estimate, as good as the profile.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import ray

from ..config.costs import CostProfile
from ..config.job import RenderJob
from ..config.stages import STAGES
from ..io.layout import done_keys
from ..io.manifest import open_manifest
from ..io.opening import open_fs
from .cluster import connect, disconnect
from .pools import execution_context
from .render import collapsed_rows, new_run_id, planning_tasks
from .row_planning import PlanInputs, planned_dataset, scan_manifest
from .rows import ERROR, PENDING, SKIPPED

FIRST_REASONS = 5
# Interpolated groups and decoded frames per scene, by fps (12 keyframes -> 45 -> 177 frames).
GROUPS = {"low": 0, "medium": 11, "high": 11 + 44}
FRAMES = {"low": 12, "medium": 45, "high": 177}
ANIMATION = {"groups": 24, "frames": 96}


@dataclass
class DryRun:
    rows: int = 0
    pending: int = 0
    skipped: int = 0
    error: int = 0
    repeats: int = 0
    duplicates: int = 0  # ids given to more than one row
    seconds: float = 0.0
    first_errors: list[str] = field(default_factory=list)
    prompts: str = ""
    work: Counter = field(default_factory=Counter)  # per stage: the pending rows' work, in profile videos
    estimate: dict | None = None

    def lines(self) -> list[str]:
        out = [f"rows {self.rows}: pending {self.pending}, done (would be skipped) {self.skipped}, "
               f"bad {self.error}" + (f", identical to an earlier row {self.repeats}" if self.repeats else ""),
               self.prompts, f"planned in {self.seconds:.1f} s; nothing was written"]
        if self.first_errors:
            out.append("first bad rows:")
            out.extend(f"  {e}" for e in self.first_errors)
        if self.estimate:
            e = self.estimate
            out.append(f"estimate for the {self.pending} pending rows ({e['profile']}): {e['gpu_hours']:.4g} GPU-hours; "
                       f"on {e['gpus']} GPUs {e['wall_hours']:.4g} h at the planner's {e['videos_per_second']:.4g} "
                       f"videos/s (bottleneck {e['bottleneck']})")
        return out


def _work(request: dict, reference: dict) -> dict[str, float]:
    """A pending request's work per stage, in units of the profile's own video."""
    pixels = request["width"] * request["height"] / (reference["width"] * reference["height"])
    scenes = len(request["scenes"] or ()) or 1
    if request.get("mode") == "animation":
        groups, frames = ANIMATION["groups"], ANIMATION["frames"]
    else:
        groups, frames = GROUPS[request["fps"]] * scenes, FRAMES[request["fps"]] * scenes
    ref_groups, ref_frames = GROUPS[reference["fps"]], FRAMES[reference["fps"]]
    return {"text": scenes, "keyframes": pixels * scenes,
            "interpolate": pixels * groups / ref_groups if ref_groups else 0.0,
            "decode": pixels * frames / ref_frames}


def dry_run(job: RenderJob, *, costs: CostProfile | None = None, gpus: int | None = None,
            verbose: bool = False) -> DryRun:
    from .planner import plan as plan_pools

    report = DryRun()
    start = time.perf_counter()
    manifest = open_manifest(job.manifest, job.storage_options)
    fs, root = open_fs(job.out, job.storage_options)
    done = done_keys(fs, root, job.dataset.layout)
    started = connect(job.ray, verbose)
    try:
        with execution_context(verbose=verbose):
            scan = scan_manifest(manifest, job.storage_options, planning_tasks(alone=True))
            report.rows, report.repeats, report.duplicates = manifest.rows, len(scan.repeats), len(scan.duplicates)
            report.prompts = scan.prompts.line()
            inputs = PlanInputs(job.model_dump_json(), new_run_id(), "", ray.put(scan.duplicates),
                                ray.put(scan.repeats), ray.put(done), collapsed_rows(job, scan), dry_run=True)
            # The video the profile was measured on (kvray bench stages records it); else the official one.
            measured = costs.meta if costs is not None else {}
            reference = {"width": 512, "height": 512, "fps": "medium",
                         **{k: measured[k] for k in ("width", "height", "fps") if k in measured}}
            shapes: dict[str, int] = {}
            for batch in planned_dataset(manifest.parts, inputs, planning_tasks(alone=True)).iter_batches(
                    batch_format="pandas", batch_size=None):
                for summary in batch["summary"]:
                    part = json.loads(summary)
                    report.pending += part["counts"][PENDING]
                    report.skipped += part["counts"][SKIPPED]
                    report.error += part["counts"][ERROR]
                    report.first_errors.extend(part["errors"])
                    for shape, count in part["shapes"].items():
                        shapes[shape] = shapes.get(shape, 0) + count
            report.first_errors = sorted(report.first_errors, key=lambda line: int(line.split(" ", 2)[1]))[:FIRST_REASONS]
            if costs is not None:
                for shape, count in shapes.items():
                    width, height, fps, mode, scenes = json.loads(shape)
                    work = _work({"width": width, "height": height, "fps": fps, "mode": mode, "scenes": [""] * scenes},
                                 reference)
                    report.work.update({stage: value * count for stage, value in work.items()})
    finally:
        if started:
            disconnect()
    report.seconds = time.perf_counter() - start
    if costs is not None and report.pending:
        gpu_seconds = sum(costs.seconds(s) * report.work[s] for s in STAGES)
        count = gpus or 1
        chosen = plan_pools(costs, count, job.gpu_memory_gib or costs.device_memory_gib)
        # The planner's rate is for the profile's own video; the pending rows are `average` of them.
        average = gpu_seconds / costs.total_seconds / report.pending
        report.estimate = {"profile": costs.device or "cost profile", "gpus": count,
                           "gpu_hours": gpu_seconds / 3600, "videos_per_second": chosen.videos_per_second,
                           "bottleneck": chosen.bottleneck,
                           "wall_hours": report.pending * average / chosen.videos_per_second / 3600}
    return report
