"""The `svd-fast` command line. Each subcommand lives in svd_fast/commands/<name>.py and provides
``add_parser(subparsers)``, which registers its arguments and sets ``func`` (args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order --help lists them.
COMMANDS = ("demo", "generate", "make_tiny", "train", "curate")

EPILOG = """examples:
  svd-fast demo --out demo_out                      # the whole system on the embedded tiny model
  svd-fast make-tiny models/tiny-svd                # a tiny architecture-true SVD pipeline folder
  svd-fast generate --model models/tiny-svd --image cat.png --out cat.mp4
  svd-fast train --config configs/train_tiny.yaml
  svd-fast curate --input videos/ --out manifest.parquet
run `svd-fast COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svd-fast",
        description="svd_fast: fast generation, training and data curation for Stable Video Diffusion.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"svd_fast.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
