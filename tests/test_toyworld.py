"""The toy world's concept shape, the star: outside the base vocabulary, drawn as a star, judged as one."""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import pytest

from kvray.toyworld import world
from kvray.toyworld.judge import judge, observe

FRAMES, SIZE = 12, 64
# (colour, background) pairs that use every colour and every background between them.
PAIRS = [("red", "gray"), ("green", "white"), ("blue", "black"), ("yellow", "gray"), ("purple", "white"),
         ("white", "black"), ("purple", "gray")]


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """A stand-in for a model's soft output: a Gaussian blur of `sigma` pixels."""
    return np.stack([cv2.GaussianBlur(frame, (0, 0), sigma) for frame in frames])


def _noise(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.round(frames + rng.normal(0.0, 10.0, frames.shape)), 0, 255).astype(np.uint8)


def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


def test_the_base_vocabulary_is_what_the_shipped_model_was_trained_on():
    assert world.SHAPES == ("circle", "square", "triangle")
    assert len(world.all_combos()) == 357
    assert len(world.held_out_combos()) == 54 and len(world.training_combos()) == 303
    assert _digest(world.held_out_combos()) == "5f19f4a5d8b305fcfafb2e159eada99ce6fa558d296846ad3885f744ef0cb9f7"
    clips = world.sample_clips(0, 20)
    assert _digest([(c.scene.to_dict(), c.caption) for c in clips]) == (
        "871961fd8db7f2502f1dd53ee393e4b74906eae7539f89d4abb6f006c5fdf773")
    for combos in (world.all_combos(), world.held_out_combos(), world.training_combos()):
        assert all(shape not in world.CONCEPT_SHAPES for _, shape, _, _ in combos)
    assert "star" in world.CONCEPT_SHAPES and "star" not in world.SHAPES


def test_the_concept_split_is_fixed_disjoint_and_covering():
    combos = world.concept_combos("star")
    assert combos == world.concept_combos()
    assert len(combos) == len(set(combos)) == 6 * 7 * 3 - 7  # never white on white
    assert all(shape == "star" and colour != background for colour, shape, _, background in combos)
    held, training = world.concept_held_out_combos("star"), world.concept_training_combos("star")
    assert len(held) == round(0.3 * len(combos)) and not set(held) & set(training)
    assert sorted(held + training) == sorted(combos)
    assert held == world.concept_held_out_combos()  # the same every call
    with pytest.raises(ValueError):
        world.concept_combos("circle")


def test_star_captions_parse_and_sample():
    assert world.parse_caption("a red star moves up on a gray background") == ("red", "star", "moves up", "gray")
    assert world.parse_caption("a red circle moves up on a gray background") == ("red", "circle", "moves up", "gray")
    with pytest.raises(ValueError):
        world.parse_caption("a white star moves up on a white background")
    clips = world.sample_clips(1, 30, world.concept_training_combos())
    assert {clip.scene.combo for clip in clips} <= set(world.concept_training_combos())
    assert all("star" in clip.caption for clip in clips)


def test_the_star_is_an_upright_five_pointed_star_in_the_shapes_box():
    side, r = 400, 0.3
    scene = world.Scene("white", "star", "stays still", "black", 0.5, 0.5, r, 1)
    cover = (world.render(scene, 1, side)[0, ..., 0].astype(np.float64) - 10) / (245 - 10)
    ys, xs = np.nonzero(cover > 0)
    # Its points on the circle of radius r: the top one straight up, the others within the box.
    assert ys.min() / side == pytest.approx(0.5 - r, abs=0.005)
    assert ys.max() / side == pytest.approx(0.5 + r * np.cos(np.pi / 5), abs=0.005)
    assert (xs.max() - xs.min()) / side == pytest.approx(2 * r * np.sin(2 * np.pi / 5), abs=0.005)
    assert np.allclose(cover, cover[:, ::-1], atol=0.02)  # mirror symmetric about the vertical axis
    # Area: ten triangles between a point and a notch (inner radius 0.45 r), far below a triangle's 2 r^2.
    area = cover.sum() / side**2
    assert area == pytest.approx(5 * world.STAR_INNER * np.sin(np.pi / 5) * r * r, rel=0.01)
    centroid = (np.arange(side) @ cover.sum(axis=1)) / cover.sum() / side
    assert centroid == pytest.approx(0.5, abs=0.002)


def _degrade(kind: str, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return {"clean": lambda: frames, "noise": lambda: _noise(frames, rng), "blur": lambda: _blur(frames, 1.0)}[kind]()


def _judged_right(scene: world.Scene, kind: str, rng: np.random.Generator) -> None:
    frames = _degrade(kind, world.render(scene, FRAMES, SIZE), rng)
    assert judge(frames, scene.combo)["all"], (scene, kind, observe(frames))


@pytest.mark.parametrize("kind", ["clean", "noise", "blur"])
def test_stars_are_judged_right_at_every_motion_score_colour_and_background(kind):
    rng = np.random.default_rng(["clean", "noise", "blur"].index(kind))
    for i, motion in enumerate(world.MOTIONS):
        for j, score in enumerate(world.MOTION_SCORES[::3]):  # the lowest and the highest
            colour, background = PAIRS[(i + j) % len(PAIRS)]
            _judged_right(world.sample_scene(rng, (colour, "star", motion, background), score), kind, rng)


@pytest.mark.parametrize("kind", ["clean", "noise", "blur"])
def test_stars_are_judged_right_at_the_smallest_and_largest_sizes(kind):
    rng = np.random.default_rng(3)
    low, high = world.RADIUS
    for motion, radius in [("shrinks", high), ("grows", low), ("stays still", low), ("stays still", high)]:
        # Shrinking at the top score ends at radius 0.08, growing ends at 0.22: the world's extremes.
        _judged_right(world.Scene("yellow", "star", motion, "black", 0.5, 0.5, radius, 100), kind, rng)


@pytest.mark.parametrize("kind", ["clean", "noise", "blur"])
def test_base_shapes_are_still_judged_right(kind):
    rng = np.random.default_rng(4)
    for i, shape in enumerate(world.SHAPES):
        for j, motion in enumerate(world.MOTIONS):
            colour, background = PAIRS[(i + j) % len(PAIRS)]
            _judged_right(world.sample_scene(rng, (colour, shape, motion, background)), kind, rng)


def test_a_star_is_no_base_shape_and_no_base_shape_is_a_star():
    rng = np.random.default_rng(5)
    scene = world.sample_scene(rng, ("blue", "star", "moves left", "white"))
    assert observe(world.render(scene, FRAMES, SIZE)).shape == "star"
    for shape in world.SHAPES:
        other = world.render(dataclasses.replace(scene, shape=shape), FRAMES, SIZE)
        assert observe(other).shape == shape
        result = judge(other, scene.combo)
        assert not result["shape"] and not result["all"] and result["motion"] and result["colour"]
