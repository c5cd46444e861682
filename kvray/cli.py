"""`kvray` command line: generate | render | submit | plan | bench | train | parity | layout | convert."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import bench, convert, gallery, generate, layout, migrate, parity, plan, render, results, submit, train

# In the order of `kvray --help`.
COMMANDS = (generate, render, results, migrate, submit, bench, plan, gallery, train, parity, layout, convert)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvray")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description="Kandinsky Video 1.1 on Ray")
    parser.add_argument("--version", action="version", version=f"kvray {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; Ray's and its workers' logs and Ray Data's progress bars too")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers imports torchao when it is installed; its warnings (no Triton, deprecated pytree
    # registrations) concern kernels and APIs kvray never uses.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
