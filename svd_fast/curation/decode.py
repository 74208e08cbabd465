"""Video probing and frame decoding for curation, isolated here so the backend can be switched.

Uses PyAV (FFmpeg). Frames are decoded sequentially (the only exact way for long-GOP codecs) and only
the requested indices are converted to RGB, optionally scaled down so that the longer side is at most
``max_side`` pixels (FFmpeg's swscale does the scaling, far cheaper than decoding).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoReadError(RuntimeError):
    """The file cannot be read as a video: missing, empty, not a video, corrupt, or an unsupported codec."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str


def _open(path: str | Path):
    import av  # noqa: PLC0415 - heavy optional dependency

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise VideoReadError(f"zero-length file: {path}")
    try:
        container = av.open(str(path))
    except Exception as error:  # FFmpeg raises many InvalidDataError subclasses; all mean "unreadable"
        raise VideoReadError(f"cannot open {path.name}: {type(error).__name__}: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"no video stream in {path.name}")
    return container


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    # Even sizes keep swscale on its fast paths and match what encoders accept.
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def probe_video(path: str | Path) -> VideoInfo:
    """Frame rate, size, codec and the header's frame count (0 when the container does not record it;
    ``decode_all_frames`` gives the exact count). Raises VideoReadError for unreadable input."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise VideoReadError(f"no frame rate in {Path(path).name}")
        codec = stream.codec_context.name if stream.codec_context else "unknown"
        return VideoInfo(fps=fps, num_frames=int(stream.frames or 0), width=stream.width, height=stream.height, codec=codec)
    finally:
        container.close()


def decode_frames(path: str | Path, indices: Iterable[int], max_side: int | None = None) -> dict[int, np.ndarray]:
    """Decode the frames at ``indices`` as uint8 RGB (H, W, 3), scaled so the longer side is <= ``max_side``.

    Returns {index: frame}; indices past the end of a truncated file are absent from the result.
    """
    wanted = sorted({int(index) for index in indices})
    if not wanted:
        return {}
    if wanted[0] < 0:
        raise ValueError(f"decode_frames: indices must be >= 0, got {wanted[0]}")
    container = _open(path)
    frames: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = _scaled_size(stream.width, stream.height, max_side)
        wanted_set, last = set(wanted), wanted[-1]
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted_set:
                    frames[index] = frame.to_ndarray(format="rgb24", width=width, height=height)
                if index >= last:
                    break
        except Exception as error:
            if not frames:
                raise VideoReadError(f"cannot decode {Path(path).name}: {type(error).__name__}: {error}") from error
    finally:
        container.close()
    return frames


def decode_all_frames(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Every frame as uint8 (F, H, W, 3), scaled so the longer side is <= ``max_side`` (for cut detection)."""
    container = _open(path)
    frames: list[np.ndarray] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = _scaled_size(stream.width, stream.height, max_side)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
        except Exception as error:
            if not frames:
                raise VideoReadError(f"cannot decode {Path(path).name}: {type(error).__name__}: {error}") from error
    finally:
        container.close()
    if not frames:
        raise VideoReadError(f"no decodable frames in {Path(path).name}")
    return np.stack(frames)


def decode_with_motion_vectors(path: str | Path, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every frame (as ``decode_all_frames``) plus, per frame, the mean magnitude of the codec's motion vectors
    in source pixels (FFmpeg's export_mvs; NaN for frames without any, e.g. intra frames or intra-only codecs).

    The vectors come free with decoding, so they are a cheap motion pre-filter. Their reference distance
    varies with the GOP structure (B-frames), so they say "moving or not", not how fast.
    """
    container = _open(path)
    frames: list[np.ndarray] = []
    motion: list[float] = []
    try:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        width, height = _scaled_size(stream.width, stream.height, max_side)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                vectors = next((side for side in frame.side_data if "MOTION_VECTORS" in str(getattr(side, "type", ""))), None)
                if vectors is None:
                    motion.append(float("nan"))
                    continue
                table = vectors.to_ndarray()
                scale = np.maximum(table["motion_scale"], 1).astype(np.float64)
                magnitude = np.hypot(table["motion_x"] / scale, table["motion_y"] / scale)
                motion.append(float(magnitude.mean()) if magnitude.size else float("nan"))
        except Exception as error:
            if not frames:
                raise VideoReadError(f"cannot decode {Path(path).name}: {type(error).__name__}: {error}") from error
    finally:
        container.close()
    if not frames:
        raise VideoReadError(f"no decodable frames in {Path(path).name}")
    return np.stack(frames), np.asarray(motion, dtype=np.float64)
