"""`kvray train STEP --workers N`: a training step data-parallel on Ray Train.

Each of N workers (`TorchTrainer`; gloo on CPUs, NCCL on GPUs) runs the recipe's loop
(`kvray.training.loop.train`) as one rank: its batches from its own stream, so the global batch is N
times the per-worker batch; before each optimiser step the gradients are averaged over the group, in one
all-reduce of a flat buffer. Not torch's DDP wrapper: a step calls its networks through methods other than
`forward` (the MoVQ's `encode` and `decode`) and may leave some parameters unused on one rank and not
another (a batch of image mode on one, of video mode on the other), which DDP's reducer does not allow.

Checkpoints (rank 0's) go through Ray Train to `--storage` (a local path or any fsspec URI, s3:// too),
one directory per checkpoint named by its step. A killed worker restarts the group from the last
checkpoint (up to `max_failures` times); a killed driver, run again with the same command, resumes from
the newest checkpoint in storage. Either way each rank continues with the batches it would have drawn.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import fsspec
import ray
import torch
import torch.distributed as dist
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..config.job import RayOptions
from ..training.loop import TrainConfig, train
from ..training.run import CHECKPOINT, LocalRun
from .cluster import connect

CHECKPOINT_PREFIX = "checkpoint-"
RANKS_DIR = "ranks"  # WORK/STEP/ranks/{rank}.json: which process and node each rank is (operations, tests)


class RayTrainRun(LocalRun):
    """One rank of a Ray Train worker group."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        ranks = Path(folder) / RANKS_DIR
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"{self.rank}.json").write_text(json.dumps({"pid": os.getpid(), "node": socket.gethostname()}))

    def restore(self, device: torch.device) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / CHECKPOINT, map_location=device, weights_only=True)

    def report(self, metrics: dict, checkpoint=None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(checkpoint(), Path(folder) / CHECKPOINT)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{metrics['step']:09d}")

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        average_gradients(params)

    def mean(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Each parameter's gradient averaged over the default process group, in one all-reduce. A parameter this
    rank did not use counts as a zero gradient: every rank reduces a buffer of the same layout."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset: offset + grad.numel()].view_as(grad)
        offset += grad.numel()


def _worker(loop_config: dict) -> None:
    config = TrainConfig(**loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    run = RayTrainRun(Path(config.work) / config.step)
    train(config, progress=lambda line: print(line, file=sys.stderr, flush=True), run=run)


def storage_for(uri: str, storage_options: dict | None = None) -> tuple[str, PyFileSystem]:
    """(path, pyarrow filesystem) of any fsspec URI, as Ray Train takes its storage."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return root, PyFileSystem(FSSpecHandler(fs))


def latest_checkpoint(storage: str, name: str, storage_options: dict | None = None) -> Checkpoint | None:
    """The newest checkpoint a run of `name` left in `storage` (a driver killed before the end)."""
    fs, root = fsspec.core.url_to_fs(storage, **(storage_options or {}))
    folders = sorted(p for p in fs.glob(f"{root.rstrip('/')}/{name}/{CHECKPOINT_PREFIX}*")
                     if fs.exists(f"{p}/{CHECKPOINT}"))
    if not folders:
        return None
    return Checkpoint(folders[-1], filesystem=PyFileSystem(FSSpecHandler(fs)))


def train_on_ray(config: TrainConfig, *, workers: int, gpus_per_worker: float = 0.0, cpus_per_worker: int = 1,
                 address: str | None = None, storage: str | None = None, storage_options: dict | None = None,
                 max_failures: int = 3, verbose: bool = False) -> dict:
    """Runs `config`'s step on `workers` Ray Train workers; returns {"checkpoint": URI, "metrics": ...}.
    `storage` (default WORK/ray): where Ray Train keeps the run's checkpoints."""
    # Workers need not share the driver's working directory.
    config = config.model_copy(update={"work": str(Path(config.work).resolve())})
    storage = storage or f"{config.work}/ray"
    connect(RayOptions(address=address), verbose=verbose)
    name = f"kvray-train-{config.step}"
    path, filesystem = storage_for(storage, storage_options)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config.model_dump(), "threads": cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        resume_from_checkpoint=latest_checkpoint(storage, name, storage_options),
    )
    result = trainer.fit()
    return {"checkpoint": result.checkpoint.path if result.checkpoint else None, "metrics": result.metrics}
