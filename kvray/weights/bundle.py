"""A preset plus where its weights come from: what every stage needs to load its networks."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..config import ModelPreset, get_preset
from ..models.text_encoder import build_tokenizer
from .loader import load_network, random_network
from .source import DEFAULT_REPO, DEFAULT_T5_REPO, WeightsSource

log = logging.getLogger(__name__)

RANDOM = "random"
TOKENIZER_DIR = "tokenizer"


class ModelSource(BaseModel):
    """`weights`: a weights source (see `WeightsSource`), "random" for seeded random weights (tests,
    timing: the compute is the same), or None for the preset's default: the official hub repo, or
    random weights for the tiny preset, which has no published weights.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
    weights: str | None = None
    t5: str | None = None  # the T5 encoder of official files (default google/flan-ul2)
    cache_dir: str | None = None
    random_seed: int = 0

    @property
    def model_preset(self) -> ModelPreset:
        return get_preset(self.preset)

    @property
    def resolved_weights(self) -> str:
        if self.weights is not None:
            return self.weights
        return RANDOM if self.preset == "tiny" else DEFAULT_REPO

    @property
    def is_random(self) -> bool:
        return self.resolved_weights == RANDOM

    @property
    def version(self) -> str:
        """Names the weights in output records and in video ids: other weights, other videos."""
        weights = f"random-{self.random_seed}" if self.is_random else self.resolved_weights
        return f"kandinsky-video-1.1/{self.preset}/{weights}"

    def load(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
        config = getattr(self.model_preset, name)
        if self.is_random:
            log.info("%s: random weights (seed %d), not a trained model", name, self.random_seed)
            # One stream per network, so that loading one stage alone gives the same weights.
            seed = zlib.crc32(f"{self.random_seed}:{name}".encode())
            return random_network(name, config, seed=seed, device=device, dtype=dtype)
        source = WeightsSource(self.resolved_weights, cache_dir=self.cache_dir)
        t5 = WeightsSource(self.t5 or DEFAULT_T5_REPO, cache_dir=self.cache_dir) if name == "text_encoder" else None
        return load_network(name, source, config, t5_source=t5, device=device, dtype=dtype)

    def tokenizer(self):
        """kvray's converted weights may carry the tokenizer; otherwise the preset's (Flan-UL2's for kv11)."""
        if not self.is_random:
            local = Path(self.resolved_weights) / TOKENIZER_DIR
            if local.is_dir():
                return build_tokenizer(str(local))
        return build_tokenizer(self.model_preset.tokenizer, cache_dir=self.cache_dir)
