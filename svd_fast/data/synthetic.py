"""Small synthetic videos with known content, for tests, benchmarks and the demo (no downloads).

Frames are uint8 arrays of shape (F, H, W, 3). ``write_video`` encodes them with PyAV (FFmpeg).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

# Codec name per container, as FFmpeg/PyAV spell them.
CODECS = {"vp9": ("libvpx-vp9", ".webm"), "vp8": ("libvpx", ".webm"), "h264": ("libx264", ".mp4"), "mjpeg": ("mjpeg", ".avi")}


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24, codec: str = "h264", lossless: bool = False, crf: int | None = None) -> Path:
    """Encode ``frames`` (F, H, W, 3) uint8 RGB to ``path`` with ``codec`` (a key of CODECS); returns the path.

    ``lossless`` asks the encoder for (near-)lossless output so decoded pixels can be compared tightly; ``crf``
    (H.264 only) sets x264's constant rate factor (23 is its default; 35 and up: heavy compression noise).
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
        elif crf is not None and codec == "h264":
            stream.options = {"crf": str(crf)}
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


# ---------------------------------------------------------------- footage for the motion score (known motion)


def random_texture(height: int, width: int, scale: int = 1, seed: int = 0, colour: bool = False) -> np.ndarray:
    """Uniform random grey (or RGB) levels in blocks of ``scale`` x ``scale`` px, (H, W, 3) uint8: high-frequency
    texture like gravel, foliage or fabric, the worst case for a flow solver that mistakes texture for structure."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-height // scale), -(-width // scale), 3 if colour else 1), dtype=np.uint8)
    texture = np.repeat(np.repeat(blocks, scale, axis=0), scale, axis=1)[:height, :width]
    return np.ascontiguousarray(np.broadcast_to(texture, (height, width, 3)))


def smooth_scene(height: int, width: int, seed: int = 0, feature: int = 8) -> np.ndarray:
    """A very smooth RGB scene (sky, walls, skin: blobs ~4 x ``feature`` px wide), (H, W, 3) uint8: where grain,
    not the scene, holds the fine detail a flow solver sees."""
    import cv2  # noqa: PLC0415 - in the data extra, as PyAV is

    small = smooth_texture(-(-height // feature), -(-width // feature), seed).astype(np.float32)
    return (np.clip(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1) * 255).round().astype(np.uint8)


def panning(image: np.ndarray, num_frames: int, step: int = 1) -> np.ndarray:
    """``image`` (H, W, 3) moving right ``step`` whole px per frame (wrapping around), (F, H, W, 3)."""
    return np.stack([np.roll(image, step * index, axis=1) for index in range(num_frames)])


def still_shot(background: np.ndarray, num_frames: int) -> np.ndarray:
    """``num_frames`` copies of one (H, W, 3) uint8 frame."""
    return np.repeat(background[None], num_frames, axis=0)


def moving_square(background: np.ndarray, num_frames: int, size: int = 30, step: tuple[int, int] = (0, 36), start: tuple[int, int] | None = None,
                  colour: tuple[int, int, int] = (230, 60, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A flat ``size`` px square moving ``step`` = (dy, dx) px per frame over a still ``background``: the frames
    (F, H, W, 3) uint8 and the mask (F, H, W) of the pixels the square covers in each frame."""
    height, width = background.shape[:2]
    top, left = start if start is not None else (height // 2 - size // 2, width // 8)
    frames = still_shot(background, num_frames).copy()
    covered = np.zeros(frames.shape[:3], bool)
    for index in range(num_frames):
        y, x = top + step[0] * index, left + step[1] * index
        covered[index, max(0, y) : max(0, y + size), max(0, x) : max(0, x + size)] = True
        frames[index][covered[index]] = colour
    return frames, covered


def add_grain(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Independent Gaussian grain of ``sigma`` (in [0, 1] grey levels, e.g. 4/255) in every frame and channel,
    rounded to uint8: sensor noise or film grain."""
    noise = np.random.default_rng(seed).normal(0.0, sigma * 255.0, size=frames.shape)
    return np.clip(frames.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def flash(frames: np.ndarray, index: int, gain: float = 4.0) -> np.ndarray:
    """A copy of ``frames`` whose frame ``index`` is brightened ``gain`` times and clipped at 255: a photo flash
    or lightning that saturates most of the frame."""
    flashed = frames.copy()
    flashed[index] = np.clip(frames[index].astype(np.float64) * gain + 40, 0, 255).round().astype(np.uint8)
    return flashed
