"""Consistency sampling (AnimateLCM-SVD-xt's sampler): the schedule, the strict scheduler config, the fused sampler
against an independent float64 implementation of the formulas on the tiny pipeline's UNet, and optimize()'s
sampler choice.

The float64 reference is written out here from the formulas (issue #26, Song et al. 2023 Alg. 1) and runs the
UNet in float64; the fused sampler runs it in float32. Compared step by step from the same latents, the two
differ by float32 rounding of the UNet and of the step (relative ~1e-6 on O(1) outputs; the latents reach
|x| ~ sigma_max = 700 at the first step, hence the relative tolerance).
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.diffusers.patching import describe, optimize, restore
from svd_fast.diffusers.tiny import tiny_pipeline
from svd_fast.sampling.consistency import ANIMATELCM_SVD_CONFIG, consistency_sample, consistency_sigmas

FRAMES, LATENT_SIZE = 2, 8


def _reference_sigmas(num_steps: int, config: dict) -> np.ndarray:
    n_train = config["num_train_timesteps"]
    indices = [i * (n_train // num_steps) for i in range(num_steps)]
    lo, hi = config["sigma_min"] ** (1 / config["rho"]), config["sigma_max"] ** (1 / config["rho"])
    return np.array([(hi + i / (n_train - 1) * (lo - hi)) ** config["rho"] for i in indices] + [0.0])


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 40])
def test_schedule_is_the_karras_ramp_over_train_indices(num_steps: int) -> None:
    sigmas = consistency_sigmas(num_steps, 40, 0.002, 700.0, 7)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    np.testing.assert_allclose(sigmas.double().numpy(), _reference_sigmas(num_steps, ANIMATELCM_SVD_CONFIG), rtol=1e-7)
    assert sigmas[0] == pytest.approx(700.0, rel=1e-6)
    if num_steps == 40:
        assert sigmas[-2] == pytest.approx(0.002, rel=1e-6)


def test_more_steps_than_train_timesteps_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"num_steps \(41\) must be <= num_train_timesteps \(40\)"):
        SVDConsistencyScheduler().set_timesteps(41)


def test_from_config_takes_exactly_animatelcm_keys_and_honours_each() -> None:
    scheduler = SVDConsistencyScheduler.from_config(ANIMATELCM_SVD_CONFIG)
    assert {key: scheduler.config[key] for key in ANIMATELCM_SVD_CONFIG} == ANIMATELCM_SVD_CONFIG
    assert scheduler.init_noise_sigma == pytest.approx((700.0**2 + 1) ** 0.5)
    changed = {"num_train_timesteps": 20, "sigma_min": 0.01, "sigma_max": 80.0, "rho": 3}
    for key, value in changed.items():
        other = SVDConsistencyScheduler.from_config({**ANIMATELCM_SVD_CONFIG, key: value})
        other.set_timesteps(4)
        scheduler.set_timesteps(4)
        assert not torch.equal(other.sigmas, scheduler.sigmas), key
    # s_noise, sigma_data and clip_denoised act in the step (tested against the float64 reference below).
    with pytest.raises(ValueError, match=r"unknown keys \['prediction_type'\]"):
        SVDConsistencyScheduler.from_config({**ANIMATELCM_SVD_CONFIG, "prediction_type": "v_prediction"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_train_timesteps", 1), ("num_train_timesteps", 4.0), ("sigma_min", 0.0), ("sigma_max", float("nan")),
     ("sigma_data", -1.0), ("s_noise", -0.5), ("rho", "7"), ("clip_denoised", "no"), ("sigma_min", 800.0)],
)  # fmt: skip
def test_invalid_config_values_are_errors(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        SVDConsistencyScheduler.from_config({**ANIMATELCM_SVD_CONFIG, key: value})


# --- the fused sampler against float64 formulas ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    pipe = tiny_pipeline(seed=0)
    unet32 = pipe.unet.eval()
    unet64 = copy.deepcopy(unet32).double()
    generator = torch.Generator().manual_seed(5)
    conditioning = {
        "cond_latents": torch.randn(1, 1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator),
        "context": torch.randn(1, 1, 64, generator=generator),
        "time_ids": torch.tensor([[6.0, 127.0, 0.02]]),
    }
    return unet32, unet64, conditioning


def _unet_call(unet, model_input: torch.Tensor, timestep: float, conditioning: dict) -> torch.Tensor:
    batch = model_input.shape[0]
    dtype = model_input.dtype
    context = conditioning["context"].to(dtype).repeat(batch, 1, 1)
    if batch == 2:  # CFG batch: unconditional half first, with a zero image embedding (as the pipeline)
        context[0] = 0
    time_ids = conditioning["time_ids"].to(dtype).repeat(batch, 1)
    return unet(model_input, torch.tensor(timestep, dtype=torch.float64), encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]


def _reference_step(unet64, x, sigma, sigma_next, noise, config, guidance, conditioning):
    """One consistency step in float64, from the formulas."""
    sd = config["sigma_data"]
    x = x.double()
    c_in = 1 / np.sqrt(sigma**2 + sd**2)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = -sigma * sd / np.sqrt(sigma**2 + sd**2)
    cond = conditioning["cond_latents"].double().expand(-1, x.shape[1], -1, -1, -1)
    timestep = 0.25 * np.log(sigma)
    conditional = torch.cat([c_in * x, cond], dim=2)
    if guidance is None:
        model_output = _unet_call(unet64, conditional, timestep, conditioning)
    else:
        both = torch.cat([torch.cat([c_in * x, torch.zeros_like(cond)], dim=2), conditional])
        uncond, cond_out = _unet_call(unet64, both, timestep, conditioning).chunk(2)
        weights = torch.linspace(guidance[0], guidance[1], x.shape[1], dtype=torch.float64)[None, :, None, None, None]
        model_output = uncond + weights * (cond_out - uncond)
    denoised = c_skip * x + c_out * model_output
    if config["clip_denoised"]:
        denoised = denoised.clamp(-1, 1)
    if noise is not None:
        denoised = denoised + config["s_noise"] * noise.double() * sigma_next
    return denoised


CASES = [
    # (num_steps, config changes, guidance (min, max) or None)
    (1, {}, None),
    (4, {}, None),
    (4, {"s_noise": 0.0}, None),
    (40, {}, None),
    (3, {"sigma_data": 0.5, "clip_denoised": True, "s_noise": 0.7, "num_train_timesteps": 12}, (1.0, 2.0)),
]


@pytest.mark.parametrize(("num_steps", "changes", "guidance"), CASES)
def test_fused_sampler_matches_float64_formulas_step_by_step(tiny_unet, num_steps, changes, guidance) -> None:
    unet32, unet64, conditioning = tiny_unet
    config = {**ANIMATELCM_SVD_CONFIG, **changes}
    scheduler = SVDConsistencyScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double().tolist()
    noise_stream = torch.Generator().manual_seed(11)  # the same stream for every s_noise
    drawn: dict[int, torch.Tensor] = {}
    shape = (1, FRAMES, 4, LATENT_SIZE, LATENT_SIZE)

    def noise(step: int) -> torch.Tensor:
        drawn[step] = torch.randn(shape, generator=noise_stream)
        return drawn[step]

    trajectory = [torch.randn(shape, generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma]

    def on_step_end(step: int, x: torch.Tensor) -> torch.Tensor:
        trajectory.append(x.clone())
        return x

    def model(model_input: torch.Tensor, step: int) -> torch.Tensor:
        return _unet_call(unet32, model_input, float(scheduler.timesteps[step]), conditioning)

    weights = None if guidance is None else torch.linspace(guidance[0], guidance[1], FRAMES)
    with torch.no_grad():
        result = consistency_sample(
            model, trajectory[0].clone(), conditioning["cond_latents"], scheduler.sigmas, weights, noise,
            config["s_noise"], config["clip_denoised"], config["sigma_data"], on_step_end,
        )  # fmt: skip
        assert len(trajectory) == num_steps + 1
        torch.testing.assert_close(result, trajectory[-1])
        renoised_steps = [] if config["s_noise"] == 0 else list(range(num_steps - 1))
        assert sorted(drawn) == renoised_steps
        for step in range(num_steps):
            expected = _reference_step(
                unet64, trajectory[step], sigmas[step], sigmas[step + 1], drawn.get(step), config, guidance, conditioning
            )
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(trajectory[step + 1].double(), expected, rtol=1e-5, atol=1e-5 * scale, msg=f"step {step}")


# --- in the pipeline --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_and_image():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    return pipe, PIL.Image.fromarray(pixels)


def _latents(pipe, image, num_steps: int, max_guidance: float = 1.0) -> torch.Tensor:
    torch.manual_seed(0)  # no generator: the stock pipeline's scheduler.step draws its noise from the global RNG
    return pipe(
        image, height=64, width=64, num_frames=4, num_inference_steps=num_steps, min_guidance_scale=1.0,
        max_guidance_scale=max_guidance, output_type="latent",
    ).frames  # fmt: skip


@pytest.mark.parametrize(("s_noise", "max_guidance"), [(1.0, 1.0), (0.0, 1.0), (1.0, 1.5)])
def test_optimize_keeps_and_fuses_the_consistency_scheduler(pipeline_and_image, s_noise, max_guidance) -> None:
    """optimize(pipe) with its default sampler "auto" runs consistency sampling in the fused loop; equal to the stock
    pipeline with the same scheduler, the same noise stream."""
    pipe, image = pipeline_and_image
    original = pipe.scheduler
    pipe.scheduler = SVDConsistencyScheduler.from_config({**ANIMATELCM_SVD_CONFIG, "s_noise": s_noise})
    try:
        expected = _latents(pipe, image, 4, max_guidance)
        optimize(pipe)
        try:
            assert isinstance(pipe.scheduler, SVDConsistencyScheduler)
            assert describe(pipe)["patched"]["denoising loop -> fused input preparation + guidance + consistency step"] == 1
            result = _latents(pipe, image, 4, max_guidance)
        finally:
            restore(pipe)
        if s_noise == 0:  # deterministic: the noise stream does not matter
            torch.manual_seed(123)
            torch.testing.assert_close(_latents(pipe, image, 4, max_guidance), expected)
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_explicit_sampler_overrides_the_pipeline_scheduler(pipeline_and_image) -> None:
    pipe, _image = pipeline_and_image
    original = pipe.scheduler
    optimize(pipe, sampler="consistency")
    try:
        assert isinstance(pipe.scheduler, SVDConsistencyScheduler)
        assert {key: pipe.scheduler.config[key] for key in ANIMATELCM_SVD_CONFIG} == ANIMATELCM_SVD_CONFIG
    finally:
        restore(pipe)
    assert pipe.scheduler is original
    pipe.scheduler = SVDConsistencyScheduler()
    try:
        optimize(pipe, sampler="euler")
        assert type(pipe.scheduler) is EulerDiscreteScheduler  # diffusers' own: save_pretrained names it
        restore(pipe)
        optimize(pipe)
        assert isinstance(pipe.scheduler, SVDConsistencyScheduler)
        restore(pipe)
    finally:
        pipe.scheduler = original
    with pytest.raises(ValueError, match="sampler must be one of"):
        optimize(pipe, sampler="lcm")
