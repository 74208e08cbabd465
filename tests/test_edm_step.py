"""Fused EDM sampling ops: every backend vs the float64 reference, layouts, torch.library checks, bad input.

Tolerance rule: tests/utils.py's assert_within_torch_error, with PyTorch's own computation of the same step in
the storage dtype as the baseline (diffusers' sequence: guidance in the model dtype, then EulerDiscreteScheduler's
float32 arithmetic, cast back); elementwise, so a reduction length of 1.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_within_torch_error, requires_cuda, requires_triton_interpreter

from svd_fast import backends
from svd_fast.ops import edm_euler_step, edm_prepare_model_input

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPE = (2, 3, 4, 3, 5)  # (B, F, C, H, W): tiny, the Triton interpreter is slow
# (sigma, sigma_next): SVD's first step from sigma_max, a middle step, and the last step into 0.
SIGMA_PAIRS = ((700.0, 421.7), (1.3, 0.7), (0.05, 0.0))

BACKEND_PARAMS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=requires_triton_interpreter),
    pytest.param("cuda", "cuda", id="cuda", marks=requires_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=requires_cuda),
]


def _latents(sigma: float, shape=SHAPE, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Noisy latents at noise level sigma: off-centre data plus sigma-scaled noise."""
    data = 0.8 * torch.randn(shape, dtype=torch.float64) + 0.5
    return (data + sigma * torch.randn(shape, dtype=torch.float64)).to(device, dtype)


def _model_outputs(shape=SHAPE, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet's (2B, ...) output and its two halves (views, uncond first)."""
    raw = (torch.randn((2 * shape[0], *shape[1:]), dtype=torch.float64) + 0.3).to(device, dtype)
    uncond, cond = raw.chunk(2)
    return raw, uncond, cond


def _guidance(shape=SHAPE, device="cpu") -> torch.Tensor:
    return torch.linspace(1.0, 3.0, shape[1], device=device)


def _truth_step(x, uncond, cond, sigma, sigma_next, guidance):
    with backends.use_backend("reference"):
        return edm_euler_step(
            x.double(), uncond.double(), None if cond is None else cond.double(), sigma, sigma_next,
            guidance, return_denoised=True,
        )  # fmt: skip


def _torch_step(x, uncond, cond, sigma, sigma_next, guidance):
    """PyTorch's own computation in the storage dtype: the diffusers pipeline + EulerDiscreteScheduler sequence."""
    guided = uncond
    if cond is not None:
        weight = guidance.to(x.dtype)[None, :, None, None, None]
        guided = uncond + weight * (cond - uncond)
    sample = x.to(torch.float32)
    sigma_t = torch.tensor(sigma, dtype=torch.float32)
    denoised = guided * (-sigma_t / (sigma_t**2 + 1) ** 0.5) + sample / (sigma_t**2 + 1)
    x_next = sample + (sample - denoised) / sigma_t * (sigma_next - sigma_t)
    return x_next.to(x.dtype), denoised.to(x.dtype)


def _assert_within(result: torch.Tensor, truth: torch.Tensor, torch_result: torch.Tensor, what: str) -> None:
    assert result.dtype == torch_result.dtype and result.shape == truth.shape, what
    assert_within_torch_error(result, truth, torch_result, result.dtype, what=what)


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_euler_step_matches_reference(backend: str, device: str, dtype: torch.dtype, cfg: bool) -> None:
    for sigma, sigma_next in SIGMA_PAIRS:
        x = _latents(sigma, dtype=dtype, device=device)
        _raw, uncond, cond = _model_outputs(dtype=dtype, device=device)
        cond = cond if cfg else None
        guidance = _guidance(device=device) if cfg else None
        with backends.use_backend(backend):
            x_next, denoised = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance, return_denoised=True)
            x_next_only = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance)
        assert backends.last_backend("edm_euler_step") == backend
        truth_next, truth_denoised = _truth_step(x, uncond, cond, sigma, sigma_next, guidance)
        torch_next, torch_denoised = _torch_step(x, uncond, cond, sigma, sigma_next, guidance)
        _assert_within(x_next, truth_next, torch_next, f"x_next at sigma {sigma}")
        _assert_within(denoised, truth_denoised, torch_denoised, f"denoised at sigma {sigma}")
        assert torch.equal(x_next_only, x_next), "return_denoised must not change x_next"


LAYOUTS = ("contiguous", "frame-strided", "transposed", "per-frame-weights-2d", "diffusers-guidance-shape")


def _layout_inputs(layout: str, sigma: float, device: str):
    frames = SHAPE[1]
    if layout == "frame-strided":  # every other frame of larger tensors: slab-contiguous views, read in place
        wide = (SHAPE[0], 2 * SHAPE[1], *SHAPE[2:])
        x = _latents(sigma, wide, device=device)[:, ::2]
        raw = _model_outputs(wide, device=device)[0][:, ::2]
        uncond, cond = raw.chunk(2)
    elif layout == "transposed":  # H and W swapped in memory: not slab-contiguous, copied by the kernels
        swapped = (*SHAPE[:3], SHAPE[4], SHAPE[3])
        x = _latents(sigma, swapped, device=device).transpose(3, 4)
        uncond, cond = (t.transpose(3, 4) for t in _model_outputs(swapped, device=device)[1:])
    else:
        x = _latents(sigma, device=device)
        _raw, uncond, cond = _model_outputs(device=device)
        if layout == "contiguous":
            uncond, cond = uncond.contiguous(), cond.contiguous()
    per_frame = torch.linspace(1.0, 3.0, frames, device=device)
    per_sample = per_frame[None] * torch.tensor([[1.0], [0.5]], device=device)  # differs per batch sample
    guidance = {
        "per-frame-weights-2d": per_sample,
        "diffusers-guidance-shape": per_sample[:, :, None, None, None],
    }.get(layout, per_frame)
    return x, uncond, cond, guidance


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_euler_step_layouts(backend: str, device: str, layout: str) -> None:
    sigma, sigma_next = SIGMA_PAIRS[1]
    x, uncond, cond, guidance = _layout_inputs(layout, sigma, device)
    if layout in ("frame-strided", "transposed"):
        assert not x.is_contiguous() and not uncond.is_contiguous() and not cond.is_contiguous()
    with backends.use_backend(backend):
        x_next, denoised = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance, return_denoised=True)
    weights = guidance.reshape(-1, SHAPE[1]).expand(SHAPE[0], SHAPE[1])
    with backends.use_backend("reference"):
        truth_next, truth_denoised = edm_euler_step(
            x.double(), uncond.double(), cond.double(), sigma, sigma_next, weights, return_denoised=True
        )
    # float32 storage and math: a few ulps of the result's magnitude.
    for result, truth in ((x_next, truth_next), (denoised, truth_denoised)):
        torch.testing.assert_close(result.double().cpu(), truth.cpu(), rtol=1e-6, atol=4e-7 * truth.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=requires_triton_interpreter)])
def test_halves_are_read_in_place(backend: str) -> None:
    """The two halves of the UNet's (2B, ...) output and frame-strided views are not copied (no aten::clone,
    which .contiguous() runs); a layout the kernels cannot read in place is, so the check can fail."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    sigma, sigma_next = SIGMA_PAIRS[1]

    def clones(layout: str) -> int:
        x, uncond, cond, guidance = _layout_inputs(layout, sigma, "cpu")
        with backends.use_backend(backend), profile(activities=[ProfilerActivity.CPU]) as prof:
            edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance)
        return sum(event.name == "aten::clone" for event in prof.events())

    assert clones("diffusers-guidance-shape") == 0  # uncond, cond = raw.chunk(2)
    assert clones("frame-strided") == 0
    assert clones("transposed") > 0


def test_guidance_weights_per_frame_and_sample() -> None:
    """Each frame f of sample b gets its own weight: compare with explicit per-(b, f) guidance arithmetic."""
    sigma, sigma_next = SIGMA_PAIRS[1]
    x, uncond, cond, guidance = _layout_inputs("per-frame-weights-2d", sigma, "cpu")
    x_next, denoised = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance, return_denoised=True)
    guided = uncond + guidance[:, :, None, None, None] * (cond - uncond)
    c_skip, c_out = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    torch.testing.assert_close(denoised, c_skip * x + c_out * guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_next, x + (x - denoised) / sigma * (sigma_next - sigma), rtol=1e-5, atol=1e-5)


def _truth_prepare(x, cond_latents, sigma, do_cfg):
    with backends.use_backend("reference"):
        return edm_prepare_model_input(x.double(), cond_latents.double(), sigma, do_cfg)


@pytest.mark.parametrize("backend, device", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("do_cfg", [True, False], ids=["cfg", "no-cfg"])
def test_prepare_model_input_matches_reference(backend: str, device: str, dtype: torch.dtype, do_cfg: bool) -> None:
    batch, frames, channels, height, width = SHAPE
    for sigma in (700.0, 0.7):
        x = _latents(sigma, dtype=dtype, device=device)
        for cond_latents in (
            torch.randn(batch, frames, 3, height, width, device=device).to(dtype),  # as diffusers repeats it
            torch.randn(batch, 3, height, width, device=device).to(dtype),  # one frame, broadcast in the kernel
        ):
            with backends.use_backend(backend):
                out = edm_prepare_model_input(x, cond_latents, sigma, do_cfg)
            assert backends.last_backend("edm_prepare_model_input") == backend
            assert out.shape == ((2 if do_cfg else 1) * batch, frames, channels + 3, height, width)
            assert out.dtype == dtype and out.is_contiguous()
            truth = _truth_prepare(x, cond_latents.expand(batch, frames, 3, height, width) if cond_latents.dim() == 5
                                   else cond_latents[:, None].expand(batch, frames, 3, height, width), sigma, do_cfg)
            torch_scaled = (x / ((torch.tensor(sigma) ** 2 + 1) ** 0.5)).to(dtype)
            halves = out.chunk(2) if do_cfg else (out,)
            for half in halves:
                _assert_within(half[:, :, :channels], truth[:batch, :, :channels], torch_scaled, "scaled latents")
            # Conditioning channels are copies (exact) and zeros for the unconditional half.
            expected_cond = cond_latents if cond_latents.dim() == 5 else cond_latents[:, None].expand(-1, frames, -1, -1, -1)
            assert torch.equal(halves[-1][:, :, channels:], expected_cond)
            if do_cfg:
                assert torch.equal(halves[0][:, :, channels:], torch.zeros_like(expected_cond))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=requires_triton_interpreter)])
def test_prepare_model_input_order_matches_diffusers_pipeline(backend: str) -> None:
    """diffusers: cat([latents] * 2) -> scale_model_input -> cat with cat([zeros, image_latents]) on channels."""
    from diffusers import EulerDiscreteScheduler  # noqa: PLC0415

    from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG  # noqa: PLC0415

    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    sigma = scheduler.sigmas[1].item()
    x = _latents(sigma)
    image_latents = torch.randn(SHAPE[0], 4, *SHAPE[3:])
    repeated = image_latents.unsqueeze(1).repeat(1, SHAPE[1], 1, 1, 1)
    pipeline_cond = torch.cat([torch.zeros_like(repeated), repeated])
    expected = torch.cat([scheduler.scale_model_input(torch.cat([x] * 2), t), pipeline_cond], dim=2)
    with backends.use_backend(backend):
        out = edm_prepare_model_input(x, image_latents, sigma, do_cfg=True)
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize(("backend", "device"), [p for p in BACKEND_PARAMS if p.values[0] != "reference"])
def test_opcheck(backend: str, device: str) -> None:
    """torch.library consistency (schema, fake/meta implementation, torch.compile tracing) of the compiled ops."""
    suffix = "_triton" if backend == "triton" else ""
    euler = getattr(torch.ops.svd_fast, f"edm_euler_step{suffix}")
    prepare = getattr(torch.ops.svd_fast, f"edm_prepare_model_input{suffix}")
    x = _latents(1.0).to(device)
    _raw, uncond, cond = (t.to(device) for t in _model_outputs())
    guidance = _guidance().expand(SHAPE[0], -1).to(device)
    torch.library.opcheck(euler, (x, uncond, cond, 1.0, 0.5, guidance, True))
    torch.library.opcheck(euler, (x, uncond, None, 1.0, 0.0, None, False))
    torch.library.opcheck(prepare, (x, torch.randn(SHAPE[0], SHAPE[1], 4, *SHAPE[3:], device=device), 1.0, True))


def _bad_step_calls():
    x = _latents(1.0)
    _raw, uncond, cond = _model_outputs()
    guidance = _guidance()
    return [
        ("x", lambda: edm_euler_step(x[0], uncond[0], cond[0], 1.0, 0.5, guidance)),
        ("model_out_uncond", lambda: edm_euler_step(x, uncond[:, :2], cond, 1.0, 0.5, guidance)),
        ("model_out_cond", lambda: edm_euler_step(x, uncond, cond.half(), 1.0, 0.5, guidance)),
        ("guidance", lambda: edm_euler_step(x, uncond, cond, 1.0, 0.5, torch.ones(SHAPE[1] + 1))),
        ("guidance", lambda: edm_euler_step(x, uncond, cond, 1.0, 0.5, None)),
        ("guidance", lambda: edm_euler_step(x, uncond, None, 1.0, 0.5, guidance)),
        ("sigma", lambda: edm_euler_step(x, uncond, cond, 0.0, 0.5, guidance)),
        ("sigma_next", lambda: edm_euler_step(x, uncond, cond, 1.0, -0.5, guidance)),
        ("sigma", lambda: edm_euler_step(x, uncond, cond, float("nan"), 0.5, guidance)),
        ("x", lambda: edm_euler_step(x.long(), uncond.long(), None, 1.0, 0.5, None)),
        ("cond_latents", lambda: edm_prepare_model_input(x, torch.randn(SHAPE[0], 4, 2, 2), 1.0, True)),
        ("cond_latents", lambda: edm_prepare_model_input(x, torch.randn(SHAPE[0], 4, *SHAPE[3:]).half(), 1.0, True)),
        ("cond_latents", lambda: edm_prepare_model_input(x, torch.randn(SHAPE[0], 2, 4, *SHAPE[3:]), 1.0, True)),
        ("do_cfg", lambda: edm_prepare_model_input(x, torch.randn(SHAPE[0], 4, *SHAPE[3:]), 1.0, 1)),
        ("sigma", lambda: edm_prepare_model_input(x, torch.randn(SHAPE[0], 4, *SHAPE[3:]), -1.0, True)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_step_calls())))
def test_bad_input_names_the_argument(index: int) -> None:
    name, call = _bad_step_calls()[index]
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        call()


def test_compiled_op_checks_its_arguments() -> None:
    """The C++ op is public through torch.ops too: it must reject bad shapes itself, naming the argument."""
    x = _latents(1.0)
    _raw, uncond, cond = _model_outputs()
    with pytest.raises(RuntimeError, match="guidance must have shape"):
        torch.ops.svd_fast.edm_euler_step(x, uncond, cond, 1.0, 0.5, torch.ones(SHAPE[0], SHAPE[1] + 1), False)
    with pytest.raises(RuntimeError, match="model_out_uncond shape"):
        torch.ops.svd_fast.edm_euler_step(x, uncond[:1], None, 1.0, 0.5, None, False)
    with pytest.raises(RuntimeError, match="cond_latents must have shape"):
        torch.ops.svd_fast.edm_prepare_model_input(x, torch.randn(1, 3, 4, 2, 2), 1.0, True)
