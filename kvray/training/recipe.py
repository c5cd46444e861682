"""The recipe's steps, their order, what each needs and its schedule: torch-free, so that the command
line (`kvray train --help`, and every `kvray` command that builds the parser) loads no torch."""

from __future__ import annotations

from typing import NamedTuple


class Recipe(NamedTuple):
    steps: int
    lr: float


# The shipped toy weights' schedule (docs/training.md), in the order `kvray train all` runs the steps:
# optimiser steps and peak learning rate per step.
RECIPE: dict[str, Recipe] = {
    "image_movq": Recipe(1500, 5e-4),
    "first_frame": Recipe(2000, 1e-3),
    "keyframes": Recipe(4000, 1e-3),
    "interpolation": Recipe(900, 1e-3),
    # After interpolation, which starts from the keyframe U-Net of `keyframes` (as the shipped one did).
    "keyframes_motion": Recipe(3000, 1e-3),
    "video_movq": Recipe(400, 3e-4),
}
STEP_NAMES = tuple(RECIPE)
# Not part of the recipe (`kvray train all`): a LoRA adapter on a finished model (docs/training.md).
LORA = "lora"
LORA_RECIPE = Recipe(1500, 1e-3)
# What each step needs finished first.
NEEDS: dict[str, tuple[str, ...]] = {
    "image_movq": (),
    "first_frame": ("image_movq",),
    "keyframes": ("first_frame",),
    "interpolation": ("keyframes",),
    "keyframes_motion": ("keyframes",),
    "video_movq": ("image_movq",),
}
