"""What one video request asks for, validated at the edge.

Modes (`mode`; left out: image2video when an image is given, else text2video):

* `text2video`: the official pipeline; the first frame is drawn from the prompt.
* `image2video`: the official pipeline from the given first frame.
* `animation`: a still scene filmed by a moving camera (`camera`: a named effect or a keyframed path, see
  `camera_path.py`), 96 frames at 24 fps (4 s), 640 x 640 unless a size is given; the first frame is the
  given image or is drawn from the prompt. Every 4th frame is redrawn from the previous redrawn frame,
  warped by the camera and re-noised by `strength` (0: the warp alone, no diffusion at all; 1: redrawn
  from almost pure noise; default 0.4); see `animation.py`. `fps` and `motion` do not apply.

Mini-movies (`scenes`, text2video or image2video): up to 3 prompts rendered as consecutive scenes of one
video, each a full video of the request's fps; every scene after the first starts from the last frame of
the scene before. `scenes` lists EVERY scene's prompt; `prompt` is the first scene's (it may be left out
and is then taken from `scenes`). A single scene is a plain request.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config.sampling import NOISE_AUGMENTATION, Fps, GuidanceConfig, Motion
from .camera_path import CameraPath, parse_camera

Mode = Literal["text2video", "image2video", "animation"]
MODES: tuple[str, ...] = ("text2video", "image2video", "animation")

# Width and height: the U-Nets halve the latent (size / 8) three times and need exact skips.
SIZE_MULTIPLE = 64
MAX_SIDE = 2048
# Frames per fps setting: 12 keyframes, then 4N - 3 per interpolation pass.
NUM_FRAMES = {"low": 12, "medium": 45, "high": 177}
MAX_SCENES = 3
# Animation: 4 s at 24 fps, 640 x 640 unless a size is given.
ANIMATION_FPS = 24
ANIMATION_FRAMES = 96
ANIMATION_SIZE = 640
DEFAULT_STRENGTH = 0.4


# C0 and C1 control characters (and DEL) but tab, newline and carriage return; lone surrogates (from
# undecodable command-line bytes) cannot be encoded at all.
_REFUSED_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_text(prompt: str, what: str) -> None:
    """A prompt must have text, and no control characters: the tokenizer would drop them silently (T5's
    normalisation), so a prompt holding them is most likely corrupt data, and they would reach logs and
    records as terminal escapes. Tab, newline and carriage return are whitespace to the tokenizer."""
    if not prompt.strip():
        raise ValueError(f"{what} is empty")
    bad = _REFUSED_CHARACTERS.search(prompt)
    if bad:
        raise ValueError(f"{what} has the control character U+{ord(bad.group()):04X} at position {bad.start()}: "
                         "only tab, newline and carriage return are allowed")


def default_size(mode: str | None, preset_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a request that gives none: the preset's, except that an animation at the
    official size (512 x 512) gets 640 x 640. Test-scale presets keep their small default."""
    if mode == "animation" and tuple(preset_size) == (512, 512):
        return ANIMATION_SIZE, ANIMATION_SIZE
    return tuple(preset_size)


class VideoRequest(BaseModel):
    """One text2video, image2video or animation request, or a mini-movie of up to 3 scenes.
    Defaults are the official ones (see the module notes for the modes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    mode: Mode = Field("text2video", description="left out: image2video with an image, else text2video")
    image: str | None = Field(None, description="path, URL or fsspec URI of the first frame (image2video)")
    width: int = 512
    height: int = 512
    fps: Fps = "low"
    motion: Motion = "medium"
    seed: int | None = Field(None, ge=0, lt=2**63, description="None: a random seed, recorded in the result")
    guidance: GuidanceConfig = GuidanceConfig()
    steps: int | None = Field(None, ge=1, le=1000, description="first-frame and keyframe steps (official 50)")
    interpolation_steps: int | None = Field(None, ge=1, le=1000, description="interpolation steps (official 10)")
    noise_augmentation: int = Field(NOISE_AUGMENTATION, ge=0, le=999,
                                    description="diffusion time the first frame is noised to before it conditions "
                                                "the keyframes (official 20)")
    camera: str | CameraPath | None = Field(
        None, description="animation: an effect name (zoom-in, pan-left, ...) or a path of {frame, zoom, x, y, angle} "
                          "keyframes (a list, or its JSON text)")
    strength: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description=f"animation: re-noising of each redrawn frame, 0 to 1 (default {DEFAULT_STRENGTH})")
    scenes: tuple[str, ...] | None = Field(None, description=f"every scene's prompt (2 to {MAX_SCENES}); "
                                                             "`prompt` is the first's")

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        """The mode from the image, animation's default size, and the prompt from the scenes."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("mode") is None:
            data["mode"] = "image2video" if data.get("image") else "text2video"
        if data["mode"] == "animation":
            for side in ("width", "height"):
                if data.get(side) is None:
                    data[side] = ANIMATION_SIZE
        scenes = data.get("scenes")
        if isinstance(scenes, str):
            raise ValueError("scenes must be a list of prompts, not one string")
        if scenes is not None and not isinstance(scenes, (list, tuple)):
            raise ValueError(f"scenes must be a list of prompts, got {type(scenes).__name__}")
        if scenes is not None:
            scenes = list(scenes)
            if not scenes:
                raise ValueError("scenes is empty: give 1 to 3 prompts, or leave it out")
            if len(scenes) > MAX_SCENES:
                raise ValueError(f"at most {MAX_SCENES} scenes, got {len(scenes)}")
            if data.get("prompt") is None:
                data["prompt"] = scenes[0]
            elif data["prompt"] != scenes[0]:
                raise ValueError("prompt must be the first scene's prompt (or left out) when scenes are given")
            data["scenes"] = scenes if len(scenes) > 1 else None  # one scene is a plain request
        return data

    @field_validator("camera", mode="before")
    @classmethod
    def _camera(cls, value):
        return parse_camera(value)

    @field_validator("scenes")
    @classmethod
    def _scenes_have_text(cls, scenes):
        for index, prompt in enumerate(scenes or ()):
            _check_text(prompt, f"scene {index + 1} prompt")
        return scenes

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        _check_text(prompt, "prompt")
        return prompt

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int, info) -> int:
        if value % SIZE_MULTIPLE or not SIZE_MULTIPLE <= value <= MAX_SIDE:
            raise ValueError(
                f"{info.field_name} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIDE}, "
                f"got {value}"
            )
        return value

    @model_validator(mode="after")
    def _finite_guidance(self):
        bad = {k: v for k, v in self.guidance.model_dump().items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"guidance weights must be finite numbers, got {bad}")
        return self

    @model_validator(mode="after")
    def _mode_fields(self):
        if self.mode == "text2video" and self.image:
            raise ValueError("text2video takes no image: use mode image2video (or animation)")
        if self.mode == "image2video" and not self.image:
            raise ValueError("image2video needs an image")
        if self.mode != "animation":
            for name in ("camera", "strength"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to mode animation only (this request is {self.mode})")
            return self
        if self.camera is None:
            raise ValueError("animation needs a camera: an effect name or a camera path")
        if self.scenes:
            raise ValueError("scenes are for text2video and image2video: an animation has one prompt")
        if not isinstance(self.camera, str) and self.camera[-1].frame >= ANIMATION_FRAMES:
            raise ValueError(f"camera path keyframe at frame {self.camera[-1].frame} is past the animation's "
                             f"last frame ({ANIMATION_FRAMES - 1})")
        return self

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every scene's prompt, in order (one for a plain request)."""
        return self.scenes if self.scenes else (self.prompt,)

    @property
    def num_scenes(self) -> int:
        return len(self.prompts)

    @property
    def frames_per_scene(self) -> int:
        return ANIMATION_FRAMES if self.mode == "animation" else NUM_FRAMES[self.fps]

    @property
    def num_frames(self) -> int:
        """Frames of the whole video (all scenes)."""
        return self.frames_per_scene * self.num_scenes

    @property
    def denoise_strength(self) -> float:
        """Animation: the strength in effect (the request's, or the default)."""
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    def identity(self) -> dict:
        """What makes the video what it is (hashed into `video_id`): the request without the fields a
        text2video or image2video request leaves at their defaults (so those keep the ids they had before
        animations and scenes existed), nor the ones an animation ignores."""
        data = self.model_dump(mode="json")
        if self.mode != "animation":
            data.pop("mode")  # implied by the image
        else:
            data.pop("fps")  # an animation has neither
            data.pop("motion")
        for name in ("camera", "strength", "scenes"):
            if data[name] is None:
                data.pop(name)
        if data["noise_augmentation"] == NOISE_AUGMENTATION:
            data.pop("noise_augmentation")
        return data
