"""Atomic, verifiable checkpoints and safe resumes.

A checkpoint ``checkpoints/step_N`` holds DeepSpeed's files, each rank's trainer state
(``trainer_state_rank{r}.pt``) and EMA shard (``ema_rank{r}.pt``), and last ``complete.json``: every file of the
checkpoint with its size and SHA-256, the run it belongs to (svd_fast.training.run) and the config it was
trained with. Order of a save: DeepSpeed's files (without moving DeepSpeed's own ``latest``), the
per-rank files (each written to a temporary file and renamed), fsync, a barrier, then rank 0 writes
``complete.json`` and finally moves ``checkpoints/latest`` (again temporary file + rename). A kill or a full disk
at any point leaves ``latest`` on the previous complete checkpoint; a checkpoint without ``complete.json``, or whose
files are missing or have other sizes (truncated), is incomplete and never resumed from; so is one whose files have other contents (flipped bytes) than were
written. A damaged newest checkpoint makes ``latest`` fall back to the newest valid one, said in the log.

Checkpoints are trusted input, but loading them runs no pickled code: DeepSpeed's files are read with
``torch.load(weights_only=True)`` allowing exactly the classes DeepSpeed stores in them (:func:`deepspeed_globals`),
through its checkpoint engine and, for the loaders that call ``torch.load(weights_only=False)`` themselves
(universal checkpoints, ZeRO-3's optimizer state), by :func:`weights_only_loading` around the whole load. Universal
checkpoints are refused before the model loads (svd_fast.training.setup.build_deepspeed_config).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from svd_fast import _io

LOGGER = logging.getLogger(__name__)
LATEST = "latest"
COMPLETE = "complete.json"
STATE_FILE = "trainer_state_rank{rank}.pt"
EMA_FILE = "ema_rank{rank}.pt"
TAG = re.compile(r"^step_(\d+)$")


def deepspeed_globals() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its ZeRO checkpoints (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3 fp32/bf16 checkpoints; the dynamic scaler
    is fp16's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(deepspeed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` in the block is :func:`safe_load`, whatever ``weights_only`` its caller asks for:
    DeepSpeed's universal and ZeRO-3 loaders call ``torch.load(weights_only=False)`` directly."""
    real_load = torch.load

    def load(f, map_location=None, *args, **kwargs):
        with torch.serialization.safe_globals(deepspeed_globals()):
            return real_load(f, map_location=map_location, weights_only=True)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def use_safe_loading(engine) -> None:
    """Make the engine read its checkpoints with :func:`safe_load` (DeepSpeed's own engine unpickles freely)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"checkpoints: DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine


def save_torch_atomic(obj: Any, path: Path) -> None:
    _io.write_file(path, lambda temporary: torch.save(obj, temporary), fsync=True)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def read_complete(folder: Path) -> dict[str, Any]:
    """``complete.json`` of a checkpoint ({} when missing or unreadable)."""
    try:
        record = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def incomplete_reason(folder: Path) -> str | None:
    """None for a complete checkpoint whose files are as written, else why not (sizes first, then contents)."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (the save was interrupted)"
    try:
        record = json.loads(marker.read_text())
        files, digests = record["files"], record.get("sha256", {})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable {COMPLETE} ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for name, digest in digests.items():
        if _sha256(folder / name) != digest:
            return f"{name} differs from what was written (checksum mismatch: damaged on disk)"
    return None


def prune_checkpoints(root: Path, keep: int | None, keep_every: int = 0) -> list[str]:
    """Delete the checkpoints that retention does not keep: the ``keep`` newest (None: all), those whose step is a
    multiple of ``keep_every`` (0: none), and always the one ``latest`` names and any newer one (a save in
    progress). Each is first renamed to a partial (so a kill mid-delete leaves nothing that looks like a
    checkpoint) and then removed. Returns the deleted tags."""
    if keep is None:
        return []
    marker = root / LATEST
    latest = marker.read_text().strip() if marker.is_file() else None
    tagged = sorted((int(match.group(1)), path) for path in root.iterdir() if path.is_dir() and (match := TAG.match(path.name)))
    latest_step = next((step for step, path in tagged if path.name == latest), None)
    if latest_step is None:
        return []
    kept = {path.name for _, path in tagged[-keep:]} | {latest}
    deleted = []
    for step, path in tagged:
        if path.name in kept or step > latest_step or (keep_every and step % keep_every == 0):
            continue
        doomed = path.rename(root / f"{_io.PARTIAL_PREFIX}{path.name}-deleted")
        shutil.rmtree(doomed)
        deleted.append(path.name)
    if deleted:
        LOGGER.info("checkpoints: deleted %s (keep_checkpoints: %s, keep_every: %s)", ", ".join(deleted), keep, keep_every)
    return deleted


def save_checkpoint(engine, root: Path, step: int, rank_files: dict[str, Any], rank: int, record: dict[str, Any] | None = None,
                    keep: int | None = None, keep_every: int = 0) -> Path:
    """Write ``root/step_{step}`` (DeepSpeed + ``rank_files``: file name -> object for torch.save, per rank),
    mark it complete (with ``record``'s keys: the run and its config), move ``latest`` to it and then apply the
    retention of :func:`prune_checkpoints`. A collective: every rank calls it."""
    tag = f"step_{step}"
    folder = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # an interrupted save of this step, or a history this run replaces
            shutil.rmtree(folder)
        _io.remove_partials(root)  # left by a save killed while moving `latest`
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    for name, obj in rank_files.items():
        save_torch_atomic(obj, folder / name)
    torch.distributed.barrier()
    if rank == 0:
        _fsync_tree(folder)
        paths = [path for path in sorted(folder.rglob("*")) if path.is_file()]
        files = {str(path.relative_to(folder)): path.stat().st_size for path in paths}
        digests = {str(path.relative_to(folder)): _sha256(path) for path in paths}
        _io.write_json(folder / COMPLETE, {**(record or {}), "step": step, "files": files, "sha256": digests}, fsync=True)
        _io.write_bytes(root / LATEST, tag.encode(), fsync=True)
        prune_checkpoints(root, keep, keep_every)
    torch.distributed.barrier()
    return folder


def _newest_complete_checkpoint(root: Path, skip: Path | None) -> Path | None:
    """The newest complete checkpoint under ``root`` other than ``skip`` (checked newest first, stopping at the
    first valid one: verifying a checksum reads the whole file)."""
    tagged = [(int(match.group(1)), path) for path in root.iterdir() if path.is_dir() and (match := TAG.match(path.name))]
    return next((path for _, path in sorted(tagged, reverse=True) if path != skip and incomplete_reason(path) is None), None)


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start at step 0.

    ``"latest"``: the checkpoint ``latest`` names when it is complete, else the newest complete one (said in
    the log); a checkpoints folder without any complete checkpoint means every save was interrupted, so
    training starts over (also said). No checkpoints folder at all is an error: nothing was ever saved there.
    """
    if resume_from is None:
        return None
    if resume_from != LATEST:
        path = Path(resume_from)
        if not path.is_dir():
            raise ValueError(f"resume_from: {str(path)!r} is not a checkpoint folder")
        reason = incomplete_reason(path)
        if reason is not None:
            raise ValueError(f"resume_from: {str(path)!r} is not a complete checkpoint of this trainer: {reason}")
        return path
    root = output_dir / "checkpoints"
    if not root.is_dir():
        raise ValueError(f"resume_from: 'latest' but {root} does not exist (no checkpoint in output_dir)")
    marker = root / LATEST
    named = root / marker.read_text().strip() if marker.is_file() else None
    reason = incomplete_reason(named) if named is not None and named.is_dir() else None
    if named is not None and named.is_dir() and reason is None:
        return named
    newest = _newest_complete_checkpoint(root, named)
    said = f"{named.name} is incomplete ({reason})" if named is not None and named.is_dir() else f"{marker} names no checkpoint"
    if newest is None:
        LOGGER.warning("resume_from latest: %s and no complete checkpoint exists in %s; training starts at step 0", said, root)
        return None
    LOGGER.warning("resume_from latest: %s; resuming from the newest valid checkpoint, %s", said, newest.name)
    return newest


def load_checkpoint(engine, folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load DeepSpeed's state into ``engine``; return this rank's trainer state and EMA shard (or None)."""
    state_file = folder / STATE_FILE.format(rank=rank)
    if not state_file.is_file():
        raise ValueError(f"resume_from: {state_file} missing (was the checkpoint written with another number of processes?)")
    use_safe_loading(engine)
    with weights_only_loading():
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if load_path is None:
        raise ValueError(f"resume_from: DeepSpeed found no checkpoint in {folder}")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    ema_file = folder / EMA_FILE.format(rank=rank)
    ema_state = torch.load(ema_file, map_location="cpu", weights_only=True) if ema_file.is_file() else None
    return state, ema_state
