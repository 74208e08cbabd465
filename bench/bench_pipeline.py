"""UNet denoising-step latency and peak memory: diffusers eager vs svd_fast.optimize vs torch.compile.

On CUDA: the real SVD UNet config (diffusers' UNetSpatioTemporalConditionModel defaults, ~1.5B params)
with random weights (speed does not depend on weight values), fp16, 576x1024 (latents 72x128), 14 and
25 frames, batch 2 (classifier-free guidance). On CPU: the tiny architecture-true model, fp32, labelled
"tiny" (CPU numbers say nothing about GPU speed). Plus the end-to-end tiny pipeline on CPU, and on CUDA
the end-to-end full-size SVD / SVD-XT pipelines (svd_fast.diffusers.full_size: published architecture, random
weights) at 576x1024, 25 steps, fp16, with peak memory, for diffusers eager, diffusers + torch.compile,
svd_fast, svd_fast with CUDA graphs, and svd_fast's low-memory mode (the < 16 GB target).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import svd_fast
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_UNET_CONFIG, TINY_WIDTH, tiny_pipeline

VARIANTS = ("diffusers-eager", "svd_fast", "diffusers+torch.compile")


def _unet_case(device: torch.device, frames: int):
    from diffusers import UNetSpatioTemporalConditionModel

    if device.type == "cuda":
        # Built on the GPU (random weights drawn there), not on the CPU and copied.
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel(num_frames=frames).to(torch.float16).eval()
        latent_size, dtype, label = (72, 128), torch.float16, "svd-1.5B"
    else:
        unet = UNetSpatioTemporalConditionModel(**TINY_UNET_CONFIG).eval()
        latent_size, dtype, label = (TINY_HEIGHT // 2, TINY_WIDTH // 2), torch.float32, "tiny"
    sample = torch.randn(2, frames, 8, *latent_size, device=device, dtype=dtype)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype)
    timestep = torch.tensor(0.25 * np.log(10.0), device=device, dtype=dtype)
    return unet, (sample, timestep, context, time_ids), label


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frames", [14, 25])
def test_unet_step(timed, benchmark, device: torch.device, variant: str, frames: int) -> None:
    if device.type != "cuda" and variant == "diffusers+torch.compile":
        pytest.skip("torch.compile of the UNet takes minutes of C++ compilation on this CPU; measured on CUDA only")
    if device.type != "cuda" and frames == 25:
        pytest.skip("the tiny CPU model is measured at 14 frames only (keeps the CPU run short)")
    unet, inputs, label = _unet_case(device, frames)
    benchmark.group = f"unet-step-{label}-{frames}f"
    if variant == "svd_fast":
        svd_fast.optimize(unet)
    # dynamic=False: one static-shape graph, what a user gets for a fixed resolution and frame count.
    model = torch.compile(unet, dynamic=False) if variant == "diffusers+torch.compile" else unet
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        timed(lambda: model(*inputs).sample, variant=variant, model=label, frames=frames)
    if device.type == "cuda":
        benchmark.extra_info["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)


@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_tiny_pipeline_end_to_end(timed, benchmark, device: torch.device, variant: str) -> None:
    benchmark.group = "tiny-pipeline-end-to-end"
    pipe = tiny_pipeline(seed=0).to(device)
    if variant == "svd_fast":
        svd_fast.optimize(pipe)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))
    timed(
        lambda: pipe(image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_NUM_FRAMES, num_inference_steps=4, output_type="pt"),
        variant=variant,
        model="tiny",
        steps=4,
    )


# The GPU case: the real SVD / SVD-XT pipelines (random weights), 576x1024, 25 steps, fp16, CFG.
FULL_SIZE_VARIANTS = ("diffusers-eager", "diffusers+torch.compile", "svd_fast", "svd_fast+cuda_graphs", "svd_fast-low-memory")
FULL_SIZE_STEPS = 25


@pytest.mark.parametrize("variant", FULL_SIZE_VARIANTS)
@pytest.mark.parametrize("model", ["svd-xt", "svd"])
def test_full_size_end_to_end(benchmark, device: torch.device, variant: str, model: str) -> None:
    """End to end (CLIP + VAE encode + 25 UNet steps with CFG + VAE decode) with peak memory; CUDA only.

    One untimed 2-step call first takes torch.compile's compilation and the CUDA-graph capture (same
    shapes) out of the timing; then one timed 25-step call (a run takes tens of seconds).
    """
    if device.type != "cuda":
        pytest.skip("the 2.3B-parameter pipeline at 576x1024 is a GPU benchmark")
    from svd_fast.diffusers.full_size import NUM_FRAMES, random_full_size_pipeline

    pipe = random_full_size_pipeline(model, device="cpu" if variant == "svd_fast-low-memory" else device)
    frames = NUM_FRAMES[model]
    if variant == "diffusers+torch.compile":
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
    elif variant.startswith("svd_fast"):
        svd_fast.optimize(pipe, cuda_graphs=variant == "svd_fast+cuda_graphs", low_memory=variant == "svd_fast-low-memory")
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((576, 1024, 3)) * 255).astype(np.uint8))
    decode_chunk_size = 2 if variant == "svd_fast-low-memory" else 8

    def generate(steps: int):
        result = pipe(image, height=576, width=1024, num_frames=frames, num_inference_steps=steps,
                      decode_chunk_size=decode_chunk_size, output_type="pt").frames  # fmt: skip
        torch.cuda.synchronize(device)
        return result

    generate(2)
    torch.cuda.reset_peak_memory_stats(device)
    benchmark.group = f"end-to-end-{model}-576x1024-{frames}f-{FULL_SIZE_STEPS}steps"
    benchmark.pedantic(generate, args=(FULL_SIZE_STEPS,), rounds=1, iterations=1)
    benchmark.extra_info.update(
        variant=variant, model=model, frames=frames, steps=FULL_SIZE_STEPS, decode_chunk_size=decode_chunk_size,
        # Reserved, not allocated: CUDA-graph memory pools and allocator blocks count against the GPU.
        peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        device=torch.cuda.get_device_name(device),
    )  # fmt: skip
