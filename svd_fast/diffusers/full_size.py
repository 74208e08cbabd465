"""The real SVD / SVD-XT architecture with random weights, for benchmarks (speed does not depend on weight values).

Configurations are those of stabilityai/stable-video-diffusion-img2vid(-xt): diffusers'
UNetSpatioTemporalConditionModel defaults (num_frames 14 or 25), the AutoencoderKLTemporalDecoder of the
official vae/config.json, and the ViT-H/14 CLIPVisionModelWithProjection of image_encoder/config.json.
Weights are drawn directly on ``device`` (``device="meta"`` builds the structure without memory, e.g. to
count parameters).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from svd_fast.diffusers.loading import clip_image_processor
from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG

NUM_FRAMES = {"svd": 14, "svd-xt": 25}
SVD_VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
SVD_CLIP_CONFIG: dict[str, object] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def random_full_size_pipeline(
    model: str = "svd-xt", dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda", seed: int = 0
):
    """A StableVideoDiffusionPipeline with SVD's ("svd") or SVD-XT's ("svd-xt") architecture and random weights."""


    if model not in NUM_FRAMES:
        raise ValueError(f"random_full_size_pipeline: model must be one of {sorted(NUM_FRAMES)}, got {model!r}")
    torch.manual_seed(seed)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) on a model not from from_pretrained warns; nothing is wrong
    try:
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel(num_frames=NUM_FRAMES[model]).to(dtype)
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).to(dtype)
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_CLIP_CONFIG)).to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return StableVideoDiffusionPipeline(
        vae=vae.eval(),
        image_encoder=image_encoder.eval(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=clip_image_processor(),
    )
