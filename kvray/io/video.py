"""Encode RGB frames to video bytes (H.264 mp4 through PyAV; animated GIF / WebP through Pillow) and read them back.

Frames are numpy ``uint8`` arrays laid out ``f h w c`` with ``c = 3`` (RGB). The frame rate may be
fractional: the official clips last about 5.5 s whatever their frame count (12 keyframes at 'low'
fps -> 24/11 fps), see :func:`clip_fps`. Rates are kept as :class:`fractions.Fraction` so the mp4
stream gets an exact rational frame rate; call ``float(fps)`` before putting one into JSON.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from fractions import Fraction
from pathlib import PurePath
from typing import Literal, Union

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

VideoFormat = Literal["mp4", "gif", "webp"]
FORMATS: tuple[str, ...] = ("mp4", "gif", "webp")
EXTENSIONS: dict[str, str] = {".mp4": "mp4", ".gif": "gif", ".webp": "webp"}
CONTENT_TYPES: dict[str, str] = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}

DEFAULT_CRF = 20  # x264 constant rate factor: 18 is visually lossless, 23 is x264's default
DEFAULT_PRESET = "medium"
DEFAULT_WEBP_QUALITY = 90
OFFICIAL_CLIP_SECONDS = 5.5  # the official README saves GIFs with duration = int(5500 / len(video)) ms

Fps = Union[int, float, Fraction]
VideoSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


def clip_fps(num_frames: int, seconds: float = OFFICIAL_CLIP_SECONDS) -> Fraction:
    """The frame rate at which ``num_frames`` frames last ``seconds``: 12 -> 24/11, 45 -> 90/11, 177 -> 354/11."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not (isinstance(seconds, (int, float, Fraction)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    # Fraction(str(x)) reads 5.5 as 11/2 rather than the binary float's long fraction.
    duration = seconds if isinstance(seconds, Fraction) else Fraction(str(seconds))
    return Fraction(num_frames) / duration


def as_fraction(fps: Fps) -> Fraction:
    """A positive frame rate as an exact fraction; floats are approximated with denominators up to 1001."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise ValueError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive and finite, got {fps!r}")
    if isinstance(fps, float):
        # 2.1818... -> 24/11, 29.97 -> 2997/100, 30000/1001 stays exact.
        return Fraction(fps).limit_denominator(1001)
    return Fraction(fps)


def video_format(path: str | os.PathLike) -> str:
    """The video format ("mp4", "gif" or "webp") named by a path or URI's extension."""
    suffix = PurePath(str(path).split("?", 1)[0]).suffix.lower()
    try:
        return EXTENSIONS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the video format of {str(path)!r}: extension {suffix or '(none)'!r} is not one of "
            f"{sorted(EXTENSIONS)}"
        ) from None


def _resolve_format(format: str | None, path: str | os.PathLike | None) -> str:
    from_path = video_format(path) if path is not None else None
    if format is None:
        return from_path or "mp4"
    fmt = format.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {format!r}: expected one of {list(FORMATS)}")
    if from_path is not None and from_path != fmt:
        raise ValueError(f"format {fmt!r} does not match the extension of {str(path)!r} ({from_path!r})")
    return fmt


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be laid out (frames, height, width, 3) RGB, got shape {frames.shape}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must be non-empty, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


def encode_video(
    frames: np.ndarray,
    fps: Fps,
    format: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    quality: int = DEFAULT_WEBP_QUALITY,
    lossless: bool = False,
) -> bytes:
    """Encode ``frames`` (uint8, ``f h w 3`` RGB) to the bytes of a video file.

    The format is ``format`` if given, else the extension of ``path`` (only used for that), else mp4.

    * mp4: H.264 (libx264), yuv420p (plays everywhere; needs even width and height), ``crf`` and
      ``preset`` as x264's, exact rational frame rate, "faststart": the index (``moov``) before the
      frames (``mdat``), so that a browser starts playing before it has the whole file.
    * gif: Pillow, a palette per frame; delays are whole 1/100 s, spread so the clip keeps its length.
      Pillow merges identical consecutive frames into one longer frame.
    * webp: Pillow's animated WebP, ``quality`` 0..100 or ``lossless``; delays in ms, spread likewise.
    """
    fmt = _resolve_format(format, path)
    frames = _check_frames(frames)
    rate = as_fraction(fps)
    if fmt == "mp4":
        return _encode_mp4(frames, rate, crf=crf, preset=preset)
    if fmt == "gif":
        return _encode_pillow(frames, rate, "GIF", tick_ms=10)
    if not 0 <= quality <= 100:
        raise ValueError(f"WebP quality must be within 0..100, got {quality}")
    return _encode_pillow(frames, rate, "WEBP", tick_ms=1, quality=quality, lossless=lossless, method=4)


def _encode_mp4(frames: np.ndarray, rate: Fraction, *, crf: int, preset: str) -> bytes:
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"H.264 mp4 (yuv420p) needs an even width and height, got {width}x{height}: "
            "crop or pad the frames, or write gif/webp"
        )
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be within 0..51, got {crf}")
    # The muxer's faststart pass reopens its output by name to move the index in front of the frames,
    # so it writes a temporary file rather than a BytesIO (it fails with "No such file" there).
    with tempfile.TemporaryDirectory(prefix="kvray-mp4-") as folder:
        path = os.path.join(folder, "video.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            # The same frames must give the same file (a re-rendered row, a regenerated shard): one
            # encoder thread (frame threads make the bytes depend on scheduling) and no macroblock tree
            # (x264's MB-tree lookahead lets memory left over from earlier work change the bytes of
            # noisy clips; the README has the figures and the cost in file size).
            options = {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "mbtree=0"}
            stream = container.add_stream("libx264", rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # One tick per frame: the codec time base is exactly 1/fps, so fractional rates stay exact
            # (the mp4 muxer picks its own finer track time base from this).
            stream.codec_context.time_base = 1 / rate
            for index, array in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                frame.pts = index
                frame.time_base = stream.codec_context.time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as file:
            return file.read()


def _frame_durations(count: int, rate: Fraction, tick_ms: int) -> list[int]:
    """Per-frame delays in ms, multiples of ``tick_ms``, whose running sums stay nearest the exact timestamps."""
    ticks_per_frame = Fraction(1000, tick_ms) / rate
    stamps = [round(i * ticks_per_frame) * tick_ms for i in range(count + 1)]
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    if min(durations) <= 0:
        raise ValueError(f"{float(rate):g} fps is too fast for this format (delays are multiples of {tick_ms} ms)")
    if tick_ms == 10 and min(durations) < 20:
        log.warning("GIF delays under 20 ms (%g fps) are slowed down to 100 ms by most browsers", float(rate))
    return durations


def _encode_pillow(frames: np.ndarray, rate: Fraction, pil_format: str, *, tick_ms: int, **options) -> bytes:
    images = [Image.fromarray(array) for array in frames]
    durations = _frame_durations(len(images), rate, tick_ms)
    buf = io.BytesIO()
    images[0].save(
        buf,
        format=pil_format,
        save_all=True,
        append_images=images[1:],
        duration=durations if len(images) > 1 else durations[0],
        loop=0,
        **options,
    )
    return buf.getvalue()


def _is_webp(head: bytes) -> bool:
    return len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def read_video(source: VideoSource) -> tuple[np.ndarray, Fraction]:
    """Decode a video (bytes or a local path) to ``(frames uint8 f h w 3 RGB, fps)``.

    mp4 and GIF are read with PyAV; animated WebP with Pillow (FFmpeg's WebP decoder in PyAV's
    wheels does not read animations). ``fps`` is the frame count over the total duration.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(bytes(source))
        head = file.getvalue()[:12]
    else:
        file = os.fspath(source)
        with open(file, "rb") as fh:
            head = fh.read(12)
    return _read_pillow(file) if _is_webp(head) else _read_av(file)


def _read_av(file) -> tuple[np.ndarray, Fraction]:
    with av.open(file, mode="r") as container:
        stream = container.streams.video[0]
        frames, start, end = [], None, None
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if frame.pts is not None and frame.duration:
                start = frame.pts if start is None else min(start, frame.pts)
                end = frame.pts + frame.duration if end is None else max(end, frame.pts + frame.duration)
        if not frames:
            raise ValueError("the video holds no frames")
        # Frame count over the decoded timeline: right for variable GIF delays too, where the
        # demuxer's average_rate follows the first delays only.
        if start is not None and end > start and stream.time_base:
            rate = Fraction(len(frames)) / ((end - start) * stream.time_base)
        else:
            rate = Fraction(stream.average_rate or 0)
    return np.stack(frames), rate


def _read_pillow(file) -> tuple[np.ndarray, Fraction]:
    with Image.open(file) as image:
        frames, total_ms = [], 0
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            total_ms += image.info.get("duration", 0)
    rate = Fraction(len(frames) * 1000, total_ms) if total_ms else Fraction(0)
    return np.stack(frames), rate
