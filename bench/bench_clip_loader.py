"""Training loader throughput (clips/s): clips decoded in the training loop (``num_workers: 0``) against
DataLoader workers (svd_fast.data.WorkerClips, 2 workers), side by side in alternating rounds of one run.

Data: 8 generated H.264 files of 56 frames at 288x512 (4 clips of 14 frames each, 32 clips an epoch), cropped to
256x256 as training does. The workers are started once (persistent, as in training); each round is one epoch.
A consumer that spends ``work_ms`` per clip (a training step's stand-in) shows the overlap workers give.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from svd_fast.data import VideoClipDataset, WorkerClips, synthetic

CLIP_FRAMES, FILES, FRAMES, HEIGHT, WIDTH = 14, 8, 56, 288, 512


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("loader")
    texture = (synthetic.smooth_texture(HEIGHT, WIDTH, seed=0) * 255).astype(np.uint8)
    paths = []
    for index in range(FILES):
        content = np.stack([np.roll(texture, (index + frame, 3 * frame), axis=(0, 1)) for frame in range(FRAMES)])
        paths.append(synthetic.write_video(folder / f"clip{index}.mp4", content, fps=24))
    return paths


@pytest.mark.parametrize("work_ms", [0, 100])
def test_loader_workers_vs_in_loop(benchmark, alternating_medians, videos, work_ms: int) -> None:
    settings = dict(num_frames=CLIP_FRAMES, size=(256, 256), random_crop=True, shuffle=True, backend="pyav")
    in_loop = VideoClipDataset(videos, **settings)
    workers = WorkerClips(VideoClipDataset(videos, **settings), num_workers=2)
    epoch = iter(range(1_000_000))

    def consume(clips) -> int:
        clips.set_epoch(next(epoch))
        count = 0
        for _ in clips:
            time.sleep(work_ms / 1000)
            count += 1
        assert count == FILES * FRAMES // CLIP_FRAMES
        return count

    consume(workers)  # start the persistent workers outside the timed rounds
    medians = alternating_medians({"in_loop": lambda: consume(in_loop), "workers_2": lambda: consume(workers)})
    clips = FILES * FRAMES // CLIP_FRAMES
    benchmark.extra_info.update(
        clips_per_epoch=clips, work_ms_per_clip=work_ms, seconds=medians,
        clips_per_second={name: round(clips / seconds, 2) for name, seconds in medians.items()},
        speedup_workers_vs_in_loop=round(medians["in_loop"] / medians["workers_2"], 2),
    )
