"""Manifest rows -> validated requests, each with a stable id, seed and output key (`video_id`).

The columns are `kvray.io.manifest.MANIFEST_COLUMNS` (only `prompt` is required; a missing or null
value takes the job's default). A row without an id is named by its content: identical rows without
ids are one row (`scan_ids` finds them before a render, which renders the first and counts the rest).
An animation row without a size is 640 x 640 with the official models (the preset's default size with
test-scale presets).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from ..config.job import RequestDefaults
from ..config.sampling import GuidanceConfig
from ..config.validation import validation_message
from ..io.manifest import KNOWN_COLUMNS, Manifest, ManifestPart, part_batches
from .prompts import prompt_key
from .request import VideoRequest
from .request import default_size as mode_default_size

GUIDANCE_COLUMNS = tuple(GuidanceConfig.model_fields)


@dataclass(frozen=True)
class PlannedRow:
    id: str
    request: VideoRequest | None  # None when the row is invalid
    video_id: str
    error: str = ""


def _python(value: Any) -> Any:
    """numpy scalars and arrays (as pandas hands out column values) -> Python values and lists."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:
        return value.tolist()
    return value


def _present(value: Any) -> bool:
    """Null means "use the default"; NaN is a value (and an invalid one wherever a number is needed)."""
    return value is not None


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _digest(payload: Any) -> str:
    return hashlib.sha256(_CANONICAL_JSON.encode(payload).encode()).hexdigest()


def derived_seed(row_id: str) -> int:
    return int(_digest({"seed-of": row_id})[:15], 16)


def video_id(request: VideoRequest, model_version: str) -> str:
    """The same request and weights always land at the same key, whatever the row or the run (a plain
    text2video or image2video request keeps the key it had before animations and scenes existed)."""
    return _digest({"request": request.identity(), "model": model_version})[:32]


def _given(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's known columns that hold a value (the id aside)."""
    given = {}
    for name, value in row.items():
        if name != "id" and name in KNOWN_COLUMNS:
            value = _python(value)
            if _present(value):
                given[name] = value
    return given


def row_identity(row: Mapping[str, Any], given: dict[str, Any] | None = None) -> tuple[str, bool]:
    """(the row's id, whether the manifest gave it): the `id` column, else one derived from the content
    (`given`: the row's `_given`, when the caller has it already)."""
    raw_id = _python(row.get("id"))
    if _present(raw_id):
        return str(raw_id), True
    return "auto-" + _digest(_given(row) if given is None else given)[:16], False


def plan_row(row: Mapping[str, Any], defaults: RequestDefaults, model_version: str, default_size: tuple[int, int]) -> PlannedRow:
    """One manifest row -> its request, or the reason it cannot be rendered."""
    given = _given(row)
    row_id, _ = row_identity(row, given)
    try:
        if "negative_prompt" in given:
            raise ValueError("negative_prompt is not supported: Kandinsky Video 1.1 has none (the official code ignores it)")
        scenes = _scenes(given.get("scenes"))
        prompt = given.get("prompt")
        if not isinstance(prompt, str) and not (prompt is None and scenes):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        guidance = {**_defaults_guidance(defaults), **{k: given[k] for k in GUIDANCE_COLUMNS if k in given}}
        size = mode_default_size(given.get("mode"), default_size)
        fields = {
            "prompt": prompt,
            "image": given.get("image"),
            "width": given.get("width", defaults.width or size[0]),
            "height": given.get("height", defaults.height or size[1]),
            "fps": given.get("fps", defaults.fps),
            "motion": given.get("motion", defaults.motion),
            "seed": given.get("seed", derived_seed(row_id)),
            "steps": given.get("steps", defaults.steps),
            "interpolation_steps": given.get("interpolation_steps", defaults.interpolation_steps),
            "noise_augmentation": given.get("noise_augmentation", defaults.noise_augmentation),
            "guidance": guidance,
            "mode": given.get("mode"),
            "camera": given.get("camera"),
            "strength": given.get("strength"),
            "scenes": scenes,
        }
        request = VideoRequest.model_validate(_strict_numbers(fields))
    except ValidationError as err:
        return PlannedRow(row_id, None, "", validation_message(err, "row"))
    except ValueError as err:
        return PlannedRow(row_id, None, "", str(err))
    return PlannedRow(row_id, request, video_id(request, model_version))


@functools.lru_cache(maxsize=16)
def _defaults_guidance(defaults: RequestDefaults) -> dict[str, float]:
    return defaults.guidance.model_dump()


def _scenes(value: Any) -> list | None:
    """The scenes column: a list of prompts, or its JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("scenes must be a list of prompts or its JSON text, e.g. [\"a cat\", \"a dog\"]") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError("scenes must be a list of prompts (strings)")
    return list(value)


def _strict_numbers(fields: dict) -> dict:
    """Parquet integers arrive as floats where a column has nulls: 512.0 is 512, 512.5 is an error."""
    out = dict(fields)
    for key in ("width", "height", "seed", "steps", "interpolation_steps", "noise_augmentation"):
        value = out[key]
        if isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    return out



@dataclass(frozen=True)
class IdScan:
    """What planning must know about the whole manifest before it streams: which ids repeat, and which
    prompts repeat after normalisation (NFKC, case, whitespace)."""

    rows: int
    # Ids given to more than one row (and their counts): every such row is refused.
    duplicates: dict[str, int]
    # Sorted positions of the rows identical to an earlier row without an id: one row, rendered once.
    repeats: np.ndarray
    prompts: PromptDuplicates = None  # type: ignore[assignment]


@dataclass(frozen=True)
class PromptDuplicates:
    """Rows whose normalised prompt(s) and explicit seed (if any) repeat an earlier row's."""

    distinct: int
    duplicate_rows: int
    most_repeated: tuple[tuple[int, int], ...]  # (position of the first such row, rows), most rows first
    # Sorted positions of the repeating rows, and of the earlier row each repeats.
    positions: np.ndarray
    firsts: np.ndarray

    def line(self) -> str:
        if not self.duplicate_rows:
            return "prompts: no duplicates after normalisation (NFKC, case, whitespace)"
        top = ", ".join(f"row {row} x{count}" for row, count in self.most_repeated)
        return (f"prompts: {self.distinct} distinct after normalisation, {self.duplicate_rows} rows repeat an "
                f"earlier row's prompt and seed (most repeated: {top})")


def prompt_duplicates(keys: np.ndarray, positions: np.ndarray, top: int = 3) -> PromptDuplicates:
    """From each row's (prompt key, seed) digest and position."""
    if not len(keys):
        empty = np.array([], dtype=np.int64)
        return PromptDuplicates(0, 0, (), empty, empty)
    order = np.lexsort((positions, keys))
    grouped, where = keys[order], positions[order]
    first = np.ones(len(grouped), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(grouped)))
    group_first = np.repeat(where[starts], counts)
    repeat = ~first
    ranked = np.argsort(-counts, kind="stable")[:top]
    most = tuple((int(where[starts[i]]), int(counts[i])) for i in ranked if counts[i] > 1)
    by_position = np.argsort(where[repeat])
    return PromptDuplicates(distinct=len(starts), duplicate_rows=int(repeat.sum()), most_repeated=most,
                            positions=where[repeat][by_position], firsts=group_first[repeat][by_position])


@dataclass(frozen=True)
class PartIds:
    """The ids of one manifest part, with each row's position and whether the manifest wrote the id;
    and every row's prompt digest (its normalised prompt(s) and explicit seed) with its position."""

    ids: pa.Array
    positions: np.ndarray
    written: np.ndarray
    prompt_keys: np.ndarray
    prompt_positions: np.ndarray


def part_ids(fs, part: ManifestPart) -> PartIds:
    """Ids straight from the `id` column; for rows without one, derived from the content (the costly
    part: a digest per row)."""
    ids, positions, written, keys = [], [], [], []
    for start, batch in part_batches(fs, part):
        keys.append(_prompt_keys(batch))
        given = np.zeros(batch.num_rows, dtype=bool)
        if "id" in batch.schema.names:
            column = batch.column("id")
            given = pc.is_valid(column).to_numpy(zero_copy_only=False)
            ids.append(pc.cast(column.filter(pc.is_valid(column)), pa.string()))
            positions.append(np.flatnonzero(given) + start)
            written.append(np.ones(int(given.sum()), dtype=bool))
        missing = np.flatnonzero(~given)
        if len(missing):
            rows = (batch if len(missing) == batch.num_rows else batch.take(pa.array(missing))).to_pylist()
            ids.append(pa.array([row_identity(row)[0] for row in rows], pa.string()))
            positions.append(missing + start)
            written.append(np.zeros(len(missing), dtype=bool))
    prompt_keys = np.concatenate(keys) if keys else np.array([], np.uint64)
    prompt_positions = np.arange(part.first_row, part.first_row + len(prompt_keys), dtype=np.int64)
    if not ids:
        return PartIds(pa.array([], pa.string()), np.array([], np.int64), np.array([], bool), prompt_keys,
                       prompt_positions)
    return PartIds(pa.concat_arrays(ids), np.concatenate(positions), np.concatenate(written), prompt_keys,
                   prompt_positions)


def _prompt_keys(batch: pa.RecordBatch) -> np.ndarray:
    """Per row, a 64-bit digest of its normalised prompt(s) (a mini-movie: its scenes) and explicit seed."""
    columns = batch.to_pydict()
    prompts, scenes = columns.get("prompt", [None] * batch.num_rows), columns.get("scenes", [None] * batch.num_rows)
    seeds = columns.get("seed", [None] * batch.num_rows)
    keys = np.empty(batch.num_rows, dtype=np.uint64)
    for i, (prompt, scene, seed) in enumerate(zip(prompts, scenes, seeds)):
        text = scene if isinstance(scene, list) else (json.loads(scene) if isinstance(scene, str) else None)
        shown = text if isinstance(text, list) and all(isinstance(t, str) for t in text) else [str(prompt)]
        keys[i] = int(prompt_key([*shown, f"seed={seed}"]), 16)
    return keys


def scan_ids(manifest: Manifest, parts: list[PartIds] | None = None) -> IdScan:
    """Which ids repeat over the whole manifest, from every part's ids (`part_ids`, computed here one
    part after the other unless given: a render computes them in parallel). pyarrow counts them, so
    that a million rows take seconds and little memory."""
    if parts is None:
        parts = [part_ids(manifest.fs, part) for part in manifest.parts]
    prompts = prompt_duplicates(np.concatenate([p.prompt_keys for p in parts] or [np.array([], np.uint64)]),
                                np.concatenate([p.prompt_positions for p in parts] or [np.array([], np.int64)]))
    parts = [p for p in parts if len(p.ids)]
    if not parts:
        return IdScan(manifest.rows, {}, np.array([], dtype=np.int64), prompts)
    every = pa.concat_arrays([p.ids for p in parts])
    where = np.concatenate([p.positions for p in parts])
    written = np.concatenate([p.written for p in parts])
    encoded = pc.dictionary_encode(every)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(codes)
    if not (counts > 1).any():
        return IdScan(manifest.rows, {}, np.array([], dtype=np.int64), prompts)
    order = np.lexsort((where, codes))  # by id, then by position
    grouped = codes[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # An id the manifest wrote (even one that looks derived) repeated: refuse every row that has it.
    refused = (counts > 1) & np.logical_or.reduceat(written[order], starts)
    # Identical rows without ids: the first is the row, the others repeat it.
    repeated = (counts > 1) & ~refused
    first = np.ones(len(grouped), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]
    values = encoded.dictionary
    duplicates = {values[int(c)].as_py(): int(counts[c]) for c in np.flatnonzero(refused)}
    return IdScan(manifest.rows, duplicates, np.sort(where[order][repeated[grouped] & ~first]), prompts)
