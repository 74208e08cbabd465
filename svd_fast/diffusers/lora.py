"""LoRA adapters on a Stable Video Diffusion UNet at inference: :func:`load_lora`, several at once, fused or not.

diffusers 0.42 gives ``UNetSpatioTemporalConditionModel`` no adapter loading (and the SVD pipeline no
``load_lora_weights``), so this module reads the files itself:

* the layout ``svd-fast train`` writes (``OUTPUT/lora/pytorch_lora_weights.safetensors``, the LoraConfig as JSON
  under the ``lora_adapter_metadata`` key; the folder ``OUTPUT`` or ``OUTPUT/lora`` or the file may be given);
* diffusers' ``save_lora_adapter`` / ``save_lora_weights`` (the same file, keys with or without the ``unet.``
  prefix);
* peft's ``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``, ``base_model.model.`` keys).

Keys are peft's ``<module>.lora_A[.<adapter>].weight`` / ``lora_B``; the LoraConfig (peft's class reads it) gives
each module's scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
honoured); without a config the scaling is 1 (alpha = rank, as diffusers assumes). Every key is checked against
the UNet before anything changes: a module the UNet lacks, a shape or rank mismatch, or a file without LoRA
weights is a ValueError of one line naming it.

Two ways to apply the adapters (``W x + sum_i scale_i * scaling_i * B_i A_i x`` on every adapted Linear):

* fused (the default, for generation): ``W`` becomes ``W + sum_i scale_i scaling_i B_i A_i`` (computed in fp32,
  written in the weight's dtype), so sampling costs nothing extra. The touched weights are first copied to the
  CPU, and :func:`unfuse_lora` / :func:`unload_lora` copy them back: bit-exact (as long as the weights' dtype is
  not changed in between). That copy is the size of the adapted weights: for SVD / SVD-XT with adapters on
  every attention projection (to_q, to_k, to_v, to_out.0 of every attn1/attn2), 199.8 M parameters, 0.37 GiB in
  fp16 or 0.74 GiB in fp32 of host memory, whatever the number of adapters;
* unfused (``fuse=False``): a forward hook per adapted Linear adds ``scale * scaling * B(A(x))``; scales can be
  changed (:func:`set_lora_scale`) and adapters removed without touching a weight.

The adapters work on a pipeline optimized by :func:`svd_fast.optimize`, before or after it: optimize keeps every
Linear (the fused temporal block calls its attention's own to_q / to_k / to_v / to_out), so the fused update and
the hooks reach its projections, and :func:`svd_fast.restore` leaves the adapters as they are. With
``cuda_graphs=True`` the captured graphs are dropped on every change here (fused weights are updated in place,
but hooks change the computation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svd_fast.diffusers.cuda_graph import CUDAGraphedForward

WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PEFT_CONFIG_FILE = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KEY_PREFIXES = ("base_model.model.", "unet.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_STATE_ATTRIBUTE = "_svd_fast_lora"

__all__ = ["LoraAdapter", "fuse_lora", "load_lora", "lora_adapters", "read_lora", "set_lora_scale", "unfuse_lora", "unload_lora"]


@dataclass
class LoraAdapter:
    """One adapter file: per adapted module (its name in the UNet) the (A (r, in), B (out, r)) pair and the
    scaling of its LoraConfig."""

    path: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    config: dict[str, Any]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft's keys (``<module>.lora_A.weight``), the form ``set_peft_model_state_dict`` reads."""
        return {f"{name}.lora_{part}.weight": tensor for name, (a, b, _) in self.layers.items() for part, tensor in (("A", a), ("B", b))}


def _weights_file(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"path: {str(path)!r} does not exist")
    if path.is_file():
        return path
    for folder in (path, path / "lora"):
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise ValueError(f"path: {str(path)!r} holds none of {list(WEIGHT_FILES)} (nor a lora/ folder with one)")


def _read_config(weights: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY in metadata:
        return json.loads(metadata[METADATA_KEY])
    peft_config = weights.with_name(PEFT_CONFIG_FILE)
    if peft_config.is_file():
        return json.loads(peft_config.read_text())
    return {}


def read_lora(path: str | Path) -> LoraAdapter:
    """Read an adapter (folder or ``.safetensors`` file, see the module docstring) without touching any model."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - safetensors loads only when this runs

    weights = _weights_file(Path(path).expanduser())
    try:
        with safe_open(weights, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - safe_open is no mapping
    except (SafetensorError, OSError) as error:
        raise ValueError(f"path: {str(weights)!r} is not a safetensors file ({error})") from None
    config = _read_config(weights, metadata)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        for prefix in _KEY_PREFIXES:
            key = key.removeprefix(prefix)
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if not pairs:
        raise ValueError(f"path: {str(weights)!r} holds no LoRA weights (no '.lora_A.weight' / '.lora_B.weight' keys; first keys: {sorted(tensors)[:3]})")
    if others:
        raise ValueError(f"path: {str(weights)!r} has keys that are not LoRA A/B weights (e.g. {others[0]!r}; DoRA and LoRA biases are not supported)")
    if config.get("use_dora"):
        raise ValueError(f"path: {str(weights)!r} is a DoRA adapter (use_dora), which load_lora does not apply")
    layers = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"path: {str(weights)!r} has lora_{next(iter(pair))} but no lora_{'B' if 'A' in pair else 'A'} for module {module!r}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"path: {str(weights)!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not (r, in) and (out, r)")
        layers[module] = (a, b, _scaling(config, module, a.shape[0], weights))
    return LoraAdapter(str(weights), layers, config)


def _scaling(config: dict[str, Any], module: str, rank: int, weights: Path) -> float:
    """lora_alpha / r of ``module`` as peft computes it (1 without a config)."""
    if not config:
        return 1.0
    from peft.utils.other import get_pattern_key  # noqa: PLC0415 - peft loads only when this runs

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", rank))
    if expected_rank != rank:
        raise ValueError(f"path: {str(weights)!r}: module {module!r} has rank {rank} but its LoraConfig says r={expected_rank}")
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_lora(unet: nn.Module, adapter: LoraAdapter) -> dict[str, nn.Linear]:
    """The UNet's Linear for every adapted module; ValueError naming the first module it lacks or whose shape differs."""
    missing = [name for name in adapter.layers if not _has_submodule(unet, name)]
    if missing:
        raise ValueError(
            f"path: {adapter.path!r} has weights for {len(missing)} module(s) this UNet lacks (e.g. {missing[0]!r}): "
            "an adapter for another model"
        )
    modules = {}
    for name, (a, b, _) in adapter.layers.items():
        module = unet.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"path: {adapter.path!r}: module {name!r} is a {type(module).__name__}; adapters apply to Linear layers only")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise ValueError(
                f"path: {adapter.path!r}: module {name!r} is Linear({module.in_features}, {module.out_features}) but the adapter's "
                f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}: an adapter for another model size"
            )
        modules[name] = module
    return modules


def _has_submodule(unet: nn.Module, name: str) -> bool:
    try:
        unet.get_submodule(name)
    except AttributeError:
        return False
    return True


class _LoraHook:
    """Forward hook adding the unfused adapters' ``scale * scaling * B(A(x))`` to a Linear's output."""

    def __init__(self) -> None:
        self.terms: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []  # (adapter, A, B, scale * scaling)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        for index, (name, a, b, factor) in enumerate(self.terms):
            if a.device != x.device or a.dtype != x.dtype:
                a, b = a.to(x.device, x.dtype), b.to(x.device, x.dtype)
                self.terms[index] = (name, a, b, factor)
            output = output + nn.functional.linear(nn.functional.linear(x, a), b) * factor
        return output


@dataclass
class _LoraState:
    """The adapters of one UNet (kept on it as an attribute)."""

    adapters: dict[str, tuple[LoraAdapter, float]] = field(default_factory=dict)
    fused: bool = True
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # fused: CPU copies of the touched weights
    hooks: list[Any] = field(default_factory=list)  # unfused: the hook handles

    @property
    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())


def _unet_of(target: Any) -> nn.Module:
    unet = getattr(target, "unet", target)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"target must be a StableVideoDiffusionPipeline or its UNet, got {type(target).__name__}")
    return unet


def _drop_cuda_graphs(unet: nn.Module) -> None:
    forward = vars(unet).get("forward")
    if isinstance(forward, CUDAGraphedForward):
        forward.clear()


def _remove_application(unet: nn.Module, state: _LoraState) -> None:
    """Put the UNet back to its own weights and forwards (the adapters stay in ``state``)."""
    with torch.no_grad():
        for name, original in state.originals.items():
            unet.get_submodule(name).weight.copy_(original)
    state.originals.clear()
    for handle in state.hooks:
        handle.remove()
    state.hooks.clear()


def _apply(unet: nn.Module, state: _LoraState) -> None:
    """Apply every adapter of ``state`` (fused or as hooks) to a UNet that has its own weights and forwards."""
    per_module: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, float]]] = {}
    for adapter_name, (adapter, scale) in state.adapters.items():
        for module_name, (a, b, scaling) in adapter.layers.items():
            per_module.setdefault(module_name, []).append((adapter_name, a, b, scale * scaling))
    with torch.no_grad():
        for module_name, terms in per_module.items():
            module = unet.get_submodule(module_name)
            if state.fused:
                weight = module.weight
                state.originals[module_name] = weight.detach().to("cpu", copy=True)
                delta = sum(b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32) * factor for _, a, b, factor in terms)
                weight.copy_(weight.float() + delta)
            else:
                hook = _LoraHook()
                hook.terms = list(terms)
                state.hooks.append(module.register_forward_hook(hook))
    _drop_cuda_graphs(unet)


def _state(unet: nn.Module) -> _LoraState:
    state = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("target has no LoRA adapter loaded (svd_fast.load_lora)")
    return state


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def load_lora(target: Any, path: str | Path, scale: float = 1.0, adapter_name: str | None = None, fuse: bool = True) -> str:
    """Add the LoRA adapter at ``path`` (folder or ``.safetensors`` file; layouts in the module docstring) to
    ``target`` (a StableVideoDiffusionPipeline or its UNet, optimized or not), weighted by ``scale``. Returns the
    adapter's name (``adapter_name``, default ``"adapter_<n>"``). Several adapters add up, each with its own scale.

    ``fuse``: fold the adapters into the weights (no cost per step; a CPU copy of the touched weights restores them,
    see :func:`unfuse_lora`) or apply them as forward hooks. It applies to every adapter of the target: loading
    with another ``fuse`` than the adapters already loaded switches them all.
    Nothing changes when the file, a key, a shape or an argument is wrong (ValueError naming it).
    """
    unet = _unet_of(target)
    scale = _check_scale(scale)
    state = getattr(unet, _STATE_ATTRIBUTE, None) or _LoraState(fused=fuse)
    name = adapter_name if adapter_name is not None else f"adapter_{len(state.adapters)}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if name in state.adapters:
        raise ValueError(f"adapter_name: {name!r} is already loaded (unload_lora(target, {name!r}) first, or pick another name)")
    adapter = read_lora(path)
    check_lora(unet, adapter)
    _remove_application(unet, state)
    state.adapters[name] = (adapter, scale)
    state.fused = fuse
    _apply(unet, state)
    setattr(unet, _STATE_ATTRIBUTE, state)
    return name


def set_lora_scale(target: Any, adapter_name: str, scale: float) -> None:
    """Change the scale of a loaded adapter (refused while fused: :func:`unfuse_lora` first, or reload)."""
    unet = _unet_of(target)
    state = _state(unet)
    scale = _check_scale(scale)
    if adapter_name not in state.adapters:
        raise ValueError(f"adapter_name: {adapter_name!r} is not loaded (loaded: {sorted(state.adapters)})")
    _remove_application(unet, state)
    state.adapters[adapter_name] = (state.adapters[adapter_name][0], scale)
    _apply(unet, state)


def fuse_lora(target: Any) -> None:
    """Fold the loaded adapters into the weights (a no-op when they already are)."""
    unet = _unet_of(target)
    state = _state(unet)
    if not state.fused:
        _remove_application(unet, state)
        state.fused = True
        _apply(unet, state)


def unfuse_lora(target: Any) -> None:
    """Give the adapted weights back their original values, bit for bit, and apply the adapters as hooks."""
    unet = _unet_of(target)
    state = _state(unet)
    if state.fused:
        _remove_application(unet, state)
        state.fused = False
        _apply(unet, state)


def unload_lora(target: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (``adapter_name``) or all of them; the weights not adapted by those left are bit-exact again."""
    unet = _unet_of(target)
    state = _state(unet)
    if adapter_name is not None and adapter_name not in state.adapters:
        raise ValueError(f"adapter_name: {adapter_name!r} is not loaded (loaded: {sorted(state.adapters)})")
    _remove_application(unet, state)
    for name in [adapter_name] if adapter_name is not None else list(state.adapters):
        del state.adapters[name]
    if state.adapters:
        _apply(unet, state)
    else:
        delattr(unet, _STATE_ATTRIBUTE)
        _drop_cuda_graphs(unet)


def lora_adapters(target: Any) -> dict[str, Any]:
    """The loaded adapters ({name: {"path", "scale", "modules"}}), whether they are fused, and the bytes of the
    CPU copy of the weights that fusing keeps ({} without adapters)."""
    state = getattr(_unet_of(target), _STATE_ATTRIBUTE, None)
    if state is None:
        return {}
    adapters = {name: {"path": a.path, "scale": scale, "modules": len(a.layers)} for name, (a, scale) in state.adapters.items()}
    return {"adapters": adapters, "fused": state.fused, "backup_bytes": state.backup_bytes}
