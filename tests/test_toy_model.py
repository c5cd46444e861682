"""The shipped toy model behaves: a test that fails when the pipeline's behaviour breaks.

The shipped weights are an early toy model (docs/benchmarks.md has its score): its object colours
follow the prompt, its first frame follows a given image and its interpolation fills the frames
between keyframes in order, while its backgrounds flicker and its motion is not yet learned. So each
check asserts a property that model holds with a margin, and that a broken pipeline loses:

- text conditioning and decoding: the object's colour is the prompt's (a dropped or swapped context,
  or the wrong MoVQ, gives other colours);
- first-frame conditioning and keyframe order: image2video's frame 0 is far closer to the given image
  than its last frame is (a zeroed condition doubles frame 0's distance, reversed keyframes swap them);
- interpolation: the middle frame of each gap is closer to the blend of its own two keyframes than to
  the neighbouring gap's (frames filled into the wrong gaps are not).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kvray.config import RuntimeConfig
from kvray.config.models import ModelSource
from kvray.pipeline import VideoPipeline, VideoRequest
from kvray.toyworld.judge import observe

from .conftest import REPO_ROOT

# Fewer steps than the official 50 keep the test fast.
STEPS = 20
IMAGE = REPO_ROOT / "examples" / "images" / "shapes.png"  # drawn with Pillow, never seen in training


@pytest.fixture(scope="module")
def pipeline():
    return VideoPipeline(ModelSource(), RuntimeConfig(device="cpu"))


def _video(pipeline, prompt, *, fps="low", seed=0, image=None) -> np.ndarray:
    request = VideoRequest(prompt=prompt, fps=fps, seed=seed, width=64, height=64, steps=STEPS, image=image)
    return pipeline.generate([request])[0].frames


@pytest.mark.parametrize("prompt, colour", [("a red circle moves right on a black background", "red"),
                                            ("a blue square moves left on a white background", "blue")])
def test_the_object_has_the_prompts_colour(pipeline, prompt, colour):
    frames = _video(pipeline, prompt, seed=1)
    assert observe(frames).colour == colour, observe(frames).to_dict()


@pytest.fixture(scope="module")
def drawn_circle(pipeline):
    """image2video of a drawing, fps medium: 45 frames, keyframes at 0, 4, ..., 44."""
    image = np.asarray(Image.open(IMAGE).convert("RGB").resize((64, 64), Image.BICUBIC)).astype(np.float32)
    frames = _video(pipeline, "a green circle moves left on a black background", fps="medium", image=str(IMAGE))
    return image, frames.astype(np.float32)


def test_image2video_starts_from_the_image(drawn_circle):
    image, frames = drawn_circle
    first, last = (np.abs(frames[i] - image).mean() for i in (0, -1))
    assert first < 0.5 * last, (first, last)


def test_interpolated_frames_lie_between_their_own_keyframes(drawn_circle):
    _, frames = drawn_circle
    assert frames.shape[0] == 45
    blend = [(frames[4 * g] + frames[4 * g + 4]) / 2 for g in range(11)]  # the middle of each gap
    middle = [frames[4 * g + 2] for g in range(11)]
    own = np.mean([np.abs(m - blend[g]).mean() for g, m in enumerate(middle)])
    neighbour = np.mean([np.abs(m - blend[g + 1 if g < 10 else g - 1]).mean() for g, m in enumerate(middle)])
    assert own < 0.85 * neighbour, (own, neighbour)


def test_the_shipped_version_names_the_shipped_tensors():
    """VERSION (in every video id made with the shipped weights) is the digest of the tensors shipped
    beside it: weights replaced without `kvray train export` fail here."""
    import fsspec

    from kvray.config.models import shipped_toy_weights
    from kvray.training.loop import weights_digest
    from kvray.weights.networks import NETWORKS

    folder, version = shipped_toy_weights()
    assert weights_digest(fsspec.filesystem("file"), folder, NETWORKS) == version
