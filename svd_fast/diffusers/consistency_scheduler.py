"""SVDConsistencyScheduler: the multistep consistency sampler of few-step SVD models (AnimateLCM-SVD-xt, and the
students of ``svd-fast distill``) as a diffusers scheduler.

Built ``from_config`` with exactly AnimateLCM-SVD-xt's keys (num_train_timesteps, sigma_min, sigma_max,
sigma_data, s_noise, rho, clip_denoised; an unknown key or an invalid value is a ValueError), it is a drop-in for
a stock StableVideoDiffusionPipeline:

    pipe.scheduler = SVDConsistencyScheduler.from_config(ANIMATELCM_SVD_CONFIG)
    pipe(image, num_inference_steps=4, min_guidance_scale=1.0, max_guidance_scale=1.0)

The formulas are in :mod:`svd_fast.sampling.consistency`; ``step`` runs its fused step. ``svd_fast.optimize`` keeps
this scheduler and runs the fused denoising loop with consistency sampling (sampler "auto" or "consistency").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from svd_fast.sampling.consistency import (
    ANIMATELCM_SVD_CONFIG,
    check_consistency_config,
    consistency_init_noise_sigma,
    consistency_sigmas,
    consistency_step,
    consistency_timesteps,
)


@dataclass
class SVDConsistencySchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class SVDConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Multistep consistency sampling with EDM scalings for sigma_data and SVD's c_noise = ln(sigma) / 4."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = ANIMATELCM_SVD_CONFIG["num_train_timesteps"],
        sigma_min: float = ANIMATELCM_SVD_CONFIG["sigma_min"],
        sigma_max: float = ANIMATELCM_SVD_CONFIG["sigma_max"],
        sigma_data: float = ANIMATELCM_SVD_CONFIG["sigma_data"],
        s_noise: float = ANIMATELCM_SVD_CONFIG["s_noise"],
        rho: float = ANIMATELCM_SVD_CONFIG["rho"],
        clip_denoised: bool = ANIMATELCM_SVD_CONFIG["clip_denoised"],
    ):
        check_consistency_config(
            {"num_train_timesteps": num_train_timesteps, "sigma_min": sigma_min, "sigma_max": sigma_max,
             "sigma_data": sigma_data, "s_noise": s_noise, "rho": rho, "clip_denoised": clip_denoised},
            where=type(self).__name__,
        )  # fmt: skip
        self.init_noise_sigma = consistency_init_noise_sigma(sigma_max)
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._step_index: int | None = None
        self.set_timesteps(num_train_timesteps)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """ConfigMixin.from_config, strict: a key this scheduler does not take is a ValueError (diffusers would
        drop it with a warning, and a scheduler config meant for another sampler would then run silently)."""
        merged = {**dict(config or {}), **kwargs}
        check_consistency_config(merged, where=f"{cls.__name__}.from_config")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Noise levels and UNet timesteps of ``num_inference_steps`` steps (<= num_train_timesteps)."""
        config = self.config
        sigmas = consistency_sigmas(num_inference_steps, config.num_train_timesteps, config.sigma_min, config.sigma_max, config.rho)
        self.num_inference_steps = num_inference_steps
        self.sigmas = sigmas  # kept on the CPU: read as Python floats each step, no device sync
        self.timesteps = consistency_timesteps(sigmas).to(device)
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """c_in * sample, c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
        sigma = float(self.sigmas[self._index(timestep)])
        return sample / (sigma**2 + self.config.sigma_data**2) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SVDConsistencySchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """denoised = c_skip * sample + c_out * model_output, clamped with clip_denoised, then
        prev_sample = denoised + s_noise * z * sigma_next with z ~ N(0, I) drawn from ``generator`` at every step
        of a multistep run (as AnimateLCM's scheduler draws it, so the noise stream is the same)."""
        if self.sigmas is None:
            raise RuntimeError("step: call set_timesteps() first")
        if model_output.shape != sample.shape:
            raise ValueError(f"step: model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
        index = self._index(timestep)
        if index + 1 >= len(self.sigmas):
            raise RuntimeError(f"step: all {len(self.sigmas) - 1} steps were taken; call set_timesteps() again")
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        noise = None
        if self.num_inference_steps > 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        unit = float(self.config.sigma_data)
        shape = sample.shape
        flat = (1, 1, 1, 1, sample.numel())  # the fused op takes (B, F, C, H, W); any other layout is one slab
        prev_sample, denoised = consistency_step(
            (sample / unit).reshape(flat), model_output.reshape(flat), None, sigma / unit, sigma_next / unit, None,
            None if noise is None else noise.reshape(flat), self.config.s_noise if noise is not None else 0.0,
            1.0 / unit if self.config.clip_denoised else None,
        )  # fmt: skip
        prev_sample, denoised = (prev_sample * unit).reshape(shape), (denoised * unit).reshape(shape)
        self._step_index = index + 1
        if not return_dict:
            return prev_sample, denoised
        return SVDConsistencySchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """original_samples + noise * sigma(timestep), one timestep per batch element."""
        schedule = self.timesteps.to(original_samples.device)
        indices = [int((schedule == t).nonzero()[0]) for t in timesteps.reshape(-1).to(original_samples.device)]
        sigma = self.sigmas[indices].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma.reshape(-1, *([1] * (original_samples.dim() - 1)))

    def _index(self, timestep: float | torch.Tensor) -> int:
        """The step index: counted from the first timestep seen (timesteps are distinct and decreasing)."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps() first")
        if self._step_index is None:
            matches = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device)).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps {self.timesteps.tolist()}")
            self._step_index = int(matches[0])
        return self._step_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps
