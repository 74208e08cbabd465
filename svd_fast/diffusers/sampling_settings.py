"""``svd_fast.json``: how a pipeline folder wants to be sampled, beside its model_index.json.

``svd-fast distill`` writes it for its students (consistency sampling, the scheduler config, the step count and
guidance 1); stock diffusers ignores the file and loads the folder as any SVD pipeline. ``svd-fast generate``
reads it (:func:`read_sampling_settings`, checked before any model loads) and loads the pipeline with the scheduler
it names, so a student samples as it was distilled without flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLING_SETTINGS_FILE = "svd_fast.json"
SETTINGS_KEYS = ("sampler", "scheduler", "scheduler_config", "num_inference_steps", "min_guidance", "max_guidance")


def read_sampling_settings(folder: str | Path) -> dict[str, Any] | None:
    """The checked settings of ``folder``/svd_fast.json, or None when the folder has none. ValueError names the
    file and the key at fault."""
    from svd_fast.sampling.consistency import check_consistency_config  # noqa: PLC0415 - svd_fast.sampling.consistency imports torch, loaded only when this runs

    path = Path(folder) / SAMPLING_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected {list(SETTINGS_KEYS)}")
    if settings.get("sampler") != "consistency" or settings.get("scheduler") != "SVDConsistencyScheduler":
        raise ValueError(f"{path}: sampler must be 'consistency' with scheduler 'SVDConsistencyScheduler', got "
                         f"{settings.get('sampler')!r} / {settings.get('scheduler')!r}")
    config = check_consistency_config(settings.get("scheduler_config", {}), where=f"{path}: scheduler_config")
    steps = settings.get("num_inference_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= config["num_train_timesteps"]:
        raise ValueError(f"{path}: num_inference_steps must be an int in [1, {config['num_train_timesteps']}], got {steps!r}")
    for key in ("min_guidance", "max_guidance"):
        value = settings.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path}: {key} must be a number >= 0, got {value!r}")
    return {**settings, "scheduler_config": config, "min_guidance": settings.get("min_guidance", 1.0),
            "max_guidance": settings.get("max_guidance", 1.0)}
