"""Benchmarks of the fused EDM sampling ops against what diffusers' StableVideoDiffusionPipeline runs.

edm_euler_step: svd_fast's fused step vs the diffusers sequence (per-frame guidance arithmetic, then
EulerDiscreteScheduler.step) vs torch.compile of that sequence. edm_prepare_model_input: the fused op vs
the pipeline's cat([latents] * 2) -> scale_model_input -> cat with the conditioning latents.

Shapes: SVD-XT latents (B, 25, 4, 72, 128), float16 on CUDA. On the CPU the shapes stay (one step moves
only ~15-30 MB, a run takes seconds) but the dtype is float32: CPU float16 arithmetic in eager PyTorch
is not what anyone runs. "fused" is the automatic backend (Triton, else CUDA, on GPU; the C++ kernel on CPU);
"fused-cuda" forces the CUDA kernel (GPU only). bytes_moved is the minimum traffic: for the step, reads of x,
uncond, cond and the write of x_next; for the input, reads of x and the conditioning latents and the
write of the (2B, F, 8, H, W) UNet input.

Every timed call releases its output before the next call allocates, as the fused sampling loop does
(svd_fast.sampling.sample). Keeping the previous output alive instead makes glibc's malloc hand out fresh pages on
the CPU for some allocation sequences and not others, so whichever variant runs first in a process pays
thousands of page faults per call, whatever its kernel costs (bench/RESULTS.md, Sampling).
extra_info["minor_page_faults_per_call"] shows what each variant paid.
"""

from __future__ import annotations

import resource

import pytest
import torch

from svd_fast import backends
from svd_fast.ops import edm_euler_step, edm_prepare_model_input
from svd_fast.sampling import frame_guidance, karras_sigmas

BATCHES = (1, 2)
FRAMES, CHANNELS = 25, 4
STEP = 0  # the first step of 25: sigma_max -> the second noise level


def _released(fn):
    """``fn`` with its result dropped inside the call, so the timed loop holds no output between calls."""

    def call() -> None:
        fn()

    return call


def _record_page_faults(benchmark, device: torch.device, run, calls: int = 5) -> None:
    if device.type != "cpu":
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        run()
    benchmark.extra_info["minor_page_faults_per_call"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _geometry(device: torch.device) -> tuple[tuple[int, int], torch.dtype]:
    if device.type == "cuda":
        return (72, 128), torch.float16
    return (72, 128), torch.float32


def _diffusers_step_math(x, uncond, cond, guidance, sigma, sigma_next):
    """The pipeline's guidance line followed by EulerDiscreteScheduler.step's v-prediction arithmetic."""
    guided = uncond + guidance * (cond - uncond)
    sample = x.to(torch.float32)
    denoised = guided * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    derivative = (sample - denoised) / sigma
    return (sample + derivative * (sigma_next - sigma)).to(guided.dtype)


@pytest.fixture(scope="module")
def compiled_step():
    return torch.compile(_diffusers_step_math, dynamic=False)


def _diffusers_scheduler(device: torch.device):
    """diffusers' scheduler at SVD's 25 steps; imported here because the GPU image may lack diffusers (only the
    diffusers cases then skip)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: its baseline is not measured")
    from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG

    scheduler = diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(25, device=device)
    return scheduler


def _inputs(batch: int, device: torch.device):
    (height, width), dtype = _geometry(device)
    shape = (batch, FRAMES, CHANNELS, height, width)
    sigmas = karras_sigmas(25).to(device)  # SVD's schedule, the same sigmas as diffusers' scheduler
    sigma, sigma_next = sigmas[STEP], sigmas[STEP + 1]
    x = (torch.randn(shape, device=device) * sigma.item()).to(dtype)
    raw = torch.randn((2 * batch, *shape[1:]), device=device, dtype=dtype)
    uncond, cond = raw.chunk(2)
    guidance = frame_guidance(FRAMES, 1.0, 3.0, batch_size=batch, device=device, dtype=dtype)
    return x, uncond, cond, guidance, sigma, sigma_next


VARIANTS = ["fused", "fused-cuda", "diffusers", "torch-compile"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_edm_euler_step(timed, benchmark, device: torch.device, compiled_step, variant: str, batch: int) -> None:
    if variant == "fused-cuda" and device.type != "cuda":
        pytest.skip("the CUDA kernel needs a GPU")
    x, uncond, cond, guidance, sigma, sigma_next = _inputs(batch, device)
    if variant.startswith("fused"):
        backend = "cuda" if variant == "fused-cuda" else "auto"
        sigma_f, sigma_next_f = sigma.item(), sigma_next.item()

        def run():
            with backends.use_backend(backend):
                return edm_euler_step(x, uncond, cond, sigma_f, sigma_next_f, guidance)

    elif variant == "diffusers":
        scheduler = _diffusers_scheduler(device)
        t = scheduler.timesteps[STEP]

        def run():
            scheduler._step_index = STEP  # noqa: SLF001 - replay the same step; the pipeline looks it up once per run
            guided = uncond + guidance * (cond - uncond)
            return scheduler.step(guided, t, x).prev_sample

    else:

        def run():
            return compiled_step(x, uncond, cond, guidance, sigma, sigma_next)

    bytes_moved = 4 * x.numel() * x.element_size()
    run = _released(run)
    timed(run, bytes_moved=bytes_moved, op="edm_euler_step", variant=variant, shape=list(x.shape), dtype=str(x.dtype))
    _record_page_faults(benchmark, device, run)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["fused", "diffusers"])
def test_edm_prepare_model_input(timed, benchmark, device: torch.device, variant: str, batch: int) -> None:
    x, _uncond, _cond, _guidance, sigma, _sigma_next = _inputs(batch, device)
    image_latents = torch.randn(batch, CHANNELS, *x.shape[3:], device=device, dtype=x.dtype)
    if variant == "fused":
        sigma_f = sigma.item()

        def run():
            return edm_prepare_model_input(x, image_latents, sigma_f, do_cfg=True)

    else:
        repeated = image_latents.unsqueeze(1).repeat(1, FRAMES, 1, 1, 1)
        pipeline_cond = torch.cat([torch.zeros_like(repeated), repeated])  # built once per run by the pipeline
        scheduler = _diffusers_scheduler(device)
        t = scheduler.timesteps[STEP]

        def run():
            scheduler._step_index = STEP  # noqa: SLF001 - replay the same step
            scaled = scheduler.scale_model_input(torch.cat([x] * 2), t)
            return torch.cat([scaled, pipeline_cond], dim=2)

    out_numel = 2 * x.numel() * 2  # (2B, F, 8, H, W) = 4 times x's element count
    bytes_moved = (x.numel() + image_latents.numel() + out_numel) * x.element_size()
    run = _released(run)
    timed(run, bytes_moved=bytes_moved, op="edm_prepare_model_input", variant=variant, shape=list(x.shape))
    _record_page_faults(benchmark, device, run)


@pytest.mark.parametrize("variant", ["fused-composed", "eager"])
def test_consistency_step(timed, benchmark, device: torch.device, variant: str) -> None:
    """Consistency sampling's step at guidance 1 (AnimateLCM-SVD-xt, batch 1): svd_fast's composition (the fused
    edm_euler_step's denoised output, then the re-noising in place) vs AnimateLCM's scheduler arithmetic in eager
    PyTorch (c_out * model_output + c_skip * sample, then + s_noise * noise * sigma_next)."""
    from svd_fast.sampling.consistency import consistency_step

    x, uncond, _cond, _guidance, sigma, sigma_next = _inputs(1, device)
    noise = torch.randn_like(x)
    sigma_f, sigma_next_f = sigma.item(), sigma_next.item()
    if variant == "fused-composed":

        def run():
            return consistency_step(x, uncond, None, sigma_f, sigma_next_f, None, noise)[0]

    else:
        c_skip, c_out = 1 / (sigma_f**2 + 1), -sigma_f / (sigma_f**2 + 1) ** 0.5

        def run():
            return c_out * uncond + c_skip * x + noise * 1.0 * sigma_next_f

    # Minimum traffic: reads of x, the model output and the noise, the write of x_next.
    bytes_moved = 4 * x.numel() * x.element_size()
    run = _released(run)
    timed(run, bytes_moved=bytes_moved, op="consistency_step", variant=variant, shape=list(x.shape), dtype=str(x.dtype))
    _record_page_faults(benchmark, device, run)
