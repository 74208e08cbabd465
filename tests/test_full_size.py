"""The full-size random-weight SVD / SVD-XT pipelines the GPU benchmarks use have the published architecture."""

from __future__ import annotations

import pytest

from svd_fast.diffusers.full_size import random_full_size_pipeline

# Published sizes: SVD's UNet 1.52B parameters, the ViT-H/14 CLIP vision tower 632M, the temporal-decoder VAE 97.7M.
PUBLISHED_PARAMETERS = {"unet": 1.5246e9, "image_encoder": 632.1e6, "vae": 97.7e6}


@pytest.mark.parametrize("model,frames", [("svd", 14), ("svd-xt", 25)])
def test_full_size_pipeline_matches_published_architecture(model: str, frames: int) -> None:
    pipe = random_full_size_pipeline(model, device="meta")  # structure only: no memory, no compute
    assert pipe.unet.config.num_frames == frames
    for name, published in PUBLISHED_PARAMETERS.items():
        count = sum(parameter.numel() for parameter in getattr(pipe, name).parameters())
        assert count == pytest.approx(published, rel=2e-3), name


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        random_full_size_pipeline("svd-2", device="meta")
