"""SVD sampling: schedule, scalings, guidance, samplers and the drop-in scheduler against diffusers.

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

from svd_fast.diffusers.scheduler import EDMEulerScheduler
from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG, tiny_pipeline
from svd_fast.sampling import (
    GUIDANCE_PRESETS,
    EDMDenoiser,
    edm_scalings,
    frame_guidance,
    karras_schedule,
    karras_sigmas,
    sample_euler,
    sample_guided_euler,
    sample_heun,
)

STEP_COUNTS = (1, 2, 3, 14, 25, 30)


def _diffusers_scheduler(num_steps: int) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _edm_scheduler(num_steps: int) -> EDMEulerScheduler:
    scheduler = EDMEulerScheduler.from_config(EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG).config)
    scheduler.set_timesteps(num_steps)
    return scheduler


# --- schedule, scalings, guidance ----------------------------------------------------------------


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_schedule_matches_diffusers(num_steps: int) -> None:
    reference = _diffusers_scheduler(num_steps)
    schedule = karras_schedule(num_steps)
    scheduler = _edm_scheduler(num_steps)
    for ours in (schedule, scheduler):
        torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours.timesteps, reference.timesteps, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.init_noise_sigma, reference.init_noise_sigma, rtol=1e-7, atol=0)
    assert schedule.num_steps == num_steps == len(scheduler.timesteps)


def test_schedule_is_the_karras_formula() -> None:
    """Independent of diffusers: SVD_NOTES' formula in float64, sigma_max first, sigma_min last, then 0."""
    n, s_min, s_max, rho = 25, 0.002, 700.0, 7.0
    expected = [(s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(n)]
    sigmas = karras_sigmas(n)
    torch.testing.assert_close(sigmas.double(), torch.tensor([*expected, 0.0], dtype=torch.float64), rtol=1e-7, atol=0)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    schedule = karras_schedule(n)
    torch.testing.assert_close(schedule.timesteps.double(), 0.25 * torch.tensor(expected, dtype=torch.float64).log())
    assert schedule.init_noise_sigma.item() == pytest.approx(math.sqrt(700.0**2 + 1), rel=1e-7)


def test_custom_sigmas_match_diffusers() -> None:
    sigmas = [80.0, 10.0, 1.0, 0.1, 0.0]
    reference = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    reference.set_timesteps(sigmas=sigmas)
    ours = EDMEulerScheduler(**SVD_SCHEDULER_CONFIG)
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


def _diffusers_loop(scheduler, latents, image_latents, guidance, do_cfg, step_fn=None):
    """The denoising loop of StableVideoDiffusionPipeline.__call__ (step 9), with a fake UNet."""
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        latent_model_input = torch.cat([latent_model_input, image_latents], dim=2)
        noise_pred = _fake_unet(latent_model_input, t)
        if step_fn is not None:
            latents = step_fn(noise_pred, t, latents)
            continue
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
    """A full trajectory (and a single step) with a fixed fake model: the drop-in scheduler, its step_guided
    and sample_guided_euler all equal diffusers' scheduler inside the pipeline's loop."""
    noise, image_latents, repeated = _trajectory_inputs(batch=2)
    max_guidance = 3.0 if do_cfg else 1.0
    guidance = frame_guidance(noise.shape[1], 1.0, max_guidance, batch_size=2)
    pipeline_cond = torch.cat([torch.zeros_like(repeated), repeated]) if do_cfg else repeated

    reference_scheduler = _diffusers_scheduler(num_steps)
    start = noise * reference_scheduler.init_noise_sigma
    expected = _diffusers_loop(reference_scheduler, start, pipeline_cond, guidance, do_cfg)

    scheduler = _edm_scheduler(num_steps)
    results = {"drop-in": _diffusers_loop(scheduler, noise * scheduler.init_noise_sigma, pipeline_cond, guidance, do_cfg)}
    if do_cfg:
        scheduler.set_timesteps(num_steps)
        results["step_guided"] = _diffusers_loop(
            scheduler, start, pipeline_cond, guidance, do_cfg,
            step_fn=lambda out, t, x: scheduler.step_guided(out, t, x, guidance).prev_sample,
        )  # fmt: skip
    results["sample_guided_euler"] = sample_guided_euler(_fake_unet, start, image_latents, scheduler.sigmas, guidance)
    # float32 rounding of the last step happens at the scale of its input, ~ sigma_last * |noise| (plus data
    # scale): x_next = x + (x - D) / sigma * (0 - sigma) cancels x in both implementations.
    last_input_scale = reference_scheduler.sigmas[-2].item() * noise.abs().max().item() + 10.0
    atol = 4 * torch.finfo(torch.float32).eps * last_input_scale
    for name, result in results.items():
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert expected.abs().max() < 10, "the trajectory must end at data scale, not noise scale"


def test_single_step_outputs_match_diffusers() -> None:
    reference, ours = _diffusers_scheduler(25), _edm_scheduler(25)
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
    reference, ours = _diffusers_scheduler(10), _edm_scheduler(10)
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
        pipe.scheduler = EDMEulerScheduler.from_config(stock_scheduler.config)
        result = _run_pipeline(pipe, image)
    finally:
        pipe.scheduler = stock_scheduler
    assert result.shape == expected.shape == (1, 8, 4, 32, 32)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_fused_sampler_with_pipeline_unet(pipeline_and_image) -> None:
    """sample_guided_euler on the pipeline's own UNet and conditioning reproduces the stock pipeline."""
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

    def unet(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return pipe.unet(
            model_input, timestep, encoder_hidden_states=recorded["encoder_hidden_states"],
            added_time_ids=recorded["added_time_ids"], return_dict=False,
        )[0]  # fmt: skip

    cond_latents = recorded["model_input"][1:, :, 4:]  # the conditional half's image latents
    schedule = karras_schedule(3)
    guidance = frame_guidance(8, 1.0, 3.0)
    with torch.no_grad():
        result = sample_guided_euler(unet, noise * schedule.init_noise_sigma, cond_latents, schedule.sigmas, guidance)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


# --- generic EDM samplers on a Gaussian target with an exact denoiser ---------------------------------

DATA_MEAN, DATA_STD = 0.7, 0.5


def _exact_gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[data | x] for data ~ N(mean, std^2) per element and x = data + sigma * noise."""
    return DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigma**2) * (x - DATA_MEAN)


def _ode_solution(x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """The probability-flow ODE's exact end point for the Gaussian target (the map is affine)."""
    return DATA_MEAN + (x_start - DATA_MEAN) * DATA_STD / math.sqrt(DATA_STD**2 + sigma_start**2)


def test_heun_converges_on_gaussian_target() -> None:
    """Heun on the exact denoiser converges to the ODE's exact end point at second order (error / 16 per 4x
    steps; asserted / 10) while Euler converges at first order."""
    x_start = torch.randn(4096, dtype=torch.float64) * 80.0
    exact = _ode_solution(x_start, 80.0)
    errors = {}
    for num_steps in (8, 32, 128):
        sigmas = karras_sigmas(num_steps, sigma_max=80.0).double()
        errors["heun", num_steps] = (sample_heun(_exact_gaussian_denoiser, x_start, sigmas) - exact).abs().max().item()
        errors["euler", num_steps] = (sample_euler(_exact_gaussian_denoiser, x_start, sigmas) - exact).abs().max().item()
    assert errors["heun", 32] < errors["heun", 8] / 10 and errors["heun", 128] < errors["heun", 32] / 10, errors
    assert errors["heun", 128] < 1e-3 * exact.abs().max().item(), errors
    assert errors["heun", 32] < errors["euler", 32] and errors["heun", 128] < errors["euler", 128] / 10, errors


def test_edm_denoiser_wraps_a_raw_model() -> None:
    """EDMDenoiser(F) = c_skip x + c_out F(c_in x, c_noise): the v-prediction network of the exact denoiser."""

    def raw_v_model(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = math.exp(4 * float(timestep))
        c_skip, c_out, c_in, _ = edm_scalings(sigma)
        x = model_input / c_in
        return (_exact_gaussian_denoiser(x, sigma) - c_skip * x) / c_out

    denoiser = EDMDenoiser(raw_v_model)
    x = torch.randn(64, dtype=torch.float64) * 3
    torch.testing.assert_close(denoiser(x, 3.0), _exact_gaussian_denoiser(x, 3.0))


def test_churn_zero_equals_euler_and_churn_is_reproducible() -> None:
    sigmas = karras_sigmas(40, sigma_max=80.0).double()
    x_start = DATA_MEAN + torch.randn(4096, dtype=torch.float64) * math.sqrt(DATA_STD**2 + 80.0**2)
    euler = sample_euler(_exact_gaussian_denoiser, x_start, sigmas)
    assert torch.equal(sample_euler(_exact_gaussian_denoiser, x_start, sigmas, s_churn=0.0), euler)
    # Churn outside [s_tmin, s_tmax] adds nothing either.
    assert torch.equal(sample_euler(_exact_gaussian_denoiser, x_start, sigmas, s_churn=40.0, s_tmin=1e3), euler)
    runs = [
        sample_heun(_exact_gaussian_denoiser, x_start, sigmas, s_churn=40.0, generator=torch.Generator().manual_seed(seed))
        for seed in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], sample_heun(_exact_gaussian_denoiser, x_start, sigmas))
    # Stochastic sampling of the exact denoiser still lands on the target distribution (the 8 % allow for
    # churn's discretisation error at 40 steps, measured ~4 %; the sampling error of the std is ~0.6 %).
    samples = torch.cat(runs)
    assert samples.mean().item() == pytest.approx(DATA_MEAN, abs=0.05)
    assert samples.std().item() == pytest.approx(DATA_STD, rel=0.08)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, call",
    [
        ("num_steps", lambda: karras_schedule(0)),
        ("num_steps", lambda: karras_sigmas(2.5)),
        ("sigma_min", lambda: karras_sigmas(10, sigma_min=700.0, sigma_max=700.0)),
        ("sigma_min", lambda: karras_sigmas(10, sigma_min=-1.0)),
        ("timestep_spacing", lambda: karras_schedule(10, timestep_spacing="middle")),
        ("num_frames", lambda: frame_guidance(0)),
        ("max_guidance", lambda: frame_guidance(4, 1.0, float("nan"))),
        ("sigmas", lambda: sample_euler(_exact_gaussian_denoiser, torch.zeros(3), [1.0])),
        ("sigmas", lambda: sample_euler(_exact_gaussian_denoiser, torch.zeros(3), [1.0, 0.0, 0.5, 0.0])),
        ("s_churn", lambda: sample_heun(_exact_gaussian_denoiser, torch.zeros(3), [1.0, 0.0], s_churn=-1.0)),
        ("prediction_type", lambda: EDMEulerScheduler(prediction_type="epsilon")),
        ("use_karras_sigmas", lambda: EDMEulerScheduler(use_karras_sigmas=False)),
        ("sigma_min", lambda: EDMEulerScheduler(sigma_min=800.0)),
        ("num_inference_steps", lambda: EDMEulerScheduler().set_timesteps()),
        ("num_steps", lambda: EDMEulerScheduler().set_timesteps(0)),
    ],
)
def test_bad_input_names_the_argument(name: str, call) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_scheduler_misuse_is_explained() -> None:
    scheduler = EDMEulerScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.init_noise_sigma  # noqa: B018 - the property access is what is tested
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 2, 4, 2, 2)
    with pytest.raises(ValueError, match="integer index"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.step(x, torch.tensor(123.0), x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(RuntimeError, match="all 2 steps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="guidance"):
        scheduler.step_guided(torch.zeros(2, 2, 4, 2, 2), scheduler.timesteps[0], x, torch.ones(3))
