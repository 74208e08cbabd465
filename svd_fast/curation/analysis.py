"""One decoding pass per file: transitions, clips and their motion.

:func:`scan_video` decodes every frame once (FFmpeg threads), keeping per frame its presentation time, a
small RGB copy for transition detection and the mean codec motion vector, and, on a 2-FPS grid in time,
a grayscale copy at the flow analysis size and (when OCR runs) the frame's text-candidate crops at the OCR
size (:func:`svd_fast.curation.ocr.text_candidate_crops`: usually none). The RGB and grayscale copies are
written to unnamed temporary files as they are decoded and memory-mapped (disk-backed pages, released after
use: :func:`svd_fast.curation.cuts.release_pages`), so the process memory stays bounded however long the
file. :func:`clips_from_scan` and :func:`measure_motion` turn that into clips (transition frames excluded)
with their motion statistics.

Key frames: a clip's ``key_times`` are its first, middle and last frames (CLIP decodes them by seeking). OCR
reads the first, middle and last grid samples inside the clip instead (each within one grid step, 0.5 s, of
those), whose crops the pass already holds, so OCR needs no second decode; a clip shorter than a grid step
holds no sample, and OCR decodes its key frames by seeking.

Motion columns (all from timestamps, so independent of the frame rate, variable or not):
  flow_mean_px             mean flow magnitude in source pixels per 0.5 s (the paper's 2-FPS step): each pair
                           of consecutive grid samples is scaled by 0.5 s / its actual time gap
  flow_mean_norm           flow_mean_px / source frame diagonal (motion_bucket_id is a monotone function of it)
  flow_px_per_second       flow_mean_px * 2: the mean speed, source pixels per second
  flow_px_per_second_each  the mean speed in each whole second of the clip (list)
  static, static_reason    a clip is static when its codec motion vectors are below the calibrated prefilter
                           threshold, when most of its sampled frames have too little texture to measure motion
                           (black, uniform: texture_level < min_texture), or when flow_mean_norm < static_threshold
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from svd_fast.curation import cuts, flow, ocr
from svd_fast.data.decode import VideoDecodeError, check_file, mean_motion_vector_px, open_video_stream, scaled_size

FLOW_STEP_SECONDS = 0.5


@dataclass
class FileScan:
    times: np.ndarray  # (F,) presentation time of every decoded frame, seconds
    cut_frames: np.ndarray  # (F, h, w, 3) uint8, longer side <= cut_max_side; np.memmap of a temporary file
    codec_motion: np.ndarray  # (F,) mean codec motion vector, source px (NaN where none)
    flow_indices: np.ndarray  # (K,) frame indices of the 2-FPS grid samples
    flow_frames: np.ndarray  # (K, h, w) uint8 luma, longer side <= flow_max_side; np.memmap of a temporary file
    text_crops: list[list[ocr.TextCrop]] | None  # per grid sample, at the OCR size; None: OCR off
    text_frame_shape: tuple[int, int, int] | None  # (H, W, 3) of the frames the crops were taken from
    width: int
    height: int
    fps: float
    codec: str


def _mapped(file: IO[bytes], shape: tuple[int, ...]) -> np.memmap:
    """The uint8 array of ``shape`` written to ``file``, memory-mapped (the mapping outlives the closed file).
    Shared and writable: torch.as_tensor wants a writable array, and :func:`cuts.release_pages` releases only
    shared mappings (the unnamed file is this array's alone)."""
    file.flush()
    return np.memmap(file, np.uint8, mode="r+", shape=shape)


def scan_video(path: str | Path, cut_max_side: int, flow_max_side: int, flow_fps: float, ocr_max_side: int | None = None) -> FileScan:
    """Decode ``path`` once; see the module docstring. ``ocr_max_side`` None: no text crops. A file damaged
    part-way yields the frames before the damage."""
    import av  # noqa: PLC0415 - optional dependency
    from av.video.reformatter import VideoReformatter  # noqa: PLC0415 - PyAV is optional (the data extra)

    path = Path(path)
    check_file(path)
    times, motion, flow_indices, text_crops = [], [], [], []
    text_size = None
    try:
        with av.open(str(path)) as container, tempfile.TemporaryFile() as cut_file, tempfile.TemporaryFile() as flow_file:
            stream = open_video_stream(path, container, motion_vectors=True)
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            codec = stream.codec_context.name
            cut_size = scaled_size(width, height, cut_max_side)
            flow_size = scaled_size(width, height, flow_max_side)
            text_size = scaled_size(width, height, ocr_max_side) if ocr_max_side else None
            next_sample = None
            # One scaler each, reused frame to frame (frame.to_ndarray(width=...) sets up FFmpeg's scaler anew each call).
            to_cut_size, to_flow_size, to_text_size = VideoReformatter(), VideoReformatter(), VideoReformatter()
            try:
                for index, frame in enumerate(container.decode(stream)):
                    time = frame.time if frame.time is not None else index / (fps or 24.0)
                    cut_frame = to_cut_size.reformat(frame, width=cut_size[0], height=cut_size[1], format="rgb24").to_ndarray()
                    cut_file.write(np.ascontiguousarray(cut_frame))
                    times.append(time)
                    motion.append(mean_motion_vector_px(frame))
                    if next_sample is None or time >= next_sample - 1e-6:
                        flow_frame = to_flow_size.reformat(frame, width=flow_size[0], height=flow_size[1], format="gray").to_ndarray()
                        flow_file.write(np.ascontiguousarray(flow_frame))
                        flow_indices.append(index)
                        if text_size:
                            rgb = to_text_size.reformat(frame, width=text_size[0], height=text_size[1], format="rgb24").to_ndarray()
                            text_crops.append(ocr.text_candidate_crops(rgb))
                        next_sample = (time if next_sample is None else next_sample) + 1.0 / flow_fps
                        if next_sample <= time + 1e-6:  # skip the grid points already passed, in one step (a huge flow_fps has ~1e9)
                            next_sample += (math.floor((time + 1e-6 - next_sample) * flow_fps) + 1) / flow_fps
            except av.error.FFmpegError:
                if not times:
                    raise
            if not times:
                raise VideoDecodeError(path, "no decodable frames")
            if width <= 0 or height <= 0:
                raise VideoDecodeError(path, f"no frame size ({width}x{height})")
            cut_frames = _mapped(cut_file, (len(times), cut_size[1], cut_size[0], 3))
            flow_frames = _mapped(flow_file, (len(flow_indices), flow_size[1], flow_size[0]))
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"unreadable by FFmpeg ({error})") from error
    if not fps > 0:
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 24.0
    return FileScan(
        np.asarray(times, dtype=np.float64), cut_frames, np.asarray(motion, dtype=np.float64),
        np.asarray(flow_indices, dtype=np.int64), flow_frames, text_crops if text_size else None,
        (text_size[1], text_size[0], 3) if text_size else None, width, height, fps, codec,
    )


@dataclass
class MotionSettings:
    backend: str
    device: torch.device
    static_threshold: float
    min_texture: float
    codec_static_threshold_px: float | None  # None: no prefilter


def _end_time(scan: FileScan, end: int) -> float:
    if end < len(scan.times):
        return float(scan.times[end])
    # The last frame lasts as long as the one before it (its own duration is rarely stored).
    step = float(scan.times[-1] - scan.times[-2]) if len(scan.times) > 1 else 1.0 / scan.fps
    return float(scan.times[-1]) + step


def clips_from_scan(scan: FileScan, threshold: float, min_scene_frames: int, device: torch.device) -> tuple[list[dict], list[dict]]:
    """(clips, transitions) as manifest-ready dicts; clip frames exclude transition frames."""
    transitions = cuts.detect_transitions(
        scan.cut_frames, scan.times, fps=scan.fps, threshold=threshold, min_scene_frames=min_scene_frames, device=device
    )
    clips = []
    for start, end in cuts.scenes_from_transitions(transitions, len(scan.times)):
        finite = scan.codec_motion[start:end][np.isfinite(scan.codec_motion[start:end])]
        clips.append(
            {
                "start_frame": start,
                "end_frame": end,
                "start_time": float(scan.times[start]),
                "end_time": _end_time(scan, end),
                "codec_mv_mean_px": float(finite.mean()) if finite.size else None,
                "key_times": sorted({float(scan.times[index]) for index in (start, (start + end - 1) // 2, end - 1)}),
            }
        )
    spans = [{"start_frame": item.start, "end_frame": item.end, "start_time": float(scan.times[min(item.start, len(scan.times) - 1)])} for item in transitions]
    return clips, spans


def key_text_crops(scan: FileScan, clip: dict) -> list[list[ocr.TextCrop]] | None:
    """The text crops of the clip's OCR key frames (first, middle and last grid sample inside it), one list per
    frame; None when no grid sample falls inside the clip (or the scan took no crops)."""
    inside = np.flatnonzero((scan.flow_indices >= clip["start_frame"]) & (scan.flow_indices < clip["end_frame"]))
    if scan.text_crops is None or not len(inside):
        return None
    return [scan.text_crops[position] for position in sorted({inside[0], inside[(len(inside) - 1) // 2], inside[-1]})]


def _clip_pairs(scan: FileScan, clip: dict) -> tuple[torch.Tensor, np.ndarray, float] | None:
    """Gray frames (S, h, w) in [0, 1], their times, and source px per analysis px, for one clip; None below 2 frames."""
    start, end = clip["start_frame"], clip["end_frame"]
    inside = (scan.flow_indices >= start) & (scan.flow_indices < end)
    if inside.sum() >= 2:
        frames = torch.from_numpy(scan.flow_frames[inside]).float() / 255.0
        cuts.release_pages(scan.flow_frames)
        return frames, scan.times[scan.flow_indices[inside]], scan.width / scan.flow_frames.shape[2]
    if end - start < 2:
        return None
    # Shorter than one 2-FPS step: its first and last frames, at the cut-detection size.
    ends = [start, end - 1]
    frames = flow.to_gray(scan.cut_frames[ends])
    cuts.release_pages(scan.cut_frames)
    return frames, scan.times[ends], scan.width / scan.cut_frames.shape[2]


def measure_motion(scan: FileScan, clips: list[dict], settings: MotionSettings) -> None:
    """Fill each clip's motion columns (see the module docstring) in place."""
    diagonal = math.hypot(scan.width, scan.height)
    for clip in clips:
        mv = clip.get("codec_mv_mean_px")
        if settings.codec_static_threshold_px is not None and mv is not None and mv < settings.codec_static_threshold_px:
            clip.update(flow_mean_px=0.0, flow_mean_norm=0.0, flow_px_per_second=0.0, flow_px_per_second_each=[], motion_bucket_id=0,
                        static=True, static_reason=f"codec motion vectors {mv:.3g} px < {settings.codec_static_threshold_px:g}",
                        flow_backend="codec-motion-vectors")
            continue
        pairs = _clip_pairs(scan, clip)
        if pairs is None:
            clip["skipped_flow"] = "fewer than 2 frames"
            continue
        frames, times, to_source = pairs
        frames = frames.to(settings.device)
        textured = (flow.texture_level(frames) >= settings.min_texture).cpu().numpy()
        measurable = textured[:-1] & textured[1:]
        magnitudes = np.zeros(len(frames) - 1)
        if measurable.any():
            chosen = torch.from_numpy(np.flatnonzero(measurable)).to(settings.device)
            magnitudes[measurable] = flow.pair_flow_magnitudes(frames[chosen], frames[chosen + 1], settings.backend).cpu().numpy()
        per_step = magnitudes * to_source * FLOW_STEP_SECONDS / np.diff(times)
        flow_px = float(per_step.mean())
        seconds = np.floor(times[:-1] - times[0]).astype(int)
        each = [float(per_step[seconds == second].mean() / FLOW_STEP_SECONDS) for second in np.unique(seconds)]
        clip.update(flow_mean_px=flow_px, flow_mean_norm=flow_px / diagonal, flow_px_per_second=flow_px / FLOW_STEP_SECONDS,
                    flow_px_per_second_each=each, motion_bucket_id=flow.motion_bucket_id(flow_px / diagonal, 1.0 / FLOW_STEP_SECONDS),
                    flow_backend=_backend_name(settings))
        if measurable.mean() < 0.5:
            clip.update(static=True, static_reason=f"too little texture in {int((~textured).sum())} of {len(textured)} sampled frames")
        elif flow_px / diagonal < settings.static_threshold:
            clip.update(static=True, static_reason=f"flow_mean_norm {flow_px / diagonal:.3g} < static_threshold {settings.static_threshold:g}")
        else:
            clip.update(static=False, static_reason=None)


def _backend_name(settings: MotionSettings) -> str:
    if settings.backend != "auto":
        return settings.backend
    return "torch" if settings.device.type == "cuda" else "opencv"
