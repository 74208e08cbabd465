"""The `svd-fast` command line: help for every command, make-tiny + generate end to end, errors, the demo."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svd_fast import _io
from svd_fast.cli import COMMANDS, build_parser, main

# PyAV is not on every machine that runs the GPU tests (the GPU image lacks it): skip this module there.
av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["make-tiny", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "condition.png"
    Image.fromarray((np.random.default_rng(1).random((80, 100, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", [name.replace("_", "-") for name in COMMANDS])
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_generate_writes_playable_mp4_and_gif(tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "out.mp4"
    assert main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(video), "--steps", "2", "--frames", "6"]) == 0
    assert "peak memory" in capsys.readouterr().out
    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)
    gif = tmp_path / "out.gif"
    assert main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(gif), "--steps", "1", "--no-optimize"]) == 0
    with Image.open(gif) as animation:
        assert animation.n_frames == 8 and animation.size == (64, 64)


def test_generate_frames_folder_in_subprocess(tiny_model: Path, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames"
    result = subprocess.run(
        [sys.executable, "-m", "svd_fast.cli", "generate", "--model", str(tiny_model), "--image", str(image), "--out", str(out), "--steps", "1", "--frames", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == [_io.MARKER, "frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert json.loads(result.stdout.strip().splitlines()[-1])["backends_used"]["edm_euler_step"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "missing-folder/"}, "does not exist"),
        ({"--model": "EMPTY"}, "model_index.json"),
        ({"--image": "missing.png"}, "--image"),
        ({"--image": "NOT_AN_IMAGE"}, "not a readable image"),
        ({"--frames": "0"}, "--frames"),
        ({"--height": "60"}, "--height must be a positive multiple of 8"),
        ({"--out": "clip.avi"}, "unsupported extension"),
        pytest.param(
            {"--attention": "flash-attn"}, "flash-attn is not installed",
            marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"),
        ),
        pytest.param(
            {"--cuda-graphs": None}, "--cuda-graphs needs --device cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is CUDA here"),
        ),
    ],
)
def test_generate_errors_are_one_clear_line(tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str) -> None:
    arguments = {"--model": str(tiny_model), "--image": str(image), "--out": str(tmp_path / "x.mp4")}
    for key, value in change.items():
        if value == "EMPTY":
            (tmp_path / "empty").mkdir()
            value = str(tmp_path / "empty")
        elif value == "NOT_AN_IMAGE":
            (tmp_path / "fake.png").write_text("not an image")
            value = str(tmp_path / "fake.png")
        elif key in ("--model", "--image", "--out"):
            value = str(tmp_path / value)
        arguments[key] = value
    flags = [item for key, value in arguments.items() for item in ((key,) if value is None else (key, value))]
    code = main(["generate", *flags, "--steps", "1"])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error and "Traceback" not in error


def test_make_tiny_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["make-tiny", str(tmp_path)]) == 2
    assert (tmp_path / "keep.txt").read_text() == "user data"
