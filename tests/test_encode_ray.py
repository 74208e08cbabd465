"""`svd-fast encode --ray local`: Ray Data actors (2, on a local Ray cluster) write the same latents folder as the
local path, resume by source, and record unusable files the same way. CPU, tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_fixtures import tiny_workdir

from svd_fast import cli
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH
from svd_fast.training.latents import COMPLETE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tiny_workdir(tmp_path_factory.mktemp("encode_ray"), (TINY_NUM_FRAMES, 2 * TINY_NUM_FRAMES, TINY_NUM_FRAMES))  # clip1 holds two clips
    (root / "data" / "broken.mp4").write_bytes(b"\x00not a video" * 10)
    return root


def _encode(workdir: Path, out: Path, *extra: str) -> int:
    return cli.main(["encode", "--data", str(workdir / "data"), "--model", str(workdir / "tiny"), "--out", str(out),
                     "--num-frames", str(TINY_NUM_FRAMES), "--height", str(TINY_HEIGHT), "--width", str(TINY_WIDTH),
                     "--device", "cpu", *extra])


def _files(folder: Path) -> dict[str, Path]:
    return {str(path.relative_to(folder)): path for path in sorted(folder.rglob("*")) if path.is_file()}


def test_ray_actors_write_what_the_local_path_writes_and_resume(workdir: Path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each single-CPU Ray actor runs: the same reduction order, so the same bits
    try:
        assert _encode(workdir, workdir / "local") == 0
    finally:
        torch.set_num_threads(threads)
    local_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _encode(workdir, workdir / "ray", "--ray", "local", "--actors", "2") == 0
    ray_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert local_summary["clips"] == ray_summary["clips"] == 4 and ray_summary["encoded_sources"] == 4
    assert [path for path, _ in ray_summary["skipped"]] == [str(workdir / "data" / "broken.mp4")] == [p for p, _ in local_summary["skipped"]]
    local, ray = _files(workdir / "local"), _files(workdir / "ray")
    assert local.keys() == ray.keys() and sum(name.startswith("clips/") for name in local) == 4
    for name, path in local.items():
        if name.endswith(".pt"):
            local_clip, ray_clip = (torch.load(p, weights_only=True) for p in (path, ray[name]))
            assert local_clip.keys() == ray_clip.keys()
            for key, value in local_clip.items():
                assert torch.equal(value, ray_clip[key]) if isinstance(value, torch.Tensor) else value == ray_clip[key], (name, key)
        else:
            assert path.read_text() == ray[name].read_text(), name

    # Interrupted: one clip of the two-clip source and the completion marker are gone. Only that source is redone.
    (redone,) = (workdir / "ray" / "clips").glob("clip_*_0001.pt")  # the second clip of the only two-clip source
    kept = {name: path.stat().st_mtime_ns for name, path in ray.items() if name.startswith("clips/") and path != redone}
    redone.unlink()
    (workdir / "ray" / COMPLETE).unlink()
    assert _encode(workdir, workdir / "ray", "--ray", "local", "--actors", "2") == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["encoded_sources"] == 1 and resumed["clips"] == 4 and redone.is_file()
    assert all((workdir / "ray" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())


@pytest.mark.parametrize(("arguments", "fragment"), [(["--actors", "0"], "--actors"), (["--ray", "cluster"], "--ray")])
def test_bad_ray_options_are_one_line(workdir: Path, arguments: list[str], fragment: str, capsys) -> None:
    assert _encode(workdir, workdir / "bad", *arguments) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("svd-fast encode: error: "), lines
    assert not (workdir / "bad").exists()  # refused before any folder or model
