"""How a render becomes a training dataset: the output layout, shard targets, latents, quality filters.

Also the registry of quality signals (name, unit, definition), so that configs and the CLI can validate
`--filter motion>=0.5` without importing OpenCV; `kvray.pipeline.quality` computes the signals.

Filters are strings `SIGNAL OP NUMBER` (OP one of >=, <=, >, <), ANDed; in a job:

    dataset:
      layout: webdataset
      shard_size: 256            # samples per shard, at most
      shard_bytes: 512MiB        # bytes per tar, at most (a larger single sample is a shard alone)
      with_latents: true
      filters: ["motion>=0.5", "black_share<0.5"]
      keep_filtered: true        # filtered samples are written and marked; false: left out of the shards
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

# Thresholds that define the share signals (luma in 8-bit levels, 0..255; BT.601 weights, as OpenCV's).
FROZEN_MEAN_DIFF = 1.0  # a frame pair whose mean absolute luma difference is under this barely changes
BLACK_LUMA = 25.5  # a pixel darker than 10% of the range is black ...
BLACK_PIXEL_SHARE = 0.98  # ... and a frame with at least this share of black pixels is black (as ffmpeg's blackdetect)
BLANK_STD = 3.0  # a frame whose luma standard deviation is under this is blank (one colour, black or not)
MOTION_SIZE = 128  # optical flow runs with the longer side at most this many pixels
MOTION_PAIRS = 24  # at most this many consecutive frame pairs, evenly spread, enter the motion mean
SHARPNESS_FRAMES = 8  # sharpness: at most this many frames, evenly spread, at full size


@dataclass(frozen=True)
class Signal:
    name: str
    unit: str
    description: str


SIGNALS: dict[str, Signal] = {s.name: s for s in (
    Signal("motion", "px/frame",
           "mean optical-flow magnitude between consecutive frames (OpenCV Farneback with the longer side at "
           f"{MOTION_SIZE} px, over up to {MOTION_PAIRS} pairs; in pixels of the video's own size; pairs across a "
           "scene cut are left out)"),
    Signal("frozen_share", "share 0..1",
           f"share of consecutive frame pairs that barely change (mean absolute luma difference under "
           f"{FROZEN_MEAN_DIFF:g} of 255)"),
    Signal("black_share", "share 0..1",
           f"share of black frames (at least {BLACK_PIXEL_SHARE:.0%} of the pixels under luma {BLACK_LUMA:g} of 255)"),
    Signal("blank_share", "share 0..1",
           f"share of blank frames of one colour, black or not (luma standard deviation under {BLANK_STD:g} of 255)"),
    Signal("sharpness", "luma^2",
           f"variance of the 3x3 Laplacian of the luma (0..255), at the video's size, mean over up to "
           f"{SHARPNESS_FRAMES} frames: higher is sharper; depends on the size"),
    Signal("brightness", "luma 0..255", "mean luma over all frames"),
    Signal("contrast", "luma 0..255",
           "standard deviation of the luma within a frame (RMS contrast), mean over all frames"),
)}

OK, FILTERED = "ok", "filtered"  # a sample's status: passed every filter, or failed one (with its reasons)

FILTER_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_FILTER_TEXT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*([<>=!]+)\s*(.*?)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QualityFilter(_Strict):
    """`signal op value`: a sample passes when its signal satisfies the comparison."""

    signal: str
    op: Literal[">=", "<=", ">", "<"]
    value: float

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data):
        return parse_filter(data) if isinstance(data, str) else data

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, signal: str) -> str:
        if signal not in SIGNALS:
            raise ValueError(f"unknown quality signal {signal!r}: use one of {', '.join(SIGNALS)}")
        return signal

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"a filter's value must be a finite number, got {value}")
        return value

    def __str__(self) -> str:
        return f"{self.signal}{self.op}{self.value:g}"

    def reason(self, signals: Mapping[str, float | None]) -> str | None:
        """Why a sample with these signals fails this filter, or None when it passes. A signal that could
        not be measured (None: e.g. motion of a one-frame clip) fails."""
        value = signals.get(self.signal)
        if value is None:
            return f"{self.signal} not measured (filter {self})"
        if FILTER_OPS[self.op](value, self.value):
            return None
        return f"{self.signal} {value:.4g} fails {self}"


def parse_filter(text: str) -> dict:
    """`"motion>=0.5"` -> {"signal": "motion", "op": ">=", "value": 0.5}; a ValueError says what is wrong."""
    match = _FILTER_TEXT.match(text)
    if not match or not match.group(3):
        raise ValueError(f"filter {text!r} is not SIGNAL OP NUMBER, e.g. motion>=0.5 (OP one of {', '.join(FILTER_OPS)})")
    signal, op, number = match.groups()
    if op not in FILTER_OPS:
        raise ValueError(f"filter {text!r}: unknown operator {op!r}, use one of {', '.join(FILTER_OPS)}")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"filter {text!r}: {number!r} is not a number") from None
    return {"signal": signal, "op": op, "value": value}


def filter_reasons(filters: Sequence[QualityFilter], signals: Mapping[str, float | None]) -> list[str]:
    """Why a sample is filtered: one reason per failed filter (filters are ANDed); empty when it passes."""
    return [reason for f in filters if (reason := f.reason(signals)) is not None]


_WEBDATASET_ONLY = ("shard_size", "shard_bytes", "with_latents")


class DatasetConfig(_Strict):
    """`layout`: `files` (videos/, meta/: one object per video, the default) or `webdataset` (tar shards
    under shards/, a Parquet index under index/, a dataset card README.md)."""

    layout: Literal["files", "webdataset"] = "files"
    shard_size: int = Field(256, gt=0, description="samples per shard, at most")
    shard_bytes: Annotated[ByteSize, Field(gt=0)] = Field(
        ByteSize(512 * 2**20), description="bytes per shard, at most (512MiB, 1GB, or a number); a single larger "
                                           "sample is a shard of its own")
    with_latents: bool = Field(False, description="also store the latents the decoder got ({key}.latents.safetensors)")
    filters: tuple[QualityFilter, ...] = Field((), description="quality thresholds, ANDed, e.g. motion>=0.5")
    keep_filtered: bool = Field(True, description="write filtered samples (status `filtered`, with the reasons); "
                                                  "false: leave them out of the shards (recorded under dropped/)")

    @field_validator("filters", mode="before")
    @classmethod
    def _one_filter(cls, filters):
        return [filters] if isinstance(filters, str) else filters

    @model_validator(mode="after")
    def _webdataset_options(self):
        # Only settings that would change something: `with_latents: false` in a files job is harmless.
        given = [name for name in _WEBDATASET_ONLY
                 if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default]
        if self.layout == "files" and given:
            raise ValueError(f"{', '.join(given)} apply to layout webdataset only (this job's layout is files)")
        return self
