"""The shipped toy model behaves: a test that fails when the pipeline's behaviour breaks.

The shipped weights are an early toy model (docs/benchmarks.md has its score): its backgrounds and
object colours follow the prompt and hold still from frame to frame, its first frame follows a given
image and its interpolation fills the frames between keyframes in order, while its shapes are often
blobs and its motion is not yet learned. So each check asserts a property that model holds with a
margin, and that a broken pipeline loses:

- text conditioning and decoding: the background and the object's colour are the prompt's, and the
  background does not flicker (a dropped or swapped context, or the wrong MoVQ, gives other colours);
- first-frame conditioning and keyframe order: image2video's frame 0 is the given image, far closer to
  it than a frame 0 drawn from the prompt alone (a zeroed condition, or reversed keyframes, gives a
  frame 0 of the model's own);
- interpolation (expected to fail today: the shipped interpolation U-Net draws noise between the
  keyframes): the middle frame of each gap is close to the blend of its own two keyframes, closer than
  to the neighbouring gap's.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kvray.config import RuntimeConfig
from kvray.config.models import ModelSource
from kvray.pipeline import VideoPipeline, VideoRequest
from kvray.toyworld.judge import FIRST_FRAME_THRESHOLD, FLICKER_THRESHOLD, observe

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


@pytest.mark.parametrize("prompt, colour, background", [
    ("a red circle moves right on a black background", "red", "black"),
    ("a blue square moves left on a white background", "blue", "white"),
])
def test_the_background_and_the_object_have_the_prompts_colours(pipeline, prompt, colour, background):
    seen = observe(_video(pipeline, prompt, seed=1))
    assert (seen.background, seen.colour) == (background, colour), seen.to_dict()
    assert seen.flicker < FLICKER_THRESHOLD, seen.to_dict()


@pytest.fixture(scope="module")
def drawn_circle(pipeline):
    """image2video of a drawing, fps medium: 45 frames, keyframes at 0, 4, ..., 44."""
    image = np.asarray(Image.open(IMAGE).convert("RGB").resize((64, 64), Image.BICUBIC)).astype(np.float32)
    frames = _video(pipeline, DRAWN_PROMPT, fps="medium", image=str(IMAGE))
    return image, frames.astype(np.float32)


DRAWN_PROMPT = "a green circle moves left on a black background"


def test_image2video_starts_from_the_image(pipeline, drawn_circle):
    """Frame 0 is the given image (a black drawing), even under a prompt that names another background,
    whose frame 0 drawn from the prompt alone is white: a dropped first-frame condition, or keyframes out
    of order, gives that white frame 0."""
    image, frames = drawn_circle
    assert np.abs(frames[0] - image).mean() < FIRST_FRAME_THRESHOLD
    other = "a yellow square stays still on a white background"
    from_image = np.abs(_video(pipeline, other, seed=0, image=str(IMAGE)).astype(np.float32)[0] - image).mean()
    from_prompt = np.abs(_video(pipeline, other, seed=0).astype(np.float32)[0] - image).mean()
    assert from_image < 0.3 * from_prompt, (from_image, from_prompt)


@pytest.mark.xfail(strict=True, reason="the shipped interpolation U-Net draws noise between keyframes "
                                       "(docs/training.md); this passes once it does not")
def test_interpolated_frames_lie_between_their_own_keyframes(drawn_circle):
    _, frames = drawn_circle
    assert frames.shape[0] == 45
    blend = [(frames[4 * g] + frames[4 * g + 4]) / 2 for g in range(11)]  # the middle of each gap
    middle = [frames[4 * g + 2] for g in range(11)]
    own = np.mean([np.abs(m - blend[g]).mean() for g, m in enumerate(middle)])
    neighbour = np.mean([np.abs(m - blend[g + 1 if g < 10 else g - 1]).mean() for g, m in enumerate(middle)])
    assert own < 0.85 * neighbour and own < FIRST_FRAME_THRESHOLD, (own, neighbour)


def test_the_shipped_version_names_the_shipped_tensors():
    """VERSION (in every video id made with the shipped weights) is the digest of the tensors shipped
    beside it: weights replaced without `kvray train export` fail here."""
    import fsspec

    from kvray.config.models import shipped_toy_weights
    from kvray.training.loop import weights_digest
    from kvray.weights.networks import NETWORKS

    folder, version = shipped_toy_weights()
    assert weights_digest(fsspec.filesystem("file"), folder, NETWORKS) == version
