"""`svd-fast generate`: every bad input is one line and exit 2 before the model loads; outputs are written
atomically; batch generation (--input) is resumable, records per-image errors and runs over Ray actors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import svd_fast.commands.generate as generate_command
from svd_fast import _io, media
from svd_fast.cli import build_parser, main
from svd_fast.diffusers import generation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["make-tiny", str(folder)]) == 0
    return folder


def _save_image(path: Path, size: tuple[int, int] = (100, 80), seed: int = 1) -> Path:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_image(tmp_path_factory.mktemp("image") / "condition.png")


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generation, "load_optimized_pipeline", refuse)


BAD_INPUTS = [
    ({"--frames": "1"}, "--frames must be a whole number in [2, 1024]"),
    ({"--frames": "abc"}, "invalid int value"),
    ({"--steps": "0"}, "--steps must be a whole number in [1, 1000]"),
    ({"--min-guidance": "nan"}, "--min-guidance must be a finite number"),
    ({"--max-guidance": "inf"}, "--max-guidance must be a finite number"),
    ({"--min-guidance": "3", "--max-guidance": "1"}, "must not exceed --max-guidance"),
    ({"--min-guidance": "-1"}, "--min-guidance must be a finite number in [0, 100]"),
    ({"--fps": "0"}, "--fps must be a whole number in [1, 240]"),
    ({"--fps": "-3"}, "--fps must be a whole number in [1, 240]"),
    ({"--height": "0"}, "--height must be a whole number in [8, 8192]"),
    ({"--width": "60"}, "--width must be a positive multiple"),
    ({"--motion-bucket-id": "300"}, "--motion-bucket-id must be a whole number in [0, 255]"),
    ({"--noise-aug-strength": "-0.5"}, "--noise-aug-strength must be a finite number in [0, 10]"),
    ({"--decode-chunk-size": "0"}, "--decode-chunk-size must be a whole number in [1, 1024]"),
    ({"--cache-interval": "0"}, "--cache-interval must be a whole number in [1, 1000]"),
    ({"--sampler": "heun"}, "invalid choice"),
    ({"--cache-interval": "2", "--no-optimize": None}, "need the optimized pipeline"),
    ({"--dtype": "fp16", "--device": "cpu"}, "fp16 is not supported on the CPU"),
    ({"--image": "TINY_IMAGE"}, "at least 16 a side"),
    ({"--image": "NOT_AN_IMAGE"}, "not a readable image"),
    ({"--image": "missing.png"}, "does not exist"),
    ({"--model": "missing-model/"}, "does not exist"),
    ({"--model": "EMPTY_FOLDER"}, "model_index.json"),
    ({"--out": "clip.avi"}, "unsupported extension"),
    ({"--out": "A_FILE/clip.mp4"}, "is not writable"),
    ({"--ray": "local"}, "apply to batch generation"),
    ({"--image": None, "--input": "missing-folder"}, "does not exist"),
    ({"--image": None, "--input": "EMPTY_FOLDER"}, "holds no images"),
    ({"--overlap": "8"}, "--overlap must be in [0, --window) = [0, 8)"),  # the tiny UNet's num_frames is 8
    ({"--window": "4", "--overlap": "-1"}, "--overlap must be in [0, --window) = [0, 4)"),
    ({"--window": "1"}, "--window must be an integer >= 2"),
    ({"--lora": "/nonexistent/adapter:0.5"}, "--lora '/nonexistent/adapter' does not exist"),
    ({"--lora": "NOT_AN_IMAGE"}, "is not a safetensors file"),
    ({"--lora": "EMPTY_FOLDER"}, "holds none of"),
    ({"--lora": "EMPTY_FOLDER:nan"}, "with a finite SCALE"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS, ids=[f"{i}-{m[:24]}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_and_exit_2_before_loading(
    tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, change: dict, message: str
) -> None:
    _no_model_load(monkeypatch)
    special = {
        "TINY_IMAGE": lambda: _save_image(tmp_path / "tiny.png", size=(1, 1)),
        "NOT_AN_IMAGE": lambda: (tmp_path / "fake.png").write_text("not an image") and tmp_path / "fake.png",
        "EMPTY_FOLDER": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "A_FILE/clip.mp4": lambda: (tmp_path / "a_file").write_text("x") and tmp_path / "a_file" / "clip.mp4",
    }
    arguments: dict[str, str | None] = {"--model": str(tiny_model), "--image": str(image), "--out": str(tmp_path / "x.mp4"), "--steps": "1"}
    for key, value in change.items():
        if value is None and key in ("--image",):
            arguments.pop(key)
            continue
        if value in special:
            value = str(special[value]())
        elif value == "EMPTY_FOLDER:nan":
            value = f"{special['EMPTY_FOLDER']()}:nan"
        elif key in ("--model", "--image", "--out", "--input"):
            value = str(tmp_path / value)
        arguments[key] = value
    flags = [item for key, value in arguments.items() for item in ((key,) if value is None else (key, value))]
    code = main(["generate", *flags])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error, error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error


@pytest.mark.parametrize(
    ("change", "message"),
    [({"frames": 1}, "frames must be a whole number in"), ({"cache_interval": 2, "optimize": False}, "drop optimize=False"),
     ({"min_guidance": 3.0, "max_guidance": 1.0}, "min_guidance (3.0) must not exceed max_guidance"),
     ({"dtype": "fp16", "device": "cpu"}, "dtype fp16 is not supported on the CPU")],
)  # fmt: skip
def test_python_api_names_the_field(tiny_model: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, message: str) -> None:
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generation.generate(tiny_model, image, tmp_path / "x.mp4", steps=1, **change)


def test_huge_image_is_shrunk_while_loading(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (4000, 3000), (200, 30, 40)).save(path, quality=80)
    loaded = media.load_image(path, max_size=(64, 64))
    assert loaded.size == (64, 64) and loaded.getpixel((10, 10))[0] > 150
    assert media.load_image(path).size == (4000, 3000)  # no output size given: as it is


ATOMIC_WRITE_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import numpy as np
    from svd_fast import media

    folder = Path(sys.argv[1])
    small = np.zeros((2, 16, 16, 3), np.uint8)
    small[1] = 255
    large = (np.random.default_rng(0).random((40, 96, 96, 3)) * 255).astype(np.uint8)
    for name in ("clip.gif", "clip.mp4", "frames"):
        media.write_frames(small, folder / name)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # a full disk, in effect
    failures = 0
    for name in ("clip.gif", "clip.mp4", "frames"):
        try:
            media.write_frames(large, folder / name)
        except OSError:
            failures += 1
    print(failures)
    """
)


def test_outputs_are_atomic_when_the_disk_fills(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", ATOMIC_WRITE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"  # every large write failed ...
    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (16, 16)  # ... and the previous outputs are whole
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [_io.MARKER, "frame_0000.png", "frame_0001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4", "frames"]  # no partial files


def _batch_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, name in enumerate(("a.png", "b.png")):
        _save_image(folder / name, seed=seed)
    (folder / "broken.png").write_text("not an image")
    return folder


BATCH_FLAGS = ["--steps", "1", "--frames", "2", "--format", "frames"]


def test_batch_records_errors_and_resumes(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, out = _batch_folder(tmp_path), tmp_path / "out"
    assert main(["generate", "--model", str(tiny_model), "--input", str(folder), "--out", str(out), *BATCH_FLAGS]) == 1
    rows = {Path(row["image"]).name: row for row in pq.read_table(out / "index.parquet").to_pylist()}
    assert {name: row["status"] for name, row in rows.items()} == {"a.png": "ok", "b.png": "ok", "broken.png": "error"}
    assert "not a readable image" in rows["broken.png"]["error"]
    assert rows["a.png"]["seed"] != rows["b.png"]["seed"] and rows["a.png"]["steps"] == 1
    finished = {name: (out / name / "frame_0000.png").stat().st_mtime_ns for name in ("a", "b")}
    started = {name: row["started_at"] for name, row in rows.items()}
    assert all(isinstance(value, float) and abs(value - time.time()) < 3600 for value in started.values()), started

    _save_image(folder / "broken.png", seed=5)  # fixed: a rerun generates only this one
    (out / ".svd-fast-partial-a-123").mkdir()  # what a killed run leaves behind
    assert main(["generate", "--model", str(tiny_model), "--input", str(folder), "--out", str(out), *BATCH_FLAGS]) == 0
    assert "2 already there" in capsys.readouterr().out
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    restarted = {Path(row["image"]).name: row["started_at"] for row in rows}
    assert restarted["a.png"] == started["a.png"] and restarted["b.png"] == started["b.png"]  # kept, not redone
    assert restarted["broken.png"] > started["broken.png"]
    assert {name: (out / name / "frame_0000.png").stat().st_mtime_ns for name in ("a", "b")} == finished
    assert sorted(p.name for p in out.iterdir()) == [".svd-fast-lock", _io.MARKER, "a", "b", "broken", "index.parquet"]


def test_batch_over_two_ray_actors_matches_one_process(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        _save_image(folder / f"img{seed}.png", seed=seed)
    local, spread = tmp_path / "local", tmp_path / "ray"
    assert main(["generate", "--model", str(tiny_model), "--input", str(folder), "--out", str(local), *BATCH_FLAGS]) == 0
    code = main(["generate", "--model", str(tiny_model), "--input", str(folder), "--out", str(spread), *BATCH_FLAGS, "--ray", "local", "--actors", "2"])
    assert code == 0
    assert pq.read_table(spread / "index.parquet").column("seed").to_pylist() == pq.read_table(local / "index.parquet").column("seed").to_pylist()
    for seed in range(3):
        for frame in ("frame_0000.png", "frame_0001.png"):
            a = np.asarray(Image.open(local / f"img{seed}" / frame), dtype=np.int16)
            b = np.asarray(Image.open(spread / f"img{seed}" / frame), dtype=np.int16)
            assert np.abs(a - b).max() <= 2


def test_low_memory_generates(tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "low.gif"
    code = main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(out), "--steps", "1", "--frames", "2", "--low-memory"])
    assert code == 0, capsys.readouterr().err
    assert '"UNet feed-forward chunking": 1' in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.n_frames >= 1 and gif.size == (64, 64)


def test_decode_chunk_size_defaults_to_a_memory_bound() -> None:
    """8 frames per VAE decode (2 with --low-memory), never more than the video, an explicit size wins; the CLI's
    help states the default."""
    options = generation.GenerateOptions(model="m")
    assert generation.decode_chunk_size(options, 25) == generation.DECODE_CHUNK_SIZE == 8
    assert generation.decode_chunk_size(options, 4) == 4
    assert generation.decode_chunk_size(generation.GenerateOptions(model="m", low_memory=True), 25) == 2
    assert generation.decode_chunk_size(generation.GenerateOptions(model="m", decode_chunk_size=25), 25) == 25
    generate_parser = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert f"default: {generation.DECODE_CHUNK_SIZE}," in " ".join(generate_parser.format_help().split())


def test_sampler_names_are_the_sampling_modules() -> None:
    from svd_fast.diffusers.settings import SAMPLER_CHOICES  # noqa: PLC0415 - the CLI's list is spelled out to avoid importing torch

    assert generate_command.SAMPLER_NAMES == SAMPLER_CHOICES


def test_multistep_sampler_generates(tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ipndm.gif"
    code = main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(out), "--steps", "3", "--frames", "2", "--sampler", "ipndm-2"])
    assert code == 0, capsys.readouterr().err
    assert '"sampler": "ipndm-2"' in capsys.readouterr().out
    with Image.open(out) as gif:
        assert gif.size == (64, 64)


def test_long_video_with_a_lora_adapter(tiny_model: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--frames above the window: windows sharing --overlap frames, one video of --frames frames; --lora fused at
    its scale (an adapter trained for another model is exit 2 after loading, one line)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from peft import LoraConfig

    from svd_fast.training.lora import add_lora, save_lora

    unet = UNetSpatioTemporalConditionModel.from_pretrained(tiny_model, subfolder="unet")
    config = LoraConfig(r=2, lora_alpha=2.0, lora_dropout=0.0, target_modules=["to_q", "to_v"], init_lora_weights=True)
    add_lora(unet, config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.05)
    adapter = save_lora(unet, config, tmp_path / "run" / "lora")
    out = tmp_path / "frames"
    arguments = ["generate", "--model", str(tiny_model), "--image", str(image), "--steps", "1", "--frames", "11",
                 "--window", "4", "--overlap", "1", "--lora", f"{tmp_path / 'run'}:0.5"]  # fmt: skip
    assert main([*arguments, "--out", str(out)]) == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("frame_*.png")) == [f"frame_{index:04d}.png" for index in range(11)]
    from safetensors.torch import load_file, save_file

    save_file({f"down_blocks.7.{key}": value for key, value in load_file(adapter).items()}, tmp_path / "other.safetensors")
    assert main(["generate", "--model", str(tiny_model), "--image", str(image), "--steps", "1", "--frames", "2",
                 "--lora", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "other.gif")]) == 2  # fmt: skip
    error = capsys.readouterr().err  # after the model loaded: its progress bars come first
    lines = [line for line in error.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("svd-fast generate: error: --lora: ") and "this UNet lacks" in lines[0], error
    assert "Traceback" not in error
