"""The demo's files, each written atomically (svd_fast._io: a temporary file in the same folder, then os.replace),
so an interrupted run never leaves a truncated video, image or summary behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from svd_fast import _io
from svd_fast.data.synthetic import write_video as encode
from svd_fast.demo.world import DIRECTIONS

VIEW_SCALE = 4  # videos and figures show the 32x32 frames enlarged, pixels kept sharp


def enlarge(frames: np.ndarray, scale: int = VIEW_SCALE) -> np.ndarray:
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    return _io.write_file(path, lambda temporary: encode(temporary, enlarge(frames), fps=fps, codec="h264"))


def write_png(path: Path, image: np.ndarray) -> Path:
    return _io.write_file(path, lambda temporary: Image.fromarray(image).save(temporary))


def write_json(path: Path, value: Any) -> Path:
    return _io.write_json(path, value)


def _pyplot():
    import matplotlib  # noqa: PLC0415 - matplotlib is optional, only for the demo figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - matplotlib is optional, only for the demo figures

    return plt


def plot_comparison(path: Path, rows: list[tuple[str, np.ndarray]]) -> Path:
    """One row per (label, frames (F, H, W, 3) uint8), one column per frame."""
    plt = _pyplot()
    columns = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 1.2, 1.15 * len(rows)), dpi=100, squeeze=False)
    for row, (label, frames) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            axis.imshow(frames[column], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"frame {column}", fontsize=8)
        axes[row][0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    figure.tight_layout()
    _io.write_file(path, lambda temporary: figure.savefig(temporary))
    plt.close(figure)
    return path


def _along(track: list[list[float] | None], axis_index: int, start: float) -> np.ndarray:
    return np.array([np.nan if point is None else point[axis_index] - start for point in track])


def plot_motion(path: Path, entries: list[dict[str, Any]], buckets: dict[str, int]) -> Path:
    """One panel per held-out first frame: the disk's centroid along its colour's direction of motion (pixels from
    where it starts in the conditioning frame) per frame, generated at the low and the high bucket (solid) against
    the ground-truth slow and fast continuations (dashed). Frames where the disk vanished are gaps."""
    plt = _pyplot()
    by_frame: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_frame.setdefault(entry["first_frame"], []).append(entry)
    columns = min(4, len(by_frame))
    rows = -(-len(by_frame) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.6 * rows), dpi=100, squeeze=False, sharex=True, sharey=True)
    styles = {"low": ("tab:blue", "slow"), "high": ("tab:orange", "fast")}
    for axis, (name, pair) in zip(axes.flat, by_frame.items()):
        for entry in pair:
            axis_index = 0 if DIRECTIONS[entry["colour"]][0] else 1
            start = entry["reference_centroid_track"][0][axis_index]
            colour, speed = styles[entry["bucket"]]
            frames = np.arange(len(entry["centroid_track"]))
            axis.plot(frames, _along(entry["reference_centroid_track"], axis_index, start), "--", color=colour, linewidth=1.2,
                      label=f"ground truth {speed}")
            axis.plot(frames, _along(entry["centroid_track"], axis_index, start), "o-", color=colour, linewidth=1.8, markersize=3,
                      label=f"generated, bucket {buckets[entry['bucket']]}")
        axis.set_title(f"{name} ({pair[0]['colour']})", fontsize=8)
        axis.grid(True, alpha=0.3)
    for axis in axes.flat[len(by_frame) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("frame", fontsize=8)
    for axis in axes[:, 0]:
        axis.set_ylabel("px along the motion\n(red: right, blue: down)", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="upper left")
    figure.tight_layout()
    _io.write_file(path, lambda temporary: figure.savefig(temporary))
    plt.close(figure)
    return path


def plot_losses(path: Path, curves: dict[str, list[float]]) -> Path:
    """Each training loss per step (log scale) with its running mean: single steps draw one random noise level
    each and jump by 10x, the running mean shows whether the model learns."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.5), dpi=100, squeeze=False)
    for axis, (title, losses) in zip(axes[0], curves.items()):
        steps = np.arange(1, len(losses) + 1)
        window = max(1, min(50, len(losses) // 10))
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps, losses, linewidth=0.6, alpha=0.35, label="per step")
        axis.plot(steps[window - 1 :], running, linewidth=2.0, label=f"running mean of {window}")
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    _io.write_file(path, lambda temporary: figure.savefig(temporary))
    plt.close(figure)
    return path
