"""`kvray convert`: official checkpoints to safetensors and an architecture JSON per network."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="official checkpoints -> safetensors + architecture JSON per network")
    p.add_argument("src", help="official weights: local dir, hub repo id (ai-forever/KandinskyVideo_1_1) or fsspec URL")
    p.add_argument("dst", help="output directory (local path or fsspec URL)")
    p.add_argument("--preset", default="kv11", help="architecture of the official files (default kv11)")
    p.add_argument("--t5", help="T5 encoder checkpoint (default: none, skip the text encoder; google/flan-ul2 for the real one)")
    p.add_argument("--network", action="append", help="convert only this network (repeatable)")
    p.add_argument("--cache-dir", help="where remote files are cached")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..config import get_preset
    from ..weights.convert import convert
    from ..weights.source import WeightsSource

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
