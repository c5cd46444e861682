"""Prompt manifests: finding their files, checking them, and reading them in parts.

A manifest is a file, a directory of files or a glob, on any fsspec storage, in any mix of formats:
Parquet (`.parquet`, `.pq`), CSV (`.csv`), JSON Lines (`.jsonl`, `.ndjson`) and plain text (`.txt`,
one prompt per non-empty line). Each file is read with pyarrow in its own types, so files whose
columns differ in types that are each allowed (integer ids in one, strings in another) are one
manifest. `MANIFEST_COLUMNS` is the one list of the columns kvray reads.

A render reads a manifest in parts (`ManifestPart`): a Parquet file's row groups in runs of about
`PART_ROWS` rows, or a whole file of another format. Every row has a position in the manifest (files
in name order, then their rows), which names it in errors.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from .failures import StorageError, storage_errors
from .opening import open_fs


class ManifestError(ValueError):
    """A manifest that cannot be rendered at all (as opposed to a bad row, which becomes an error row)."""


_STRING = (pa.types.is_string, pa.types.is_large_string)
_INTEGER = (pa.types.is_integer,)
_NUMBER = (pa.types.is_integer, pa.types.is_floating)
_NULL = (pa.types.is_null,)


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and any(test(t.value_type) for test in _STRING + _NULL)


# name: (accepted Arrow types, meaning). Only `prompt` is required; a missing or null value takes the
# job's default.
MANIFEST_COLUMNS: dict[str, tuple[tuple, str]] = {
    "prompt": (_STRING, "the text (may be null when `scenes` is given: the first scene's)"),
    "id": (_STRING + _INTEGER, "the row's name in the results; default: derived from the row's content, so "
                               "identical rows without ids are one row, rendered once"),
    "seed": (_NUMBER, "integer >= 0; default: derived from the id, so a re-run draws the same video"),
    "image": (_STRING, "image2video: path, URL or fsspec URI of the first frame"),
    "width": (_NUMBER, "multiple of 64, up to 2048"),
    "height": (_NUMBER, "multiple of 64, up to 2048"),
    "fps": (_STRING, "low / medium / high (12 / 45 / 177 frames)"),
    "motion": (_STRING, "low / medium / high / extreme (motion score 1, 10, 50, 100)"),
    "steps": (_NUMBER, "first-frame and keyframe denoising steps (official 50)"),
    "interpolation_steps": (_NUMBER, "interpolation denoising steps (official 10)"),
    "noise_augmentation": (_NUMBER, "0-999: diffusion time the first frame is noised to before it conditions "
                                    "the keyframes (official 20)"),
    "key_frame_guidance_scale": (_NUMBER, "first frame guidance (official 5)"),
    "guidance_weight_prompt": (_NUMBER, "keyframes, prompt guidance (official 5)"),
    "guidance_weight_image": (_NUMBER, "keyframes, image guidance (official 2)"),
    "interpolation_guidance_scale": (_NUMBER, "interpolation guidance (official 0.5)"),
    "negative_prompt": (_STRING, "must be null: Kandinsky Video 1.1 has no negative prompt (the official code "
                                 "ignores it)"),
    "mode": (_STRING, "text2video / image2video / animation; default: image2video with an image, else text2video"),
    "camera": (_STRING, "animation: an effect name (zoom-in, zoom-out, pan-left/right/up/down, "
                        "rotate-clockwise/anticlockwise) or a JSON camera path"),
    "strength": (_NUMBER, "animation: re-noising of each redrawn frame, 0 (the camera move alone) to 1; "
                          "default 0.4"),
    "scenes": (_STRING + (_is_string_list,), "a mini-movie: every scene's prompt (up to 3), a list or its JSON text"),
}
KNOWN_COLUMNS = tuple(MANIFEST_COLUMNS)
TEXT_COLUMNS = ("prompt", "id", "image", "fps", "motion", "negative_prompt", "mode", "camera", "scenes")

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".txt": "text"}
PART_ROWS = 100_000  # rows per planning part: big enough that a part's overhead is small
READ_BATCH_ROWS = 2_048


@dataclass(frozen=True)
class ManifestPart:
    """A unit of planning work: rows `first_row` .. `first_row + rows - 1` of the manifest, the rows
    `skip` .. `skip + rows - 1` of its file (of its `row_groups`, for Parquet)."""

    file: str
    format: str
    first_row: int
    rows: int
    row_groups: tuple[int, ...] = ()  # Parquet only
    skip: int = 0


@dataclass
class Manifest:
    uri: str
    fs: AbstractFileSystem
    files: list[str]
    parts: list[ManifestPart] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def file_uris(self) -> list[str]:
        return [self.fs.unstrip_protocol(f) for f in self.files]


def file_format(path: str) -> str | None:
    name = path.rpartition("/")[2].lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def open_manifest(uri: str, storage_options: dict | None = None) -> Manifest:
    """The manifest's files, checked (a readable file of a known format, a `prompt` column, allowed
    types) and cut into parts; one `ManifestError` naming the file for anything wrong."""
    fs, path = open_fs(uri, storage_options)
    with storage_errors(fs, path):  # storage that keeps failing is a StorageError, not a bad manifest
        if any(ch in path for ch in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(p for p in fs.find(path) if file_format(p))
        elif fs.isfile(path):
            files = [path]
        else:
            raise ManifestError(f"manifest not found: {uri}")
    if not files:
        raise ManifestError(f"no manifest files ({', '.join(sorted(FORMATS))}) in {uri}")
    manifest = Manifest(uri, fs, files)
    first = 0
    for file in files:
        parts = _parts(fs, file, first)
        manifest.parts.extend(parts)
        first += sum(p.rows for p in parts)
    return manifest


def _parts(fs: AbstractFileSystem, file: str, first_row: int) -> list[ManifestPart]:
    where = fs.unstrip_protocol(file)
    fmt = file_format(file) or "parquet"  # a single file of another name: Parquet, or a clear error
    if fmt == "parquet":
        try:
            with storage_errors(fs, file), fs.open(file, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
        except StorageError:
            raise
        except (pa.ArrowInvalid, OSError) as err:
            raise ManifestError(f"{where} is not a Parquet file: {err}") from err
        check_schema(metadata.schema.to_arrow_schema(), where)
        parts, group, rows = [], [], 0
        for index in range(metadata.num_row_groups):
            group.append(index)
            rows += metadata.row_group(index).num_rows
            if rows >= PART_ROWS or index == metadata.num_row_groups - 1:
                parts.extend(_split(file, fmt, first_row, rows, tuple(group)))
                first_row, group, rows = first_row + rows, [], 0
        return parts
    # Other formats carry no row count: read the file once, streaming, to check it and count its rows.
    rows = 0
    schema = None
    for batch in _batches(fs, file, fmt, None):
        schema = batch.schema if schema is None else schema
        rows += batch.num_rows
    if schema is not None:
        check_schema(schema, where)
    return _split(file, fmt, first_row, rows, ())


def _split(file: str, fmt: str, first_row: int, rows: int, row_groups: tuple[int, ...]) -> list[ManifestPart]:
    """Parts of at most PART_ROWS rows, so that one large file is planned by several tasks at once (each
    reads the file up to its rows: decoding is cheap next to planning a row)."""
    return [ManifestPart(file, fmt, first_row + skip, min(PART_ROWS, rows - skip), row_groups, skip)
            for skip in range(0, rows, PART_ROWS)]


def check_schema(schema: pa.Schema, where: str) -> None:
    if "prompt" not in schema.names:
        raise ManifestError(f"{where} has no 'prompt' column (columns: {', '.join(schema.names) or 'none'})")
    problems = [
        f"{name} is {schema.field(name).type}"
        for name, (accepted, _) in MANIFEST_COLUMNS.items()
        if name in schema.names and not any(test(schema.field(name).type) for test in accepted + _NULL)
    ]
    if problems:
        raise ManifestError(f"{where}: wrong column types: {'; '.join(problems)}")


def _batches(fs: AbstractFileSystem, file: str, fmt: str, part: ManifestPart | None) -> Iterator[pa.RecordBatch]:
    where = fs.unstrip_protocol(file)
    try:
        with storage_errors(fs, file), fs.open(file, "rb") as f:
            if fmt == "parquet":
                reader = pq.ParquetFile(f)
                columns = [c for c in reader.schema_arrow.names if c in MANIFEST_COLUMNS]
                groups = list(part.row_groups) if part is not None else None
                yield from reader.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns)
            elif fmt == "csv":
                # Text columns stay text (an id "007" is not the integer 7); numbers are inferred.
                convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in TEXT_COLUMNS})
                yield from pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20),
                                          convert_options=convert)
            elif fmt == "jsonl":
                yield from pajson.open_json(f, read_options=pajson.ReadOptions(block_size=1 << 20))
            else:
                yield from _text_batches(f)
    except StorageError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{where} cannot be read as {fmt}: {err}") from err


def _text_batches(f) -> Iterator[pa.RecordBatch]:
    prompts = []
    for line in io.TextIOWrapper(f, encoding="utf-8"):
        if line.strip():
            prompts.append(line.rstrip("\r\n"))
            if len(prompts) == READ_BATCH_ROWS:
                yield pa.record_batch({"prompt": pa.array(prompts, pa.string())})
                prompts = []
    if prompts:
        yield pa.record_batch({"prompt": pa.array(prompts, pa.string())})


def part_batches(fs: AbstractFileSystem, part: ManifestPart) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The part's rows, known columns only, in batches: (position of the batch's first row, batch). A
    file that fails half-way is a `ManifestError` naming it."""
    position, skip, left = part.first_row, part.skip, part.rows
    for batch in _batches(fs, part.file, part.format, part):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, left)
        skip = 0
        yield position, batch.select([c for c in batch.schema.names if c in MANIFEST_COLUMNS])
        position += batch.num_rows
        left -= batch.num_rows
        if left <= 0:
            return
