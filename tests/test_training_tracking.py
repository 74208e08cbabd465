"""Experiment tracking (logging.report_to: tensorboard | wandb) and the 8-bit optimizer (optimizer.name: adamw8bit): a tiny
training run reports loss, lr, loss by sigma bin and memory (wandb in offline mode) beside train_log.jsonl; a
missing optional package is a one-line error (exit 2) naming its extra, before any model loads. CPU, tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from training_fixtures import tiny_config, workdir_fixture

from svd_fast.training import train

workdir = workdir_fixture("training_tracking")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _installed("tensorboard"), reason="tensorboard is not installed (pip install 'svd_fast[tensorboard]')")
def test_tensorboard_gets_every_logged_scalar(workdir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(workdir, "tensorboard", **{"logging.report_to": "tensorboard", "logging.sigma_bins": [1.0]}))
    events = EventAccumulator(str(workdir / "tensorboard" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/memory_mb"} <= tags and any(tag.startswith("train/loss_sigma_") for tag in tags)
    logged = [json.loads(line) for line in (workdir / "tensorboard" / "train_log.jsonl").read_text().splitlines()]
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx([record["loss"] for record in logged])


@pytest.mark.skipif(not _installed("wandb"), reason="wandb is not installed (pip install 'svd_fast[wandb]')")
def test_wandb_offline_run_gets_the_log(workdir: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(workdir, "wandb", **{"logging.report_to": "wandb"}))
    runs = list((workdir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (workdir / "wandb" / "train_log.jsonl").read_text().count("\n") == 2


@pytest.mark.skipif(not _installed("bitsandbytes"), reason="bitsandbytes is not installed (pip install 'svd_fast[bitsandbytes]')")
def test_adamw8bit_trains(workdir: Path) -> None:
    result = train(tiny_config(workdir, "adamw8bit", max_steps=3, **{"optimizer.name": "adamw8bit"}))
    assert result.steps == 3 and all(loss == loss for loss in result.losses)


@pytest.mark.parametrize(("key", "value", "module"), [("logging.report_to", "tensorboard", "tensorboard"), ("logging.report_to", "wandb", "wandb"),
                                                     ("optimizer.name", "adamw8bit", "bitsandbytes")])
def test_missing_optional_package_is_one_line_before_the_model_loads(workdir: Path, key: str, value: str, module: str, capsys) -> None:
    if _installed(module):
        pytest.skip(f"{module} is installed: its missing-package error cannot happen here")
    from svd_fast import cli

    config = workdir / f"missing_{module}.json"
    config.write_text(json.dumps(tiny_config(workdir, f"missing_{module}", **{key: value})))
    assert cli.main(["train", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svd-fast train: error: {key}: {value} needs the {module} package"), lines
    assert f"svd_fast[{module}]" in lines[0] and not (workdir / f"missing_{module}").exists()  # nothing started


def test_bad_report_to_names_the_key(workdir: Path) -> None:
    from svd_fast.training import TrainConfig

    with pytest.raises(ValueError, match="logging.report_to"):
        TrainConfig.from_dict(tiny_config(workdir, "bad", **{"logging.report_to": "mlflow"}))
