"""Load any network of a preset from a weights source, or make it with seeded random weights."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..config.arch import ArchConfig
from .checkpoint import CheckpointError, build_on_meta, load_strict
from .networks import get_network, read_converted, read_official
from .source import WeightsSource

log = logging.getLogger(__name__)


def load_network(
    name: str,
    source: WeightsSource,
    config: ArchConfig | None = None,
    *,
    t5_source: WeightsSource | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Network `name` from `source`, in kvray's converted format if present there, else the official files.

    `config` is required for official files (they carry no architecture); with converted files it
    is checked against the architecture stored beside the weights.
    """
    network = get_network(name)
    converted = read_converted(source, name)
    if converted is not None:
        stored_config, state, extras = converted
        if config is not None and config != stored_config:
            raise CheckpointError(
                f"{name} in {source.uri} was converted for another architecture:\n"
                f"  stored:    {stored_config.model_dump()}\n  requested: {config.model_dump()}"
            )
        config = stored_config
    else:
        if config is None:
            raise CheckpointError(f"{name}: {source.uri} holds official files, which need an architecture config")
        state, extras = read_official(source, name, t5_source)
    module = load_strict(lambda: network.build(config), state, what=f"{name} from {source.uri}", device=device, dtype=dtype)
    _adopt_extras(module, extras, name, device, dtype)
    log.info("loaded %s from %s (%.1fM parameters)", name, source.uri, count_parameters(module) / 1e6)
    return module


def _adopt_extras(module: nn.Module, extras: dict[str, torch.Tensor], name: str, device, dtype) -> None:
    """Fill the non-persistent buffers that the official files keep beside the state dict."""
    for buffer_name, buffer in module.named_buffers():
        if not buffer.is_meta:
            continue
        if buffer_name not in extras:
            raise CheckpointError(f"{name}: the checkpoint has no {buffer_name!r}")
        value = extras[buffer_name].reshape(buffer.shape)  # the official null_embedding may be (1, C)
        module.get_submodule(buffer_name.rpartition(".")[0]).register_buffer(
            buffer_name.rpartition(".")[2], value.to(device=device, dtype=dtype or value.dtype), persistent=False
        )


def random_network(name: str, config: ArchConfig, *, seed: int = 0, device="cpu", dtype=None) -> nn.Module:
    """Seeded random weights with every path switched on (no zero gates), for tests and timing.

    Under torch's fake tensors (`kvray.sizing.estimate`) tensors have shapes but no values: there is
    nothing to draw, and the network gets storage of its full size without any being allocated."""
    network = get_network(name)
    if detect_fake_mode() is not None:
        with unset_fake_temporarily():  # laid out on the meta device, then given fake storage
            module = build_on_meta(lambda: network.build(config)).to(dtype=dtype)
        return module.to_empty(device=device).requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = network.build(config)
        for param in module.parameters():
            # As the golden vectors do: the official code starts scalar gates and some output layers at
            # zero, which would switch whole paths (temporal layers, gates) off in a random network.
            if param.numel() == 1:
                param.data.uniform_(0.2, 0.8)
            elif not param.data.any():
                param.data.normal_(0.0, 0.05)
        if isinstance(getattr(module, "null_embedding", None), torch.Tensor):
            module.null_embedding.normal_()
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
