"""`svd-fast make-tiny DIR`: write the tiny, architecture-true SVD pipeline (diffusers format, safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from svd_fast import _io
from svd_fast.commands.errors import UsageError, require, require_output_folder

EXAMPLES = """examples:
  svd-fast make-tiny models/tiny-svd
  svd-fast generate --model models/tiny-svd --image photo.png --out tiny.mp4"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny",
        help="write a tiny architecture-true SVD pipeline folder (deterministic random weights)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_output_folder("DIR", args.dir, "pipeline", replaced=True)
    if args.dir.exists() and not args.dir.is_dir():
        raise UsageError(f"{args.dir} is a file", "pass a new or empty folder")
    if args.dir.is_dir() and any(args.dir.iterdir()):
        raise UsageError(f"{args.dir} exists and is not empty", "pass a new folder, or remove this one")
    require("seed", args.seed)
    from svd_fast.diffusers.tiny import save_tiny_pipeline  # noqa: PLC0415 - diffusers loads only when a model is built

    # Written beside the target and moved into place: an interrupted run leaves no half-written pipeline.
    _io.replace_folder(args.dir, "pipeline", lambda staging: save_tiny_pipeline(staging, seed=args.seed), name="DIR")
    print(f"wrote tiny SVD pipeline to {args.dir}")
    return 0
