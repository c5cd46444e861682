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
- interpolation and decoding: the frames the interpolation U-Net draws between a true clip's keyframes
  are that clip's frames, in order (mis-ordered, shifted or noisy frames, or a dropped neighbour, fail).
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
    """image2video of a drawing (fps low: the 12 keyframes)."""
    image = np.asarray(Image.open(IMAGE).convert("RGB").resize((64, 64), Image.BICUBIC)).astype(np.float32)
    frames = _video(pipeline, DRAWN_PROMPT, image=str(IMAGE))
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


def test_interpolation_fills_true_keyframes_in_order(pipeline):
    """The interpolation and decoding stages alone, on the MoVQ latents of a true toy-world clip's
    keyframes (a square crossing the frame, so every gap differs): each frame between two keyframes is the
    clip's own frame there, closer to it than to the same frame of either neighbouring gap (mean absolute
    error on 0-255; the true frames 4 apart differ by 3.8). Frames shifted by a gap either way, or noise
    between the keyframes, fail. The model draws the 3 frames of a gap about as far apart as the true
    ones are (1.9), so their order inside a gap is below what this can see."""
    import torch

    from kvray.pipeline.pipeline import with_seed
    from kvray.toyworld.world import Scene, render
    from kvray.training.data import to_model_pixels

    scene = Scene("yellow", "square", "moves right", "black", x=0.25, y=0.5, radius=0.14, score=100)
    truth = render(scene, 45, 64).astype(np.float32)
    request = with_seed(VideoRequest(prompt=scene.caption(), fps="medium", seed=0, width=64, height=64))
    with torch.no_grad():
        keyframes = pipeline.keyframes.movq.encode(to_model_pixels(render(scene, 45, 64, indices=range(0, 45, 4))))
    texts, _ = pipeline.encode_text([request.prompts])
    latents = pipeline.interpolate([request], texts, [keyframes.float()])[0]
    frames = pipeline.decode(latents, request=request).astype(np.float32)
    assert frames.shape == truth.shape
    between = [i for i in range(4, 41) if i % 4]  # the gaps with a gap on either side

    def error(shift: int) -> float:
        return float(np.mean([np.abs(frames[i] - truth[i + shift]).mean() for i in between]))

    own, previous, following = error(0), error(-4), error(4)
    assert own < FIRST_FRAME_THRESHOLD / 2 and own < 0.85 * min(previous, following), (own, previous, following)


def test_the_shipped_version_names_the_shipped_tensors():
    """VERSION (in every video id made with the shipped weights) is the digest of the tensors shipped
    beside it: weights replaced without `kvray train export` fail here."""
    import fsspec

    from kvray.config.models import shipped_toy_weights
    from kvray.training.loop import weights_digest
    from kvray.weights.networks import NETWORKS

    folder, version = shipped_toy_weights()
    assert weights_digest(fsspec.filesystem("file"), folder, NETWORKS) == version
