"""Finding and checking Parquet manifests (one file, a directory of files, or a glob; any fsspec URI)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import StorageError, open_fs, storage_errors


class ManifestError(ValueError):
    """A manifest that cannot be rendered at all (as opposed to a bad row, which becomes an error row)."""


# Expected Arrow types of known columns; anything else is reported before any work starts.
_STRING = (pa.types.is_string, pa.types.is_large_string)
_INTEGER = (pa.types.is_integer,)
_NUMBER = (pa.types.is_integer, pa.types.is_floating)
_NULL = (pa.types.is_null,)


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and any(test(t.value_type) for test in _STRING + _NULL)


COLUMN_TYPES = {
    "prompt": _STRING, "id": _STRING + _INTEGER, "image": _STRING, "fps": _STRING, "motion": _STRING,
    "negative_prompt": _STRING, "seed": _NUMBER, "width": _NUMBER, "height": _NUMBER, "steps": _NUMBER,
    "interpolation_steps": _NUMBER, "noise_augmentation": _NUMBER, "key_frame_guidance_scale": _NUMBER, "guidance_weight_prompt": _NUMBER,
    "guidance_weight_image": _NUMBER, "interpolation_guidance_scale": _NUMBER,
    "mode": _STRING, "camera": _STRING, "strength": _NUMBER, "scenes": _STRING + (_is_string_list,),
}


def manifest_files(uri: str, storage_options: dict | None = None) -> tuple[object, list[str]]:
    """The filesystem and the Parquet files of a manifest, each checked to be Parquet with a usable schema.
    Storage that fails (once its retries are spent) raises StorageError, not ManifestError."""
    fs, path = open_fs(uri, storage_options)
    with storage_errors(fs, path):
        if any(ch in path for ch in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        elif fs.isfile(path):
            files = [path]
        else:
            raise ManifestError(f"manifest not found: {uri}")
    if not files:
        raise ManifestError(f"no Parquet files in manifest {uri}")
    for file in files:
        check_schema(_read_schema(fs, file), fs.unstrip_protocol(file))
    return fs, files


def _read_schema(fs, file: str) -> pa.Schema:
    try:
        with storage_errors(fs, file), fs.open(file, "rb") as f:
            return pq.read_schema(f)
    except StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"{fs.unstrip_protocol(file)} is not a Parquet file: {err}") from err


def check_schema(schema: pa.Schema, where: str) -> None:
    if "prompt" not in schema.names:
        raise ManifestError(f"{where} has no 'prompt' column (columns: {', '.join(schema.names) or 'none'})")
    problems = [
        f"{name} is {schema.field(name).type}"
        for name, accepted in COLUMN_TYPES.items()
        if name in schema.names and not any(test(schema.field(name).type) for test in accepted + _NULL)
    ]
    if problems:
        raise ManifestError(f"{where}: wrong column types: {'; '.join(problems)}")
