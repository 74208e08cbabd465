"""SVD sampling: Karras schedule, EDM v-prediction denoiser, per-frame guidance and Euler/Heun samplers,
built on the fused ops in svd_fast.ops.edm_step. The drop-in scheduler for diffusers' pipeline is
svd_fast.diffusers.scheduler.
"""

from svd_fast.sampling.denoiser import EDMDenoiser, EDMScalings, edm_scalings
from svd_fast.sampling.guidance import GUIDANCE_PRESETS, GuidancePreset, frame_guidance, guidance_preset, uses_guidance
from svd_fast.sampling.samplers import sample_euler, sample_guided_euler, sample_heun
from svd_fast.sampling.schedule import KarrasSchedule, edm_timesteps, init_noise_sigma, karras_schedule, karras_sigmas

__all__ = [
    "EDMDenoiser",
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

