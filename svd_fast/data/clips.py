"""Clip indexing: which frames of which file make a training clip, and where the files come from
(a folder, a list of paths, or manifest rows such as those `svd-fast curate` writes)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svd_fast.data.decode import VIDEO_SUFFIXES


def clip_frame_indices(
    num_frames_in_video: int,
    video_fps: float,
    num_frames: int,
    stride: int | None = None,
    target_fps: float | None = None,
    start: int = 0,
    end: int | None = None,
) -> list[list[int]]:
    """Frame indices of every complete, non-overlapping clip of ``num_frames`` frames in [start, end).

    The step between frames is ``stride`` (default 1), or ``video_fps / target_fps`` rounded per frame
    (frame k of a clip is ``first + round(k * step)``) to resample to ``target_fps``. A clip spans
    ``num_frames * step`` source frames and the next clip starts right after it.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride is not None and target_fps is not None:
        raise ValueError("give either stride or target_fps, not both")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    end = num_frames_in_video if end is None else min(end, num_frames_in_video)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    step = frame_step(video_fps, stride, target_fps)
    clips: list[list[int]] = []
    first = float(start)
    while (indices := window(first, num_frames, step))[-1] < end:
        clips.append(indices)
        first += num_frames * step
    return clips


def frame_step(video_fps: float, stride: int | None, target_fps: float | None) -> float:
    return float(stride or 1) if target_fps is None else video_fps / target_fps


def window(first: float, num_frames: int, step: float) -> list[int]:
    return [int(round(first + k * step)) for k in range(num_frames)]



@dataclass(frozen=True)
class ClipSource:
    """One entry of a dataset: a file, an optional frame range, and columns passed through to samples."""

    path: str
    start_frame: int = 0
    end_frame: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()


def sources_from(sources: str | Path | Sequence[Any]) -> list[ClipSource]:
    if isinstance(sources, (str, Path)):
        location = Path(sources)
        if location.is_dir():
            return [ClipSource(str(p)) for p in sorted(location.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES]
        if location.suffix == ".parquet":
            import pandas as pd  # noqa: PLC0415 - pandas loads only for manifests

            return sources_from(pd.read_parquet(location).to_dict("records"))
        if location.suffix == ".jsonl":
            return sources_from([json.loads(line) for line in location.read_text().splitlines() if line.strip()])
        return [ClipSource(str(location))]
    entries = []
    for item in sources:
        if isinstance(item, (str, Path)):
            entries.append(ClipSource(str(item)))
            continue
        record = dict(item)
        # A curation manifest (svd-fast curate) marks rejected clips keep=False and failed files with error.
        keep, error = record.pop("keep", True), record.pop("error", None)
        if (keep is not None and not _is_missing(keep) and not bool(keep)) or (isinstance(error, str) and error):
            continue
        path = record.pop("file", None) or record.pop("path", None) or record.pop("source", None)
        if path is None:
            raise ValueError(f"sources: manifest row {item!r} has no 'file' (or 'path'/'source') column")
        start = record.pop("start_frame", 0)
        end = record.pop("end_frame", None)
        end = None if end is None or (isinstance(end, float) and math.isnan(end)) else int(end)
        extra = tuple(sorted((key, value) for key, value in record.items() if _is_scalar(value)))
        entries.append(ClipSource(str(path), int(start or 0), end, extra))
    return entries


def _is_missing(value: Any) -> bool:
    """None, NaN or pandas.NA: a manifest cell with no value (checked by type name so pandas stays optional)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, np.integer, np.floating)) and not (
        isinstance(value, float) and math.isnan(value)
    )


