"""What the training test modules share: a folder with the tiny pipeline and synthetic clips (one per test
module, so their outputs never mix), and the tiny training config (CPU, fp32, ZeRO-2, two steps, no export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svd_fast.data.synthetic import translating_texture, write_video
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, save_tiny_pipeline


def tiny_workdir(root: Path, clip_frames: tuple[int, ...] | None = None) -> Path:
    """``root/tiny`` (the tiny pipeline) and ``root/data``: ``clip.mp4`` (one clip's frames) when ``clip_frames`` is
    None, else ``clip{i}.mp4`` of ``clip_frames[i]`` frames translating by (1 + i, 0) px per frame (seed i)."""
    save_tiny_pipeline(root / "tiny")
    (root / "data").mkdir()
    if clip_frames is None:
        write_video(root / "data" / "clip.mp4", translating_texture(TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH), fps=8)
    for index, frames in enumerate(clip_frames or ()):
        texture = translating_texture(frames, TINY_HEIGHT, TINY_WIDTH, shift=(1.0 + index, 0.0), seed=index)
        write_video(root / "data" / f"clip{index}.mp4", texture, fps=8)
    return root


def workdir_fixture(name: str):
    """A module-scoped ``workdir`` fixture: ``tiny`` (the tiny pipeline) and ``data/clip.mp4``."""

    @pytest.fixture(scope="module")
    def workdir(tmp_path_factory) -> Path:
        return tiny_workdir(tmp_path_factory.mktemp(name))

    return workdir


def tiny_config(workdir: Path, out: str, **overrides) -> dict:
    """The tiny config in the sectioned layout, with ``overrides``: ``section.key`` or a top-level key -> value."""
    values = {
        "model": str(workdir / "tiny"), "output_dir": str(workdir / out), "precision": "fp32", "max_steps": 2,
        "data": {"path": str(workdir / "data"), "num_frames": TINY_NUM_FRAMES, "height": TINY_HEIGHT, "width": TINY_WIDTH,
                 "shuffle": False, "num_workers": 0},  # clips decoded in the loop: no worker processes per run
        "optimizer": {"learning_rate": 1e-3}, "deepspeed": {"zero_stage": 2}, "logging": {"export": False},
    }  # fmt: skip
    return with_keys(values, overrides)


def with_keys(values: dict, overrides: dict) -> dict:
    """A copy of the sectioned ``values`` with ``overrides`` (``section.key`` or a top-level key -> value) set."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    for key, value in overrides.items():
        section, dot, name = key.partition(".")
        if dot:
            merged.setdefault(section, {})[name] = value
        else:
            merged[key] = value
    return merged
