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
    `stage`, `seconds` (per video on a whole GPU, already time-scaled) and `payload_bytes`."""

    stage: str
    seconds: float
    payload_bytes: int = 0

    def __init__(self, job_json: str, registry_name: str, emit_rows: int):
        start = time.perf_counter()
        self.emit_rows = emit_rows
        deployment = json.loads(job_json)["deployment"][self.stage]
        gpus = float(deployment["gpus"])
        # A fraction f of a GPU runs at f of its speed; whole GPUs (memory-bound actors) give no speed-up.
        self.seconds_per_video = self.seconds / gpus if 0 < gpus < 1 else self.seconds
        self.payload = b"\x01" * self.payload_bytes
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.busy = 0.0
        self.registry = ray.get_actor(registry_name)
        self.registry.register.remote(self.stage, self.gpu_ids, os.getpid(), ray.get_runtime_context().get_node_id(),
                                      time.perf_counter() - start)

    def __call__(self, batch):
        batch = self._run(batch)
        for start in range(0, len(batch), self.emit_rows):
            yield batch.iloc[start:start + self.emit_rows]

    def _work_units(self, rows) -> int:
        if self.stage == "text":
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
        self.busy += seconds * len(pending)
        self.registry.count.remote(self.stage)
        done = time.time()
        for i in pending:
            if self.stage == "decode":  # the video goes to storage; only its URI travels on
                batch.at[i, "status"], batch.at[i, "uri"], batch.at[i, "payload"] = OK, f"sim://{batch.at[i, 'video_id']}", b""
            else:
                batch.at[i, "payload"] = self.payload
            batch.at[i, f"seconds_{self.stage}"] = seconds
            gpus = json.loads(batch.at[i, "gpus"])
            gpus[self.stage] = self.gpu_ids
            batch.at[i, "gpus"] = json.dumps(gpus)
            batch.at[i, f"done_{self.stage}"] = done
        return batch


def stand_in_workers(seconds: dict[str, float], payload_bytes: dict[str, int] | None = None) -> dict[str, type]:
    """One stand-in class per stage (Ray Data needs a class per actor pool), carrying its cost."""
    payload_bytes = payload_bytes or {}
    return {
        stage: type(f"Sim{stage.capitalize()}Worker", (SimStageWorker,),
                    {"stage": stage, "seconds": float(seconds[stage]), "payload_bytes": int(payload_bytes.get(stage, 0)),
                     "__module__": __name__})
        for stage in STAGE_NAMES
    }


@ray.remote(num_cpus=0)
class SimRegistry:
    """`kvray.distributed.cluster.StageRegistry`'s interface, with the wall-clock time of each registration."""

    def __init__(self):
        self.actors: dict[str, list[dict]] = {}
        self.model_calls: dict[str, int] = {}

    def register(self, stage, gpu_ids, pid, node, load_seconds):
        self.actors.setdefault(stage, []).append({"gpu_ids": gpu_ids, "pid": pid, "node": node,
                                                  "load_seconds": round(load_seconds, 3), "at": time.time()})

    def count(self, stage, calls=1):
        self.model_calls[stage] = self.model_calls.get(stage, 0) + calls

    def report(self):
        return {"actors": self.actors, "model_calls": self.model_calls}


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def default_payload_bytes(preset: str = "kv11", width: int = 512, height: int = 512, frames: int = 12) -> dict[str, int]:
    """What a video carries out of each stage in the real renderer (safetensors of float32 tensors):
    the text context and mask; plus the keyframe latents; the video latents; nothing after decoding."""
    from ..config import get_preset

    p = get_preset(preset)
    tokens, dim = p.text_encoder.tokens_length, p.text_encoder.context_dim
    text = tokens * dim * 4 + tokens * 1
    keyframes_latents = 12 * 4 * (height // 8) * (width // 8) * 4
    video_latents = frames * 4 * (height // 8) * (width // 8) * 4
    return {"text": text, "keyframes": text + keyframes_latents, "interpolate": video_latents, "decode": 0}


@dataclass
class SimulationResult:
    gpus: int
    videos: int
    bound: float  # videos/s, in the profile's time
    videos_per_second: float  # measured once the pools are up and the first video is out
    startup_seconds: float  # from the start of the run until the pools are up and the first video is out
    pools_up_seconds: float  # until every actor of every pool has started
    first_video_seconds: float
    total_seconds: float  # the whole run, start-up included
    spilled_bytes: int
    time_scale: float
    deployment: dict
    actors: dict[str, int] = field(default_factory=dict)
    actors_started: dict[str, int] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)  # per stage: busy share of its pool while measured
    ok: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        return self.videos_per_second / self.bound if self.bound else 0.0

    @property
    def whole_run_videos_per_second(self) -> float:
        return self.videos / self.total_seconds / self.time_scale if self.total_seconds else 0.0

    @property
    def whole_run_efficiency(self) -> float:
        return self.whole_run_videos_per_second / self.bound if self.bound else 0.0

    def lines(self) -> list[str]:
        s = self.time_scale
        pools = ", ".join(f"{st} {self.actors_started.get(st, 0)}/{n}" for st, n in self.actors.items())
        out = [f"simulated {self.videos} videos on {self.gpus} logical GPUs (time scale {s:g}: reported in the profile's seconds)",
               f"pools: {pools} actors; per stage (actors x GPU, batch): "
               + ", ".join(f"{st} {d['actors']}x{d['gpus']:g} b{d['batch_size']}" for st, d in self.deployment.items()),
               f"start-up: {self.startup_seconds * s:.2f} s (pools up at {self.pools_up_seconds * s:.2f} s, "
               f"first video at {self.first_video_seconds * s:.2f} s)",
               "busy while measured: " + ", ".join(f"{st} {b:.3f}" for st, b in self.busy.items()),
               f"measured: {self.videos_per_second:.4g} videos/s once the pools are up; bound {self.bound:.4g} videos/s",
               f"whole run: {self.total_seconds * s:.2f} s, {self.whole_run_videos_per_second:.4g} videos/s, "
               f"efficiency {self.whole_run_efficiency:.3f} (start-up included)",
               f"object store spilled: {self.spilled_bytes} bytes"]
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"efficiency={self.efficiency:.3f} throughput={self.videos_per_second:.4g} bound={self.bound:.4g}")
        return out


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
    """Rows as `plan_rows` makes them (every column, status pending), plus a completion time per stage."""
    import pandas as pd

    prompts = prompts or videos
    rows = []
    for i in range(videos):
        request = json.dumps({"prompt": f"simulated prompt {i % prompts}", "image": None, "width": 512, "height": 512,
                              "fps": "low", "motion": "medium", "seed": i, "steps": None, "interpolation_steps": None})
        rows.append({"id": f"sim-{i:06d}", "video_id": f"{i:064x}", "status": PENDING, "uri": "", "error": "",
                     "seed": i, "prompt_truncated": False, "request": request,
                     **{f"seconds_{s}": 0.0 for s in STAGE_NAMES}, "gpus": "{}", "payload": b"",
                     **{f"done_{s}": 0.0 for s in STAGE_NAMES}})
    return pd.DataFrame(rows)


def simulate(costs, gpus: int, videos: int, *, deployment=None, plan=None, time_scale: float = 1.0,
             payload_bytes: dict[str, int] | None = None, prompts: int | None = None,
             object_store_memory: int | None = None, stages_fn=None) -> SimulationResult:
    """Runs `videos` simulated videos through the renderer's stage pools on a local Ray with `gpus`
    logical GPUs (or the running Ray, which must have at least `gpus`).

    `deployment` (kvray.config.job.Deployment): the pools; default: `plan` (a planner Plan; default:
    the planner's choice) with suggested batch sizes. `time_scale`: sleep this many seconds per profiled
    second (results are reported in the profile's seconds). `payload_bytes`: bytes per video out of each
    stage (default: the profile's, else none). `prompts`: distinct prompts among the videos (default: all
    distinct). `stages_fn`: replaces `kvray.distributed.render.model_stages` (experiments)."""
    from ..config.job import RenderJob
    from .planner import parse_costs
    from .planner import plan as make_plan
    from .planner import suggest_batch_sizes, to_deployment
    from .render import model_stages

    costs = parse_costs(costs)
    if deployment is None:
        plan = plan or make_plan(costs, gpus)
        deployment = to_deployment(plan, batch_sizes=suggest_batch_sizes(plan, costs, videos=videos))
    if payload_bytes is None:
        payload_bytes = {s: c.output_bytes or 0 for s, c in costs.stages.items()}
    stages_fn = stages_fn or model_stages

    started_ray = False
    if not ray.is_initialized():
        cpus_needed = sum(deployment.stage(s).actors * deployment.stage(s).cpus for s in STAGE_NAMES)
        ray.init(num_cpus=max(8, math.ceil(cpus_needed) + 4), num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False, object_store_memory=object_store_memory or 1_000_000_000)
        started_ray = True
    available = ray.cluster_resources().get("GPU", 0)
    if available < gpus:
        raise ValueError(f"the running Ray has {available:g} GPUs; the simulation needs {gpus}")

    job = RenderJob(manifest="simulated", out="simulated", deployment=deployment)
    workers = stand_in_workers({s: costs.seconds(s) * time_scale for s in STAGE_NAMES}, payload_bytes)
    registry_name = f"kvray-sim-registry-{os.getpid()}-{time.time_ns()}"
    registry = SimRegistry.options(name=registry_name).remote()
    ray.get(registry.report.remote())
    spilled_before = spilled_bytes_total()
    try:
        pending = ray.data.from_pandas(planned_rows(videos, prompts))
        start_wall, start = time.time(), time.perf_counter()
        dataset = stages_fn(pending, videos, job, registry_name, workers=workers)
        arrivals: list[tuple[float, int]] = []
        done_rows = []
        ok = 0
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
            arrivals.append((time.perf_counter() - start, len(batch)))
            ok += int((batch["status"] == OK).sum())
            done_rows.append(batch[[f"done_{s}" for s in STAGE_NAMES]])
        total = time.perf_counter() - start
        report = ray.get(registry.report.remote())
    finally:
        ray.kill(registry)
    spilled_after = spilled_bytes_total()
    spilled = -1 if spilled_before is None or spilled_after is None else spilled_after - spilled_before
    if started_ray:
        ray.shutdown()

    import pandas as pd

    expected = {s: deployment.stage(s).actors for s in STAGE_NAMES}
    registered = {s: report["actors"].get(s, []) for s in STAGE_NAMES}
    notes = []
    if any(len(registered[s]) < n for s, n in expected.items()):
        notes.append("not every actor started: the pools were never all up")
    up_times = [a["at"] for s in STAGE_NAMES for a in registered[s]]
    pools_up = (max(up_times) - start_wall) if up_times else total
    first = arrivals[0][0] if arrivals else total
    measured_from = max(pools_up, first)
    after = sum(n for t, n in arrivals if t > measured_from)
    last = arrivals[-1][0] if arrivals else total
    window = last - measured_from
    rate = after / window / time_scale if window > 0 and after else 0.0
    if after < videos / 2:
        notes.append(f"only {after} of {videos} videos finished after the pools were up: too few to measure")
    done = pd.concat(done_rows) if done_rows else pd.DataFrame()
    busy = {}
    for s in STAGE_NAMES:
        # Busy share of each pool within the measured window (capacity = actors x window).
        d = deployment.stage(s)
        seconds_per_video = costs.seconds(s) * time_scale / (d.gpus if 0 < d.gpus < 1 else 1.0)
        in_window = ((done[f"done_{s}"] - start_wall > measured_from) & (done[f"done_{s}"] - start_wall <= last)).sum() \
            if len(done) else 0
        units = in_window if s != "text" else in_window * (prompts or videos) / videos
        busy[s] = units * seconds_per_video / (d.actors * window) if window > 0 else 0.0
    return SimulationResult(
        gpus=gpus, videos=videos, bound=costs.bound(gpus), videos_per_second=rate, startup_seconds=measured_from,
        pools_up_seconds=pools_up, first_video_seconds=first, total_seconds=total, spilled_bytes=spilled,
        time_scale=time_scale, deployment={s: deployment.stage(s).model_dump() for s in STAGE_NAMES},
        actors=expected, actors_started={s: len(registered[s]) for s in STAGE_NAMES}, busy=busy, ok=ok, notes=notes,
    )
