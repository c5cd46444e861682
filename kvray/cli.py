"""`kvray` command line: parity | layout | convert."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

log = logging.getLogger("kvray")


def _cmd_parity(args) -> int:
    from .parity import Unhandled, check_directory

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


def _cmd_layout(args) -> int:
    from .config import get_preset
    from .weights.layout import check_layouts

    results = check_layouts(get_preset(args.preset), args.manifest_dir)
    for r in results:
        status = "ok" if r.ok else "MISMATCH"
        print(f"{r.network:<20} {r.manifest:<32} {r.parameters:>15,} params (manifest {r.expected_parameters:,}) {status}")
        if r.problem:
            print(f"  {r.problem}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    return 0 if all(r.ok for r in results) else 1


def _cmd_convert(args) -> int:
    from .config import get_preset
    from .weights.convert import convert
    from .weights.source import WeightsSource

    written = convert(
        WeightsSource(args.src, cache_dir=args.cache_dir),
        args.dst,
        get_preset(args.preset),
        t5_source=WeightsSource(args.t5, cache_dir=args.cache_dir) if args.t5 else None,
        networks=args.network or None,
    )
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description="Kandinsky Video 1.1 on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("parity", help="replay the official networks' golden calls and compare")
    p.add_argument("golden_dir")
    p.set_defaults(run=_cmd_parity)

    p = commands.add_parser("layout", help="compare the full-size networks with the official state-dict manifests")
    p.add_argument("--check", dest="manifest_dir", required=True, metavar="MANIFEST_DIR")
    p.add_argument("--preset", default="kv11")
    p.set_defaults(run=_cmd_layout)

    p = commands.add_parser("convert", help="official checkpoints -> safetensors + architecture JSON per network")
    p.add_argument("src", help="official weights: local dir, hub repo id (ai-forever/KandinskyVideo_1_1) or fsspec URL")
    p.add_argument("dst", help="output directory (local path or fsspec URL)")
    p.add_argument("--preset", default="kv11", help="architecture of the official files (default kv11)")
    p.add_argument("--t5", help="T5 encoder checkpoint (default: none, skip the text encoder; google/flan-ul2 for the real one)")
    p.add_argument("--network", action="append", help="convert only this network (repeatable)")
    p.add_argument("--cache-dir", help="where remote files are cached")
    p.set_defaults(run=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
