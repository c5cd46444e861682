"""The renderer's stages, in order, and the networks each one holds: the one list every part of kvray
(job deployments, cost profiles, the planner, the row schema, benchmarks) takes its stage names from."""

from __future__ import annotations

STAGES: tuple[str, ...] = ("text", "keyframes", "interpolate", "decode")

STAGE_NETWORKS: dict[str, tuple[str, ...]] = {
    "text": ("text_encoder",),
    "keyframes": ("keyframe_unet", "image_movq"),
    "interpolate": ("interpolation_unet",),
    "decode": ("video_movq",),
}
