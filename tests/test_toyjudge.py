"""The toy-world judge: right on rendered clips (clean and degraded), wrong where the clip is wrong."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from kvray.toyworld import world
from kvray.toyworld.judge import CRITERIA, FLICKER_THRESHOLD, Observation, judge, observe, score

FRAMES, SIZE = 12, 64
# Where each criterion's value sits in a combo (colour, shape, motion, background).
SLOT = {"colour": 0, "shape": 1, "motion": 2, "background": 3}


@pytest.fixture(scope="module")
def clips() -> list[tuple[world.Combo, world.Scene, np.ndarray]]:
    """Every combination once, at a random placement and motion score (seeded)."""
    rng = np.random.default_rng(0)
    out = []
    for combo in world.all_combos():
        scene = world.sample_scene(rng, combo)
        out.append((combo, scene, world.render(scene, FRAMES, SIZE)))
    return out


@pytest.fixture(scope="module")
def truth(clips) -> list[dict[str, bool]]:
    return [judge(frames, combo) for combo, _, frames in clips]


def _degrade(kind: str, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = frames.astype(np.float32)
    if kind == "noise":
        x = x + rng.normal(0.0, 10.0, x.shape)
    elif kind == "blur":
        x = np.stack([cv2.GaussianBlur(frame, (3, 3), 0.8) for frame in x])
    elif kind == "shift":
        x = x + rng.choice([-15.0, 15.0], size=3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_ground_truth_is_judged_right(clips, truth):
    shares = score(truth)
    assert set(shares) == {*CRITERIA, "all"}
    assert shares["all"] >= 0.98, shares
    # Every value of every word is recognised: no colour, shape, motion or background the judge can't see.
    for criterion, slot in SLOT.items():
        values = {combo[slot] for combo, _, _ in clips}
        assert values == set({"colour": world.COLOURS, "shape": world.SHAPES, "motion": world.MOTIONS,
                              "background": world.BACKGROUNDS}[criterion])
        for value in values:
            right = [r[criterion] for (combo, _, _), r in zip(clips, truth) if combo[slot] == value]
            assert np.mean(right) >= 0.95, (criterion, value, np.mean(right))


def test_observation_names_what_was_drawn(clips):
    combo, _, frames = clips[0]
    seen = observe(frames)
    assert isinstance(seen, Observation)
    assert (seen.colour, seen.shape, seen.motion, seen.background) == combo
    assert seen.flicker == 0.0 and seen.first_frame_error is None
    assert set(seen.to_dict()) == {"background", "colour", "shape", "motion", "flicker", "first_frame_error"}


@pytest.mark.parametrize("kind", ["noise", "blur", "shift"])
def test_degraded_clips_are_still_judged_right(clips, kind):
    # A sixth of the combinations each (a different sixth per degradation) keeps the test fast.
    offset = ["noise", "blur", "shift"].index(kind)
    rng = np.random.default_rng(1 + offset)
    results = [judge(_degrade(kind, frames, rng), combo) for combo, _, frames in clips[offset::6]]
    assert len(results) >= 50
    assert score(results)["all"] >= 0.95, score(results)


def test_other_frame_counts_and_sizes():
    rng = np.random.default_rng(2)
    for combo, frames, size in [(("red", "triangle", "moves up", "white"), 45, 128),
                                (("blue", "square", "shrinks", "black"), 177, 64),
                                (("yellow", "circle", "moves right", "gray"), 45, (96, 64)),
                                (("red", "star", "moves up", "white"), 45, 128),
                                (("green", "star", "shrinks", "black"), 45, 64),
                                (("purple", "star", "moves right", "gray"), 45, (96, 64))]:
        clip = world.render(world.sample_scene(rng, combo), frames, size)
        assert judge(clip, combo)["all"], (combo, observe(clip))


def test_reversed_motion_is_wrong(clips):
    reverse = {"moves left": "moves right", "moves up": "moves down", "grows": "shrinks"}
    checked = 0
    for combo, _, frames in clips:
        if combo[2] in reverse and combo[0] == "red":
            result = judge(frames[::-1], combo)
            assert not result["motion"] and not result["all"], combo
            assert observe(frames[::-1]).motion == reverse[combo[2]]
            checked += 1
    assert checked == 3 * 3 * 3  # 3 motions x 3 shapes x 3 backgrounds


def test_frozen_clip_does_not_grow(clips):
    for combo, _, frames in clips:
        if combo[2] == "grows" and combo[0] == "green":
            frozen = np.repeat(frames[:1], len(frames), axis=0)
            assert not judge(frozen, combo)["motion"]
            assert observe(frozen).motion == "stays still"


def test_swapped_colour_is_wrong(clips):
    for combo, scene, _ in clips[::9]:
        other = next(c for c in world.COLOURS if c not in (combo[0], combo[3]))
        swapped = world.render(dataclasses.replace(scene, colour=other), FRAMES, SIZE)
        result = judge(swapped, combo)
        assert not result["colour"] and not result["all"], (combo, other)
        assert result["shape"] and result["motion"] and result["background"]


def test_pure_noise_is_wrong():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for combo in world.all_combos()[::20]:
        assert not judge(noise, combo)["all"]
    assert not judge(noise, ("red", "circle", "stays still", "gray"))["flicker"]


def test_alternating_background_flickers(clips):
    for combo, _, frames in clips[::15]:
        flickering = frames.copy()
        other = np.array(world.BACKGROUNDS["gray" if combo[3] != "gray" else "white"], np.uint8)
        odd = flickering[1::2]
        odd[(odd == np.array(world.BACKGROUNDS[combo[3]], np.uint8)).all(-1)] = other
        flickering[1::2] = odd
        result = judge(flickering, combo)
        assert not result["flicker"] and not result["all"], combo
        assert observe(flickering).flicker >= FLICKER_THRESHOLD
        assert observe(frames).flicker < FLICKER_THRESHOLD


def test_first_frame(clips):
    combo, scene, frames = clips[5]
    result = judge(frames, combo, image=frames[0])
    assert set(result) == {*CRITERIA, "first_frame", "all"} and result["first_frame"] and result["all"]
    assert observe(frames, frames[0]).first_frame_error == 0.0
    # A larger render of the same first frame is resized to the clip and still matches.
    big = world.render(scene, FRAMES, 2 * SIZE, indices=[0])[0]
    assert judge(frames, combo, image=big)["first_frame"]
    # Another scene's first frame (another background, another placement) does not.
    _, _, other_frames = next(c for c in clips if c[0][3] != combo[3])
    result = judge(frames, combo, image=other_frames[0])
    assert not result["first_frame"] and not result["all"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        observe(np.zeros((SIZE, SIZE, 3), np.uint8))


def test_score():
    results = [
        {"background": True, "colour": True, "shape": True, "motion": True, "flicker": True, "all": True},
        {"background": True, "colour": False, "shape": True, "motion": False, "flicker": True, "all": False},
        {"background": False, "colour": False, "shape": True, "motion": True, "flicker": True,
         "first_frame": False, "all": False},
        {"background": True, "colour": True, "shape": False, "motion": True, "flicker": False,
         "first_frame": True, "all": False},
    ]
    assert score(results) == {"background": 0.75, "colour": 0.5, "shape": 0.75, "motion": 0.75, "flicker": 0.75,
                              "first_frame": 0.5, "all": 0.25}
