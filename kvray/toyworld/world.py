"""A procedural world of one coloured shape moving on a plain background, with captions.

Everything is a deterministic function of a seed: no files, no downloads. A `Scene` fixes what a clip
shows (the four words of its caption plus where the shape starts, how big it is and how fast it
moves); `render` draws it at any frame count and size. Time runs from 0 to 1 over the clip whatever
the frame count, so the 12 keyframes are frames 0, 4, 8, ... of the 45-frame clip and frames
0, 16, 32, ... of the 177-frame clip: exactly the frames the interpolation U-Net keeps.

Beside the base vocabulary the shipped model was trained on (`SHAPES`, `all_combos`), the world can draw
concept shapes (`CONCEPT_SHAPES`) the base model never saw, to teach it one new word by fine-tuning:
`concept_combos`, split into `concept_training_combos` and `concept_held_out_combos`.

The motion score (the keyframe U-Net's `motion_score` input) is the speed of the motion the caption
names: a "moves left" clip at score 50 travels further than one at score 1. A still shape stays still
at any score, so every score is a valid request for every caption.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
# Shapes outside the base vocabulary: never in `all_combos`, so the shipped model has never seen them.
CONCEPT_SHAPES = ("star",)
# The star's inner (notch) radius as a share of its outer one.
STAR_INNER = 0.45
# Stars are drawn larger than the base shapes: in the base shapes' box a star's points are 2-3 pixels wide at
# 64x64, under the MoVQ's 4x downsampling, and the shipped image MoVQ's round trip kept the shape in 13 of 24
# held-out star clips; at 1.3x the radius, in 24 of 24 (its area is then about a triangle's).
SIZE_FACTOR = {"star": 1.3}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "stays still")
# Unit direction of the centre per motion, in (x, y) with y down the image.
DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}

# Motion scores (the official low/medium/high/extreme) and how far each carries the shape: the travel
# as a share of the frame side, the growth as a factor of the radius.
MOTION_SCORES = (1, 10, 50, 100)
TRAVEL = {1: 0.22, 10: 0.32, 50: 0.4, 100: 0.48}
GROWTH = {1: 1.35, 10: 1.6, 50: 1.8, 100: 2.0}
RADIUS = (0.11, 0.16)  # the shape's radius (half its width) at the start, as a share of the frame side

CANONICAL = "a {colour} {shape} {motion} on a {background} background"
PHRASINGS = (
    CANONICAL,
    "a {background} background with a {colour} {shape} that {motion}",
    "{colour} {shape}, {background} background, {motion}",
    "the {colour} {shape} {motion} on {background}",
    "on a {background} background a {colour} {shape} {motion}",
)

Combo = tuple[str, str, str, str]  # (colour, shape, motion, background)


def _combos(shapes: tuple[str, ...]) -> list[Combo]:
    return [(c, s, m, b) for c, s, m, b in itertools.product(COLOURS, shapes, MOTIONS, BACKGROUNDS) if c != b]


def all_combos() -> list[Combo]:
    """Every (colour, shape, motion, background) of the base vocabulary: never a shape on its own colour."""
    return _combos(SHAPES)


def concept_combos(shape: str = "star") -> list[Combo]:
    """Every combination with the concept shape `shape`, never on its own colour as in `all_combos`."""
    if shape not in CONCEPT_SHAPES:
        raise ValueError(f"concept shapes are {CONCEPT_SHAPES}, got {shape!r}")
    return _combos((shape,))


HELD_OUT_SHARE = 0.15
# A concept is learnt from few combinations, so a larger share is kept back to test that it generalises.
CONCEPT_HELD_OUT_SHARE = 0.3


def _combo_rank(combo: Combo) -> bytes:
    return hashlib.sha256("|".join(combo).encode()).digest()


def _held_out(combos: list[Combo], share: float) -> list[Combo]:
    """A fixed `share` of `combos`, by a hash order that does not depend on what else is in the list."""
    return sorted(sorted(combos, key=_combo_rank)[: round(len(combos) * share)])


def held_out_combos() -> list[Combo]:
    """The combinations never shown in training (15%, by a fixed hash order): the quality score's prompts."""
    return _held_out(all_combos(), HELD_OUT_SHARE)


def training_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


def concept_held_out_combos(shape: str = "star") -> list[Combo]:
    """The concept's combinations never shown in fine-tuning (30%, by the same hash order)."""
    return _held_out(concept_combos(shape), CONCEPT_HELD_OUT_SHARE)


def concept_training_combos(shape: str = "star") -> list[Combo]:
    held = set(concept_held_out_combos(shape))
    return [c for c in concept_combos(shape) if c not in held]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str
    x: float  # centre at t = 0, as a share of the width
    y: float
    radius: float  # at t = 0, as a share of the side
    score: int  # motion score: how far the motion carries

    @property
    def combo(self) -> Combo:
        return (self.colour, self.shape, self.motion, self.background)

    def caption(self, phrasing: int = 0) -> str:
        return PHRASINGS[phrasing].format(colour=self.colour, shape=self.shape, motion=self.motion,
                                          background=self.background)

    def at(self, t: float) -> tuple[float, float, float]:
        """(x, y, radius) at time t in [0, 1]."""
        if self.motion in DIRECTIONS:
            dx, dy = DIRECTIONS[self.motion]
            travel = TRAVEL[self.score] * t
            return self.x + dx * travel, self.y + dy * travel, self.radius
        if self.motion == "grows":
            return self.x, self.y, self.radius * GROWTH[self.score] ** t
        if self.motion == "shrinks":
            return self.x, self.y, self.radius / GROWTH[self.score] ** t
        return self.x, self.y, self.radius

    def to_dict(self) -> dict:
        return asdict(self)


def parse_caption(caption: str) -> Combo:
    """The combination a canonical caption names; ValueError for any other text."""
    for colour, shape, motion, background in _combos(SHAPES + CONCEPT_SHAPES):
        if caption == CANONICAL.format(colour=colour, shape=shape, motion=motion, background=background):
            return colour, shape, motion, background
    raise ValueError(f"not a canonical toy-world caption: {caption!r} (expected {CANONICAL!r})")


def sample_scene(rng: np.random.Generator, combo: Combo, score: int | None = None) -> Scene:
    """A random placement of `combo` whose whole path stays inside the frame."""
    colour, shape, motion, background = combo
    score = int(rng.choice(MOTION_SCORES)) if score is None else score
    if score not in TRAVEL:
        raise ValueError(f"toy-world motion scores are {MOTION_SCORES}, got {score}")
    if motion == "shrinks":
        radius = float(rng.uniform(RADIUS[1], RADIUS[1] * 1.3))
    elif motion == "grows":
        radius = float(rng.uniform(RADIUS[0] * 0.8, RADIUS[0]))
    else:
        radius = float(rng.uniform(*RADIUS))
    radius *= SIZE_FACTOR.get(shape, 1.0)
    reach = radius * (GROWTH[score] if motion == "grows" else 1.0) + 0.02
    low, high = [reach, reach], [1 - reach, 1 - reach]
    if motion in DIRECTIONS:
        for axis, step in enumerate(DIRECTIONS[motion]):
            if step < 0:
                low[axis] += TRAVEL[score]
            elif step > 0:
                high[axis] -= TRAVEL[score]
    x, y = (float(rng.uniform(lo, hi)) for lo, hi in zip(low, high))
    return Scene(colour, shape, motion, background, x, y, radius, score)


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Inside-tests on pixel-centre grids (in shares of the side)."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "star":
        return _star_mask(xs - cx, ys - cy, r)
    # An upright isosceles triangle filling the same box: apex at the top, base at the bottom.
    v = (ys - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
    return (v >= 0) & (v <= 1) & (np.abs(xs - cx) <= r * v)


def _star_mask(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """An upright five-pointed star with its points on the circle of radius r, so that it fits the same box as
    the other shapes and its centroid is the centre. Mirror symmetry folds every point into the first half
    point (angle 0-36 degrees from the top tip), bounded by the edge from the tip to the next notch."""
    half = np.pi / 5
    angle = np.mod(np.arctan2(dx, -dy), 2 * half)
    angle = np.minimum(angle, 2 * half - angle)
    distance = np.hypot(dx, dy)
    along, across = distance * np.cos(angle), distance * np.sin(angle)
    inner = STAR_INNER * r
    # Inside: on the centre's side of the line from the tip (r, 0) to the notch (inner cos 36, inner sin 36).
    return inner * np.sin(half) * (r - along) >= (r - inner * np.cos(half)) * across


SUPERSAMPLE = 4  # sub-pixels per side: smooth edges, so a slow motion is a smooth change of pixels


def render(scene: Scene, num_frames: int, size: int | tuple[int, int] = 64, indices=None) -> np.ndarray:
    """The clip as uint8 (num_frames, H, W, 3); `size` is W = H or (W, H). Frame i shows t = i / (n - 1).
    `indices`: only those frames of the num_frames-frame clip, in that order."""
    width, height = (size, size) if isinstance(size, int) else size
    side = min(width, height)
    grid = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = ((np.arange(width)[:, None] + grid[None]).reshape(-1) - (width - side) / 2) / side
    ys = ((np.arange(height)[:, None] + grid[None]).reshape(-1) - (height - side) / 2) / side
    grid_x, grid_y = np.meshgrid(xs, ys)
    object_colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    indices = range(num_frames) if indices is None else indices
    frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    for out, index in enumerate(indices):
        t = index / (num_frames - 1) if num_frames > 1 else 0.0
        mask = _shape_mask(scene.shape, grid_x, grid_y, *scene.at(t)).astype(np.float32)
        # (H s) (W s) -> H W: the share of each pixel that the shape covers
        cover = mask.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        frames[out] = np.round(background + cover * (object_colour - background)).astype(np.uint8)
    return frames


@dataclass(frozen=True)
class Clip:
    scene: Scene
    caption: str


def sample_clips(seed: int, count: int, combos: list[Combo] | None = None, *, canonical_share: float = 0.5) -> list[Clip]:
    """`count` random scenes of `combos` (default: the training combinations), each with a caption: the
    canonical one with probability `canonical_share`, else another phrasing. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    combos = training_combos() if combos is None else combos
    clips = []
    for _ in range(count):
        scene = sample_scene(rng, combos[int(rng.integers(len(combos)))])
        phrasing = 0 if rng.random() < canonical_share else int(rng.integers(1, len(PHRASINGS)))
        clips.append(Clip(scene, scene.caption(phrasing)))
    return clips
