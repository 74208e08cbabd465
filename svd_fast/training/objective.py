"""SVD's image-to-video training objective (EDM, v-prediction), as generative-models' SVD training and diffusers' pipeline.

For clean latents x (VAE latents * scaling_factor) and a noise level s with ln s ~ N(P_mean, P_std^2):
  noisy = x + s * n,   D = c_skip * noisy + c_out * F(concat(c_in * noisy, cond_latent), c_noise)
  loss  = (s^2 + 1) / s^2 * mean((D - x)^2)
Conditioning exactly as StableVideoDiffusionPipeline builds it at sampling time: the first frame, noise-augmented
in pixel space (ln s_aug ~ N(-3, 0.5^2)) and VAE-encoded (mode, NOT scaled), repeated over frames and concatenated
along channels; the CLIP embedding of the clean first frame; added_time_ids [fps - 1, motion_bucket_id, s_aug].
Conditioning dropout (for classifier-free guidance) zeroes the same tensors the pipeline zeroes for its
unconditional half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svd_fast.sampling.denoiser import edm_scalings


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training config's ``objective`` section: the noise-level distribution, the conditioning frame's noise
    augmentation and the conditioning dropout."""

    p_mean: float = 0.7
    p_std: float = 1.6
    cond_aug_mean: float = -3.0  # ln of the conditioning frame's pixel-space noise level
    cond_aug_std: float = 0.5
    drop_image_embedding: float = 0.1
    drop_both: float = 0.1
    drop_cond_latent: float = 0.1

    def __post_init__(self) -> None:
        if self.p_std <= 0:
            raise ValueError(f"objective.p_std must be > 0, got {self.p_std}")
        if self.cond_aug_std < 0:
            raise ValueError(f"objective.cond_aug_std must be >= 0, got {self.cond_aug_std}")
        for name in ("drop_image_embedding", "drop_both", "drop_cond_latent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"objective.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.drop_image_embedding + self.drop_both + self.drop_cond_latent > 1.0:
            raise ValueError("objective.drop_image_embedding + drop_both + drop_cond_latent must be <= 1")


@dataclass
class TrainingBatch:
    """Everything one loss evaluation needs; ``encode_batch`` builds it, tests can build it by hand."""

    latents: torch.Tensor  # (B, F, C, h, w) clean targets, already * scaling_factor
    cond_latent: torch.Tensor  # (B, C, h, w) VAE latent of the noise-augmented first frame (not scaled)
    image_embeds: torch.Tensor  # (B, 1, D) CLIP embedding of the clean first frame
    added_time_ids: torch.Tensor  # (B, 3): fps - 1, motion_bucket_id, noise_aug_strength
    sigma: torch.Tensor  # (B,)
    noise: torch.Tensor  # like latents
    drop_image: torch.Tensor  # (B,) bool: zero the image embedding
    drop_latent: torch.Tensor  # (B,) bool: zero the conditioning latent


def clip_pixel_values(frames: torch.Tensor, feature_extractor) -> torch.Tensor:
    """CLIP input for images in [-1, 1], as the pipeline's ``_encode_image``: antialiased resize to 224 in
    [-1, 1], back to [0, 1], then the feature extractor's mean/std normalisation."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (  # noqa: PLC0415 - diffusers loads only when a model is built
        _resize_with_antialiasing,
    )

    size = feature_extractor.crop_size if isinstance(getattr(feature_extractor, "crop_size", None), dict) else None
    target = (size["height"], size["width"]) if size else (224, 224)
    image = (_resize_with_antialiasing(frames.float(), target) + 1.0) / 2.0
    mean = torch.tensor(feature_extractor.image_mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    std = torch.tensor(feature_extractor.image_std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - mean) / std


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).float()


@dataclass
class ClipFeatures:
    """The deterministic part of a batch's encoding (what ``svd-fast encode`` precomputes): the VAE posterior of
    every frame, the CLIP embedding of the clean first frame, and the first frame itself (its noise-augmented
    copy is VAE-encoded in the loop, with fresh noise each time, as SVD trains)."""

    posterior_mean: torch.Tensor  # (B, F, C, h, w)
    posterior_std: torch.Tensor  # (B, F, C, h, w)
    image_embeds: torch.Tensor  # (B, 1, D)
    first_frame: torch.Tensor  # (B, 3, H, W) in [-1, 1]


@torch.no_grad()
def encode_posterior(images: torch.Tensor, vae, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's fp32 mean and std of ``images`` (N, 3, H, W), encoded ``chunk`` images at a time
    (all at once when None), in the VAE's dtype. SVD's encoder sees each image alone (its temporal layers are
    in the decoder), so chunks only bound the memory: the encoder's peak grows with the images it holds."""
    vae_dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for piece in images.split(chunk or images.shape[0]):
        posterior = vae.encode(piece.to(vae_dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_clip_features(pixel_values: torch.Tensor, vae, image_encoder, feature_extractor, chunk: int | None = None) -> ClipFeatures:
    """Encode ``pixel_values`` (B, F, 3, H, W) in [-1, 1] with the frozen VAE (``chunk`` frames at a time) and
    CLIP image encoder."""
    if pixel_values.dim() != 5 or pixel_values.shape[2] != 3:
        raise ValueError(f"pixel_values must be (B, F, 3, H, W), got {tuple(pixel_values.shape)}")
    batch, frames = pixel_values.shape[:2]
    mean, std = encode_posterior(pixel_values.flatten(0, 1), vae, chunk)
    first = pixel_values[:, 0].float()
    clip_dtype = next(image_encoder.parameters()).dtype
    image_embeds = image_encoder(clip_pixel_values(first, feature_extractor).to(clip_dtype)).image_embeds
    return ClipFeatures(
        posterior_mean=mean.unflatten(0, (batch, frames)),
        posterior_std=std.unflatten(0, (batch, frames)),
        image_embeds=image_embeds.unsqueeze(1).float(),
        first_frame=first,
    )


@torch.no_grad()
def encode_batch(
    pixel_values: torch.Tensor,
    fps: torch.Tensor,
    motion_bucket_id: torch.Tensor,
    vae,
    image_encoder,
    feature_extractor,
    config: ObjectiveConfig,
    generator: torch.Generator,
    chunk: int | None = None,
) -> TrainingBatch:
    """Draw noise / noise levels / dropout from ``generator`` (on the CPU, so runs are reproducible on any
    device) and encode ``pixel_values`` (B, F, 3, H, W) in [-1, 1] with the frozen VAE (``chunk`` frames at a
    time) and CLIP encoder."""
    features = encode_clip_features(pixel_values, vae, image_encoder, feature_extractor, chunk)
    return sample_batch(features, fps, motion_bucket_id, vae, config, generator)


@torch.no_grad()
def sample_batch(
    features: ClipFeatures, fps: torch.Tensor, motion_bucket_id: torch.Tensor, vae, config: ObjectiveConfig, generator: torch.Generator
) -> TrainingBatch:
    """A training batch from encoded clips: target latents sampled from the posterior, the conditioning frame
    noise-augmented in pixel space and VAE-encoded, noise levels and dropout; all draws from ``generator`` in a
    fixed order, so precomputed and on-the-fly features give the same batch."""
    device = features.posterior_mean.device
    batch = features.posterior_mean.shape[0]
    mean = features.posterior_mean.flatten(0, 1)
    eps = torch.randn(mean.shape, generator=generator).to(device)
    latents = ((mean + features.posterior_std.flatten(0, 1) * eps) * vae.config.scaling_factor).unflatten(0, (batch, -1))

    first = features.first_frame.float()
    sigma_aug = torch.exp(config.cond_aug_mean + config.cond_aug_std * torch.randn(batch, generator=generator))
    aug_noise = torch.randn(first.shape, generator=generator).to(device)
    noisy_first = first + sigma_aug.to(device).view(-1, 1, 1, 1) * aug_noise
    vae_dtype = next(vae.parameters()).dtype
    cond_latent = vae.encode(noisy_first.to(vae_dtype)).latent_dist.mode().float()
    image_embeds = features.image_embeds

    added_time_ids = torch.stack(
        [fps.float().cpu() - 1.0, motion_bucket_id.float().cpu(), sigma_aug.float()], dim=1
    ).to(device)
    sigma = torch.exp(config.p_mean + config.p_std * torch.randn(batch, generator=generator))
    noise = torch.randn(latents.shape, generator=generator)
    # One uniform per sample selects at most one dropout case, so the three probabilities are exclusive.
    u = _uniform((batch,), generator)
    p_img, p_both, p_lat = config.drop_image_embedding, config.drop_both, config.drop_cond_latent
    drop_image = u < p_img + p_both
    drop_latent = (u >= p_img) & (u < p_img + p_both + p_lat)
    return TrainingBatch(
        latents=latents,
        cond_latent=cond_latent,
        image_embeds=image_embeds,
        added_time_ids=added_time_ids,
        sigma=sigma.to(device),
        noise=noise.to(device),
        drop_image=drop_image.to(device),
        drop_latent=drop_latent.to(device),
    )


def edm_loss(unet, batch: TrainingBatch, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted EDM loss. Returns (mean loss, per-sample loss). ``dtype`` is the UNet's compute dtype;
    the preconditioning and the loss are computed in fp32."""
    x = batch.latents
    frames = x.shape[1]
    sigma = batch.sigma.float()
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    view = (-1, 1, 1, 1, 1)
    noisy = x + sigma.view(view) * batch.noise
    keep_latent = (~batch.drop_latent).float().view(-1, 1, 1, 1)
    cond = (batch.cond_latent * keep_latent).unsqueeze(1).repeat(1, frames, 1, 1, 1)
    keep_image = (~batch.drop_image).float().view(-1, 1, 1)
    model_input = torch.cat([c_in.view(view) * noisy, cond], dim=2)
    # c_noise stays fp32, as diffusers' sampler passes its timesteps (bf16 would round it by up to 2.9e-3; the
    # UNet casts its time embedding to the compute dtype itself); added_time_ids take the compute dtype, as
    # StableVideoDiffusionPipeline._get_add_time_ids gives them the image embeddings' dtype.
    output = unet(
        model_input.to(dtype),
        c_noise.float(),
        encoder_hidden_states=(batch.image_embeds * keep_image).to(dtype),
        added_time_ids=batch.added_time_ids.to(dtype),
        return_dict=False,
    )[0].float()
    denoised = c_skip.view(view) * noisy + c_out.view(view) * output
    weight = (sigma * sigma + 1) / (sigma * sigma)
    per_sample = weight * F.mse_loss(denoised, x, reduction="none").mean(dim=(1, 2, 3, 4))
    return per_sample.mean(), per_sample.detach()
