"""Training state that cannot be wrong silently, each fault injected: a crafted universal checkpoint runs no
pickle, flipped checkpoint bytes are detected (``latest`` falls back), ``latest`` never resumes another run,
settings changed on resume are listed and applied or refused, a non-finite loss stops the run keeping the last
good checkpoint, a busy output_dir is refused; encode resumes by file identity, notices truncated clips and
ties latents to their model; optimize() survives deepcopy and channels_last works; a huge flow rate does not
hang curation. CPU, tiny model."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import tiny_config as shared_tiny_config
from training_fixtures import tiny_workdir

import svd_fast
from svd_fast import _io
from svd_fast.cli import main
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, save_tiny_pipeline, tiny_pipeline
from svd_fast.training import TrainConfig, train
from svd_fast.training.checkpoint import COMPLETE, LATEST, incomplete_reason, resolve_resume, weights_only_loading
from svd_fast.training.run import check_same_run, new_identity, write_identity
from svd_fast.training.setup import check_inputs, latents_settings


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("training_safety"), (TINY_NUM_FRAMES, TINY_NUM_FRAMES))


def tiny_config(workdir: Path, out: str, **overrides) -> dict:
    return shared_tiny_config(workdir, out, **{"use_svd_fast_kernels": False, "device": "cpu", **overrides})


class _CreatesFile:
    """Unpickling this creates ``path``: the proof that a load ran pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------ the pickle route
def test_a_crafted_universal_checkpoint_is_refused_and_runs_no_pickle(workdir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    crafted = tmp_path / "untrusted" / "step_1"
    (crafted / "zero").mkdir(parents=True)
    torch.save({"optimizer_state_dict": _CreatesFile(sentinel)}, crafted / "zero" / "optimizer_state.pt")
    torch.save({"module": _CreatesFile(sentinel)}, crafted / "mp_rank_00_model_states.pt")
    files = {str(p.relative_to(crafted)): p.stat().st_size for p in crafted.rglob("*") if p.is_file()}
    (crafted / COMPLETE).write_text(json.dumps({"step": 1, "files": files}))
    (tmp_path / "ds.json").write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    config = tiny_config(workdir, "universal", resume_from=str(crafted), **{"deepspeed.config": str(tmp_path / "ds.json")})
    with pytest.raises(ValueError, match="load_universal"):
        train(config)
    assert not sentinel.exists()


def test_every_torch_load_deepspeed_makes_while_loading_is_weights_only(tmp_path: Path) -> None:
    from deepspeed.checkpoint import universal_checkpoint  # noqa: PLC0415
    from deepspeed.runtime.zero import stage3  # noqa: PLC0415

    sentinel = tmp_path / "pwned"
    crafted = tmp_path / "evil.pt"
    torch.save({"x": _CreatesFile(sentinel)}, crafted)
    real_load = torch.load
    with weights_only_loading():
        for module in (universal_checkpoint, stage3):  # their loaders call torch.load(weights_only=False) themselves
            with pytest.raises(pickle.UnpicklingError):
                module.torch.load(crafted, weights_only=False)
    assert not sentinel.exists() and torch.load is real_load


# ------------------------------------------------------------------------------------------ checkpoints and runs
@pytest.fixture(scope="module")
def two_checkpoints(workdir: Path) -> Path:
    """Run A: steps 1 and 2, a checkpoint after each."""
    train(tiny_config(workdir, "run_a", max_steps=2, **{"logging.checkpoint_every": 1}))
    return workdir / "run_a"


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for index in range(len(data) // 2, len(data) // 2 + 16):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_and_latest_falls_back(two_checkpoints: Path, tmp_path: Path, caplog) -> None:
    damaged = tmp_path / "run"
    shutil.copytree(two_checkpoints, damaged)
    model_states = sorted((damaged / "checkpoints" / "step_2").rglob("*model_states.pt"))[0]
    size = model_states.stat().st_size
    _flip_bytes(model_states)
    assert model_states.stat().st_size == size  # a size check alone would resume it
    assert "checksum mismatch" in incomplete_reason(damaged / "checkpoints" / "step_2")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(LATEST, damaged) == damaged / "checkpoints" / "step_1"
    assert "checksum mismatch" in caplog.text and "newest valid checkpoint, step_1" in caplog.text
    with pytest.raises(ValueError, match="checksum mismatch"):
        resolve_resume(str(damaged / "checkpoints" / "step_2"), damaged)


def test_latest_never_resumes_another_run(two_checkpoints: Path, workdir: Path) -> None:
    record = json.loads((two_checkpoints / "checkpoints" / "step_2" / COMPLETE).read_text())
    assert record["run"]["run_id"] == json.loads((two_checkpoints / "run.json").read_text())["run_id"]
    logged = [json.loads(line) for line in (two_checkpoints / "train_log.jsonl").read_text().splitlines()]
    assert {entry["run_id"] for entry in logged} == {record["run"]["run_id"]}
    # Run B starts fresh in the same folder (its identity is written before any model loads) and is killed
    # before its first checkpoint: `latest` still names run A's step_2.
    other = two_checkpoints.parent / "run_b"
    shutil.copytree(two_checkpoints, other)
    write_identity(other, new_identity(TrainConfig.from_dict(tiny_config(workdir, "run_b", **{"optimizer.learning_rate": 5e-4})).to_dict()))
    with pytest.raises(ValueError, match="allow_other_run"):
        train(tiny_config(workdir, "run_b", max_steps=3, resume_from="latest", **{"optimizer.learning_rate": 5e-4}))
    check_same_run(other / "checkpoints" / "step_2", other, allow_other_run=True)  # asked for: accepted


def test_settings_changed_on_resume_are_applied_or_refused(two_checkpoints: Path, workdir: Path, caplog) -> None:
    shutil.copytree(two_checkpoints, workdir / "run_c")
    with pytest.raises(ValueError, match=r"data\.batch_size 1 -> 2"):
        train(tiny_config(workdir, "run_c", max_steps=3, resume_from="latest", **{"data.batch_size": 2}))
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(workdir, "run_c", max_steps=3, resume_from="latest", **{"optimizer.learning_rate": 2e-4}))
    assert "optimizer.learning_rate 0.001 -> 0.0002" in caplog.text and "max_steps 2 -> 3" in caplog.text
    last = json.loads((workdir / "run_c" / "train_log.jsonl").read_text().splitlines()[-1])
    assert result.steps == 3 and last["step"] == 3 and last["lr"] == pytest.approx(2e-4)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir: Path, monkeypatch) -> None:
    from svd_fast.training.step import StepRunner  # noqa: PLC0415
    from svd_fast.training.trainer import NonFiniteLossError  # noqa: PLC0415

    real_run, steps = StepRunner.run, []

    def diverging(self):  # the loss of a diverged run from step 2 on (a too-high learning rate, bad data)
        stats = real_run(self)
        steps.append(stats)
        return dataclasses.replace(stats, loss=float("nan")) if len(steps) >= 2 else stats

    monkeypatch.setattr(StepRunner, "run", diverging)
    with pytest.raises(NonFiniteLossError, match="step 3: the loss is nan .*2 step.* in a row.*the last good checkpoint is .*step_1"):
        train(tiny_config(workdir, "nan", max_steps=6, max_nonfinite_steps=2, **{"logging.checkpoint_every": 1, "logging.export": True}))
    root = workdir / "nan" / "checkpoints"
    assert (root / LATEST).read_text() == "step_1" and sorted(p.name for p in root.glob("step_*")) == ["step_1"]
    assert not (workdir / "nan" / "pipeline").exists()


def test_a_second_run_on_a_busy_output_dir_is_refused(workdir: Path) -> None:
    out = _io.claim_folder(workdir / "busy", "train")
    with _io.lock(out / ".svd-fast-lock-rank0", "training run", out):
        with pytest.raises(ValueError, match="another training run"):
            train(tiny_config(workdir, "busy"))


def test_the_config_is_checked_whole_before_the_model_loads(workdir: Path) -> None:
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        TrainConfig.from_dict(tiny_config(workdir, "x", max_nonfinite_steps=0))


# ------------------------------------------------------------------------------------------ encode
def _encode(workdir: Path, data: Path, out: Path, model: Path | None = None) -> dict:
    code = main(["encode", "--data", str(data), "--model", str(model or workdir / "tiny"), "--out", str(out), "--num-frames",
                 str(TINY_NUM_FRAMES), "--height", str(TINY_HEIGHT), "--width", str(TINY_WIDTH), "--device", "cpu"])  # fmt: skip
    assert code == 0
    return code


def test_encode_resumes_by_file_identity_detects_truncation_and_ties_latents_to_the_model(workdir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(workdir / "data", data)
    out = tmp_path / "latents"
    _encode(workdir, data, out)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["encoded_sources"] == 2
    # A new video that sorts first: by position it would take the first source's place and never be encoded.
    shutil.copy(data / "clip1.mp4", data / "a_new.mp4")
    _encode(workdir, data, out)
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["encoded_sources"] == 1 and second["clips"] == first["clips"] + first["clips"] // 2
    complete = json.loads((out / COMPLETE).read_text())
    assert sorted(complete["files"]) == sorted(p.name for p in (out / "clips").glob("clip_*.pt"))
    # A truncated clip file: training refuses it, encode redoes its source.
    clip = out / "clips" / next(iter(complete["files"]))
    clip.write_bytes(clip.read_bytes()[:100])
    config = TrainConfig.from_dict(tiny_config(workdir, "lat_run", **{"data.latents_dir": str(out), "data.path": ""}))
    with pytest.raises(ValueError, match="missing or truncated"):
        check_inputs(config)
    _encode(workdir, data, out)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["encoded_sources"] == 1
    check_inputs(config)
    # Latents made with another model's VAE and image encoder are refused.
    save_tiny_pipeline(tmp_path / "other_model", seed=1)
    other = TrainConfig.from_dict(tiny_config(workdir, "lat_run", model=str(tmp_path / "other_model"),
                                              **{"data.latents_dir": str(out), "data.path": ""}))
    assert latents_settings(other.data, other.model)["model_identity"] != latents_settings(config.data, config.model)["model_identity"]
    with pytest.raises(ValueError, match="other weights"):
        check_inputs(other)


# ------------------------------------------------------------------------------------------ optimize()
def test_optimize_survives_deepcopy_and_channels_last_works() -> None:
    from svd_fast.diffusers.patching import restore  # noqa: PLC0415

    pipe = tiny_pipeline(seed=0)
    original_class = type(pipe)
    svd_fast.optimize(pipe)
    optimized_modules = [type(m).__name__ for m in pipe.unet.modules()]
    duplicate = copy.deepcopy(pipe)
    restore(duplicate)
    assert type(duplicate) is original_class and svd_fast.describe(duplicate) == {}
    assert not any("Fused" in type(m).__name__ for m in duplicate.unet.modules())
    assert type(pipe) is not original_class and [type(m).__name__ for m in pipe.unet.modules()] == optimized_modules
    assert svd_fast.describe(pipe)["patched"]
    restore(pipe)

    unet = tiny_pipeline(seed=0).unet.eval()
    sample = torch.randn(1, TINY_NUM_FRAMES, 8, TINY_HEIGHT // 8, TINY_WIDTH // 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[7.0, 127.0, 0.02]])
    with torch.no_grad():
        expected = unet(sample, 10.0, hidden, ids).sample
        svd_fast.optimize(unet, channels_last=True)
        got = unet(sample, 10.0, hidden, ids).sample
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # fp32 on both sides; the fused GroupNorm sums in another order: a few ulp of the activations' scale.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ curation
def test_a_huge_flow_rate_samples_every_frame_instead_of_hanging(workdir: Path) -> None:
    from svd_fast.curation import analysis  # noqa: PLC0415

    scan = analysis.scan_video(workdir / "data" / "clip0.mp4", 64, 64, 1e9)
    assert list(scan.flow_indices) == list(range(len(scan.times)))
    assert all(math.isfinite(t) for t in np.asarray(scan.times))
