"""The GPU planner: how many actors each stage pool gets and how much of a GPU each actor holds.

The model. Stage i costs `w_i` seconds per video on a whole GPU (a cost profile: `kvray bench stages`).
An actor holding a fraction f <= 1 of a GPU runs at f of the GPU's speed (k actors time-share it), so
a stage's throughput is the GPUs its pool holds divided by `w_i`. On N GPUs no plan beats the bound
N / sum(w_i), reached when every stage holds GPUs in proportion to its cost. What stands in the way
is integrality: a pool has a whole number of actors, all of one size, and Ray places a fraction
below one on a single GPU (the best-fitting one) and a whole number of GPUs on free GPUs. So:

- a stage's actors hold 1/k of a GPU (k = 1..`max_share`; heavy stages come out at k = 1, light
  stages share a GPU with other stages);
- a fraction must leave room: k actors of a stage needing M GiB (plus a CUDA context) fit in one
  GPU of G GiB, so every mix of actors Ray puts on a GPU fits in its memory. An actor that does not
  fit one GPU is refused (`DoesNotFit`): a stage runs its networks on one device, so a second GPU
  would sit idle while the first runs out of memory;
- fractions are multiples of 1e-4 (Ray's fixed point): 1/k is rounded down so that k of them fit;
- the plan must be placeable by Ray in any order its actors start: the placement is replayed with
  Ray's rules (best fit for fractions, free GPUs for whole ones) in several orders, and must fit in all.

The planner maximises the predicted videos/s (the slowest stage's capacity, with every other stage
given a few percent to spare: see `plan`'s `slack`), then takes the fewest actors among the plans
within `tolerance` of it. No Ray: the plan is arithmetic on the profile.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config.costs import CostError, CostProfile, StageCost, parse_costs  # noqa: F401 (inputs)
from ..config.gpus import DEFAULT_CONTEXT_GIB
from ..config.job import FUSED, Deployment, StageDeployment
from ..config.stages import STAGES

UNIT = 10_000  # Ray's resource fixed point: 1e-4
FAMILIES = (2, 3, 5, 7)  # actors per GPU: 1 or f x 2^j for one f per plan (see `_shares`)
DEFAULT_MAX_SHARE = 16  # at most this many actors time-share one GPU
DEFAULT_TOLERANCE = 0.02  # throughput given up for fewer actors (see `plan`)
DEFAULT_SLACK = 0.03  # extra capacity of every stage but the bottleneck (see `plan`)
DEFAULT_CALLS_PER_SECOND = 8.0  # per stage, for suggested batch sizes
DEFAULT_GPU_MEMORY_GIB = 80.0  # a GPU of the size the official model was made for (A100/H100 80 GB)


# ---------------------------------------------------------------------------------------------------------
# Plans


class StagePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: str
    actors: int
    gpus_per_actor: float  # 1/k (rounded down to Ray's 1e-4) or a whole number
    actors_per_gpu: int  # k: how many such actors fit on one GPU (1 for whole GPUs)
    seconds: float  # the profile's cost per video on a whole GPU
    seconds_per_video: float  # on one actor: cost / fraction (a whole-GPU actor: the cost)

    @property
    def gpus(self) -> float:
        return self.actors * self.gpus_per_actor

    @property
    def videos_per_second(self) -> float:
        return self.actors / self.seconds_per_video


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    gpus: int
    gpu_memory_gib: float | None = None
    stages: dict[str, StagePlan]
    bound: float  # N / sum(w_i)
    layout: list[list[str]] = Field(default_factory=list, description="per GPU, the stage of each actor on it")
    method: Literal["planned", "equal"] = "planned"
    notes: list[str] = Field(default_factory=list)

    @property
    def videos_per_second(self) -> float:
        return min(s.videos_per_second for s in self.stages.values())

    @property
    def efficiency(self) -> float:
        return self.videos_per_second / self.bound if self.bound else 0.0

    @property
    def bottleneck(self) -> str:
        return min(self.stages.values(), key=lambda s: s.videos_per_second).stage

    @property
    def used_gpus(self) -> float:
        return sum(s.gpus for s in self.stages.values())

    @property
    def actors(self) -> int:
        return sum(s.actors for s in self.stages.values())

    def lines(self) -> list[str]:
        out = [f"{self.method} plan on {self.gpus} GPU(s)"
               + (f" of {self.gpu_memory_gib:g} GiB" if self.gpu_memory_gib else "")
               + f": {self.actors} actors, {self.used_gpus:.4g} GPUs held"]
        out.append(f"  {'stage':<12}{'actors':>7}{'GPU/actor':>11}{'GPUs':>8}{'s/video':>10}{'videos/s':>10}")
        for s in self.stages.values():
            share = f"1/{s.actors_per_gpu}" if s.actors_per_gpu > 1 else f"{s.gpus_per_actor:g}"
            out.append(f"  {s.stage:<12}{s.actors:>7}{share:>11}{s.gpus:>8.3g}{s.seconds_per_video:>10.4g}"
                       f"{s.videos_per_second:>10.4g}")
        if self.layout:
            out.append("  GPUs: " + "; ".join(f"{n}x[{c}]" for c, n in _layout_groups(self.layout)))
        out.extend(f"  note: {n}" for n in self.notes)
        out.append(f"predicted {self.videos_per_second:.4g} videos/s (bottleneck {self.bottleneck}), "
                   f"bound {self.bound:.4g} videos/s = {self.gpus} GPUs / {sum(s.seconds for s in self.stages.values()):.4g} "
                   f"GPU-s per video, efficiency {self.efficiency:.3f}")
        return out


def _layout_groups(layout: list[list[str]]) -> list[tuple[str, int]]:
    groups: dict[str, int] = {}
    for gpu in layout:
        counts = {s: gpu.count(s) for s in STAGES if s in gpu}
        key = " ".join(f"{n}x{s}" if n > 1 else s for s, n in counts.items()) or "idle"
        groups[key] = groups.get(key, 0) + 1
    return list(groups.items())


class _Option(BaseModel):
    """One way to run a stage: actors of `size` units (1e-4 GPU; a multiple of UNIT for whole GPUs)."""

    model_config = ConfigDict(frozen=True)

    stage: str
    k: int  # actors per GPU (1 for whole GPUs)
    size: int  # units per actor
    speed: float  # videos/s of one actor
    actors: int = 0

    @property
    def usage(self) -> int:
        return self.actors * self.size


class DoesNotFit(ValueError):
    """One actor of a stage needs more memory than a GPU holds; the message says what would fit."""

    def __init__(self, stage: str, cost: StageCost, gpu_memory_gib: float, context_gib: float):
        self.stage, self.need_gib, self.gpu_memory_gib = stage, cost.peak_memory_gib + context_gib, gpu_memory_gib
        options = [f"--dtype {setting} ({gib + context_gib:.1f} GiB"
                   f"{'' if gib + context_gib <= gpu_memory_gib else ', still too much'})"
                   for setting, gib in sorted(cost.alternatives.items(), key=lambda item: -item[1])]
        super().__init__(
            f"plan: one {stage} actor needs {self.need_gib:.1f} GiB ({cost.peak_memory_gib:.1f} GiB peak + "
            f"{context_gib:g} GiB CUDA context), more than a {gpu_memory_gib:g} GiB GPU holds. It fits on GPUs of "
            f"{math.ceil(self.need_gib)} GiB or more (--gpu-memory, --gpu)"
            + (f", or in a smaller precision: {'; '.join(options)}" if options else "") + ".")


def _check_fits(costs: CostProfile, gpu_memory: float | None, context_gib: float) -> None:
    for stage, cost in costs.stages.items():
        if gpu_memory is not None and cost.peak_memory_gib is not None and cost.peak_memory_gib + context_gib > gpu_memory:
            raise DoesNotFit(stage, cost, gpu_memory, context_gib)


def _stage_kinds(stage: str, seconds: float, memory: float | None, gpu_memory: float | None,
                 max_share: int, context_gib: float, family: int) -> list[_Option]:
    """The actor sizes a stage may use: 1/k of a GPU for k = 1 or k in `family` x 1, 2, 4, ... up to
    `max_share` and up to what fits the GPU's memory (one actor fits: `_check_fits`)."""
    need = None if memory is None or gpu_memory is None else memory + context_gib
    top = max_share if need is None else max(1, min(max_share, int(gpu_memory // need)))
    return [_Option(stage=stage, k=k, size=UNIT // k, speed=(UNIT // k) / UNIT / seconds)
            for k in _shares(family, top)]


def _shares(family: int, top: int) -> list[int]:
    """1 and family x 2^j up to `top`: sizes that divide one another (up to Ray's rounding), so that Ray's
    best-fit placement fits them in any order whenever their sum fits."""
    shares, k = [1], family
    while k <= top:
        shares.append(k)
        k *= 2
    return shares


def _place(items: list[tuple[str, int]], gpus: int) -> list[list[str]] | None:
    """Ray's placement on one node: a fraction goes to the best-fitting GPU (least room left, lowest
    index on ties), a whole number of GPUs to the first free ones. None if an actor finds no room."""
    free = [UNIT] * gpus
    held: list[list[str]] = [[] for _ in range(gpus)]
    for stage, size in items:
        if size >= UNIT:
            chosen = [i for i, f in enumerate(free) if f == UNIT][: size // UNIT]
            if len(chosen) < size // UNIT:
                return None
            for i in chosen:
                free[i] = 0
                held[i].append(stage)
            continue
        best = None
        for i, f in enumerate(free):
            if f >= size and (best is None or f - size < free[best] - size):
                best = i
        if best is None:
            return None
        free[best] -= size
        held[best].append(stage)
    return held


def _with_actors(kind: _Option, target: float) -> _Option:
    return kind.model_copy(update={"actors": max(1, math.ceil(target / kind.speed - 1e-9))})


def _fewest_actors(kinds: list[list[_Option]], target: float, gpus: int,
                   max_actors: int | None = None) -> list[_Option] | None:
    """The combination reaching `target` videos/s within `gpus` GPUs (and `max_actors`) with the fewest
    actors, then the fewest GPUs held; None if none fits. A few sizes per stage: at most some thousand
    combinations."""
    per_stage = [[_with_actors(kind, target) for kind in stage_kinds] for stage_kinds in kinds]
    room, cap = gpus * UNIT, max_actors or math.inf
    best, best_key = None, None
    for combo in itertools.product(*per_stage):
        usage = sum(o.usage for o in combo)
        actors = sum(o.actors for o in combo)
        if usage <= room and actors <= cap and (best_key is None or (actors, usage) < best_key):
            best, best_key = combo, (actors, usage)
    return list(best) if best is not None else None


def _fits(kinds: list[list[_Option]], target: float, gpus: int, max_actors: int | None = None) -> bool:
    if max_actors is None:  # the fewest GPUs per stage, independently
        return sum(min(_with_actors(k, target).usage for k in ks) for ks in kinds) <= gpus * UNIT
    return _fewest_actors(kinds, target, gpus, max_actors) is not None


def _highest(kinds: list[list[_Option]], gpus: int, max_actors: int | None = None) -> float:
    """The highest throughput these sizes reach on `gpus` GPUs with at most `max_actors` actors (0 if not
    even one actor per stage fits). It is one that some stage reaches exactly (a actors of one size);
    whether a target fits only gets harder as it rises, so a binary search over those finds it."""
    if not _fits(kinds, 0.0, gpus, max_actors):
        return 0.0
    candidates = sorted({a * k.speed for ks in kinds for k in ks for a in range(1, gpus * UNIT // k.size + 1)})
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if _fits(kinds, candidates[middle], gpus, max_actors):
            low = middle
        else:
            high = middle - 1
    return candidates[low]


def _with_slack(kinds: list[list[_Option]], bottleneck: int, slack: float) -> list[list[_Option]]:
    """The sizes with every stage but `bottleneck` (1 + `slack`) times as slow: a plan that reaches a
    throughput T with them gives those stages T (1 + slack) in truth."""
    return [ks if i == bottleneck else [k.model_copy(update={"speed": k.speed / (1.0 + slack)}) for k in ks]
            for i, ks in enumerate(kinds)]


def slack_rate(capacities: list[float], slack: float) -> float:
    """The throughput a plan is credited with: its slowest stage's videos/s, but no more than the second
    slowest's over (1 + slack)."""
    low, second = sorted(capacities)[:2]
    return min(low, second / (1.0 + slack))


def plan(costs: CostProfile | str, gpus: int, gpu_memory_gib: float | None = None, *,
         max_share: int = DEFAULT_MAX_SHARE, context_gib: float = DEFAULT_CONTEXT_GIB,
         tolerance: float = DEFAULT_TOLERANCE, slack: float = DEFAULT_SLACK, max_actors: int | None = None) -> Plan:
    """The plan with the fewest actors among those within `tolerance` of the highest throughput on
    `gpus` GPUs, a plan's throughput counted as in `slack_rate`.

    `gpu_memory_gib`: memory of one GPU (default: the profile's device memory); with the profile's peak
    memory per stage, it caps how many actors of a stage share a GPU. `max_share`: at most this many
    actors on one GPU (a power of two). `tolerance`: the throughput given up for fewer actors (each
    actor is a process holding its own copy of the weights); 0 maximises throughput alone. `slack`:
    the extra capacity every stage but the bottleneck gets. A stage that ties with the bottleneck
    hands it work just in time, never ahead: no queue forms in front of it, and a video handed to a
    busy actor (Ray Data queues two calls per actor) waits there while another actor runs dry; with a
    few percent to spare a queue forms and the loss is gone (docs/benchmarks.md, "What each lever was
    worth"). 0: the highest throughput predicted by the model alone."""
    costs = parse_costs(costs)
    if gpus < 1:
        raise ValueError(f"plan: at least one GPU is needed, got {gpus}")
    gpu_memory = gpu_memory_gib if gpu_memory_gib is not None else costs.device_memory_gib
    notes = []
    if gpu_memory is None and any(costs.memory(s) for s in STAGES):
        notes.append("no GPU memory given (--gpu-memory): sharing not checked against memory")
    if gpu_memory is not None and not all(costs.memory(s) for s in STAGES):
        notes.append("the profile lacks peak memory for some stages: their sharing is not checked")
    _check_fits(costs, gpu_memory, context_gib)
    families = [[_stage_kinds(s, costs.seconds(s), costs.memory(s), gpu_memory, max_share, context_gib, f)
                 for s in STAGES] for f in FAMILIES]
    if not _fits(families[0], 0.0, gpus, max_actors):
        raise ValueError(f"plan: {gpus} GPU(s) cannot hold one actor of every stage"
                         + (f" with at most {max_actors} actors" if max_actors else ""))
    # Every family of sizes with every stage as the bottleneck: the highest throughput any reaches,
    # then the fewest actors within `tolerance` of it.
    searches = [_with_slack(kinds, b, slack) for kinds in families for b in range(len(STAGES))]
    best = max(_highest(kinds, gpus, max_actors) for kinds in searches)
    target = best * (1.0 - tolerance)
    options = [c for c in (_fewest_actors(kinds, target, gpus, max_actors) for kinds in searches) if c]
    chosen = min(options, key=lambda c: (sum(o.actors for o in c), -min(o.actors * o.speed for o in c)))
    layout = _place([(o.stage, o.size) for o in chosen for _ in range(o.actors)], gpus)
    assert layout is not None, "sizes of one family always place"
    stages = {}
    for o in chosen:
        fraction = o.size / UNIT
        stages[o.stage] = StagePlan(stage=o.stage, actors=o.actors, gpus_per_actor=fraction, actors_per_gpu=o.k,
                                    seconds=costs.seconds(o.stage), seconds_per_video=costs.seconds(o.stage) / fraction)
    return Plan(gpus=gpus, gpu_memory_gib=gpu_memory, stages=stages, bound=costs.bound(gpus), layout=layout,
                notes=notes)


def equal_plan(costs: CostProfile | str, gpus: int) -> Plan:
    """The naive baseline: every stage the same number of whole-GPU actors (a quarter of the GPUs each)."""
    costs = parse_costs(costs)
    per_stage = gpus // len(STAGES)
    if per_stage < 1:
        raise ValueError(f"equal pools need at least {len(STAGES)} GPUs, got {gpus}")
    stages = {s: StagePlan(stage=s, actors=per_stage, gpus_per_actor=1.0, actors_per_gpu=1, seconds=costs.seconds(s),
                           seconds_per_video=costs.seconds(s)) for s in STAGES}
    layout = [[s] for s in STAGES for _ in range(per_stage)] + [[] for _ in range(gpus - per_stage * len(STAGES))]
    return Plan(gpus=gpus, stages=stages, bound=costs.bound(gpus), layout=layout, method="equal")


# ---------------------------------------------------------------------------------------------------------
# Deployments


def suggest_batch_sizes(plan_: Plan, costs: CostProfile | str | None = None, *, videos: int | None = None,
                        calls_per_second: float = DEFAULT_CALLS_PER_SECOND, max_batch: int = 16,
                        calls_per_actor: int = 8) -> dict[str, int]:
    """Videos per call for each stage. The profile's measured batch size where it has one (its cost and
    memory were measured at it). Otherwise enough videos per call that no stage makes more than
    `calls_per_second` calls at the plan's throughput (each call costs Ray some milliseconds of CPU and a
    round trip), at least the job's default for the text stage (larger text batches encode repeated
    prompts once), but no more than leave each actor `calls_per_actor` calls over `videos`: the actors
    of a pool start together, and a few long calls each would move in lockstep, in bursts that starve
    the next pool."""
    costs = parse_costs(costs) if costs is not None else None
    sizes = {}
    for s, stage in plan_.stages.items():
        measured = costs.stages[s].batch_size if costs is not None else None
        if measured:
            sizes[s] = measured
            continue
        size = max(math.ceil(plan_.videos_per_second / calls_per_second - 1e-9), Deployment().stage(s).batch_size)
        if videos:
            size = min(size, videos // (calls_per_actor * stage.actors))
        sizes[s] = max(1, min(max_batch, size))
    return sizes


def to_deployment(plan_: Plan, batch_sizes: dict[str, int] | None = None, cpus: dict[str, float] | float | None = None,
                  base=None):
    """The plan as a `kvray.config.job.Deployment`: actors and GPUs from the plan; batch sizes and CPUs from
    the arguments, else from `base` (a Deployment), else the defaults."""
    base = base or Deployment()
    stages = {}
    for s, stage in plan_.stages.items():
        old = base.stage(s)
        stage_cpus = cpus.get(s, old.cpus) if isinstance(cpus, dict) else (old.cpus if cpus is None else cpus)
        stages[s] = StageDeployment(actors=stage.actors, gpus=stage.gpus_per_actor, cpus=stage_cpus,
                                    batch_size=(batch_sizes or {}).get(s, old.batch_size))
    return Deployment(**stages)


def deployment_fixes_pools(deployment) -> bool:
    """True if the job sets any stage's `actors` or `gpus` itself (then the planner keeps out)."""
    return any({"actors", "gpus"} & deployment.stage(s).model_fields_set for s in STAGES)


def has_cost_profile(job) -> bool:
    """A job with costs to plan by: its own `costs`, or the kv11 preset (estimated; see `job_costs`)."""
    return job.costs is not None or job.models.preset == "kv11"


def job_costs(job) -> CostProfile | None:
    """The cost profile a job is planned with: its `costs`, or for the kv11 preset the one estimated for
    its default request on its `gpu` (`kvray.sizing.estimate.job_profile`); None for other presets."""
    if job.costs is not None:
        return parse_costs(job.costs)
    if not has_cost_profile(job):
        return None
    from ..sizing.estimate import job_profile

    return job_profile(job)


def plan_job(job, gpus: int, rows: int | None = None):
    """The job a render runs, and the plan behind its pools (None: the job's own deployment): the pools
    sized (`_plan_pools`) for `rows` rows to render (None: as many as it takes), then a first stage on
    CPUs given one row per call (`text_rows_one_at_a_time`)."""
    job, chosen = _plan_pools(job, gpus, rows)
    return text_rows_one_at_a_time(job), chosen


def text_rows_one_at_a_time(job):
    """A text stage without GPUs takes one row per call, unless the job sets its batch. Batching saves
    nothing there (the encoder is a sliver of a video's CPU time) and costs the first videos their
    latency: Ray Data hands a call's output on when the call ends, and rows with small payloads (the toy's,
    tiny's) share blocks, so a keyframes call took two rows and the first waited for the second (the
    example's first mp4 came at 37 s, at 30 s with single rows)."""
    text = job.deployment.stage(STAGES[0])
    # The default deployment's text batch is not in its fields set; a job's own text stage is.
    if text.gpus or STAGES[0] in job.deployment.model_fields_set or text.batch_size == 1:
        return job
    single = text.model_copy(update={"batch_size": 1})
    return job.model_copy(update={"deployment": job.deployment.model_copy(update={STAGES[0]: single})})


def _plan_pools(job, gpus: int, rows: int | None):
    """The job with its pools sized, and the plan behind them (None: the job's own deployment). The planner
    sizes the pools when the job fixes none of them, the cluster has GPUs and there is a cost profile
    (`job_costs`). A job of few rows gets at most one actor per row (and one per stage at least): each
    actor loads the weights, which for a handful of videos costs more than the parallelism gains. Batch
    sizes: the job's where it sets them, else the profile's (its costs were measured or estimated at
    them). Raises `DoesNotFit` when a stage's actor does not fit a GPU."""
    if gpus < 1 or deployment_fixes_pools(job.deployment):
        return job, None
    costs = job_costs(job)
    if costs is None:
        return job, None
    memory = job.gpu_memory_gib or costs.device_memory_gib or DEFAULT_GPU_MEMORY_GIB
    chosen = plan(costs, gpus, memory, max_actors=None if rows is None else max(len(STAGES), rows))
    measured = {s: c.batch_size for s, c in costs.stages.items()
                if c.batch_size and "batch_size" not in job.deployment.stage(s).model_fields_set}
    return job.model_copy(update={"deployment": to_deployment(chosen, batch_sizes=measured, base=job.deployment)}), chosen


def plan_summary(p: Plan) -> dict:
    """A JSON-friendly record of a plan (run records, `kvray plan --json`)."""
    return json.loads(json.dumps({
        "method": p.method, "gpus": p.gpus, "gpu_memory_gib": p.gpu_memory_gib,
        "videos_per_second": p.videos_per_second, "bound": p.bound, "efficiency": p.efficiency,
        "bottleneck": p.bottleneck, "notes": p.notes,
        "stages": {s: {"actors": x.actors, "gpus_per_actor": x.gpus_per_actor, "actors_per_gpu": x.actors_per_gpu,
                       "seconds": x.seconds, "videos_per_second": x.videos_per_second} for s, x in p.stages.items()},
        "layout": p.layout,
    }))


def resolve_pools(job, rows: int, cores: int | None = None):
    """The job as written with its `auto` pools decided (`Deployment`), before the planner sees it. Fused
    when the pools run on CPUs (no stage asks for a GPU, the device is not CUDA, and there is no cost
    profile to plan GPUs by), the job sets nothing of any stage and the preset is small (kv11's networks,
    tens of GB, would be loaded once per actor; kv11 always has a profile); the fused pool then has one
    actor per core of this machine, at most one per row (`rows`), unless the job sets its `actors`. Else
    one pool per stage. Measured on the example (2 cores, docs/benchmarks.md): the first mp4 and the
    whole render both came sooner fused."""
    deployment = job.deployment
    if deployment.pools != "auto":
        return job
    # A stage the job writes is in the deployment's fields set (the default text batch is not).
    sets_a_stage = any(s in deployment.model_fields_set for s in STAGES)
    if sets_a_stage or job.runtime.device.startswith("cuda") or has_cost_profile(job):
        return job.model_copy(update={"deployment": deployment.model_copy(update={"pools": "stages"})})
    fused = deployment.fused
    if "actors" not in fused.model_fields_set:
        cores = cores or len(os.sched_getaffinity(0))
        fused = fused.model_copy(update={"actors": max(1, min(cores, rows))})
    return job.model_copy(update={"deployment": deployment.model_copy(update={"pools": FUSED, "fused": fused})})
