"""Reading conditioning images and writing generated frames as .mp4, .gif or a folder of PNGs.

Every output is written with svd_fast._io: under a temporary name in its destination folder, moved into place
with os.replace only when complete (a failure never leaves a half-written video or frame folder under the
output's name), and a frames folder only ever replaces an earlier svd-fast frames folder, never a folder of
the user's (:func:`check_output`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from svd_fast import _io

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 16
PARTIAL_PREFIX = _io.PARTIAL_PREFIX
remove_partials = _io.remove_partials


class MediaError(ValueError):
    """An input image cannot be read or an output path cannot be written."""


def load_image(path: str | Path, max_size: tuple[int, int] | None = None) -> Image.Image:
    """The image at ``path`` as RGB; MediaError naming the file when it is missing, unreadable or smaller
    than MIN_IMAGE_SIDE pixels a side. With ``max_size`` (width, height), an image with more than twice
    as many pixels is shrunk to that size while decoding (JPEG draft mode) and before any conversion, so a
    huge photo costs what its output size costs (the pipeline resizes to the output size anyway)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"--image: {path} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if min(width, height) < MIN_IMAGE_SIDE:
                raise MediaError(f"--image: {path} is {width}x{height} pixels; it must be at least {MIN_IMAGE_SIDE} a side")
            if max_size is not None and width * height > 2 * max_size[0] * max_size[1]:
                image.draft("RGB", max_size)
                return image.convert("RGB").resize(max_size, Image.Resampling.LANCZOS)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise MediaError(f"--image: {path} is not a readable image ({error})") from error


def output_kind(path: str | Path) -> str:
    """"mp4", "gif" or "frames" (a folder) for an output path; MediaError for other extensions."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix:
        raise MediaError(f"--out: unsupported extension {suffix!r}; use .mp4, .gif or a folder name")
    return "frames"


def check_output(path: str | Path, inputs: Iterable[str | Path] = ()) -> str:
    """The kind of ``path`` (:func:`output_kind`) once it is known to be writable without destroying anything:
    not an existing folder where a file goes, and a frames folder only where svd_fast._io.check_output_folder
    allows (never ``''``, ``.``, ``..``, the current folder, an input's folder or a folder svd-fast did not
    write). MediaError saying why not."""
    kind = output_kind(path)
    raw = str(path)
    try:
        if kind == "frames":
            _io.check_output_folder(path, "frames", inputs)
        elif Path(raw).is_dir():
            raise MediaError(f"--out {raw} is an existing folder; a {kind} output is a file (pass a file name)")
    except _io.OutputPathError as error:
        raise MediaError(str(error)) from None
    return kind


def write_frames(frames: Sequence[Image.Image] | np.ndarray, path: str | Path, fps: float = 7, inputs: Iterable[str | Path] = ()) -> Path:
    """Write frames (PIL images or uint8 (F, H, W, 3)) to ``path`` as decided by :func:`output_kind`,
    atomically (see the module docstring); ``inputs`` (the files the frames were made from) are never in the
    folder replaced."""
    path = Path(path)
    inputs = list(inputs)
    kind = check_output(path, inputs)
    if not fps > 0:
        raise MediaError(f"write_frames: fps must be > 0, got {fps!r}")
    images = [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in frames]
    if not images:
        raise MediaError("write_frames: no frames to write")
    if kind == "frames":

        def write_pngs(folder: Path) -> None:
            for index, image in enumerate(images):
                image.save(folder / f"frame_{index:04d}.png")

        try:
            return _io.replace_folder(path, "frames", write_pngs, inputs)
        except _io.OutputPathError as error:
            raise MediaError(str(error)) from None
    if kind == "gif":
        return _io.write_file(path, lambda temporary: images[0].save(
            temporary, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0))
    return _io.write_file(path, lambda temporary: _write_mp4(np.stack([np.asarray(image.convert("RGB")) for image in images]), temporary, fps))


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    import av  # noqa: PLC0415 - optional dependency

    # H.264 in yuv420p needs even sizes: pad by replicating the last row/column where odd.
    pad_y, pad_x = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_y or pad_x:
        frames = np.pad(frames, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
