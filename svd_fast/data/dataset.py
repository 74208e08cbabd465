"""The clip dataset for training: fixed-length clips as normalised tensors, each file decoded once per epoch
(CPU: PyAV or DALI's CPU decoder; CUDA: DALI with NVDEC, ``decode_device="cuda"``), and DALI's own GPU reader
(:func:`dali_clip_loader`)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from svd_fast.data.clips import ClipSource, clip_frame_indices, frame_step, sources_from, window
from svd_fast.data.decode import (
    DECODE_BACKENDS,
    VIDEO_SUFFIXES,
    VideoDecodeError,
    VideoInfo,
    iter_windows,
    iter_windows_gpu,
    probe_video,
)

LOGGER = logging.getLogger(__name__)
_UNIT_RANGE = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # uint8 -> [-1, 1]


def covering_size(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of ``source`` (height, width) scaled, aspect kept, to the smallest size covering ``size``."""
    scale = max(size[0] / source[0], size[1] / source[1])
    return max(size[0], math.ceil(source[0] * scale - 1e-6)), max(size[1], math.ceil(source[1] * scale - 1e-6))


def frames_to_tensor(frames: np.ndarray | torch.Tensor, size: tuple[int, int], random_crop: bool = False,
                     rng: random.Random | None = None) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, h, w) in [-1, 1]: resize the shorter side to cover ``size``, then crop.
    Frames already at the covering size (decoded so, see :meth:`VideoClipDataset.__iter__`) are only cropped.
    A tensor (frames decoded on the GPU) is converted on its device."""
    height, width = size
    on_device = isinstance(frames, torch.Tensor)
    frames = frames if on_device else np.asarray(frames)
    resized = covering_size(frames.shape[1:3], size)
    spare_y, spare_x = resized[0] - height, resized[1] - width
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, spare_y), rng.randint(0, spare_x)
    else:
        top, left = spare_y // 2, spare_x // 2
    if resized == tuple(frames.shape[1:3]) and not on_device:
        import cv2  # noqa: PLC0415 - optional dependency (the data extra), like PyAV

        # Crop the uint8 frames first, then one table lookup per kept pixel (same values as x / 127.5 - 1);
        # OpenCV's LUT is several times faster than numpy's or torch's conversion on a CPU.
        cropped = np.ascontiguousarray(frames[:, top : top + height, left : left + width].transpose(0, 3, 1, 2))
        return torch.from_numpy(cv2.LUT(cropped.reshape(-1, width), _UNIT_RANGE).reshape(cropped.shape))
    video = (frames if on_device else torch.from_numpy(np.ascontiguousarray(frames))).permute(0, 3, 1, 2).float()
    if resized != tuple(frames.shape[1:3]):
        video = F.interpolate(video, size=resized, mode="bilinear", antialias=True, align_corners=False)
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


class VideoClipDataset(torch.utils.data.IterableDataset):
    """Fixed-length clips from video files, as {"pixel_values": (F, 3, H, W) in [-1, 1], "path",
    "start_frame", "fps" (of the frames fed, see :meth:`fed_fps`), + manifest columns}.

    ``sources``: a folder (searched recursively), a list of paths, a list of manifest rows (dicts with
    ``file``, optional ``start_frame``/``end_frame`` and extra columns), or a .parquet/.jsonl manifest,
    such as the one ``svd-fast curate`` writes (its rows with keep=False or an error are left out).
    Sharding: files are split across ``world_size`` ranks and across DataLoader workers, so every clip
    is read exactly once per epoch, and each file is decoded in one pass for all its clips.
    Sources are dealt round-robin to DataLoader workers, each with its own crop generator, so
    :class:`svd_fast.data.WorkerClips` gives the same clips in the same order as iterating in-process.
    Call :meth:`set_epoch` to reshuffle. Skipped files and clips are in
    :attr:`errors` (for in-process iteration; DataLoader workers log them).
    ``decode_device="cuda"``: DALI decodes with NVDEC into GPU memory and the clips are CUDA tensors (in the
    training process: CUDA and DataLoader worker processes do not mix).
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
        decode_device: str = "cpu",
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
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
        if decode_device not in ("cpu", "cuda"):
            raise ValueError(f"decode_device must be 'cpu' or 'cuda', got {decode_device!r}")
        if decode_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("decode_device='cuda' decodes with NVDEC and no CUDA device is available; use decode_device='cpu'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.sources = sources_from(sources)
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
        self.decode_device = decode_device
        self.epoch = 0
        self.errors: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_sources(self) -> list[ClipSource]:
        """This rank's sources for the current epoch, in the order their clips come."""
        order = list(self.sources)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order[self.rank :: self.world_size]

    def source_rng(self, position: int) -> random.Random:
        """The random crops of the source at ``position`` in :meth:`rank_sources`: a generator of its own, so a
        clip's crop does not depend on which process decodes it or on the sources before it."""
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + position)

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
        padded = window(source.start_frame, self.num_frames, frame_step(info.fps, self.stride, self.target_fps))
        return [[min(index, last) for index in padded]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for position, source in enumerate(self.rank_sources()):
            if position % workers == worker_id:
                yield from self.source_clips(source, self.source_rng(position))

    def source_clips(self, source: ClipSource, rng: random.Random | None = None) -> Iterator[dict[str, Any]]:
        """Every clip of one source, in order (a file that cannot be used is recorded in :attr:`errors`)."""
        try:
            info = probe_video(source.path)
        except VideoDecodeError as error:
            self._skip(source.path, error.reason)
            return
        windows = self.clip_windows(source, info)
        if not windows:
            self._skip(source.path, f"shorter than one clip of {self.num_frames} frames (on_short='skip')")
            return
        try:
            # Decoded straight to the size that covers self.size: swscale resizes far cheaper than torch.
            decode_height, decode_width = covering_size((info.height, info.width), self.size)
            if self.decode_device == "cuda":  # DALI (NVDEC): full-size frames in GPU memory, resized there
                decoded = iter_windows_gpu(source.path, windows, torch.cuda.current_device())
            else:
                decoded = iter_windows(source.path, windows, self.backend, info.codec, (decode_width, decode_height))
            for number, frames in decoded:
                sample = dict(source.extra)
                sample.update(
                    pixel_values=frames_to_tensor(frames, self.size, self.random_crop, rng),
                    path=source.path,
                    start_frame=windows[number][0],
                    fps=self.fed_fps(info),
                )
                yield sample
        except VideoDecodeError as error:
            self._skip(source.path, error.reason)

    def fed_fps(self, info: VideoInfo) -> float:
        """The frame rate of the frames actually fed: the source's divided by the stride, or target_fps.
        It is what the model's fps conditioning must see (a 30 fps file read with stride 4 is 7.5 fps)."""
        if self.target_fps is not None:
            return float(self.target_fps)
        return info.fps / (self.stride or 1)


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
    import nvidia.dali.fn as fn  # noqa: PLC0415 - DALI is optional (GPU decoding)
    import nvidia.dali.types as types  # noqa: PLC0415 - DALI is optional (GPU decoding)
    from nvidia.dali import pipeline_def  # noqa: PLC0415 - DALI is optional (GPU decoding)
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: PLC0415 - DALI is optional (GPU decoding)

    files = [source.path for source in sources_from(sources)]
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
