"""The demo's autoencoder: SVD's temporal-decoder VAE (diffusers AutoencoderKLTemporalDecoder), small, trained
on the demo's frames first so that decoding is faithful before the UNet learns on its latents."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

# 32x32 frames -> 8x8x4 latents (downsampling 4): the UNet's work per step stays small enough for a CPU.
# 64 channels at full resolution, not 32: the decoder's last norm is a GroupNorm of 32 groups over these channels,
# and with one channel per group it removes each channel's mean over the frame, so every decoded frame had the same
# mean colour whatever its latent (held-out backgrounds off by 25-50 of 255, which capped the first frame's PSNR near
# 20 dB). Two channels per group keep their difference: at seed 1, held-out reconstruction 20.8 -> 26.4 dB.
DEMO_VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "block_out_channels": (64, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 32,
}
KL_WEIGHT = 1e-4
INITIAL_LOG_VARIANCE = -8.0
# The disk covers ~5% of a frame: its pixels (told apart by colour saturation) weigh 10x in the reconstruction
# loss, so a few hundred steps learn to draw the disk, not just the background.
DISK_WEIGHT = 10.0  # keeps the posterior close to unit noise, small enough not to blur the disk


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).movedim(-1, -3).float() / 127.5 - 1.0


def train_autoencoder(clips: np.ndarray, steps: int, learning_rate: float, clips_per_step: int, seed: int, progress=None):
    """Train the VAE on ``clips`` (N, F, H, W, 3) uint8: reconstruction of whole clips through the temporal
    decoder (so it sees the frame count it decodes at sampling time; disk pixels weighted) plus a small KL term. Afterwards the
    latent scaling factor is set so that scaled latents have unit variance, as the EDM objective assumes.
    Returns (vae, per-step losses, seconds)."""
    from diffusers import AutoencoderKLTemporalDecoder  # noqa: PLC0415 - diffusers loads only when a model is built

    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(**DEMO_VAE_CONFIG)
    # The posterior starts nearly deterministic (std ~ 0.02, not 1): otherwise its noise drowns the signal and
    # the decoder first learns to output the mean frame.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(INITIAL_LOG_VARIANCE)
        # The decoder's last layer mixes each frame with its neighbours (a 3x1x1 convolution over frames, zero-padded
        # at both ends). Initialised at random it shifts the colour of the first and last frames, which have one
        # neighbour missing (grey -> teal), and a few hundred steps do not train that away. Start as the identity,
        # as SVD's temporal decoder starts from an image decoder: every frame alike until the data says otherwise.
        time_conv = vae.decoder.time_conv_out
        time_conv.weight.zero_()
        time_conv.weight[:, :, 1, 0, 0] = torch.eye(time_conv.out_channels)
        time_conv.bias.zero_()
    data = to_model_range(clips)  # (N, F, 3, H, W)
    num_clips, num_frames = data.shape[:2]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    started = time.perf_counter()
    vae.train()
    for step in range(steps):
        chosen = torch.randint(num_clips, (clips_per_step,), generator=generator)
        frames = data[chosen].flatten(0, 1)
        posterior = vae.encode(frames).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents, num_frames=num_frames).sample
        weight = 1.0 + (DISK_WEIGHT - 1.0) * (frames.amax(dim=1, keepdim=True) - frames.amin(dim=1, keepdim=True) > 1.0).float()
        reconstruction = torch.sum(weight * (decoded - frames) ** 2) / (torch.sum(weight) * frames.shape[1])
        loss = reconstruction + KL_WEIGHT * posterior.kl().mean() / latents[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(reconstruction.item())
        if progress is not None and (step + 1) % max(1, steps // 10) == 0:
            progress(f"autoencoder step {step + 1}/{steps}: reconstruction MSE {np.mean(losses[-10:]):.5f}")
    vae.eval()
    with torch.no_grad():
        sample = data[torch.randperm(num_clips, generator=generator)[: min(num_clips, 32)]].flatten(0, 1)
        scale = 1.0 / float(vae.encode(sample).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=scale)
    return vae, losses, time.perf_counter() - started


@torch.no_grad()
def reconstruction_psnr(vae, clips: np.ndarray) -> float:
    """PSNR (dB, pixels in [0, 1]) of encode -> decode over ``clips`` (N, F, H, W, 3) uint8."""
    data = to_model_range(clips)
    frames = data.flatten(0, 1)
    decoded = vae.decode(vae.encode(frames).latent_dist.mode(), num_frames=data.shape[1]).sample
    mse = torch.mean(((decoded.clamp(-1, 1) - frames) / 2.0) ** 2)
    return float(10.0 * torch.log10(1.0 / mse))


def save_base_pipeline(folder: Path, vae, unet_config: dict[str, object], seed: int) -> Path:
    """A diffusers StableVideoDiffusionPipeline folder: the trained VAE, a freshly initialised UNet of
    ``unet_config``, the tiny CLIP image encoder and SVD's scheduler. Training starts from it."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel  # noqa: PLC0415 - diffusers loads only when a model is built
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415 - transformers loads only when a CLIP model is built

    from svd_fast.diffusers.loading import clip_image_processor  # noqa: PLC0415 - diffusers loads only when a model is built
    from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG, TINY_CLIP_CONFIG  # noqa: PLC0415 - diffusers loads only when a model is built

    torch.manual_seed(seed)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG)),
        unet=UNetSpatioTemporalConditionModel(**unet_config),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=clip_image_processor(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
