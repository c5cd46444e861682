"""How a training run keeps its checkpoints and shares its steps between processes.

`LocalRun` is one process: its checkpoint is `WORK/STEP/checkpoint.pt`, written atomically. A data-parallel
run (`kvray.distributed.train_ray`) is one rank of a group: the same loop, with each rank's batches drawn
from its own stream (`data_stream`), the gradients averaged over the group before each optimiser step,
and its checkpoints kept by Ray Train.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


class LocalRun:
    rank = 0
    world = 1

    def __init__(self, folder: Path):
        self.path = Path(folder) / CHECKPOINT

    @property
    def chief(self) -> bool:
        """The rank that writes the loss log, the exports and the checkpoints."""
        return self.rank == 0

    @property
    def data_stream(self) -> str:
        """Appended to every batch stream: a lone process draws the recipe's batches; each rank of a group
        its own share (a batch is still a function of (seed, step), so a resumed rank sees the same data)."""
        return "" if self.world == 1 else f"/rank-{self.rank}-of-{self.world}"

    def restore(self, device: torch.device) -> dict | None:
        return torch.load(self.path, map_location=device, weights_only=True) if self.path.exists() else None

    def report(self, metrics: dict, checkpoint: Callable[[], dict] | None = None) -> None:
        """`metrics` of the step just done; `checkpoint()` builds the state to keep, when one is due."""
        if checkpoint is not None:
            tmp = self.path.with_suffix(".tmp")
            torch.save(checkpoint(), tmp)
            tmp.replace(self.path)  # a kill mid-write leaves the previous checkpoint whole

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Nothing to average in one process."""

    def mean(self, value: float) -> float:
        return value
