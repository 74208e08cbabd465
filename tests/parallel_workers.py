"""Rank functions for tests/test_parallel.py and bench/bench_parallel.py (importable by name, as spawn needs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers import UNetSpatioTemporalConditionModel
from PIL import Image

import svd_fast
from svd_fast.diffusers.parallel import exchanged_bytes, parallelize, parallelize_unet
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_WIDTH, tiny_pipeline


def tiny_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))


def tiny_latents(mode: str | None, frames: int, sampler: str = "euler", cache_interval: int = 1, steps: int = 2,
                 max_guidance: float = 3.0) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The latents of one tiny-pipeline call (parallelized over the current group when ``mode``) and the bytes this
    rank sent during its last UNet call."""
    pipe = svd_fast.optimize(tiny_pipeline(seed=0), sampler=sampler, cache_interval=cache_interval)
    if mode is not None:
        parallelize(pipe, mode)
    latents = pipe(
        tiny_image(), height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=frames, num_inference_steps=steps,
        max_guidance_scale=max_guidance, generator=torch.Generator().manual_seed(0), output_type="latent",
    ).frames  # fmt: skip
    return latents, exchanged_bytes(pipe) if mode is not None else 0


def save_tiny_latents(out: str, mode: str, frames: int, sampler: str, cache_interval: int, max_guidance: float) -> None:
    latents, sent = tiny_latents(mode, frames, sampler, cache_interval, max_guidance=max_guidance)
    torch.save({"latents": latents, "sent": sent}, Path(out) / f"rank{dist.get_rank()}.pt")


def full_size_step_inputs(frames: int, size: int) -> tuple[torch.Tensor, ...]:
    """A CFG batch of 2 for one full-size UNet call at a ``size`` x ``size`` latent."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, frames, 8, size, size, generator=generator)
    context = torch.randn(2, 1, 1024, generator=generator)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)
    return sample, torch.tensor(0.5), context, time_ids


def full_size_unet():
    """The random full-size SVD UNet (fp32, about 6 GiB), the same weights on every rank, optimized."""
    torch.manual_seed(0)
    return svd_fast.optimize(UNetSpatioTemporalConditionModel(num_frames=14).eval())


def unet_call(unet):
    def call(sample, timestep, context, time_ids, step):
        return unet(sample, timestep, encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]

    return call


def save_full_size_step(out: str, mode: str, frames: int, size: int) -> None:
    """Rank 0 saves the single-process output of one full-size UNet call and the parallel one."""
    unet = full_size_unet()
    inputs = full_size_step_inputs(frames, size)
    with torch.no_grad():
        reference = unet_call(unet)(*inputs, 0) if dist.get_rank() == 0 else None
        plan, _ = parallelize_unet(unet, mode)
        result = plan.wrap(unet_call(unet))(*inputs, 0)
    if dist.get_rank() == 0:
        torch.save({"reference": reference, "result": result, "sent": plan.last_call_bytes}, Path(out) / "step.pt")


def die_on_rank_one(code: int) -> None:
    """Rank 1 exits before the collective that rank 0 waits in."""
    if dist.get_rank() == 1:
        os._exit(code)
    dist.all_reduce(torch.ones(1))
