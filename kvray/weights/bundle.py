"""Load the networks and tokenizer of a `ModelSource`: what every stage calls to get its models."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch
from torch import nn

from ..config.models import DEFAULT_T5_REPO, ModelSource
from ..models.text_encoder import build_tokenizer
from .loader import load_network, random_network
from .quantize import int8_weight_only
from .source import WeightsSource

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def load_model(models: ModelSource, name: str, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """`dtype` torch.int8: weight-only int8 (`quantize.int8_weight_only`), quantized on the CPU before it
    moves to `device`, so that the device never holds the bfloat16 weights."""
    if dtype == torch.int8:
        module = int8_weight_only(_load(models, name, "cpu", torch.bfloat16))
        return module if torch.device(device).type == "cpu" else module.to(device)
    return _load(models, name, device, dtype)


def _load(models: ModelSource, name: str, device, dtype) -> nn.Module:
    config = getattr(models.model_preset, name)
    if models.is_random:
        log.info("%s: random weights (seed %d), not a trained model", name, models.random_seed)
        # One stream per network, so that loading one stage alone gives the same weights.
        seed = zlib.crc32(f"{models.random_seed}:{name}".encode())
        return random_network(name, config, seed=seed, device=device, dtype=dtype)
    source = WeightsSource(models.resolved_weights, cache_dir=models.cache_dir)
    t5 = WeightsSource(models.t5 or DEFAULT_T5_REPO, cache_dir=models.cache_dir) if name == "text_encoder" else None
    return load_network(name, source, config, t5_source=t5, device=device, dtype=dtype)


def load_tokenizer(models: ModelSource):
    """kvray's converted weights may carry the tokenizer; otherwise the preset's (Flan-UL2's for kv11)."""
    if not models.is_random:
        local = Path(models.resolved_weights) / TOKENIZER_DIR
        if local.is_dir():
            return build_tokenizer(str(local))
    return build_tokenizer(models.model_preset.tokenizer, cache_dir=models.cache_dir)
