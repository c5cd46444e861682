"""Load the networks and tokenizer of a `ModelSource`: what every stage calls to get its models."""

from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

from ..config.models import DEFAULT_T5_REPO, ModelSource
from ..models.text_encoder import BYT5, SPIECE, build_tokenizer
from .loader import load_network, random_network
from .quantize import int8_weight_only
from .source import WeightsSource

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def load_model(models: ModelSource, name: str, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """`dtype` torch.int8: weight-only int8 (`quantize.int8_weight_only`), quantized on the CPU before it
    moves to `device`, so that the device never holds the bfloat16 weights. The job's LoRA adapters for
    network `name` are merged into its weights before it is quantized."""
    if dtype == torch.int8:
        module = int8_weight_only(_with_adapters(_load(models, name, "cpu", torch.bfloat16), name, models))
        return module if torch.device(device).type == "cpu" else module.to(device)
    return _with_adapters(_load(models, name, device, dtype), name, models)


def _with_adapters(module: nn.Module, name: str, models: ModelSource) -> nn.Module:
    if not any(lora.network in (None, name) for lora in models.loras):
        return module
    from .lora import merge_adapters  # peft loads only where an adapter may target the network

    return merge_adapters(module, name, models)


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
    """The preset's tokenizer. A T5 sentencepiece model (Flan-UL2's `spiece.model` for kv11) is taken from
    kvray's converted weights (`tokenizer/spiece.model`, written by `kvray convert`), else from the T5
    source when one is given, else from the preset's tokenizer repo; hub files through huggingface_hub,
    with the cache directory of `models` (and HF_HUB_OFFLINE honoured)."""
    name = models.model_preset.tokenizer
    if name == BYT5:
        return build_tokenizer(BYT5)
    candidates = [] if models.is_random else [(models.resolved_weights, f"{TOKENIZER_DIR}/{SPIECE}")]
    candidates += [(models.t5, SPIECE)] if models.t5 else []
    for uri, filename in candidates:
        source = WeightsSource(uri, cache_dir=models.cache_dir)
        if source.exists(filename):
            return build_tokenizer(str(source.path(filename)))
    return build_tokenizer(str(WeightsSource(name, cache_dir=models.cache_dir).path(SPIECE)))
