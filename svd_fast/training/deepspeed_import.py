"""DeepSpeed, imported with its log on stderr: its logger writes to stdout (and warns while choosing an
accelerator at import), but stdout belongs to the commands' JSON output."""

from __future__ import annotations

import contextlib
import logging
import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: PLC0415 - heavy, and its import logs: imported here, on first need
        from deepspeed.utils import logger  # noqa: PLC0415 - DeepSpeed loads only when this runs

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
    return deepspeed
