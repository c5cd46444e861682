"""The networks of Kandinsky Video 1.1: how each is built, and where its official weights live.

Our modules mirror the official module names, so the key map from an official file is the
identity except where the official file wraps the state dict (the U-Nets' `{'unet', 'null_embedding'}`,
the projections' nested dicts, the T5 encoder inside a whole transformers checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelPreset
from ..config.arch import ArchConfig, InterpolationUNetConfig, KeyframeUNetConfig, MoVQConfig, TextEncoderConfig
from ..models.interpolator import InterpolationUNet
from ..models.movq import MoVQ
from ..models.text_encoder import TextConditionEncoder, official_state_dict_to_ours
from ..models.unet3d import KeyframeUNet
from .checkpoint import CheckpointError, read_checkpoint
from .source import WeightsNotFound, WeightsSource

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Network:
    name: str  # our name: the preset field and the stem of converted files
    config_type: type[ArchConfig]
    build: Callable[[ArchConfig], nn.Module]
    official_file: str  # the file in the official hub repo


def _unet_file(raw: dict, network: str) -> tuple[State, State]:
    """`{'unet': state_dict, 'null_embedding': tensor}`, as `t2v.pt` and `interpolation.pt` store them."""
    if not isinstance(raw, dict) or "unet" not in raw or "null_embedding" not in raw:
        keys = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{network}: expected a dict with 'unet' and 'null_embedding', got {keys}")
    return dict(raw["unet"]), {"null_embedding": raw["null_embedding"]}


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("text_encoder", TextEncoderConfig, TextConditionEncoder, "t5_projections.pt"),
        Network("keyframe_unet", KeyframeUNetConfig, KeyframeUNet, "t2v.pt"),
        Network("interpolation_unet", InterpolationUNetConfig, InterpolationUNet, "interpolation.pt"),
        Network("image_movq", MoVQConfig, MoVQ, "movq.pt"),
        Network("video_movq", MoVQConfig, MoVQ, "video_movq.pt"),
    )
}


def get_network(name: str) -> Network:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}") from None


def converted_names(name: str) -> tuple[str, str]:
    """kvray's own format: `<name>.safetensors` (extras such as `null_embedding` inside) + `<name>.json`."""
    return f"{name}.safetensors", f"{name}.json"


def read_converted(source: WeightsSource, name: str) -> tuple[ArchConfig, State, State] | None:
    weights_file, arch_file = converted_names(name)
    if not (source.exists(weights_file) and source.exists(arch_file)):
        return None
    network = get_network(name)
    arch = json.loads(source.path(arch_file).read_text())
    config = network.config_type.model_validate(arch["config"])
    state = read_checkpoint(source.path(weights_file))
    extras = {k: state.pop(k) for k in ("null_embedding",) if k in state}
    return config, state, extras


def read_official(source: WeightsSource, name: str, t5_source: WeightsSource | None = None) -> tuple[State, State]:
    """The state dict (our layout) and extras of one network from the official files."""
    network = get_network(name)
    raw = read_checkpoint(source.path(network.official_file))
    if name in ("keyframe_unet", "interpolation_unet"):
        return _unet_file(raw, name)
    if name == "text_encoder":
        if t5_source is None:
            raise WeightsNotFound("the text encoder needs the T5 encoder checkpoint (google/flan-ul2 or a local copy)")
        return official_state_dict_to_ours({**read_t5_checkpoint(t5_source), **raw}), {}
    return dict(raw), {}


_T5_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_T5_SINGLE = ("model.safetensors", "pytorch_model.bin")


def read_t5_checkpoint(source: WeightsSource) -> State:
    """The encoder's tensors (and the tied `shared` embedding) of a whole T5 checkpoint, sharded or not.

    Only the shards that hold encoder weights are fetched: Flan-UL2's decoder is half of its 40 GB.
    """
    for index_name in _T5_INDEXES:
        if source.exists(index_name):
            weight_map = json.loads(source.path(index_name).read_text())["weight_map"]
            shards = sorted({f for k, f in weight_map.items() if _is_encoder_key(k)})
            break
    else:
        shards = [next((f for f in _T5_SINGLE if source.exists(f)), None)]
        if shards[0] is None:
            raise WeightsNotFound(f"no T5 checkpoint ({', '.join(_T5_INDEXES + _T5_SINGLE)}) in {source.uri}")
    state: State = {}
    for shard in shards:
        state.update({k: v for k, v in read_checkpoint(source.path(shard)).items() if _is_encoder_key(k)})
    return state


def _is_encoder_key(key: str) -> bool:
    return key.startswith("encoder.") or key == "shared.weight"


def preset_config(preset: ModelPreset, name: str) -> ArchConfig:
    return getattr(preset, name)
