"""Entry point for launchers, e.g. 8 processes:
``deepspeed --num_gpus 8 --module svd_fast.train --config C.yaml`` (DeepSpeed's ``--deepspeed_config ds.json`` works)
``torchrun --nproc_per_node 8 -m svd_fast.train --config C.yaml``
and one process: ``python -m svd_fast.train --config C.yaml``."""

from __future__ import annotations

import argparse
import os
import sys

from svd_fast.cli import OneLineErrorParser
from svd_fast.commands.errors import EXIT_USAGE, UsageError
from svd_fast.commands.train import EXAMPLES, add_deepspeed_arguments, run


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m svd_fast.train", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or JSON training config (see configs/)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=JSON", help="override a config key (repeatable)")
    add_deepspeed_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # Launchers that pass only --local_rank (torch.distributed.launch style) leave LOCAL_RANK unset.
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        return run(args)
    except UsageError as error:
        if os.environ.get("RANK", "0") in ("0", ""):  # once per job, not once per process
            print(error.line("train"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
