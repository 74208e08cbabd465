"""`svd-fast make-tiny DIR`: write the tiny, architecture-true SVD pipeline (diffusers format, safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from svd_fast.diffusers.tiny import save_tiny_pipeline  # noqa: PLC0415

    if args.dir.exists() and any(args.dir.iterdir()):
        print(f"svd-fast make-tiny: error: {args.dir} exists and is not empty")
        return 2
    path = save_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote tiny SVD pipeline to {path}")
    return 0
