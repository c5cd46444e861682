"""The toy world: procedural clips of one coloured shape moving on a plain background (numpy only).

`world` makes the clips and captions; `judge` tells, without learned weights, whether a video shows
what its caption says. The toy preset is trained on the first and scored with the second. The concept
shapes (`CONCEPT_SHAPES`, the star) lie outside the base vocabulary, for teaching a trained model a new word.
"""

from .world import (
    BACKGROUNDS,
    CANONICAL,
    COLOURS,
    CONCEPT_SHAPES,
    MOTION_SCORES,
    MOTIONS,
    PHRASINGS,
    SHAPES,
    Clip,
    Combo,
    Scene,
    all_combos,
    concept_combos,
    concept_held_out_combos,
    concept_training_combos,
    held_out_combos,
    parse_caption,
    render,
    sample_clips,
    sample_scene,
    training_combos,
)

__all__ = [
    "BACKGROUNDS", "CANONICAL", "COLOURS", "CONCEPT_SHAPES", "MOTIONS", "MOTION_SCORES", "PHRASINGS", "SHAPES", "Clip",
    "Combo", "Scene", "all_combos", "concept_combos", "concept_held_out_combos", "concept_training_combos",
    "held_out_combos", "parse_caption", "render", "sample_clips", "sample_scene", "training_combos",
]
