"""Sampling settings: the solver of each stage, guidance weights, motion scores and fps passes.

Defaults are the official Kandinsky Video 1.1 values (`kandinsky_video/model/diffusion.py`,
`kandinsky_video/t2v_pipeline.py`). Step counts and the solver are settings; the noise schedule itself
(cosine betas, zero terminal SNR, x0 clipping) belongs to the trained networks and is fixed in
`schedulers.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplerConfig(BaseModel):
    """How one stage walks the noise schedule.

    `solver="ddpm"` is the official ancestral sampler (one Gaussian draw per step with t > 0).
    `solver="dpmsolver++"` is diffusers' `DPMSolverMultistepScheduler` on the same schedule
    (deterministic, second order by default), meant for fewer steps (e.g. 20-25 instead of 50 for the
    epsilon stages). It is an option, never the default: its outputs differ from the official sampler's
    and its quality with these networks has not been measured here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "sample" (x0) is no official network's: the toy's interpolation U-Net predicts it (see the presets).
    prediction_type: Literal["epsilon", "v_prediction", "sample"]
    num_steps: int = Field(ge=1, le=1000)
    # "leading" (980, 960, ..., 0) for the epsilon stages; "trailing" (999, 899, ..., 99) for the v stage:
    # with zero terminal SNR an epsilon network cannot be evaluated at t = 999 (x0 = (x - eps) / 0).
    timestep_spacing: Literal["leading", "trailing", "linspace"]
    solver: Literal["ddpm", "dpmsolver++"] = "ddpm"
    solver_order: Literal[1, 2, 3] = 2  # dpmsolver++ only


FIRST_FRAME_SAMPLER = SamplerConfig(prediction_type="epsilon", num_steps=50, timestep_spacing="leading")
KEYFRAME_SAMPLER = SamplerConfig(prediction_type="epsilon", num_steps=50, timestep_spacing="leading")
INTERPOLATION_SAMPLER = SamplerConfig(prediction_type="v_prediction", num_steps=10, timestep_spacing="trailing")


class GuidanceConfig(BaseModel):
    """Classifier-free guidance weights of one request (official `__call__` defaults).

    The README example of the official repo uses `guidance_weight_image=3.0`; the code default is 2.0.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_frame_guidance_scale: float = 5.0  # first frame: (w + 1) cond - w uncond, i.e. an effective scale of 6
    guidance_weight_prompt: float = 5.0  # keyframes, w_T of the 3-way guidance
    guidance_weight_image: float = 2.0  # keyframes, w_I of the 3-way guidance
    interpolation_guidance_scale: float = 0.5  # interpolation: (w + 1) cond - w uncond


class SamplingConfig(BaseModel):
    """The solver of each stage. Per-request settings (guidance weights, motion, noise augmentation,
    step counts) live in the request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_frame: SamplerConfig = FIRST_FRAME_SAMPLER
    keyframes: SamplerConfig = KEYFRAME_SAMPLER
    interpolation: SamplerConfig = INTERPOLATION_SAMPLER
    num_keyframes: int = Field(default=12, ge=2)

    def for_keyframe_unet(self, prediction_type: Literal["epsilon", "v_prediction"]) -> SamplingConfig:
        """These settings for a keyframe U-Net that predicts `prediction_type` (the preset's
        `keyframe_prediction`): a v network starts at t = 999 (trailing spacing), where it predicts x0."""
        if prediction_type == self.keyframes.prediction_type == self.first_frame.prediction_type:
            return self
        update = {"prediction_type": prediction_type,
                  "timestep_spacing": "trailing" if prediction_type == "v_prediction" else "leading"}
        return self.model_copy(update={"first_frame": self.first_frame.model_copy(update=update),
                                       "keyframes": self.keyframes.model_copy(update=update)})

    def for_interpolation_unet(self, prediction_type: Literal["v_prediction", "sample"]) -> SamplingConfig:
        """These settings for an interpolation U-Net that predicts `prediction_type` (the preset's
        `interpolation_prediction`); the official one predicts v."""
        if prediction_type == self.interpolation.prediction_type:
            return self
        return self.model_copy(update={"interpolation": self.interpolation.model_copy(
            update={"prediction_type": prediction_type})})


# Diffusion time at which the first frame is noised before it conditions the keyframes (also fed to the
# U-Net as `noise_aug_time`); the official default.
NOISE_AUGMENTATION = 20

# Official MOTION_SCORES. "extreme" is in the official code but not in its README. The official
# pipeline silently turns any other value (including its own default, "normal") into "medium";
# here an unknown name is an error. `Motion` is the one type of a motion name everywhere.
MOTION_SCORES: dict[str, int] = {"low": 1, "medium": 10, "high": 50, "extreme": 100}
Motion = Literal["low", "medium", "high", "extreme"]


def motion_score(motion: str | int) -> int:
    """The U-Net's motion-score input for a motion name (an int passes through unchanged)."""
    if isinstance(motion, bool):
        raise TypeError("motion must be a name or an int score, not a bool")
    if isinstance(motion, int):
        if motion < 0:
            raise ValueError(f"motion score must be >= 0, got {motion}")
        return motion
    try:
        return MOTION_SCORES[motion]
    except (KeyError, TypeError):
        raise ValueError(f"unknown motion {motion!r}; choose one of {sorted(MOTION_SCORES, key=MOTION_SCORES.get)}") from None


# Interpolation passes per fps setting: each pass turns N frames into 4N - 3 (12 -> 45 -> 177); the
# value is the U-Net's `skip_frames` input of that pass (official SKIP_FRAMES_MEDIUM_FPS / _HIGH_FPS).
FPS_PASSES: dict[str, tuple[int, ...]] = {"low": (), "medium": (3,), "high": (3, 1)}
Fps = Literal["low", "medium", "high"]


def interpolation_passes(fps: str) -> tuple[int, ...]:
    """`skip_frames` of each interpolation pass for an fps name ('low' has none)."""
    try:
        return FPS_PASSES[fps]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fps {fps!r}; choose one of {list(FPS_PASSES)}") from None
