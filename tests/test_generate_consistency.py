"""`svd-fast generate` with few-step models: --unet-weights (a strict UNet state dict, checked before the model
loads), --sampler consistency (4 steps and guidance 1 by default; guidance above 1 is allowed with a note), and a
model folder whose svd_fast.json (written by `svd-fast distill`) selects consistency sampling without flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from svd_fast.cli import main
from svd_fast.diffusers import generation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["make-tiny", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "condition.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def weights(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny UNet's state dict with every tensor scaled: a stand-in for AnimateLCM-SVD-xt's weight file."""
    state = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    path = tmp_path_factory.mktemp("weights") / "few_step_unet.safetensors"
    save_file({name: tensor * 0.5 for name, tensor in state.items()}, path)
    return path


def _refuse_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generation, "load_optimized_pipeline", refuse)


def _bad_weights(tiny_model: Path, folder: Path) -> dict[str, Path]:
    state = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    names = sorted(state)
    missing, extra = folder / "missing.safetensors", folder / "extra.safetensors"
    save_file({name: state[name] for name in names[5:]}, missing)
    save_file({**state, "adapter.lora_A.weight": torch.zeros(2, 2)}, extra)
    (folder / "garbage.safetensors").write_bytes(b"not safetensors")
    return {"MISSING": missing, "EXTRA": extra, "GARBAGE": folder / "garbage.safetensors"}


BAD = [
    (["--unet-weights", "MISSING"], "5 missing ("),
    (["--unet-weights", "EXTRA"], "1 unexpected (adapter.lora_A.weight)"),
    (["--unet-weights", "GARBAGE"], "not a readable safetensors file"),
    (["--unet-weights", "no_such.safetensors"], "no such file"),
    (["--unet-weights", "weights.bin"], "expected a .safetensors file"),
    (["--sampler", "consistency", "--steps", "41"], "exceeds the consistency scheduler's num_train_timesteps (40)"),
    (["--sampler", "lcm"], "invalid choice"),
    (["--sampler", "ipndm-2", "--no-optimize"], "need the optimized pipeline"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line_before_loading(tiny_model, image, tmp_path, capsys, monkeypatch, flags, message) -> None:
    _refuse_model_load(monkeypatch)
    files = _bad_weights(tiny_model, tmp_path)
    flags = [str(files.get(flag, flag)) for flag in flags]
    code = main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(tmp_path / "x.gif"), *flags])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_unet_weights_with_consistency_sampling(tiny_model, image, weights, tmp_path, capsys, monkeypatch) -> None:
    """An AnimateLCM-style run is one command: 4 consistency steps at batch 1 by default, the weights in place."""
    calls = []
    out = tmp_path / "lcm.gif"
    original = generation.sample_video

    def recording(pipe, condition, options, seed):
        calls.append((type(pipe.scheduler).__name__, options.steps, options.min_guidance, options.max_guidance))
        reference = load_file(weights)
        name = next(iter(reference))
        assert torch.equal(pipe.unet.state_dict()[name], reference[name])
        return original(pipe, condition, options, seed)

    monkeypatch.setattr(generation, "sample_video", recording)
    code = main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(out), "--frames", "2",
                 "--unet-weights", str(weights), "--sampler", "consistency"])  # fmt: skip
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert calls == [("SVDConsistencyScheduler", 4, 1.0, 1.0)]
    assert "consistency step" in captured.out and "note" not in captured.err
    code = main(["generate", "--model", str(tiny_model), "--image", str(image), "--out", str(tmp_path / "cfg.gif"), "--frames", "2",
                 "--sampler", "consistency", "--steps", "2", "--max-guidance", "1.5"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.err.count("doubles the UNet batch") == 1, captured.err


def test_svd_fast_json_selects_consistency_sampling(tiny_model, image, tmp_path, capsys) -> None:
    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    settings = {"sampler": "consistency", "scheduler": "SVDConsistencyScheduler", "num_inference_steps": 3, "min_guidance": 1.0,
                "max_guidance": 1.0, "scheduler_config": {"num_train_timesteps": 12, "sigma_min": 0.002, "sigma_max": 700.0,
                                                          "sigma_data": 1.0, "s_noise": 0.0, "rho": 7, "clip_denoised": False}}  # fmt: skip
    (student / "svd_fast.json").write_text(json.dumps(settings))
    code = main(["generate", "--model", str(student), "--image", str(image), "--out", str(tmp_path / "a.gif"), "--frames", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = _summary(captured.out)
    assert "denoising loop -> fused input preparation + guidance + consistency step" in summary["optimized"]["patched"]
    assert "scheduler -> SVDConsistencyScheduler" in summary["optimized"]["patched"]
    (student / "svd_fast.json").write_text(json.dumps({**settings, "num_inference_steps": 13}))
    assert main(["generate", "--model", str(student), "--image", str(image), "--out", str(tmp_path / "b.gif")]) == 2
    assert "num_inference_steps must be an int in [1, 12]" in capsys.readouterr().err
