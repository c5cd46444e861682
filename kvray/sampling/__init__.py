"""Diffusion sampling of Kandinsky Video 1.1: schedulers, guidance, noise sources and the three loops."""

from ..config.sampling import (
    FIRST_FRAME_SAMPLER,
    FPS_PASSES,
    INTERPOLATION_SAMPLER,
    KEYFRAME_SAMPLER,
    MOTION_SCORES,
    GuidanceConfig,
    Motion,
    SamplerConfig,
    SamplingConfig,
    interpolation_passes,
    motion_score,
)
from .batching import LATENT_CHANNELS, TextCondition
from .guidance import guide_2way, guide_3way
from .loops import (
    FRAMES_PER_GROUP,
    LoopOptions,
    ModelFn,
    StepCallback,
    assemble_interpolated,
    denoise,
    interpolate,
    redraw,
    sample_first_frame,
    sample_interpolation,
    sample_keyframes,
)
from .noise import GeneratorNoise, NoiseSource, RecordedNoise
from .scheduler_parity import check_scheduler_golden, check_schedulers_file
from .schedulers import (
    DDPMStepper,
    DPMSolverStepper,
    Stepper,
    add_noise,
    ddpm_scheduler,
    dpm_solver_scheduler,
    dynamic_threshold,
    make_stepper,
)

__all__ = [
    "FIRST_FRAME_SAMPLER", "FPS_PASSES", "INTERPOLATION_SAMPLER", "KEYFRAME_SAMPLER", "MOTION_SCORES",
    "GuidanceConfig", "Motion", "SamplerConfig", "SamplingConfig", "interpolation_passes", "motion_score",
    "guide_2way", "guide_3way",
    "FRAMES_PER_GROUP", "LATENT_CHANNELS", "ModelFn", "StepCallback", "TextCondition", "assemble_interpolated",
    "LoopOptions", "denoise", "interpolate", "redraw", "sample_first_frame", "sample_interpolation", "sample_keyframes",
    "GeneratorNoise", "NoiseSource", "RecordedNoise",
    "check_scheduler_golden", "check_schedulers_file",
    "DDPMStepper", "DPMSolverStepper", "Stepper", "add_noise", "ddpm_scheduler", "dpm_solver_scheduler",
    "dynamic_threshold", "make_stepper",
]
