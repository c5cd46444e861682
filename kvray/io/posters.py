"""Stills of a video for people browsing an output: a poster (one JPEG frame) and a small animated preview
(WebP), made from the decoded frames while they are still in memory, so that nobody has to fetch or
decode a video to see what it shows.

The poster is the middle frame: the first frame of an image2video clip is the user's own image and
the first frame of a text2video clip comes from the image-mode pass, while the middle frame is in
the middle of the motion (and, in a mini-movie, of the middle scene). Both stills keep the video's
aspect ratio and are never enlarged.
"""

from __future__ import annotations

import io

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from .atomic import write_atomic
from .layout import poster_path, preview_path
from .video import Fps, as_fraction, encode_video

POSTER_SIZE = 512  # longer side in pixels at most: sharp on a high-density screen at gallery card sizes
POSTER_QUALITY = 85
PREVIEW_SIZE = 192  # longer side in pixels at most
PREVIEW_FRAMES = 8  # frames at most, evenly spread over the clip, played over the clip's own duration
PREVIEW_QUALITY = 60
CONTENT_TYPES = {"poster": "image/jpeg", "preview": "image/webp"}


def poster_frame(num_frames: int) -> int:
    """The index of the poster frame of a clip of `num_frames` frames: the middle one."""
    if num_frames < 1:
        raise ValueError(f"a clip has at least one frame, got {num_frames}")
    return num_frames // 2


def _check(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 \
            or 0 in frames.shape:
        raise ValueError("frames must be a non-empty uint8 array (T, H, W, 3) RGB, got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    return frames


def _shrunk(frame: np.ndarray, longest: int) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(frame))
    image.thumbnail((longest, longest), Image.Resampling.LANCZOS)  # keeps the aspect ratio, never enlarges
    return image


def poster_jpeg(frames: np.ndarray, *, size: int = POSTER_SIZE, quality: int = POSTER_QUALITY) -> bytes:
    """JPEG bytes of the poster frame of `frames` (T, H, W, 3) uint8 RGB, its longer side at most `size`."""
    frames = _check(frames)
    buffer = io.BytesIO()
    _shrunk(frames[poster_frame(len(frames))], size).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def preview_webp(frames: np.ndarray, fps: Fps, *, size: int = PREVIEW_SIZE, count: int = PREVIEW_FRAMES,
                 quality: int = PREVIEW_QUALITY) -> bytes:
    """Animated WebP bytes: `count` frames (or all, if fewer) evenly spread from the first to the last,
    their longer side at most `size`, looping over the clip's own duration (len(frames) / fps)."""
    frames = _check(frames)
    picked = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)  # distinct: steps >= 1
    small = np.stack([np.asarray(_shrunk(frames[i], size)) for i in picked])  # (k, h, w, 3)
    rate = as_fraction(fps) * len(picked) / len(frames)
    return encode_video(small, rate, "webp", quality=quality)


def write_stills(fs: AbstractFileSystem, root: str, video_id: str, frames: np.ndarray, fps: Fps) -> dict[str, str]:
    """Write the poster and the preview of a video at their places in the output layout (`poster_path`,
    `preview_path`), each whole or not at all, with their content types; returns {"poster": path,
    "preview": path}. Call it before the video's metadata is written, so that every done video has them."""
    written = {"poster": poster_path(root, video_id), "preview": preview_path(root, video_id)}
    write_atomic(fs, written["poster"], poster_jpeg(frames), content_type=CONTENT_TYPES["poster"])
    write_atomic(fs, written["preview"], preview_webp(frames, fps), content_type=CONTENT_TYPES["preview"])
    return written
