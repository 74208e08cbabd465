"""A user's DeepSpeed JSON (the config key ``deepspeed.config``, or DeepSpeed's own ``--deepspeed_config`` argument)
read into the training config: every training key the config leaves unset takes the JSON's value, so the run is
the one the JSON describes; a key both set differently is an error (``setup.build_deepspeed_config``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# DeepSpeed key path -> the training config key it sets (section.key).
SCALAR_KEYS: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "optimizer.gradient_accumulation_steps",
    ("gradient_clipping",): "optimizer.gradient_clipping",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "deepspeed.offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "deepspeed.offload_param",
    **{("zero_optimization", name): f"deepspeed.{name}" for name in (
        "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    )},  # fmt: skip
    ("optimizer", "params", "lr"): "optimizer.learning_rate",
    ("optimizer", "params", "eps"): "optimizer.adam_eps",
    ("optimizer", "params", "weight_decay"): "optimizer.weight_decay",
}
_MISSING = object()


def read_deepspeed_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"deepspeed.config: cannot read {str(path)!r} ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"deepspeed.config: {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(user, dict):
        raise ValueError(f"deepspeed.config: {str(path)!r} must hold a JSON object")
    return user


def without_auto(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without Hugging Face's ``"auto"`` placeholders ("whatever the trainer says": the config decides)."""
    return {key: without_auto(value) if isinstance(value, dict) else value for key, value in tree.items() if value != "auto"}


def _lookup(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return _MISSING if tree == "auto" else tree


def _precision(user: dict[str, Any]) -> Any:
    enabled = {name: _lookup(user, (key, "enabled")) for name, key in (("bf16", "bf16"), ("bfloat16", "bfloat16"), ("fp16", "fp16"))}
    if True in (enabled["bf16"], enabled["bfloat16"]):
        return "bf16"
    if enabled["fp16"] is True:
        return "fp16"
    return "fp32" if any(value is False for value in enabled.values()) else _MISSING


def world_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def adopt_deepspeed_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (training config keys as written by the user, sectioned: config_layout) completed from their
    ``deepspeed.config`` JSON: a key the user did not write takes the JSON's value (batch size, accumulation,
    clipping, ZeRO stage and offload, precision, AdamW settings). Keys the user wrote are kept; a difference is
    reported when the DeepSpeed config is built."""
    path = values.get("deepspeed", {}).get("config")
    if not path:
        return values
    user = read_deepspeed_json(path)
    adopted = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}

    def written(name: str) -> bool:
        section, dot, key = name.partition(".")
        return key in values.get(section, {}) if dot else name in values

    def take(name: str, value: Any) -> None:
        if isinstance(value, float) and value.is_integer() and name.endswith(("_size", "_parameters", "_distance")):
            value = int(value)  # DeepSpeed JSONs write bucket sizes as 5e8
        if value is _MISSING or written(name):
            return
        section, dot, key = name.partition(".")
        if dot:
            adopted.setdefault(section, {})[key] = value
        else:
            adopted[name] = value

    for keys, name in SCALAR_KEYS.items():
        take(name, _lookup(user, keys))
    betas = _lookup(user, ("optimizer", "params", "betas"))
    if isinstance(betas, list) and len(betas) == 2:
        take("optimizer.adam_beta1", betas[0])
        take("optimizer.adam_beta2", betas[1])
    take("precision", _precision(user))
    if "optimizer" in user:
        take("optimizer.name", "adamw_deepspeed")  # the JSON's optimizer runs: DeepSpeed builds it
    total = _lookup(user, ("train_batch_size",))
    micro = adopted.get("data", {}).get("batch_size", 1)
    if isinstance(total, int) and isinstance(micro, int) and micro > 0 and total % (micro * world_size()) == 0:
        take("optimizer.gradient_accumulation_steps", total // (micro * world_size()))
    return adopted
