"""SVD sampling: schedule, scalings, guidance, the fused sampling loop and the drop-in scheduler against diffusers.

Parity reference: the installed diffusers' EulerDiscreteScheduler configured as SVD's scheduler_config.json
and its StableVideoDiffusionPipeline (on svd_fast's tiny architecture-true pipeline).
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from svd_fast.diffusers.scheduler import FusedEulerDiscreteScheduler
from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG, tiny_pipeline
from svd_fast.ops.edm_step import edm_euler_step
from svd_fast.sampling import (
    GUIDANCE_PRESETS,
    edm_scalings,
    edm_timesteps,
    frame_guidance,
    init_noise_sigma,
    karras_sigmas,
    sample,
)

STEP_COUNTS = (1, 2, 3, 14, 25, 30)


def _diffusers_scheduler(num_steps: int) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _fused_scheduler(num_steps: int) -> FusedEulerDiscreteScheduler:
    scheduler = FusedEulerDiscreteScheduler.from_config(EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG).config)
    scheduler.set_timesteps(num_steps)
    return scheduler


# --- schedule, scalings, guidance ----------------------------------------------------------------


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_schedule_matches_diffusers(num_steps: int) -> None:
    """svd_fast.sampling's framework-free schedule is diffusers' (the fused scheduler inherits diffusers' own)."""
    reference = _diffusers_scheduler(num_steps)
    sigmas = karras_sigmas(num_steps)
    torch.testing.assert_close(sigmas, reference.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(edm_timesteps(sigmas), reference.timesteps, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(init_noise_sigma(sigmas), reference.init_noise_sigma, rtol=1e-7, atol=0)
    assert len(_fused_scheduler(num_steps).timesteps) == num_steps


def test_schedule_is_the_karras_formula() -> None:
    """Independent of diffusers: SVD_NOTES' formula in float64, sigma_max first, sigma_min last, then 0."""
    n, s_min, s_max, rho = 25, 0.002, 700.0, 7.0
    expected = [(s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(n)]
    sigmas = karras_sigmas(n)
    torch.testing.assert_close(sigmas.double(), torch.tensor([*expected, 0.0], dtype=torch.float64), rtol=1e-7, atol=0)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    torch.testing.assert_close(edm_timesteps(sigmas).double(), 0.25 * torch.tensor(expected, dtype=torch.float64).log())
    assert init_noise_sigma(sigmas).item() == pytest.approx(math.sqrt(700.0**2 + 1), rel=1e-7)


def test_custom_sigmas_match_diffusers() -> None:
    sigmas = [80.0, 10.0, 1.0, 0.1, 0.0]
    reference = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    reference.set_timesteps(sigmas=sigmas)
    ours = FusedEulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    ours.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.sigmas, reference.sigmas)
    torch.testing.assert_close(ours.timesteps, reference.timesteps)
    assert ours.num_inference_steps == reference.num_inference_steps == 4


@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.0, 37.0, 700.0])
def test_scalings_reproduce_diffusers_denoised(sigma: float) -> None:
    """D = c_skip x + c_out F equals EulerDiscreteScheduler's pred_original_sample; c_in and c_noise its input scaling."""
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=[sigma, 0.0])
    x, model_output = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64).unbind(0)
    t = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(x.float(), t)
    denoised = scheduler.step(model_output.float(), t, x.float()).pred_original_sample
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    torch.testing.assert_close(denoised.double(), c_skip * x + c_out * model_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.double(), c_in * x, rtol=1e-6, atol=1e-7)
    assert c_noise == pytest.approx(t.item(), rel=1e-6, abs=1e-7)
    tensor_scalings = edm_scalings(torch.tensor(sigma, dtype=torch.float64))
    for from_float, from_tensor in zip((c_skip, c_out, c_in, c_noise), tensor_scalings):
        assert from_tensor.item() == pytest.approx(from_float, rel=1e-12)


def test_frame_guidance_matches_pipeline_and_presets() -> None:
    num_frames, batch = 14, 2
    guidance = frame_guidance(num_frames, 1.0, 3.0, batch_size=batch, dtype=torch.float16)
    # StableVideoDiffusionPipeline.__call__, step 8
    expected = torch.linspace(1.0, 3.0, num_frames).unsqueeze(0).to("cpu", torch.float16).repeat(batch, 1)
    assert guidance.shape == (batch, num_frames, 1, 1, 1)
    assert torch.equal(guidance, expected[:, :, None, None, None])
    assert guidance[0, 0].item() == 1.0 and guidance[0, -1].item() == 3.0
    presets = {name: (p.min_guidance, p.max_guidance, p.num_inference_steps) for name, p in GUIDANCE_PRESETS.items()}
    assert presets == {"diffusers": (1.0, 3.0, 25), "svd": (1.0, 2.5, 25), "svd-xt": (1.5, 3.0, 30)}


# --- steps and trajectories with a fixed fake model ------------------------------------------------


def _fake_unet(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth stand-in for the UNet: depends on the noisy latents, the conditioning channels and t."""
    latents, cond = model_input[:, :, :4], model_input[:, :, 4:]
    frame_ramp = torch.linspace(-0.5, 0.5, model_input.shape[1], dtype=model_input.dtype)[None, :, None, None, None]
    return torch.tanh(0.9 * latents + 0.6 * cond + 0.1 * timestep + frame_ramp)


def _diffusers_loop(scheduler, latents, image_latents, guidance, do_cfg):
    """The denoising loop of StableVideoDiffusionPipeline.__call__ (step 9), with a fake UNet."""
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        latent_model_input = torch.cat([latent_model_input, image_latents], dim=2)
        noise_pred = _fake_unet(latent_model_input, t)
        if do_cfg:
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


def _trajectory_inputs(batch: int = 1, frames: int = 4):
    noise = torch.randn(batch, frames, 4, 3, 3)
    image_latents = torch.randn(batch, 4, 3, 3) + 0.3
    repeated = image_latents.unsqueeze(1).repeat(1, frames, 1, 1, 1)
    return noise, image_latents, repeated


@pytest.mark.parametrize("num_steps", [1, 25])
@pytest.mark.parametrize("do_cfg", [True, False], ids=["cfg", "no-cfg"])
def test_trajectory_matches_diffusers(num_steps: int, do_cfg: bool) -> None:
    """A full trajectory (and a single step) with a fixed fake model: the drop-in scheduler and the fused
    sampling loop both equal diffusers' scheduler inside the pipeline's loop."""
    noise, image_latents, repeated = _trajectory_inputs(batch=2)
    max_guidance = 3.0 if do_cfg else 1.0
    guidance = frame_guidance(noise.shape[1], 1.0, max_guidance, batch_size=2)
    pipeline_cond = torch.cat([torch.zeros_like(repeated), repeated]) if do_cfg else repeated

    reference_scheduler = _diffusers_scheduler(num_steps)
    start = noise * reference_scheduler.init_noise_sigma
    expected = _diffusers_loop(reference_scheduler, start, pipeline_cond, guidance, do_cfg)

    scheduler = _fused_scheduler(num_steps)
    results = {"drop-in": _diffusers_loop(scheduler, noise * scheduler.init_noise_sigma, pipeline_cond, guidance, do_cfg)}
    results["sample"] = sample(
        lambda model_input, step: _fake_unet(model_input, scheduler.timesteps[step]),
        start, image_latents, scheduler.sigmas, guidance,
    )  # fmt: skip
    # float32 rounding of the last step happens at the scale of its input, ~ sigma_last * |noise| (plus data
    # scale): x_next = x + (x - D) / sigma * (0 - sigma) cancels x in both implementations.
    last_input_scale = reference_scheduler.sigmas[-2].item() * noise.abs().max().item() + 10.0
    atol = 4 * torch.finfo(torch.float32).eps * last_input_scale
    for name, result in results.items():
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert expected.abs().max() < 10, "the trajectory must end at data scale, not noise scale"


def test_single_step_outputs_match_diffusers() -> None:
    reference, ours = _diffusers_scheduler(25), _fused_scheduler(25)
    for step in (0, 12, 24):
        t = reference.timesteps[step]
        sample = torch.randn(1, 3, 4, 3, 3) * reference.sigmas[step] + 0.5
        model_output = torch.randn(1, 3, 4, 3, 3)
        reference._step_index = ours._step_index = step  # noqa: SLF001 - jump into the middle of the schedule
        expected = reference.step(model_output, t, sample)
        result = ours.step(model_output, t, sample)
        torch.testing.assert_close(result.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.pred_original_sample, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert ours.step_index == step + 1


def test_churn_step_follows_diffusers() -> None:
    """Stochastic scheduler steps (unfused) draw the same noise and do the same arithmetic as diffusers."""
    reference, ours = _diffusers_scheduler(10), _fused_scheduler(10)
    sample, model_output = torch.randn(2, 1, 3, 4, 2, 2).unbind(0)
    t = reference.timesteps[0]
    expected = reference.step(model_output, t, sample, s_churn=5.0, generator=torch.Generator().manual_seed(3))
    result = ours.step(model_output, t, sample, s_churn=5.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.prev_sample, expected.prev_sample)


# --- the drop-in scheduler inside diffusers' StableVideoDiffusionPipeline ---------------------------


@pytest.fixture(scope="module")
def pipeline_and_image():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    return pipe, PIL.Image.fromarray(pixels)


def _run_pipeline(pipe, image, num_steps: int = 3, latents: torch.Tensor | None = None) -> torch.Tensor:
    return pipe(
        image, height=64, width=64, num_frames=8, num_inference_steps=num_steps, latents=latents,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).frames  # fmt: skip


def test_drop_in_scheduler_in_stock_pipeline(pipeline_and_image) -> None:
    pipe, image = pipeline_and_image
    stock_scheduler = pipe.scheduler
    expected = _run_pipeline(pipe, image)
    try:
        pipe.scheduler = FusedEulerDiscreteScheduler.from_config(stock_scheduler.config)
        result = _run_pipeline(pipe, image)
    finally:
        pipe.scheduler = stock_scheduler
    assert result.shape == expected.shape == (1, 8, 4, 32, 32)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_fused_sampler_with_pipeline_unet(pipeline_and_image) -> None:
    """The fused sampling loop on the pipeline's own UNet and conditioning reproduces the stock pipeline."""
    pipe, image = pipeline_and_image
    recorded: dict[str, torch.Tensor] = {}

    def record(_module, args, kwargs):
        recorded.setdefault("model_input", args[0])
        recorded.setdefault("encoder_hidden_states", kwargs["encoder_hidden_states"])
        recorded.setdefault("added_time_ids", kwargs["added_time_ids"])

    noise = torch.randn(1, 8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        expected = _run_pipeline(pipe, image, latents=noise)
    finally:
        handle.remove()

    scheduler = _fused_scheduler(3)

    def unet(model_input: torch.Tensor, step: int) -> torch.Tensor:
        return pipe.unet(
            model_input, scheduler.timesteps[step], encoder_hidden_states=recorded["encoder_hidden_states"],
            added_time_ids=recorded["added_time_ids"], return_dict=False,
        )[0]  # fmt: skip

    cond_latents = recorded["model_input"][1:, :, 4:]  # the conditional half's image latents
    guidance = frame_guidance(8, 1.0, 3.0)
    with torch.no_grad():
        result = sample(unet, noise * scheduler.init_noise_sigma, cond_latents, scheduler.sigmas, guidance)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [2, 4])
def test_dpmpp_2m_matches_diffusers_edm_dpm_solver(pipeline_and_image, num_steps: int) -> None:
    """optimize(pipe, sampler="dpmpp-2m") equals the stock pipeline with diffusers' EDMDPMSolverMultistepScheduler
    set up as SVD's EDM v-prediction (sigma_data 1, Karras sigmas, c_noise = ln(sigma) / 4): first order on the
    first step and on the step into sigma = 0, second order between (2 steps: no second-order step at all)."""
    from diffusers import EDMDPMSolverMultistepScheduler

    import svd_fast

    pipe, image = pipeline_and_image
    noise = torch.randn(1, 8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    stock_scheduler = pipe.scheduler
    pipe.scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, sigma_schedule="karras", prediction_type="v_prediction",
        rho=7.0, solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero",
    )  # fmt: skip
    try:
        expected = _run_pipeline(pipe, image, num_steps, latents=noise)
    finally:
        pipe.scheduler = stock_scheduler
    svd_fast.optimize(pipe, sampler="dpmpp-2m")
    try:
        result = _run_pipeline(pipe, image, num_steps, latents=noise)
    finally:
        svd_fast.restore(pipe)
    euler = _run_pipeline(pipe, image, num_steps, latents=noise)

    def relative(a: torch.Tensor) -> float:
        return float((a - expected).norm() / expected.norm())

    # The stock-parity bound of the fused Euler loop (relative L2 < 1e-4, float32 rounding): here diffusers also
    # computes the sigmas in float32 torch where svd_fast (like EulerDiscreteScheduler) uses float64 NumPy.
    assert relative(result) < 1e-4, relative(result)
    if num_steps > 2:  # the second-order term is really there: Euler is far from both
        assert relative(euler) > 10 * 1e-4, relative(euler)


# --- generic EDM samplers on a Gaussian target with an exact denoiser ---------------------------------

DATA_MEAN, DATA_STD = 0.7, 0.5


def _exact_gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[data | x] for data ~ N(mean, std^2) per element and x = data + sigma * noise."""
    return DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigma**2) * (x - DATA_MEAN)


def _ode_solution(x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """The probability-flow ODE's exact end point for the Gaussian target (the map is affine)."""
    return DATA_MEAN + (x_start - DATA_MEAN) * DATA_STD / math.sqrt(DATA_STD**2 + sigma_start**2)


def _exact_v_model(sigmas: torch.Tensor):
    """The raw v-prediction network whose EDM denoiser is the exact Gaussian one, in sample()'s calling form."""
    sigma_values = sigmas.tolist()

    def model(model_input: torch.Tensor, step: int) -> torch.Tensor:
        sigma = sigma_values[step]
        c_skip, c_out, c_in, _ = edm_scalings(sigma)
        x = model_input[:, :, :1] / c_in
        return (_exact_gaussian_denoiser(x, sigma) - c_skip * x) / c_out

    return model


def _exact_sample(x_start: torch.Tensor, sigmas: torch.Tensor, sampler: str) -> torch.Tensor:
    latents = x_start.reshape(1, 1, 1, 1, -1)
    cond = torch.zeros(1, 1, 1, 1, latents.shape[-1], dtype=latents.dtype)
    return sample(_exact_v_model(sigmas), latents, cond, sigmas, sampler=sampler).flatten()


def test_dpmpp_2m_converges_at_second_order_on_gaussian_target() -> None:
    """DPM-Solver++(2M) in sample() on the exact denoiser reaches the ODE's exact end point with a smaller
    error than Euler at the same steps, and at 15 steps no larger than Euler's at 25 (the claim optimize()'s
    sampler option makes; measured 0.16 vs 0.20); float64, on the reference backend."""
    x_start = torch.randn(4096, dtype=torch.float64) * 80.0
    exact = _ode_solution(x_start, 80.0)
    errors = {}
    for num_steps in (12, 15, 25, 50):
        sigmas = karras_sigmas(num_steps, sigma_max=80.0).double()
        for sampler in ("euler", "dpmpp-2m"):
            errors[sampler, num_steps] = (_exact_sample(x_start, sigmas, sampler) - exact).abs().max().item()
    assert errors["dpmpp-2m", 15] <= errors["euler", 25], errors
    assert errors["dpmpp-2m", 25] <= errors["euler", 50], errors
    assert all(errors["dpmpp-2m", n] < errors["euler", n] for n in (12, 25, 50)), errors
    assert errors["dpmpp-2m", 50] < errors["dpmpp-2m", 12] / 8, errors  # faster than first order


def test_ipndm_2_converges_at_second_order_on_gaussian_target() -> None:
    """The Adams-Bashforth sampler on the exact denoiser: below Euler at every step count, at 12 and 15 steps no
    larger than Euler's error at 25 (the claim generate and optimize() make for it), and second order: doubling
    the steps from 50 to 100 divides the error by about 4 (> 3; first order gives 2). float64, reference backend."""
    x_start = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    exact = _ode_solution(x_start, 80.0)
    errors = {}
    for num_steps in (12, 15, 25, 50, 100):
        sigmas = karras_sigmas(num_steps, sigma_max=80.0).double()
        for sampler in ("euler", "ipndm-2"):
            errors[sampler, num_steps] = (_exact_sample(x_start, sigmas, sampler) - exact).abs().max().item()
    assert errors["ipndm-2", 12] <= errors["euler", 25], errors
    assert errors["ipndm-2", 15] <= errors["euler", 25], errors
    assert all(errors["ipndm-2", n] < errors["euler", n] for n in (12, 15, 25, 50, 100)), errors
    assert errors["ipndm-2", 50] > 3 * errors["ipndm-2", 100], errors


def test_ipndm_2_is_the_adams_bashforth_recurrence() -> None:
    """sample(sampler="ipndm-2") with guidance, CFG and a nonlinear model equals the recurrence written out:
    d_i = (x_i - D(x_i; s_i)) / s_i, x_1 = x_0 + (s_1 - s_0) d_0, x_(i+1) = x_i + (s_(i+1) - s_i) (3 d_i - d_(i-1)) / 2,
    with D the guided EDM v-prediction denoiser computed here in float64 (guards the order of the slopes, the
    first step's lower order and the step into sigma = 0)."""
    generator = torch.Generator().manual_seed(3)
    frames = 3
    x_start = torch.randn(1, frames, 2, 3, 3, dtype=torch.float64, generator=generator) * 80.0
    cond = torch.randn(1, 1, 2, 3, 3, dtype=torch.float64, generator=generator)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sigmas = karras_sigmas(6, sigma_max=80.0).double()
    timesteps = edm_timesteps(sigmas).double()

    def raw_model(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        latents, conditioning = model_input[:, :, :2], model_input[:, :, 2:]
        return torch.tanh(latents * 1.3 + conditioning * 0.4 + timestep) - 0.2 * latents

    def guided_denoiser(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        c_skip, c_out, c_in, _ = edm_scalings(sigma)
        uncond = raw_model(torch.cat([c_in * x, torch.zeros_like(cond).expand(1, frames, -1, -1, -1)], 2), timesteps[step])
        conditional = raw_model(torch.cat([c_in * x, cond.expand(1, frames, -1, -1, -1)], 2), timesteps[step])
        guided = uncond + weights[None, :, None, None, None] * (conditional - uncond)
        return c_skip * x + c_out * guided

    x, previous_slope = x_start.clone(), None
    values = sigmas.tolist()
    for step, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        slope = (x - guided_denoiser(x, sigma, step)) / sigma
        combined = slope if previous_slope is None else (3 * slope - previous_slope) / 2
        x, previous_slope = x + (sigma_next - sigma) * combined, slope
    result = sample(
        lambda model_input, step: raw_model(model_input, timesteps[step]), x_start, cond, sigmas, weights,
        sampler="ipndm-2",
    )  # fmt: skip
    euler = sample(lambda model_input, step: raw_model(model_input, timesteps[step]), x_start, cond, sigmas, weights)
    torch.testing.assert_close(result, x, rtol=1e-9, atol=1e-9)
    assert (euler - x).abs().max() > 1e-3  # the second-order term is really there


def test_callback_can_replace_latents() -> None:
    sigmas = karras_sigmas(3, sigma_max=80.0).double()
    x_start = torch.randn(1, 1, 1, 1, 16, dtype=torch.float64)
    cond = torch.zeros_like(x_start)
    seen: list[int] = []

    def on_step_end(step: int, x: torch.Tensor) -> torch.Tensor:
        seen.append(step)
        return torch.zeros_like(x) if step == 2 else x

    result = sample(_exact_v_model(sigmas), x_start, cond, sigmas, on_step_end=on_step_end)
    assert seen == [0, 1, 2] and torch.equal(result, torch.zeros_like(result))


def test_scheduler_overrides_only_the_step() -> None:
    assert issubclass(FusedEulerDiscreteScheduler, EulerDiscreteScheduler)
    overridden = {name for name in vars(FusedEulerDiscreteScheduler) if name in vars(EulerDiscreteScheduler)}
    assert overridden <= {"step", "_compatibles", "__module__", "__doc__"}, overridden


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, call",
    [
        ("num_steps", lambda: karras_sigmas(0)),
        ("num_steps", lambda: karras_sigmas(2.5)),
        ("sigma_min", lambda: karras_sigmas(10, sigma_min=700.0, sigma_max=700.0)),
        ("sigma_min", lambda: karras_sigmas(10, sigma_min=-1.0)),
        ("timestep_spacing", lambda: init_noise_sigma(karras_sigmas(10), timestep_spacing="middle")),
        ("num_frames", lambda: frame_guidance(0)),
        ("max_guidance", lambda: frame_guidance(4, 1.0, float("nan"))),
        ("sigmas", lambda: sample(_fake_unet, torch.zeros(1, 1, 4, 2, 2), torch.zeros(1, 4, 2, 2), [1.0])),
        ("sigmas", lambda: sample(_fake_unet, torch.zeros(1, 1, 4, 2, 2), torch.zeros(1, 4, 2, 2), [1.0, 0.0, 0.5, 0.0])),
        ("guidance", lambda: edm_euler_step(*torch.zeros(3, 1, 2, 4, 2, 2), 1.0, 0.5, float("nan"))),
        ("guidance", lambda: edm_euler_step(*torch.zeros(3, 1, 2, 4, 2, 2), 1.0, 0.5, torch.tensor([1.0, float("nan")]))),
        ("sampler", lambda: sample(_fake_unet, torch.zeros(1, 1, 4, 2, 2), torch.zeros(1, 4, 2, 2), [1.0, 0.0], sampler="heun")),
    ],
)
def test_bad_input_names_the_argument(name: str, call) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_scheduler_misuse_is_explained() -> None:
    scheduler = _fused_scheduler(2)
    x = torch.zeros(1, 2, 4, 2, 2)
    with pytest.raises(ValueError, match="integer indices"):
        scheduler.step(x, 0, x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(RuntimeError, match="all 2 steps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
