"""Checkpoint retention (logging.keep_checkpoints, logging.keep_every): a tiny training run keeps exactly the checkpoints asked for,
the one ``latest`` names and one being written are never deleted, and bad values are one-line errors. CPU, tiny
model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from training_fixtures import tiny_config, workdir_fixture

from svd_fast.training import TrainConfig, train
from svd_fast.training.checkpoint import COMPLETE, LATEST, incomplete_reason, prune_checkpoints

workdir = workdir_fixture("training_retention")


def test_training_keeps_the_newest_and_every_kth_checkpoint(workdir: Path) -> None:
    result = train(tiny_config(workdir, "kept", max_steps=5, **{"logging.checkpoint_every": 1, "logging.keep_checkpoints": 2, "logging.keep_every": 2}))
    root = workdir / "kept" / "checkpoints"
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == ["step_2", "step_4", "step_5"]
    assert (root / LATEST).read_text() == "step_5" and result.checkpoint_dir == root / "step_5"
    assert all(incomplete_reason(root / tag) is None for tag in ("step_2", "step_4", "step_5"))
    assert not [path for path in root.iterdir() if path.name.startswith(".")]  # nothing half-deleted left behind


def test_retention_never_deletes_latest_nor_a_newer_checkpoint_being_written(tmp_path: Path) -> None:
    for step in range(1, 6):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / COMPLETE).write_text(json.dumps({"files": {}}))
    (tmp_path / LATEST).write_text("step_3")  # step_4 and step_5: saves not yet complete (being written)
    assert prune_checkpoints(tmp_path, keep=1) == ["step_1", "step_2"]
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["step_3", "step_4", "step_5"]
    assert prune_checkpoints(tmp_path, keep=None) == []


@pytest.mark.parametrize(("overrides", "key"), [({"logging.keep_checkpoints": 0}, "logging.keep_checkpoints"), ({"logging.keep_every": -1}, "logging.keep_every"),
                                                ({"logging.keep_checkpoints": 1.5}, "logging.keep_checkpoints"),
                                                ({"keep_checkpoints": 0}, "keep_checkpoints (now logging.keep_checkpoints)")])
def test_bad_retention_is_one_line_naming_the_key(workdir: Path, overrides: dict, key: str, capsys) -> None:
    from svd_fast import cli

    with pytest.raises(ValueError, match=re.escape(key)):
        TrainConfig.from_dict(tiny_config(workdir, "bad", **overrides))
    config = workdir / "retention_bad.json"
    config.write_text(json.dumps(tiny_config(workdir, "bad")))
    arguments = [item for name, value in overrides.items() for item in ("--set", f"{name}={json.dumps(value)}")]
    assert cli.main(["train", "--config", str(config), *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-fast train: error: ") and key in lines[0], lines


def test_resume_from_a_checkpoint_of_another_model_is_one_line_before_the_model_loads(workdir: Path, capsys) -> None:
    import shutil

    from svd_fast import cli

    train(tiny_config(workdir, "first", max_steps=1))
    other = workdir / "other_model"
    shutil.copytree(workdir / "tiny", other)
    config = workdir / "other_model.json"
    config.write_text(json.dumps(tiny_config(workdir, "second", model=str(other), resume_from=str(workdir / "first" / "checkpoints" / "step_1"))))
    capsys.readouterr()  # the first run's progress bars
    assert cli.main(["train", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-fast train: error: resume_from: ") and "model" in lines[0], lines
    assert not (workdir / "second" / "checkpoints").exists() and not (workdir / "second" / "run.json").exists()  # nothing started
