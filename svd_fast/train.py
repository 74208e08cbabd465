"""Entry point for launchers: ``deepspeed --num_gpus N -m svd_fast.train --config C`` or
``torchrun --nproc_per_node N -m svd_fast.train --config C`` (one process: plain ``python -m svd_fast.train``)."""

from __future__ import annotations

import argparse
import os
import sys

from svd_fast.commands.errors import EXIT_USAGE, UsageError
from svd_fast.commands.train import EXAMPLES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svd_fast.train", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or JSON training config (see configs/)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=JSON", help="override a config key (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    try:
        return run(parser.parse_args(argv))
    except UsageError as error:
        if os.environ.get("RANK", "0") in ("0", ""):  # once per job, not once per process
            print(error.line("train"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
