"""What the training test modules share: a folder with the tiny pipeline and one synthetic clip (one per test
module, so their outputs never mix), and the tiny training config (CPU, fp32, ZeRO-2, two steps, no export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svd_fast.data.synthetic import translating_texture, write_video
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, save_tiny_pipeline


def workdir_fixture(name: str):
    """A module-scoped ``workdir`` fixture: ``tiny`` (the tiny pipeline) and ``data/clip.mp4``."""

    @pytest.fixture(scope="module")
    def workdir(tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp(name)
        save_tiny_pipeline(root / "tiny")
        (root / "data").mkdir()
        write_video(root / "data" / "clip.mp4", translating_texture(TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH), fps=8)
        return root

    return workdir


def tiny_config(workdir: Path, out: str, **overrides) -> dict:
    values = dict(
        model=str(workdir / "tiny"), data=str(workdir / "data"), output_dir=str(workdir / out),
        num_frames=TINY_NUM_FRAMES, height=TINY_HEIGHT, width=TINY_WIDTH, precision="fp32", zero_stage=2,
        learning_rate=1e-3, shuffle=False, max_steps=2, export=False,
    )
    values.update(overrides)
    return values
