"""Small synthetic videos with known content, for tests, benchmarks and the demo (no downloads).

Frames are uint8 arrays of shape (F, H, W, 3). ``write_video`` encodes them with PyAV (FFmpeg).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

# Codec name per container, as FFmpeg/PyAV spell them.
CODECS = {"vp9": ("libvpx-vp9", ".webm"), "vp8": ("libvpx", ".webm"), "h264": ("libx264", ".mp4"), "mjpeg": ("mjpeg", ".avi")}


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24, codec: str = "h264", lossless: bool = False) -> Path:
    """Encode ``frames`` (F, H, W, 3) uint8 RGB to ``path`` with ``codec`` (a key of CODECS); returns the path.

    ``lossless`` asks the encoder for (near-)lossless output so decoded pixels can be compared tightly.
    """
    import av  # noqa: PLC0415 - optional dependency

    if codec not in CODECS:
        raise ValueError(f"write_video: codec must be one of {sorted(CODECS)}, got {codec!r}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: height and width must be even for yuv420p, got {frames.shape[1:3]}")
    path = Path(path)
    codec_name, _suffix = CODECS[codec]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec_name, rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if lossless and codec == "h264":
            stream.options = {"qp": "0", "preset": "ultrafast"}
        elif lossless and codec == "vp9":
            stream.options = {"lossless": "1"}
        elif codec == "mjpeg":
            stream.options = {"q:v": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def smooth_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (float in [0, 1]) that tiles; its detail survives video compression."""
    rng = np.random.default_rng(seed)
    spectrum = rng.normal(size=(3, height, width)) + 1j * rng.normal(size=(3, height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    spectrum *= np.exp(-((fy**2 + fx**2) / (2 * 0.04**2)))  # keep low frequencies: blobs a few pixels wide
    texture = np.fft.ifft2(spectrum).real
    texture -= texture.min(axis=(1, 2), keepdims=True)
    texture /= texture.max(axis=(1, 2), keepdims=True)
    return texture.transpose(1, 2, 0)


def translating_texture(num_frames: int, height: int, width: int, shift: tuple[float, float] = (0.0, 2.0), seed: int = 0) -> np.ndarray:
    """Frames of a textured plane moving by ``shift`` = (dy, dx) pixels per frame (integer shifts are exact)."""
    texture = smooth_texture(height, width, seed)
    frames = []
    for index in range(num_frames):
        dy, dx = int(round(shift[0] * index)), int(round(shift[1] * index))
        frames.append(np.roll(texture, (dy, dx), axis=(0, 1)))
    return (np.stack(frames) * 255).round().astype(np.uint8)


def scenes_with_cuts(scene_lengths: list[int], height: int, width: int, shift: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, list[int]]:
    """Concatenated moving-texture scenes; returns the frames and the frame indices where each new scene starts."""
    scenes, cuts, start = [], [], 0
    for scene_index, length in enumerate(scene_lengths):
        scenes.append(translating_texture(length, height, width, shift, seed=1000 + scene_index))
        if scene_index:
            cuts.append(start)
        start += length
    return np.concatenate(scenes), cuts


def blend(first: np.ndarray, second: np.ndarray, length: int) -> np.ndarray:
    """``length`` frames dissolving from the last frame of ``first`` to the first of ``second`` (both excluded)."""
    weights = (np.arange(1, length + 1) / (length + 1))[:, None, None, None]
    return ((1 - weights) * first[-1].astype(np.float64) + weights * second[0].astype(np.float64)).round().astype(np.uint8)


def fade(frame: np.ndarray, length: int, to_black: bool) -> np.ndarray:
    """``length`` frames fading ``frame`` to black (or in from black), the end points excluded."""
    weights = np.arange(1, length + 1) / (length + 1)
    weights = (1 - weights if to_black else weights)[:, None, None, None]
    return (weights * frame.astype(np.float64)).round().astype(np.uint8)


def crossing_object(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A static textured shot crossed once, left to right, by a flat-coloured box as tall as 60% of the frame."""
    frames = np.repeat((smooth_texture(height, width, seed)[None] * 255).round().astype(np.uint8), num_frames, axis=0)
    box_height, box_width = int(height * 0.6), width // 3
    top = (height - box_height) // 2
    for index in range(num_frames):
        left = int(round(-box_width + (width + box_width) * index / max(num_frames - 1, 1)))
        frames[index, top : top + box_height, max(0, left) : max(0, left + box_width)] = (200, 40, 30)
    return frames


def write_video_with_times(path: str | Path, frames: np.ndarray, times: np.ndarray) -> Path:
    """H.264 MP4 whose frame ``i`` is presented at ``times[i]`` seconds (millisecond timestamps): variable frame rate."""
    import av  # noqa: PLC0415 - optional dependency

    frames = np.asarray(frames)
    times = np.asarray(times, dtype=np.float64)
    if len(times) != len(frames) or np.any(np.diff(times) <= 0):
        raise ValueError("write_video_with_times: times must be increasing, one per frame")
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=1000)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, time in zip(frames, times):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = int(round(time * 1000))
            video_frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
