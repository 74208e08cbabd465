"""Every file and folder svd-fast writes goes through here: atomic, with the modes the umask asks for, and
never over something the user made.

* :func:`write_file` / :func:`write_bytes` / :func:`write_json`: a temporary file in the destination folder
  (named :data:`PARTIAL_PREFIX`...), filled, optionally fsynced, given the umask's mode (``mkstemp`` creates
  0600, which ``os.replace`` would keep) and moved over the target with ``os.replace``.
* :func:`replace_folder`: a folder output filled in a temporary folder and swapped in; the previous folder is
  moved aside only when :func:`check_output_folder` accepts it as an earlier output of the same kind.
* :func:`claim_folder`: a folder that a command fills in place (batch outputs, latents, a training run): new,
  empty or marked as the same kind's output, and marked on first use.
* :func:`lock`: one process at a time per output (an OS lock, released when the process dies).

Every folder svd-fast creates holds :data:`MARKER` (JSON ``{"kind": ...}``). A folder is never replaced or
claimed when it is the current folder or one of its parents, the folder of an input or a folder holding an
input, or a non-empty folder without the marker of the same kind (a frames folder of an older version, only
``frame_NNNN.png`` files, is accepted as one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PARTIAL_PREFIX = ".svd-fast-partial-"
MARKER = ".svd-fast-output.json"
LOCK_PREFIX = ".svd-fast-lock"  # lock files: the ranks of one run take theirs while rank 0 claims the folder
LEGACY_FRAME = re.compile(r"^frame_\d{4}\.png$")
# Outputs of versions before the marker, recognised by what only svd-fast writes there.
LEGACY_OUTPUTS: dict[str, Callable[[list[Path]], bool]] = {
    "frames": lambda entries: all(entry.is_file() and LEGACY_FRAME.match(entry.name) for entry in entries),
    "validation": lambda entries: all(entry.is_file() and re.match(r"^image_\d+\.mp4$", entry.name) for entry in entries),
    "pipeline": lambda entries: any(entry.name == "model_index.json" for entry in entries),
    "lora": lambda entries: any(entry.name == "pytorch_lora_weights.safetensors" for entry in entries),
    "train": lambda entries: any(entry.name == "train_config.json" for entry in entries),
    "latents": lambda entries: {"settings.json", "clips"} <= {entry.name for entry in entries},
    "videos": lambda entries: any(entry.name == "index.parquet" for entry in entries),
}


class OutputPathError(ValueError):
    """An output path that svd-fast must not write (it names what and why)."""


class OutputBusyError(RuntimeError):
    """Another process holds the output's lock."""


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask's set-and-restore races
    with threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def _give_default_mode(path: str | os.PathLike, folder: bool) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that pick a format by extension work); moved
    over ``path`` when the block ends without an exception, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f"{PARTIAL_PREFIX}{path.stem}-", suffix=path.suffix)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        if fsync:
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
        _give_default_mode(temporary, folder=False)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_file(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """``write(temporary path)``, then the temporary file replaces ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as temporary:
        write(temporary)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    return write_file(path, lambda temporary: temporary.write_bytes(data), fsync=fsync)


def write_json(path: str | os.PathLike, value: Any, fsync: bool = False) -> Path:
    return write_bytes(path, (json.dumps(value, indent=2, default=str) + "\n").encode(), fsync=fsync)


def _marked_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike] = (), *, name: str = "--out",
                        replaced: bool = True) -> Path:
    """``path`` as a folder output of ``kind`` that svd-fast may write (``replaced``: swap in whole; else fill
    in place); OutputPathError saying why not (see the module docstring)."""
    raw = os.fspath(path)
    if raw in ("", ".", "..") or Path(raw).name in ("", ".", ".."):
        raise OutputPathError(f"{name} {raw!r} is not a new folder name (pass a folder such as out/frames)")
    target = Path(raw).absolute()
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputPathError(f"{name} {raw} is the current folder or one of its parents (pass a new folder)")
    for item in inputs:
        source = Path(item).resolve()
        source_folder = source if source.is_dir() else source.parent
        if resolved == source_folder or (replaced and resolved in source.parents):
            raise OutputPathError(f"{name} {raw} holds the input {item} (pass another folder)")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{name} {raw} is a file, not a folder (pass a folder name)")
    if target.is_dir():
        entries = [entry for entry in target.iterdir() if not entry.name.startswith(LOCK_PREFIX)]
        if entries and _marked_kind(target) != kind and not LEGACY_OUTPUTS.get(kind, lambda _: False)(entries):
            raise OutputPathError(
                f"{name} {raw} exists and was not written by svd-fast as {kind} output "
                f"(it holds {entries[0].name}{' and more' if len(entries) > 1 else ''}; pass a new folder, or remove this one)"
            )
    return target


def _mark(folder: Path, kind: str) -> None:
    write_json(folder / MARKER, {"kind": kind})


def claim_folder(path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike] = (), *, name: str = "--out") -> Path:
    """Create or reopen a folder that a command fills in place, after :func:`check_output_folder`; marks it."""
    target = check_output_folder(path, kind, inputs, name=name, replaced=False)
    target.mkdir(parents=True, exist_ok=True)
    if _marked_kind(target) != kind:
        _mark(target, kind)
    return target


def replace_folder(path: str | os.PathLike, kind: str, write: Callable[[Path], object], inputs: Iterable[str | os.PathLike] = (),
                   *, name: str = "--out") -> Path:
    """``write(staging folder)`` (an existing, empty folder beside ``path``), mark it, then swap it in for
    ``path``; a previous folder is removed only after the new one is in place, and only if
    :func:`check_output_folder` accepts it (checked before ``write`` runs)."""
    target = check_output_folder(path, kind, inputs, name=name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{PARTIAL_PREFIX}{target.name}-"))
    try:
        _give_default_mode(staging, folder=True)
        write(staging)
        _mark(staging, kind)
        if target.exists():
            check_output_folder(path, kind, inputs, name=name)  # still ours after the (possibly long) write
            # A folder cannot replace a non-empty one in a single rename: move the old one aside first.
            previous = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{PARTIAL_PREFIX}{target.name}-previous-"))
            os.replace(target, previous / target.name)
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def remove_partials(folder: str | os.PathLike) -> int:
    """Delete the temporary files and folders a killed run left in ``folder``; returns how many."""
    removed = 0
    for leftover in Path(folder).glob(f"{PARTIAL_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def lock(lock_path: str | os.PathLike, what: str, target: str | os.PathLike,
         busy: type[OutputBusyError] = OutputBusyError) -> Iterator[None]:
    """Hold ``lock_path`` for one run; ``busy("another <what> (pid N) is writing <target>")`` when another
    process holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(f"another {what} (pid {handle.read().strip() or '?'}) is writing {target}") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
