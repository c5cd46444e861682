"""LoRA adapters on kvray's networks, with peft: added to a network for training, saved as an adapter
directory (`kvray.weights.adapters`), and merged into a loaded network's weights at their scales, so that
a stage runs a plain module (the same kernels, precisions and golden paths as without adapters)."""

from __future__ import annotations

import json
import re

import fsspec
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ..config.models import ModelSource
from ..io.atomic import write_atomic
from .adapters import ADAPTER_INFO, PEFT_CONFIG, PEFT_WEIGHTS, AdapterError, checked_info
from .digest import tensors_digest
from .source import WeightsSource

# The U-Nets' attention projections (spatial, cross, temporal and the text pooling): what LoRAs of this
# field adapt. `convs` adds the 1x1 convolutions of the ResNet blocks and the feed-forwards, which hold
# most of a U-Net's spatial weights: a new shape is drawn there as much as in attention.
ATTENTION_TARGETS = r".*attention\.(to_query|to_key|to_value|output_layer)"
CONV_TARGETS = r".*(resnet_blocks\.\d+\.projection|feed_forward\.\d+)"
TRAINED_ADAPTER = "trained"  # not "training": every nn.Module has that attribute
MERGED_ADAPTER = "merged"


def lora_config(module: nn.Module, rank: int, alpha: float | None = None, convs: bool = False) -> LoraConfig:
    """peft's config of a kvray LoRA on `module`: rank `rank`, scale alpha / rank (alpha defaults to the
    rank). Its targets are listed by name: a pattern alone would also match the activations between a
    feed-forward's convolutions, which peft cannot adapt."""
    pattern = re.compile(f"{ATTENTION_TARGETS}|{CONV_TARGETS}" if convs else ATTENTION_TARGETS)
    targets = [name for name, layer in module.named_modules()
               if isinstance(layer, (nn.Linear, nn.Conv2d)) and pattern.fullmatch(name)]
    if not targets:
        raise AdapterError(f"{type(module).__name__} has no layer a LoRA adapts (attention projections)")
    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets)


def add_lora(module: nn.Module, config: LoraConfig) -> nn.Module:
    """`module` with trainable low-rank adapters on `config`'s targets; every base weight frozen."""
    module.requires_grad_(False)
    return inject_adapter_in_model(config, module, adapter_name=TRAINED_ADAPTER)


def lora_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors of a module `add_lora` made, in peft's names (sharing the live storage)."""
    return get_peft_model_state_dict(module, adapter_name=TRAINED_ADAPTER)


def _config_json(config: LoraConfig) -> bytes:
    # Sorted and with target sets as lists: the same config is the same bytes, which the digest covers.
    return json.dumps(config.to_dict(), sort_keys=True, default=sorted, indent=1).encode()


def save_adapter(dst: str, tensors: dict[str, torch.Tensor], config: LoraConfig, network: str, preset: str,
                 **details) -> list[str]:
    """An adapter directory at `dst` (any fsspec URL): peft's files and kvray's info with the digest."""
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    config_bytes = _config_json(config)
    info = {"network": network, "preset": preset, "digest": tensors_digest(state, config_bytes),
            "rank": config.r, "parameters": sum(t.numel() for t in state.values()), **details}
    fs, root = fsspec.core.url_to_fs(dst)
    fs.makedirs(root, exist_ok=True)
    files = {PEFT_CONFIG: config_bytes, PEFT_WEIGHTS: save_safetensors(state),
             ADAPTER_INFO: json.dumps(info, sort_keys=True, indent=1).encode()}
    for name, data in files.items():  # the info last: a directory without it is not an adapter yet
        write_atomic(fs, f"{root}/{name}", data)
    return [f"{dst.rstrip('/')}/{name}" for name in files]


def merge_adapters(module: nn.Module, network: str, models: ModelSource) -> nn.Module:
    """`module` (network `network`, loaded) with each of `models.loras` that targets it merged into its
    weights, in order, at its scale; the adapters' files checked against their digests first."""
    for spec in models.loras:
        if spec.network not in (None, network):
            continue
        info = checked_info(spec, models)
        if info["network"] != network:
            continue
        source = WeightsSource(spec.path, cache_dir=models.cache_dir)
        config_bytes = source.path(PEFT_CONFIG).read_bytes()
        state = load_safetensors(source.path(PEFT_WEIGHTS).read_bytes())
        if tensors_digest(state, config_bytes) != info["digest"]:
            raise AdapterError(f"adapter {spec.path}: its files do not match the digest in its {ADAPTER_INFO}")
        module = _merged(module, LoraConfig.from_peft_type(**json.loads(config_bytes)), state, spec.scale)
    return module


@torch.no_grad()
def _merged(module: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """Each adapted layer merged and swapped back for its base layer. Layer by layer, not peft's
    `merge_and_unload`: that reads the model's `config` as a Hugging Face dict, and kvray's is pydantic."""
    inject_adapter_in_model(config, module, adapter_name=MERGED_ADAPTER)
    result = set_peft_model_state_dict(module, state, adapter_name=MERGED_ADAPTER)
    if result.unexpected_keys:
        raise AdapterError(f"the adapter does not fit the network: {len(result.unexpected_keys)} tensors have no "
                           f"place in it, e.g. {result.unexpected_keys[:3]}")
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.set_scale(MERGED_ADAPTER, scale)
            layer.merge(adapter_names=[MERGED_ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())
    return module
