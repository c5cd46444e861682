"""The gallery's HTML: escaping, one card per row, a page of cards, the index page.

Pure functions of what they are given: the strings of an output (prompts, ids, errors) are untrusted and
pass through `text` (HTML-escaped, control characters shown as `\\xNN`), URLs are made by the builder and
escaped as attributes. Every page carries a Content-Security-Policy that lets it load only its own
stylesheet and script and the output's files (`sources`): no inline script, nothing else on the network.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.dataset import SIGNALS

STYLESHEET, SCRIPT = "gallery.css", "gallery.js"
INDEX = "index.html"
RUN_FIELDS = ("run_id", "status", "reason", "error", "started_at", "finished_at")  # of run.json, where present

# C0 and C1 control characters but tab and newline, and lone surrogates (JSON may carry "\ud800").
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def text(value: Any) -> str:
    """`value` as HTML text or attribute content: escaped (& < > " '), control characters as `\\xNN`."""
    if value is None:
        return ""
    shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else "\ufffd", str(value))
    return html.escape(shown, quote=True)


def status_class(status: str) -> str:
    """A CSS class for a status: `status-` and its letters, digits and dashes."""
    return "status-" + re.sub(r"[^a-z0-9-]", "_", str(status).lower())


def page_name(number: int) -> str:
    """The file name of page `number` (1-based)."""
    return f"page-{number:06d}.html"


@dataclass(frozen=True)
class Media:
    """URLs of a row's files, ready to put into attributes; None where the row has none."""

    poster: str | None = None  # the poster JPEG
    video: str | None = None  # an mp4, played in a <video> over the poster
    animated: str | None = None  # an animated image shown in place of the poster (preview, or a gif/webp video)
    link: str | None = None  # where a click on the thumbnail goes: the video file


@dataclass(frozen=True)
class Card:
    """One row of the output as the gallery shows it."""

    row: int
    id: str
    status: str
    video_id: str = ""
    prompt: str = ""
    prompt_truncated: bool = False
    seed: int | None = None
    error: str = ""
    seconds: Mapping[str, float] = field(default_factory=dict)
    media: Media = Media()
    # From the video's metadata or the dataset index: size (width, height), frames, fps, mode, scenes,
    # quality (signal -> value), filter_reasons, model_version.
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PageSummary:
    number: int
    first_row: int
    last_row: int
    counts: Mapping[str, int]  # status -> cards on the page


@dataclass(frozen=True)
class Site:
    """What every page of one gallery shares."""

    title: str  # the output's URI
    sources: str  # CSP sources of the output's files: "'self'", or also the origin of presigned URLs
    generated: str  # UTC time, ISO format
    expires: str | None = None  # when presigned links stop working (UTC), if they are presigned


def _head(site: Site, title: str) -> str:
    policy = (f"default-src 'none'; style-src 'self'; script-src 'self'; img-src {site.sources}; "
              f"media-src {site.sources}; base-uri 'none'; form-action 'none'")
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{text(policy)}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{text(title)}</title>\n<link rel=\"stylesheet\" href=\"{STYLESHEET}\">\n"
        f"<script src=\"{SCRIPT}\"></script>\n</head>\n<body>\n"
    )


def _footer(site: Site) -> str:
    expiry = f" · links valid until {text(site.expires)} UTC" if site.expires else ""
    return f"<p class=\"note\">generated {text(site.generated)} UTC by kvray gallery{expiry}</p>\n"


def _number(value: Any) -> str:
    """Floats with three significant digits, large ones whole: 0.523, 12.5, 1,234."""
    if not isinstance(value, float):
        return text(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _thumb(card: Card) -> str:
    media = card.media
    if media.poster is None and media.animated is None:
        reason = "not rendered" if card.status == "error" else "no stills"
        return f"<div class=\"thumb empty\"><span class=\"missing\">{reason}</span></div>\n"
    size = card.details.get("size")
    dims = f" width=\"{text(size[0])}\" height=\"{text(size[1])}\"" if size else ""
    data = "".join(f" data-{name}=\"{text(url)}\"" for name, url in (("video", media.video), ("preview", media.animated))
                   if url)
    image = media.poster or media.animated
    opening = f"<a class=\"thumb\" href=\"{text(media.link)}\"" if media.link else "<div class=\"thumb\" tabindex=\"0\""
    closing = "</a>" if media.link else "</div>"
    return (f"{opening}{data}><img src=\"{text(image)}\" alt=\"poster of row {card.row}\" loading=\"lazy\" "
            f"decoding=\"async\"{dims}><span class=\"missing\">no poster</span>{closing}\n")


def _details(card: Card) -> list[tuple[str, str]]:
    d = card.details
    rows = []
    if card.seed is not None and card.seed >= 0:
        rows.append(("seed", text(card.seed)))
    if card.video_id:
        rows.append(("video id", f"<span class=\"id\" title=\"{text(card.video_id)}\">{text(card.video_id[:12])}</span>"))
    shape = []
    if d.get("size"):
        shape.append(f"{text(d['size'][0])}×{text(d['size'][1])}")
    if d.get("frames"):
        shape.append(f"{text(d['frames'])} frames")
    if d.get("fps"):
        shape.append(f"{_number(d['fps'])} fps")
    if d.get("mode"):
        shape.append(text(d["mode"]))
    if shape:
        rows.append(("clip", ", ".join(shape)))
    seconds = {stage: s for stage, s in card.seconds.items() if s}
    if seconds:
        parts = " · ".join(f"{text(stage)} {s:.2f}" for stage, s in seconds.items())
        rows.append(("seconds", f"{parts} · total {sum(seconds.values()):.2f}"))
    quality = {name: value for name, value in (d.get("quality") or {}).items() if value is not None}
    if quality:
        rows.append(("quality", ", ".join(
            f"<span title=\"{text(SIGNALS[name].unit) if name in SIGNALS else ''}\">{text(name)} {_number(value)}</span>"
            for name, value in quality.items())))
    if d.get("filter_reasons"):
        rows.append(("filtered", "<span class=\"bad\">" + text("; ".join(map(str, d["filter_reasons"]))) + "</span>"))
    if d.get("model_version"):
        rows.append(("model", text(d["model_version"])))
    return rows


def card_html(card: Card) -> str:
    """One `<article class="card status-...">` for a row."""
    status = text(card.status)
    truncated = " <span class=\"bad\" title=\"the text encoder saw only its first tokens\">truncated</span>" \
        if card.prompt_truncated else ""
    line = (f"<p class=\"line\"><span class=\"status\">{status}</span><span class=\"id\" title=\"id\">{text(card.id)}"
            f"</span><span class=\"note\">row {card.row}</span>{truncated}</p>\n")
    out = [f"<article class=\"card {status_class(card.status)}\" id=\"row-{card.row}\">\n", _thumb(card),
           "<div class=\"body\">\n", line]
    scenes = card.details.get("scenes") or []
    if len(scenes) > 1:
        out.append("<ol class=\"scenes\">" + "".join(f"<li dir=\"auto\">{text(s)}</li>" for s in scenes) + "</ol>\n")
    elif card.prompt:
        out.append(f"<p class=\"prompt\" dir=\"auto\">{text(card.prompt)}</p>\n")
    if card.error:
        out.append(f"<pre class=\"error\">{text(card.error)}</pre>\n")
    details = _details(card)
    if details:
        out.append("<dl>" + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in details) + "</dl>\n")
    out.append("</div>\n</article>\n")
    return "".join(out)


def _nav(number: int, pages: int) -> str:
    links = [f"<a href=\"{INDEX}\">index</a>"]
    links.append(f"<a href=\"{page_name(number - 1)}\" rel=\"prev\">« previous</a>" if number > 1 else "<span>« previous</span>")
    links.append(f"<span>page {number} of {pages}</span>")
    links.append(f"<a href=\"{page_name(number + 1)}\" rel=\"next\">next »</a>" if number < pages else "<span>next »</span>")
    return "<nav>" + "".join(links) + "</nav>"


def page_html(site: Site, cards: Sequence[Card], number: int, pages: int, *, scope: str) -> str:
    """Page `number` of `pages`: its cards between two navigation bars. `scope`: which rows the gallery
    shows (e.g. "all rows", "status error")."""
    title = f"{site.title}: page {number} of {pages}"
    first, last = (cards[0].row, cards[-1].row) if cards else (0, 0)
    header = (f"<header><h1><a href=\"{INDEX}\">{text(site.title)}</a></h1>{_nav(number, pages)}"
              f"<p class=\"note\">{len(cards)} cards, rows {first}–{last}, {text(scope)}</p></header>\n")
    return "".join([
        _head(site, title), header,
        "<main class=\"cards\">\n", *(card_html(card) for card in cards), "</main>\n",
        f"<footer>{_nav(number, pages)}</footer>\n", _footer(site), "</body>\n</html>\n",
    ])


def index_html(site: Site, *, counts: Mapping[str, int], scope: str, pages: Sequence[PageSummary],
               written: int, errors: Sequence[tuple[Card, int]] = (), run: Mapping[str, Any] | None = None,
               first_cards: Sequence[Card] = ()) -> str:
    """The index: counts per status of every row, the latest run, the first error rows (card, page) with
    their reasons, the cards of the first page (so the gallery opens on pictures), and a link per page
    with its rows and counts (`written`: pages that exist; the rest are listed without links)."""
    total = sum(counts.values())
    out = [_head(site, f"{site.title}: gallery"), f"<header><h1>{text(site.title)}</h1></header>\n",
           "<table class=\"counts\"><tr><th>status</th><th>rows</th></tr>",
           *(f"<tr class=\"{status_class(s)}\"><td class=\"status\">{text(s)}</td><td>{n:,}</td></tr>"
             for s, n in sorted(counts.items())),
           f"<tr><td>all</td><td>{total:,}</td></tr></table>\n"]
    if run:
        shown = ", ".join(f"{text(k)} {text(run[k])}" for k in RUN_FIELDS if run.get(k))
        out.append(f"<p>latest run: {shown}</p>\n")
    if errors:
        out.append("<h2>first error rows</h2>\n<ul>"
                   + "".join(f"<li><a href=\"{page_name(page)}#row-{card.row}\">row {card.row}</a> "
                             f"<span class=\"id\">{text(card.id)}</span>: <span class=\"bad\">{text(card.error)}</span></li>"
                             for card, page in errors) + "</ul>\n")
    if first_cards:
        more = f" (<a href=\"{page_name(1)}\">page 1</a>)" if len(pages) > 1 else ""
        out += [f"<h2>first rows{more}</h2>\n<main class=\"cards\">\n", *(card_html(c) for c in first_cards), "</main>\n"]
    out.append(f"<h2>pages</h2>\n<p class=\"note\">{sum(sum(p.counts.values()) for p in pages):,} cards, {text(scope)}, "
               f"{len(pages):,} pages" + (f", the first {written:,} written" if written < len(pages) else "") + "</p>\n")
    out.append("<ol class=\"pages\">")
    for page in pages:
        label = f"rows {page.first_row}–{page.last_row}"
        link = f"<a href=\"{page_name(page.number)}\">{label}</a>" if page.number <= written else label
        tally = ", ".join(f"<span class=\"{status_class(s)}\">{text(s)} {n}</span>" for s, n in sorted(page.counts.items()))
        out.append(f"<li>{link}: {tally}</li>")
    out.append("</ol>\n")
    out += [_footer(site), "</body>\n</html>\n"]
    return "".join(out)
