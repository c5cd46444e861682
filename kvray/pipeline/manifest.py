"""Manifest rows -> validated requests, each with a stable id, seed and output key (`video_id`).

Columns (only `prompt` is required; a missing or null value takes the job's default):

| column | type | meaning |
|---|---|---|
| `prompt` | string | the text |
| `id` | string or integer | the row's name in the results; default: derived from the row's content |
| `seed` | integer >= 0 | default: derived from the id, so a re-run draws the same video |
| `image` | string | image2video: path, URL or fsspec URI of the first frame |
| `width`, `height` | integer | multiples of 64 |
| `fps` | string | low / medium / high (12 / 45 / 177 frames) |
| `motion` | string | low / medium / high / extreme (motion score 1, 10, 50, 100) |
| `steps`, `interpolation_steps` | integer | denoising steps |
| `noise_augmentation` | integer 0-999 | diffusion time the first frame is noised to before it conditions the keyframes (official 20) |
| `key_frame_guidance_scale`, `guidance_weight_prompt`, `guidance_weight_image`, `interpolation_guidance_scale` | float | guidance weights |
| `negative_prompt` | string | must be null: Kandinsky Video 1.1 has no negative prompt (the official code ignores it) |
| `mode` | string | text2video / image2video / animation; default: image2video with an image, else text2video |
| `camera` | string | animation: an effect name (zoom-in, zoom-out, pan-left/right/up/down, rotate-clockwise/anticlockwise) or a JSON camera path `[{"frame": 0}, {"frame": 95, "zoom": 1.5, "x": 0.2, "y": 0, "angle": 10}]` |
| `strength` | float | animation: re-noising of each redrawn frame, 0 (the camera warp alone) to 1; default 0.4 |
| `scenes` | list<string>, or a JSON list in a string | a mini-movie: every scene's prompt (up to 3); `prompt` may then be null (it is the first scene's) |

An animation row without a size is 640 x 640 with the official models (the preset's default size with
test-scale presets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..config.job import RequestDefaults
from ..config.validation import validation_message
from ..config.sampling import GuidanceConfig
from .request import VideoRequest, default_size as mode_default_size

REQUIRED_COLUMNS = ("prompt",)
GUIDANCE_COLUMNS = tuple(GuidanceConfig.model_fields)
OPTIONAL_COLUMNS = (
    "id", "seed", "image", "width", "height", "fps", "motion", "steps", "interpolation_steps", "noise_augmentation",
    "negative_prompt",
    *GUIDANCE_COLUMNS, "mode", "camera", "strength", "scenes",
)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


@dataclass(frozen=True)
class PlannedRow:
    id: str
    request: VideoRequest | None  # None when the row is invalid
    video_id: str
    error: str = ""


def _python(value: Any) -> Any:
    """numpy scalars and arrays (as pandas hands out column values) -> Python values and lists."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:
        return value.tolist()
    return value


def _present(value: Any) -> bool:
    """Null means "use the default"; NaN is a value (and an invalid one wherever a number is needed)."""
    return value is not None


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def derived_seed(row_id: str) -> int:
    return int(_digest({"seed-of": row_id})[:15], 16)


def video_id(request: VideoRequest, model_version: str) -> str:
    """The same request and weights always land at the same key, whatever the row or the run (a plain
    text2video or image2video request keeps the key it had before animations and scenes existed)."""
    return _digest({"request": request.identity(), "model": model_version})[:32]


def plan_row(row: Mapping[str, Any], defaults: RequestDefaults, model_version: str, default_size: tuple[int, int]) -> PlannedRow:
    """One manifest row -> its request, or the reason it cannot be rendered."""
    raw_id = _python(row.get("id"))
    given = {k: _python(row[k]) for k in KNOWN_COLUMNS if k in row and k != "id" and _present(_python(row[k]))}
    row_id = str(raw_id) if _present(raw_id) else "auto-" + _digest(given)[:16]
    try:
        if "negative_prompt" in given:
            raise ValueError("negative_prompt is not supported: Kandinsky Video 1.1 has none (the official code ignores it)")
        scenes = _scenes(given.get("scenes"))
        prompt = given.get("prompt")
        if not isinstance(prompt, str) and not (prompt is None and scenes):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        guidance = defaults.guidance.model_copy(update={k: given[k] for k in GUIDANCE_COLUMNS if k in given})
        size = mode_default_size(given.get("mode"), default_size)
        fields = {
            "prompt": prompt,
            "image": given.get("image"),
            "width": given.get("width", defaults.width or size[0]),
            "height": given.get("height", defaults.height or size[1]),
            "fps": given.get("fps", defaults.fps),
            "motion": given.get("motion", defaults.motion),
            "seed": given.get("seed", derived_seed(row_id)),
            "steps": given.get("steps", defaults.steps),
            "interpolation_steps": given.get("interpolation_steps", defaults.interpolation_steps),
            "noise_augmentation": given.get("noise_augmentation", defaults.noise_augmentation),
            "guidance": GuidanceConfig.model_validate(guidance.model_dump()),
            "mode": given.get("mode"),
            "camera": given.get("camera"),
            "strength": given.get("strength"),
            "scenes": scenes,
        }
        request = VideoRequest.model_validate(_strict_numbers(fields))
    except ValidationError as err:
        return PlannedRow(row_id, None, "", validation_message(err, "row"))
    except ValueError as err:
        return PlannedRow(row_id, None, "", str(err))
    return PlannedRow(row_id, request, video_id(request, model_version))


def _scenes(value: Any) -> list | None:
    """The scenes column: a list of prompts, or its JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("scenes must be a list of prompts or its JSON text, e.g. [\"a cat\", \"a dog\"]") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError("scenes must be a list of prompts (strings)")
    return list(value)


def _strict_numbers(fields: dict) -> dict:
    """Parquet integers arrive as floats where a column has nulls: 512.0 is 512, 512.5 is an error."""
    out = dict(fields)
    for key in ("width", "height", "seed", "steps", "interpolation_steps", "noise_augmentation"):
        value = out[key]
        if isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    return out

