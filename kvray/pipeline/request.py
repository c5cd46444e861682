"""What one video request asks for, validated at the edge."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling.config import GuidanceConfig

Fps = Literal["low", "medium", "high"]
Motion = Literal["low", "medium", "high"]

# Width and height: the U-Nets halve the latent (size / 8) three times and need exact skips.
SIZE_MULTIPLE = 64
MAX_SIDE = 2048
# Frames per fps setting: 12 keyframes, then 4N - 3 per interpolation pass.
NUM_FRAMES = {"low": 12, "medium": 45, "high": 177}


class VideoRequest(BaseModel):
    """One text2video (no `image`) or image2video request. Defaults are the official ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    image: str | None = Field(None, description="path, URL or fsspec URI of the first frame (image2video)")
    width: int = 512
    height: int = 512
    fps: Fps = "low"
    motion: Motion = "medium"
    seed: int | None = Field(None, ge=0, lt=2**63, description="None: a random seed, recorded in the result")
    guidance: GuidanceConfig = GuidanceConfig()
    steps: int | None = Field(None, ge=1, le=1000, description="first-frame and keyframe steps (official 50)")
    interpolation_steps: int | None = Field(None, ge=1, le=1000, description="interpolation steps (official 10)")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
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

    @property
    def mode(self) -> str:
        return "image2video" if self.image else "text2video"

    @property
    def num_frames(self) -> int:
        return NUM_FRAMES[self.fps]
