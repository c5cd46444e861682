"""Joining or starting Ray, and checking that a render's pools fit the cluster before they start."""

from __future__ import annotations

import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config.job import RayOptions, RenderJob
from .priority import keep_workers_at_normal_priority


class ResourceError(ValueError):
    """Pools that the cluster cannot hold: said before anything starts, instead of waiting forever."""


def connect(options: RayOptions, verbose: bool = False) -> bool:
    """Join `options.address`, or start a local Ray (the embedded default). True if this call started
    Ray. Ray's own logs, and its workers' output, reach the terminal only when `verbose`."""
    if ray.is_initialized():
        return False
    from .secrets import redact_command_line, worker_setup_hook

    # Ray records a driver's command line and hands variables to workers in records anyone can read:
    # neither may carry a secret (see secrets.py).
    redact_command_line()
    hook = worker_setup_hook()
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose,
             **({"runtime_env": {"worker_process_setup_hook": hook}} if hook else {})}
    # Ray's notice that token authentication is on comes with every start of a local Ray.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    saved = notice.level
    if not verbose:
        notice.setLevel(logging.ERROR)
    try:
        if options.address:
            ray.init(address=options.address, **quiet)
        else:
            keep_workers_at_normal_priority(os.environ)
            ray.init(
                # Logical CPUs: stage actors ask for fractions of one, and a laptop must still place them all.
                num_cpus=options.num_cpus or max(8, os.cpu_count() or 1),
                num_gpus=options.num_gpus,
                object_store_memory=options.object_store_memory,
                include_dashboard=False,
                **quiet,
            )
    finally:
        notice.setLevel(saved)
    return True


def check_resources(job: RenderJob) -> None:
    """Every actor of every pool fits on some alive node, and all of them together in the cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    totals = {"CPU": sum(n.get("CPU", 0) for n in nodes), "GPU": sum(n.get("GPU", 0) for n in nodes)}
    if job.runtime.device.startswith("cuda") and not totals["GPU"]:
        raise ResourceError(f"device {job.runtime.device!r} asked for, but the cluster has no GPUs")
    pools = job.deployment.actor_pools()
    needs = {name: {"CPU": pool.cpus, "GPU": pool.gpus} for name, pool in pools.items()}
    for name, need in needs.items():
        if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            raise ResourceError(f"a {name} actor needs {need['CPU']:g} CPU and {need['GPU']:g} GPU on one node; "
                                "no node of the cluster has that much")
    for kind in ("CPU", "GPU"):
        wanted = sum(pool.actors * needs[name][kind] for name, pool in pools.items())
        if wanted > totals[kind] + 1e-9:
            per_pool = ", ".join(f"{name} {pool.actors}x{needs[name][kind]:g}" for name, pool in pools.items())
            raise ResourceError(f"the stage pools need {wanted:g} {kind}s ({per_pool}); the cluster has "
                                f"{totals[kind]:g}: lower `actors` or `{kind.lower()}s` in the job's deployment")


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Place an actor on the driver's node when it can (it then survives the loss of any other node)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def disconnect() -> None:
    ray.shutdown()


def object_store_stats() -> dict[str, int] | None:
    """The object store's bytes in use and spilled so far, cluster-wide (None if Ray cannot tell: a
    private API, read for benchmarks only)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
        return {"used": int(stats.object_store_bytes_used), "spilled": int(stats.spilled_bytes_total)}
    except Exception as err:  # a private API: report rather than fail the benchmark
        logging.getLogger(__name__).warning("cannot read the object store's statistics: %s", err)
        return None


def connected() -> bool:
    return ray.is_initialized()
