"""Probing and decoding video files (PyAV / FFmpeg, DALI's CPU decoder).

Decoders:
* DALI on the GPU (NVDEC, ``device="mixed"``) decodes H.264/HEVC/VP8/VP9/AV1/MPEG-4/MJPEG:
  :func:`iter_windows_gpu` returns a window's frames as a uint8 CUDA tensor (the clip dataset with
  ``decode_device="cuda"``, training's ``video_decoder: dali`` on CUDA), and :func:`dali_clip_loader` yields
  (B, F, C, H, W) CUDA batches with resize, crop and normalisation done by DALI.
* DALI on the CPU decodes VP8, VP9 and MJPEG only; PyAV (FFmpeg) decodes everything else on the CPU.
  ``backend="auto"`` picks DALI's CPU decoder for those codecs and PyAV for the rest.
  The two agree on luma; on colour edges they differ by a few levels because DALI interpolates the
  4:2:0 chroma planes while FFmpeg's swscale replicates them.
* ``max_side`` (PyAV only) scales frames down in swscale's RGB conversion, for analysis that needs
  small frames (curation: cut detection, optical flow, OCR); :func:`decode_all_frames` reads a whole
  file that way, optionally with the codec's motion vectors.
* :func:`iter_windows` reads a file once for many windows of frame indices (the clip dataset);
  :func:`decode_frames_at_times` seeks to each wanted timestamp (curation's key frames).

Unreadable, truncated, empty, still-image or non-video files raise :class:`VideoDecodeError` with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DECODE_BACKENDS = ("auto", "dali", "pyav")
# FFmpeg demuxers for still images: such a file "decodes" to one frame but is not a video.
STILL_IMAGE_FORMATS = frozenset({"image2", "image2pipe"})


class VideoDecodeError(ValueError):
    """A video file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    duration: float


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate, size and codec of the first video stream of ``path``."""
    import av  # noqa: PLC0415 - optional dependency

    path = Path(path)
    check_file(path)
    try:
        with av.open(str(path)) as container:
            _reject_still_image(path, container)
            stream = _video_stream(path, container)
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            # Containers such as WebM store no frame count: count the stream's packets instead.
            num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"unreadable by FFmpeg ({error})") from error
    if num_frames <= 0 or fps <= 0 or width <= 0 or height <= 0:
        raise VideoDecodeError(path, f"no decodable frames (frames={num_frames}, fps={fps}, size={width}x{height})")
    return VideoInfo(str(path), num_frames, fps, width, height, codec, num_frames / fps)


def check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoDecodeError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")


def _reject_still_image(path: Path, container: Any) -> None:
    format_name = container.format.name
    if format_name in STILL_IMAGE_FORMATS or format_name.endswith("_pipe"):
        raise VideoDecodeError(path, f"a still image ({format_name}), not a video")


def open_video_stream(path: Path, container: Any, motion_vectors: bool = False) -> Any:
    """The first video stream of an open ``container``, set up to decode with FFmpeg's threads (and to
    export the codec's motion vectors when asked); raises :class:`VideoDecodeError` for a still image or no video."""
    _reject_still_image(path, container)
    stream = _video_stream(path, container)
    stream.thread_type = "AUTO"
    if motion_vectors:
        stream.codec_context.options = {"flags2": "+export_mvs"}
    return stream


def _video_stream(path: Path, container: Any) -> Any:
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    return container.streams.video[0]


def _resolve_backend(backend: str, codec: str) -> str:
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if codec in DALI_CPU_CODECS and _dali_import_error() is None else "pyav"
    if backend == "dali":
        if codec not in DALI_CPU_CODECS:
            raise ValueError(f"DALI's CPU decoder handles {sorted(DALI_CPU_CODECS)}, not {codec!r}; use backend='pyav'")
        if _dali_import_error() is not None:
            raise ValueError(f"backend='dali' needs NVIDIA DALI: {_dali_import_error()}")
    return backend


@functools.cache
def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401, PLC0415 - DALI is optional (GPU decoding)
    except ImportError as error:
        return str(error)
    return None


def decode_frames(path: str | Path, indices: Sequence[int], backend: str = "auto", max_side: int | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed) as uint8 RGB of shape (F, H, W, 3).

    ``max_side``: scale each frame down (aspect kept, even sizes) so its longer side is at most this many
    pixels. Only PyAV scales while decoding, so ``backend="auto"`` then uses PyAV for every codec.
    """
    info = probe_video(path)
    indices = [int(index) for index in indices]
    if not indices:
        raise ValueError("indices must not be empty")
    if min(indices) < 0:
        raise ValueError(f"indices must be >= 0, got {min(indices)}")
    _check_max_side(max_side)
    if max_side is not None and backend == "dali":
        raise ValueError("max_side needs backend='pyav' or 'auto': DALI's CPU decoder returns full-size frames")
    chosen = "pyav" if max_side is not None and backend == "auto" else _resolve_backend(backend, info.codec)
    if chosen == "dali":
        return _decode_dali_cpu(Path(path), indices)
    return _decode_pyav(Path(path), indices, scaled_size(info.width, info.height, max_side))


def _check_max_side(max_side: int | None) -> None:
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be None or >= 2, got {max_side}")


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the longer side is <= ``max_side``; unchanged when it already is."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    # Even sizes keep swscale on its fast paths and match what encoders accept.
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _decode_pyav(path: Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    import av  # noqa: PLC0415 - PyAV is optional (the data extra)

    wanted = set(indices)
    last = max(indices)
    width, height = size
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(open_video_stream(path, container))):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24", width=width, height=height)
                if index >= last:
                    break
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"decoding failed ({error})") from error
    missing = sorted(wanted - frames.keys())
    if missing:
        raise VideoDecodeError(path, f"frames {missing[:5]} are past the decodable end ({len(frames)} decoded; truncated file?)")
    return np.stack([frames[index] for index in indices])


def iter_windows(
    path: str | Path, windows: Sequence[Sequence[int]], backend: str = "auto", codec: str | None = None, size: tuple[int, int] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(window number, uint8 (F, H, W, 3)) for each window of frame indices, in the order the windows complete,
    from one decoding pass over ``path`` (PyAV) or one DALI call per window. Frames are dropped as soon as
    no later window needs them. ``size`` (width, height): PyAV resizes in swscale's conversion (area
    averaging when shrinking), far cheaper than resizing tensors; DALI returns full-size frames.
    Raises :class:`VideoDecodeError` when a wanted frame is past the decodable end.
    """
    if not windows:
        return
    path = Path(path)
    if _resolve_backend(backend, codec or probe_video(path).codec) == "dali":
        for number, window in enumerate(windows):
            yield number, _decode_dali_cpu(path, [int(index) for index in window])
        return
    import av  # noqa: PLC0415 - PyAV is optional (the data extra)

    waiting = {number: {int(index) for index in window} for number, window in enumerate(windows)}
    users = Counter(index for wanted in waiting.values() for index in wanted)  # windows still needing each frame
    frames: dict[int, np.ndarray] = {}
    last = max(users)
    try:
        with av.open(str(path)) as container:
            stream = open_video_stream(path, container)
            width, height = size or (stream.codec_context.width, stream.codec_context.height)
            shrinking = width * height < stream.codec_context.width * stream.codec_context.height
            interpolation = "AREA" if shrinking else "BILINEAR"
            for index, frame in enumerate(container.decode(stream)):
                if index in users:
                    frames[index] = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation)
                    for number in [number for number, missing in waiting.items() if index in missing]:
                        waiting[number].discard(index)
                        if not waiting[number]:
                            del waiting[number]
                            yield number, np.stack([frames[int(wanted)] for wanted in windows[number]])
                            for used in {int(wanted) for wanted in windows[number]}:
                                users[used] -= 1
                                if not users[used]:
                                    del frames[used]
                if index >= last:
                    break
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"decoding failed ({error})") from error
    if waiting:
        first_missing = min(min(missing) for missing in waiting.values())
        raise VideoDecodeError(path, f"frame {first_missing} is past the decodable end (truncated file?)")


def decode_frames_at_times(path: str | Path, times: Sequence[float], max_side: int | None = None, seek_gap: float = 2.0) -> np.ndarray:
    """The frames presented at ``times`` (seconds, as decoding reports them; any order), uint8 (F, H, W, 3).

    Targets more than ``seek_gap`` seconds past the current position are reached by seeking to the keyframe
    before them instead of decoding everything in between.
    """
    import av  # noqa: PLC0415 - PyAV is optional (the data extra)

    path = Path(path)
    _check_max_side(max_side)
    check_file(path)
    order = sorted(range(len(times)), key=lambda position: times[position])
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = open_video_stream(path, container)
            size = scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
            frames: Iterator[Any] = iter(())
            current = None
            for position in order:
                target = float(times[position]) - 1e-6
                if current is None or target - current.time > seek_gap:
                    container.seek(int(max(0.0, target) / stream.time_base), stream=stream, backward=True)
                    frames = container.decode(stream)
                    current = next(frames)
                while current.time is not None and current.time < target:
                    current = next(frames)
                found[position] = current.to_ndarray(format="rgb24", width=size[0], height=size[1])
    except StopIteration:
        raise VideoDecodeError(path, f"no frame at {times[position]:.3f} s (past the decodable end)") from None
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"decoding failed ({error})") from error
    return np.stack([found[position] for position in range(len(times))])


def decode_all_frames(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Every frame of ``path`` as uint8 RGB (F, H, W, 3), scaled as in :func:`decode_frames` (PyAV).

    For whole-file analysis such as cut detection, where small frames (``max_side`` ~100) suffice and the
    frame count must be exact even when the header has none. A file damaged part-way yields the frames
    before the damage; one with no decodable frame raises :class:`VideoDecodeError`.
    """
    frames, _motion = _decode_all_pyav(Path(path), max_side, motion_vectors=False)
    return frames


def decode_all_frames_with_motion(path: str | Path, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode_all_frames` plus, per frame, the mean magnitude in source pixels of the codec's motion
    vectors (FFmpeg's export_mvs; NaN for frames without any: intra frames, intra-only codecs, and decoders
    that do not export them, such as VP9's).

    The vectors come free with decoding, so they make a cheap motion pre-filter. Their reference distance
    varies with the GOP structure (B-frames), so they say "moving or not", not how fast.
    """
    return _decode_all_pyav(Path(path), max_side, motion_vectors=True)


def _decode_all_pyav(path: Path, max_side: int | None, motion_vectors: bool) -> tuple[np.ndarray, np.ndarray]:
    import av  # noqa: PLC0415 - PyAV is optional (the data extra)

    _check_max_side(max_side)
    check_file(path)
    frames: list[np.ndarray] = []
    motion: list[float] = []
    try:
        with av.open(str(path)) as container:
            stream = open_video_stream(path, container, motion_vectors)
            width, height = scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                if motion_vectors:
                    motion.append(mean_motion_vector_px(frame))
    except av.error.FFmpegError as error:
        if not frames:
            raise VideoDecodeError(path, f"unreadable by FFmpeg ({error})") from error
        LOGGER.warning("%s: decoding stopped after %d frames (%s)", path, len(frames), error)
    if not frames:
        raise VideoDecodeError(path, "no decodable frames")
    return np.stack(frames), np.asarray(motion, dtype=np.float64)


def mean_motion_vector_px(frame: Any) -> float:
    vectors = next((side for side in frame.side_data if "MOTION_VECTORS" in str(getattr(side, "type", ""))), None)
    if vectors is None:
        return float("nan")
    table = vectors.to_ndarray()
    scale = np.maximum(table["motion_scale"], 1).astype(np.float64)
    magnitude = np.hypot(table["motion_x"] / scale, table["motion_y"] / scale)
    return float(magnitude.mean()) if magnitude.size else float("nan")


_dali_pipelines: dict[int, Any] = {}


def _dali_cpu_pipeline():
    """One DALI CPU pipeline per process, fed an encoded file and the frame indices to decode.

    Keyed by process id: a DataLoader worker forked after the parent built its pipeline inherits a
    pipeline whose threads did not survive the fork, and using it would hang.
    """
    if os.getpid() not in _dali_pipelines:
        _dali_pipelines[os.getpid()] = _build_dali_pipeline("cpu", None)
    return _dali_pipelines[os.getpid()]


def _build_dali_pipeline(device: str, device_id: int | None):
    """A DALI pipeline fed an encoded file and the frame indices to decode, decoding on ``device`` ("cpu", or
    "mixed": NVDEC into GPU memory)."""
    import nvidia.dali.fn as fn  # noqa: PLC0415 - DALI is optional (GPU decoding)
    import nvidia.dali.types as types  # noqa: PLC0415 - DALI is optional (GPU decoding)
    from nvidia.dali import pipeline_def  # noqa: PLC0415 - DALI is optional (GPU decoding)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frame_indices = fn.external_source(name="frame_indices", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device=device, frames=frame_indices)

    built = pipeline()
    built.build()
    return built


def _decode_dali_cpu(path: Path, indices: list[int]) -> np.ndarray:
    pipeline = _dali_cpu_pipeline()
    pipeline.feed_input("encoded", [np.fromfile(path, dtype=np.uint8)])
    pipeline.feed_input("frame_indices", [np.asarray(indices, dtype=np.int32)])
    try:
        (output,) = pipeline.run()
    except RuntimeError as error:
        raise VideoDecodeError(path, f"DALI decoding failed ({error})") from error
    return np.array(output[0])




_dali_gpu_pipelines: dict[tuple[int, int], Any] = {}


def iter_windows_gpu(path: str | Path, windows: Sequence[Sequence[int]], device_id: int) -> Iterator[tuple[int, Any]]:
    """(window number, uint8 (F, H, W, 3) torch tensor on CUDA device ``device_id``) for each window, in order:
    DALI's video decoder with ``device="mixed"`` (demuxing on the CPU, NVDEC decoding into GPU memory), one call per
    window. Raises :class:`VideoDecodeError` when DALI cannot decode a window."""
    import torch  # noqa: PLC0415 - defers torch: probing and CPU decoding stay numpy-only
    from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: PLC0415 - DALI is optional (GPU decoding)

    path = Path(path)
    check_file(path)
    key = (os.getpid(), device_id)  # per process, as _dali_cpu_pipeline
    if key not in _dali_gpu_pipelines:
        _dali_gpu_pipelines[key] = _build_dali_pipeline("mixed", device_id)
    pipeline = _dali_gpu_pipelines[key]
    encoded = np.fromfile(path, dtype=np.uint8)
    for number, window in enumerate(windows):
        pipeline.feed_input("encoded", [encoded])
        pipeline.feed_input("frame_indices", [np.asarray(window, dtype=np.int32)])
        try:
            (output,) = pipeline.run()
        except RuntimeError as error:
            raise VideoDecodeError(path, f"DALI (NVDEC) decoding failed ({error})") from error
        decoded = output[0]
        frames = torch.empty(tuple(decoded.shape()), dtype=torch.uint8, device=torch.device("cuda", device_id))
        feed_ndarray(decoded, frames, cuda_stream=torch.cuda.current_stream(device_id))
        yield number, frames
