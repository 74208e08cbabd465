"""The `svd-fast` command line. Each subcommand lives in svd_fast/commands/<name>.py and provides
``add_parser(subparsers)``, which registers its arguments and sets ``func`` (args -> exit code).

User errors (bad arguments, config, paths; :class:`svd_fast.commands.errors.UsageError`, argparse's own
errors) print one line, ``svd-fast <command>: error: <what> (<what to do>)``, and exit 2; tracebacks are
shown only with ``--debug`` or ``SVD_FAST_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import NoReturn

from svd_fast import __version__
from svd_fast.commands.errors import EXIT_USAGE, UsageError

# Subcommand modules, in the order --help lists them.
COMMANDS = ("demo", "generate", "make_tiny", "train", "distill", "encode", "curate", "env")

EPILOG = """examples:
  svd-fast demo --out demo_out                      # the whole system on the embedded tiny model
  svd-fast make-tiny models/tiny-svd                # a tiny architecture-true SVD pipeline folder
  svd-fast generate --model models/tiny-svd --image cat.png --out cat.mp4
  svd-fast train --config configs/train_tiny_cpu.yaml
  svd-fast distill --config configs/distill_tiny_cpu.yaml   # a 4-step consistency student of a pipeline
  svd-fast curate --input videos/ --out manifest.parquet
  svd-fast env                                      # versions, CUDA, which kernel backends can run and why not
run `svd-fast COMMAND --help` for each command's options; add --debug (or SVD_FAST_DEBUG=1) for tracebacks."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's errors as svd-fast's one line: ``svd-fast <command>: error: <what> (see --help)``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="svd-fast",
        description="svd_fast: fast generation, training and data curation for Stable Video Diffusion.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"svd-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMANDS:
        importlib.import_module(f"svd_fast.commands.{name}").add_parser(subparsers)
    return parser


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("0", "")


def _command_name(argv: list[str]) -> str:
    for item in argv:
        if item.replace("-", "_") in COMMANDS:
            return item
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, so a failing command can be rerun by appending it.
    debug = "--debug" in argv or os.environ.get("SVD_FAST_DEBUG", "") == "1"
    argv = [item for item in argv if item != "--debug"]
    command = _command_name(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            traceback.print_exc()
        if _is_rank_zero():
            print(error.line(command or "").replace("svd-fast : ", "svd-fast: "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"svd-fast {command}: interrupted".replace("svd-fast : ", "svd-fast: "), file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - not a user error: one line, the traceback on request
        if debug:
            raise
        if _is_rank_zero():
            line = f"svd-fast {command}: error: {type(error).__name__}: {error} (rerun with --debug for the traceback)"
            print(line.replace("svd-fast : ", "svd-fast: "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
