"""Every option of every command has a bad value here, refused with one line and exit 2 before any model loads
(svd_fast.checks is the one table of value rules behind them). ``test_every_option_has_a_bad_value`` reads the
parsers, so a new option without a case fails it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svd_fast import checks
from svd_fast.cli import build_parser, main

HUGE_SEED = "1180591620717411303424"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("input_checks")
    model = root / "model"
    assert main(["make-tiny", str(model)]) == 0
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "img.png")
    (root / "folder.mp4").mkdir()
    (root / "videos").mkdir()
    (root / "not_a_video.mp4").write_bytes(b"plain text, not a video")
    (root / "not_parquet.parquet").write_text("not parquet")
    (root / "videos_user").mkdir()
    (root / "videos_user" / "precious.txt").write_text("the user's")
    (root / "images").mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / "a.png")
    config = {"model": str(model), "output_dir": str(root / "run"), "device": "cpu", "precision": "fp32",
              "data": {"path": str(root / "not_a_video.mp4"), "num_frames": 8, "height": 64, "width": 64}}  # fmt: skip
    (root / "train.json").write_text(json.dumps(config))
    return {"root": root, "model": model, "image": root / "img.png", "config": root / "train.json"}


def _base(command: str, files: dict[str, Path]) -> list[str]:
    root = files["root"]
    return {
        "encode": ["encode", "--data", str(root / "videos"), "--model", str(files["model"]), "--out", str(root / "lat"),
                   "--num-frames", "8", "--height", "64", "--width", "64"],
        "make-tiny": ["make-tiny", str(root / "new_tiny")],
        "demo": ["demo", "--out", str(root / "demo_out"), "--quick"],
        "curate": ["curate", "--input", str(root / "videos"), "--out", str(root / "m.parquet")],
        "train": ["train", "--config", str(files["config"])],
        "env": ["env"],
        "distill": ["distill", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "distill_tiny_cpu.yaml")],
        "generate": ["generate", "--model", str(files["model"]), "--image", str(files["image"]), "--out", str(root / "x.mp4"), "--steps", "1"],
    }[command]  # fmt: skip


# command -> option -> (arguments replacing or adding to the base line, fragment of the one-line error)
CASES: dict[str, dict[str, tuple[list[str], str]]] = {
    "generate": {
        "--model": (["--model", "{root}/missing"], "does not exist"),
        "--image": (["--image", "{root}/missing.png"], "does not exist"),
        "--input": (["--input", "{root}/missing"], "does not exist"),
        "--out": (["--out", "."], "not a new folder name"),
        "--format": (["--format", "avi"], "invalid choice"),
        "--frames": (["--frames", "4000"], "--frames must be a whole number in [2, 1024], got 4000"),
        "--steps": (["--steps", "0"], "--steps must be"),
        "--height": (["--height", "100000"], "--height must be"),
        "--width": (["--width", "60"], "--width must be a positive multiple"),
        "--fps": (["--fps", "100000"], "--fps must be"),
        "--motion-bucket-id": (["--motion-bucket-id", "300"], "--motion-bucket-id must be"),
        "--noise-aug-strength": (["--noise-aug-strength", "-0.5"], "--noise-aug-strength must be"),
        "--guidance-preset": (["--guidance-preset", "strong"], "invalid choice"),
        "--min-guidance": (["--min-guidance", "nan"], "--min-guidance must be a finite number"),
        "--max-guidance": (["--max-guidance", "1e300"], "--max-guidance must be a finite number in [0, 100], got 1e+300"),
        "--decode-chunk-size": (["--decode-chunk-size", "0"], "--decode-chunk-size must be"),
        "--seed": (["--seed", HUGE_SEED], "--seed must be a whole number in [0, 9.22337e+18)"),
        "--dtype": (["--dtype", "fp8"], "invalid choice"),
        "--backend": (["--backend", "cuda", "--device", "cpu"], "--backend cuda cannot run on cpu"),
        "--device": (["--device", "potato"], "--device 'potato' is not a device"),
        "--low-memory": (["--low-memory=1"], "ignored explicit argument"),
        "--no-optimize": (["--no-optimize=1"], "ignored explicit argument"),
        "--attention": (["--attention", "magic"], "invalid choice"),
        "--cuda-graphs": (["--cuda-graphs=1"], "ignored explicit argument"),
        "--sampler": (["--sampler", "heun"], "invalid choice"),
        "--cache-interval": (["--cache-interval", "0"], "--cache-interval must be"),
        "--ray": (["--ray", "local"], "apply to batch generation"),
        "--actors": (["--actors", "many"], "invalid int value"),
        "--unet-weights": (["--unet-weights", "{root}/missing.safetensors"], "--unet-weights"),
        "--variant": (["--variant", "fp8"], "holds no *.fp8.safetensors"),
        "--lora": (["--lora", "{root}/missing_adapter:1"], "--lora"),
        "--window": (["--window", "1"], "--window must be an integer >= 2"),
        "--overlap": (["--overlap", "-1"], "--overlap must be in"),
    },
    "distill": {
        "--config": (["--config", "{root}/missing.yaml"], "missing.yaml"),
        "--set": (["--set", "noequals"], "--set expects KEY=VALUE"),
        "--plan-memory": (["--plan-memory=1"], "ignored explicit argument"),
        "--gpus": (["--plan-memory", "--set", "precision=bf16", "--gpus", "0"], "--gpus must be"),
        "--json": (["--json=1"], "ignored explicit argument"),
    },
    "env": {
        "--json": (["--json=1"], "ignored explicit argument"),
    },
    "encode": {
        "--data": (["--data", "{root}/missing"], "does not exist"),
        "--model": (["--model", "{root}/img.png"], "not a diffusers pipeline folder"),
        "--out": (["--out", "."], "not a new folder name"),
        "--num-frames": (["--num-frames", "1"], "--num-frames must be a whole number in [2, 1024]"),
        "--height": (["--height", "100000"], "--height must be"),
        "--width": (["--width", "12"], "multiples of 8"),
        "--stride": (["--stride", "0"], "--stride must be"),
        "--target-fps": (["--target-fps", "nan"], "--target-fps must be"),
        "--device": (["--device", "potato"], "invalid choice"),
        "--ray": (["--ray", "cluster"], "invalid choice"),
        "--actors": (["--actors", "0"], "--actors must be"),
        "--variant": (["--variant", "fp8"], "holds no *.fp8.safetensors"),
    },
    "make-tiny": {
        "dir": (["make-tiny", "."], "not a new folder name"),
        "--seed": (["--seed", HUGE_SEED], "--seed must be a whole number in [0, 9.22337e+18)"),
    },
    "demo": {
        "--out": (["--out", ".."], "not a new folder name"),
        "--quick": (["--quick=yes"], "ignored explicit argument"),
        "--distill": (["--distill=yes"], "ignored explicit argument"),
        "--unet-steps": (["--unet-steps", "0"], "--unet-steps must be"),
        "--sample-steps": (["--sample-steps", "5000"], "--sample-steps must be"),
        "--seed": (["--seed", "-1"], "--seed must be"),
        "--seeds": (["--seeds", "4-0"], "--seeds '4-0': the range 4-0 runs backwards"),
    },
    "curate": {
        "--input": (["--input", "{root}/missing"], "does not exist"),
        "--out": (["--out", "{root}/folder.mp4"], "is a directory"),
        "--filter": (["--filter", "nonsense"], "filter"),
        "--ray": (["--ray", "not an address"], "--ray must be local, auto or a cluster address"),
        "--clip-model": (["--clip-model", "{root}/missing"], "is not a folder"),
        "--aesthetic-head": (["--aesthetic-head", "{root}/missing.pt"], "does not exist"),
        "--no-ocr": (["--no-ocr=1"], "ignored explicit argument"),
        "--cut-threshold": (["--cut-threshold", "-1"], "--cut-threshold"),
        "--min-scene-frames": (["--min-scene-frames", "0"], "--min-scene-frames"),
        "--flow-fps": (["--flow-fps", "1e9"], "--flow-fps must be a finite number in (0, 240]"),
        "--flow-backend": (["--flow-backend", "magic"], "invalid choice"),
        "--static-threshold": (["--static-threshold", "-1"], "--static-threshold"),
        "--keep-static": (["--keep-static=1"], "ignored explicit argument"),
        "--no-codec-prefilter": (["--no-codec-prefilter=1"], "ignored explicit argument"),
        "--device": (["--device", "potato"], "--device 'potato' is not a device"),
        "--report": (["--report", "{root}/img.png"], "--report"),
    },
    "train": {
        "--config": (["--config", "{root}/missing.yaml"], "config"),
        "--set": (["--set", f"seed={HUGE_SEED}"], "seed must be a whole number in [0, 9.22337e+18)"),
        "--plan-memory": (["--plan-memory=1"], "ignored explicit argument"),
        "--gpus": (["--plan-memory", "--set", "precision=bf16", "--gpus", "0"], "--gpus must be"),
        "--json": (["--json=1"], "ignored explicit argument"),
        "--deepspeed_config": (["--deepspeed_config", "{root}/missing.json"], "deepspeed.config: cannot read"),
        "--deepspeed": (["--deepspeed=1"], "ignored explicit argument"),
    },
}

# Classes of bad values beyond one per option (the sweep): each is one line and exit 2.
EXTRA_CASES: list[tuple[str, list[str], str]] = [
    ("demo", ["--seeds", "0,x"], "--seeds '0,x' is not a seed list"),
    ("demo", ["--seeds", "0-100000"], "names more than 100 seeds"),
    ("demo", ["--seeds", "0-2,1"], "names seed 1 twice"),
    ("demo", ["--seeds", "0-1", "--seed", "3"], "--seed and --seeds together"),
    ("generate", ["--out", ""], "not a new folder name"),
    ("generate", ["--out", ".."], "not a new folder name"),
    ("generate", ["--out", "{root}/folder.mp4"], "is an existing folder"),
    ("generate", ["--out", "{root}/videos_user"], "not written by svd-fast"),
    ("generate", ["--input", "{root}/images", "--out", "{root}/videos_user"], "not written by svd-fast"),
    ("generate", ["--frames", "1000", "--height", "8192", "--width", "8192"], "GiB on cpu (estimate)"),
    ("train", ["--set", "optimizer.adam_eps=-1"], "optimizer.adam_eps must be"),
    ("train", ["--set", "optimizer.learning_rate=1e30"], "optimizer.learning_rate must be"),
    ("train", ["--set", "validation.every=1", "--set", "validation.num_frames=1", "--set", 'validation.images=["{root}/img.png"]'],
     "validation.num_frames must be"),
    ("train", ["--set", "data.default_fps=0.4"], "data.default_fps must be"),
    ("train", ["--set", "data.num_frames=500"], "data.path: the first 1 video(s) cannot be read"),
    ("train", ["--set", "data.path={root}/not_parquet.parquet"], "is not a readable video folder, list or manifest"),
    ("train", ["--set", "data.path={root}/videos"], "no video files"),
    ("train", ["--set", "data.num_framez=8"], "unknown config key(s) ['data.num_framez']"),
    ("distill", ["--set", "distill.skip_steps=0"], "distill.skip_steps must be"),
    ("train", ["--set", "max_nonfinite_steps=0"], "max_nonfinite_steps"),
    ("encode", ["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--num-frames", "0"], "--"),
]


def _fill(arguments: list[str], files: dict[str, Path]) -> list[str]:
    return [item.replace("{root}", str(files["root"])) for item in arguments]


def _no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the arguments were checked")

    import svd_fast.demo  # noqa: PLC0415
    import svd_fast.diffusers.generation  # noqa: PLC0415
    import svd_fast.training.latents  # noqa: PLC0415
    import svd_fast.training.setup  # noqa: PLC0415
    import svd_fast.training.trainer  # noqa: PLC0415

    monkeypatch.setattr(svd_fast.training.latents.ClipEncoder, "__init__", refuse)
    monkeypatch.setattr(svd_fast.training.trainer, "build_models", refuse)
    monkeypatch.setattr(svd_fast.demo, "run_demo", refuse)
    monkeypatch.setattr(svd_fast.diffusers.tiny, "save_tiny_pipeline", refuse)
    monkeypatch.setattr(svd_fast.diffusers.generation, "load_optimized_pipeline", refuse)


def _assert_one_line(command: str, argv: list[str], fragment: str, capsys: pytest.CaptureFixture) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"svd-fast {command}: error:"), err
    assert fragment in err, (fragment, err)


def _argv(command: str, arguments: list[str], files: dict[str, Path]) -> list[str]:
    base = _base(command, files)
    if command == "make-tiny" and arguments[0] == "make-tiny":
        return arguments
    if command == "generate" and arguments[0] == "--input":  # a batch: no --image
        index = base.index("--image")
        base = [*base[:index], *base[index + 2 :]]
    if arguments[0] in base:  # replace the base line's value of this option
        index = base.index(arguments[0])
        return [*base[:index], *arguments, *base[index + 2 :]]
    return [*base, *arguments]


@pytest.mark.parametrize(("command", "option"), [(command, option) for command, options in CASES.items() for option in options])
def test_each_option_refuses_its_bad_value(command: str, option: str, files, capsys, monkeypatch) -> None:
    _no_heavy_work(monkeypatch)
    arguments, fragment = CASES[command][option]
    _assert_one_line(command, _argv(command, _fill(arguments, files), files), fragment, capsys)


@pytest.mark.parametrize(("command", "arguments", "fragment"), EXTRA_CASES)
def test_classes_of_bad_values(command: str, arguments: list[str], fragment: str, files, capsys, monkeypatch) -> None:
    _no_heavy_work(monkeypatch)
    _assert_one_line(command, _argv(command, _fill(arguments, files), files), fragment, capsys)


def test_every_option_has_a_bad_value() -> None:
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    missing = []
    for command, subparser in subparsers.choices.items():
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            if not any(name == key or key in action.option_strings for key in CASES.get(command, {})):
                missing.append(f"{command} {name}")
    assert not missing, f"options without a bad-value case: {missing}"



@pytest.mark.parametrize(
    ("name", "value"),
    [("seed", -1), ("seed", 2**63), ("seed", 1.5), ("frames", 1), ("fps", float("inf")), ("max_guidance", 1e300),
     ("learning_rate", 0.0), ("adam_eps", float("nan")), ("height", True), ("flow_fps", 1e9)],
)
def test_the_table_refuses_values_the_library_cannot_represent(name: str, value: object) -> None:
    with pytest.raises(checks.CheckError, match=name):
        checks.check(name, value)


@pytest.mark.parametrize("device", ["potato", "tpu", "cuda:99"])
def test_device_strings_are_parsed_and_checked(device: str) -> None:
    with pytest.raises(checks.CheckError, match="device"):
        checks.parse_device(device)
    assert checks.parse_device("cpu") == "cpu"


def test_the_memory_estimate_is_named_in_the_refusal() -> None:
    with pytest.raises(checks.CheckError, match=r"needs at least [0-9.]+ GiB on cpu \(estimate\)"):
        checks.check_generation_memory(100_000, 8192, 8192, 100_000, 4, "cpu")
    assert checks.check_generation_memory(2, 64, 64, 2, 4, "cpu") > 0


def test_a_forced_backend_is_checked_against_the_device() -> None:
    import torch  # noqa: PLC0415

    assert checks.backend_unavailable_reason("auto", "cpu", torch.float32) is None
    assert "cuda" in checks.backend_unavailable_reason("cuda", "cpu", torch.float32)


def test_a_missing_ray_cluster_is_named(files, capsys, monkeypatch) -> None:
    import ray  # noqa: PLC0415

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_cluster)
    argv = [*_base("encode", files), "--ray", "auto", "--device", "cpu"]
    argv[argv.index("--data") + 1] = str(files["root"] / "not_a_video.mp4")
    _assert_one_line("encode", argv, "--ray auto: no running Ray cluster to join (Could not find any running Ray instance", capsys)


def test_a_long_stage_reports_while_it_runs() -> None:
    import threading  # noqa: PLC0415

    from svd_fast.heartbeat import heartbeat  # noqa: PLC0415

    lines: list[str] = []
    two_beats = threading.Event()

    def write(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            two_beats.set()

    with heartbeat("decode", interval=0.001, write=write):
        assert two_beats.wait(60)  # the stage runs until it has been reported twice
    count = len(lines)
    assert all(line.startswith("decode: still running after ") for line in lines)
    assert len(lines) == count  # nothing after the stage ended
