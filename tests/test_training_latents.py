"""Precomputed latents: `svd-fast encode` is resumable and its output trains to the same losses as encoding on the
fly with the same seed; an unfinished or mismatched latents folder is refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_fixtures import tiny_workdir

from svd_fast import cli
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH
from svd_fast.training import train
from svd_fast.training.latents import COMPLETE


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("training_latents"), (TINY_NUM_FRAMES, TINY_NUM_FRAMES))


def _encode(workdir: Path, out: Path) -> int:
    return cli.main(["encode", "--data", str(workdir / "data"), "--model", str(workdir / "tiny"), "--out", str(out),
                     "--num-frames", str(TINY_NUM_FRAMES), "--height", str(TINY_HEIGHT), "--width", str(TINY_WIDTH), "--device", "cpu"])


def test_precomputed_latents_train_like_on_the_fly_encoding(workdir: Path, capsys) -> None:
    out = workdir / "latents"
    assert _encode(workdir, out) == 0
    clips = sorted((out / "clips").glob("*.pt"))
    assert json.loads((out / COMPLETE).read_text())["clips"] == len(clips) >= 2
    # Interrupted run: a clip and the completion marker are gone; the rerun redoes only that clip.
    kept = clips[0].stat().st_mtime_ns
    clips[-1].unlink()
    (out / COMPLETE).unlink()
    assert _encode(workdir, out) == 0
    assert clips[-1].is_file() and clips[0].stat().st_mtime_ns == kept and (out / COMPLETE).is_file()
    capsys.readouterr()

    common = {"model": str(workdir / "tiny"), "precision": "fp32", "max_steps": 3, "use_svd_fast_kernels": False, "device": "cpu",
              "optimizer": {"learning_rate": 1e-3}, "logging": {"export": False}}
    geometry = {"num_frames": TINY_NUM_FRAMES, "height": TINY_HEIGHT, "width": TINY_WIDTH, "shuffle": False}
    on_the_fly = train(dict(common, data={"path": str(workdir / "data"), **geometry}, output_dir=str(workdir / "fly")))
    precomputed = train(dict(common, data={"latents_dir": str(out), **geometry}, output_dir=str(workdir / "pre")))
    assert precomputed.losses == pytest.approx(on_the_fly.losses, rel=1e-6, abs=0)


def test_unfinished_or_mismatched_latents_are_refused(workdir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.json"
    data = {"latents_dir": str(tmp_path / "none"), "num_frames": TINY_NUM_FRAMES, "height": TINY_HEIGHT, "width": TINY_WIDTH}
    values = {"model": str(workdir / "tiny"), "output_dir": str(tmp_path / "out"), "device": "cpu", "data": data}
    config.write_text(json.dumps(values))
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "latents_dir" in capsys.readouterr().err
    assert _encode(workdir, tmp_path / "lat") == 0
    config.write_text(json.dumps(dict(values, data=dict(data, latents_dir=str(tmp_path / "lat"), num_frames=TINY_NUM_FRAMES - 2))))
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "num_frames" in capsys.readouterr().err
    assert cli.main(["encode", "--data", str(tmp_path / "missing"), "--model", str(workdir / "tiny"), "--out", str(tmp_path / "x")]) == 2
