"""Compare our full-size networks, built on the meta device, with the official state-dict manifests."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelPreset
from .checkpoint import build_on_meta, describe_mismatch, shapes
from .networks import get_network

# Our network -> (official manifest, the prefix its keys carry in our state dict).
MANIFESTS: dict[str, list[tuple[str, str]]] = {
    "text_encoder": [("flan_ul2_t5_encoder.json", "t5."), ("kv11_t5_projections.json", "projections.")],
    "keyframe_unet": [("kv11_t2v_unet3d.json", "")],
    "interpolation_unet": [("kv11_interpolation_unet3d.json", "")],
    "image_movq": [("kv11_image_movq.json", "")],
    "video_movq": [("kv11_video_movq_full.json", "")],
}


@dataclass(frozen=True)
class LayoutResult:
    network: str
    manifest: str
    parameters: int
    expected_parameters: int
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_layouts(preset: ModelPreset, manifest_dir: str | Path) -> list[LayoutResult]:
    manifest_dir = Path(manifest_dir)
    results = []
    for name, parts in MANIFESTS.items():
        network = get_network(name)
        ours = shapes(build_on_meta(functools.partial(network.build, getattr(preset, name))).state_dict())
        claimed = set()
        for manifest_name, prefix in parts:
            manifest = json.loads((manifest_dir / manifest_name).read_text())["state_dict"]
            expected = {k: tuple(v) for k, v in manifest.items()}
            part = {k.removeprefix(prefix): v for k, v in ours.items() if k.startswith(prefix)}
            claimed |= {prefix + k for k in part}
            results.append(LayoutResult(
                name, manifest_name, _numel(part), _numel(expected), describe_mismatch(expected, part)
            ))
        unclaimed = sorted(set(ours) - claimed)
        if unclaimed:
            results.append(LayoutResult(name, "-", 0, 0, f"keys in no manifest: {', '.join(unclaimed)}"))
    return results


def _numel(layout: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in layout.values())
