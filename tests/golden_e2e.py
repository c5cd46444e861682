"""Replaying network calls recorded in `shared/golden-e2e` (`<name>.config.json` layout), with debug hooks."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvray.network_parity import build_golden_network, max_abs_diff

TOLERANCE = 1e-4


def load_case_file(golden_e2e_dir: Path, name: str, network: str):
    """Our module with the golden weights, the config JSON and the io tensors."""
    config = json.loads((golden_e2e_dir / f"{name}.config.json").read_text())
    arch = config.get("constructor_kwargs") or config.get("generator_params")
    module = build_golden_network(network, arch, golden_e2e_dir / f"{name}.weights.safetensors")
    return module, config, load_file(golden_e2e_dir / f"{name}.io.safetensors")


def call_arguments(config: dict, io: dict, case: str) -> tuple[list, dict]:
    call = config["calls"][case]
    literal = lambda arg: call.get(arg, config.get(arg))
    args = [io[f"{case}.{a}"] if f"{case}.{a}" in io else literal(a) for a in call["positional_args"]]
    kwargs = {k: io[f"{case}.{k}"] if v == "tensor" else v for k, v in call.get("keyword_args", {}).items()}
    return args, kwargs


@contextmanager
def record_outputs(module: torch.nn.Module, paths):
    """Captures the output of each sub-module named in `paths` during the next forward."""
    captured, handles = {}, []
    for path in paths:
        def hook(_mod, _inp, out, path=path):
            captured[path] = out
        handles.append(module.get_submodule(path).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def assert_case(module, io: dict, case: str, out: torch.Tensor, captured: dict) -> None:
    """The output within tolerance; on failure, names the first sub-module (in forward order) that diverged."""
    diff = max_abs_diff(out, io[f"{case}.out"])
    if diff <= TOLERANCE:
        return
    for path, value in captured.items():
        sub = max_abs_diff(value, io[f"{case}.debug.{path}"])
        if sub > TOLERANCE:
            raise AssertionError(f"{case}: output off by {diff:.2e}; first divergence at {path} ({sub:.2e})")
    raise AssertionError(f"{case}: output off by {diff:.2e}, every recorded sub-module within tolerance")


def debug_paths(io: dict, case: str) -> list[str]:
    prefix = f"{case}.debug."
    return [k[len(prefix):] for k in io if k.startswith(prefix)]


def replay(module, config: dict, io: dict, case: str, method: str = "forward"):
    args, kwargs = call_arguments(config, io, case)
    with record_outputs(module, debug_paths(io, case)) as captured, torch.inference_mode():
        out = getattr(module, method)(*args, **kwargs)
    assert_case(module, io, case, out, captured)
    return out
