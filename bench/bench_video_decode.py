"""Video decoding throughput: PyAV (FFmpeg, CPU) vs DALI's CPU decoder (VP9) vs DALI on the GPU (H.264).

Frames/s is recorded in extra_info ("frames_per_second", "clips_per_second"). CPU shapes are small so
the run stays short; the GPU cases use 576x1024 and 1080p as SVD training does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from svd_fast.data import synthetic
from svd_fast.data.video import dali_clip_loader, decode_frames

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
