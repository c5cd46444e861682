"""The renderer's Ray Data plan with stand-in stage actors: `kvray bench pipeline --simulate`.

The real `model_stages` runs (same operators, pools, batch sizes, logical-GPU requests, output block
sizes) over planned rows built in memory; each stage actor is a stand-in with the real constructor
`(job_json, registry_name, emit_rows)` that registers with the run's registry, counts its calls and
updates the rows like `StageWorker`, but instead of running a model sleeps the profiled cost per
video divided by the fraction of a GPU it holds (k actors sharing a GPU each run at 1/k speed). The
text stand-in sleeps once per distinct prompt of a batch, as `EncodeText` encodes once per prompt.
Payloads of the profiled (or given) size travel between stages; decoded frames never do.

This module is imported by every stand-in actor: it must not import torch (nor kvray.config, which
does). Driver-side imports live inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import ray

log = logging.getLogger(__name__)

PENDING, OK, ERROR = "pending", "ok", "error"  # kvray.distributed.workers, without torch
STAGE_NAMES = ("text", "keyframes", "interpolate", "decode")


class SimStageWorker:
    """A stage actor that sleeps instead of computing. Subclasses (made by `stand_in_workers`) set
    `stage`, `seconds` (per video on a whole GPU, already time-scaled), `payload_bytes` and
    `dedupe_prompts`."""

    stage: str
    seconds: float
    payload_bytes: int = 0
    dedupe_prompts: bool = True

    def __init__(self, job_json: str, registry_name: str, emit_rows: int):
        start = time.perf_counter()
        self.emit_rows = emit_rows
        deployment = json.loads(job_json)["deployment"][self.stage]
        gpus = float(deployment["gpus"])
        # A fraction f of a GPU runs at f of its speed; whole GPUs (memory-bound actors) give no speed-up.
        self.seconds_per_video = self.seconds / gpus if 0 < gpus < 1 else self.seconds
        self.payload = b"\x01" * self.payload_bytes
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.registry = ray.get_actor(registry_name)
        self.registry.register.remote(self.stage, self.gpu_ids, os.getpid(), ray.get_runtime_context().get_node_id(),
                                      time.perf_counter() - start)

    def __call__(self, batch):
        batch = self._run(batch)
        for start in range(0, len(batch), self.emit_rows):
            yield batch.iloc[start:start + self.emit_rows]

    def _work_units(self, rows) -> int:
        if self.stage == "text" and self.dedupe_prompts:
            return len({json.loads(r)["prompt"] for r in rows["request"]})
        return len(rows)

    def _run(self, batch):
        pending = batch.index[batch["status"] == PENDING]
        if len(pending) == 0:
            return batch
        start = time.perf_counter()
        deadline = start + self._work_units(batch.loc[pending]) * self.seconds_per_video
        while (left := deadline - time.perf_counter()) > 0:
            time.sleep(left)
        seconds = (time.perf_counter() - start) / len(pending)
        self.registry.count.remote(self.stage, 1, (time.time() - (time.perf_counter() - start), time.time(), os.getpid()),
                                   len(pending))
        if not batch["seconds_" + self.stage].to_numpy().flags.writeable:
            batch = batch.copy()  # a zero-copy view of a block in the object store
        for i in pending:
            if self.stage == "decode":  # the video goes to storage; only its URI travels on
                batch.at[i, "status"], batch.at[i, "uri"] = OK, f"sim://{batch.at[i, 'video_id']}"
            batch.at[i, "payload"] = self.payload
            batch.at[i, f"seconds_{self.stage}"] = seconds
            gpus = json.loads(batch.at[i, "gpus"])
            gpus[self.stage] = self.gpu_ids
            batch.at[i, "gpus"] = json.dumps(gpus)
        return batch


def stand_in_workers(seconds: dict[str, float], payload_bytes: dict[str, int] | None = None,
                     dedupe_prompts: bool = True) -> dict[str, type]:
    """One stand-in class per stage (Ray Data needs a class per actor pool), carrying its cost."""
    payload_bytes = payload_bytes or {}
    return {
        stage: type(f"Sim{stage.capitalize()}Worker", (SimStageWorker,),
                    {"stage": stage, "seconds": float(seconds[stage]), "payload_bytes": int(payload_bytes.get(stage, 0)),
                     "dedupe_prompts": dedupe_prompts})
        for stage in STAGE_NAMES
    }


@ray.remote(num_cpus=0)
class SimRegistry:
    """`kvray.distributed.cluster.StageRegistry`'s interface, plus when each actor started and when each
    call ended (and on how many videos)."""

    def __init__(self):
        self.actors: dict[str, list[dict]] = {}
        self.model_calls: dict[str, int] = {}
        self.done: dict[str, list[tuple[float, int]]] = {}

    def register(self, stage, gpu_ids, pid, node, load_seconds):
        self.actors.setdefault(stage, []).append({"gpu_ids": gpu_ids, "pid": pid, "node": node,
                                                  "load_seconds": round(load_seconds, 3), "at": time.time()})

    def count(self, stage, calls=1, call=None, videos=0):
        """`call`: (start, end, pid) of the call, wall-clock."""
        self.model_calls[stage] = self.model_calls.get(stage, 0) + calls
        if call is not None:
            self.done.setdefault(stage, []).append((*call, videos))

    def report(self):
        return {"actors": self.actors, "model_calls": self.model_calls, "done": self.done}


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def default_payload_bytes(preset: str = "kv11", width: int = 512, height: int = 512, frames: int = 12,
                          prompt_tokens: int = 24) -> dict[str, int]:
    """What a video carries out of each stage in the real renderer (float32 tensors): the text context
    (cut to the prompt's tokens + 1) and mask; that plus the keyframe latents; the video latents; after
    decoding, nothing (the video is in storage, only its URI travels on)."""
    from ..config import get_preset

    p = get_preset(preset)
    tokens, dim = min(prompt_tokens + 1, p.text_encoder.tokens_length), p.text_encoder.context_dim
    text = tokens * dim * 4 + tokens
    latents = 4 * (height // 8) * (width // 8) * 4
    return {"text": text, "keyframes": text + 12 * latents, "interpolate": frames * latents, "decode": 0}


@dataclass
class SimulationResult:
    """Wall-clock times from the start of the run. Rates are in videos per profiled second: the stand-ins
    sleep `time_scale` wall seconds per profiled second, so a wall rate is multiplied by it. Actor
    start-up is Ray's own (process start, imports), not simulated: it counts at its wall duration."""

    gpus: int
    videos: int
    bound: float  # videos/s: gpus / sum of the stage costs
    steady_videos_per_second: float  # the slowest pool's rate while it is saturated (see `saturated_rate`)
    after_pools_videos_per_second: float  # every video after the pools are up: fill and drain included
    pools_up_seconds: float  # wall: until every actor of every pool has started
    first_video_seconds: float  # wall
    last_video_seconds: float  # wall
    spilled_bytes: int | None
    time_scale: float
    deployment: dict
    window: tuple[float, float] = (0.0, 0.0)  # wall: the steady window
    bottleneck: str = ""  # the pool with the lowest rate while saturated: the steady rate is its
    output_videos_per_second: float = 0.0  # at the output, between 10% and 90% of the videos (see `measure`)
    actors: dict[str, int] = field(default_factory=dict)
    actors_started: dict[str, int] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)  # per stage: busy share of its pool in the window
    other_cpu: float | None = None  # cores used by processes outside this run during the window
    run_cpu: float | None = None  # cores used by this run (driver and Ray) during the window
    ok: int = 0
    notes: list[str] = field(default_factory=list)
    label: str = ""
    timeline: dict | None = field(default=None, repr=False)  # raw: arrivals, actor starts, calls (wall, from 0)

    @property
    def efficiency(self) -> float:
        return self.steady_videos_per_second / self.bound if self.bound else 0.0

    @property
    def after_pools_efficiency(self) -> float:
        return self.after_pools_videos_per_second / self.bound if self.bound else 0.0

    @property
    def total_seconds(self) -> float:
        """The whole run in profiled seconds: actor start-up at its wall duration, the rest scaled."""
        up = min(self.pools_up_seconds, self.last_video_seconds)
        return up + (self.last_video_seconds - up) / self.time_scale

    @property
    def whole_run_videos_per_second(self) -> float:
        return self.ok / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def whole_run_efficiency(self) -> float:
        return self.whole_run_videos_per_second / self.bound if self.bound else 0.0

    def lines(self) -> list[str]:
        pools = ", ".join(f"{s} {d['actors']}x{d['gpus']:g} GPU b{d['batch_size']}"
                          + ("" if self.actors_started.get(s) == d["actors"] else f" ({self.actors_started.get(s, 0)} started)")
                          for s, d in self.deployment.items())
        cpu = "" if self.run_cpu is None else f"; CPU: this run {self.run_cpu:.2f} cores, other processes {self.other_cpu:.2f}"
        scale = "" if self.time_scale == 1 else f", time scale {self.time_scale:g} (rates in videos per profiled second)"
        out = [f"simulated {self.videos} videos on {self.gpus} logical GPUs"
               + (f" ({self.label})" if self.label else "") + scale,
               f"pools (actors x GPU, batch): {pools}",
               f"start-up: {self.pools_up_seconds:.1f} s until every actor was up (Ray's process start, not scaled); "
               f"first video out at {self.first_video_seconds:.1f} s wall",
               f"steady window (every actor of the {self.bottleneck} pool, the slowest, at work): "
               f"{self.window[0]:.1f} s to {self.window[1]:.1f} s wall; "
               "pools busy: " + ", ".join(f"{s} {b:.3f}" for s, b in self.busy.items()) + cpu,
               f"at the output, from 10% to 90% of the videos: {self.output_videos_per_second:.4g} videos/s, efficiency "
               f"{self.output_videos_per_second / self.bound if self.bound else 0.0:.3f} (a short run's fill and drain weigh on it)",
               f"after the pools are up, fill and drain included: {self.after_pools_videos_per_second:.4g} videos/s, "
               f"efficiency {self.after_pools_efficiency:.3f}",
               f"whole run, start-up included: {self.total_seconds:.1f} s, {self.whole_run_videos_per_second:.4g} videos/s, "
               f"efficiency {self.whole_run_efficiency:.3f}",
               "object store spilled: " + ("unknown" if self.spilled_bytes is None else f"{self.spilled_bytes} bytes"),
               f"measured {self.steady_videos_per_second:.4g} videos/s once the pools are up; bound {self.bound:.4g} videos/s"]
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"efficiency={self.efficiency:.3f} throughput={self.steady_videos_per_second:.4g} bound={self.bound:.4g}")
        return out


def measure(arrivals: list[float], pools_up: float, low: float = 0.1, high: float = 0.9) -> tuple[float, float, float]:
    """Steady throughput from sorted completion times: the rate between the completion of video
    max(first one after the pools are up, `low` of them) and of video `high` of them, which leaves out
    the pipeline's fill and drain (the whole-run figure has them). Returns (videos/s, start, end)."""
    n = len(arrivals)
    if n < 3:
        return 0.0, 0.0, 0.0
    first = next((i for i, t in enumerate(arrivals) if t >= pools_up), n - 1)
    lo = max(first, math.ceil(low * (n - 1)))
    hi = max(lo + 1, min(n - 1, math.floor(high * (n - 1))))
    hi = min(hi, n - 1)
    span = arrivals[hi] - arrivals[lo]
    if hi <= lo or span <= 0:
        return 0.0, arrivals[lo], arrivals[hi]
    return (hi - lo) / span, arrivals[lo], arrivals[hi]


def saturated_rate(calls: list[tuple[float, float, int, int]], actors: int, pools_up: float) -> tuple[float, float, float]:
    """A pool's rate while all its actors have work, from its calls (start, end, actor pid, videos;
    wall): from the moment every one of its `actors` has started work (and every pool is up) to the
    moment the first of them finishes its last call (its input has run out: the pipeline drains).
    Every video passes every pool, so the pipeline runs at the lowest of the pools' rates: starvation
    shows as gaps between calls, the time Ray takes between calls as well, and a pool that cannot keep
    up lowers its own rate. Returns (videos/s, start, end)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for start, end, pid, _ in calls:
        first[pid] = min(first.get(pid, math.inf), start)
        last[pid] = max(last.get(pid, -math.inf), end)
    if len(first) < actors:
        return 0.0, 0.0, 0.0
    window_start, window_end = max(pools_up, max(first.values())), min(last.values())
    if window_end <= window_start:
        return 0.0, window_start, window_end
    done = sum(videos * max(0.0, min(end, window_end) - max(start, window_start)) / (end - start)
               for start, end, _, videos in calls if end > start)
    return done / (window_end - window_start), window_start, window_end


def _cpu_seconds() -> dict[int, tuple[int, float]] | None:
    """CPU seconds used so far per process, with its parent (Linux /proc; None elsewhere)."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        used = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            used[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / hz)
        return used
    except (OSError, ValueError, AttributeError):
        return None


def _cpu_split(before: dict, after: dict, seconds: float) -> tuple[float, float]:
    """Cores used between two snapshots by this process and its descendants (this run's Ray), and by the
    other processes of the machine (other users' work that competes for the same cores)."""
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == me:
                return True
            if pid <= 1 or pid not in after:
                return False
            pid = after[pid][0]
        return False

    mine = others = 0.0
    for pid, (_, cpu) in after.items():
        delta = cpu - before[pid][1] if pid in before else cpu
        if ours(pid):
            mine += delta
        else:
            others += delta
    return mine / seconds, others / seconds


def spilled_bytes_total() -> int | None:
    """Bytes the object store has spilled since the cluster started (None if Ray cannot tell)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.spilled_bytes_total)
    except Exception as err:  # a private API: report rather than fail the benchmark
        log.warning("cannot read the object store's spill statistics: %s", err)
        return None


def planned_rows(videos: int, prompts: int | None = None):
    """Rows as `plan_rows` makes them: every column, status pending."""
    import pandas as pd

    prompts = prompts or videos
    rows = []
    for i in range(videos):
        request = json.dumps({"prompt": f"simulated prompt {i % prompts}", "image": None, "width": 512, "height": 512,
                              "fps": "low", "motion": "medium", "seed": i, "steps": None, "interpolation_steps": None})
        rows.append({"id": f"sim-{i:06d}", "video_id": f"{i:064x}", "status": PENDING, "uri": "", "error": "",
                     "seed": i, "prompt_truncated": False, "request": request,
                     **{f"seconds_{s}": 0.0 for s in STAGE_NAMES}, "gpus": "{}", "payload": b""})
    return pd.DataFrame(rows)


def simulate(costs, gpus: int, videos: int, *, deployment, payload_bytes: dict[str, int], pool_options,
             time_scale: float = 1.0, prompts: int | None = None, dedupe_prompts: bool = True,
             object_store_memory: int | None = None, label: str = "") -> SimulationResult:
    """Runs `videos` simulated videos through the renderer's stage pools on a local Ray with `gpus`
    logical GPUs, or on the running Ray (which must have at least `gpus`; it is left running).

    `deployment` (kvray.config.job.Deployment): the pools. `payload_bytes`: bytes per video out of each
    stage. `pool_options`: the renderer's `PoolOptions`. `time_scale`: sleep this many seconds per
    profiled second (figures are reported in the profile's seconds). `prompts`: distinct prompts among
    the videos (default: all distinct); `dedupe_prompts`: the text stand-in works once per distinct
    prompt of a batch, as EncodeText does. `kvray.bench.pipeline.simulated_pipeline` makes all these
    from a cost profile and the planner."""
    from .planner import parse_costs

    costs = parse_costs(costs)
    started_ray = False
    if not ray.is_initialized():
        cpus_needed = sum(deployment.stage(s).actors * deployment.stage(s).cpus for s in STAGE_NAMES)
        ray.init(num_cpus=max(8, math.ceil(cpus_needed) + 4), num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False, object_store_memory=object_store_memory or 1_000_000_000)
        started_ray = True
    try:
        available = ray.cluster_resources().get("GPU", 0)
        if available < gpus:
            raise ValueError(f"the running Ray has {available:g} GPUs; the simulation needs {gpus}")
        return _run(costs, gpus, videos, deployment, time_scale, payload_bytes, prompts, dedupe_prompts, pool_options,
                    label)
    finally:
        if started_ray:
            ray.shutdown()


def _run(costs, gpus, videos, deployment, time_scale, payload_bytes, prompts, dedupe_prompts, pool_options,
         label) -> SimulationResult:
    from ..config.job import RenderJob
    from .render import model_stages

    job = RenderJob(manifest="simulated", out="simulated", deployment=deployment)
    workers = stand_in_workers({s: costs.seconds(s) * time_scale for s in STAGE_NAMES}, payload_bytes, dedupe_prompts)
    registry_name = f"kvray-sim-registry-{os.getpid()}-{time.time_ns()}"
    registry = SimRegistry.options(name=registry_name).remote()
    ray.get(registry.report.remote())
    spilled_before = spilled_bytes_total()
    rows = planned_rows(videos, prompts)
    context = ray.data.DataContext.get_current()
    progress, context.enable_progress_bars = context.enable_progress_bars, False  # output only, not the plan
    try:
        pending = ray.data.from_pandas(rows)
        start_wall, start = time.time(), time.perf_counter()
        dataset = model_stages(pending, videos, job, registry_name, workers=workers, options=pool_options)
        arrivals: list[float] = []
        cpu_marks: list[tuple[int, float, tuple[float, float] | None]] = []
        next_mark, ok = 0, 0
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
            now = time.perf_counter() - start
            arrivals.extend([now] * len(batch))
            ok += int((batch["status"] == OK).sum())
            if len(arrivals) >= next_mark:  # CPU accounting every 5% of the videos
                cpu_marks.append((len(arrivals), now, _cpu_seconds()))
                next_mark = len(arrivals) + max(1, videos // 20)
        total = time.perf_counter() - start
        report = ray.get(registry.report.remote())
    finally:
        context.enable_progress_bars = progress
        ray.kill(registry)
    spilled_after = spilled_bytes_total()
    spilled = None if spilled_before is None or spilled_after is None else spilled_after - spilled_before

    expected = {s: deployment.stage(s).actors for s in STAGE_NAMES}
    registered = {s: report["actors"].get(s, []) for s in STAGE_NAMES}
    notes = []
    if any(len(registered[s]) < n for s, n in expected.items()):
        notes.append("not every actor started: the pools were never all up")
    up_times = [a["at"] - start_wall for s in STAGE_NAMES for a in registered[s]]
    pools_up = max(up_times) if up_times else total
    output = measure(arrivals, pools_up)
    calls = {s: [(a - start_wall, b - start_wall, pid, n) for a, b, pid, n in report.get("done", {}).get(s, [])]
             for s in STAGE_NAMES}
    # Every video passes every pool: the pipeline is as fast as its slowest pool while saturated.
    rates = {s: saturated_rate(calls[s], expected[s], pools_up) for s in STAGE_NAMES}
    measured = {s: r for s, r in rates.items() if r[0] > 0}
    if measured:
        bottleneck = min(measured, key=lambda s: measured[s][0])
        steady, window_start, window_end = measured[bottleneck]
    else:
        bottleneck = "output"
        notes.append("no pool was ever saturated: the steady rate is the output's")
        steady, window_start, window_end = output
    after = [t for t in arrivals if t > pools_up]
    after_rate = len(after) / (after[-1] - pools_up) if after and after[-1] > pools_up else 0.0
    if len(after) < videos / 2:
        notes.append(f"only {len(after)} of {videos} videos finished after the pools were up: too few to measure")
    if ok < videos:
        notes.append(f"{videos - ok} video(s) did not finish ok")

    window = max(window_end - window_start, 1e-9)
    busy = {}  # the share of the window its actors spent in calls
    for s in STAGE_NAMES:
        inside = sum(max(0.0, min(b, window_end) - max(a, window_start)) for a, b, _, _ in calls[s])
        busy[s] = inside / (deployment.stage(s).actors * window)
    run_cpu = other_cpu = None
    inside = [(t, c) for n, t, c in cpu_marks if c is not None and window_start <= t <= window_end]
    if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
        (t0, before), (t1, after_) = inside[0], inside[-1]
        run_cpu, other_cpu = _cpu_split(before, after_, t1 - t0)
        if other_cpu > 0.25:
            notes.append(f"other processes used {other_cpu:.2f} cores during the measurement: expect lower figures")
    return SimulationResult(
        gpus=gpus, videos=videos, bound=costs.bound(gpus), steady_videos_per_second=steady * time_scale,
        after_pools_videos_per_second=after_rate * time_scale, pools_up_seconds=pools_up,
        first_video_seconds=arrivals[0] if arrivals else total, last_video_seconds=arrivals[-1] if arrivals else total,
        spilled_bytes=spilled, time_scale=time_scale,
        deployment={s: deployment.stage(s).model_dump() for s in STAGE_NAMES},
        window=(window_start, window_end), bottleneck=bottleneck, output_videos_per_second=output[0] * time_scale,
        actors=expected,
        actors_started={s: len(registered[s]) for s in STAGE_NAMES}, busy=busy, other_cpu=other_cpu, run_cpu=run_cpu,
        ok=ok, notes=notes, label=label,
        timeline={"arrivals": arrivals,
                  "actors": {s: [a["at"] - start_wall for a in registered[s]] for s in STAGE_NAMES},
                  "calls": calls},
    )
