"""`kvray convert`: official checkpoints -> one safetensors file plus its architecture JSON per network."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path

import fsspec
import torch
from safetensors.torch import save_file

from ..config import ModelPreset
from ..models.text_encoder import BYT5, SPIECE
from .checkpoint import CheckpointError, build_on_meta, describe_mismatch, shapes
from .networks import NETWORKS, converted_names, get_network, read_official
from .source import WeightsSource
from .stage_models import TOKENIZER_DIR

log = logging.getLogger(__name__)
FORMAT = "kvray-weights-1"


def write_converted(dst: str, name: str, preset_name: str, config, state: dict, extras: dict | None = None,
                    dtype: torch.dtype | None = None) -> list[str]:
    """One network in kvray's format under `dst`: `<name>.safetensors` (the state dict, extras such as
    `null_embedding` flattened inside) and `<name>.json` (its architecture). `dtype` casts floating tensors
    (trained weights ship in half precision). Returns the written URIs."""
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    tensors = {k: cast(v).contiguous() for k, v in state.items()}
    tensors.update({k: cast(v).reshape(-1).contiguous() for k, v in (extras or {}).items()})
    weights_name, arch_name = converted_names(name)
    arch = {"format": FORMAT, "network": name, "preset": preset_name, "config": config.model_dump(mode="json")}
    fs, root = fsspec.core.url_to_fs(dst)
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / weights_name
        save_file(tensors, local, metadata={"format": FORMAT, "network": name})
        fs.put_file(str(local), f"{root}/{weights_name}")
    with fs.open(f"{root}/{arch_name}", "w") as f:
        json.dump(arch, f, indent=2)
    return [f"{dst.rstrip('/')}/{weights_name}", f"{dst.rstrip('/')}/{arch_name}"]


def convert(source: WeightsSource, dst: str, preset: ModelPreset, *, t5_source: WeightsSource | None = None,
            networks: list[str] | None = None) -> list[str]:
    """Convert each network (all but the text encoder unless a T5 source is given); returns the written URIs.
    With the text encoder comes its tokenizer's `spiece.model` (from the T5 source, or the preset's
    tokenizer repo), as `tokenizer/spiece.model`."""
    names = networks or [n for n in NETWORKS if n != "text_encoder" or t5_source is not None]
    fs, root = fsspec.core.url_to_fs(dst)
    fs.makedirs(root, exist_ok=True)
    written = []
    for name in names:
        network = get_network(name)
        config = getattr(preset, name)
        state, extras = read_official(source, name, t5_source)
        problem = describe_mismatch(shapes(build_on_meta(functools.partial(network.build, config)).state_dict()), shapes(state))
        if problem:
            raise CheckpointError(f"{name} from {source.uri} does not fit preset {preset.name}:\n  {problem}")
        written += write_converted(dst, name, preset.name, config, state, extras)
        log.info("converted %s: %d tensors", name, len(state) + len(extras))
    if "text_encoder" in names and preset.tokenizer != BYT5:
        # The tokenizer travels with the encoder it was trained for; `load_tokenizer` reads it from here.
        tokenizer = t5_source if t5_source.exists(SPIECE) else WeightsSource(preset.tokenizer,
                                                                              cache_dir=t5_source.cache_dir)
        target = f"{TOKENIZER_DIR}/{SPIECE}"
        fs.makedirs(f"{root}/{TOKENIZER_DIR}", exist_ok=True)
        fs.put_file(str(tokenizer.path(SPIECE)), f"{root}/{target}")
        written.append(f"{dst.rstrip('/')}/{target}")
    return written
