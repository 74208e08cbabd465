"""EDMEulerScheduler: a drop-in for diffusers' EulerDiscreteScheduler in StableVideoDiffusionPipeline whose
step() is svd_fast's fused EDM step.

It implements the configuration SVD ships (v-prediction, continuous timesteps, Karras sigmas from
sigma_max to sigma_min, trailing zero) with the same contract: ``set_timesteps(num_inference_steps,
device=None, sigmas=None)``, ``timesteps`` (0.25 ln sigma, on ``device``), ``sigmas`` (float32, kept on the
CPU), ``init_noise_sigma``, ``scale_model_input``, ``step`` (returns EulerDiscreteSchedulerOutput),
``order = 1``, ``step_index``/``begin_index``/``set_begin_index``. Swap it in with

    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)

Stock pipelines apply guidance themselves and then call step(); :meth:`EDMEulerScheduler.step_guided`
takes the UNet's raw (2B, ...) output instead and fuses the guidance into the step as well.
Sampling only: step() is not differentiable.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from svd_fast.ops.edm_step import edm_euler_step
from svd_fast.sampling import schedule
from svd_fast.sampling.samplers import sigma_list


class EDMEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for EDM v-prediction models (SVD) with a fused step. Constructor arguments are those of
    EulerDiscreteScheduler so that SVD's scheduler_config.json loads as is; the beta-schedule ones are
    kept for the round trip but unused (the noise levels come from sigma_min, sigma_max and rho = 7)."""

    _compatibles = ["EulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "v_prediction",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = True,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = schedule.SVD_SIGMA_MIN,
        sigma_max: float | None = schedule.SVD_SIGMA_MAX,
        timestep_spacing: str = schedule.SVD_TIMESTEP_SPACING,
        timestep_type: str = "continuous",
        steps_offset: int = 1,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        required = {
            "prediction_type": (prediction_type, "v_prediction"),
            "timestep_type": (timestep_type, "continuous"),
            "use_karras_sigmas": (bool(use_karras_sigmas), True),
            "use_exponential_sigmas": (bool(use_exponential_sigmas), False),
            "use_beta_sigmas": (bool(use_beta_sigmas), False),
            "final_sigmas_type": (final_sigmas_type, "zero"),
        }
        for name, (value, expected) in required.items():
            if value != expected:
                raise ValueError(
                    f"EDMEulerScheduler implements SVD's EDM configuration only: {name} must be {expected!r}, got {value!r}"
                )
        if sigma_min is None or sigma_max is None:
            raise ValueError(f"EDMEulerScheduler needs sigma_min and sigma_max, got {sigma_min!r} and {sigma_max!r}")
        schedule.check_schedule_arguments(1, sigma_min, sigma_max, schedule.SVD_RHO)
        if timestep_spacing not in schedule.TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {schedule.TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.is_scale_input_called = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # --- schedule ------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Karras schedule of ``num_inference_steps`` steps, or the given ``sigmas`` (start to end, the end
        included, as diffusers takes them)."""
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps or sigmas")
        if sigmas is not None:
            values = sigma_list(sigmas if isinstance(sigmas, torch.Tensor) else list(np.asarray(sigmas, dtype=np.float64)))
            new_sigmas = torch.tensor(values, dtype=torch.float32)
        else:
            new_sigmas = schedule.karras_sigmas(
                num_inference_steps, self.config.sigma_min, self.config.sigma_max, schedule.SVD_RHO
            )
        self.num_inference_steps = new_sigmas.numel() - 1
        self.timesteps = schedule.edm_timesteps(new_sigmas).to(device=device)
        self.sigmas = new_sigmas  # on the CPU: read as Python floats every step, no device sync
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        self._require_schedule("init_noise_sigma")
        return schedule.init_noise_sigma(self.sigmas, self.config.timestep_spacing)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second match when it occurs twice (diffusers' rule)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps {schedule_timesteps.tolist()}")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _require_schedule(self, what: str) -> None:
        if self.sigmas is None:
            raise RuntimeError(f"EDMEulerScheduler.{what}: call set_timesteps() first")

    def _current_sigmas(self, timestep: float | torch.Tensor) -> tuple[float, float]:
        self._require_schedule("step")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "step(): pass one of scheduler.timesteps as timestep, not an integer index (as EulerDiscreteScheduler)"
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError(f"step(): all {self.num_inference_steps} steps were taken; call set_timesteps() again")
        return float(self.sigmas[self._step_index]), float(self.sigmas[self._step_index + 1])

    # --- sampling ------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """sample * c_in(sigma) = sample / sqrt(sigma^2 + 1), in diffusers' exact arithmetic."""
        self._require_schedule("scale_model_input")
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

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
        """One Euler step from the (already guided) v-prediction ``model_output``; fused in one pass.

        Churn (s_churn > 0 inside [s_tmin, s_tmax]) follows EulerDiscreteScheduler's arithmetic exactly
        (unfused), as does a ``sample`` whose dtype differs from the model output's.
        """
        sigma, sigma_next = self._current_sigmas(timestep)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma > 0 or sample.dtype != model_output.dtype:
            prev_sample, denoised = self._step_unfused(model_output, sample, gamma, s_noise, generator)
        else:
            prev_sample, denoised = _fused_step(sample, model_output, None, sigma, sigma_next, None)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def step_guided(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        guidance: torch.Tensor | float,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Guidance and step in one pass: ``model_output`` is the UNet's raw (2B, ...) output for the
        classifier-free-guidance batch (unconditional half first), ``sample`` the (B, ...) latents and
        ``guidance`` the per-frame weights ((F,), (B, F), (B, F, 1, 1, 1) or a float)."""
        sigma, sigma_next = self._current_sigmas(timestep)
        if model_output.shape[0] != 2 * sample.shape[0]:
            raise ValueError(
                f"step_guided: model_output must hold the (2B, ...) CFG batch for sample of batch {sample.shape[0]}, "
                f"got shape {tuple(model_output.shape)}"
            )
        uncond, cond = model_output.chunk(2)
        prev_sample, denoised = _fused_step(sample, uncond, cond, sigma, sigma_next, guidance)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _step_unfused(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        gamma: float,
        s_noise: float,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # EulerDiscreteScheduler.step (v_prediction branch), operation for operation.
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - denoised) / sigma_hat
        prev_sample = sample + derivative * (self.sigmas[self._step_index + 1] - sigma_hat)
        return prev_sample.to(model_output.dtype), denoised

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _fused_step(
    sample: torch.Tensor,
    uncond: torch.Tensor,
    cond: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    guidance: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """edm_euler_step on latents of any shape: the fused op takes (B, F, C, H, W), others are viewed as one slab."""
    if sample.dim() == 5:
        return edm_euler_step(sample, uncond, cond, sigma, sigma_next, guidance, return_denoised=True)
    flat = (1, 1, 1, 1, sample.numel())
    x_next, denoised = edm_euler_step(
        sample.reshape(flat),
        uncond.reshape(flat),
        None if cond is None else cond.reshape(flat),
        sigma,
        sigma_next,
        guidance,
        return_denoised=True,
    )
    return x_next.reshape(sample.shape), denoised.reshape(sample.shape)


