"""No command deletes or moves a file it did not write: svd_fast._io replaces or fills a folder only when it is
new, empty or marked as svd-fast's output of the same kind (never the current folder, its parents or an
input's folder), writes every file atomically with the modes the umask asks for, and locks outputs against a
second run. Each command is tried with a user's file in its target folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svd_fast import _io, media
from svd_fast.cli import main
from svd_fast.curation import manifest

FRAMES = np.zeros((2, 16, 16, 3), np.uint8)


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "precious.txt"
    path.write_text("the user's work")
    return path


def _one_line_usage_error(code: int, capsys: pytest.CaptureFixture, command: str, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"svd-fast {command}: error:") and needle in err, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["make-tiny", str(folder)]) == 0
    return folder


# ------------------------------------------------------------------------------------------ the rule itself
def test_frames_output_never_replaces_a_user_folder(tmp_path: Path) -> None:
    precious = _precious(tmp_path / "work")
    with pytest.raises(media.MediaError, match="not written by svd-fast"):
        media.write_frames(FRAMES, tmp_path / "work")
    assert precious.read_text() == "the user's work"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["precious.txt"]
    assert not list(tmp_path.glob(f"{_io.PARTIAL_PREFIX}*"))


def test_frames_output_replaces_its_own_and_an_older_versions_frames(tmp_path: Path) -> None:
    media.write_frames(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "ours")
    media.write_frames(FRAMES, tmp_path / "ours")  # marked by the first write
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [_io.MARKER, "frame_0000.png", "frame_0001.png"]
    older = tmp_path / "older"
    older.mkdir()
    for index in range(3):  # what versions before the marker left: frame PNGs only
        Image.fromarray(FRAMES[0]).save(older / f"frame_{index:04d}.png")
    media.write_frames(FRAMES, older)
    assert sorted(p.name for p in older.iterdir()) == [_io.MARKER, "frame_0000.png", "frame_0001.png"]


@pytest.mark.parametrize("out", ["", ".", "..", "sub/..", "here"])
def test_current_folder_and_its_parents_are_refused(out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    target = out if out != "here" else str(tmp_path)
    with pytest.raises(media.MediaError, match="not a new folder name|current folder"):
        media.write_frames(FRAMES, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_the_inputs_folder_is_never_replaced(tmp_path: Path) -> None:
    media.write_frames(FRAMES, tmp_path / "frames")
    condition = tmp_path / "frames" / "frame_0000.png"  # a frame of an earlier output used as the next input
    with pytest.raises(media.MediaError, match="holds the input"):
        media.write_frames(FRAMES, tmp_path / "frames", inputs=[condition])
    with pytest.raises(media.MediaError, match="holds the input"):
        media.write_frames(FRAMES, tmp_path, inputs=[condition])
    assert condition.is_file()


def test_a_video_path_that_is_a_folder_is_refused_before_writing(tmp_path: Path) -> None:
    precious = _precious(tmp_path / "x.mp4")
    with pytest.raises(media.MediaError, match="is an existing folder"):
        media.check_output(tmp_path / "x.mp4")
    assert precious.is_file()


def test_a_failed_folder_write_leaves_the_previous_output_and_no_partial(tmp_path: Path) -> None:
    media.write_frames(FRAMES, tmp_path / "ours")

    def fail(staging: Path) -> None:
        (staging / "frame_0000.png").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        _io.replace_folder(tmp_path / "ours", "frames", fail)
    assert len(list((tmp_path / "ours").glob("frame_*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_a_folder_of_another_kind_is_refused(tmp_path: Path) -> None:
    _io.claim_folder(tmp_path / "latents", "latents")
    (tmp_path / "latents" / "settings.json").write_text("{}")
    with pytest.raises(_io.OutputPathError, match="not written by svd-fast as frames"):
        _io.check_output_folder(tmp_path / "latents", "frames")


# ------------------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_asks_for(mask: int, file_mode: int, folder_mode: int, tmp_path: Path) -> None:
    previous = os.umask(mask)
    try:
        written = [media.write_frames(FRAMES, tmp_path / "v.gif"), media.write_frames(FRAMES, tmp_path / "v.mp4")]
        frames = media.write_frames(FRAMES, tmp_path / "frames")
        part = manifest.write_part(tmp_path / "m.parquet", "key", [{"source": "a.mp4", "clip_index": 0}])
        whole = manifest.write_manifest(tmp_path / "m.parquet", manifest.read_parts(tmp_path / "m.parquet", ["key"]))
    finally:
        os.umask(previous)
    for path in [*written, part, whole, *frames.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE(frames.stat().st_mode) == folder_mode


# ------------------------------------------------------------------------------------------ locks
def test_a_held_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with _io.lock(tmp_path / "x.lock", "encode run", tmp_path):
        with pytest.raises(_io.OutputBusyError, match=rf"another encode run \(pid {os.getpid()}\) is writing"):
            with _io.lock(tmp_path / "x.lock", "encode run", tmp_path):
                pass
    with _io.lock(tmp_path / "x.lock", "encode run", tmp_path):  # released
        pass


# ------------------------------------------------------------------------------------------ per command
def test_generate_keeps_a_user_folder(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's reproduction: `generate --out work` with work/precious.txt."""
    monkeypatch.chdir(tmp_path)
    precious = _precious(tmp_path / "work")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "img.png")
    code = main(["generate", "--model", str(tiny_model), "--image", "img.png", "--out", "work", "--steps", "1", "--frames", "2"])
    assert code == 2 and precious.read_text() == "the user's work"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["precious.txt"]


def test_encode_refuses_a_user_folder_and_the_current_folder(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    precious = _precious(tmp_path / "work")
    (tmp_path / "model").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"")
    args = ["encode", "--data", "clip.mp4", "--model", "model", "--num-frames", "2", "--height", "16", "--width", "16", "--out"]
    _one_line_usage_error(main([*args, "work"]), capsys, "encode", "not written by svd-fast")
    _one_line_usage_error(main([*args, "."]), capsys, "encode", "not a new folder name")
    _one_line_usage_error(main([*args, "model"]), capsys, "encode", "holds the input")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["precious.txt"] and precious.is_file()


def test_encode_refuses_a_folder_another_encode_holds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"")
    out = _io.claim_folder(tmp_path / "latents", "latents")
    args = ["encode", "--data", str(tmp_path / "clip.mp4"), "--model", str(tmp_path / "model"), "--num-frames", "2",
            "--height", "16", "--width", "16", "--device", "cpu", "--out", str(out)]  # fmt: skip
    with _io.lock(out / ".svd-fast-lock", "encode run", out):
        _one_line_usage_error(main(args), capsys, "encode", "another encode run")


@pytest.mark.parametrize("out", [".", "..", "user"])
def test_make_tiny_refuses_the_current_folder_and_user_folders(out: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    precious = _precious(tmp_path / "user")
    _one_line_usage_error(main(["make-tiny", out]), capsys, "make-tiny", "not a new folder name" if out != "user" else "not written by svd-fast")
    assert precious.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["user"]


@pytest.mark.parametrize("out", [".", "user"])
def test_demo_refuses_the_current_folder_and_user_folders(out: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    precious = _precious(tmp_path / "user")
    _one_line_usage_error(main(["demo", "--out", out, "--quick"]), capsys, "demo", "not a new folder name" if out == "." else "not written by svd-fast")
    assert precious.is_file()


def test_train_refuses_a_user_output_dir_and_a_user_export_folder(tmp_path: Path) -> None:
    from training_fixtures import tiny_config, tiny_workdir  # noqa: PLC0415

    from svd_fast.training import TrainConfig  # noqa: PLC0415
    from svd_fast.training.setup import check_inputs  # noqa: PLC0415

    workdir = tiny_workdir(tmp_path)
    precious = _precious(workdir / "user")
    with pytest.raises(ValueError, match="output_dir: .* not written by svd-fast as train"):
        check_inputs(TrainConfig.from_dict(tiny_config(workdir, "user", device="cpu")))
    run = _io.claim_folder(workdir / "run", "train")
    _precious(run / "pipeline")
    with pytest.raises(ValueError, match="pipeline export .* not written by svd-fast as pipeline"):
        check_inputs(TrainConfig.from_dict(tiny_config(workdir, "run", device="cpu")))
    with pytest.raises(ValueError, match="holds the input"):
        check_inputs(TrainConfig.from_dict(tiny_config(workdir, "data", device="cpu")))
    assert precious.is_file() and (run / "pipeline" / "precious.txt").is_file()


def test_curate_refuses_a_folder_as_its_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    precious = _precious(tmp_path / "m.parquet")
    (tmp_path / "videos").mkdir()
    _one_line_usage_error(main(["curate", "--input", str(tmp_path / "videos"), "--out", str(tmp_path / "m.parquet")]), capsys, "curate", "is a directory")
    assert precious.is_file()
