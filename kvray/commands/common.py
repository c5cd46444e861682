"""What `kvray generate` and `kvray render` both say about the weights before any model loads."""

from __future__ import annotations

import sys


def note_weights(models) -> None:
    """One line on stderr where the weights are not a model of the real world: random, or the shipped toy."""
    if models.is_random:
        print(f"note: preset {models.preset} with random weights (seed {models.random_seed}): expect noise, not scenes",
              file=sys.stderr)
    elif models.is_shipped_toy:
        print("note: the embedded toy model (shipped weights, trained on kvray's procedural world of coloured shapes): "
              "prompts like 'a red circle moves left on a black background'; --preset kv11 for the real model",
              file=sys.stderr)


def check_weights(models) -> None:
    """A weights source that cannot exist (a local path that is not there, and neither a URL nor a hub repo
    id) is one clear error before any model loads (WeightsNotFound, a FileNotFoundError)."""
    from ..weights.source import WeightsSource

    if not models.is_random:
        WeightsSource(models.resolved_weights, cache_dir=models.cache_dir)
        if models.t5:
            WeightsSource(models.t5, cache_dir=models.cache_dir)
