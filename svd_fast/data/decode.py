"""Video clips for training and curation: probing, frame selection, decoding (DALI or PyAV) and loading.

Decoders:
* DALI on the GPU (NVDEC) decodes H.264/HEVC/VP9/AV1: :func:`dali_clip_loader` yields (B, F, C, H, W) CUDA
  batches with resize, crop and normalisation done by DALI.
* DALI on the CPU decodes VP8, VP9 and MJPEG only; PyAV (FFmpeg) decodes everything else on the CPU.
  ``backend="auto"`` picks DALI's CPU decoder for those codecs and PyAV for the rest.
  The two agree on luma; on colour edges they differ by a few levels because DALI interpolates the
  4:2:0 chroma planes while FFmpeg's swscale replicates them.
* ``max_side`` (PyAV only) scales frames down in swscale's RGB conversion, for analysis that needs
  small frames (curation: cut detection, optical flow, OCR); :func:`decode_all_frames` reads a whole
  file that way, optionally with the codec's motion vectors.

Bad input never stops a run: unreadable, truncated, empty or non-video files are skipped, logged and
listed in :attr:`VideoClipDataset.errors` with the reason.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LOGGER = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
BACKENDS = ("auto", "dali", "pyav")


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
    _check_file(path)
    try:
        with av.open(str(path)) as container:
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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoDecodeError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")


def _video_stream(path: Path, container: Any) -> Any:
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    return container.streams.video[0]


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
    step = _frame_step(video_fps, stride, target_fps)
    clips: list[list[int]] = []
    first = float(start)
    while (indices := _window(first, num_frames, step))[-1] < end:
        clips.append(indices)
        first += num_frames * step
    return clips


def _frame_step(video_fps: float, stride: int | None, target_fps: float | None) -> float:
    return float(stride or 1) if target_fps is None else video_fps / target_fps


def _window(first: float, num_frames: int, step: float) -> list[int]:
    return [int(round(first + k * step)) for k in range(num_frames)]


def _resolve_backend(backend: str, codec: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        import nvidia.dali  # noqa: F401, PLC0415
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
    return _decode_pyav(Path(path), indices, _scaled_size(info.width, info.height, max_side))


def _check_max_side(max_side: int | None) -> None:
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be None or >= 2, got {max_side}")


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the longer side is <= ``max_side``; unchanged when it already is."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    # Even sizes keep swscale on its fast paths and match what encoders accept.
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _decode_pyav(path: Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    import av  # noqa: PLC0415

    wanted = set(indices)
    last = max(indices)
    width, height = size
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
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
    import av  # noqa: PLC0415

    _check_max_side(max_side)
    _check_file(path)
    frames: list[np.ndarray] = []
    motion: list[float] = []
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(path, container)
            width, height = _scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
            if motion_vectors:
                stream.codec_context.options = {"flags2": "+export_mvs"}
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                if motion_vectors:
                    motion.append(_mean_motion_vector_px(frame))
    except av.error.FFmpegError as error:
        if not frames:
            raise VideoDecodeError(path, f"unreadable by FFmpeg ({error})") from error
        LOGGER.warning("%s: decoding stopped after %d frames (%s)", path, len(frames), error)
    if not frames:
        raise VideoDecodeError(path, "no decodable frames")
    return np.stack(frames), np.asarray(motion, dtype=np.float64)


def _mean_motion_vector_px(frame: Any) -> float:
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
        _dali_pipelines[os.getpid()] = _build_dali_cpu_pipeline()
    return _dali_pipelines[os.getpid()]


def _build_dali_cpu_pipeline():
    import nvidia.dali.fn as fn  # noqa: PLC0415
    import nvidia.dali.types as types  # noqa: PLC0415
    from nvidia.dali import pipeline_def  # noqa: PLC0415

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frame_indices = fn.external_source(name="frame_indices", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="cpu", frames=frame_indices)

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


def frames_to_tensor(frames: np.ndarray, size: tuple[int, int], random_crop: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, h, w) in [-1, 1]: resize the shorter side to cover ``size``, then crop."""
    height, width = size
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    scale = max(height / video.shape[2], width / video.shape[3])
    resized = (max(height, math.ceil(video.shape[2] * scale - 1e-6)), max(width, math.ceil(video.shape[3] * scale - 1e-6)))
    if resized != tuple(video.shape[2:]):
        video = F.interpolate(video, size=resized, mode="bilinear", antialias=True, align_corners=False)
    spare_y, spare_x = resized[0] - height, resized[1] - width
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, spare_y), rng.randint(0, spare_x)
    else:
        top, left = spare_y // 2, spare_x // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


@dataclass(frozen=True)
class ClipSource:
    """One entry of a dataset: a file, an optional frame range, and columns passed through to samples."""

    path: str
    start_frame: int = 0
    end_frame: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()


def _sources_from(sources: str | Path | Sequence[Any]) -> list[ClipSource]:
    if isinstance(sources, (str, Path)):
        location = Path(sources)
        if location.is_dir():
            return [ClipSource(str(p)) for p in sorted(location.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES]
        if location.suffix == ".parquet":
            import pandas as pd  # noqa: PLC0415

            return _sources_from(pd.read_parquet(location).to_dict("records"))
        if location.suffix == ".jsonl":
            return _sources_from([json.loads(line) for line in location.read_text().splitlines() if line.strip()])
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


class VideoClipDataset(torch.utils.data.IterableDataset):
    """Fixed-length clips from video files, as {"pixel_values": (F, 3, H, W) in [-1, 1], "path",
    "start_frame", "fps", + manifest columns}.

    ``sources``: a folder (searched recursively), a list of paths, a list of manifest rows (dicts with
    ``file``, optional ``start_frame``/``end_frame`` and extra columns), or a .parquet/.jsonl manifest,
    such as the one ``svd-fast curate`` writes (its rows with keep=False or an error are left out).
    Sharding: files are split across ``world_size`` ranks and across DataLoader workers, so every clip
    is read exactly once per epoch. Call :meth:`set_epoch` to reshuffle. Skipped files and clips are in
    :attr:`errors` (for in-process iteration; DataLoader workers log them).
    """

    def __init__(
        self,
        sources: str | Path | Sequence[Any],
        num_frames: int,
        size: tuple[int, int],
        stride: int | None = None,
        target_fps: float | None = None,
        random_crop: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_short: str = "skip",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
        if stride is not None and target_fps is not None:
            raise ValueError("give either stride or target_fps, not both")
        if on_short not in ("skip", "pad"):
            raise ValueError(f"on_short must be 'skip' or 'pad', got {on_short!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.sources = _sources_from(sources)
        if not self.sources:
            raise ValueError(f"sources: no video files found in {sources!r} (looked for {sorted(VIDEO_SUFFIXES)})")
        self.num_frames = num_frames
        self.size = (int(size[0]), int(size[1]))
        self.stride = stride
        self.target_fps = target_fps
        self.random_crop = random_crop
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.on_short = on_short
        self.backend = backend
        self.epoch = 0
        self.errors: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_sources(self) -> list[ClipSource]:
        order = list(self.sources)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        shard, shards = self.rank * workers + worker_id, self.world_size * workers
        return order[shard::shards]

    def _skip(self, path: str, reason: str) -> None:
        LOGGER.warning("skipping %s: %s", path, reason)
        self.errors.append((path, reason))

    def clip_windows(self, source: ClipSource, info: VideoInfo) -> list[list[int]]:
        windows = clip_frame_indices(
            info.num_frames, info.fps, self.num_frames, self.stride, self.target_fps, source.start_frame, source.end_frame
        )
        if windows or self.on_short == "skip":
            return windows
        # Pad a short clip by repeating its last frame: one window over whatever the range holds.
        last = min(source.end_frame or info.num_frames, info.num_frames) - 1
        if last < source.start_frame:
            return []
        window = _window(source.start_frame, self.num_frames, _frame_step(info.fps, self.stride, self.target_fps))
        return [[min(index, last) for index in window]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        for source in self._my_sources():
            try:
                info = probe_video(source.path)
            except VideoDecodeError as error:
                self._skip(source.path, error.reason)
                continue
            windows = self.clip_windows(source, info)
            if not windows:
                self._skip(source.path, f"shorter than one clip of {self.num_frames} frames (on_short='skip')")
                continue
            for indices in windows:
                try:
                    frames = decode_frames(source.path, indices, self.backend)
                except VideoDecodeError as error:
                    self._skip(source.path, error.reason)
                    break
                sample = dict(source.extra)
                sample.update(
                    pixel_values=frames_to_tensor(frames, self.size, self.random_crop, rng),
                    path=source.path,
                    start_frame=indices[0],
                    fps=info.fps if self.target_fps is None else float(self.target_fps),
                )
                yield sample


def dali_clip_loader(
    sources: str | Path | Sequence[str | Path],
    batch_size: int,
    num_frames: int,
    size: tuple[int, int],
    stride: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device_id: int = 0,
    num_threads: int = 4,
):
    """GPU clip loader: DALI decodes with NVDEC, resizes, center-crops and normalises to [-1, 1] on the GPU.

    Yields dicts {"pixel_values": (B, F, 3, H, W) float32 CUDA tensor}. Needs a CUDA device; on a machine
    without one use :class:`VideoClipDataset` (CPU decoding with DALI or PyAV).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("dali_clip_loader decodes on the GPU and no CUDA device is available; use VideoClipDataset")
    import nvidia.dali.fn as fn  # noqa: PLC0415
    import nvidia.dali.types as types  # noqa: PLC0415
    from nvidia.dali import pipeline_def  # noqa: PLC0415
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: PLC0415

    files = [source.path for source in _sources_from(sources)]
    if not files:
        raise ValueError(f"sources: no video files found in {sources!r}")
    height, width = size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipeline():
        video = fn.readers.video(
            device="gpu",
            filenames=files,
            sequence_length=num_frames,
            stride=stride,
            step=num_frames * stride,  # consecutive, non-overlapping clips as clip_frame_indices
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=shuffle,
            initial_fill=max(4 * batch_size, 16),
            skip_vfr_check=True,
            name="reader",
        )
        video = fn.resize(video, resize_x=width, resize_y=height, mode="not_smaller", antialias=True)
        return fn.crop_mirror_normalize(
            video,
            crop=(height, width),
            mean=[127.5] * 3,
            std=[127.5] * 3,
            dtype=types.FLOAT,
            output_layout="FCHW",
        )

    built = pipeline()
    built.build()
    iterator = DALIGenericIterator([built], ["pixel_values"], reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL)
    for (batch,) in iterator:
        yield batch
