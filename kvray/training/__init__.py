"""`kvray train`: the FusionFrames training recipe over kvray's networks, one resumable step per network.

Names are imported when first used: the command line reads the recipe (`kvray.training.recipe`) without
loading torch."""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {"TrainConfig": "kvray.training.loop", "train": "kvray.training.loop", "STEPS": "kvray.training.steps",
            "NEEDS": "kvray.training.recipe", "RECIPE": "kvray.training.recipe"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
