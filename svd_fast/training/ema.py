"""EMA of the trained UNet parameters, kept from DeepSpeed's fp32 master weights and sharded like them.

Each rank averages only the fp32 master fragment it owns (ZeRO-3: ``safe_get_local_fp32_param``; ZeRO-1/2 and
DeepSpeed's bf16 optimizer: the parameter's fp32 fragment ``_hp_mapping.hp_fragment``; an unsharded fp32 engine:
the parameter itself), so the EMA costs 4 bytes per parameter divided by the data-parallel size, needs no
communication per step, and never sees the bf16 module copies. The full tensors are assembled only at export
(:func:`gather_full`, a collective). Decay warms up as in generative-models' LitEma and diffusers' EMAModel:
decay_k = min(decay, (1 + k) / (10 + k)) at the k-th update (k from 0), and k is checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MasterFragment:
    """The part of one parameter's fp32 master this rank owns: ``values`` is ``flat[start:start + numel]`` of
    the flattened full parameter of ``shape``."""

    values: torch.Tensor
    start: int
    shape: torch.Size
    replicated: bool = False  # every rank holds the same values (an unsharded fp32 engine)


def local_master_fragments(module: torch.nn.Module) -> dict[str, MasterFragment]:
    """This rank's fp32 master fragment of every trained parameter (none for parameters it does not own)."""
    from deepspeed.utils import safe_get_local_fp32_param  # noqa: PLC0415 - deepspeed (slow import) loads only when training runs

    fragments: dict[str, MasterFragment] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's contiguous partition of the flattened parameter
            local = safe_get_local_fp32_param(param)
            partition = param.ds_tensor.ds_numel
            start = torch.distributed.get_rank() * partition
            numel = max(0, min(partition, param.ds_numel - start))
            if numel:
                fragments[name] = MasterFragment(local.flatten()[:numel], start, param.ds_shape)
        elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2 or bf16 optimizer: a slice of the flat fp32 partition
            mapping = param._hp_mapping  # noqa: SLF001 - DeepSpeed's documented fragment link
            fragments[name] = MasterFragment(mapping.hp_fragment.flatten(), mapping.lp_fragment_address.start, param.shape)
        elif hasattr(param, "_hp_mapping"):  # sharded, but none of this parameter lives on this rank
            continue
        elif param.dtype == torch.float32:  # unsharded fp32 training: the parameter is its own master
            fragments[name] = MasterFragment(param.detach().flatten(), 0, param.shape, replicated=True)
        else:
            raise RuntimeError(f"EMA: no fp32 master weight for {name} ({param.dtype}); use ZeRO >= 1 with bf16/fp16")
    return fragments


def full_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """The full shape of every trained parameter (ZeRO-3 keeps it in ``ds_shape``)."""
    return {name: getattr(p, "ds_shape", p.shape) for name, p in module.named_parameters() if p.requires_grad}


def gather_full(fragments: dict[str, MasterFragment], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors (on the CPU) from every rank's fragments; a collective with more than one process
    (every rank calls it with the same ``shapes``)."""
    full: dict[str, torch.Tensor] = {}
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    device = _collective_device() if distributed else torch.device("cpu")
    first_rank = not distributed or torch.distributed.get_rank() == 0
    for name, shape in shapes.items():
        fragment = fragments.get(name)
        buffer = torch.zeros(torch.Size(shape).numel(), dtype=torch.float32, device=device)
        if fragment is not None and (first_rank or not fragment.replicated):
            buffer[fragment.start : fragment.start + fragment.values.numel()] = fragment.values.float()
        if distributed:  # fragments do not overlap (a replicated one counts once), so a sum assembles the parameter
            torch.distributed.all_reduce(buffer)
        full[name] = buffer.cpu().view(shape)
    return full


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device | None = None) -> None:
        """``device``: where the EMA lives (the CPU when DeepSpeed offloads the optimizer; default: beside the
        fp32 masters)."""
        self.decay = decay
        self.updates = 0
        self.shapes = full_shapes(module)
        masters = local_master_fragments(module)
        self.shadow = {
            name: MasterFragment(f.values.detach().to(device or f.values.device, torch.float32, copy=True), f.start, f.shape, f.replicated)
            for name, f in masters.items()
        }

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1.0 + update) / (10.0 + update))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        masters = local_master_fragments(module)
        names = list(self.shadow)
        weight = 1.0 - self.decay_at(self.updates)
        shadows = [self.shadow[n].values for n in names]
        torch._foreach_lerp_(shadows, [masters[n].values.to(s.device, torch.float32) for n, s in zip(names, shadows)], weight)
        self.updates += 1

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "values": {name: f.values for name, f in self.shadow.items()},
            "starts": {name: f.start for name, f in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["values"]) != set(self.shadow) or any(state["starts"][n] != f.start for n, f in self.shadow.items()):
            raise ValueError("EMA: the checkpoint's EMA shards do not match this run's partitioning (same processes and ZeRO stage?)")
        for name, fragment in self.shadow.items():
            fragment.values.copy_(state["values"][name])
        self.updates = int(state["updates"])

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole EMA (a collective with more than one process)."""
        return gather_full(self.shadow, self.shapes)
