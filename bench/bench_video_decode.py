"""Video decoding throughput: PyAV (FFmpeg, CPU) vs DALI's CPU decoder (VP9) vs DALI on the GPU (H.264), and
the cost of one epoch of VideoClipDataset over a 600-frame H.264 file relative to one plain PyAV decode of it.

Frames/s is recorded in extra_info ("frames_per_second", "clips_per_second"). CPU shapes are small so
the run stays short; the GPU cases use 576x1024 and 1080p as SVD training does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from svd_fast.data import VideoClipDataset, dali_clip_loader, decode_frames, synthetic

CLIP_FRAMES = 14


def _video(tmp_path_factory: pytest.TempPathFactory, codec: str, height: int, width: int, frames: int) -> Path:
    folder = tmp_path_factory.mktemp(f"decode_{codec}_{height}")
    content = synthetic.translating_texture(frames, height, width, (1.0, 3.0))
    suffix = synthetic.CODECS[codec][1]
    return synthetic.write_video(folder / f"clip{suffix}", content, fps=24, codec=codec)


@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_cpu_decode_vp9(benchmark, timed, device, tmp_path_factory, backend: str) -> None:
    height, width, frames = 144, 256, 48
    path = _video(tmp_path_factory, "vp9", height, width, frames)
    indices = list(range(frames))
    timed(lambda: decode_frames(path, indices, backend=backend), codec="vp9", resolution=f"{height}x{width}")
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["frames_per_second"] = round(frames / seconds, 1)
    benchmark.extra_info["clips_per_second"] = round(frames / CLIP_FRAMES / seconds, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI GPU decoding needs a CUDA device (none present)")
@pytest.mark.parametrize(("height", "width"), [(576, 1024), (1080, 1920)])
def test_gpu_decode_h264(benchmark, timed, tmp_path_factory, height: int, width: int) -> None:
    clips = 8
    path = _video(tmp_path_factory, "h264", height, width, CLIP_FRAMES * clips)

    def decode_all() -> int:
        return sum(batch["pixel_values"].shape[0] for batch in dali_clip_loader([path], 2, CLIP_FRAMES, (height, width), shuffle=False))

    timed(decode_all, codec="h264", resolution=f"{height}x{width}")
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["frames_per_second"] = round(clips * CLIP_FRAMES / seconds, 1)
    benchmark.extra_info["clips_per_second"] = round(clips / seconds, 2)


@pytest.mark.parametrize(("height", "width"), [(288, 512), (720, 1280)])
def test_dataset_epoch_vs_plain_decode(benchmark, alternating_medians, tmp_path_factory, height: int, width: int) -> None:
    """Target: one epoch of 14-frame clips costs at most 2x one plain PyAV decode (each file decoded once)."""
    import av

    frames = 600 if height < 720 else 120  # 720p: kept short, the frames are generated in memory
    texture = (synthetic.smooth_texture(height, width, seed=0) * 255).astype(np.uint8)
    content = np.stack([np.roll(texture, (index, 3 * index), axis=(0, 1)) for index in range(frames)])
    path = synthetic.write_video(tmp_path_factory.mktemp(f"epoch_{height}") / "clip.mp4", content, fps=24)

    def plain_decode() -> int:
        with av.open(str(path)) as container:
            return sum(1 for frame in container.decode(video=0) if frame.to_ndarray(format="rgb24") is not None)

    def dataset_epoch() -> int:
        return sum(1 for _ in VideoClipDataset([path], num_frames=CLIP_FRAMES, size=(256, 256), backend="pyav"))

    medians = alternating_medians({"plain_decode": plain_decode, "dataset_epoch": dataset_epoch})
    benchmark.extra_info.update(
        frames=frames, resolution=f"{height}x{width}", clip_frames=CLIP_FRAMES, seconds=medians,
        ratio_vs_plain_decode=round(medians["dataset_epoch"] / medians["plain_decode"], 2),
    )
