"""Training batches from the toy world: pixels as the networks' inputs, text as the encoder's tokens.

A batch is a pure function of (seed, step): a resumed run continues with exactly the data it would
have seen, and two runs with one seed see the same clips.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from ..toyworld import (
    Clip,
    concept_held_out_combos,
    concept_training_combos,
    held_out_combos,
    render,
    sample_clips,
)


def batch_seed(seed: int, stream: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{stream}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_model_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], as `image_to_tensor` feeds the MoVQ."""
    pixels = torch.from_numpy(frames).to(torch.float32) / 127.5 - 1
    return rearrange(pixels, "... h w c -> ... c h w")


@dataclass(frozen=True)
class ToyData:
    """Where a step's clips come from. `validation` draws from the held-out combinations instead.

    `concept` (a `CONCEPT_SHAPES` name, for a LoRA): that share of each batch shows the concept, the
    rest the world the base model knows, so that what it knew is rehearsed while the concept is learnt."""

    seed: int = 0
    size: int = 64  # the video's side in pixels (the first frame is drawn at twice that)
    concept: str | None = None
    concept_share: float = 0.5
    stream_suffix: str = ""  # a data-parallel rank's own share of the batches (`LocalRun.data_stream`)

    def clips(self, stream: str, step: int, count: int, validation: bool = False) -> list[Clip]:
        # Validation is one fixed batch, the same on every rank.
        seed = batch_seed(self.seed, stream + ("/validation" if validation else self.stream_suffix), step)
        known = held_out_combos() if validation else None
        if self.concept is None:
            return sample_clips(seed, count, known)
        concept = concept_held_out_combos(self.concept) if validation else concept_training_combos(self.concept)
        shown = max(1, round(count * self.concept_share))
        return sample_clips(seed, shown, concept) + sample_clips(seed + 1, count - shown, known)

    def frames(self, clips: list[Clip], num_frames: int, size: int | None = None, indices=None) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1]."""
        side = size or self.size
        return torch.stack([to_model_pixels(render(c.scene, num_frames, side, indices)) for c in clips])

    def generator(self, stream: str, step: int, validation: bool = False) -> torch.Generator:
        suffix = "" if validation else self.stream_suffix
        return torch.Generator().manual_seed(batch_seed(self.seed, stream + suffix + "/noise", step))
