"""Rank functions for tests/test_parallel.py and bench/bench_parallel.py (importable by name, as spawn needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import svd_fast
from svd_fast.diffusers.parallel import exchanged_bytes, parallelize
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
