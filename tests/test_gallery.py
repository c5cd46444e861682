"""Posters, previews and `kvray gallery`: stills from frames, pages of an output written as a render lays it
out (local and on S3, with presigned links), pagination, escaping of hostile strings, and the pages in a
real headless Chromium."""

from __future__ import annotations

import hashlib
import html
import io
import os
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kvray.cli import main
from kvray.config.dataset import QualityFilter
from kvray.distributed.rows import RESULT_SCHEMA
from kvray.gallery.build import GalleryError, NothingToShow, build_gallery
from kvray.gallery.pages import text
from kvray.io.atomic import write_atomic, write_json
from kvray.io.layout import (
    gallery_dir,
    meta_path,
    poster_path,
    preview_path,
    results_dir,
    video_path,
)
from kvray.io.opening import open_fs
from kvray.io.posters import poster_frame, poster_jpeg, preview_webp, write_stills
from kvray.io.shards import Sample, write_shard
from kvray.io.video import encode_video, read_video
from kvray.pipeline.quality import quality_fields

from .chromium import Browser

HOSTILE_PROMPT = "<script>alert(1)</script>"
HOSTILE_ERROR = "bad row: \"quoted\" & <img src=x onerror=alert(2)> \x07 bell"
SIZE, FRAMES, FPS = 64, 4, 8

# id, status, solid colour of the frames (None: nothing rendered), prompt, error. The colours are none of
# the page's own, so that the screenshot shows which posters loaded.
ROWS = [
    ("hostile", "ok", (255, 0, 255), HOSTILE_PROMPT, ""),
    ("quotes", "ok", (0, 255, 255), "a \"quoted\" 'prompt' & <b>bold</b>\x00", ""),
    ("before", "skipped", (255, 255, 0), "rendered by an earlier run", ""),
    ("broken", "error", None, "a prompt whose row failed", HOSTILE_ERROR),
    ("blank", "filtered", (255, 128, 0), "a blank clip", ""),
    ("refused", "error", None, "", "width 65 is not a multiple of 64"),
    ("late", "ok", (0, 0, 255), "the last row", ""),
]


def video_id(row_id: str) -> str:
    return hashlib.sha256(row_id.encode()).hexdigest()[:32]


def solid(colour) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (FRAMES, SIZE, SIZE, 3)).copy()


def result_row(position: int, row_id: str, status: str, prompt: str, error: str, uri: str) -> dict:
    seconds = {name: (0.5 if status == "ok" else 0.0) for name in RESULT_SCHEMA.names if name.startswith("seconds_")}
    return {"id": row_id, "row": position, "video_id": video_id(row_id), "status": status, "uri": uri,
            "error": error, "seed": 1000 + position, "prompt": prompt, "prompt_truncated": position == 1, **seconds}


def write_results(fs, root: str, run_id: str, rows: list[dict]) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), sink)
    write_atomic(fs, f"{results_dir(root, run_id)}/part-0.parquet", sink.getvalue())


def make_output(uri: str, storage_options=None) -> tuple:
    """An output as a render leaves it: per rendered row its video, stills and metadata (with quality
    fields), and two runs of results (the first run failed a row that the second rendered)."""
    fs, root = open_fs(uri, storage_options)
    results = []
    for position, (row_id, status, colour, prompt, error) in enumerate(ROWS):
        vid = video_id(row_id)
        uri_ = fs.unstrip_protocol(video_path(root, vid, "mp4")) if colour else ""
        results.append(result_row(position, row_id, status, prompt, error, uri_))
        if colour is None:
            continue
        frames = solid(colour)
        write_atomic(fs, video_path(root, vid, "mp4"), encode_video(frames, FPS), content_type="video/mp4")
        write_stills(fs, root, vid, frames, FPS)
        filters = [QualityFilter.model_validate("blank_share<0.5")] if status == "filtered" else []
        write_json(fs, meta_path(root, vid), {
            "id": row_id, "video_id": vid, "seed": 1000 + position, "mode": "text2video", "model_version": "test",
            "frames": FRAMES, "width": SIZE, "height": SIZE, "fps": str(FPS), "format": "mp4", "uri": uri_,
            "scenes": [{"prompt": prompt}], "seconds": {"text": 0.1, "keyframes": 0.2, "interpolate": 0.3, "decode": 0.4},
            **quality_fields(frames, filters),
        })
    earlier = [dict(results[0], status="error", error="the first run failed this row", uri="")]
    write_results(fs, root, "20260101T000000Z-a", earlier)
    write_results(fs, root, "20260102T000000Z-b", results)
    return fs, root


class Cards(HTMLParser):
    """The cards of a page (class and text of each `article.card`), its links, images and scripts."""

    def __init__(self, page: str):
        super().__init__()
        self.cards, self.scripts, self.links, self.images, self._depth = [], [], [], [], 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article" and "card" in attrs.get("class", "").split():
            self.cards.append({"class": attrs["class"], "id": attrs.get("id"), "text": "", "data": {}})
            self._depth = 1
        elif self._depth and tag == "article":
            self._depth += 1
        if tag == "script":
            self.scripts.append(attrs.get("src"))
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])
        if self._depth and tag in ("a", "div") and "thumb" in attrs.get("class", ""):
            self.cards[-1]["data"] = {k: v for k, v in attrs.items() if k.startswith("data-")}

    def handle_endtag(self, tag):
        if self._depth and tag == "article":
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.cards[-1]["text"] += data


def read_page(fs, path: str) -> str:
    return fs.cat_file(path).decode()


# ----------------------------------------------------------------------------- stills


def test_poster_is_the_middle_frame_never_enlarged():
    frames = np.zeros((5, 96, 128, 3), np.uint8)
    frames[poster_frame(5)] = (200, 40, 40)
    assert poster_frame(5) == 2 and poster_frame(1) == 0
    poster = Image.open(io.BytesIO(poster_jpeg(frames)))
    assert poster.format == "JPEG" and poster.size == (128, 96)
    assert np.abs(np.asarray(poster).astype(int) - (200, 40, 40)).max() < 8
    big = np.zeros((3, 600, 1200, 3), np.uint8)
    assert Image.open(io.BytesIO(poster_jpeg(big))).size == (512, 256)  # the longer side at most 512
    with pytest.raises(ValueError, match="uint8"):
        poster_jpeg(frames.astype(np.float32))


def test_preview_is_a_few_small_frames_over_the_clip_duration():
    frames = (np.arange(20, dtype=np.uint8)[:, None, None, None] * 12).repeat(256, 1).repeat(320, 2).repeat(3, 3)
    preview = preview_webp(frames, 4)  # 20 frames at 4 fps: 5 s
    assert Image.open(io.BytesIO(preview)).format == "WEBP"
    shown, rate = read_video(preview)
    assert shown.shape == (8, 154, 192, 3) and len(shown) / rate == 5  # 8 frames over the clip's 5 s
    assert np.all(np.diff(shown[:, 0, 0, 0].astype(int)) > 0), "frames in order, from first to last"
    assert read_video(preview_webp(frames[:3], 4))[0].shape[0] == 3


def test_stills_land_next_to_the_video(tmp_path):
    fs, root = open_fs(str(tmp_path))
    vid = video_id("x")
    written = write_stills(fs, root, vid, solid((10, 20, 30)), FPS)
    assert written == {"poster": poster_path(root, vid), "preview": preview_path(root, vid)}
    assert written["poster"] == f"{root}/posters/{vid[:2]}/{vid}.jpg"
    assert written["preview"] == f"{root}/previews/{vid[:2]}/{vid}.webp"
    assert Image.open(written["poster"]).format == "JPEG" and Image.open(written["preview"]).format == "WEBP"


# ----------------------------------------------------------------------------- pages


def test_text_escapes_markup_quotes_and_control_characters():
    assert text(HOSTILE_PROMPT) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert text("a\"b'c&d") == "a&quot;b&#x27;c&amp;d"
    assert text("bell\x07 nul\x00 del\x7f c1\x85 tab\t newline\n") == "bell\\x07 nul\\x00 del\\x7f c1\\x85 tab\t newline\n"
    assert text("lone \ud800 surrogate") == "lone \ufffd surrogate"
    assert text(None) == "" and text(12) == "12"


def test_local_gallery_pages_links_and_escaping(tmp_path):
    fs, root = make_output(str(tmp_path / "out"))
    gallery = build_gallery(str(tmp_path / "out"), page_size=3)
    folder = gallery_dir(root)
    assert gallery.pages == gallery.written == 3 and gallery.cards == len(ROWS)
    assert gallery.counts == {"ok": 3, "skipped": 1, "error": 2, "filtered": 1}  # the latest run of each row
    assert gallery.local_index == f"{folder}/index.html"
    assert sorted(os.listdir(folder)) == ["gallery.css", "gallery.js", "index.html", "page-000001.html",
                                          "page-000002.html", "page-000003.html"]
    cards = []
    for number in (1, 2, 3):
        page = read_page(fs, f"{folder}/page-{number:06d}.html")
        parsed = Cards(page)
        assert parsed.scripts == ["gallery.js"], "no script but the gallery's own"
        assert HOSTILE_PROMPT not in page and "<img src=x" not in page and "\x07" not in page and "\x00" not in page
        for src in parsed.images:  # every poster the page shows exists, relative to the page
            assert (Path(folder) / src).is_file(), src
        cards += parsed.cards
    assert [c["id"] for c in cards] == [f"row-{i}" for i in range(len(ROWS))]  # manifest order, every row once
    by_row = dict(zip((r[0] for r in ROWS), cards))
    assert "status-ok" in by_row["hostile"]["class"] and HOSTILE_PROMPT in by_row["hostile"]["text"]
    assert "the first run failed" not in by_row["hostile"]["text"]
    assert HOSTILE_ERROR.replace("\x07", "\\x07") in by_row["broken"]["text"]
    assert "not rendered" in by_row["broken"]["text"] and not by_row["broken"]["data"]
    mp4 = by_row["late"]["data"]["data-video"]
    assert mp4 == f"../videos/{video_id('late')[:2]}/{video_id('late')}.mp4" and (Path(folder) / mp4).is_file()
    assert "seed1006" in by_row["late"]["text"].replace(" ", "") and "total 2.00" in by_row["late"]["text"]
    assert "blank_share 1" in by_row["blank"]["text"] and "blank_share<0.5" in by_row["blank"]["text"]
    assert "total 1.00" in by_row["before"]["text"]  # a skipped row: the timings of the run that rendered it
    assert "truncated" in by_row["quotes"]["text"]
    index = Cards(read_page(fs, gallery.local_index))
    assert [link for link in index.links if link.startswith("page-")] == [
        "page-000002.html#row-3", "page-000002.html#row-5",  # the first error rows
        "page-000001.html",  # above the first page's cards
        "page-000001.html", "page-000002.html", "page-000003.html"]
    # The index opens on pictures: the first page's cards.
    assert index.cards == Cards(read_page(fs, f"{folder}/page-000001.html")).cards and index.images


def test_status_filter_pagination_and_stale_pages(tmp_path):
    fs, root = make_output(str(tmp_path / "out"))
    out = str(tmp_path / "out")
    assert build_gallery(out, page_size=1).written == len(ROWS)
    gallery = build_gallery(out, statuses=["error", "skipped"], page_size=2)
    assert (gallery.pages, gallery.cards) == (2, 3)
    pages = sorted(n for n in os.listdir(gallery_dir(root)) if n.startswith("page-"))
    assert pages == ["page-000001.html", "page-000002.html"], "the longer gallery's pages are gone"
    statuses = [c["class"].split()[1] for n in pages for c in Cards(read_page(fs, f"{gallery_dir(root)}/{n}")).cards]
    assert statuses == ["status-skipped", "status-error", "status-error"]
    limited = build_gallery(out, page_size=2, max_pages=1)
    assert (limited.pages, limited.written) == (4, 1)
    index = read_page(fs, limited.local_index)
    # The unwritten pages are listed without links; page 1 is linked from its list entry and its cards' heading.
    assert index.count("href=\"page-") == 2 and "rows 6–6" in index
    with pytest.raises(NothingToShow, match="no rows with status nope"):
        build_gallery(out, statuses=["nope"])
    with pytest.raises(GalleryError, match="page size"):
        build_gallery(out, page_size=0)
    with pytest.raises(NothingToShow, match="no results"):
        build_gallery(str(tmp_path / "empty"))


def test_webdataset_layout_takes_quality_from_the_index(tmp_path):
    """A sample inside a shard: no meta file, no video file of its own; the index gives its quality and the
    animated preview plays in place of a video."""
    fs, root = open_fs(str(tmp_path / "out"))
    vid, frames = video_id("sample"), solid((40, 200, 90))
    write_stills(fs, root, vid, frames, FPS)
    metadata = {"id": "sample", "video_id": vid, "seed": 7, "mode": "text2video", "model_version": "test",
                "frames": FRAMES, "width": SIZE, "height": SIZE, "fps": str(FPS), "format": "mp4", "uri": "",
                **quality_fields(frames)}
    shard = write_shard(fs, root, [Sample(key=vid, video=encode_video(frames, FPS), metadata=metadata, caption="c")])
    write_results(fs, root, "20260101T000000Z-a", [result_row(0, "sample", "ok", "a sample", "", shard.uri)])
    build_gallery(str(tmp_path / "out"))
    card = Cards(read_page(fs, f"{gallery_dir(root)}/page-000001.html")).cards[0]
    assert "blank_share 1" in card["text"] and "64×64, 4 frames, 8 fps" in card["text"]
    assert card["data"] == {"data-preview": f"../previews/{vid[:2]}/{vid}.webp"}


def test_gallery_command(tmp_path, capsys):
    make_output(str(tmp_path / "out"))
    assert main(["gallery", str(tmp_path / "out"), "--status", "error", "--local", str(tmp_path / "pages")]) == 0
    line = capsys.readouterr().out
    assert "error 2" in line and "2 cards on 1 page " in line and str(tmp_path / "pages" / "index.html") in line
    assert Cards((tmp_path / "pages" / "page-000001.html").read_text()).images == []  # error rows have no media
    assert main(["gallery", str(tmp_path / "out"), "--local", str(tmp_path / "pages")]) == 0
    poster = Cards((tmp_path / "pages" / "page-000001.html").read_text()).images[0]
    assert poster.startswith("file:///") and Path(poster[len("file://"):]).is_file()  # absolute: the copy may move
    assert main(["gallery", str(tmp_path / "nothing")]) == 1
    assert main(["gallery", str(tmp_path / "out"), "--page-size", "0"]) == 2
    assert main(["gallery", "s3://bucket/out", "--open"]) == 2
    assert "--open needs --local" in capsys.readouterr().err


def test_s3_gallery_under_the_prefix_and_presigned_local_copy(s3_bucket, tmp_path):
    uri = f"{s3_bucket.uri}/out"
    fs, root = make_output(uri, s3_bucket.storage_options)
    gallery = build_gallery(uri, storage_options=s3_bucket.storage_options, page_size=4)
    assert gallery.index == f"{uri}/gallery/index.html" and gallery.local_index is None and gallery.expires is None
    assert fs.info(f"{root}/gallery/index.html")["ContentType"] == "text/html; charset=utf-8"  # a site shows it
    page = Cards(read_page(fs, f"{root}/gallery/page-000001.html"))
    assert len(page.cards) == 4 and page.images[0] == f"../posters/{video_id('hostile')[:2]}/{video_id('hostile')}.jpg"

    local = tmp_path / "pages"
    gallery = build_gallery(uri, storage_options=s3_bucket.storage_options, local=local, page_size=4, expires=600)
    assert gallery.local_index == str(local / "index.html") and gallery.expires is not None
    page = Cards((local / "page-000001.html").read_text())
    assert page.images[0].startswith(s3_bucket.endpoint_url)
    with urllib.request.urlopen(page.images[0], timeout=10) as response:  # presigned: no credentials needed
        assert response.headers["Content-Type"] == "image/jpeg" and response.read(2) == b"\xff\xd8"
    with urllib.request.urlopen(page.cards[0]["data"]["data-video"], timeout=10) as response:
        assert response.read(8)[4:] == b"ftyp"
    assert f"img-src 'self' {s3_bucket.endpoint_url};" in html.unescape((local / "index.html").read_text())


# ----------------------------------------------------------------------------- a real browser


def shows(image: Image.Image, colour, pixels: int = 400) -> bool:
    """Whether at least `pixels` pixels of a screenshot have this colour (a poster at card size has thousands)."""
    near = np.abs(np.asarray(image.convert("RGB")).astype(int) - colour).max(axis=-1) <= 12
    return int(near.sum()) >= pixels


def card_states(page: Browser) -> list[list[str]]:
    return page.evaluate("Array.from(document.querySelectorAll('article.card'), (c) => [c.id, c.className])")


def test_gallery_in_headless_chromium(tmp_path, s3_bucket, browser):
    """Every card is there, every poster shows (local file:// links, and presigned links to S3 on
    loopback), a missing poster leaves a placeholder, pointing at a thumbnail plays the faststart mp4."""
    _, root = make_output(str(tmp_path / "out"))
    os.remove(poster_path(root, video_id("late")))  # as an output rendered before posters existed
    build_gallery(str(tmp_path / "out"), page_size=len(ROWS))
    uri = f"{s3_bucket.uri}/out"
    make_output(uri, s3_bucket.storage_options)
    remote = build_gallery(uri, storage_options=s3_bucket.storage_options, local=tmp_path / "pages",
                           page_size=len(ROWS), expires=600)
    posters = [(row_id, colour) for row_id, _, colour, *_ in ROWS if colour is not None]

    browser.open(Path(gallery_dir(root), "page-000001.html").as_uri())
    cards = card_states(browser)
    assert [c[0] for c in cards] == [f"row-{i}" for i in range(len(ROWS))], "a card per row"
    assert [c[0] for c in cards if "no-poster" in c[1]] == [f"row-{len(ROWS) - 1}"], "a placeholder where none"
    assert browser.evaluate("document.querySelector('#row-0 .prompt').textContent") == HOSTILE_PROMPT
    assert browser.evaluate("document.scripts.length") == 1
    shot = tmp_path / "local.png"
    shot.write_bytes(browser.screenshot())
    image = Image.open(shot)
    assert image.size == (1280, 1400) and len(image.convert("RGB").getcolors(1 << 16) or ()) > 50, "not blank"
    for row_id, colour in posters[:-1]:
        assert shows(image, colour), f"the poster of {row_id}"
    assert not shows(image, posters[-1][1], pixels=1), "the removed poster is not shown"

    browser.point_at("#row-0 .thumb")
    played = browser.evaluate("""new Promise((resolve) => {
        const deadline = Date.now() + 10000;
        const check = () => {
            const video = document.querySelector("#row-0 .thumb video");
            if (video && video.readyState >= 2) resolve([video.videoWidth, video.videoHeight, video.duration]);
            else if (Date.now() > deadline) resolve(video ? `readyState ${video.readyState}` : "no video");
            else setTimeout(check, 50);
        };
        check();
    })""")
    assert played == [SIZE, SIZE, FRAMES / FPS], "the card's mp4 plays in place"

    browser.open(Path(remote.local_index).with_name("page-000001.html").as_uri())
    assert len(card_states(browser)) == len(ROWS)
    shot = tmp_path / "s3.png"
    shot.write_bytes(browser.screenshot())
    for row_id, colour in posters:  # presigned links from a file:// page to S3 on loopback
        assert shows(Image.open(shot), colour), f"the presigned poster of {row_id}"
