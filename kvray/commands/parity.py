"""`kvray parity`: the official networks' golden calls replayed and compared."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("parity", help="replay the official networks' golden calls and compare")
    p.add_argument("golden_dir")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..network_parity import Unhandled, check_directory

    failures = 0
    try:
        for result in check_directory(args.golden_dir):
            print(result.line(), flush=True)
            failures += not result.ok
    except Unhandled as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("parity: all calls within tolerance" if not failures else f"parity: {failures} call(s) out of tolerance")
    return 1 if failures else 0
