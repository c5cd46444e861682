"""Configs: architecture (fixes weight shapes) and named presets."""

from .arch import InterpolationUNetConfig, KeyframeUNetConfig, MoVQConfig, T5Config, TextEncoderConfig
from .presets import KV11, PRESETS, TINY, ModelPreset, get_preset
from .runtime import RuntimeConfig

__all__ = [
    "InterpolationUNetConfig", "KeyframeUNetConfig", "MoVQConfig", "T5Config", "TextEncoderConfig",
    "KV11", "PRESETS", "TINY", "ModelPreset", "get_preset", "RuntimeConfig",
]
