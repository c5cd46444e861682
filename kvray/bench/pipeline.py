"""`kvray bench pipeline --simulate`: the renderer's Ray Data plan with stand-in stage actors, and its levers.

`stage_pools` is the renderer's `model_stages` with each throughput lever switchable, so that each can
be measured on its own (`kvray bench pipeline --simulate --lever NAME=off`). With every lever on it is
the plan proposed for `kvray.distributed.render.model_stages`; `--stages renderer` runs the renderer's
own function instead.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Levers:
    """What keeps the bottleneck busy. Each is on by default; `off()` turns one off."""

    # Pools at full size from the start (min = max = initial size); off: autoscale up from one actor.
    full_pools: bool = True
    # Tasks queued per actor: 2 fetches the next batch while the current one computes; off: 1.
    prefetch: bool = True
    # Blocks cut to the next stage's batch size after a stage with larger batches (a streaming
    # repartition); off: a stage's output is one block per call, so one actor of the next pool gets
    # a whole text batch while the others idle.
    split_blocks: bool = True
    # Batch sizes per stage from the planner (calls long enough that Ray's per-call cost is small);
    # off: one video per call everywhere.
    batch_sizes: bool = True
    # Light stages share GPUs (fractions of a GPU); off: every actor holds a whole GPU.
    shared_gpus: bool = True
    # Pools sized by the planner; off: equal pools (a quarter of the GPUs each, whole GPUs).
    planner: bool = True
    # The text encoder runs once per distinct prompt of a batch; off: once per video.
    text_once_per_prompt: bool = True
    # Decoded frames go to storage from the decode actor; off: they travel to the driver in the rows.
    frames_stay_out: bool = True

    def off(self, *names: str) -> Levers:
        unknown = [n for n in names if n not in asdict(self)]
        if unknown:
            raise ValueError(f"unknown lever(s) {', '.join(unknown)}; levers: {', '.join(asdict(self))}")
        return replace(self, **{n: False for n in names})


LEVERS = tuple(asdict(Levers()))


def stage_pools(pending, count: int, job, registry_name: str, workers, levers: Levers = Levers()):
    """`model_stages` with switchable levers (see `Levers`); all on is the proposed renderer plan."""
    import ray

    from ..config.job import STAGES

    job_json = job.model_dump_json()
    widest = max(job.deployment.stage(s).actors * job.deployment.stage(s).batch_size for s in STAGES)
    ds = pending.repartition(min(count, max(1, widest * 2)))
    for index, stage in enumerate(STAGES):
        deployment = job.deployment.stage(stage)
        following = job.deployment.stage(STAGES[index + 1]) if index + 1 < len(STAGES) else deployment
        if levers.full_pools:
            compute = ray.data.ActorPoolStrategy(size=deployment.actors,
                                                 max_tasks_in_flight_per_actor=2 if levers.prefetch else 1)
        else:
            compute = ray.data.ActorPoolStrategy(min_size=1, max_size=deployment.actors,
                                                 max_tasks_in_flight_per_actor=2 if levers.prefetch else 1)
        ds = ds.map_batches(
            workers[stage],
            fn_constructor_kwargs={"job_json": job_json, "registry_name": registry_name,
                                   "emit_rows": following.batch_size},
            batch_format="pandas",
            batch_size=deployment.batch_size,
            compute=compute,
            num_gpus=deployment.gpus,
            num_cpus=deployment.cpus,
        )
        if levers.split_blocks and index + 1 < len(STAGES) and deployment.batch_size > following.batch_size:
            # A call's output is one block: cut it so that every actor of the next pool gets work.
            ds = ds.repartition(target_num_rows_per_block=following.batch_size)
    return ds
