"""Weights: read official and converted checkpoints safely, load them strictly, convert them.

Names are imported when first used: a driver checks where the weights are (`WeightsSource`) without
loading torch, which only the stage actors need."""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {"CheckpointError": "kvray.weights.checkpoint", "read_checkpoint": "kvray.weights.checkpoint",
            "load_network": "kvray.weights.loader", "random_network": "kvray.weights.loader",
            "DEFAULT_REPO": "kvray.config.models", "DEFAULT_T5_REPO": "kvray.config.models",
            "WeightsNotFound": "kvray.weights.source", "WeightsSource": "kvray.weights.source"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
