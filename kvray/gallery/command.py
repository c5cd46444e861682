"""`kvray gallery OUT`: the command line of the gallery."""

from __future__ import annotations

import sys
import webbrowser
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from ..io.opening import open_fs
from ..io.storage_options import parse_storage_options
from .build import (
    DEFAULT_EXPIRES,
    DEFAULT_PAGE_SIZE,
    MAX_EXPIRES,
    GalleryError,
    NothingToShow,
    build_gallery,
)


def add_gallery_parser(subparsers):
    """Registers `kvray gallery` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "gallery", help="static HTML pages of an output prefix: a card per row with its poster, video, prompt, "
                        "status, timings and quality signals",
        description="Writes OUT/gallery/index.html (counts per status, the latest run, the first error rows, a "
                    "link per page) and pages of cards in manifest order, with links relative to the pages. "
                    "--local DIR writes the pages to a local folder instead, linking to the output's files "
                    "(presigned https URLs for object storage), so that a browser opens them without credentials.")
    p.add_argument("out", help="the render's output prefix (local path, s3://bucket/prefix, ...)")
    p.add_argument("--local", metavar="DIR", help="write the pages to this local folder instead of OUT/gallery/")
    p.add_argument("--open", action="store_true", help="open the index page in a web browser")
    p.add_argument("--status", action="append", help="only rows with this status (repeatable): ok, error, skipped, "
                   "filtered")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE,
                   help=f"cards per page (default {DEFAULT_PAGE_SIZE})")
    p.add_argument("--max-pages", type=int, help="write only the first N pages (default all; the index lists all)")
    p.add_argument("--expires", type=int, default=DEFAULT_EXPIRES,
                   help=f"seconds presigned links stay valid, at most {MAX_EXPIRES} (default: 7 days)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")
    p.set_defaults(run=run_gallery_command)
    return p


def run_gallery_command(args) -> int:
    options = parse_storage_options(args.storage_option or [])
    if args.open and args.local is None and not _is_local(args.out, options):
        print(f"error: --open needs --local DIR for {args.out}: a browser cannot read object storage itself, "
              "the local pages link to its files with presigned URLs", file=sys.stderr)
        return 2
    with tqdm(unit="page", desc="gallery", disable=None, file=sys.stderr) as bar:  # a bar on a terminal only
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            gallery = build_gallery(args.out, storage_options=options, local=args.local, statuses=args.status or (),
                                    page_size=args.page_size, max_pages=args.max_pages, expires=args.expires,
                                    progress=progress)
        except GalleryError as err:
            bar.close()
            print(f"error: {err}", file=sys.stderr)
            return 1 if isinstance(err, NothingToShow) else 2
        except OSError as err:
            bar.close()
            print(f"error: storage failed: {err}", file=sys.stderr)
            return 2
    counts = ", ".join(f"{status} {n}" for status, n in sorted(gallery.counts.items()))
    shown = f"{gallery.pages} page{'s' if gallery.pages > 1 else ''}"
    if gallery.written < gallery.pages:
        shown = f"the first {gallery.written} of {shown}"
    print(f"gallery of {args.out} ({counts}): {gallery.cards} cards on {shown} -> {gallery.index}")
    if gallery.expires is not None:
        print(f"presigned links valid until {gallery.expires:%Y-%m-%d %H:%M} UTC")
    if args.open:
        webbrowser.open(Path(gallery.local_index).as_uri())
    return 0


def _is_local(out: str, options) -> bool:
    return isinstance(open_fs(out, options)[0], LocalFileSystem)
