"""Rank functions of bench/bench_parallel.py (importable by name, as torch.multiprocessing's spawn needs), and the
communication model for the SVD-XT projection.

:func:`time_alternating`: on 2 ranks with one thread each, rank 0 times the single-process call alone (rank 1 waits
in a barrier, idle) and then both ranks time the parallel call, alternating, so both variants see the same load.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.resnet import TemporalResnetBlock
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import svd_fast
from svd_fast.diffusers.denoising_loop import PARALLEL_ATTRIBUTE
from svd_fast.diffusers.parallel import guidance_parts, parallelize, parallelize_unet, split_sizes
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_WIDTH, tiny_pipeline

TINY_FRAMES, TINY_STEPS = 8, 2
# The full-size case: a CFG batch of 2, 8 frames, a 32 x 32 latent (256 x 256 pixels), fp32.
FULL_FRAMES, FULL_LATENT = 8, 32


def _tiny(mode: str):
    image = Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))
    pipe = parallelize(svd_fast.optimize(tiny_pipeline(seed=0)), mode)

    def run() -> None:
        pipe(image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_FRAMES, num_inference_steps=TINY_STEPS,
             generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip

    def single() -> None:  # the same pipeline with its plan set aside: the patched layers run unsplit
        plan = vars(pipe).pop(PARALLEL_ATTRIBUTE)
        try:
            run()
        finally:
            setattr(pipe, PARALLEL_ATTRIBUTE, plan)

    return single, run, lambda: getattr(pipe, PARALLEL_ATTRIBUTE).last_call_bytes


def _full(mode: str):
    torch.manual_seed(0)
    unet = svd_fast.optimize(UNetSpatioTemporalConditionModel(num_frames=14).eval())
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, FULL_FRAMES, 8, FULL_LATENT, FULL_LATENT, generator=generator), torch.tensor(0.5),
              torch.randn(2, 1, 1024, generator=generator), torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1), 0)  # fmt: skip

    def call(sample, timestep, context, time_ids, step):
        return unet(sample, timestep, encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]

    plan, _ = parallelize_unet(unet, mode)
    parallel = plan.wrap(call)
    return lambda: call(*inputs), lambda: parallel(*inputs), lambda: plan.last_call_bytes


def time_alternating(out: str, workload: str, mode: str, rounds: int) -> None:
    torch.set_num_threads(1)
    single, parallel, sent = (_tiny if workload == "tiny" else _full)(mode)
    rank = dist.get_rank()
    times: dict[str, list[float]] = {"single": [], "parallel": []}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # round 0 warms up
            dist.barrier()
            if rank == 0:
                start = time.perf_counter()
                single()
                if round_index:
                    times["single"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            parallel()
            if round_index:
                times["parallel"].append(time.perf_counter() - start)
    sent_bytes = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(sent_bytes, torch.tensor([float(sent())], dtype=torch.float64))
    if rank == 0:
        Path(out).write_text(json.dumps({
            "single_s": times["single"], "parallel_s": times["parallel"], "single_median_s": statistics.median(times["single"]),
            "parallel_median_s": statistics.median(times["parallel"]), "sent_bytes_per_unet_call": [int(b.item()) for b in sent_bytes],
        }))  # fmt: skip


def communication_model(mode: str, ranks: int, frames: int, height: int, width: int, itemsize: int, batch: int = 2,
                        config: dict | None = None) -> dict[str, float]:  # fmt: skip
    """What the busiest rank sends per UNet call under ``mode`` on ``ranks`` (the exchanges of
    svd_fast.diffusers.parallel, written out), from the shapes a meta-device forward of the UNet records."""
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**(config or {"num_frames": frames})).eval().to("meta")  # its mix factors are built on the CPU
    shapes: list[tuple[str, torch.Size]] = []
    for module in unet.modules():
        if isinstance(module, TemporalResnetBlock):
            module.register_forward_hook(lambda m, args, output: shapes.append(("resnet", args[0].shape)))
        elif type(module).__name__ == "TemporalBasicTransformerBlock":
            module.register_forward_hook(lambda m, args, output: shapes.append(("attention", args[0].shape)))
    with torch.device("meta"), torch.no_grad():
        unet(*_meta_inputs(unet, batch, frames, height, width), return_dict=False)
    halves = guidance_parts(mode)
    frame_ranks = ranks // halves
    local_batch = batch // halves
    largest = max(split_sizes(frames, frame_ranks))
    sent = collectives = 0.0
    if frame_ranks > 1:
        for kind, shape in shapes:
            if kind == "resnet":  # (B, C, F, H, W): two convolutions x a boundary frame per neighbour, two GroupNorm stat gathers
                _, channels, _, h, w = shape
                sent += 2 * min(2, frame_ranks - 1) * local_batch * channels * h * w * itemsize + 2 * local_batch * 32 * 2 * 4 * (frame_ranks - 1)
                collectives += 4
            else:  # (B*F, S, C): two all-to-alls of this rank's frames, all positions but its own share
                _, positions, channels = shape
                sent += 2 * local_batch * largest * positions * channels * itemsize * (frame_ranks - 1) / frame_ranks
                collectives += 2
    sent += local_batch * largest * 4 * height * width * itemsize * (ranks - 1)  # the output all-gather
    collectives += 1
    return {"sent_bytes": sent, "collectives": collectives, "flops": _flops(unet, batch, frames, height, width)}


def _meta_inputs(unet, batch: int, frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    config = unet.config
    return (torch.zeros(batch, frames, config.in_channels, height, width), torch.tensor(0.5),
            torch.zeros(batch, 1, config.cross_attention_dim), torch.zeros(batch, 3))  # fmt: skip


def _flops(unet, batch: int, frames: int, height: int, width: int) -> float:
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*_meta_inputs(unet, batch, frames, height, width), return_dict=False)
    return float(counter.get_total_flops())

