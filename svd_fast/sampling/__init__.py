"""SVD sampling: Karras schedule, EDM v-prediction denoiser, per-frame guidance, Euler/Heun samplers and a
drop-in scheduler for diffusers' StableVideoDiffusionPipeline, built on the fused ops in svd_fast.ops.edm_step.

``EDMEulerScheduler`` needs diffusers and is imported on first use.
"""

from svd_fast.sampling.denoiser import EDMDenoiser, EDMScalings, edm_scalings
from svd_fast.sampling.guidance import GUIDANCE_PRESETS, GuidancePreset, frame_guidance, guidance_preset, uses_guidance
from svd_fast.sampling.samplers import sample_euler, sample_guided_euler, sample_heun
from svd_fast.sampling.schedule import KarrasSchedule, edm_timesteps, init_noise_sigma, karras_schedule, karras_sigmas

__all__ = [
    "EDMDenoiser",
    "EDMEulerScheduler",
    "EDMScalings",
    "GUIDANCE_PRESETS",
    "GuidancePreset",
    "KarrasSchedule",
    "edm_scalings",
    "edm_timesteps",
    "frame_guidance",
    "guidance_preset",
    "init_noise_sigma",
    "karras_schedule",
    "karras_sigmas",
    "sample_euler",
    "sample_guided_euler",
    "sample_heun",
    "uses_guidance",
]


def __getattr__(name: str) -> object:
    # diffusers is heavy and optional: load the scheduler module only when asked for.
    if name == "EDMEulerScheduler":
        from svd_fast.sampling.scheduler import EDMEulerScheduler  # noqa: PLC0415

        return EDMEulerScheduler
    raise AttributeError(f"module 'svd_fast.sampling' has no attribute {name!r}")
