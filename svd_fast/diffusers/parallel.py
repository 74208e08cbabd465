"""One video across several processes: guidance-parallel and frame-parallel sampling over ``torch.distributed``.

:func:`parallelize` turns an optimized pipeline (:func:`svd_fast.optimize`, fused sampling) into one rank of a
parallel pipeline; every rank of the process group then calls the pipeline with the same arguments and seed and
receives the same video. The sampler runs on every rank on the full latents (a few elementwise passes); each UNet
call is split:

* ``"guidance"`` (2 ranks): the classifier-free-guidance batch (unconditional, conditional) halves, which never
  interact inside the UNet; one all-gather of the UNet output per call.
* ``"frames"`` (N ranks): each rank runs the UNet on its consecutive frames (8 frames on 3 ranks: 3, 3, 2). Spatial
  layers are per frame. Around the temporal layers, without recomputing anything on two ranks:

  - TemporalResnetBlock (a kernel-3 convolution along frames and GroupNorms whose statistics span all frames):
    the frame split stays; each convolution receives its neighbours' boundary frame (a one-frame halo, point to
    point) and each GroupNorm combines the per-rank mean and sum of squared deviations (one all-gather of 2 numbers
    per group, Chan's parallel formula);
  - the temporal transformer block (attention over all frames of one position): one all-to-all switches to a split
    by spatial position, the block (svd_fast's fused temporal-attention op when ``optimize`` fused it) runs on all
    frames of this rank's positions, and one all-to-all switches back;
  - the frame position embedding is taken at the global frame indices (the transformer's ``time_proj`` gets this
    rank's first frame added).

* ``"guidance+frames"`` (2 x N ranks): rank ``g * N + r`` takes guidance half ``g`` and frame share ``r``.

:func:`exchanged_bytes` gives what this rank sent during the last UNet call (counted by the collectives here).
CUDA graphs capture per rank in guidance mode, whose only exchange is outside the UNet forward; the frame modes
exchange inside it and refuse ``cuda_graphs``. Launching ranks: :mod:`svd_fast.diffusers.parallel_launch`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.resnet import TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from torch import nn

from svd_fast.diffusers.cuda_graph import CUDAGraphedForward
from svd_fast.diffusers.denoising_loop import PARALLEL_ATTRIBUTE, fused_loop_unsupported_reason, pop_attribute
from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

MODES = ("guidance", "frames", "guidance+frames")
_UNDO_ATTRIBUTE = "_svd_fast_parallel_undo"


def guidance_parts(mode: str) -> int:
    """How many ways ``mode`` splits the CFG batch (2 for the guidance modes, else 1)."""
    return 2 if mode.startswith("guidance") else 1


def check_world(mode: object, world_size: object, *, spelled: str = "world size") -> int:
    """The number of frame shares of ``mode`` on ``world_size`` ranks; ValueError for a mode or size that does not fit."""
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise ValueError(f"{spelled} must be an integer >= 2 for parallel generation, got {world_size!r}")
    if mode == "guidance" and world_size != 2:
        raise ValueError(f"{spelled} must be 2 for guidance-parallel generation (one rank per CFG half), got {world_size}")
    if mode == "guidance+frames" and world_size % 2:
        raise ValueError(f"{spelled} must be even for guidance+frames (2 CFG halves x N frame shares), got {world_size}")
    return world_size // guidance_parts(mode)


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` consecutive shares, the first ``total % parts`` one larger (8 in 3: 3, 3, 2)."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


class Exchange:
    """The collectives of one process group (given by its global ranks), counting the bytes this rank sends."""

    def __init__(self, group: Any, ranks: list[int]) -> None:
        self.group, self.ranks = group, ranks
        self.index = ranks.index(dist.get_rank())
        self.sent_bytes = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in self.ranks]
        dist.all_gather(pieces, tensor, group=self.group)
        self.sent_bytes += tensor.numel() * tensor.element_size() * (self.size - 1)
        return pieces

    def exchange(self, sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor]) -> None:
        """Point-to-point: ``sends[i]`` to share ``i``, ``receives[i]`` filled from share ``i`` (both keyed by index in the group)."""
        operations = [dist.P2POp(dist.isend, tensor.contiguous(), self.ranks[i], self.group) for i, tensor in sends.items()]
        operations += [dist.P2POp(dist.irecv, tensor, self.ranks[i], self.group) for i, tensor in receives.items()]
        if operations:
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        self.sent_bytes += sum(tensor.numel() * tensor.element_size() for tensor in sends.values())

    def all_to_all(self, sends: list[torch.Tensor], shapes: list[torch.Size]) -> list[torch.Tensor]:
        """``sends[i]`` to share ``i``; returns what each share sent here (shapes given), this rank's own piece uncopied."""
        received = {i: sends[0].new_empty(shape) for i, shape in enumerate(shapes) if i != self.index}
        self.exchange({i: piece for i, piece in enumerate(sends) if i != self.index}, received)
        return [sends[i] if i == self.index else received[i] for i in range(self.size)]


class ParallelPlan:
    """This rank's share of each UNet call and the exchanges that make the shares one computation."""

    def __init__(self, mode: str, group: Any = None) -> None:
        group = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        self.mode = mode
        self.guidance_parts = guidance_parts(mode)
        frame_parts = check_world(mode, len(ranks))
        self.world = Exchange(group, ranks)
        self.guidance_index, frame_index = divmod(self.world.index, frame_parts)
        self.frames: Exchange | None = None
        if frame_parts > 1:
            frame_groups = [ranks[g * frame_parts:(g + 1) * frame_parts] for g in range(self.guidance_parts)]
            # every rank creates every subgroup, in the same order (torch.distributed's rule for new_group)
            created = [group if len(members) == len(ranks) else dist.new_group(members) for members in frame_groups]
            self.frames = Exchange(created[self.guidance_index], frame_groups[self.guidance_index])
            assert self.frames.index == frame_index
        self.active = False
        self.frame_sizes: list[int] = [0]
        self.last_call_bytes = 0

    @property
    def frame_offset(self) -> int:
        return sum(self.frame_sizes[: self.frames.index]) if self.frames is not None else 0

    def wrap(self, unet_call: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``unet_call(sample, timestep, encoder_hidden_states, added_time_ids, step)`` on the full CFG batch and all
        frames, computed as this rank's share plus the exchanges; every rank returns the whole output."""

        def parallel_call(sample, timestep, encoder_hidden_states, added_time_ids, step):
            batch, frames = sample.shape[:2]
            if batch % self.guidance_parts:
                raise ValueError(
                    f"parallel mode {self.mode!r} splits the classifier-free-guidance batch, but this call has none "
                    "(max_guidance_scale <= 1); use mode 'frames' or a guidance above 1"
                )
            parts = self.frames.size if self.frames is not None else 1
            if frames < parts:
                raise ValueError(f"num_frames {frames} is fewer than the {parts} frame shares of this process group")
            half = batch // self.guidance_parts
            rows = slice(self.guidance_index * half, (self.guidance_index + 1) * half)
            self.frame_sizes = split_sizes(frames, parts)
            offset = self.frame_offset
            share = sample[rows, offset:offset + self.frame_sizes[self.frames.index if self.frames else 0]]
            for exchange in (self.world, self.frames):
                if exchange is not None:
                    exchange.sent_bytes = 0
            self.active = True
            try:
                output = unet_call(share.contiguous(), timestep, encoder_hidden_states[rows], added_time_ids[rows], step)
            finally:
                self.active = False
            result = self._gather(output, batch, frames, half)
            self.last_call_bytes = self.world.sent_bytes + (self.frames.sent_bytes if self.frames is not None else 0)
            return result

        return parallel_call

    def _gather(self, output: torch.Tensor, batch: int, frames: int, half: int) -> torch.Tensor:
        longest = max(self.frame_sizes)
        padded = output if output.shape[1] == longest else F.pad(output, (0, 0, 0, 0, 0, 0, 0, longest - output.shape[1]))
        pieces = self.world.all_gather(padded)
        result = output.new_empty((batch, frames, *output.shape[2:]))
        parts = len(self.frame_sizes)
        for index, piece in enumerate(pieces):
            g, r = divmod(index, parts)
            start = sum(self.frame_sizes[:r])
            result[g * half:(g + 1) * half, start:start + self.frame_sizes[r]] = piece[:, : self.frame_sizes[r]]
        return result

    # -- frame-split layers -------------------------------------------------------------------------------------

    def group_norm_silu(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """SiLU(GroupNorm(x)) of (B, C, F_share, H, W) with statistics over all frames of all shares."""
        batch, channels = x.shape[:2]
        groups = norm.num_groups
        values = x.float().reshape(batch, groups, -1)
        mean = values.mean(-1)
        deviation = values - mean[..., None]
        stats = self.frames.all_gather(torch.stack([mean, deviation.square().sum(-1)], -1))
        per_frame = values.shape[-1] // x.shape[2]
        counts = [size * per_frame for size in self.frame_sizes]
        total = sum(counts)
        global_mean = sum(count * s[..., 0] for count, s in zip(counts, stats, strict=True)) / total
        squares = sum(s[..., 1] + count * (s[..., 0] - global_mean).square() for count, s in zip(counts, stats, strict=True))
        scale = torch.rsqrt(squares / total + norm.eps)
        normalized = ((values - global_mean[..., None]) * scale[..., None]).reshape(x.shape)
        if norm.affine:
            shape = (1, channels) + (1,) * (x.ndim - 2)
            normalized = normalized * norm.weight.float().view(shape) + norm.bias.float().view(shape)
        return F.silu(normalized).to(x.dtype)

    def frame_conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """The (3, 1, 1) convolution along frames of (B, C, F_share, H, W), with the neighbours' boundary frames."""
        index, last = self.frames.index, self.frames.size - 1
        sends = {i: frame for i, frame in ((index - 1, x[:, :, :1]), (index + 1, x[:, :, -1:])) if 0 <= i <= last}
        halo = {i: torch.zeros_like(x[:, :, :1]) for i in (index - 1, index + 1)}
        self.frames.exchange(sends, {i: tensor for i, tensor in halo.items() if 0 <= i <= last})
        padded = torch.cat([halo[index - 1], x, halo[index + 1]], dim=2)
        return F.conv3d(padded, conv.weight, conv.bias, conv.stride, (0, *conv.padding[1:]), conv.dilation, conv.groups)

    def to_positions(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, list[int]]:
        """(B * F_share, S, C) frame-split -> (B * F, S_share, C) position-split (one all-to-all)."""
        frames = self.frame_sizes[self.frames.index]
        positions, channels = x.shape[1:]
        shares = split_sizes(positions, self.frames.size)
        per_frame = x.view(batch, frames, positions, channels)
        sends = list(per_frame.split(shares, dim=2))
        mine = shares[self.frames.index]
        received = self.frames.all_to_all(sends, [torch.Size((batch, f, mine, channels)) for f in self.frame_sizes])
        return torch.cat(received, dim=1).flatten(0, 1), shares

    def to_frames(self, x: torch.Tensor, batch: int, shares: list[int]) -> torch.Tensor:
        """The inverse of :meth:`to_positions`."""
        channels = x.shape[-1]
        mine = self.frame_sizes[self.frames.index]
        sends = list(x.view(batch, -1, x.shape[1], channels).split(self.frame_sizes, dim=1))
        received = self.frames.all_to_all(sends, [torch.Size((batch, mine, s, channels)) for s in shares])
        return torch.cat(received, dim=2).flatten(0, 1)


def _temporal_resnet_forward(plan: ParallelPlan, original: Callable) -> Callable:
    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        if not plan.active:
            return original(input_tensor, temb)
        hidden_states = plan.frame_conv(self.conv1, plan.group_norm_silu(self.norm1, input_tensor))
        if self.time_emb_proj is not None:
            temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, :, None, None].permute(0, 2, 1, 3, 4)
            hidden_states = hidden_states + temb
        hidden_states = plan.frame_conv(self.conv2, self.dropout(plan.group_norm_silu(self.norm2, hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states

    return forward


def _temporal_block_forward(plan: ParallelPlan, original: Callable) -> Callable:
    def forward(self, hidden_states: torch.Tensor, num_frames: int, encoder_hidden_states: torch.Tensor | None = None):
        if not plan.active:
            return original(hidden_states, num_frames, encoder_hidden_states)
        batch = hidden_states.shape[0] // num_frames
        positions = hidden_states.shape[1]
        split, shares = plan.to_positions(hidden_states, batch)
        if encoder_hidden_states is not None:  # (B * S, tokens, C): the context of each position
            start = sum(shares[: plan.frames.index])
            per_position = encoder_hidden_states.unflatten(0, (batch, positions))
            encoder_hidden_states = per_position[:, start:start + split.shape[1]].flatten(0, 1)
        if split.shape[1]:
            split = original(split, sum(plan.frame_sizes), encoder_hidden_states)
        return plan.to_frames(split, batch, shares)

    return forward


def _frame_index_forward(plan: ParallelPlan, original: Callable) -> Callable:
    def forward(self, frame_indices: torch.Tensor) -> torch.Tensor:
        return original(frame_indices + plan.frame_offset if plan.active else frame_indices)

    return forward


def _unsupported_temporal_resnet(module: TemporalResnetBlock) -> str | None:
    for name in ("conv1", "conv2"):
        conv = getattr(module, name)
        if not isinstance(conv, nn.Conv3d) or conv.kernel_size[0] != 3 or conv.padding[0] != 1 or conv.stride[0] != 1:
            return f"{name} is not a (3, ., .) frame convolution with padding 1"
    if not isinstance(module.nonlinearity, nn.SiLU):
        return "its activation is not SiLU"
    return None


def _patch(module: nn.Module, make: Callable[[ParallelPlan, Callable], Callable], plan: ParallelPlan, undo: list) -> None:
    previous = vars(module).get("forward")
    original = previous if previous is not None else types.MethodType(type(module).forward, module)
    module.forward = types.MethodType(make(plan, original), module)
    undo.append((pop_attribute, module, "forward") if previous is None else (setattr, module, "forward", previous))


def _patch_frame_layers(unet: nn.Module, plan: ParallelPlan, undo: list) -> None:
    for module in unet.modules():
        if isinstance(module, TemporalResnetBlock):
            reason = _unsupported_temporal_resnet(module)
            if reason is not None:
                raise ValueError(f"parallelize: a TemporalResnetBlock cannot be split by frames: {reason}")
            _patch(module, _temporal_resnet_forward, plan, undo)
        elif isinstance(module, (TemporalBasicTransformerBlock, FusedTemporalBasicTransformerBlock)):
            _patch(module, _temporal_block_forward, plan, undo)
        elif isinstance(module, TransformerSpatioTemporalModel):
            _patch(module.time_proj, _frame_index_forward, plan, undo)


def parallelize_unet(unet: nn.Module, mode: str = "frames", group: Any = None) -> tuple[ParallelPlan, list[tuple]]:
    """This rank's plan for ``unet`` (its temporal layers patched for the frame modes) and the undo steps. Call
    ``plan.wrap(call)`` on a function ``call(sample, timestep, encoder_hidden_states, added_time_ids, step)`` that runs
    ``unet`` to split it over ``group`` (e.g. a UNet step outside a pipeline); :func:`parallelize` does this for a pipeline."""
    if mode not in MODES:
        raise ValueError(f"parallelize: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("parallelize: torch.distributed is not initialized; call torch.distributed.init_process_group first")
    plan = ParallelPlan(mode, group)
    if plan.frames is not None and isinstance(getattr(unet, "forward", None), CUDAGraphedForward):
        raise ValueError(f"parallelize: mode {mode!r} exchanges inside the UNet forward, which cuda_graphs cannot capture; "
                         "optimize without cuda_graphs or use mode 'guidance'")
    undo: list[tuple] = []
    try:
        if plan.frames is not None:
            _patch_frame_layers(unet, plan, undo)
    except BaseException:
        run_undo(undo)
        raise
    return plan, undo


def parallelize(pipe: Any, mode: str = "frames", group: Any = None) -> Any:
    """Make ``pipe`` (optimized by :func:`svd_fast.optimize` with fused sampling) one rank of a parallel pipeline
    over ``group`` (default: the whole initialized process group); every rank must call it, then call ``pipe``
    with the same arguments and seed. ``mode``: "guidance" (2 ranks), "frames" (N ranks) or "guidance+frames"
    (2 x N). Every rank holds the weights and returns the whole video. Undo with :func:`unparallelize`."""
    settings = getattr(pipe, "_svd_fast_sampling", None)
    if settings is None:
        raise ValueError("parallelize: pipe must be optimized with fused sampling first: svd_fast.optimize(pipe) (scheduler=True)")
    reason = fused_loop_unsupported_reason(pipe.scheduler, settings["sampler"])
    if reason is not None:
        raise ValueError(f"parallelize: the pipeline's scheduler does not run the fused loop: {reason}")
    if getattr(pipe, _UNDO_ATTRIBUTE, None):
        raise ValueError("parallelize: pipe is already parallelized; call unparallelize(pipe) first")
    plan, undo = parallelize_unet(pipe.unet, mode, group)
    setattr(pipe, PARALLEL_ATTRIBUTE, plan)
    undo.append((pop_attribute, pipe, PARALLEL_ATTRIBUTE))
    setattr(pipe, _UNDO_ATTRIBUTE, undo)
    return pipe


def run_undo(undo: list[tuple]) -> None:
    """Undo :func:`parallelize_unet`'s patches (its second result)."""
    for function, *objects in reversed(undo):
        function(*objects)


def unparallelize(pipe: Any) -> Any:
    """Undo :func:`parallelize`: ``pipe`` runs alone again (still optimized)."""
    undo = getattr(pipe, _UNDO_ATTRIBUTE, None)
    if not undo:
        raise ValueError("unparallelize: pipe was not parallelized")
    run_undo(undo)
    delattr(pipe, _UNDO_ATTRIBUTE)
    return pipe


def exchanged_bytes(pipe: Any) -> int:
    """The bytes this rank sent during the pipeline's last UNet call (0 before the first)."""
    plan = getattr(pipe, PARALLEL_ATTRIBUTE, None)
    if plan is None:
        raise ValueError("exchanged_bytes: pipe is not parallelized")
    return plan.last_call_bytes
