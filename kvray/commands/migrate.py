"""`kvray migrate`: the outputs of kvray 0.1 (flat keys) moved into the current layout."""

from __future__ import annotations

from ..options import add_storage_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("migrate", help="move the outputs of kvray 0.1 (flat keys) into the current layout")
    p.add_argument("out", help="the output prefix")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..io.layout import migrate_legacy
    from ..io.opening import open_fs
    from ..io.storage_options import parse_storage_options

    fs, root = open_fs(args.out, parse_storage_options(args.storage_option or []))
    moved = migrate_legacy(fs, root)
    print(f"moved {moved['videos']} videos, {moved['meta']} metadata files and {moved['results']} results files "
          f"into the current layout of {args.out}")
    return 0
