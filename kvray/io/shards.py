"""WebDataset shards written exactly once, and the Parquet index that `datasets` loads as it is.

Under the output root:

    shards/{name}.tar        the samples: {key}.mp4 (or .gif / .webp), {key}.json (the metadata),
                             {key}.txt (the caption) and, with latents, {key}.latents.safetensors
    index/{name}.parquet     one row per sample of shards/{name}.tar (INDEX_SCHEMA)
    dropped/{name}.parquet   filtered samples left out of the shards (keep_filtered false): the same
                             columns, no shard

Commit protocol: a shard is built whole in memory and written with one atomic write, then its index
part; the index part is the shard's commit record. A sample is done once its index (or dropped) part
exists, and only then. A tar without an index part (a writer killed between the two writes) is an
orphan, invisible to readers that go through the index, and `remove_orphans` deletes it before the next
run renders its samples again.

Names: `name` is a digest of the shard's member names, so a retried batch (the same samples) rewrites
the same objects (with the same bytes) instead of adding a second copy, and shards of different members,
actors or runs never share a name. Samples are sorted by key before they are split, so the split of a batch depends on its
members only, not on their order.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from ..config.dataset import FILTERED, OK, SIGNALS, DatasetConfig
from ..config.stages import STAGES
from .atomic import dumps_json, write_atomic
from .names import check_name
from .opening import uri_of

log = logging.getLogger(__name__)

SHARDS, INDEX, DROPPED = "shards", "index", "dropped"
INDEX_VERSION = "1"

_SCENE = pa.struct([
    ("scene", pa.int64()), ("prompt", pa.string()), ("first_frame", pa.int64()), ("last_frame", pa.int64()),
    ("frames", pa.int64()), ("start_seconds", pa.float64()), ("end_seconds", pa.float64()),
])
# Fixed types, so that index parts of every run concatenate. Metadata fields are flattened: nested dicts
# become `{parent}_{child}` columns (seconds_decode, request_guidance_...), the quality signals keep their
# own names, a mini-movie's scenes stay one list of structs, and the request's camera (a name or a path)
# is its JSON text.
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # relative to the dataset root: shards/{name}.tar; null in dropped/
        ("members", pa.list_(pa.string())),  # file names inside the shard
        ("video_offset", pa.int64()),  # byte offset of the video's data in the shard (range reads)
        ("video_size", pa.int64()),
        ("caption", pa.string()),
        ("status", pa.string()),  # ok | filtered
        ("filter_reasons", pa.list_(pa.string())),
        *((name, pa.float64()) for name in SIGNALS),
        ("id", pa.string()),
        ("video_id", pa.string()),
        ("model_version", pa.string()),
        ("mode", pa.string()),
        ("seed", pa.int64()),
        ("frames", pa.int64()),
        ("frames_sha256", pa.string()),  # the decoded frames' fingerprint (reproducibility checks)
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("fps", pa.float64()),  # frames per second (the metadata's exact fraction, as a float)
        ("format", pa.string()),
        ("prompt_truncated", pa.bool_()),
        ("uri", pa.string()),
        ("scenes", pa.list_(_SCENE)),
        *((f"seconds_{stage}", pa.float64()) for stage in STAGES),
        ("placement", pa.string()),  # JSON: per stage, GPU ids, node, wall-clock times, the software stack
        ("resolved_steps", pa.int64()),
        ("resolved_interpolation_steps", pa.int64()),
        ("resolved_guidance_key_frame_guidance_scale", pa.float64()),
        ("resolved_guidance_guidance_weight_prompt", pa.float64()),
        ("resolved_guidance_guidance_weight_image", pa.float64()),
        ("resolved_guidance_interpolation_guidance_scale", pa.float64()),
        ("resolved_motion", pa.string()),
        ("resolved_noise_augmentation", pa.int64()),
        ("request_prompt", pa.string()),
        ("request_mode", pa.string()),
        ("request_image", pa.string()),
        ("request_width", pa.int64()),
        ("request_height", pa.int64()),
        ("request_fps", pa.string()),  # low | medium | high
        ("request_motion", pa.string()),
        ("request_seed", pa.int64()),
        ("request_guidance_key_frame_guidance_scale", pa.float64()),
        ("request_guidance_guidance_weight_prompt", pa.float64()),
        ("request_guidance_guidance_weight_image", pa.float64()),
        ("request_guidance_interpolation_guidance_scale", pa.float64()),
        ("request_steps", pa.int64()),
        ("request_interpolation_steps", pa.int64()),
        ("request_noise_augmentation", pa.int64()),
        ("request_camera", pa.string()),  # JSON: an effect name or a camera path
        ("request_strength", pa.float64()),
        ("request_scenes", pa.list_(pa.string())),
    ],
    metadata={"kvray.index_version": INDEX_VERSION},
)
_SAMPLE_COLUMNS = ("key", "shard", "members", "video_offset", "video_size", "caption")
_CONVERT = {
    "fps": lambda v: float(Fraction(str(v))),
    "request_camera": lambda v: json.dumps(v, sort_keys=True),
}
# Metadata fields kept whole, as their JSON text: their inner keys vary (a GPU's stack is not a CPU's).
_AS_JSON = ("placement",)


@dataclass(frozen=True, eq=False)
class Sample:
    """One finished video, as the decode stage hands it on. `metadata`: the dict of meta/{key}.json plus
    `quality`, `status` and `filter_reasons` (`kvray.pipeline.quality.quality_fields`)."""

    key: str  # the video_id: 32 hex characters, no dots
    video: bytes
    metadata: Mapping[str, Any]
    caption: str
    latents: bytes | None = None  # safetensors bytes of the latents the decoder got
    video_format: str = "mp4"

    def __post_init__(self):
        check_name(self.key)
        if "." in self.key:
            raise ValueError(f"sample key {self.key!r} contains a dot: WebDataset splits member names at the first dot")

    def to_row(self) -> dict[str, Any]:
        """Plain columns (bytes and strings) for carrying the sample between processes, e.g. in Ray Data rows."""
        return {"key": self.key, "video": self.video, "metadata": dumps_json(self.metadata).decode(),
                "caption": self.caption, "latents": self.latents, "video_format": self.video_format}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Sample:
        """The inverse of `to_row`."""
        return cls(key=row["key"], video=bytes(row["video"]), metadata=json.loads(row["metadata"]),
                   caption=row["caption"], latents=None if row["latents"] is None else bytes(row["latents"]),
                   video_format=row["video_format"])

    @property
    def filtered(self) -> bool:
        return self.metadata.get("status") == FILTERED

    @functools.cached_property
    def members(self) -> dict[str, bytes]:
        """Extension -> bytes; the member names in the tar are `{key}.{extension}`."""
        out = {self.video_format: self.video, "json": dumps_json(self.metadata), "txt": self.caption.encode()}
        if self.latents is not None:
            out["latents.safetensors"] = self.latents
        return out

    @property
    def member_names(self) -> list[str]:
        return sorted(f"{self.key}.{ext}" for ext in self.members)


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard: its name, its URI, the keys it holds and its size in bytes."""

    name: str
    uri: str
    keys: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class Written:
    """What `write_samples` committed: the shards, and the keys of the samples recorded as dropped."""

    shards: tuple[ShardRecord, ...]
    dropped: tuple[str, ...]


# ----------------------------------------------------------------------------- building


def sample_bytes(sample: Sample) -> int:
    """What one sample adds to a tar (ustar, as Python's tarfile writes it): per member, a header block and
    its data in whole blocks."""
    return sum(1 + -(-len(data) // tarfile.BLOCKSIZE) for data in sample.members.values()) * tarfile.BLOCKSIZE


def tar_size(samples_bytes: int) -> int:
    """The exact size of a tar whose samples take `samples_bytes` (`sample_bytes` summed): two zero blocks
    end it, and it is padded to whole records."""
    return -(-(samples_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def split_samples(samples: Sequence[Sample], shard_size: int, shard_bytes: int) -> list[list[Sample]]:
    """The samples (sorted by key) in consecutive shards of at most `shard_size` samples and `shard_bytes`
    bytes of tar; a sample larger than `shard_bytes` alone is a shard of its own."""
    if shard_size < 1 or shard_bytes < 1:
        raise ValueError(f"shard_size and shard_bytes must be positive, got {shard_size} and {shard_bytes}")
    shards: list[list[Sample]] = []
    size = 0
    for sample in sorted(samples, key=lambda s: s.key):
        grows = sample_bytes(sample)
        if shards and len(shards[-1]) < shard_size and tar_size(size + grows) <= shard_bytes:
            shards[-1].append(sample)
            size += grows
        else:
            shards.append([sample])
            size = grows
    return shards


def shard_name(member_names: Iterable[str]) -> str:
    """32 hex characters from the sorted member names: the same members, the same name."""
    return hashlib.sha256("\n".join(sorted(member_names)).encode()).hexdigest()[:32]


def build_shard(samples: Sequence[Sample]) -> bytes:
    """The bytes of one tar holding the samples, in order (fixed mtime: the same samples, the same bytes)."""
    import webdataset as wds  # here, not at the top: it imports torch, which readers of the index need not pay

    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write({"__key__": sample.key, **sample.members})
    return buffer.getvalue()


def _data_offsets(tar: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, size), read back from the tar's headers."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return {m.name: (m.offset_data, m.size) for m in archive.getmembers()}


# ----------------------------------------------------------------------------- index rows


def _flatten(metadata: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in metadata.items():
        if name == "quality" and not prefix:
            flat.update(value)
        elif name in _AS_JSON and not prefix:
            flat[name] = json.dumps(value, sort_keys=True)
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{name}_"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def index_row(sample: Sample, shard: str | None, offsets: Mapping[str, tuple[int, int]] | None = None) -> dict:
    """The sample's row of INDEX_SCHEMA; a metadata field without a column is an error (add the column:
    the schema is the index's contract)."""
    flat = _flatten(sample.metadata)
    unknown = sorted(name for name in flat if name not in INDEX_SCHEMA.names or name in _SAMPLE_COLUMNS)
    if unknown:
        raise ValueError(f"metadata fields without an index column (or clashing with one): {', '.join(unknown)}")
    row = {name: (_CONVERT[name](value) if name in _CONVERT and value is not None else value)
           for name, value in flat.items()}
    video_offset, video_size = (offsets or {}).get(f"{sample.key}.{sample.video_format}", (None, None))
    row.update(key=sample.key, shard=shard, members=sample.member_names if shard else [],
               video_offset=video_offset, video_size=video_size, caption=sample.caption)
    row.setdefault("status", OK)
    return row


def index_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=INDEX_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- writing


def write_samples(fs: AbstractFileSystem, root: str, samples: Sequence[Sample], dataset: DatasetConfig) -> Written:
    """Commit one batch of finished samples under `root`: shards of at most `dataset.shard_size` samples
    and `dataset.shard_bytes` bytes, each tar written whole and then its index part; filtered samples go
    to dropped/ instead when `dataset.keep_filtered` is false. Safe to retry with the same batch: it
    writes the same names with the same bytes. A key twice in the batch is written once."""
    unique = list({s.key: s for s in samples}.values())  # one per key (planning should have made them unique)
    if len(unique) < len(samples):
        log.warning("%d duplicate key(s) in a batch of %d samples: each is written once",
                    len(samples) - len(unique), len(samples))
    kept = [s for s in unique if dataset.keep_filtered or not s.filtered]
    dropped = [s for s in unique if not dataset.keep_filtered and s.filtered]
    shards = tuple(write_shard(fs, root, group) for group in split_samples(kept, dataset.shard_size, dataset.shard_bytes))
    if dropped:
        name = shard_name(f"{DROPPED}/{s.key}" for s in dropped)
        write_atomic(fs, f"{root}/{DROPPED}/{name}.parquet", _parquet_bytes(index_table([index_row(s, None) for s in dropped])))
    return Written(shards, tuple(s.key for s in dropped))


def write_shard(fs: AbstractFileSystem, root: str, samples: Sequence[Sample]) -> ShardRecord:
    """One shard: the tar (one atomic write), then its index part (the commit). Written again (a retried
    batch), it lands on the same objects with the same bytes."""
    if not samples:
        raise ValueError("a shard holds at least one sample")
    name = shard_name(n for s in samples for n in s.member_names)
    path = f"{root}/{SHARDS}/{name}.tar"
    tar = build_shard(samples)
    table = index_table([index_row(s, f"{SHARDS}/{name}.tar", _data_offsets(tar)) for s in samples])
    write_atomic(fs, path, tar)
    write_atomic(fs, f"{root}/{INDEX}/{name}.parquet", _parquet_bytes(table))
    return ShardRecord(name, uri_of(fs, path), tuple(s.key for s in samples), len(tar))


# ----------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class ShardScan:
    """What lies under shards/, index/ and dropped/: the committed shards (names, total bytes), the parts
    that commit samples (index and dropped parts), and orphans (paths to remove before rendering)."""

    committed: tuple[str, ...]
    committed_bytes: int
    parts: tuple[str, ...]
    orphans: tuple[str, ...]


def _listing(fs: AbstractFileSystem, path: str) -> dict[str, int]:
    """Path -> size of every file under `path`."""
    fs.invalidate_cache(path)  # a long-lived filesystem object may hold an old listing
    return {p: info.get("size") or 0 for p, info in fs.find(path, detail=True).items()}


def _named(listing: Mapping[str, int], suffix: str) -> dict[str, str]:
    """Name -> path of the files that end with `suffix`, temporary files aside."""
    out = {}
    for path in listing:
        base = path.rpartition("/")[2]
        if base.endswith(suffix) and not _is_temporary(path):
            out[base[: -len(suffix)]] = path
    return out


def _is_temporary(path: str) -> bool:
    base = path.rpartition("/")[2]
    return base.startswith(".") and base.endswith(".tmp")


def scan_shards(fs: AbstractFileSystem, root: str) -> ShardScan:
    """List the dataset's three prefixes once each (one request per 1,000 objects on S3). Orphans: tars
    without an index part, index parts whose tar is gone (their samples must render again), and temporary
    files of interrupted local writes. Other files are left alone."""
    listings = {prefix: _listing(fs, f"{root}/{prefix}") for prefix in (SHARDS, INDEX, DROPPED)}
    tars, index = _named(listings[SHARDS], ".tar"), _named(listings[INDEX], ".parquet")
    committed = sorted(tars.keys() & index.keys())
    orphans = [tars[n] for n in tars.keys() - index.keys()] + [index[n] for n in index.keys() - tars.keys()]
    orphans += [p for listing in listings.values() for p in listing if _is_temporary(p)]
    parts = [index[n] for n in committed] + sorted(_named(listings[DROPPED], ".parquet").values())
    return ShardScan(committed=tuple(committed), committed_bytes=sum(listings[SHARDS][tars[n]] for n in committed),
                     parts=tuple(parts), orphans=tuple(sorted(orphans)))


def remove_orphans(fs: AbstractFileSystem, root: str) -> list[str]:
    """Delete the orphans of `scan_shards` and return their paths. Run it before a run renders, while no
    other run writes to the same root."""
    orphans = list(scan_shards(fs, root).orphans)
    if orphans:
        log.warning("removing %d orphan(s) of an interrupted run under %s", len(orphans), root)
        fs.rm(orphans)
    return orphans


def read_index(fs: AbstractFileSystem, root: str, columns: Sequence[str] | None = None,
               parts: Sequence[str] | None = None) -> pa.Table:
    """The committed rows (index and dropped parts), optionally only some columns."""
    parts = list(scan_shards(fs, root).parts if parts is None else parts)
    if not parts:
        return INDEX_SCHEMA.empty_table().select(list(columns or INDEX_SCHEMA.names))
    return pads.dataset(parts, schema=INDEX_SCHEMA, format="parquet", filesystem=fs).to_table(columns=columns)


def committed_keys(fs: AbstractFileSystem, root: str) -> set[str]:
    """Keys of every committed sample (in a shard, or dropped by a filter): the done set of this layout."""
    return set(read_index(fs, root, ["key"])["key"].to_pylist())
