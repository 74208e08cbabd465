"""User errors of the `svd-fast` commands: one line on stderr and exit code 2, before any heavy work.

A command raises :class:`UsageError` (what is wrong, and what to do) for any problem with its arguments,
config, paths or inputs; :func:`svd_fast.cli.main` prints ``svd-fast <command>: error: <what> (<what to do>)``
once (rank 0 under a launcher) and exits 2. The checks below are shared by several commands.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from svd_fast import _io, checks

EXIT_USAGE = 2
EXIT_PARTIAL = 1  # a batch job finished, but some items failed (each recorded with its error)


class UsageError(Exception):
    """A user error: ``what`` is wrong, ``todo`` says what to do about it."""

    def __init__(self, what: str, todo: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo

    def line(self, command: str) -> str:
        suffix = f" ({self.todo})" if self.todo else ""
        return f"svd-fast {command}: error: {self.what}{suffix}"


def require_positive(name: str, value: float | None, *, allow_none: bool = True, integer: bool = False) -> None:
    """``value`` is a finite number > 0 (None passes when ``allow_none``)."""
    if value is None:
        if allow_none:
            return
        raise UsageError(f"{name} is required", f"pass {name} N with N > 0")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UsageError(f"{name} must be a {'whole ' if integer else ''}number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be > 0, got {value!r}", f"pass {name} N with N > 0")


def require_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")


def require_in_range(name: str, value: float | None, low: float, high: float) -> None:
    """``low <= value <= high`` (None passes)."""
    if value is None:
        return
    require_finite(name, value)
    if not low <= value <= high:
        raise UsageError(f"{name} must be in [{low}, {high}], got {value!r}")


def require_readable_file(name: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{name} {path} does not exist", "check the path")
    if not path.is_file():
        raise UsageError(f"{name} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{name} {path} is not readable", "check its permissions")
    return path


def require_writable_dir(name: str, folder: str | os.PathLike) -> Path:
    """``folder`` exists or can be created, and a file can be written in it (checked by writing one)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".svd-fast-write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"{name} {folder} is not writable ({error.strerror or error})", "choose another folder or fix its permissions") from None
    return folder


def require_output_folder(name: str, folder: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike] = (),
                          *, replaced: bool = False) -> Path:
    """``folder`` may hold a ``kind`` output (svd_fast._io.check_output_folder) and is writable."""
    try:
        _io.check_output_folder(folder, kind, inputs, name=name, replaced=replaced)
    except _io.OutputPathError as error:
        what, _, todo = str(error).rpartition(" (")
        raise UsageError(what, todo.rstrip(")")) from None
    return require_writable_dir(name, folder)


def require(name: str, value: object, option: str | None = None) -> object:
    """``value`` under svd_fast.checks.RULES[name], spelled as the option ``option`` (default ``--name``)."""
    try:
        return checks.check(name, value, spelled=option or f"--{name.replace('_', '-')}")
    except checks.CheckError as error:
        raise UsageError(str(error)) from None


def require_device(value: str | None, option: str = "--device") -> str:
    try:
        return checks.parse_device(value, spelled=option)
    except checks.CheckError as error:
        raise UsageError(str(error)) from None
