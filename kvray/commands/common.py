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
    for lora in models.loras:
        print(f"note: LoRA adapter {lora.path} merged at scale {lora.scale:g}", file=sys.stderr)


def checked_models(models):
    """`models`, checked before any model loads, with its adapters' digests filled in
    (`resolve_adapters`): a weights source that cannot exist (a local path that is not there, and neither a
    URL nor a hub repo id) is one clear error (WeightsNotFound, a FileNotFoundError), and so is an adapter
    that is missing or does not fit the preset (AdapterError, a ValueError)."""
    from ..weights.adapters import resolve_adapters
    from ..weights.source import WeightsSource

    if not models.is_random:
        WeightsSource(models.resolved_weights, cache_dir=models.cache_dir)
        if models.t5:
            WeightsSource(models.t5, cache_dir=models.cache_dir)
    return resolve_adapters(models)
