"""FusedEulerDiscreteScheduler: diffusers' EulerDiscreteScheduler whose v-prediction step is svd_fast's fused
EDM step.

Everything else (configuration, Karras schedule, timesteps, init_noise_sigma, scale_model_input, step
indices) is diffusers' own. Usable alone in a stock StableVideoDiffusionPipeline:

    pipe.scheduler = FusedEulerDiscreteScheduler.from_config(pipe.scheduler.config)

Stock pipelines apply guidance themselves and then call step(); the optimized pipeline's denoising loop
(:mod:`svd_fast.diffusers.denoising_loop`) fuses the guidance into the step with the fused ops directly.
Not to be confused with diffusers' EDMEulerScheduler (EDM's own parametrisation). Sampling only: the fused
step is not differentiable.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from svd_fast.ops.edm_step import edm_euler_step


class FusedEulerDiscreteScheduler(EulerDiscreteScheduler):
    """EulerDiscreteScheduler with the v-prediction Euler step fused into one pass over memory."""

    _compatibles = ["EulerDiscreteScheduler"]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """EulerDiscreteScheduler.step; fused for the deterministic v-prediction step on matching dtypes.
        Churn, other prediction types and mixed dtypes take diffusers' own arithmetic."""
        if not self._can_fuse(timestep, model_output, sample, s_churn, s_tmin, s_tmax):
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator, return_dict)
        sigma, sigma_next = self._step_sigmas(timestep)
        prev_sample, denoised = _fused_step(sample, model_output, sigma, sigma_next)
        return self._finish_step(prev_sample, denoised, return_dict)

    def _can_fuse(self, timestep, model_output, sample, s_churn, s_tmin, s_tmax) -> bool:
        if self.config.prediction_type != "v_prediction" or sample.dtype != model_output.dtype:
            return False
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or self.sigmas is None:
            return False  # diffusers' step raises its own error
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return not (s_churn > 0 and s_tmin <= sigma <= s_tmax)

    def _step_sigmas(self, timestep: float | torch.Tensor) -> tuple[float, float]:
        if self.sigmas is None or self.timesteps is None:
            raise RuntimeError("step: call set_timesteps() first")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index + 1 >= len(self.sigmas):
            raise RuntimeError(f"step: all {len(self.sigmas) - 1} steps were taken; call set_timesteps() again")
        return float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])

    def _finish_step(self, prev_sample, denoised, return_dict):
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)


def _fused_step(sample: torch.Tensor, model_output: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """edm_euler_step on latents of any shape: the fused op takes (B, F, C, H, W), others are viewed as one slab."""
    if sample.dim() == 5:
        return edm_euler_step(sample, model_output, None, sigma, sigma_next, None, return_denoised=True)
    flat = (1, 1, 1, 1, sample.numel())
    x_next, denoised = edm_euler_step(sample.reshape(flat), model_output.reshape(flat), None, sigma, sigma_next, None, return_denoised=True)
    return x_next.reshape(sample.shape), denoised.reshape(sample.shape)
