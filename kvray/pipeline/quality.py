"""Quality signals of a decoded clip, from its uint8 frames, with no learned weights (OpenCV).

The signals, their units and the thresholds that define them are listed in `kvray.config.dataset.SIGNALS`.
The decode stage calls `quality_fields` on the frames it has just decoded and merges the result into
the sample's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from ..config.dataset import (
    BLACK_LUMA,
    BLACK_PIXEL_SHARE,
    BLANK_STD,
    FILTERED,
    FROZEN_MEAN_DIFF,
    MOTION_PAIRS,
    MOTION_SIZE,
    OK,
    SHARPNESS_FRAMES,
    QualityFilter,
    filter_reasons,
)

# Farneback as OpenCV's documentation runs it: 3 pyramid levels halving the size, 15 px windows.
_FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
              "flags": 0}


def quality_signals(frames: np.ndarray, *, scene_starts: Iterable[int] = ()) -> dict[str, float | None]:
    """Every signal of `SIGNALS` for a clip (T, H, W, 3) uint8 RGB; None where a clip is too short to
    measure it (motion and frozen_share of a single frame). `scene_starts`: the first frame of each scene
    of a mini-movie; frame pairs across a cut enter neither motion nor frozen_share."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    luma = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames]  # T x (H, W)
    stats = np.array([[v[0, 0] for v in cv2.meanStdDev(y)] for y in luma])  # (T, 2): mean, std
    cuts = set(scene_starts)
    pairs = [i for i in range(1, len(luma)) if i not in cuts]  # pair i: frames i - 1 and i
    sharp = _spread(range(len(luma)), SHARPNESS_FRAMES)
    signals = {
        "motion": _motion(luma, _spread(pairs, MOTION_PAIRS)) if pairs else None,
        "frozen_share": float(np.mean([cv2.absdiff(luma[i - 1], luma[i]).mean() < FROZEN_MEAN_DIFF for i in pairs]))
        if pairs else None,
        "black_share": float(np.mean([np.count_nonzero(y < BLACK_LUMA) >= BLACK_PIXEL_SHARE * y.size for y in luma])),
        "blank_share": float(np.mean(stats[:, 1] < BLANK_STD)),
        "sharpness": float(np.mean([cv2.Laplacian(luma[i], cv2.CV_64F).var() for i in sharp])),
        "brightness": float(stats[:, 0].mean()),
        "contrast": float(stats[:, 1].mean()),
    }
    return signals


def quality_fields(frames: np.ndarray, filters: Sequence[QualityFilter] = (), *,
                   scene_starts: Iterable[int] = ()) -> dict:
    """What the decode stage adds to a sample's metadata: {"quality": signals, "status": "ok" or
    "filtered", "filter_reasons": [why, ...]}."""
    signals = quality_signals(frames, scene_starts=scene_starts)
    reasons = filter_reasons(filters, signals)
    return {"quality": signals, "status": FILTERED if reasons else OK, "filter_reasons": reasons}


def _spread(items: Sequence[int], most: int) -> list[int]:
    """At most `most` of `items`, evenly spread from the first to the last."""
    if len(items) <= most:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, most).round().astype(int)]


def _motion(luma: list[np.ndarray], pairs: list[int]) -> float:
    """Mean flow magnitude over `pairs` in pixels of the full size, measured at a reduced size."""
    height, width = luma[0].shape
    scale = min(1.0, MOTION_SIZE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    to_full = np.array([width / size[0], height / size[1]], dtype=np.float32)  # per axis: rounding differs
    small = {i: cv2.resize(luma[i], size, interpolation=cv2.INTER_AREA) for p in pairs for i in (p - 1, p)}
    magnitudes = []
    for p in pairs:
        flow = cv2.calcOpticalFlowFarneback(small[p - 1], small[p], None, **_FARNEBACK)  # (h, w, 2): dx, dy
        magnitudes.append(float(np.linalg.norm(flow * to_full, axis=-1).mean()))
    return float(np.mean(magnitudes))
