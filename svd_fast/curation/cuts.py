"""Transition detection (hard cuts, fades, dissolves) on the stream sampled at three frame rates in time.

The score between two frames is PySceneDetect's ContentDetector score: the mean absolute difference of the
HSV channels (0..255 scale; hue over the full circle, as OpenCV's COLOR_RGB2HSV_FULL). On a CPU the HSV
frames come from OpenCV as uint8 and are scored in NumPy (torch's elementwise ops cost 10-100x more on these
small frames); on CUDA :func:`rgb_to_hsv255` computes them in float. The two differ by the uint8 rounding
(<= 0.5 per channel, and hue where it wraps at red), far below any threshold.

As in the SVD paper, the stream is scored at three frame rates, chosen by timestamp (so a variable-frame-rate
file is sampled evenly in time): every decoded frame (hard cuts), ``SAMPLE_RATES`` = 4 FPS and 1 FPS (a fade
or dissolve, invisible frame to frame, is a large change over 0.25-1 s).

* Hard cuts, at full rate: a step scoring >= ``threshold``, the largest among its ``neighbours`` steps on
  each side, >= ``contrast`` x their median and >= ``SIDE_CONTRAST`` x the median of either side (the idea of
  PySceneDetect's AdaptiveDetector: fast motion scores high on every step, a cut stands out), whose frames before and after (and one frame further out)
  differ by >= ``threshold``.
* Gradual transitions, at 4 and 1 FPS: a run of "straight" sampled steps, each scoring >= ``MIN_STEP_FRACTION``
  x threshold and >= ``MIN_STRAIGHTNESS`` x the sum of the full-rate scores it spans ("straightness"). A blend
  or fade moves on a straight line between two images, so its big step equals the sum of its small ones;
  motion mostly does not (a shifted texture decorrelates: the sum of small steps exceeds the big step), and
  where slow motion is straight it is so on both sides, so the run's straightness must exceed the median of
  its ``neighbours`` steps' (those without a hard cut; none: no evidence, rejected) by ``MIN_STRAIGHTNESS_MARGIN``,
  and its frames must be blends of its first and last (:func:`blend_residual` <= ``MAX_BLEND_RESIDUAL``). The run must
  last <= ``MAX_TRANSITION_SECONDS``, not span the whole file, and the frames before and after it must differ
  by >= ``threshold``, so an object crossing the foreground (after which the shot looks as before) is not a cut.
  A run with a hard cut strictly inside it is left to the hard-cut pass.

A gradual transition's extent is refined on the full-rate scores: its frames are those after the first and up
to the last full-rate step scoring >= ``ACTIVE_FRACTION`` of its mean step. A hard cut has no transition
frames; a fade's or dissolve's frames belong to no clip. Transitions from the three rates are merged.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATES = (4.0, 1.0)  # frames per second, besides every decoded frame
MAX_TRANSITION_SECONDS = 3.0
ACTIVE_FRACTION = 0.25
MIN_STRAIGHTNESS = 0.75
SIDE_CONTRAST = 1.25
MAX_BLEND_RESIDUAL = 0.35
MIN_STRAIGHTNESS_MARGIN = 0.1
MIN_STEP_FRACTION = 0.25
CHUNK_BYTES = 16 * 2**20  # frames converted and scored at a time
MAPPED_BYTES = 64 * 2**20  # larger HSV arrays live in a temporary file (temporary_array)
# Reading one row of a memory-mapped file maps the whole page-cache folio holding it (up to 2 MiB on Linux):
# what a gather of scattered rows counts against CHUNK_BYTES per row.
MAPPED_ROW_BYTES = 2 * 2**20


@dataclass(frozen=True)
class Transition:
    """Frames [start, end) are the transition (none for a hard cut); the next scene starts at ``end``."""

    start: int
    end: int


def rgb_to_hsv255(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 RGB -> (F, 3, H, W) float32 HSV, each channel scaled to 0..255 like OpenCV's."""
    rgb = frames.permute(0, 3, 1, 2).float() / 255.0
    red, green, blue = rgb.unbind(1)
    value, _ = rgb.max(1)
    minimum, _ = rgb.min(1)
    chroma = value - minimum
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe_chroma = chroma.clamp_min(1e-12)
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma % 6,
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1) * 255.0


def temporary_array(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised array; above ``MAPPED_BYTES``, mapped from an unnamed temporary file in the system temp dir
    (disk-backed pages the kernel can drop, not process memory; the mapping outlives the closed file)."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size <= MAPPED_BYTES:
        return np.empty(shape, dtype)
    with tempfile.TemporaryFile() as file:
        if hasattr(os, "posix_fallocate"):
            # Disk space reserved now: a full disk raises OSError here, not SIGBUS on a later write through the mapping.
            os.posix_fallocate(file.fileno(), 0, size)
        else:  # macOS has no posix_fallocate: a sparse file of the right size
            file.truncate(size)
        return np.memmap(file, dtype=dtype, mode="r+", shape=shape)


def release_pages(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped ``array`` (np.memmap or a view of one) from this process: the file keeps
    the data and a later access maps it again, so reading a long mapped array chunk by chunk keeps the resident
    memory bounded. Only for a shared mapping (mode "r", "r+" or "w+"), where the file holds every byte: a
    copy-on-write one ("c") may hold private writes, which dropping its pages would undo. Nothing for an array
    in memory."""
    if not isinstance(array, np.memmap) or array.mode == "c":
        return
    owner = array.base
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = getattr(owner, "base", None)
    if owner is not None and hasattr(owner, "madvise"):  # no madvise on Windows: the pages stay mapped there
        owner.madvise(mmap.MADV_DONTNEED)


def _chunks(count: int, frame_bytes: int) -> list[slice]:
    """Consecutive slices of ``range(count)`` holding about ``CHUNK_BYTES`` of frames each."""
    step = max(1, CHUNK_BYTES // max(1, frame_bytes))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _scorer(video: torch.Tensor | np.ndarray, backend: str) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], np.ndarray]:
    """``scores(first, second)``: the content score of each pair of frame indices; and the scores of all
    consecutive frames (computed on slices, without gathering copies). ``backend`` "opencv" (CPU, NumPy or
    tensor ``video``) or "torch" (tensor). Both work a chunk of frames at a time, and on the CPU the HSV frames
    of a long video live in a temporary file (:func:`temporary_array`) whose pages, like a memory-mapped
    ``video``'s, are released chunk by chunk (:func:`release_pages`), so the memory used stays bounded however
    long the video."""
    count, frame_bytes = video.shape[0], math.prod(video.shape[1:])
    if backend == "opencv":
        import cv2  # noqa: PLC0415 - in the data extra, as PyAV is

        frames = video if isinstance(video, np.ndarray) else video.cpu().numpy()
        gathered_row_bytes = max(frame_bytes, MAPPED_ROW_BYTES)
        hsv = temporary_array((count, frame_bytes), np.uint8)
        for rows in _chunks(count, frame_bytes):
            chunk = np.ascontiguousarray(frames[rows])
            hsv[rows] = cv2.cvtColor(chunk.reshape(-1, chunk.shape[2], 3), cv2.COLOR_RGB2HSV_FULL).reshape(len(chunk), -1)
            release_pages(frames)
            release_pages(hsv)

        def score_rows(first: np.ndarray | slice, second: np.ndarray | slice) -> np.ndarray:
            difference = cv2.absdiff(hsv[second], hsv[first]).mean(axis=1)
            release_pages(hsv)
            return difference

        def scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
            row_bytes = gathered_row_bytes if isinstance(hsv, np.memmap) else frame_bytes
            return np.concatenate([np.zeros(0), *(score_rows(first[rows], second[rows]) for rows in _chunks(len(first), row_bytes))])

        consecutive = [score_rows(rows, slice(rows.start + 1, rows.stop + 1)) for rows in _chunks(count - 1, frame_bytes)]
        return scores, np.concatenate(consecutive)
    hsv_float = torch.empty((count, frame_bytes), dtype=torch.float32, device=video.device)
    for rows in _chunks(count, frame_bytes):
        hsv_float[rows] = rgb_to_hsv255(video[rows]).flatten(1)

    def mean_difference(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
        return (second - first).abs().mean(dim=1).double().cpu().numpy()

    def scores_float(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        first, second = torch.as_tensor(first), torch.as_tensor(second)
        return np.concatenate([np.zeros(0), *(mean_difference(hsv_float[first[rows]], hsv_float[second[rows]]) for rows in _chunks(len(first), frame_bytes))])

    consecutive = [mean_difference(hsv_float[rows], hsv_float[rows.start + 1 : rows.stop + 1]) for rows in _chunks(count - 1, frame_bytes)]
    return scores_float, np.concatenate(consecutive)


def sample_by_time(times: np.ndarray, rate: float) -> np.ndarray:
    """Indices of the frames on screen at times first, first + 1/rate, ... (repeats removed)."""
    grid = np.arange(times[0], times[-1] + 1e-9, 1.0 / rate)
    indices = np.searchsorted(times, grid + 1e-6, side="right") - 1
    return np.unique(np.clip(indices, 0, len(times) - 1))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last] of each maximal run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(first), int(last) - 1) for first, last in zip(edges[::2], edges[1::2])]


def detect_transitions(
    frames: np.ndarray | torch.Tensor,
    times: Sequence[float] | np.ndarray | None = None,
    fps: float = 24.0,
    threshold: float = 27.0,
    min_scene_frames: int = 8,
    contrast: float = 1.5,
    neighbours: int = 3,
    device: torch.device | str | None = None,
) -> list[Transition]:
    """Transitions in frames (F, H, W, 3) uint8 RGB with presentation ``times`` in seconds (default index / fps).

    Small frames suffice (the score is a mean over pixels); the pipeline uses 96 px on the longer side.
    Scenes shorter than ``min_scene_frames`` between two transitions (or before the first) join the transition.
    """
    if threshold <= 0:
        raise ValueError(f"detect_transitions: threshold must be > 0, got {threshold}")
    if min_scene_frames < 1:
        raise ValueError(f"detect_transitions: min_scene_frames must be >= 1, got {min_scene_frames}")
    if contrast < 1 or neighbours < 0:
        raise ValueError(f"detect_transitions: contrast must be >= 1 and neighbours >= 0, got {contrast}, {neighbours}")
    video = torch.as_tensor(frames)  # shares a NumPy input's memory: a memory-mapped input stays on disk
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"detect_transitions: frames must be uint8 (F, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    count = video.shape[0]
    times = np.arange(count) / fps if times is None else np.asarray(times, dtype=np.float64)
    if times.shape != (count,):
        raise ValueError(f"detect_transitions: times must have one entry per frame ({count}), got {times.shape}")
    if count < 2:
        return []
    if device is not None:
        video = video.to(device)
    backend = "opencv" if video.device.type == "cpu" else "torch"
    if backend == "opencv" and isinstance(frames, np.ndarray):
        video = frames  # as given: the pages of a memory-mapped array are released as they are read (release_pages)
    scores, full_rate = _scorer(video, backend)  # full_rate[m] scores frames (m, m + 1)
    everything = np.arange(count)
    found: list[Transition] = []
    hard_cuts: list[Transition] = []
    for samples in [everything, *(sample_by_time(times, rate) for rate in SAMPLE_RATES)]:
        if len(samples) < 2 or (samples is not everything and len(samples) == count):
            continue
        if samples is everything:
            hard_cuts = _hard_cuts(full_rate, scores, threshold, contrast, neighbours)
            found += hard_cuts
        else:
            found += _gradual_transitions(samples, times, full_rate, scores, threshold, hard_cuts, neighbours, video)
    return _merge(found, min_scene_frames)


def _hard_cuts(full_rate: np.ndarray, scores, threshold: float, contrast: float, neighbours: int) -> list[Transition]:
    found = []
    for step in np.flatnonzero(full_rate >= threshold):
        left, right = full_rate[max(0, step - neighbours) : step], full_rate[step + 1 : step + 1 + neighbours]
        around = np.concatenate([left, right])
        if around.size and (full_rate[step] < contrast * float(np.median(around)) or full_rate[step] < around.max()):
            continue
        sides = [float(np.median(side)) for side in (left, right) if side.size]
        if sides and full_rate[step] < SIDE_CONTRAST * max(sides):
            continue  # as high as the steps on one side: the start or end of fast motion
        before, after = step, step + 1
        if scores(np.array([before, max(0, before - 1)]), np.array([after, min(len(full_rate), after + 1)])).min() < threshold:
            continue
        found.append(Transition(int(after), int(after)))
    return found


def blend_residual(video: torch.Tensor | np.ndarray, before: int, after: int) -> float:
    """How far the frames strictly between ``before`` and ``after`` are from the best blend of those two:
    max over frames of |f - (a + w (b - a))| / |b - a| with the least-squares w. ~0 for a fade or dissolve;
    large for motion, whose in-between frames are shifted images, not blends."""
    first, last = torch.as_tensor(video[before]).float(), torch.as_tensor(video[after]).float()
    inner = torch.as_tensor(video[before + 1 : after]).float()
    if not len(inner):
        return 0.0
    direction = (last - first).flatten()
    energy = float(direction @ direction)
    if energy == 0:
        return 0.0
    offsets = (inner - first).flatten(1)
    weights = (offsets @ direction) / energy
    residual = (offsets - weights[:, None] * direction[None]).norm(dim=1) / math.sqrt(energy)
    return float(residual.max())


def _gradual_transitions(
    samples: np.ndarray, times: np.ndarray, full_rate: np.ndarray, scores, threshold: float, hard_cuts: list[Transition], neighbours: int,
    video: torch.Tensor | np.ndarray,
) -> list[Transition]:
    step_scores = scores(samples[:-1], samples[1:])
    path_lengths = np.array([full_rate[start:stop].sum() for start, stop in zip(samples[:-1], samples[1:])])
    straightness = np.divide(step_scores, path_lengths, out=np.zeros_like(step_scores), where=path_lengths > 0)
    candidate = (straightness >= MIN_STRAIGHTNESS) & (step_scores >= MIN_STEP_FRACTION * threshold)
    cut_steps = np.array([cut.end - 1 for cut in hard_cuts])
    # Steps holding a hard cut say nothing about the motion around a run: left out of its neighbours.
    has_cut = np.array([((cut_steps >= start) & (cut_steps < stop)).any() for start, stop in zip(samples[:-1], samples[1:])])
    found = []
    for first, last in _runs(candidate):
        before, after = samples[first], samples[last + 1]
        if times[after] - times[before] > MAX_TRANSITION_SECONDS or (first == 0 and last == len(candidate) - 1):
            continue
        # Steady motion can be straight too, but then it is as straight on either side: a transition stands out.
        window = np.r_[max(0, first - neighbours) : first, last + 1 : min(len(candidate), last + 1 + neighbours)]
        around = straightness[window[~has_cut[window]]]
        if not around.size or straightness[first : last + 1].mean() < float(np.median(around)) + MIN_STRAIGHTNESS_MARGIN:
            continue
        if ((cut_steps > before) & (cut_steps < after - 1)).any():
            continue  # a hard cut inside the run explains it (found at full rate)
        if scores(np.array([before]), np.array([after]))[0] < threshold:
            continue
        residual = blend_residual(video, int(before), int(after))
        release_pages(video)
        if residual > MAX_BLEND_RESIDUAL:
            continue
        steps = full_rate[before:after]
        active = np.flatnonzero(steps >= ACTIVE_FRACTION * steps.mean())
        found.append(Transition(int(before + active[0] + 1), int(before + active[-1] + 1)))
    return found


def _merge(transitions: list[Transition], min_scene_frames: int) -> list[Transition]:
    merged: list[Transition] = []
    for transition in sorted(transitions, key=lambda item: (item.start, item.end)):
        previous_end = merged[-1].end if merged else 0
        if transition.start - previous_end < min_scene_frames:
            start = merged.pop().start if merged else 0
            merged.append(Transition(start, max(transition.end, previous_end)))
        else:
            merged.append(transition)
    return merged


def scenes_from_transitions(transitions: list[Transition], num_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges between transitions; transition frames belong to no scene."""
    bounds = [0]
    for transition in transitions:
        bounds += [transition.start, transition.end]
    bounds.append(num_frames)
    return [(start, min(end, num_frames)) for start, end in zip(bounds[::2], bounds[1::2]) if min(end, num_frames) > start]
