"""`kvray layout`: the full-size networks compared with the official state-dict manifests."""

from __future__ import annotations

import argparse
import resource


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("layout", help="compare the full-size networks with the official state-dict manifests")
    p.add_argument("manifest_dir", metavar="MANIFEST_DIR", nargs="?", help="folder of the official state-dict manifests")
    # kvray 0.1 spelled it `kvray layout --check DIR`: scripts written then keep working.
    p.add_argument("--check", dest="check_dir", metavar="MANIFEST_DIR", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="kv11")
    p.set_defaults(run=run, parser=p)


def run(args) -> int:
    from ..config import get_preset
    from ..weights.layout import check_layouts

    folder = args.manifest_dir or args.check_dir
    if folder is None or (args.manifest_dir and args.check_dir):
        args.parser.error("give the manifests' folder once: kvray layout MANIFEST_DIR")
    results = check_layouts(get_preset(args.preset), folder)
    for r in results:
        status = "ok" if r.ok else "MISMATCH"
        print(f"{r.network:<20} {r.manifest:<32} {r.parameters:>15,} params (manifest {r.expected_parameters:,}) {status}")
        if r.problem:
            print(f"  {r.problem}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    return 0 if all(r.ok for r in results) else 1
