"""The training config's sections: the flat layout of earlier releases maps onto them (one deprecation note),
unknown keys and bad values are errors naming ``section.key`` (or the flat key as written), --set takes both,
the shipped configs load without a note, and a checkpoint's flat config still compares on resume."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from svd_fast.commands.errors import UsageError
from svd_fast.training import TrainConfig
from svd_fast.training.checkpoint import COMPLETE
from svd_fast.training.distill import DistillConfig
from svd_fast.training.run import changed_settings

REPO = Path(__file__).resolve().parents[1]
LOGGER = "svd_fast.training.config"

FLAT = {
    "model": "m", "data": ["a.mp4", "b.mp4"], "num_frames": 8, "height": 64, "width": 64, "batch_size": 2, "target_fps": 6,
    "optimizer": "adamw_deepspeed", "learning_rate": 1e-4, "gradient_accumulation_steps": 2, "zero_stage": 3,
    "offload_optimizer": "cpu", "offload_param": "cpu", "deepspeed_config": None, "trained_parameters": "lora", "lora_rank": 4,
    "lora_alpha": 8.0, "lora_target_modules": ["to_q", "to_v"], "validate_every": 5, "validation_images": ["first.png"],
    "validation_num_frames": 4, "validation_inference_steps": 3, "p_mean": 0.5, "drop_both": 0.2, "log_every": 3,
    "sigma_bins": [0.5, 5.0], "checkpoint_every": 10, "export_ema": False, "ema_decay": 0.9, "seed": 7,
}  # fmt: skip
SECTIONED = {
    "model": "m", "trained_parameters": "lora", "ema_decay": 0.9, "seed": 7,
    "data": {"path": ["a.mp4", "b.mp4"], "num_frames": 8, "height": 64, "width": 64, "batch_size": 2, "target_fps": 6},
    "optimizer": {"name": "adamw_deepspeed", "learning_rate": 1e-4, "gradient_accumulation_steps": 2},
    "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu", "config": None},
    "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"]},
    "validation": {"every": 5, "images": ["first.png"], "num_frames": 4, "inference_steps": 3},
    "objective": {"p_mean": 0.5, "drop_both": 0.2},
    "logging": {"log_every": 3, "sigma_bins": [0.5, 5.0], "checkpoint_every": 10, "export_ema": False},
}  # fmt: skip


def test_flat_config_equals_its_sectioned_form_with_one_note_naming_the_moved_keys(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sectioned = TrainConfig.from_dict(SECTIONED)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        flat = TrainConfig.from_dict(FLAT)
    assert flat == sectioned
    assert flat.data.path == ["a.mp4", "b.mp4"] and flat.optimizer.name == "adamw_deepspeed" and flat.lora.rank == 4
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and "deprecated" in notes[0]
    for old, new in (("data", "data.path"), ("optimizer", "optimizer.name"), ("lora_rank", "lora.rank"), ("num_frames", "data.num_frames"),
                     ("validate_every", "validation.every"), ("deepspeed_config", "deepspeed.config"), ("p_mean", "objective.p_mean"),
                     ("sigma_bins", "logging.sigma_bins")):  # fmt: skip
        assert f"{old} -> {new}" in notes[0]
    assert "model ->" not in notes[0] and "seed ->" not in notes[0]


def test_distill_flat_config_equals_its_sectioned_form() -> None:
    flat = DistillConfig.from_dict({"model": "m", "data": "v", "learning_rate": 2e-5, "skip_steps": 2, "loss": "l2",
                                    "validation_inference_steps": 2})  # fmt: skip
    sectioned = DistillConfig.from_dict({"model": "m", "data": {"path": "v"}, "optimizer": {"learning_rate": 2e-5},
                                         "distill": {"skip_steps": 2, "loss": "l2"}, "validation": {"inference_steps": 2}})  # fmt: skip
    assert flat == sectioned
    # A partly written section keeps the distillation's defaults for the keys it leaves out.
    partial = DistillConfig.from_dict({"optimizer": {"weight_decay": 0.1}, "objective": {"p_mean": 0.0}})
    assert partial.optimizer.learning_rate == 1e-5 and partial.objective.drop_both == 0.0 and partial.validation.inference_steps == 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data": {"num_framez": 8}}, r"unknown config key\(s\) \['data\.num_framez'\]"),
        ({"optimizer": {"learning_rte": 1e-4}}, r"\['optimizer\.learning_rte'\]"),
        ({"lora.rnk": 2}, r"\['lora\.rnk'\]"),
        ({"nosection.key": 1}, r"\['nosection\.key'\]"),
        ({"learning_rte": 1e-4}, r"\['learning_rte'\]"),
        ({"data": {"num_frames": 0}}, r"^data\.num_frames must be a positive integer"),
        ({"num_frames": 0}, r"^num_frames \(now data\.num_frames\) must be a positive integer"),
        ({"lora": {"rank": True}}, r"^lora\.rank must be of type int"),
        ({"lora_rank": "4"}, r"^lora_rank \(now lora\.rank\) must be of type int"),
        ({"optimizer": {"learning_rate": float("nan")}}, r"optimizer\.learning_rate must be a finite number"),
        ({"validation": {"every": 2}}, r"^validation\.images: validation\.every is 2"),
        ({"num_frames": 8, "data": {"num_frames": 4}}, r"num_frames and data\.num_frames are both given"),
        ({"objective": {"p_std": 0.0}}, r"objective\.p_std must be > 0"),
        ({"deepspeed": 2}, r"deepspeed must be a mapping"),
    ],
)
def test_config_errors_name_section_and_key(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_distill_errors_name_the_distill_section() -> None:
    with pytest.raises(ValueError, match=r"distill\.skip_steps must be in \[1"):
        DistillConfig.from_dict({"distill": {"skip_steps": 0}})
    with pytest.raises(ValueError, match=r"distill\.sigma_min must be > 0"):
        DistillConfig.from_dict({"distill": {"sigma_min": 0.0}})
    with pytest.raises(ValueError, match=r"^skip_steps \(now distill\.skip_steps\) must be"):
        DistillConfig.from_dict({"skip_steps": 40})
    with pytest.raises(ValueError, match=r"objective\.drop_both must be 0 for distillation"):
        DistillConfig.from_dict({"objective": {"drop_both": 0.1}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_each_shipped_config_loads_in_the_sectioned_layout(path: Path, caplog) -> None:
    config_class = DistillConfig if path.name.startswith("distill") else TrainConfig
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = config_class.from_file(path)
    assert not caplog.records, "a shipped config uses the deprecated flat layout"
    assert config.max_steps >= 1 and config.model


def test_set_takes_section_keys_and_flat_keys(tmp_path: Path, caplog) -> None:
    from svd_fast.commands import train as train_command

    config_path = tmp_path / "c.yaml"
    config_path.write_text("model: m\ndata:\n  path: v\n  num_frames: 8\noptimizer:\n  learning_rate: 1.0e-4\n")
    parser = argparse.ArgumentParser()
    train_command.add_parser(parser.add_subparsers(dest="command"))

    def load(*sets: str) -> TrainConfig:
        return train_command.load_config(parser.parse_args(["train", "--config", str(config_path), *[f"--set={item}" for item in sets]]))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        config = load("data.num_frames=4", "optimizer.name=adamw_deepspeed", "max_steps=3")
    assert (config.data.num_frames, config.optimizer.name, config.max_steps, config.optimizer.learning_rate) == (4, "adamw_deepspeed", 3, 1e-4)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load("num_frames=6").data.num_frames == 6  # a flat key overrides its section's value
    assert "num_frames -> data.num_frames" in caplog.records[0].getMessage()
    with pytest.raises(UsageError, match=r"optimizer\.learning_rte"):
        load("optimizer.learning_rte=1")
    with pytest.raises(UsageError, match=r"^data\.num_frames must be"):
        load("data.num_frames=0")


def test_deepspeed_json_values_fill_the_sections(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "zero_optimization": {"stage": 1},
                              "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.95]}}, "bf16": {"enabled": False}}))  # fmt: skip
    config = TrainConfig.from_dict({"deepspeed": {"config": str(ds)}, "optimizer": {"gradient_accumulation_steps": 1}})
    assert (config.data.batch_size, config.deepspeed.zero_stage, config.precision) == (2, 1, "fp32")
    assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.adam_beta1) == ("adamw_deepspeed", 2e-4, 0.8)
    assert config.optimizer.gradient_accumulation_steps == 1  # written by the user: kept (a conflict is reported later)
    assert TrainConfig.from_dict({"deepspeed_config": str(ds)}).deepspeed.zero_stage == 1  # the flat key too


def test_resume_compares_a_flat_saved_config_by_the_keys_new_places(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    saved = {"model": "m", "data": "v", "num_frames": 8, "learning_rate": 1e-4, "lora_rank": 16, "max_steps": 10}
    (checkpoint / COMPLETE).write_text(json.dumps({"step": 1, "files": {}, "config": saved}))
    now = TrainConfig.from_dict({"model": "m", "max_steps": 20, "data": {"path": "v", "num_frames": 8}, "optimizer": {"learning_rate": 2e-4}})
    changes = changed_settings(checkpoint, now.to_dict(), report=False)
    assert changes["optimizer.learning_rate"] == (1e-4, 2e-4) and changes["max_steps"] == (10, 20)
    assert "data.num_frames" not in changes and "lora.rank" not in changes
    with pytest.raises(ValueError, match=r"data\.num_frames 8 -> 4"):
        changed_settings(checkpoint, TrainConfig.from_dict({"model": "m", "data": {"path": "v", "num_frames": 4}}).to_dict())
