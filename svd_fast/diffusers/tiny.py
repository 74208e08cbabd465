"""A tiny, architecture-true Stable Video Diffusion pipeline with deterministic random weights.

Same classes, block types and on-disk format (diffusers folder: model_index.json, one subfolder per
component, safetensors weights) as stabilityai/stable-video-diffusion-img2vid(-xt); only the widths,
depths and resolution are small. Head dimension stays 64 as in SVD, so the fused kernels run their
real configuration. Tests, the training demo and `svd-fast make-tiny` use it: no download needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from svd_fast.diffusers.loading import clip_image_processor

# SVD's scheduler_config.json (EulerDiscreteScheduler, v-prediction, continuous timesteps, Karras sigmas).
SVD_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}

TINY_UNET_CONFIG: dict[str, object] = {
    "sample_size": 32,  # latents of the 64x64 tiny images (the VAE downsamples by 2)
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    "block_out_channels": (64, 128),
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 96,
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (1, 2),
    "num_frames": 8,
}

TINY_VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 64,
}

# The pipeline resizes the conditioning image to 224x224 for CLIP, so the image size stays 224.
TINY_CLIP_CONFIG: dict[str, object] = {
    "hidden_size": 64,
    "projection_dim": 64,  # = the UNet's cross_attention_dim, as 1024 is for ViT-H/14 in SVD
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 32,
}

TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_NUM_FRAMES = 8


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny StableVideoDiffusionPipeline in memory, weights drawn from ``seed``."""


    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKLTemporalDecoder(**TINY_VAE_CONFIG)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=clip_image_processor(),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers-format folder (safetensors weights) and return its path."""
    path = Path(path)
    tiny_pipeline(seed=seed).save_pretrained(path, safe_serialization=True)
    return path
