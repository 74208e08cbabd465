"""Which run a checkpoint belongs to, and what changed on resume.

A run is identified by its config hash and start time (``run_id``), written to ``output_dir/run.json`` when it
starts fresh and recorded in every checkpoint and log record. ``resume_from: latest`` continues only the run
``run.json`` names: a fresh run killed before its first checkpoint never resumes an older run's checkpoint in
the same folder (unless ``allow_other_run: true``, which then continues that run). A checkpoint written before
run identities existed is accepted as this run's.

On resume the config is compared with the one the checkpoint was trained with: keys the saved state depends on
(:data:`FIXED_ON_RESUME`) are refused when changed; the others are listed in the log and applied (the learning
rate explicitly, as DeepSpeed restores the saved one with the optimizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from svd_fast import _io
from svd_fast.training.checkpoint import read_complete
from svd_fast.training.config_layout import dotted, dotted_like

LOGGER = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Keys that only say how to start or resume, not what is trained.
NOT_IDENTITY = ("resume_from", "allow_other_run")
FIXED_ON_RESUME = (
    "model", "data.path", "data.latents_dir", "data.num_frames", "data.height", "data.width", "data.stride", "data.target_fps",
    "data.random_crop", "data.shuffle", "data.on_short", "data.batch_size", "optimizer.name", "optimizer.gradient_accumulation_steps",
    "optimizer.weight_decay", "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps", "deepspeed.zero_stage",
    "deepspeed.offload_optimizer", "deepspeed.offload_param", "deepspeed.config", "precision", "trained_parameters", "lora.rank",
    "lora.alpha", "lora.dropout", "lora.target_modules", "lora.layers", "ema_decay", "seed",
)  # fmt: skip


def config_hash(config_dict: dict[str, Any]) -> str:
    identity = {key: value for key, value in config_dict.items() if key not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    digest = config_hash(config_dict)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"run_id": f"{started}-{digest}", "config_hash": digest, "started_at": started}


def current_identity(output_dir: Path) -> dict[str, Any] | None:
    try:
        identity = json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return identity if isinstance(identity, dict) and "run_id" in identity else None


def write_identity(output_dir: Path, identity: dict[str, Any]) -> None:
    _io.write_json(output_dir / RUN_FILE, identity, fsync=True)


def check_same_run(checkpoint: Path, output_dir: Path, allow_other_run: bool) -> None:
    """ValueError when ``checkpoint`` (found by ``resume_from: latest``) belongs to another run than the one
    ``output_dir`` holds."""
    ours, theirs = current_identity(output_dir), read_complete(checkpoint).get("run")
    if ours is None or not isinstance(theirs, dict) or theirs.get("run_id") == ours["run_id"] or allow_other_run:
        return
    raise ValueError(
        f"resume_from: latest is {checkpoint.name} of run {theirs.get('run_id')} (started {theirs.get('started_at')}), but "
        f"{output_dir} now holds run {ours['run_id']}, started fresh after it; set allow_other_run: true to continue the "
        "older run, or resume_from: null to start over"
    )


def changed_settings(checkpoint: Path, config_dict: dict[str, Any], report: bool = True) -> dict[str, tuple[Any, Any]]:
    """Keys (``section.key``) whose value differs from the config ``checkpoint`` was trained with: key -> (saved,
    now); a checkpoint's flat config (earlier releases) compares by the keys' new places. A change of a
    :data:`FIXED_ON_RESUME` key is a ValueError listing every such key."""
    saved = read_complete(checkpoint).get("config")
    if not isinstance(saved, dict):
        return {}
    config_dict = dotted(config_dict)
    saved = dotted_like(saved, config_dict)
    changes = {key: (saved[key], value) for key, value in config_dict.items()
               if key in saved and key not in NOT_IDENTITY and saved[key] != value}  # fmt: skip
    fixed = [f"{key} {saved!r} -> {now!r}" for key, (saved, now) in changes.items() if key in FIXED_ON_RESUME]
    if fixed:
        raise ValueError(f"resume_from: {checkpoint} was trained with other values of keys its saved state depends on: "
                         f"{'; '.join(fixed)} (restore them, or start a new run in another output_dir)")
    if changes and report:
        listed = "; ".join(f"{key} {saved!r} -> {now!r}" for key, (saved, now) in changes.items())
        LOGGER.warning("resume from %s: settings changed since it was saved, applied: %s", checkpoint.name, listed)
    return changes


def apply_learning_rate(engine, learning_rate: float) -> None:
    """Make the optimizer and its scheduler use ``learning_rate`` (DeepSpeed restored the checkpoint's)."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    rates = [learning_rate * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]  # LambdaLR (setup.build_models)
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"] = learning_rate
        group["lr"] = lr
