"""Parity with the official networks: replay the calls recorded in a golden directory.

A golden directory (laid out like `shared/golden`, see its README) holds, per network, `<name>.json`
(official class, constructor config, calls, tolerance), `<name>.weights.safetensors` (official keys)
and `<name>.io.safetensors` (`<call>.<argument>` inputs and `<call>.out` outputs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checks import CallResult
from .models.text_encoder import official_state_dict_to_ours
from .sampling.scheduler_parity import check_schedulers_file
from .weights.checkpoint import load_strict, read_checkpoint
from .weights.networks import NETWORKS, State


class Unhandled(Exception):
    """A file or call of the golden directory that parity does not know how to check."""


# Official class -> our network name (its builder and config type).
OFFICIAL_CLASSES = {
    "kandinsky_video.model.unet.UNet": "keyframe_unet",
    "kandinsky_video.model.unet_interpolation.UNet": "interpolation_unet",
    "kandinsky_video.movq.MoVQ": "image_movq",  # the same class serves the video MoVQ
    "kandinsky_video.condition_encoders.T5TextConditionEncoder": "text_encoder",
}
# Official keyword names that our modules spell differently.
RENAMED_KWARGS = {"text_encoder": {"model_type": "projection"}}
SCHEDULERS = "schedulers.json"


def golden_state(network: str, weights: State) -> tuple[State, State]:
    """Golden weights (official keys) -> our state dict and extras."""
    weights = dict(weights)
    extras = {k: weights.pop(k) for k in ("null_embedding",) if k in weights}
    if network == "text_encoder":
        # `t5.*` is a whole transformers T5EncoderModel state dict; `projections.*` the t5_projections.pt layout.
        weights = official_state_dict_to_ours(weights)
    return weights, extras


def build_golden_network(network: str, config: dict, weights_path: Path) -> torch.nn.Module:
    spec = NETWORKS[network]
    arch = spec.config_type.model_validate(config)
    state, extras = golden_state(network, read_checkpoint(weights_path))
    module = load_strict(lambda: spec.build(arch), state, what=f"golden {weights_path.name}")
    if "null_embedding" in extras:
        module.null_embedding = extras["null_embedding"].reshape(-1)
    return module


def max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}")
    if not expected.is_floating_point():
        # Integer and boolean outputs (masks) must match exactly.
        return 0.0 if torch.equal(got.to(expected.dtype), expected) else float("inf")
    return (got.double() - expected.double()).abs().max().item()


def check_file(spec_path: Path) -> Iterator[CallResult]:
    spec = json.loads(spec_path.read_text())
    stem = spec_path.name.removesuffix(".json")
    network = OFFICIAL_CLASSES.get(spec.get("official_class", ""))
    if network is None:
        raise Unhandled(f"{spec_path.name}: unknown official class {spec.get('official_class')!r}")
    module = build_golden_network(network, spec["config"], spec_path.with_name(f"{stem}.weights.safetensors"))
    io = load_file(spec_path.with_name(f"{stem}.io.safetensors"))
    tolerance = float(spec["tolerance"])
    renames = RENAMED_KWARGS.get(network, {})
    for call in spec["calls"]:
        name, literals = call["name"], dict(call.get("literals", {}))

        def value(arg: str, name=name, literals=literals):
            # Inputs shared by every call are stored once, without the call prefix.
            for key in (f"{name}.{arg}", arg):
                if key in io:
                    return io[key]
            if arg in literals:
                return literals.pop(arg)
            raise Unhandled(f"{spec_path.name} call {name}: no tensor or literal for argument {arg!r}")

        args = [value(a) for a in call.get("args", [])]
        kwargs = {renames.get(k, k): value(k) for k in call.get("kwargs", [])}
        kwargs.update({renames.get(k, k): v for k, v in literals.items()})
        method = getattr(module, call.get("method", "forward"))
        with torch.inference_mode():
            out = method(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        expected_names = [call["output"], *call.get("extra_outputs", [])]
        if len(outs) != len(expected_names):
            raise Unhandled(f"{spec_path.name} call {name}: {len(outs)} outputs, golden has {len(expected_names)}")
        diff = max(max_abs_diff(o, io[e]) for o, e in zip(outs, expected_names))
        yield CallResult(stem, name, diff, tolerance)


def check_directory(golden_dir: str | Path) -> Iterator[CallResult]:
    """Every call of every network file; raises `Unhandled` for anything it cannot check."""
    golden_dir = Path(golden_dir)
    specs = sorted(p for p in golden_dir.glob("*.json") if not p.name.endswith(".config.json"))
    if not specs:
        raise Unhandled(f"{golden_dir}: no <name>.json files (is this a golden directory?)")
    accounted = {"README.md", *(p.name for p in specs)}
    for spec_path in specs:
        stem = spec_path.name.removesuffix(".json")
        accounted |= {f"{stem}.weights.safetensors", f"{stem}.io.safetensors", f"{stem}.safetensors"}
    strays = sorted(p.name for p in golden_dir.iterdir() if p.name not in accounted)
    if strays:
        raise Unhandled(f"{golden_dir}: files parity does not know: {', '.join(strays)}")
    for spec_path in specs:
        if spec_path.name == SCHEDULERS:
            yield from check_schedulers_file(spec_path)
        else:
            yield from check_file(spec_path)
