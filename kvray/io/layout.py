"""Where a render's outputs live under its prefix, which videos are done, and the latest status of
every row.

    videos/ab/{video_id}.mp4     the video (ab = the id's first two hex digits)
    meta/ab/{video_id}.json      its metadata, written after the video: the video's commit record
    posters/ab/{video_id}.jpg    its poster frame, written before the metadata (`kvray.io.posters`)
    previews/ab/{video_id}.webp  a small animated preview, written before the metadata
    results/{run_id}/*.parquet   one row per input row that run handled
    runs/{run_id}.json           each run: status, error, timings, plan, counts
    run.json                     the latest run's record
    lease.json                   the run that holds the prefix
    gallery/                     `kvray gallery`: static HTML pages of the outputs (index.html)

Keys are spread over 256 prefixes so that no single prefix carries a large cluster's request rate (S3
scales each prefix separately). Done videos are found by listing `meta/` once, in 16 groups of
prefixes: about one request per 1,000 done videos, never one per row. Outputs of kvray 0.1 (flat
`videos/{id}.mp4`, `meta/{id}.json`, `results/*.parquet`) are moved into this layout by
`kvray migrate OUT` (`migrate_legacy`); a render refuses such a prefix until then.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .atomic import write_atomic, write_json
from .shards import committed_keys

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
HEX = "0123456789abcdef"
VIDEO_ID_LENGTH = 32
_META_NAME = re.compile(r"^([0-9a-f]{32})\.json$")


class LegacyLayout(ValueError):
    """An output prefix written by kvray 0.1 (flat keys): migrate it first."""


def spread(video_id: str) -> str:
    return f"{video_id[:2]}/{video_id}"


def video_path(root: str, video_id: str, fmt: str) -> str:
    return f"{root}/videos/{spread(video_id)}.{fmt}"


def meta_path(root: str, video_id: str) -> str:
    return f"{root}/meta/{spread(video_id)}.json"


def poster_path(root: str, video_id: str) -> str:
    return f"{root}/posters/{spread(video_id)}.jpg"


def preview_path(root: str, video_id: str) -> str:
    return f"{root}/previews/{spread(video_id)}.webp"


def gallery_dir(root: str) -> str:
    return f"{root}/gallery"


def results_dir(root: str, run_id: str) -> str:
    return f"{root}/results/{run_id}"


def run_record_path(root: str, run_id: str) -> str:
    return f"{root}/runs/{run_id}.json"


def latest_run_path(root: str) -> str:
    return f"{root}/run.json"


def lease_path(root: str) -> str:
    return f"{root}/lease.json"


# ---------------------------------------------------------------------------------------------- listing


def _names_under(fs: AbstractFileSystem, folder: str, group: str) -> Iterator[str]:
    """Paths of the files below `folder` whose path relative to it starts with `group`."""
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(folder):  # open_fs gives local roots as plain absolute paths
            return
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(group):
                    continue
                if entry.is_file():
                    yield f"{folder}/{entry.name}"
                elif entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        yield from (f"{folder}/{entry.name}/{e.name}" for e in inner if e.is_file())
        return
    try:
        found = fs.find(folder, prefix=group) if group else fs.find(folder)  # paginated, filtered by the store
    except TypeError:  # a filesystem without prefix listings
        found = [p for p in fs.find(folder) if p[len(folder) + 1:].startswith(group)]
    # Listings are cached by some filesystems (s3fs): a million entries must not stay in memory.
    fs.invalidate_cache(folder)
    yield from found


SMALL_LISTING = 1_000  # done videos below which one listing of meta/ costs less than 16


def done_video_ids(fs: AbstractFileSystem, root: str) -> np.ndarray:
    """The sorted ids (numpy `S32`) of every video whose commit record (its metadata) exists.

    `meta/` is listed in 16 groups of prefixes (0..., 1..., ...), so that no listing of a million
    entries is ever held at once; an output whose first group is small is listed in one go instead.
    Requests: about one per 1,000 done videos, plus at most 17."""
    folder = f"{root}/meta"
    first = _done_in(fs, folder, HEX[0])
    if len(first) * len(HEX) < SMALL_LISTING:
        parts = [_done_in(fs, folder, "")]
    else:
        parts = [first, *(_done_in(fs, folder, group) for group in HEX[1:])]
    return np.unique(np.concatenate(parts))


def _done_in(fs: AbstractFileSystem, folder: str, group: str) -> np.ndarray:
    ids = []
    for path in _names_under(fs, folder, group):
        relative = path[len(folder) + 1:]
        name = relative.rpartition("/")[2]
        match = _META_NAME.match(name)
        if match is None:
            continue  # a temporary file of a writer, or something that is not ours
        if "/" not in relative:
            root = folder.rpartition("/")[0]
            raise LegacyLayout(
                f"{fs.unstrip_protocol(root)} holds outputs of kvray 0.1 (meta/{name}); move them into the "
                f"current layout once with: kvray migrate {fs.unstrip_protocol(root)}")
        ids.append(match.group(1))
    return np.array(ids, dtype=f"S{VIDEO_ID_LENGTH}")


def done_keys(fs: AbstractFileSystem, root: str, layout: str) -> np.ndarray:
    """The one notion of done, for either layout: the sorted ids (`S32`) of the videos whose commit
    record exists (their metadata file; for the webdataset layout, a row of a committed index part)."""
    if layout == "webdataset":
        return np.array(sorted(committed_keys(fs, root)), dtype=f"S{VIDEO_ID_LENGTH}")
    return done_video_ids(fs, root)


def is_done(done: np.ndarray, video_ids: list[str]) -> np.ndarray:
    """For each id, whether it is in the sorted `done` ids (bool array)."""
    if not video_ids:
        return np.zeros(0, dtype=bool)
    return where_in_sorted(done, np.array(video_ids, dtype=f"S{VIDEO_ID_LENGTH}")) >= 0


def where_in_sorted(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of `values`, its index in `sorted_values`, or -1 where it is not there."""
    if not len(sorted_values):
        return np.full(len(values), -1, dtype=np.int64)
    index = np.searchsorted(sorted_values, values).clip(max=len(sorted_values) - 1)
    return np.where(sorted_values[index] == values, index, -1)


def remove_temporaries(fs: AbstractFileSystem, root: str) -> int:
    """Temporary files that writers killed mid-write left on a local disk (object stores publish whole
    objects and leave none); call it only while holding the prefix's lease. Returns how many went."""
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder in ("videos", "meta", "results", "runs", "shards", "index", "dropped", "posters", "previews"):
        for parent, _, names in os.walk(f"{root}/{folder}"):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(os.path.join(parent, name))
                    removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- results


def result_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Every run's result files, oldest run first (run ids start with their UTC start time)."""
    folder = f"{root}/results"
    if not fs.isdir(folder):
        return []
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet") and not p.rpartition("/")[2].startswith("."))


def latest_results(fs: AbstractFileSystem, root: str, columns: list[str] | None = None) -> pa.Table:
    """The state of every row, one per id, with the `run` that recorded it: the row from the most recent
    run that handled the id, except that a skip (its video was already done) gives way to the outcome
    of the run that made that video, so a re-run never hides how a row ended."""
    tables = []
    for path in result_files(fs, root):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        run = path.rsplit("/", 2)[-2]  # results/{run}/{file}
        tables.append(table.append_column("run", pa.array([run] * table.num_rows, pa.string())))
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.append_column("_position", pa.array(np.arange(len(table), dtype=np.int64)))
    last = table.group_by("id").aggregate([("_position", "max")]).column("_position_max").to_numpy()
    chosen = np.sort(last)
    if {"status", "video_id"} <= set(table.column_names):
        chosen = _outcomes_of_skips(table, chosen)
    return table.take(chosen).drop_columns(["_position"])


SKIPPED = "skipped"  # the status of a row whose video an earlier run made


def _outcomes_of_skips(table: pa.Table, latest: np.ndarray) -> np.ndarray:
    """`latest` positions, each skip replaced by the latest row of the same id and video that is not a skip."""
    rows = table.take(latest)
    skips = pc.and_(pc.equal(rows.column("status"), SKIPPED), pc.not_equal(rows.column("video_id"), ""))
    if not pc.any(skips).as_py():
        return latest
    outcomes = table.filter(pc.not_equal(table.column("status"), SKIPPED)).select(["id", "video_id", "_position"])
    made = outcomes.group_by(["id", "video_id"]).aggregate([("_position", "max")])
    skipped = rows.filter(skips).select(["id", "video_id", "_position"])
    found = skipped.join(made, keys=["id", "video_id"], join_type="inner")
    replaced = dict(zip(found.column("_position").to_numpy(), found.column("_position_max").to_numpy()))
    return np.sort([replaced.get(p, p) for p in latest.tolist()]).astype(np.int64)

# ---------------------------------------------------------------------------------------------- migration


def migrate_legacy(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """Moves kvray 0.1 outputs into the current layout: flat videos/ and meta/ keys into their spread
    prefixes (each video before its metadata, so that a video is never listed done before it is in
    place), flat results/*.parquet into results/legacy/ with their URIs rewritten. Idempotent: an
    interrupted migration is finished by running it again."""
    moved = {"videos": 0, "meta": 0, "results": 0}
    for folder in ("videos", "meta"):
        if not fs.isdir(f"{root}/{folder}"):
            continue
        for path in fs.ls(f"{root}/{folder}", detail=False):
            name = path.rpartition("/")[2]
            stem = name.partition(".")[0]
            if len(stem) != VIDEO_ID_LENGTH or not all(c in HEX for c in stem) or fs.isdir(path):
                continue
            if folder == "meta":
                video = json.loads(fs.cat_file(path))
                video["uri"] = fs.unstrip_protocol(video_path(root, stem, video.get("format", "mp4")))
                write_json(fs, meta_path(root, stem), video)
                fs.rm_file(path)
            else:
                target = f"{root}/{folder}/{spread(stem)}.{name.partition('.')[2]}"
                fs.makedirs(target.rpartition("/")[0], exist_ok=True)  # a real directory on local disk
                fs.mv(path, target)
            moved[folder] += 1
    results = f"{root}/results"
    if fs.isdir(results):
        for path in fs.ls(results, detail=False):
            if not path.endswith(".parquet") or fs.isdir(path):
                continue
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            if "uri" in table.column_names and "video_id" in table.column_names:
                uris = [_moved_uri(fs, root, u, v) for u, v in zip(table.column("uri").to_pylist(),
                                                                    table.column("video_id").to_pylist())]
                table = table.set_column(table.column_names.index("uri"), "uri", pa.array(uris, pa.string()))
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            write_atomic(fs, f"{results}/legacy/{path.rpartition('/')[2]}", sink.getvalue().to_pybytes())
            fs.rm_file(path)
            moved["results"] += 1
    return moved


def _moved_uri(fs, root: str, uri: str, video_id: str) -> str:
    if not uri or not video_id:
        return uri
    return fs.unstrip_protocol(video_path(root, video_id, uri.rpartition(".")[2]))
