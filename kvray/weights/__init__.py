"""Weights: read official and converted checkpoints safely, load them strictly, convert them."""

from ..config.models import DEFAULT_REPO, DEFAULT_T5_REPO
from .checkpoint import CheckpointError, read_checkpoint
from .loader import load_network, random_network
from .source import WeightsNotFound, WeightsSource

__all__ = [
    "CheckpointError", "read_checkpoint", "load_network", "random_network",
    "DEFAULT_REPO", "DEFAULT_T5_REPO", "WeightsNotFound", "WeightsSource",
]
