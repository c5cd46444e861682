"""`kvray bench pipeline --simulate`: how close the renderer comes to the throughput bound.

The renderer runs with stand-in stages (`kvray.distributed.simulate`); this module turns what it saw
into figures. Throughput is the lowest, over the pools, of a pool's rate while every actor of every
pool has work (`steady_rates`): every video passes every pool, so the pipeline runs at its slowest
pool's pace once filled and until it drains. Starvation shows as gaps between a pool's calls, the
time Ray takes between calls as well.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import psutil

from ..config.stages import STAGES


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
    steady_videos_per_second: float  # the slowest pool's rate in the steady window (see `steady_rates`)
    after_pools_videos_per_second: float  # every video after the pools are up: fill and drain included
    pools_up_seconds: float  # wall: until every actor of every pool has started
    first_video_seconds: float  # wall
    last_video_seconds: float  # wall
    spilled_bytes: int | None
    time_scale: float
    deployment: dict
    window: tuple[float, float] = (0.0, 0.0)  # wall: the steady window
    bottleneck: str = ""  # the pool with the lowest rate in the steady window: the steady rate is its
    output_videos_per_second: float = 0.0  # at the output, between 10% and 90% of the videos (see `measure`)
    actors: dict[str, int] = field(default_factory=dict)
    actors_started: dict[str, int] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)  # per stage: busy share of its pool in the window
    other_cpu: float | None = None  # cores used by processes outside this run during the window
    run_cpu: float | None = None  # cores used by this run (driver and Ray) during the window
    ok: int = 0
    notes: list[str] = field(default_factory=list)
    unmeasured: str = ""  # why the run could not be measured (then no efficiency is reported)
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
               f"steady window (every actor of every pool at work; the {self.bottleneck} pool the slowest in it): "
               f"{self.window[0]:.1f} s to {self.window[1]:.1f} s wall; "
               "pools busy: " + ", ".join(f"{s} {b:.3f}" for s, b in self.busy.items()) + cpu,
               f"at the output, from 10% to 90% of the videos: {self.output_videos_per_second:.4g} videos/s, efficiency "
               f"{self.output_videos_per_second / self.bound if self.bound else 0.0:.3f} "
               "(a short run's fill and drain weigh on it)",
               f"after the pools are up, fill and drain included: {self.after_pools_videos_per_second:.4g} videos/s, "
               f"efficiency {self.after_pools_efficiency:.3f}",
               f"whole run, start-up included: {self.total_seconds:.1f} s, {self.whole_run_videos_per_second:.4g} videos/s, "
               f"efficiency {self.whole_run_efficiency:.3f}",
               "object store spilled: " + ("unknown" if self.spilled_bytes is None else f"{self.spilled_bytes} bytes"),
               f"measured {self.steady_videos_per_second:.4g} videos/s once the pools are up; bound {self.bound:.4g} videos/s"]
        out.extend(f"note: {n}" for n in self.notes)
        if self.unmeasured:
            out.append(f"could not measure: {self.unmeasured}")
        else:
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


def busy_window(calls: list[tuple[float, float, int, int]], actors: int, pools_up: float) -> tuple[float, float] | None:
    """When every one of a pool's `actors` has work, from its calls (start, end, actor pid, videos; wall):
    from the moment the last of them starts its first call (and every pool is up) to the moment the
    first of them finishes its last call (its input has run out). None if an actor never worked."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for start, end, pid, _ in calls:
        first[pid] = min(first.get(pid, math.inf), start)
        last[pid] = max(last.get(pid, -math.inf), end)
    if len(first) < actors:
        return None
    return max(pools_up, max(first.values())), min(last.values())


def rate_within(calls: list[tuple[float, float, int, int]], start: float, end: float) -> float:
    """A pool's videos per second between `start` and `end`, a call's videos counted in proportion to
    its time inside."""
    if end <= start:
        return 0.0
    done = sum(videos * max(0.0, min(b, end) - max(a, start)) / (b - a) for a, b, _, videos in calls if b > a)
    return done / (end - start)


def steady_rates(calls: dict[str, list], actors: dict[str, int], pools_up: float) -> tuple[dict[str, float], float, float]:
    """Each pool's rate in the steady window: while every actor of every pool has work (the last pool
    to get all its actors working, to the first pool running out of input). Every video passes every
    pool, so the pipeline runs at the lowest of these rates; starvation shows as gaps between calls,
    the time Ray takes between calls as well. A pool's own busy window would not do: a pool faster
    than the bottleneck is never saturated, and its window spans the others' fill and drain. Returns
    ({stage: videos/s}, start, end); empty rates when there is no such window."""
    windows = [busy_window(calls[s], actors[s], pools_up) for s in calls]
    if any(w is None for w in windows):
        return {}, 0.0, 0.0
    start, end = max(w[0] for w in windows), min(w[1] for w in windows)
    if end <= start:
        return {}, start, end
    return {s: rate_within(calls[s], start, end) for s in calls}, start, end


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and its descendants (the driver and a Ray it started),
    and by the whole machine."""
    me = psutil.Process()
    ours = 0.0
    for process in (me, *me.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        ours += times.user + times.system
    machine = psutil.cpu_times()
    return ours, machine.user + machine.system + getattr(machine, "nice", 0.0)


def _calls_of(batch, calls: dict[str, dict]) -> None:
    """Every stage call the rows of `batch` went through: (start, end, pid, videos), wall clock."""
    for placement in batch["placement"]:
        for stage, call in json.loads(placement).items():
            if "started" in call:
                calls[stage][(call["pid"], call["started"])] = (call["started"], call["ended"], call["pid"], call["videos"])


def simulate(costs, gpus: int, videos: int, *, deployment, payload_bytes: dict[str, int], pool_options,
             time_scale: float = 1.0, prompts: int | None = None, dedupe_prompts: bool = True,
             object_store_memory: int | None = None, label: str = "") -> SimulationResult:
    """`videos` simulated videos through the renderer on a local Ray with `gpus` logical GPUs, or on the
    running Ray (which must have at least `gpus`; it is left running).

    `deployment` (kvray.config.job.Deployment): the pools. `payload_bytes`: bytes per video out of each
    stage. `pool_options`: the renderer's `PoolOptions`. `time_scale`: sleep this many seconds per
    profiled second (figures are reported in the profile's seconds). `prompts`: distinct prompts among
    the videos (default: all distinct); `dedupe_prompts`: the text stand-in works once per distinct
    prompt of a batch, as EncodeText does. `kvray.bench.pipeline.simulated_pipeline` makes all these
    from a cost profile and the planner."""
    from ..distributed.planner import parse_costs

    costs = parse_costs(costs)
    run = _simulated_run(costs, gpus, videos, deployment=deployment, payload_bytes=payload_bytes,
                         pool_options=pool_options, time_scale=time_scale, prompts=prompts,
                         dedupe_prompts=dedupe_prompts, object_store_memory=object_store_memory)
    summary, arrivals, total, start_wall = run.summary, run.arrivals, run.total, run.start_wall
    expected = {s: deployment.stage(s).actors for s in STAGES}
    registered = {s: summary.stages.get("actors", {}).get(s, []) for s in STAGES}
    notes, unmeasured = [], []
    if any(len(registered[s]) < n for s, n in expected.items()):
        unmeasured.append("not every actor started: the pools were never all up")
    up_times = [a["at"] - start_wall for s in STAGES for a in registered[s]]
    pools_up = max(up_times) if up_times else total
    output = measure(arrivals, pools_up)
    timeline = {s: sorted((a - start_wall, b - start_wall, pid, n) for a, b, pid, n in run.calls[s].values())
                for s in STAGES}
    # Every video passes every pool: the pipeline is as fast as its slowest pool in the steady window.
    rates, window_start, window_end = steady_rates(timeline, expected, pools_up)
    if rates:
        bottleneck = min(rates, key=rates.get)
        steady = rates[bottleneck]
    else:
        bottleneck = "output"
        notes.append("no window in which every actor of every pool had work: the steady rate is the output's")
        steady, window_start, window_end = output
    after_rate = _rate_after_pools(arrivals, pools_up, videos, summary, unmeasured)
    window = max(window_end - window_start, 1e-9)
    busy = {}  # the share of the window its actors spent in calls
    for s in STAGES:
        inside = sum(max(0.0, min(b, window_end) - max(a, window_start)) for a, b, _, _ in timeline[s])
        busy[s] = inside / (deployment.stage(s).actors * window)
    run_cpu, other_cpu = _cpu_during(run.cpu_marks, window_start, window_end)
    if other_cpu is not None and other_cpu > 0.25:
        notes.append(f"other processes used {other_cpu:.2f} cores during the measurement: expect lower figures")
    return SimulationResult(
        gpus=gpus, videos=videos, bound=costs.bound(gpus), steady_videos_per_second=steady * time_scale,
        after_pools_videos_per_second=after_rate * time_scale, pools_up_seconds=pools_up,
        first_video_seconds=arrivals[0] if arrivals else total, last_video_seconds=arrivals[-1] if arrivals else total,
        spilled_bytes=run.spilled, time_scale=time_scale,
        deployment={s: deployment.stage(s).model_dump() for s in STAGES},
        window=(window_start, window_end), bottleneck=bottleneck, output_videos_per_second=output[0] * time_scale,
        actors=expected, actors_started={s: len(registered[s]) for s in STAGES}, busy=busy, other_cpu=other_cpu,
        run_cpu=run_cpu, ok=summary.ok, notes=notes, unmeasured="; ".join(unmeasured), label=label,
        timeline={"arrivals": arrivals, "actors": {s: [a["at"] - start_wall for a in registered[s]] for s in STAGES},
                  "calls": timeline},
    )


@dataclass
class _Run:
    summary: object  # the renderer's summary
    arrivals: list[float]  # seconds from the start at which each video arrived
    calls: dict[str, dict]  # stage -> the stand-ins' calls
    cpu_marks: list[tuple[float, tuple[float, float]]]  # (seconds, (this run's CPU seconds, all CPU seconds))
    start_wall: float
    total: float
    spilled: int | None


def _simulated_run(costs, gpus: int, videos: int, *, deployment, payload_bytes, pool_options, time_scale: float,
                   prompts: int | None, dedupe_prompts: bool, object_store_memory: int | None) -> _Run:
    """The simulated render itself, on a local Ray started for it (or the running one), with its marks."""
    from ..config.job import RayOptions
    from ..distributed.cluster import cluster_gpus, connect, disconnect, object_store_stats
    from ..distributed.simulate import simulated_render, stand_in_workers

    def spilled_bytes_total():
        stats = object_store_stats()
        return None if stats is None else stats["spilled"]

    cpus_needed = sum(deployment.stage(s).actors * deployment.stage(s).cpus for s in STAGES)
    started_ray = connect(RayOptions(num_cpus=max(8, math.ceil(cpus_needed) + 4), num_gpus=gpus,
                                     object_store_memory=object_store_memory or 1_000_000_000))
    try:
        available = cluster_gpus()
        if available < gpus:
            raise ValueError(f"the running Ray has {available:g} GPUs; the simulation needs {gpus}")
        workers = stand_in_workers({s: costs.seconds(s) * time_scale for s in STAGES}, payload_bytes, dedupe_prompts)
        spilled_before = spilled_bytes_total()
        arrivals: list[float] = []
        calls: dict[str, dict] = {s: {} for s in STAGES}
        cpu_marks: list[tuple[float, tuple[float, float]]] = []
        start_wall, start = time.time(), time.perf_counter()

        def on_rows(batch):
            now = time.perf_counter() - start
            arrivals.extend([now] * len(batch))
            _calls_of(batch, calls)
            if not cpu_marks or len(arrivals) >= (len(cpu_marks) * max(1, videos // 20)):
                cpu_marks.append((now, cpu_seconds()))

        summary = simulated_render(workers, deployment, videos, prompts=prompts, pool_options=pool_options,
                                   on_rows=on_rows)
        spilled_after = spilled_bytes_total()
    finally:
        if started_ray:
            disconnect()
    spilled = None if spilled_before is None or spilled_after is None else spilled_after - spilled_before
    return _Run(summary, arrivals, calls, cpu_marks, start_wall, time.perf_counter() - start, spilled)


def _rate_after_pools(arrivals: list[float], pools_up: float, videos: int, summary, unmeasured: list[str]) -> float:
    """Videos per second after every pool was up; what makes the figures unmeasured goes to `unmeasured`."""
    after = [t for t in arrivals if t > pools_up]
    if len(after) < videos / 2:
        unmeasured.append(f"only {len(after)} of {videos} videos finished after the pools were up: too few to measure "
                          "(more --videos, or a larger --time-scale)")
    if summary.ok < videos:
        why = "; ".join(summary.first_errors[:2]) or summary.reason or f"the render ended {summary.status}"
        unmeasured.append(f"{videos - summary.ok} video(s) did not finish ok ({why})")
    return len(after) / (after[-1] - pools_up) if after and after[-1] > pools_up else 0.0


def _cpu_during(cpu_marks, window_start: float, window_end: float) -> tuple[float | None, float | None]:
    """Cores used by this run and by other processes in the window (None: unknown, as when processes of
    this run ended meanwhile and took their CPU seconds with them)."""
    inside = [(t, c) for t, c in cpu_marks if window_start <= t <= window_end]
    if len(inside) >= 2 and inside[-1][0] > inside[0][0] and inside[-1][1][0] >= inside[0][1][0]:
        (t0, (ours0, all0)), (t1, (ours1, all1)) = inside[0], inside[-1]
        return (ours1 - ours0) / (t1 - t0), max(0.0, (all1 - all0) - (ours1 - ours0)) / (t1 - t0)
    return None, None
