"""LoRA adapters as files: what an adapter directory holds, and the check of a job's adapters before any
network loads (torch-free, like `WeightsSource`: a render's driver runs it).

An adapter directory holds peft's two files for one network (`adapter_config.json`,
`adapter_model.safetensors`) and `kvray_adapter.json`: the network and preset it was trained for, and the
digest of its tensors, which names it in video ids. `kvray.weights.lora` writes and merges them.
"""

from __future__ import annotations

import json

from ..config.models import LoraSpec, ModelSource
from ..config.runtime import NETWORKS
from .source import WeightsSource

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "kvray_adapter.json"


class AdapterError(ValueError):
    """An adapter that does not fit the job's model: another preset, an unknown network, or missing files."""


def read_info(source: WeightsSource) -> dict:
    """The adapter's `kvray_adapter.json`: {"network", "preset", "digest", "rank", ...}."""
    if not source.exists(ADAPTER_INFO):
        raise AdapterError(f"{source.uri} is not a kvray LoRA adapter: no {ADAPTER_INFO} (make one with `kvray train lora`)")
    return json.loads(source.path(ADAPTER_INFO).read_text())


def checked_info(spec: LoraSpec, models: ModelSource) -> dict:
    """The adapter's info, after checking that it was trained for `models`' preset and a network it has."""
    info = read_info(WeightsSource(spec.path, cache_dir=models.cache_dir))
    if info.get("preset") != models.preset:
        raise AdapterError(f"adapter {spec.path} was trained for preset {info.get('preset')!r}, not {models.preset!r}")
    if info.get("network") not in NETWORKS:
        raise AdapterError(f"adapter {spec.path} targets {info.get('network')!r}, not one of {', '.join(NETWORKS)}")
    if (spec.digest, spec.network) != (None, None) and (spec.digest, spec.network) != (info["digest"], info["network"]):
        raise AdapterError(f"adapter {spec.path} changed since the job was checked: digest {info['digest']} for "
                           f"{info['network']}, expected {spec.digest} for {spec.network} (its videos would be named "
                           "after the other one)")
    return info


def resolve_adapters(models: ModelSource) -> ModelSource:
    """`models` with each adapter's digest and network read from its files (and checked against the preset):
    the digest names the adapters in `models.version`, so every video made with them."""
    if not models.loras:
        return models
    loras = []
    for spec in models.loras:
        info = checked_info(spec, models)
        loras.append(spec.model_copy(update={"digest": info["digest"], "network": info["network"]}))
    return models.model_copy(update={"loras": tuple(loras)})
