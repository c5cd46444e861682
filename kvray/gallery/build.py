"""Build the gallery of an output prefix: which rows, in which order, on which page, with which links.

What is read: the results once (`latest_results`, columnar: the counts, the order and the pages come
from it), the dataset index once where the output has one (its quality columns only), the latest run
record, and for each page the metadata of that page's videos only (one batched read; concurrent on
object stores). Videos, posters and previews are never read: the pages link to them.

Where the pages go and how they link (`Links`):
  * `{out}/gallery/`: links relative to the pages (`../posters/ab/...`), so the pages work wherever the
    prefix is browsed as files or served as a static site;
  * `local`, a local folder: for a local output, file:// URLs of its files; for an object store,
    presigned https URLs (`fs.sign`) valid for `expires` seconds, so that the pages open in a browser
    without credentials.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from ..config.dataset import SIGNALS
from ..config.stages import STAGES
from ..io.atomic import read_json, write_atomic
from ..io.layout import (
    gallery_dir,
    latest_results,
    latest_run_path,
    meta_path,
    poster_path,
    preview_path,
    video_path,
)
from ..io.opening import open_fs, uri_of
from ..io.video import FORMATS
from .pages import INDEX as INDEX_PAGE
from .pages import (
    SCRIPT,
    STYLESHEET,
    Card,
    Media,
    PageSummary,
    Site,
    index_html,
    page_html,
    page_name,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
MAX_EXPIRES = 7 * 24 * 3600  # the longest a presigned S3 URL (signature version 4) may live
DEFAULT_EXPIRES = MAX_EXPIRES
FIRST_ERRORS = 20  # error rows listed on the index page
ERROR = "error"
_TIME = "%Y-%m-%d %H:%M:%S"  # UTC
_VIDEO_ID = re.compile(r"^[0-9a-f]{32}$")
_PAGE_FILE = re.compile(r"^page-(\d{6})\.html$")
_INDEX_COLUMNS = ("video_id", "status", "filter_reasons", *SIGNALS, "width", "height", "frames", "fps", "mode",
                  "model_version")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                  ".js": "text/javascript; charset=utf-8"}


class GalleryError(ValueError):
    """A gallery that cannot be built as asked, with the reason."""


class NothingToShow(GalleryError):
    """The output has no results yet, or no rows of the statuses asked for."""


@dataclass(frozen=True)
class Gallery:
    """What `build_gallery` wrote."""

    index: str  # URI of index.html
    local_index: str | None  # its local path, when the pages are on local disk
    pages: int  # pages of the selected rows
    written: int  # pages written (all, or the first `max_pages`)
    cards: int  # selected rows
    counts: dict[str, int]  # status -> rows, over every row of the output
    expires: datetime | None  # when presigned links stop working


class Links:
    """URLs, as the pages see them, of files under the output's root."""

    def __init__(self, fs: AbstractFileSystem, root: str, *, local: bool, expires: int):
        self.fs, self.root, self.expires = fs, root, expires
        if not local:
            self.mode, self.sources = "relative", "'self'"
        elif isinstance(fs, LocalFileSystem):
            self.mode, self.sources = "file", "'self' file:"
        else:
            self.mode = "signed"
            try:
                probe = urlsplit(fs.sign(f"{root}/{INDEX_PAGE}", expiration=expires))
            except NotImplementedError:
                raise GalleryError(
                    f"{uri_of(fs, root)}: this storage cannot presign URLs for a local copy of the pages; build "
                    "them under the prefix (without --local) and serve it as a static site") from None
            self.sources = f"'self' {probe.scheme}://{probe.netloc}"

    def url(self, path: str) -> str:
        if self.mode == "relative":  # the pages lie in {root}/gallery/
            return "../" + quote(path[len(self.root) + 1:])
        if self.mode == "file":
            return Path(path).as_uri()
        return self.fs.sign(path, expiration=self.expires)


def build_gallery(out: str, *, storage_options: Mapping[str, Any] | None = None, local: str | os.PathLike | None = None,
                  statuses: Sequence[str] = (), page_size: int = DEFAULT_PAGE_SIZE, max_pages: int | None = None,
                  expires: int = DEFAULT_EXPIRES, progress: Callable[[int, int], None] | None = None) -> Gallery:
    """Write the gallery of the output prefix `out`: `index.html` (counts per status, the latest run,
    the first error rows, a link per page) and pages of `page_size` cards in manifest order, with the
    rows of `statuses` only (default all), the first `max_pages` pages only (default all). The pages
    go to `{out}/gallery/`, or to the local folder `local` (links as file:// URLs or presigned URLs
    valid `expires` seconds). `progress(done, total)` is called after each page."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise GalleryError(f"page size must be within 1..{MAX_PAGE_SIZE}, got {page_size}")
    if max_pages is not None and max_pages < 1:
        raise GalleryError(f"max pages must be at least 1, got {max_pages}")
    if not 1 <= expires <= MAX_EXPIRES:
        raise GalleryError(f"expiry must be within 1..{MAX_EXPIRES} seconds (7 days), got {expires}")
    now = datetime.now(UTC).replace(microsecond=0)
    fs, root = open_fs(out, storage_options)
    links = Links(fs, root, local=local is not None, expires=expires)

    results = latest_results(fs, root)
    if results.num_rows == 0:
        raise NothingToShow(f"no results under {uri_of(fs, root)}: a render writes them to results/")
    counts = _counts(results.column("status"))
    selected = _ordered(_selected(results, statuses, counts))
    pages = -(-selected.num_rows // page_size)
    written = pages if max_pages is None else min(pages, max_pages)

    if local is None:
        dest_fs, dest = fs, gallery_dir(root)
    else:
        dest_fs, dest = LocalFileSystem(), os.path.abspath(local)
    expiry = now + timedelta(seconds=expires) if links.mode == "signed" else None
    site = Site(title=uri_of(fs, root), sources=links.sources, generated=now.strftime(_TIME),
                expires=expiry.strftime(_TIME) if expiry else None)
    scope = f"status {', '.join(statuses)}" if statuses else "all rows"

    for asset in (STYLESHEET, SCRIPT):
        _write(dest_fs, f"{dest}/{asset}", importlib.resources.files(__package__).joinpath(asset).read_bytes())
    index = _DatasetIndex.read(fs, root)
    first_cards = []
    for number in range(1, written + 1):
        rows = selected.slice((number - 1) * page_size, page_size).to_pylist()
        cards = _cards(fs, root, rows, index, links)
        first_cards = first_cards or cards
        _write(dest_fs, f"{dest}/{page_name(number)}", page_html(site, cards, number, pages, scope=scope).encode())
        if progress is not None:
            progress(number, written)
    _remove_stale_pages(dest_fs, dest, written)
    errors = [(_card(row, {}, None), page) for row, page in _first_errors(selected, page_size, written)]
    index_page = index_html(site, counts=counts, scope=scope, pages=_summaries(selected, page_size), written=written,
                            errors=errors, run=_latest_run(fs, root), first_cards=first_cards)
    _write(dest_fs, f"{dest}/{INDEX_PAGE}", index_page.encode())
    return Gallery(index=uri_of(dest_fs, f"{dest}/{INDEX_PAGE}"),
                   local_index=f"{dest}/{INDEX_PAGE}" if isinstance(dest_fs, LocalFileSystem) else None,
                   pages=pages, written=written, cards=selected.num_rows, counts=counts, expires=expiry)


# ----------------------------------------------------------------------------- rows


def _counts(status: pa.ChunkedArray) -> dict[str, int]:
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(status).to_pylist()}


def _selected(results: pa.Table, statuses: Sequence[str], counts: Mapping[str, int]) -> pa.Table:
    if not statuses:
        return results
    selected = results.filter(pc.is_in(results.column("status"), value_set=pa.array(list(statuses), pa.string())))
    if selected.num_rows == 0:
        present = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        raise NothingToShow(f"no rows with status {', '.join(statuses)} (the rows here: {present})")
    return selected


def _ordered(results: pa.Table) -> pa.Table:
    """In manifest order (`row`, then `id`); outputs whose results have no `row` column in id order."""
    keys = [(name, "ascending") for name in ("row", "id") if name in results.column_names]
    table = results.take(pc.sort_indices(results, sort_keys=keys))
    if "row" not in table.column_names:
        table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return table


def _summaries(selected: pa.Table, page_size: int) -> list[PageSummary]:
    """Per page: its first and last manifest row and its counts per status (vectorised: a million rows
    is 10,000 summaries)."""
    if selected.num_rows == 0:
        return []
    encoded = pc.dictionary_encode(selected.column("status")).combine_chunks()
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    page = np.arange(len(codes)) // page_size
    pages = int(page[-1]) + 1
    table = np.bincount(page * len(names) + codes, minlength=pages * len(names)).reshape(pages, len(names))
    rows = selected.column("row").to_numpy()
    return [PageSummary(number=p + 1, first_row=int(rows[p * page_size]),
                        last_row=int(rows[min((p + 1) * page_size, len(rows)) - 1]),
                        counts={names[k]: int(n) for k, n in enumerate(table[p]) if n})
            for p in range(pages)]


def _first_errors(selected: pa.Table, page_size: int, written: int) -> list[tuple[dict, int]]:
    """The first error rows of the selection with the page each is on, among the written pages."""
    where = np.flatnonzero(pc.equal(selected.column("status"), ERROR).to_numpy(zero_copy_only=False))
    where = where[where < written * page_size][:FIRST_ERRORS]
    return [(row, int(i) // page_size + 1) for i, row in zip(where, selected.take(where).to_pylist())]


# ----------------------------------------------------------------------------- details of each card


class _DatasetIndex:
    """The quality columns of a webdataset-layout output's index, looked up by video id."""

    def __init__(self, table: pa.Table):
        ids = np.array(table.column("video_id").to_pylist(), dtype="S32")
        order = np.argsort(ids, kind="stable")
        self.ids, self.table = ids[order], table.take(order)

    @classmethod
    def read(cls, fs: AbstractFileSystem, root: str) -> _DatasetIndex | None:
        from ..io.shards import (  # imports webdataset and torch: only when needed
            DROPPED,
            INDEX,
            read_index,
        )

        if not (fs.isdir(f"{root}/{INDEX}") or fs.isdir(f"{root}/{DROPPED}")):
            return None
        table = read_index(fs, root, columns=list(_INDEX_COLUMNS))
        return cls(table) if table.num_rows else None

    def details(self, video_id: str) -> dict | None:
        at = int(np.searchsorted(self.ids, video_id.encode()))
        if at == len(self.ids) or self.ids[at] != video_id.encode():
            return None
        row = self.table.slice(at, 1).to_pylist()[0]
        return _details({**row, "quality": {name: row[name] for name in SIGNALS}})


def _details(record: Mapping[str, Any]) -> dict:
    """What a card shows of a video's metadata (meta/{video_id}.json) or of its index row."""
    details: dict[str, Any] = {}
    width, height = record.get("width"), record.get("height")
    if isinstance(width, int) and isinstance(height, int):
        details["size"] = (width, height)
    if record.get("frames"):
        details["frames"] = record["frames"]
    if record.get("fps"):
        try:
            details["fps"] = float(Fraction(str(record["fps"])))
        except (ValueError, ZeroDivisionError):
            details["fps"] = record["fps"]
    for name in ("mode", "model_version", "format", "filter_reasons"):
        if record.get(name):
            details[name] = record[name]
    if isinstance(record.get("quality"), Mapping):
        details["quality"] = _in_order(record["quality"], SIGNALS)
    scenes = record.get("scenes")
    if isinstance(scenes, list) and len(scenes) > 1:
        details["scenes"] = [s.get("prompt") if isinstance(s, Mapping) else s for s in scenes]
    if isinstance(record.get("seconds"), Mapping):
        details["seconds"] = _in_order(record["seconds"], STAGES)
    return details


def _in_order(values: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`values` with the known `names` first, in their order (metadata JSON has its keys sorted)."""
    return {**{name: values[name] for name in names if name in values}, **values}


def _read_meta(fs: AbstractFileSystem, root: str, video_ids: Sequence[str]) -> dict[str, dict]:
    """The metadata of these videos, by id, in one batch of reads (concurrent on object stores: whole-file
    ranges skip the existence checks of `cat`); missing or unreadable files are left out."""
    paths = [meta_path(root, v) for v in video_ids]
    found = fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return") if paths else []
    metas = {}
    for video_id, path, data in zip(video_ids, paths, found):
        if isinstance(data, FileNotFoundError):
            continue  # rendered before this output kept metadata, or removed since
        if isinstance(data, BaseException):
            raise data
        try:
            meta = json.loads(data)
        except ValueError:
            log.warning("%s is not JSON: its card shows the results only", uri_of(fs, path))
            continue
        if isinstance(meta, dict):
            metas[video_id] = meta
    return metas


def _cards(fs: AbstractFileSystem, root: str, rows: list[dict], index: _DatasetIndex | None,
           links: Links) -> list[Card]:
    rendered = [r for r in rows if r["status"] != ERROR and _VIDEO_ID.match(r.get("video_id") or "")]
    indexed = {r["video_id"]: d for r in rendered if index is not None and (d := index.details(r["video_id"]))}
    metas = _read_meta(fs, root, sorted({r["video_id"] for r in rendered} - indexed.keys()))
    details = {**{v: _details(m) for v, m in metas.items()}, **indexed}
    return [_card(row, details.get(row.get("video_id") or "", {}), links, root) for row in rows]


def _card(row: Mapping[str, Any], details: Mapping[str, Any], links: Links | None, root: str = "") -> Card:
    """The card of a result row; `links` None: a card without media (for the index's error list)."""
    seconds = {name[len("seconds_"):]: float(value) for name, value in row.items()
               if name.startswith("seconds_") and value is not None}
    if not any(seconds.values()):  # a skipped row: the timings of the run that rendered the video
        seconds = {k: float(v) for k, v in details.get("seconds", {}).items() if isinstance(v, (int, float))}
    video_id = row.get("video_id") or ""
    media = Media()
    if links is not None and row["status"] != ERROR and _VIDEO_ID.match(video_id):
        media = _media(links, root, video_id, _video_format(row.get("uri") or "", details))
    seed = row.get("seed")
    return Card(row=int(row["row"]), id=str(row["id"]), status=str(row["status"]), video_id=video_id,
                prompt=row.get("prompt") or "", prompt_truncated=bool(row.get("prompt_truncated")),
                seed=int(seed) if seed is not None else None, error=row.get("error") or "", seconds=seconds,
                media=media, details=details)


def _video_format(uri: str, details: Mapping[str, Any]) -> str | None:
    """The format of the row's own video file, None where it has none (a sample inside a shard)."""
    if uri:
        extension = uri.rpartition("/")[2].rpartition(".")[2].lower()
        return extension if extension in FORMATS else None
    return details.get("format") if details.get("format") in FORMATS else None


def _media(links: Links, root: str, video_id: str, video_format: str | None) -> Media:
    poster = links.url(poster_path(root, video_id))
    if video_format is None:  # no video file of its own (a sample inside a shard): the preview animates
        return Media(poster=poster, animated=links.url(preview_path(root, video_id)))
    video = links.url(video_path(root, video_id, video_format))
    if video_format == "mp4":
        return Media(poster=poster, video=video, link=video)
    return Media(poster=poster, animated=video, link=video)  # gif and webp play as images


# ----------------------------------------------------------------------------- writing


def _write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    write_atomic(fs, path, data, content_type=_CONTENT_TYPES[os.path.splitext(path)[1]])


def _remove_stale_pages(fs: AbstractFileSystem, dest: str, written: int) -> None:
    """Pages left by an earlier, longer gallery in the same folder."""
    if not fs.isdir(dest):
        return
    stale = [p for p in fs.ls(dest, detail=False)
             if (m := _PAGE_FILE.match(p.rpartition("/")[2])) and int(m.group(1)) > written]
    if stale:
        fs.rm(stale)


def _latest_run(fs: AbstractFileSystem, root: str) -> dict | None:
    try:
        record = read_json(fs, latest_run_path(root))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None
