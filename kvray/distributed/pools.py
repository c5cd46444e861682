"""The stage pools of a render: one Ray Data actor pool per stage, in order, over the planned rows, or
one fused pool whose actors run all four stages (`Deployment.pools`; `StagesInOneActor`).

How work reaches the actors. Ray Data hands each actor a bundle of whole blocks, so a pool shares its
work as finely as its input is cut into blocks. Rows with a payload (text contexts, latents: hundreds
of KB to MB at full size) are made one block each by a small target block size (`ROW_BLOCK_BYTES`,
set for the render's execution); planned rows (about 1 KB) come in blocks of about the first pool's
batch (`block_bytes`: the target is lowered to that once a render has seen its first rows). No
repartition runs between the pools: a repartition is a Ray task asking for a whole CPU, which a
cluster whose CPUs the pools hold (or one that lost a node) can never schedule.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import ray

from ..config.job import FUSED, Deployment, RenderJob
from ..config.stages import STAGES
from .shard_writer import ShardWriter

ROW_BLOCK_BYTES = 64 * 1024  # blocks above this size are cut, down to one row
DEEP_QUEUE = 1.2  # a pool fed this many times as fast as it works has work waiting in front of it
# From one call's end to the next call's start Ray takes 0.05-0.2 s (more on busy cores): a call
# shorter than this would lose over 2% of its actor's time to it without a queued call.
SHORT_CALL_S = 10.0


def block_bytes(planned_row_bytes: float, first_batch: int) -> int:
    """A render's target block size: planned rows in blocks of about the first pool's batch, rows with a
    payload above it one per block. Ray Data hands an actor whole blocks: planned rows in blocks of
    `ROW_BLOCK_BYTES` (some tens of rows) would keep one actor of a first pool of batch 1 busy with
    all of them while the pool's other actors wait."""
    return int(max(1, min(ROW_BLOCK_BYTES, planned_row_bytes * first_batch)))


def queued_calls(plan=None, deployment: Deployment | None = None, time_scale: float = 1.0) -> dict[str, int]:
    """Calls queued on each actor of each pool. 2, so that the next batch reaches an actor while the
    current one computes, where the time between calls would cost: in the first pool (its input is all
    there from the start); in a pool that the pools before it feed `DEEP_QUEUE` times as fast as it
    works (per the planner's `plan`); in a pool of one actor; and in a pool whose calls (the
    `deployment`'s batch at the plan's seconds per video, times `time_scale` for a simulation) last under
    `SHORT_CALL_S`. 1 elsewhere: Ray Data hands a queued call to a busy actor, and when the queue in
    front of a pool is short, the video waits there while another actor runs dry (see
    docs/benchmarks.md); a long call loses little to the time from its end to the next call's start."""
    calls = {}
    for index, stage in enumerate(STAGES):
        if index == 0:
            calls[stage] = 2
        elif plan is None:
            calls[stage] = 1
        else:
            feed = min(plan.stages[s].videos_per_second for s in STAGES[:index])
            deep = feed >= DEEP_QUEUE * plan.stages[stage].videos_per_second
            batch = deployment.stage(stage).batch_size if deployment is not None else 1
            call = plan.stages[stage].seconds_per_video * batch * time_scale
            calls[stage] = 2 if deep or call < SHORT_CALL_S or plan.stages[stage].actors == 1 else 1
    return calls


@dataclass(frozen=True)
class PoolOptions:
    """How the stage pools run. The defaults are the renderer's; `kvray bench pipeline` turns each off to
    measure what it is worth."""

    # Every pool at its full size from the start; off: pools grow from one actor as work queues up.
    full_pools: bool = True
    # Per stage, calls queued on each actor (see `queued_calls`).
    tasks_per_actor: dict[str, int] = field(default_factory=queued_calls)
    # Rows with a payload travel one per block (see the module notes); off: Ray Data's default block size.
    small_blocks: bool = True


def model_stages(planned, job: RenderJob, ledger_name: str, workers: dict[str, type],
                 options: PoolOptions = PoolOptions()):
    """The four stage pools, or the fused pool, over the planned rows. `workers`: the stage callables
    (`deferred_workers.DEFERRED_WORKERS`, or the benchmark's stand-ins), constructed with (job_json, ledger_name, emit_rows)."""
    job_json = job.model_dump_json()
    if job.deployment.pools == FUSED:
        kwargs = {"job_json": job_json, "ledger_name": ledger_name, "workers": workers}
        return _shards(_pool(planned, StagesInOneActor, kwargs, job.deployment.fused, options, 2), job, job_json)
    ds = planned
    for index, stage in enumerate(STAGES):
        deployment = job.deployment.stage(stage)
        following = job.deployment.stage(STAGES[index + 1]) if index + 1 < len(STAGES) else deployment
        kwargs = {"job_json": job_json, "ledger_name": ledger_name, "emit_rows": following.batch_size}
        ds = _pool(ds, workers[stage], kwargs, deployment, options, options.tasks_per_actor[stage])
    return _shards(ds, job, job_json)


def _pool(ds, worker: type, kwargs: dict, deployment, options: PoolOptions, tasks_per_actor: int):
    """`ds` through an actor pool of `worker`s (constructed with `kwargs`) as `deployment` sizes it."""
    size = {"size": deployment.actors} if options.full_pools else {"min_size": 1, "max_size": deployment.actors}
    return ds.map_batches(worker, fn_constructor_kwargs=kwargs, batch_format="pandas", batch_size=deployment.batch_size,
                          compute=ray.data.ActorPoolStrategy(**size, max_tasks_in_flight_per_actor=tasks_per_actor),
                          num_gpus=deployment.gpus, num_cpus=deployment.cpus)


def _shards(ds, job: RenderJob, job_json: str):
    """A webdataset job's finished samples through the shard writer; the rows as they are otherwise."""
    if job.dataset.layout != "webdataset":
        return ds
    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"job_json": job_json}, batch_format="pandas",
                          batch_size=job.dataset.shard_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)


class StagesInOneActor:
    """An actor of the fused pool (`Deployment.pools: fused`): the four stage workers in one process, each
    row through all of them in turn. Each worker is the one a pool of its own would hold, on the fused
    pool's resources (its CPUs set the thread count), so rows, their timings, placement and the ledger's
    records are the same as with one pool per stage; only the payloads stay in this process."""

    def __init__(self, job_json: str, ledger_name: str, workers: dict[str, type]):
        job = RenderJob.model_validate_json(job_json)
        fused = job.deployment.fused
        # Every stage on the fused pool's resources, so that each worker's thread count and placement are its own.
        on_fused = job.deployment.model_copy(update=dict.fromkeys(STAGES, fused))
        stage_json = job.model_copy(update={"deployment": on_fused}).model_dump_json()
        self.workers = [workers[stage](stage_json, ledger_name, fused.batch_size) for stage in STAGES]

    def __call__(self, batch):
        for worker in self.workers:
            batch = worker.run(batch)
        yield batch


@contextlib.contextmanager
def execution_context(options: PoolOptions = PoolOptions(), *, verbose: bool = False):
    """Ray Data settings for one render's execution, restored afterwards: the block size, and Ray Data's
    own progress bars and operator logs off unless `verbose` (the render prints its own progress)."""
    context = ray.data.DataContext.get_current()
    saved = (context.target_max_block_size, context.enable_progress_bars, context.enable_operator_progress_bars,
             context.print_on_execution_start)
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    if options.small_blocks:
        context.target_max_block_size = ROW_BLOCK_BYTES
    context.enable_progress_bars = context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:
        data_log.setLevel(logging.ERROR)
    try:
        yield context
    finally:
        (context.target_max_block_size, context.enable_progress_bars, context.enable_operator_progress_bars,
         context.print_on_execution_start) = saved
        data_log.setLevel(saved_level)
