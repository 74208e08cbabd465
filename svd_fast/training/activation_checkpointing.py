"""Activation checkpointing of chosen UNet blocks (recompute their forward in backward instead of storing
their activations).

Modes: ``temporal`` (each temporal transformer block and temporal resnet: the activations that grow with the
frame count), ``resnets`` (each spatio-temporal resnet block, spatial and temporal halves), ``all`` (each resnet
block and each spatio-temporal transformer, as diffusers' own gradient checkpointing cuts the UNet: whole
down/mid/up blocks would be too coarse, their recomputation alone holds tens of GiB at 25x576x1024). The block's class is swapped for a subclass whose ``__call__`` runs the ordinary module call
under ``torch.utils.checkpoint`` (non-reentrant). Going through ``__call__`` (not ``forward``) makes the module
hooks run again on recomputation, which ZeRO-3 needs to re-gather the block's parameters; parameter names and
the state dict stay the same, and svd_fast's fused blocks and custom autograd ops are recomputed like any module.
"""

from __future__ import annotations

import re

import torch
from torch.utils.checkpoint import checkpoint

MODE_PATTERNS = {
    "none": None,
    "temporal": re.compile(r"(^|\.)temporal_transformer_blocks\.\d+$|(^|\.)temporal_res_block$"),
    "resnets": re.compile(r"(^|\.)resnets\.\d+$"),
    "all": re.compile(r"(^|\.)(resnets|attentions)\.\d+$"),
}
_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_call(self: torch.nn.Module, *args, **kwargs):
    call = super(type(self), self).__call__
    if not (self.training and torch.is_grad_enabled()):
        return call(*args, **kwargs)
    return checkpoint(call, *args, use_reentrant=False, **kwargs)


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed_call})
    return _CHECKPOINTED_CLASSES[cls]


def checkpointed_module_names(unet: torch.nn.Module, mode: str) -> list[str]:
    if mode not in MODE_PATTERNS:
        raise ValueError(f"activation_checkpointing must be one of {tuple(MODE_PATTERNS)}, got {mode!r}")
    pattern = MODE_PATTERNS[mode]
    return [] if pattern is None else [name for name, _ in unet.named_modules() if pattern.search(name)]


def enable_activation_checkpointing(unet: torch.nn.Module, mode: str) -> list[str]:
    """Checkpoint the blocks ``mode`` selects; returns their names. Idempotent."""
    names = checkpointed_module_names(unet, mode)
    for name in names:
        module = unet.get_submodule(name)
        if type(module) not in _CHECKPOINTED_CLASSES.values():
            module.__class__ = _checkpointed_class(type(module))
    return names


def disable_activation_checkpointing(unet: torch.nn.Module) -> None:
    originals = {checkpointed: original for original, checkpointed in _CHECKPOINTED_CLASSES.items()}
    for module in unet.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
