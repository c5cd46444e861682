"""Camera paths for animations: named effects and keyframed paths, as a request gives them.

A camera pose is (zoom, x, y, angle), all in the first frame's view:

| field | meaning | identity |
|---|---|---|
| `zoom`  | magnification; 2 shows the middle half of what zoom 1 shows (> 0)             | 1 |
| `x`     | camera position to the right, in first-frame widths (content moves left)      | 0 |
| `y`     | camera position upwards, in first-frame heights (content moves down)          | 0 |
| `angle` | camera roll in degrees, clockwise (so the picture turns ANTICLOCKWISE on screen) | 0 |

Every field describes what the CAMERA does; the named effects follow the same rule (`pan-right`: the
camera moves right and the scene slides left; `rotate-clockwise`: the camera rolls clockwise and the
scene turns anticlockwise on screen).

A camera path is a list of keyframes `{"frame": n, "zoom": .., "x": .., "y": .., "angle": ..}` with
increasing frame numbers; a field left out keeps the previous keyframe's value (the first keyframe's:
the identity). A named effect is a preset path: a steady motion from the identity at frame 0 to
`EFFECT_TOTALS` at the last frame (zoom 2x in or out, half a frame of pan, 45 degrees of roll over the
clip). How poses are interpolated between keyframes and applied is `kvray.pipeline.camera_motion`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

# Named effects: the pose reached at the end of the clip (a steady motion from the identity).
EFFECT_TOTALS: dict[str, dict[str, float]] = {
    "zoom-in": {"zoom": 2.0},
    "zoom-out": {"zoom": 0.5},
    "pan-left": {"x": -0.5},
    "pan-right": {"x": 0.5},
    "pan-up": {"y": 0.5},
    "pan-down": {"y": -0.5},
    "rotate-clockwise": {"angle": 45.0},
    "rotate-anticlockwise": {"angle": -45.0},
}
EFFECT_ALIASES = {
    "rotate-cw": "rotate-clockwise", "rotate-ccw": "rotate-anticlockwise",
    "rotate-counterclockwise": "rotate-anticlockwise", "rotate-counter-clockwise": "rotate-anticlockwise",
    "rotate-anti-clockwise": "rotate-anticlockwise",
}
EFFECTS = tuple(EFFECT_TOTALS)
MAX_KEYFRAMES = 1000
IDENTITY = (1.0, 0.0, 0.0, 0.0)  # zoom, x, y, angle


class CameraKeyframe(BaseModel):
    """One keyframe of a camera path; a field left out keeps the previous keyframe's value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    frame: int = Field(ge=0)
    zoom: float | None = Field(None, gt=0, allow_inf_nan=False)
    x: float | None = Field(None, allow_inf_nan=False)
    y: float | None = Field(None, allow_inf_nan=False)
    angle: float | None = Field(None, allow_inf_nan=False)

    @field_validator("frame", mode="before")
    @classmethod
    def _whole_frame(cls, value):
        # JSON has one number type: 12.0 is frame 12, 12.5 is an error (pydantic's message says so).
        return int(value) if isinstance(value, float) and value.is_integer() else value


CameraPath = tuple[CameraKeyframe, ...]
_PATH = TypeAdapter(CameraPath)


def effect_name(name: str) -> str | None:
    """The canonical name of an effect (case, '_' or ' ' for '-', and aliases tolerated), else None."""
    key = "-".join(name.strip().lower().replace("_", " ").split())
    key = EFFECT_ALIASES.get(key, key)
    return key if key in EFFECT_TOTALS else None


def parse_camera(value) -> str | CameraPath | None:
    """An effect name, a camera path (keyframe dicts, or their JSON text), or None -> the canonical form.

    Raises ValueError with one readable message (unknown effect, bad JSON, bad keyframe)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"camera path is not valid JSON: {err}") from None
        else:
            name = effect_name(text)
            if name is None:
                raise ValueError(f"unknown camera effect {value!r}; choose one of {', '.join(EFFECTS)}, "
                                 "or give a camera path: a JSON list of {frame, zoom, x, y, angle} keyframes")
            return name
    if isinstance(value, dict) and set(value) == {"path"}:  # {"path": [...]} is accepted too
        value = value["path"]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, tuple) and all(isinstance(k, CameraKeyframe) for k in value):
        path = value
    else:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"camera must be an effect name or a list of keyframes, got {type(value).__name__}")
        try:
            path = _PATH.validate_python(list(value))
        except ValidationError as err:
            problems = "; ".join(
                f"keyframe {e['loc'][0]}" + (f" {'.'.join(map(str, e['loc'][1:]))}" if len(e["loc"]) > 1 else "")
                + f": {e['msg']}" for e in err.errors()
            )
            raise ValueError(f"camera path: {problems}") from None
    if not path:
        raise ValueError("camera path has no keyframes")
    if len(path) > MAX_KEYFRAMES:
        raise ValueError(f"camera path has {len(path)} keyframes, at most {MAX_KEYFRAMES}")
    for before, after in zip(path, path[1:]):
        if after.frame <= before.frame:
            raise ValueError(f"camera path: keyframe frames must increase, got {after.frame} after {before.frame}")
    return path


def effect_path(name: str, num_frames: int) -> CameraPath:
    """A named effect as a two-keyframe path: the identity at frame 0, its total at the last frame."""
    return (CameraKeyframe(frame=0), CameraKeyframe(frame=num_frames - 1, **EFFECT_TOTALS[name]))
