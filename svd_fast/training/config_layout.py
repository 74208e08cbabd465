"""The sectioned layout of training configs, and the flat layout of earlier releases mapped onto it.

A config writes the run's own keys at the top and one mapping per section (``data:``, ``optimizer:``, ...). The
flat layout wrote every key at the top; it still loads: each flat key moves to its section (``num_frames`` ->
``data.num_frames``, ``lora_rank`` -> ``lora.rank``) and one deprecation note names the moved keys and their new
place. Two flat keys share a section's name: ``data`` (a path or a list of them: ``data.path``) and ``optimizer``
(a name: ``optimizer.name``); a mapping there is the section. Errors about a moved key name it as the user wrote
it, with its new place (:func:`as_given`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass, field
from typing import Any

LOGGER = logging.getLogger("svd_fast.training.config")
# Flat keys whose name changed on the move, besides the section prefix.
RENAMED = {
    "data": "data.path", "optimizer": "optimizer.name", "deepspeed_config": "deepspeed.config", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules", "lora_layers": "lora.layers",
    "validate_every": "validation.every", "validation_images": "validation.images",
    "validation_num_frames": "validation.num_frames", "validation_inference_steps": "validation.inference_steps",
    "validation_decode_chunk": "validation.decode_chunk",
}  # fmt: skip
FLAT_NAME = {new: old for old, new in RENAMED.items()}


@dataclass
class Layout:
    values: dict[str, Any]  # top-level keys, and each section's keys as a mapping under its name
    given_as: dict[str, str] = field(default_factory=dict)  # "section.key" -> the flat key the user wrote


def sections_of(cls: type) -> dict[str, type]:
    """Section name -> section class of the config class ``cls``."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[item.name])}


def flat_names(cls: type) -> dict[str, str]:
    """Flat key of the old layout -> ``section.key``, for every section key of ``cls``."""
    moved = {}
    for section, section_cls in sections_of(cls).items():
        for item in dataclasses.fields(section_cls):
            dotted = f"{section}.{item.name}"
            moved[FLAT_NAME.get(dotted, item.name)] = dotted
    return moved


def sectioned(values: dict[str, Any], cls: type, overrides: dict[str, Any] | None = None) -> Layout:
    """``values`` (as a config file writes them, sectioned or flat) in the sectioned layout, with ``overrides``
    (``section.key``, a top-level key, or a flat key) applied on top. A key given both flat and in its section
    is an error; flat keys are reported once, in one deprecation note."""
    sections = sections_of(cls)
    flat = flat_names(cls)
    top = {item.name for item in dataclasses.fields(cls)} - set(sections)
    layout = Layout({name: {} for name in sections})
    unknown: list[str] = []

    def set_in_section(dotted: str, value: Any, override: bool, flat_key: str | None = None) -> None:
        section, _, name = dotted.partition(".")
        if not override and name in layout.values[section]:
            old = flat_key or layout.given_as.get(dotted)
            raise ValueError(f"{old} and {dotted} are both given (the same key: write {dotted})")
        layout.values[section][name] = value
        if flat_key is not None:
            layout.given_as[dotted] = flat_key
        else:
            layout.given_as.pop(dotted, None)

    def put(key: str, value: Any, override: bool) -> None:
        section, dot, _ = key.partition(".")
        if dot:
            if section not in sections:
                unknown.append(key)
            else:
                set_in_section(key, value, override)
        elif key in sections and isinstance(value, dict):
            for name, item in value.items():
                put(f"{key}.{name}", item, override)
        elif key in top:
            layout.values[key] = value
        elif key in flat:
            set_in_section(flat[key], value, override, flat_key=key)
        elif key in sections:
            raise ValueError(f"{key} must be a mapping of its section's keys, got {value!r}")
        else:
            unknown.append(key)

    for key, value in values.items():
        put(key, value, override=False)
    for key, value in (overrides or {}).items():
        put(key, value, override=True)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(top)} and the sections {sorted(sections)}")
    if layout.given_as:
        moved = ", ".join(f"{old} -> {new}" for new, old in layout.given_as.items())
        LOGGER.warning("config: flat keys are deprecated, write them in their sections (%s)", moved)
    return layout


def build_sections(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``cls``: each section built from its defaults in ``cls`` (a DistillConfig's
    differ from a TrainConfig's) updated with the given keys; an unknown key is an error naming ``section.key``."""
    arguments = {key: value for key, value in values.items() if key not in sections_of(cls)}
    for item in dataclasses.fields(cls):
        given = values.get(item.name)
        if item.name not in sections_of(cls) or not given:
            continue
        default = item.default_factory()
        known = {section_field.name for section_field in dataclasses.fields(default)}
        unknown = sorted(f"{item.name}.{name}" for name in given if name not in known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; the keys of {item.name}: {sorted(known)}")
        arguments[item.name] = dataclasses.replace(default, **given)
    return arguments


def as_given(message: str, given_as: dict[str, str]) -> str:
    """``message`` with each ``section.key`` the user wrote flat named as written, then its new place."""
    if not given_as:
        return message
    pattern = "|".join(re.escape(dotted) for dotted in sorted(given_as, key=len, reverse=True))
    return re.sub(rf"(?<![\w.])({pattern})(?![\w])", lambda match: f"{given_as[match[1]]} (now {match[1]})", message)


def dotted(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A config dict (sectioned, or flat as checkpoints of earlier releases saved it) as ``section.key`` -> value."""
    items: dict[str, Any] = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            items.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            items[key] = value
    return items


def dotted_like(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a config dict) with the keys of ``current`` (dotted): a flat saved config's keys moved to their
    sections, so that a checkpoint of an earlier release compares key by key."""
    items = dotted(saved)
    for key in current:
        if key not in items and "." in key:
            old = FLAT_NAME.get(key, key.partition(".")[2])
            if old in saved and not isinstance(saved[old], dict):
                items[key] = saved[old]
    return items
