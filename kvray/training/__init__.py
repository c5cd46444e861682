"""`kvray train`: the FusionFrames training recipe over kvray's networks, one resumable step per network.

Names are imported when first used: the command line reads the recipe (`kvray.training.recipe`) without
loading torch."""

from __future__ import annotations

import importlib

_EXPORTS = {"TrainConfig": "kvray.training.loop", "train": "kvray.training.loop", "STEPS": "kvray.training.steps",
            "NEEDS": "kvray.training.recipe", "RECIPE": "kvray.training.recipe"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvray.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
