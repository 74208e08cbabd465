"""SVD sampling, framework-free: Karras schedule, EDM v-prediction scalings, per-frame guidance and the
sampling loop on the fused ops in svd_fast.ops.edm_step (Euler, iPNDM of order 2 and DPM-Solver++(2M)). The diffusers
integration (drop-in scheduler, the optimized pipeline's denoising loop) is in svd_fast.diffusers.
"""

from svd_fast.sampling.denoiser import EDMScalings, edm_scalings
from svd_fast.sampling.guidance import GUIDANCE_PRESETS, GuidancePreset, frame_guidance, guidance_preset, uses_guidance
from svd_fast.sampling.samplers import SAMPLERS, check_sampler, sample, sigma_list
from svd_fast.sampling.schedule import edm_timesteps, init_noise_sigma, karras_sigmas

__all__ = [
    "EDMScalings",
    "GUIDANCE_PRESETS",
    "GuidancePreset",
    "SAMPLERS",
    "check_sampler",
    "edm_scalings",
    "edm_timesteps",
    "frame_guidance",
    "guidance_preset",
    "init_noise_sigma",
    "karras_sigmas",
    "sample",
    "sigma_list",
    "uses_guidance",
]
