"""`svd-fast curate` as a user meets it: every bad input is one line on stderr and exit code 2 before any file
is processed; partial failures finish the rest and exit 1; reruns, concurrent runs and leftovers are safe."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from svd_fast import _io
from svd_fast.cli import main
from svd_fast.curation import manifest, pipeline
from svd_fast.data import synthetic


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    synthetic.write_video(folder / "pan.mp4", synthetic.translating_texture(12, 48, 64, (0, 1)), fps=8)
    synthetic.write_video(folder / "still.mp4", synthetic.translating_texture(12, 48, 64, (0, 0), seed=1), fps=8)
    return folder


@pytest.fixture
def no_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad-input run must stop before any file is touched."""

    def must_not_run(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a file was processed despite a usage error")

    monkeypatch.setattr(pipeline, "stage_analyse", must_not_run)


def _pngs(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"frame{index}.png")
    return folder


BAD_INPUTS = {
    "filter column": (["--filter", "flow_mean_nrom>=0.1"], "no column 'flow_mean_nrom'"),
    "filter syntax": (["--filter", "flow_mean_norm ~ 3"], "expected COLUMN"),
    "filter percent": (["--filter", "aesthetic_score:bottom=120"], "percent"),
    "device name": (["--device", "gpu0"], "--device"),
    "device without cuda": (["--device", "cuda:7"], "--device"),
    "min scene frames 0": (["--min-scene-frames", "0"], "--min-scene-frames"),
    "min scene frames text": (["--min-scene-frames", "many"], "invalid int"),
    "cut threshold nan": (["--cut-threshold", "nan"], "--cut-threshold"),
    "flow fps 0": (["--flow-fps", "0"], "--flow-fps"),
    "static threshold negative": (["--static-threshold", "-1"], "--static-threshold"),
    "flow backend": (["--flow-backend", "nvof"], "invalid choice"),
    "clip model missing": (["--clip-model", "/nonexistent/clip"], "--clip-model"),
    "aesthetic head missing": (["--aesthetic-head", "/nonexistent/head.pt"], "--aesthetic-head"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_option_is_one_line_and_exit_2(case: str, videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_processing: None) -> None:
    extra, expected = BAD_INPUTS[case]
    if case == "device without cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    rc = main(["curate", "--input", str(videos), "--out", str(tmp_path / "m.parquet"), "--no-ocr", *extra])
    _assert_usage_error(rc, capsys, expected)
    assert not (tmp_path / "m.parquet").exists()


def _assert_usage_error(rc: int, capsys: pytest.CaptureFixture[str], expected: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("svd-fast curate: error:"), err
    assert expected in lines[0], lines[0]


def test_bad_paths(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_processing: None) -> None:
    out = str(tmp_path / "m.parquet")
    _assert_usage_error(main(["curate", "--input", str(tmp_path / "missing"), "--out", out]), capsys, "does not exist")
    _assert_usage_error(main(["curate", "--input", str(_pngs(tmp_path)), "--out", out]), capsys, "no video files")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    _assert_usage_error(main(["curate", "--input", str(tmp_path / "empty.txt"), "--out", out]), capsys, "lists no files")
    _assert_usage_error(main(["curate", "--input", str(videos), "--out", str(tmp_path)]), capsys, "is a directory")
    _assert_usage_error(main(["curate", "--out", out]), capsys, "--input")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_usage_error(main(["curate", "--input", str(videos), "--out", str(blocker / "m.parquet")]), capsys, "not writable")


def test_concurrent_run_on_one_out_is_refused(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_processing: None) -> None:
    out = tmp_path / "m.parquet"
    with open(tmp_path / "m.parquet.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running curate holds it
        held.write("4242")
        held.flush()
        _assert_usage_error(main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr"]), capsys, "another curate run (pid 4242)")


def test_partial_failure_finishes_the_rest_and_exits_1(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "pan.mp4").write_bytes((videos / "pan.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes(b"not a video" * 40)
    out = tmp_path / "m.parquet"
    rc = main(["curate", "--input", str(folder), "--out", str(out), "--no-ocr"])
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 2 files failed" in captured.err
    table = pd.read_parquet(out)
    assert table.loc[table["source"].str.endswith("broken.mp4"), "error"].str.startswith("analyse:").all()
    assert table.loc[table["source"].str.endswith("pan.mp4"), "keep"].all()


def test_out_inside_input_never_ingests_itself(videos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("pan.mp4", "still.mp4"):
        (folder / name).write_bytes((videos / name).read_bytes())
    out = folder / "curated" / "m.parquet"
    rows = []
    for _ in range(3):
        assert main(["curate", "--input", str(folder), "--out", str(out), "--no-ocr"]) == 0
        rows.append(len(pd.read_parquet(out)))
    assert rows == [2, 2, 2]
    assert all(Path(source).is_absolute() for source in pd.read_parquet(out)["source"])


def test_rerun_with_other_settings_recomputes(videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.parquet"
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr"]) == 0
    seen: list[str] = []
    real = pipeline.stage_analyse

    def counting(item: dict, config: object = None) -> dict:
        seen.append(item["path"])
        return real(item, config)

    monkeypatch.setattr(pipeline, "stage_analyse", counting)
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr"]) == 0
    assert seen == []  # same content, same settings: resumed
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr", "--min-scene-frames", "4"]) == 0
    assert len(seen) == 2  # a setting that changes the rows: recomputed
    os.utime(videos / "pan.mp4")  # touched: a changed file as far as the key is concerned
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr", "--min-scene-frames", "4"]) == 0
    assert len(seen) == 3


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "wrong schema"])
def test_damaged_parts_are_redone(damage: str, videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr"]) == 0
    part = sorted(manifest.parts_dir(out).glob("*.parquet"))[0]
    if damage == "zero bytes":
        part.write_bytes(b"")
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    else:
        pd.DataFrame({"source": ["x"]}).to_parquet(part)
    leftover = manifest.parts_dir(out) / f"{_io.PARTIAL_PREFIX}{part.stem}-dead.parquet"
    leftover.write_bytes(b"")  # what a run killed between mkstemp and the rename leaves
    assert main(["curate", "--input", str(videos), "--out", str(out), "--no-ocr"]) == 0
    assert len(pd.read_parquet(out)) == 2 and manifest.part_is_complete(out, part.stem)
    assert not leftover.exists()
