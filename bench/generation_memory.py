"""Estimated GPU memory of SVD / SVD-XT generation at `svd-fast generate`'s settings, without a GPU.

How: the real architectures (svd_fast.diffusers.full_size) built on fake tensors (torch's FakeTensorMode) in
fp16, generate's default dtype on CUDA; the peak bytes of one classifier-free-guidance UNet step (batch 2) and of
the VAE decode at a given decode chunk size are traced op by op with the training memory plan's LiveBytesTracker
(svd_fast.training.memory_plan: storages alive, views free; fake CPU tensors route attention to the flash kernel,
as on a GPU). Estimate = fp16 weights (UNet + VAE + CLIP image encoder) + the larger of the two peaks + the
latents + CUDA context (memory_plan.CUDA_CONTEXT_GIB). The trace is of diffusers' stock modules (svd_fast's fused
modules allocate no more); allocator fragmentation is not modelled. Usage: python bench/generation_memory.py [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

GIB = 2**30
HEIGHT, WIDTH = 576, 1024


def estimate(model: str, decode_chunk_size: int | None) -> dict[str, float]:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from svd_fast.diffusers.full_size import NUM_FRAMES, SVD_CLIP_CONFIG, SVD_VAE_CONFIG
    from svd_fast.training.memory_plan import CUDA_CONTEXT_GIB, LiveBytesTracker

    frames = NUM_FRAMES[model]
    chunk = decode_chunk_size or frames
    latent_h, latent_w = HEIGHT // 8, WIDTH // 8
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with FakeTensorMode(), torch.no_grad():
            unet = UNetSpatioTemporalConditionModel(num_frames=frames).eval()
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).eval()
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_CLIP_CONFIG)).eval()
            weights = sum(p.numel() * p.element_size() for module in (unet, vae, clip) for p in module.parameters())
            sample = torch.randn(2, frames, 8, latent_h, latent_w)
            embeds = torch.randn(2, 1, 1024)
            time_ids = torch.randn(2, 3)
            unet_tracker = LiveBytesTracker()
            with unet_tracker:
                unet(sample, torch.ones(2), encoder_hidden_states=embeds, added_time_ids=time_ids, return_dict=False)
            latents = torch.randn(chunk, 4, latent_h, latent_w)
            vae_tracker = LiveBytesTracker()
            with vae_tracker:
                vae.decode(latents, num_frames=chunk)
    finally:
        torch.set_default_dtype(default_dtype)
    latent_bytes = 3 * frames * 4 * latent_h * latent_w * 2  # latents, conditioning latents, noise (fp16)
    total = weights + max(unet_tracker.peak, vae_tracker.peak) + latent_bytes
    return {
        "model": model, "frames": frames, "height": HEIGHT, "width": WIDTH, "decode_chunk_size": chunk,
        "weights_gib": round(weights / GIB, 2), "unet_step_peak_gib": round(unet_tracker.peak / GIB, 2),
        "vae_decode_peak_gib": round(vae_tracker.peak / GIB, 2),
        "estimated_peak_gib": round(total / GIB + CUDA_CONTEXT_GIB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [estimate(model, chunk) for model in ("svd", "svd-xt") for chunk in (None, 2)]
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
