"""Reading conditioning images and writing generated frames as .mp4, .gif or a folder of PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_SUFFIXES = (".mp4", ".gif")


class MediaError(ValueError):
    """An input image cannot be read or an output path cannot be written."""


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; MediaError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"--image: {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(f"--image: {path} is not a readable image ({error})") from error


def output_kind(path: str | Path) -> str:
    """"mp4", "gif" or "frames" (a folder) for an output path; MediaError for other extensions."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix:
        raise MediaError(f"--out: unsupported extension {suffix!r}; use .mp4, .gif or a folder name")
    return "frames"


def write_frames(frames: Sequence[Image.Image] | np.ndarray, path: str | Path, fps: float = 7) -> Path:
    """Write frames (PIL images or uint8 (F, H, W, 3)) to ``path`` as decided by :func:`output_kind`."""
    path = Path(path)
    kind = output_kind(path)
    images = [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in frames]
    if not images:
        raise MediaError("write_frames: no frames to write")
    if kind == "frames":
        path.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(path / f"frame_{index:04d}.png")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gif":
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    _write_mp4(np.stack([np.asarray(image.convert("RGB")) for image in images]), path, fps)
    return path


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    import av  # noqa: PLC0415 - optional dependency

    # H.264 in yuv420p needs even sizes: pad by replicating the last row/column where odd.
    pad_y, pad_x = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_y or pad_x:
        frames = np.pad(frames, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
