"""A line every few seconds while a long stage runs, so that no stage is silent for longer than that (sampling a
large size, a VAE decode of many frames, loading a model): a stage that reports its own progress (tqdm) may
still spend minutes inside one step."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

INTERVAL_SECONDS = 10.0


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def heartbeat(stage: str, interval: float = INTERVAL_SECONDS, write: Callable[[str], None] = _to_stderr) -> Iterator[None]:
    """While the block runs, ``write("<stage>: still running after N s")`` every ``interval`` seconds."""
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(interval):
            write(f"{stage}: still running after {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=beat, name=f"heartbeat {stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
