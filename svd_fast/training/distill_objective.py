"""Latent consistency distillation's objective for SVD (Song et al. 2023 "Consistency Models", consistency
distillation; Luo et al. 2023 "Latent Consistency Models", the skipping schedule and guided teacher).

Noise levels: the Karras grid sigma_0 > ... > sigma_{N-1} of the consistency scheduler (N = num_train_timesteps).
Per sample an index i < N - k is drawn (k = skip_steps) and, with x the clean latents and n the noise:

    x_hi = x + sigma_i n
    x_lo = one teacher ODE step from (x_hi, sigma_i) to sigma_{i+k}, with the teacher's per-frame guidance:
           "euler":   x_lo = x_hi + (sigma_{i+k} - sigma_i) d(x_hi, sigma_i)
           "ipndm-2": two sub-steps through the midpoint of the ramp, the second second-order Adams-Bashforth
                      (svd_fast.sampling.samplers' ipndm-2): x_lo = x_mid + (sigma_{i+k} - sigma_mid) (3 d_mid - d_hi) / 2
           with d(x, s) = (x - D_teacher(x; s)) / s, the EDM ODE's slope
    loss = distance(D_student(x_hi; sigma_i), D_target(x_lo; sigma_{i+k}))      (the target network: EMA of the student)

D is SVD's v-prediction denoiser (c_skip x + c_out F(c_in x, c_noise)) for all three networks, which is the
consistency parametrisation that AnimateLCM-SVD-xt samples with (sigma_data = 1). Distances: "pseudo-huber",
sqrt(|a - b|^2 + c^2) - c per sample with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, improved consistency
training), or "l2", the mean squared difference.
"""

from __future__ import annotations

import math

import torch

from svd_fast.sampling.consistency import consistency_sigmas
from svd_fast.sampling.denoiser import edm_scalings
from svd_fast.training.objective import TrainingBatch

TEACHER_SOLVERS = ("euler", "ipndm-2")
DISTANCES = ("pseudo-huber", "l2")


def karras_grid(num_train_timesteps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The N training noise levels, highest first (float64): the consistency scheduler's N-step sigmas."""
    return consistency_sigmas(num_train_timesteps, num_train_timesteps, sigma_min, sigma_max, rho)[:-1].double()


def karras_at(ramp: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras sigma at ramp position(s) in [0, 1] (0: sigma_max), float64."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp.double() * (lo - hi)) ** rho


class Conditioning:
    """A batch's conditioning, built once: frame-repeated first-frame latents, image embeddings and time ids,
    and their zeroed unconditional copies for the teacher's classifier-free guidance."""

    def __init__(self, batch: TrainingBatch, dtype: torch.dtype) -> None:
        frames = batch.latents.shape[1]
        self.cond = batch.cond_latent.unsqueeze(1).repeat(1, frames, 1, 1, 1)
        self.embeds = batch.image_embeds.to(dtype)
        self.time_ids = batch.added_time_ids.to(dtype)
        self.dtype = dtype

    def denoise(self, model, x: torch.Tensor, sigma: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma) in fp32 with ``model`` at the compute dtype; ``guidance`` (B, F) weights run the CFG pair."""
        view = (-1, 1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.float())
        scaled = c_in.view(view) * x
        if guidance is None:
            model_input, embeds, time_ids, timesteps = torch.cat([scaled, self.cond], dim=2), self.embeds, self.time_ids, c_noise
        else:
            unconditional = torch.cat([scaled, torch.zeros_like(self.cond)], dim=2)
            model_input = torch.cat([unconditional, torch.cat([scaled, self.cond], dim=2)])
            embeds = torch.cat([torch.zeros_like(self.embeds), self.embeds])
            time_ids, timesteps = self.time_ids.repeat(2, 1), c_noise.repeat(2)
        output = model(model_input.to(self.dtype), timesteps, encoder_hidden_states=embeds, added_time_ids=time_ids, return_dict=False)[0].float()
        if guidance is not None:
            uncond, cond = output.chunk(2)
            output = uncond + guidance[:, :, None, None, None] * (cond - uncond)
        return c_skip.view(view) * x + c_out.view(view) * output


def teacher_step(
    teacher, conditioning: Conditioning, x_hi: torch.Tensor, ramp_hi: torch.Tensor, ramp_lo: torch.Tensor,
    schedule: tuple[float, float, float], solver: str, guidance: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """One teacher ODE step from ramp position ``ramp_hi`` to ``ramp_lo`` (per sample) with ``solver``."""
    view = (-1, 1, 1, 1, 1)
    sigma_hi, sigma_lo = karras_at(ramp_hi, *schedule).float(), karras_at(ramp_lo, *schedule).float()

    def slope(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - conditioning.denoise(teacher, x, sigma, guidance)) / sigma.view(view)

    slope_hi = slope(x_hi, sigma_hi)
    if solver == "euler":
        return x_hi + (sigma_lo - sigma_hi).view(view) * slope_hi
    sigma_mid = karras_at((ramp_hi + ramp_lo) / 2, *schedule).float()
    x_mid = x_hi + (sigma_mid - sigma_hi).view(view) * slope_hi
    return x_mid + (sigma_lo - sigma_mid).view(view) * (3 * slope(x_mid, sigma_mid) - slope_hi) / 2


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float | None = None) -> torch.Tensor:
    """Per-sample distance between (B, ...) tensors."""
    squared = (a - b).square().flatten(1)
    if kind == "l2":
        return squared.mean(dim=1)
    c = 0.00054 * math.sqrt(squared.shape[1]) if huber_c is None else huber_c
    return (squared.sum(dim=1) + c * c).sqrt() - c


def consistency_distillation_loss(
    student, target, teacher, batch: TrainingBatch, index: torch.Tensor, *, num_train_timesteps: int, skip_steps: int,
    schedule: tuple[float, float, float], solver: str, guidance: torch.Tensor | None, kind: str,
    huber_c: float | None = None, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(mean loss, per-sample loss, sigma_i) for grid indices ``index`` (B,), i + skip_steps < N.
    ``schedule``: (sigma_min, sigma_max, rho); ``guidance``: the teacher's (B, F) weights or None (no CFG)."""
    conditioning = Conditioning(batch, dtype)
    ramp_hi = index.double() / (num_train_timesteps - 1)
    ramp_lo = (index + skip_steps).double() / (num_train_timesteps - 1)
    sigma_hi = karras_at(ramp_hi, *schedule).float().to(batch.latents.device)
    x_hi = batch.latents + sigma_hi.view(-1, 1, 1, 1, 1) * batch.noise
    with torch.no_grad():
        x_lo = teacher_step(teacher, conditioning, x_hi, ramp_hi.to(x_hi.device), ramp_lo.to(x_hi.device), schedule, solver, guidance)
        sigma_lo = karras_at(ramp_lo, *schedule).float().to(x_hi.device)
        target_denoised = conditioning.denoise(target, x_lo, sigma_lo)
    student_denoised = conditioning.denoise(student, x_hi, sigma_hi)
    per_sample = distance(student_denoised, target_denoised, kind, huber_c)
    return per_sample.mean(), per_sample.detach(), sigma_hi
