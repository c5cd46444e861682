"""`kvray train`: the FusionFrames training recipe over kvray's networks, one resumable step per network."""

from .loop import TrainConfig, train
from .steps import NEEDS, STEPS

__all__ = ["NEEDS", "STEPS", "TrainConfig", "train"]
