"""Trainer reliability: config types, `svd-fast train` user errors (one line, exit 2, no model loaded), the DeepSpeed
JSON merge, safe checkpoint loading (real ZeRO-2/3 checkpoints load, a crafted pickle is refused), and faults
during a checkpoint save (kill -9 at each phase, truncated and 0-byte files, a full disk): the next plain
resume completes. CPU, tiny model."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_fixtures import tiny_config as shared_tiny_config
from training_fixtures import with_keys, workdir_fixture

from svd_fast import _io
from svd_fast.training import TrainConfig, train
from svd_fast.training.checkpoint import COMPLETE, incomplete_reason, resolve_resume, safe_load
from svd_fast.training.config import DeepSpeedSection
from svd_fast.training.setup import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]


workdir = workdir_fixture("training_reliability")


def tiny_config(workdir: Path, out: str, **overrides) -> dict:
    return shared_tiny_config(workdir, out, **{"use_svd_fast_kernels": False, "device": "cpu", **overrides})


# ------------------------------------------------------------------------------------------ config types
@pytest.mark.parametrize(
    ("key", "value"),
    [("max_steps", True), ("optimizer.learning_rate", "1e-4"), ("logging.export", 1), ("seed", 1.5), ("data.path", 3),
     ("logging.sigma_bins", [1.0, "x"]), ("resume_from", 7), ("optimizer.learning_rate", float("nan")), ("data.stride", 0),
     ("activation_checkpointing", "some")],
)
def test_config_values_checked_against_declared_types(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TrainConfig.from_dict(with_keys({}, {key: value}))


def test_config_accepts_ints_for_floats_and_lists_of_files() -> None:
    config = TrainConfig.from_dict({"optimizer": {"learning_rate": 1}, "data": {"path": ["a.mp4", "b.mp4"], "stride": 2, "default_fps": 7}})
    assert config.optimizer.learning_rate == 1 and config.data.path == ["a.mp4", "b.mp4"]


# --------------------------------------------------------------------------------------- CLI user errors
def _cli_cases(workdir: Path) -> list[tuple[list[str], str]]:
    good = workdir / "good.json"
    good.write_text(json.dumps(tiny_config(workdir, "cli_out")))
    (workdir / "list.yaml").write_text("- 1\n- 2\n")
    (workdir / "broken.json").write_text("{not json")
    (workdir / "ds_conflict.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (workdir / "not_a_dir").write_text("")
    return [
        (["--config", str(workdir / "missing.yaml")], "does not exist"),
        (["--config", str(workdir / "list.yaml")], "mapping"),
        (["--config", str(good), "--set", "optimizer.learning_rte=1"], "optimizer.learning_rte"),
        (["--config", str(good), "--set", "learning_rte=1"], "learning_rte"),
        (["--config", str(good), "--set", "max_steps=true"], "max_steps"),
        (["--config", str(good), "--set", "max_steps"], "KEY=VALUE"),
        (["--config", str(good), "--set", "data.stride=0"], "data.stride"),
        (["--config", str(good), "--set", "stride=0"], "stride (now data.stride)"),
        (["--config", str(good), "--set", "deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
        (["--config", str(good), "--set", f"data.path={workdir / 'no_such_videos'}"], "data.path"),
        (["--config", str(good), "--set", f"data={workdir / 'no_such_videos'}"], "data (now data.path)"),
        (["--config", str(good), "--set", f"model={workdir / 'no_model'}"], "model"),
        (["--config", str(good), "--set", f"output_dir={workdir / 'not_a_dir' / 'out'}"], "output_dir"),
        (["--config", str(good), "--set", f"deepspeed.config={workdir / 'broken.json'}"], "deepspeed.config"),
        (["--config", str(good), "--set", f"deepspeed_config={workdir / 'broken.json'}"], "deepspeed_config (now deepspeed.config)"),
        (["--config", str(good), "--set", f"deepspeed.config={workdir / 'ds_conflict.json'}"], "zero_optimization.stage"),
        (["--config", str(good), "--set", f"resume_from={workdir / 'no_checkpoint'}"], "resume_from"),
        (["--config", str(good), "--set", "resume_from=latest", "--set", f"output_dir={workdir / 'never_ran'}"], "resume_from"),
        (["--config", str(good), "--set", "precision=fp16"], "fp16"),
        (["--config", str(good), "--set", "device=cuda"], "cuda") if not torch.cuda.is_available() else ([], "--config"),
        (["--config", str(good), "--bogus"], "--bogus"),
        ([], "--config"),
    ]


def test_train_cli_user_errors_are_one_line_before_any_model(workdir: Path, monkeypatch, capsys) -> None:
    from svd_fast import cli
    from svd_fast.training import trainer

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(trainer, "build_models", no_models)  # train() checks its inputs before it builds any
    monkeypatch.setattr(trainer, "setup_distributed", no_models)
    for arguments, fragment in _cli_cases(workdir):
        code = cli.main(["train", *arguments])
        err = capsys.readouterr().err
        assert code == 2, (arguments, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("svd-fast train: error: ") and fragment in lines[0], (arguments, err)


def test_user_deepspeed_json_is_merged_and_conflicts_named(tmp_path: Path) -> None:
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}, "communication_data_type": "fp32"}))
    merged = build_deepspeed_config(TrainConfig(deepspeed=DeepSpeedSection(config=str(extra), zero_stage=2)))
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}
    assert merged["communication_data_type"] == "fp32" and merged["train_micro_batch_size_per_gpu"] == 1
    extra.write_text(json.dumps({"gradient_clipping": 0.5, "bf16": {"enabled": False}}))
    with pytest.raises(ValueError, match=r"gradient_clipping=0.5.*bf16.enabled=false"):
        build_deepspeed_config(TrainConfig(deepspeed=DeepSpeedSection(config=str(extra))))


# ------------------------------------------------------------------------------------------ safe loading
class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("stage", [2, 3])
def test_real_zero_checkpoints_load_safely_and_a_crafted_pickle_is_refused(workdir: Path, stage: int) -> None:
    result = train(tiny_config(workdir, f"safe_zero{stage}", max_steps=1, ema_decay=0.9, **{"deepspeed.zero_stage": stage}))
    files = sorted(result.checkpoint_dir.glob("*.pt"))
    assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files)
    for path in files:
        safe_load(path, map_location="cpu")  # every file of a real checkpoint, weights_only with the allowlist
    # Resuming loads DeepSpeed's files through the same safe loader and continues.
    resumed = train(tiny_config(workdir, f"safe_zero{stage}", max_steps=2, ema_decay=0.9, resume_from="latest", **{"deepspeed.zero_stage": stage}))
    assert resumed.steps == 2 and resumed.losses[0] == result.losses[0]
    crafted = files[0]
    crafted.write_bytes(pickle.dumps({"module": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError):
        safe_load(crafted, map_location="cpu")


# ------------------------------------------------------------------------------------ checkpoint faults
FAULT_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    from pathlib import Path
    import torch
    from svd_fast.training import checkpoint, train

    phase, config = sys.argv[1], json.loads(sys.argv[2])
    saves = {"count": 0}
    real_save, real_replace, real_torch_save = checkpoint.save_checkpoint, os.replace, torch.save

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save_checkpoint(engine, root, step, rank_files, rank, record=None, **retention):
        saves["count"] += 1
        if saves["count"] == 2:  # the first save completes; the second one fails at `phase`
            if phase == "disk_full":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
            elif phase == "deepspeed":
                def torch_save(obj, f, *args, **kwargs):
                    real_torch_save(obj, f, *args, **kwargs)
                    die()  # after DeepSpeed's first file
                torch.save = torch_save
            else:
                def replace(src, dst):
                    if Path(dst).name.startswith(phase):
                        die()
                    real_replace(src, dst)
                os.replace = replace
        return real_save(engine, root, step, rank_files, rank, record, **retention)

    checkpoint.save_checkpoint = save_checkpoint
    import svd_fast.training.trainer as trainer
    trainer.save_checkpoint = save_checkpoint
    train(config)
""")


@pytest.mark.parametrize("phase", ["deepspeed", "trainer_state", "ema", "complete", "latest", "disk_full"])
def test_fault_during_checkpoint_save_then_plain_resume_completes(workdir: Path, phase: str) -> None:
    values = tiny_config(workdir, f"fault_{phase}", max_steps=2, ema_decay=0.9, **{"logging.checkpoint_every": 1})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, phase, json.dumps(values)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    root = Path(values["output_dir"]) / "checkpoints"
    assert (root / "latest").read_text() == "step_1"  # never moved to the interrupted save
    assert incomplete_reason(root / "step_1") is None
    # Killed before `latest` moved: step_2 is whole but not yet named; every earlier phase leaves it incomplete.
    assert (incomplete_reason(root / "step_2") is None) == (phase == "latest")
    resumed = train(dict(values, resume_from="latest"))
    assert resumed.steps == 2 and len(resumed.losses) == 2
    assert incomplete_reason(root / "step_2") is None and (root / "latest").read_text() == "step_2"
    assert not list(root.rglob(f"{_io.PARTIAL_PREFIX}*"))  # the resumed save cleared what the killed one left
    steps = [json.loads(line)["step"] for line in (Path(values["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the resumed step is logged once


def test_truncated_and_empty_files_make_a_checkpoint_incomplete_and_latest_falls_back(workdir: Path, caplog) -> None:
    values = tiny_config(workdir, "damaged", max_steps=3, ema_decay=0.9, **{"logging.checkpoint_every": 1})
    full = train(values)
    root = Path(values["output_dir"]) / "checkpoints"
    model_file = next((root / "step_3").glob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    (root / "step_2" / "ema_rank0.pt").write_bytes(b"")  # 0 bytes
    assert "bytes" in incomplete_reason(root / "step_3") and "bytes" in incomplete_reason(root / "step_2")
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", Path(values["output_dir"])) == root / "step_1"
    assert "step_3 is incomplete" in caplog.text and "step_1" in caplog.text
    resumed = train(dict(values, resume_from="latest"))
    assert resumed.losses == full.losses  # bit-exact from step 1
    (root / "step_1" / COMPLETE).unlink()
    for tag in ("step_2", "step_3"):
        (root / tag / COMPLETE).unlink()
    assert resolve_resume("latest", Path(values["output_dir"])) is None  # nothing complete: start over, said in the log


def test_failing_svd_fast_kernels_are_an_error_not_a_silent_fallback(monkeypatch) -> None:
    from svd_fast.diffusers import patching
    from svd_fast.training.setup import apply_svd_fast_kernels

    def broken(unet):
        raise TypeError("unsupported block")

    monkeypatch.setattr(patching, "optimize", broken)
    with pytest.raises(RuntimeError, match="use_svd_fast_kernels.*unsupported block"):
        apply_svd_fast_kernels(torch.nn.Linear(1, 1), True)
    assert apply_svd_fast_kernels(torch.nn.Linear(1, 1), False).startswith("disabled")
