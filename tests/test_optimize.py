"""svd_fast.optimize on the tiny, architecture-true SVD pipeline: same output, same weights, exact restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import svd_fast
from svd_fast import backends
from svd_fast.models.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))


def _latents(pipe, image: Image.Image) -> torch.Tensor:
    return pipe(
        image,
        height=TINY_HEIGHT,
        width=TINY_WIDTH,
        num_frames=TINY_NUM_FRAMES,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


@pytest.fixture(scope="module")
def original(pipe, image) -> torch.Tensor:
    return _latents(pipe, image)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name in ("unet", "vae") for key, value in getattr(pipe, name).state_dict().items()}


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_optimized_output_matches_original(pipe, image, original, backend: str) -> None:
    weights_before = _weights(pipe)
    svd_fast.optimize(pipe, backend=backend)
    try:
        report = svd_fast.describe(pipe)
        assert report["backend"] == backend
        patched = report["patched"]
        assert patched["ResnetBlock2D (GroupNorm+SiLU fused)"] > 0
        assert patched["TemporalResnetBlock (GroupNorm+SiLU fused)"] > 0
        assert patched["conv_norm_out+conv_act (GroupNorm+SiLU fused)"] == 3  # UNet, VAE encoder, VAE decoder
        transformers = sum(type(module).__name__ == "TransformerSpatioTemporalModel" for module in pipe.unet.modules())
        # each spatio-temporal transformer has a spatial and a temporal cross-attention (attn2)
        assert patched["cross-attention -> single-token shortcut to_out(to_v(ctx))"] == 2 * transformers > 0
        assert type(pipe.scheduler).__name__ == "EDMEulerScheduler"
        optimized = _latents(pipe, image)
        # Same fp32 math in another order: relative error at float32 rounding level, far below the
        # 1e-2 differences a wrong norm, activation or step would make.
        relative = ((optimized - original).norm() / original.norm()).item()
        assert relative < 1e-4, relative
        if backend != "auto":
            assert backends.last_backend("group_norm") == backend
        after = _weights(pipe)
        assert after.keys() == weights_before.keys()  # state_dict keys stay the diffusers ones
        assert all(after[key].data_ptr() == weights_before[key].data_ptr() for key in after)  # same tensors
    finally:
        svd_fast.restore(pipe)


def test_restore_gives_back_original_modules_and_output(pipe, image, original) -> None:
    scheduler, norm_out = pipe.scheduler, pipe.unet.conv_norm_out
    svd_fast.optimize(pipe)
    assert pipe.unet.conv_norm_out is not norm_out
    svd_fast.restore(pipe)
    assert pipe.scheduler is scheduler and pipe.unet.conv_norm_out is norm_out
    assert all("forward" not in vars(module) for module in pipe.unet.modules())
    assert not any(type(getattr(module, "processor", None)).__name__ == "SingleTokenCrossAttnProcessor" for module in pipe.unet.modules())
    assert svd_fast.describe(pipe) == {}
    assert torch.equal(_latents(pipe, image), original)


def test_optimize_bare_unet_and_errors(pipe) -> None:
    unet = pipe.unet
    svd_fast.optimize(unet, backend="reference")
    try:
        assert "scheduler -> EDMEulerScheduler (fused guidance + Euler step)" not in svd_fast.describe(unet)["patched"]
        with pytest.raises(ValueError, match="already optimized"):
            svd_fast.optimize(unet)
    finally:
        svd_fast.restore(unet)
    with pytest.raises(ValueError, match="not optimized"):
        svd_fast.restore(unet)
    with pytest.raises(ValueError, match="backend"):
        svd_fast.optimize(unet, backend="nvdec")
    with pytest.raises(ValueError, match="dtype"):
        svd_fast.optimize(unet, dtype="fp8")
    with pytest.raises(TypeError, match="StableVideoDiffusionPipeline or a torch.nn.Module"):
        svd_fast.optimize("unet")


def test_optimized_unet_trains(pipe) -> None:
    """Gradients flow through the fused GroupNorm+SiLU (training uses optimize too) and match stock ones."""
    unet = pipe.unet
    sample = torch.randn(1, 2, 8, TINY_HEIGHT // 2, TINY_WIDTH // 2)
    context = torch.randn(1, 1, unet.config.cross_attention_dim)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])

    def gradient() -> torch.Tensor:
        unet.zero_grad()
        unet(sample, torch.tensor(1.0), context, time_ids).sample.square().mean().backward()
        return unet.conv_in.weight.grad.clone()

    stock = gradient()
    svd_fast.optimize(unet, backend="cpu")
    try:
        fused = gradient()
    finally:
        svd_fast.restore(unet)
        unet.zero_grad()
    torch.testing.assert_close(fused, stock, rtol=1e-3, atol=1e-6)


def test_single_token_shortcut_equals_attention_and_falls_back() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from svd_fast.nn.attention import SingleTokenCrossAttnProcessor

    attention = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    hidden = torch.randn(3, 10, 64)
    one_token, two_tokens = torch.randn(3, 1, 32), torch.randn(3, 2, 32)
    expected_one, expected_two = attention(hidden, one_token), attention(hidden, two_tokens)
    attention.set_processor(SingleTokenCrossAttnProcessor(AttnProcessor2_0()))
    with torch.profiler.profile() as profile:
        shortcut = attention(hidden, one_token)
    torch.testing.assert_close(shortcut, expected_one, rtol=1e-5, atol=1e-6)
    assert not any("scaled_dot_product" in event.name for event in profile.events())  # no attention kernel ran
    torch.testing.assert_close(attention(hidden, two_tokens), expected_two)  # several tokens: the original path
