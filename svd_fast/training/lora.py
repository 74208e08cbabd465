"""LoRA adapters (peft) on the UNet's attention projections, and their files.

diffusers 0.42.1 gives ``UNetSpatioTemporalConditionModel`` no PEFT integration (no ``add_adapter`` /
``load_lora_adapter``; its ``load_attn_procs`` reads Custom Diffusion weights only) and
``StableVideoDiffusionPipeline`` no ``load_lora_weights``, so the adapter is injected with peft's own
``inject_adapter_in_model`` (what diffusers' ``add_adapter`` calls) and written as diffusers'
``save_lora_adapter`` writes it: ``pytorch_lora_weights.safetensors`` holding ``get_peft_model_state_dict``
with the LoraConfig as JSON under the ``lora_adapter_metadata`` key, and also as peft's ``save_pretrained`` writes
it (``adapter_config.json`` + ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``). :func:`load_lora` reads it back (with
:func:`svd_fast.diffusers.lora.read_lora`, which generation's :func:`svd_fast.load_lora` uses) into a base UNet as
peft layers; :func:`merge_lora` folds it into the base weights (the exported pipeline's UNet).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from svd_fast.training.config import LORA_TARGETS

ADAPTER_NAME = "default"
LORA_PARAMETER_MARK = ".lora_"
PEFT_PREFIX = "base_model.model."  # the keys of a PeftModel wrapping the UNet
__all__ = ["LORA_TARGETS", "add_lora", "load_lora", "merge_lora", "save_lora"]


def add_lora(unet: torch.nn.Module, config) -> int:
    """Inject the adapter of ``config`` (a peft LoraConfig) and freeze everything else; returns the number of
    trainable (LoRA) parameters."""
    from peft import inject_adapter_in_model  # noqa: PLC0415 - peft loads only for LoRA

    inject_adapter_in_model(config, unet, ADAPTER_NAME)
    for name, param in unet.named_parameters():
        param.requires_grad_(LORA_PARAMETER_MARK in name)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_lora(unet: torch.nn.Module, config, folder: Path, base_model: str | None = None) -> Path:
    """Write the adapter (fp32) in diffusers' ``save_lora_adapter`` format and in peft's ``save_pretrained`` layout
    (``adapter_config.json`` + ``adapter_model.safetensors`` with ``base_model.model.`` keys, what
    ``PeftModel.from_pretrained`` reads); returns the diffusers weights file."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE  # noqa: PLC0415 - diffusers loads only when a model is built
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict  # noqa: PLC0415 - peft loads only for LoRA
    from safetensors.torch import save_file  # noqa: PLC0415 - safetensors loads only with LoRA weights

    state = {key: value.detach().float().contiguous() for key, value in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    metadata = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHT_NAME_SAFE
    save_file(state, path, metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    save_file({f"{PEFT_PREFIX}{key}": value for key, value in state.items()}, folder / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    return path


def load_lora(unet: torch.nn.Module, path: str | Path) -> None:
    """Inject the adapter saved by :func:`save_lora` (or any layout :func:`svd_fast.diffusers.lora.read_lora`
    reads) into ``unet`` as peft layers (trainable again); for generation use :func:`svd_fast.load_lora`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # noqa: PLC0415 - peft loads only for LoRA

    from svd_fast.diffusers.lora import check_lora, read_lora  # noqa: PLC0415 - imports diffusers

    adapter = read_lora(path)
    if not adapter.config:
        raise ValueError(f"path: {adapter.path!r} has no LoraConfig (metadata or adapter_config.json) to train it further with")
    check_lora(unet, adapter)
    config = LoraConfig(**{key: value for key, value in adapter.config.items() if key in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(config, unet, ADAPTER_NAME)
    set_peft_model_state_dict(unet, adapter.state_dict(), adapter_name=ADAPTER_NAME)


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base layer's weight and put the base layer back: a plain diffusers UNet."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415 - peft loads only for LoRA

    adapted = [(name, module) for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    return unet
