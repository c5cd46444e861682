"""Joining or starting Ray, and the run's registry of stage actors (GPU ids held, model calls made)."""

from __future__ import annotations

import os
from collections import defaultdict

import ray

from ..config.job import RayOptions


def connect(options: RayOptions) -> bool:
    """Join `options.address`, or start a local Ray (the embedded default). True if this call started Ray."""
    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address, log_to_driver=True)
        return True
    ray.init(
        # Logical CPUs: stage actors ask for fractions of one, and a laptop must still place them all.
        num_cpus=options.num_cpus or max(8, os.cpu_count() or 1),
        num_gpus=options.num_gpus,
        object_store_memory=options.object_store_memory,
        include_dashboard=False,
    )
    return True


@ray.remote(num_cpus=0)
class StageRegistry:
    """Each stage actor reports the GPUs it holds when it starts and counts its model calls."""

    def __init__(self):
        self.actors: dict[str, list[dict]] = defaultdict(list)
        self.model_calls: dict[str, int] = defaultdict(int)

    def register(self, stage: str, gpu_ids: list[str], pid: int, node: str, load_seconds: float) -> None:
        self.actors[stage].append({"gpu_ids": gpu_ids, "pid": pid, "node": node, "load_seconds": round(load_seconds, 3)})

    def count(self, stage: str, calls: int = 1) -> None:
        self.model_calls[stage] += calls

    def report(self) -> dict:
        return {"actors": dict(self.actors), "model_calls": dict(self.model_calls)}
