"""`svd-fast make-tiny DIR`: write the tiny, architecture-true SVD pipeline (diffusers format, safetensors)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from svd_fast.commands.errors import UsageError, require_writable_dir

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
    if args.dir.exists() and not args.dir.is_dir():
        raise UsageError(f"{args.dir} is a file", "pass a new or empty folder")
    if args.dir.is_dir() and any(args.dir.iterdir()):
        raise UsageError(f"{args.dir} exists and is not empty", "pass a new folder, or remove this one")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    require_writable_dir("DIR", args.dir)
    from svd_fast.diffusers.tiny import save_tiny_pipeline  # noqa: PLC0415 - diffusers loads only when a model is built

    # Written beside the target and moved into place: an interrupted run leaves no half-written pipeline.
    staging = args.dir.with_name(f".{args.dir.name}.{os.getpid()}.tmp")
    try:
        save_tiny_pipeline(staging, seed=args.seed)
        os.replace(staging, args.dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote tiny SVD pipeline to {args.dir}")
    return 0
