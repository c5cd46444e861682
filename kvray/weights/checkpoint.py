"""Reading checkpoint files safely and loading them strictly into modules built on the meta device."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the network it is loaded into."""


def read_checkpoint(path: str | Path) -> dict:
    """A `.safetensors` file, or a torch pickle unpickled with `weights_only=True` (tensors and containers only).

    Torch files are memory-mapped, so a multi-GB checkpoint is paged in as it is used, never copied.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises several types for a corrupt header
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        return _torch_load(path, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from err
    # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
    log.warning("%s is in torch's legacy format: reading it whole, without memory-mapping", path)
    try:
        return _torch_load(path, mmap=False)
    except RuntimeError as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from err


def _torch_load(path: Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            reason = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0]
            raise CheckpointError(
                f"refused to load {path}: the weights-only unpickler rejected it ({reason}). A checkpoint "
                "may hold only tensors and plain containers: unpickling anything else could run code"
            ) from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from None


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> str | None:
    """Every missing, unexpected and mis-shaped key, or None when the two layouts are equal."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or misshaped):
        return None
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing: " + ", ".join(missing))
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected))
    if misshaped:
        lines.append(
            f"{len(misshaped)} mis-shaped: "
            + ", ".join(f"{k} (expected {tuple(expected[k])}, got {tuple(got[k])})" for k in misshaped)
        )
    return "\n  ".join(lines)


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """The module's structure with no storage: a full-size network costs no memory until loaded."""
    with torch.device("meta"):
        return factory()


def load_strict(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build on the meta device and adopt the checkpoint's tensors (`assign=True`): no second copy exists.

    Raises one `CheckpointError` naming every missing, unexpected and mis-shaped key.
    """
    module = build_on_meta(factory)
    problem = describe_mismatch(shapes(module.state_dict()), shapes(state_dict))
    if problem:
        raise CheckpointError(f"{what}: the checkpoint does not fit the network:\n  {problem}")
    placed = {k: _place(v, device, dtype) for k, v in state_dict.items()}
    module.load_state_dict(placed, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def _place(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)
