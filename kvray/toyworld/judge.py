"""Does a video show what its caption says? A toy-world detector with no learned weights (numpy + OpenCV).

The videos judged here come from a small diffusion model, so they are imperfect: colours a little off,
soft edges, noise, a shape that may be a blob. Every measurement is therefore a robust statistic
(medians, nearest palette entry, majority votes over frames) rather than an exact match:

- background: the median colour of the border pixels over all frames, nearest entry of `BACKGROUNDS`.
- object: per frame, the pixels far from that frame's border colour; the largest connected component
  (specks are ignored); no object when it is tiny or covers most of the frame.
- colour: the median colour of the object's core pixels over all frames, nearest entry of `COLOURS`
  (never the background's own colour name: the world never draws a shape on its own colour).
- shape: per frame, the fill ratio (covered area / (widest row x tallest column), measured from the
  share of each pixel the object covers, so soft edges count fractionally: square ~1.0, circle ~0.785,
  triangle ~0.5-0.7) and the vertical skewness of the covered area (an upright triangle has its mass at
  the bottom, skewness -0.57; a circle and a square 0) and, for the concept shape star (`CONCEPT_SHAPES`),
  the five-fold symmetry of the covered area (the 5th angular harmonic of its second moment about the
  centroid: a five-pointed star ~0.5, a circle and a square 0, the upright triangle ~0.13); majority vote
  over frames.
- motion: the centroid and area tracks; start and end are medians over the first and last 15% of frames.
- flicker: how much the background changes between consecutive frames (see `Observation.flicker`).
- first_frame (only when an image is given): mean absolute difference of frame 0 from the image.

`judge` turns an `Observation` into {criterion: right?} for a caption's combination, `score` into shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .world import BACKGROUNDS, COLOURS, CONCEPT_SHAPES, SHAPES, Combo

CRITERIA = ("background", "colour", "shape", "motion", "flicker")

# --- thresholds (all colours in 0-255 RGB units, lengths as shares of the frame's shorter side) ---

# The border ring that gives the background colour, in pixels. The world keeps every shape at least 2%
# of the side away from the edge, so a 2-pixel ring at 64x64 is all background in a correct clip.
BORDER_PX = 2
# A pixel belongs to the object when its colour is this far (Euclidean RGB) from its frame's background.
# The least contrasting pair in the world (purple on gray) is 108 apart, noise of std 10 moves a pixel
# by ~17 on average: 60 keeps whole objects and drops noise.
OBJECT_DISTANCE = 60.0
# An object smaller than this share of the frame is a speck, not a shape: the smallest real one (a
# star shrunk to radius 0.08) covers 0.85%.
MIN_OBJECT_SHARE = 0.005
# A "component" larger than this share of the frame is a broken frame (noise, a wrong background), not an
# object: the largest real one (a square grown to radius 0.22) covers ~19%.
MAX_OBJECT_SHARE = 0.5
# Colour and background matches further than this from their nearest palette entry are "none of them".
# The palette colours are >= 118 apart and the backgrounds >= 200, so a slightly wrong colour still
# finds its entry while a gray mush (noise) does not become an object colour.
COLOUR_TOLERANCE = 100.0
BACKGROUND_TOLERANCE = 100.0
# Shape: an upright triangle's covered area has vertical skewness -0.57, a circle's and a square's 0;
# measured -0.65..-0.44 for triangles and -0.05..0.06 for the others on rendered clips with noise or blur.
TRIANGLE_SKEW = -0.3
# ... and a triangle fills ~0.5 of its box (measured 0.55-0.73: the soft apex and base rows make the
# box look a little small), so a bottom-heavy shape filling more than this (a dome, a blob) is none.
TRIANGLE_MAX_FILL = 0.8
# A shape that is not a triangle is a star when its five-fold symmetry (see `_FrameObject.fivefold`) is above
# this. Measured on rendered clips at every radius the world draws (5-14 pixels at 64x64): stars 0.51-0.58
# clean, >= 0.48 with noise of std 10, >= 0.19 with a Gaussian blur of sigma 1 (the smallest stars blur into
# a blob; >= 0.14 with that blur and the noise); circles and squares <= 0.01 clean, <= 0.053 with noise.
# (Fill cannot tell a small soft star, 0.57-0.97, from a circle, 0.77-0.83; neither can solidity under that
# blur, stars 0.66-0.92 against circles >= 0.86.) A star's skewness stays within -0.19..0.34, never a triangle.
STAR_FIVEFOLD = 0.1
# Fill ratio between a circle (0.785; measured 0.75-0.82 with noise of std 10) and a square (1.0;
# measured >= 0.94 with that noise, which widens the widest row a little): above it a square.
SQUARE_FILL = 0.875
# Motion: start and end positions/areas are medians over this share of the frames at each end.
MOTION_WINDOW = 0.15
# A travel of the centroid beyond this share of the side is a move. The smallest real move is 0.22 of
# the side (0.19 between the window medians of a 12-frame clip); a growing triangle's centroid drifts
# by at most 0.04 (a third of the radius growth).
MOVE_THRESHOLD = 0.08
# An area ratio end/start beyond this factor (or below its inverse) is growth (shrinking). The smallest
# real growth is a radius factor of 1.35 (area 1.8x, ~1.7x between the window medians).
GROW_THRESHOLD = 1.25
# Flicker (see `Observation.flicker`) at or above this is a flickering clip. A still background with
# noise of std 10 per frame measures ~2.5 after the blur; a background that changes colour every other
# frame measures tens.
FLICKER_THRESHOLD = 8.0
# Per-pixel noise is not flicker: the background is box-blurred over this many pixels before comparing.
FLICKER_BLUR_PX = 5
# Frame 0 matches the given image when their mean absolute difference is below this. Noise of std 10
# gives ~8, a colour shift of 15 per channel 15; another background gives > 50.
FIRST_FRAME_THRESHOLD = 20.0


@dataclass(frozen=True)
class Observation:
    """What the detector saw in a clip."""

    background: str | None  # nearest entry of BACKGROUNDS (None: nothing near one)
    colour: str | None  # nearest entry of COLOURS (None: no object, or nothing near one)
    shape: str | None  # one of SHAPES or CONCEPT_SHAPES (None: no object)
    motion: str | None  # one of world.MOTIONS (None: no object)
    # Mean over consecutive frame pairs of the mean absolute change (0-255 units, per pixel and channel)
    # of the background after a FLICKER_BLUR_PX box blur; pixels near the object in either frame are
    # left out. 0 for a single frame.
    flicker: float
    first_frame_error: float | None  # mean absolute difference (0-255) of frame 0 from the given image

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _FrameObject:
    """The object found in one frame."""

    mask: np.ndarray  # bool (H, W), the largest component of pixels far from the background
    colour: np.ndarray  # float (3,), the median colour of the half of its pixels furthest from the background
    area: float  # pixels covered (soft: a pixel half covered counts a half)
    cx: float  # centroid, pixels
    cy: float
    fill: float  # area / (widest row * tallest column), both soft: square ~1, circle ~0.79, triangle ~0.55-0.7
    skew: float  # vertical skewness of the covered area: upright triangle -0.57, circle and square 0
    fivefold: float  # |5th angular harmonic| / total of the second moment: star ~0.5, circle and square 0


def _as_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    return frames.astype(np.float32)


def _border_mask(height: int, width: int) -> np.ndarray:
    """The BORDER_PX ring, bool (H, W)."""
    b = min(BORDER_PX, max(1, min(height, width) // 4))
    ring = np.ones((height, width), bool)
    ring[b:-b, b:-b] = False
    return ring


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]], tolerance: float,
             exclude: str | None = None) -> str | None:
    names = [name for name in palette if name != exclude]
    distances = [float(np.linalg.norm(colour - np.array(palette[name], dtype=np.float32))) for name in names]
    best = int(np.argmin(distances))
    return names[best] if distances[best] <= tolerance else None


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    if count < 2:
        return None
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


_SMOOTH = np.array([0.25, 0.5, 0.25], np.float32)  # a profile's noise is averaged before taking its maximum


def _find_object(frame: np.ndarray, background: np.ndarray, distance2: np.ndarray) -> _FrameObject | None:
    """The object in `frame` (H, W, 3) on `background` (3,); `distance2`: each pixel's squared distance from it."""
    height, width = distance2.shape
    mask = _largest_component(distance2 > OBJECT_DISTANCE**2)
    if mask is None or not MIN_OBJECT_SHARE * height * width <= mask.sum() <= MAX_OBJECT_SHARE * height * width:
        return None
    # The object's colour: the median of the half of the mask furthest from the background, which is its
    # own colour rather than its edges' blend with the background even on a small or blurred shape.
    pixels, distances = frame[mask], distance2[mask]
    colour = np.median(pixels[distances >= np.median(distances)], axis=0)
    # The interior (the mask less its outer ring of pixels) sets what "fully covered" means below. Picking
    # pixels by distance would favour noise pointing away from the background and bias the areas.
    core = cv2.erode(mask.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    direction = (np.median(frame[core], axis=0) if core.sum() >= 4 else colour) - background
    contrast = float(direction @ direction)
    if contrast < OBJECT_DISTANCE**2:
        return None
    # The share of each pixel the object covers: the projection onto background -> object colour, unclipped
    # so that noise averages out in sums. Measured near the mask only (2 pixels around it catch soft edges).
    near = cv2.dilate(mask.view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)
    ys, xs = np.nonzero(near)
    cover = (frame[ys, xs] - background) @ (direction / contrast)
    area = float(cover.sum())
    if area <= 0:
        return None
    cx, cy = float(xs @ cover) / area, float(ys @ cover) / area
    # The object's width per row and height per column; their maxima are its box's width and height.
    rows = np.convolve(np.bincount(ys, cover, height), _SMOOTH, "same").max()
    columns = np.convolve(np.bincount(xs, cover, width), _SMOOTH, "same").max()
    fill = area / max(rows * columns, 1e-6)
    variance = float(((ys - cy) ** 2) @ cover) / area
    skew = float(((ys - cy) ** 3) @ cover) / area / variance**1.5 if variance > 0 else 0.0
    return _FrameObject(mask, colour, area, cx, cy, fill, skew, _fivefold(xs - cx, ys - cy, cover))


def _fivefold(dx: np.ndarray, dy: np.ndarray, cover: np.ndarray) -> float:
    """How five-fold symmetric the covered area is about its centroid, 0-1: a five-pointed star's points make
    this harmonic strong, a circle and a square have none by their symmetries, the world's triangle (taller
    than equilateral) a little. Rotation-invariant; weighting by the squared distance stresses the points."""
    offset = dx + 1j * dy
    moment = cover * np.abs(offset) ** 2
    total = float(moment.sum())
    return float(abs(moment @ np.exp(5j * np.angle(offset)))) / total if total > 0 else 0.0


def _classify_shape(fill: float, skew: float, fivefold: float) -> str:
    if skew < TRIANGLE_SKEW and fill < TRIANGLE_MAX_FILL:
        return "triangle"
    if fivefold > STAR_FIVEFOLD:
        return "star"
    return "square" if fill > SQUARE_FILL else "circle"


def _classify_motion(objects: list[_FrameObject], side: int) -> str:
    window = max(1, min(len(objects) // 2, round(MOTION_WINDOW * len(objects)))) if len(objects) > 1 else 1
    start, end = objects[:window], objects[-window:]
    dx = (np.median([o.cx for o in end]) - np.median([o.cx for o in start])) / side
    dy = (np.median([o.cy for o in end]) - np.median([o.cy for o in start])) / side
    growth = np.median([o.area for o in end]) / np.median([o.area for o in start])
    if max(abs(dx), abs(dy)) > MOVE_THRESHOLD:
        if abs(dx) >= abs(dy):
            return "moves right" if dx > 0 else "moves left"
        return "moves down" if dy > 0 else "moves up"
    if growth > GROW_THRESHOLD:
        return "grows"
    if growth < 1 / GROW_THRESHOLD:
        return "shrinks"
    return "stays still"


def _flicker(frames: np.ndarray, objects: list[_FrameObject | None]) -> float:
    if len(frames) < 2:
        return 0.0
    # Leave out the object and the blur's reach around it.
    grow = np.ones((2 * FLICKER_BLUR_PX + 1, 2 * FLICKER_BLUR_PX + 1), np.uint8)
    keep = np.ones(frames.shape[:3], bool)
    for i, found in enumerate(objects):
        if found is not None:
            keep[i] = ~cv2.dilate(found.mask.view(np.uint8), grow).view(bool)
    blurred = np.stack([cv2.blur(frame, (FLICKER_BLUR_PX, FLICKER_BLUR_PX)) for frame in frames])
    both = keep[1:] & keep[:-1]  # (T - 1, H, W)
    change = np.abs(blurred[1:] - blurred[:-1]).mean(-1) * both
    counts = both.sum(axis=(1, 2))
    pairs = counts > 0
    return float((change.sum(axis=(1, 2))[pairs] / counts[pairs]).mean()) if pairs.any() else 0.0


def first_frame_error(frames: np.ndarray, image: np.ndarray) -> float:
    """Mean absolute difference (0-255) of frame 0 from `image` (H, W, 3), resized to the frame if needed."""
    frame = _as_frames(frames)[0]
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {image.shape}")
    if image.shape[:2] != frame.shape[:2]:
        from PIL import Image

        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        image = np.asarray(pil.resize((frame.shape[1], frame.shape[0]), Image.Resampling.BILINEAR))
    return float(np.abs(frame - image.astype(np.float32)).mean())


def observe(frames: np.ndarray, image: np.ndarray | None = None) -> Observation:
    """Measure a clip: uint8 (or 0-255 float) frames of shape (T, H, W, 3); `image` a first frame to match."""
    clip = _as_frames(frames)
    side = min(clip.shape[1:3])
    borders = clip[:, _border_mask(*clip.shape[1:3])]  # (T, N, 3)
    background = _nearest(np.median(borders.reshape(-1, 3), axis=0), BACKGROUNDS, BACKGROUND_TOLERANCE)
    # Each frame against its own border colour: a background that changes is flicker, not an object.
    frame_backgrounds = np.median(borders, axis=1)  # (T, 3)
    offset = clip - frame_backgrounds[:, None, None]
    distance2 = np.einsum("thwc,thwc->thw", offset, offset)
    found = [_find_object(frame, bg, d) for frame, bg, d in zip(clip, frame_backgrounds, distance2)]
    objects = [o for o in found if o is not None]
    colour = shape = motion = None
    # An object seen in under half the frames is noise, not the clip's subject.
    if 2 * len(objects) >= len(clip):
        core = np.median(np.stack([o.colour for o in objects]), axis=0)
        colour = _nearest(core, COLOURS, COLOUR_TOLERANCE, exclude=background)
        votes = [_classify_shape(o.fill, o.skew, o.fivefold) for o in objects]
        shape = max(SHAPES + CONCEPT_SHAPES, key=votes.count)
        motion = _classify_motion(objects, side)
    error = None if image is None else first_frame_error(clip, image)
    return Observation(background, colour, shape, motion, _flicker(clip, found), error)


def judge(frames: np.ndarray, combo: Combo, image: np.ndarray | None = None) -> dict[str, bool]:
    """{criterion: right?} for `combo` = (colour, shape, motion, background), for every name in CRITERIA
    (plus "first_frame" when `image` is given), and "all": every criterion right."""
    colour, shape, motion, background = combo
    seen = observe(frames, image)
    result = {
        "background": seen.background == background,
        "colour": seen.colour == colour,
        "shape": seen.shape == shape,
        "motion": seen.motion == motion,
        "flicker": seen.flicker < FLICKER_THRESHOLD,
    }
    if image is not None:
        result["first_frame"] = seen.first_frame_error is not None and seen.first_frame_error < FIRST_FRAME_THRESHOLD
    result["all"] = all(result.values())
    return result


def score(results: list[dict[str, bool]]) -> dict[str, float]:
    """The share of `results` right per criterion (each over the results that have it) and for "all";
    criteria no result has are left out (so an empty list gives {})."""
    keys = [key for key in (*CRITERIA, "first_frame", "all") if any(key in r for r in results)]
    return {key: float(np.mean([r[key] for r in results if key in r])) for key in keys}
