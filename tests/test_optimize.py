"""svd_fast.optimize on the tiny, architecture-true SVD pipeline: same output, same weights, exact restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image
from utils import requires_cuda

import svd_fast
from svd_fast import backends
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH, tiny_pipeline


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


@pytest.fixture(scope="module")
def original_video(pipe, original) -> torch.Tensor:
    """The stock VAE's decode of ``original``, in chunks smaller than the video (the decoder's temporal layers
    see one chunk at a time)."""
    with torch.no_grad():
        return pipe.decode_latents(original, TINY_NUM_FRAMES, TINY_NUM_FRAMES // 2)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name in ("unet", "vae") for key, value in getattr(pipe, name).state_dict().items()}


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_optimized_output_matches_original(pipe, image, original, original_video, backend: str) -> None:
    weights_before = _weights(pipe)
    svd_fast.optimize(pipe, backend=backend)
    try:
        report = svd_fast.describe(pipe)
        assert report["backend"] == backend
        patched = report["patched"]
        assert patched["ResnetBlock2D (GroupNorm+SiLU fused)"] > 0
        assert patched["TemporalResnetBlock (GroupNorm+SiLU fused)"] > 0
        assert patched["conv_norm_out+conv_act (GroupNorm+SiLU fused)"] == 3  # UNet, VAE encoder, VAE decoder
        assert patched["attention group_norm (svd_fast GroupNorm)"] == 2  # VAE encoder and decoder mid-blocks
        transformers = sum(type(module).__name__ == "TransformerSpatioTemporalModel" for module in pipe.unet.modules())
        # each spatio-temporal transformer has a spatial and a temporal cross-attention (attn2)
        assert patched["cross-attention -> single-token shortcut to_out(to_v(ctx))"] == 2 * transformers > 0
        assert patched["TemporalBasicTransformerBlock -> frame-major fused temporal attention"] == transformers
        assert type(pipe.scheduler) is EulerDiscreteScheduler  # stays diffusers' own: save_pretrained names it
        assert patched["denoising loop -> fused input preparation + guidance + euler step"] == 1
        optimized = _latents(pipe, image)
        # Same fp32 math in another order: relative error at float32 rounding level, far below the
        # 1e-2 differences a wrong norm, activation or step would make.
        relative = ((optimized - original).norm() / original.norm()).item()
        assert relative < 1e-4, relative
        with torch.no_grad():
            video = pipe.decode_latents(original, TINY_NUM_FRAMES, TINY_NUM_FRAMES // 2)
        assert ((video - original_video).norm() / original_video.norm()).item() < 1e-4
        if backend != "auto":
            assert backends.last_backend("group_norm") == backend
            assert backends.last_backend("temporal_attention") == backend
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
    assert not any(type(module).__name__ == "FusedTemporalBasicTransformerBlock" for module in pipe.unet.modules())
    assert svd_fast.describe(pipe) == {}
    assert type(pipe) is StableVideoDiffusionPipeline and "_svd_fast_sampling" not in vars(pipe)
    assert torch.equal(_latents(pipe, image), original)


def test_optimize_bare_unet_and_errors(pipe) -> None:
    unet = pipe.unet
    svd_fast.optimize(unet, backend="reference")
    try:
        assert "scheduler -> FusedEulerDiscreteScheduler" not in svd_fast.describe(unet)["patched"]
        assert svd_fast.optimize(unet, backend="reference") is unet  # the same call again: nothing changes
        with pytest.raises(ValueError, match="already optimized with other arguments"):
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
    """Gradients flow through the fused GroupNorm+SiLU and temporal attention (training uses optimize too) and
    match stock ones."""
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

    from svd_fast.diffusers.attention_processors import SingleTokenCrossAttnProcessor

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


def _fake_flash_attn(monkeypatch) -> list[tuple[int, ...]]:
    """A stand-in flash_attn module on CPU (the real one needs CUDA and is not installable here): the same
    (batch, tokens, heads, head_dim) contract, computed with SDPA; records the shapes it was called with."""
    import sys
    import types

    import svd_fast.diffusers.attention_processors as attention_module

    calls: list[tuple[int, ...]] = []

    def flash_attn_func(q, k, v, softmax_scale=None):
        calls.append(tuple(q.shape))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(attention_module, "FLASH_ATTN_DEVICE_TYPE", "cpu")
    return calls


def test_flash_attn_processor_matches_sdpa_and_falls_back(monkeypatch) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from svd_fast.diffusers.attention_processors import FlashAttnSelfAttnProcessor

    calls = _fake_flash_attn(monkeypatch)
    attention = Attention(query_dim=64, heads=2, dim_head=32).eval().to(torch.bfloat16)
    hidden = torch.randn(3, 10, 64, dtype=torch.bfloat16)
    expected = attention(hidden)
    attention.set_processor(FlashAttnSelfAttnProcessor(AttnProcessor2_0()))
    torch.testing.assert_close(attention(hidden), expected)
    assert calls == [(3, 10, 2, 32)]  # (batch, tokens, heads, head_dim): no transposes before the kernel
    attention.float()
    attention(hidden.float())  # float32: flash-attn does not take it, the SDPA fallback runs
    assert len(calls) == 1


def test_attention_choice(pipe, image, original, monkeypatch) -> None:
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        svd_fast.optimize(pipe, attention="flash-attn")
    with pytest.raises(ValueError, match="attention must be one of"):
        svd_fast.optimize(pipe, attention="xformers")
    assert not getattr(pipe, "_svd_fast_undo", None)  # a rejected call patches nothing

    _fake_flash_attn(monkeypatch)
    svd_fast.optimize(pipe)  # auto: flash-attn is importable now
    try:
        report = svd_fast.describe(pipe)
        assert report["attention"] == "flash-attn"
        spatial_self_attentions = sum(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules())
        assert report["patched"]["self-attention -> flash-attn"] >= spatial_self_attentions > 0
        optimized = _latents(pipe, image)  # float32: every call takes the SDPA fallback, output unchanged
        assert ((optimized - original).norm() / original.norm()).item() < 1e-4
    finally:
        svd_fast.restore(pipe)
    assert not any(type(getattr(m, "processor", None)).__name__ == "FlashAttnSelfAttnProcessor" for m in pipe.unet.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
def test_cuda_graphs_need_cuda(pipe) -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        svd_fast.optimize(pipe, cuda_graphs=True)


@requires_cuda
def test_cuda_graph_replay_matches_eager() -> None:
    unet = tiny_pipeline(seed=0).unet.to("cuda")
    sample = torch.randn(1, 8, 8, TINY_HEIGHT // 8, TINY_WIDTH // 8, device="cuda")
    context = torch.randn(1, 1, unet.config.cross_attention_dim, device="cuda")
    time_ids = torch.tensor([[6.0, 127.0, 0.02]], device="cuda")
    with torch.no_grad():
        expected = [unet(sample * s, torch.tensor(s, device="cuda"), context, time_ids).sample for s in (1.0, 0.5)]
        svd_fast.optimize(unet, cuda_graphs=True)
        try:
            got = [unet(sample * s, torch.tensor(s, device="cuda"), context, time_ids).sample for s in (1.0, 0.5)]
            assert len(unet.forward.captures) == 1  # one capture, replayed for the second call
        finally:
            svd_fast.restore(unet)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cuda_graph_wrapper_runs_eagerly_where_it_cannot_capture() -> None:
    """CPU inputs or gradients enabled: the wrapper calls the module's own forward and captures nothing."""
    from svd_fast.diffusers.cuda_graph import CUDAGraphedForward

    linear = torch.nn.Linear(4, 3)
    wrapped = CUDAGraphedForward(linear.forward)
    x = torch.randn(2, 4, requires_grad=True)
    wrapped(x).sum().backward()  # gradients flow: the eager path ran
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), linear(x))
    assert wrapped.captures == {}


# --- the fused denoising loop -------------------------------------------------------------------------


def _call(pipe, image, **kwargs):
    arguments = {
        "height": TINY_HEIGHT, "width": TINY_WIDTH, "num_frames": TINY_NUM_FRAMES, "num_inference_steps": 2,
        "generator": torch.Generator().manual_seed(0), "output_type": "latent",
    }  # fmt: skip
    return pipe(image, **{**arguments, **kwargs})


def test_fused_loop_runs_every_op_and_keeps_the_pipeline_contract(pipe, image, monkeypatch) -> None:
    """One optimized call with SVD_FAST_BACKEND=cpu runs all four svd_fast ops; callbacks, output_type and
    return_dict behave as the stock pipeline's."""
    steps_seen: list[int] = []

    def callback(pipeline, step, timestep, tensors):
        steps_seen.append(step)
        return {"latents": tensors["latents"]}

    stock_latents = _call(pipe, image, callback_on_step_end=callback).frames
    stock_steps, steps_seen[:] = list(steps_seen), []
    stock_frames = _call(pipe, image, output_type="np", return_dict=False)
    monkeypatch.setenv("SVD_FAST_BACKEND", "cpu")
    svd_fast.optimize(pipe)
    try:
        with torch.profiler.profile() as profile:
            fused_latents = _call(pipe, image, callback_on_step_end=callback).frames
        ran = {event.name for event in profile.events()}
        for op in ("group_norm_forward", "temporal_attention_forward", "edm_prepare_model_input", "edm_euler_step"):
            assert f"svd_fast::{op}" in ran, (op, sorted(name for name in ran if "svd_fast" in name))
        assert steps_seen == stock_steps == [0, 1]
        fused_frames = _call(pipe, image, output_type="np", return_dict=False)
    finally:
        svd_fast.restore(pipe)
    assert ((fused_latents - stock_latents).norm() / stock_latents.norm()).item() < 1e-4
    assert fused_frames.shape == stock_frames.shape
    np.testing.assert_allclose(fused_frames, stock_frames, atol=1e-3)


def test_compiled_unet_after_optimize_matches_eager(pipe) -> None:
    unet = pipe.unet
    sample = torch.randn(2, TINY_NUM_FRAMES, 8, TINY_HEIGHT // 2, TINY_WIDTH // 2)
    context = torch.randn(2, 1, unet.config.cross_attention_dim)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)
    svd_fast.optimize(pipe, backend="cpu")
    try:
        with torch.no_grad():
            eager = pipe.unet(sample, torch.tensor(0.5), context, time_ids).sample
            compiled = torch.compile(pipe.unet, backend="aot_eager", fullgraph=True)
            result = compiled(sample, torch.tensor(0.5), context, time_ids).sample
    finally:
        svd_fast.restore(pipe)
        torch._dynamo.reset()
    torch.testing.assert_close(result, eager, rtol=1e-4, atol=1e-5)


def test_step_caching_and_multistep_samplers_stay_close_to_euler(pipe, image, original) -> None:
    """cache_interval=3 runs the deep UNet levels on one step in three; both options change the result by
    a bounded amount (3 steps of a random tiny model, where Euler itself is far from the ODE solution: loose
    bounds that a broken cache or solver exceeds; the accuracy claims are measured in bench/bench_sampling.py)."""
    deep_calls: list[int] = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda *args: deep_calls.append(1))
    try:
        for options, bound in (({"cache_interval": 3}, 0.1), ({"sampler": "dpmpp-2m"}, 0.3), ({"sampler": "ipndm-2"}, 0.3)):
            svd_fast.optimize(pipe, **options)
            try:
                deep_calls.clear()
                result = _latents(pipe, image)
                if "cache_interval" in options:
                    assert len(deep_calls) == 1  # 3 steps: the full pass on step 0 only
            finally:
                svd_fast.restore(pipe)
            relative = ((result - original).norm() / original.norm()).item()
            assert 0 < relative < bound, (options, relative)
    finally:
        handle.remove()


# --- optimize() is checked, atomic and idempotent ------------------------------------------------------


def test_optimize_rolls_back_on_a_failure_midway(pipe, image, original, monkeypatch) -> None:
    import svd_fast.diffusers.patching as patching

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    scheduler, norm_out = pipe.scheduler, pipe.unet.conv_norm_out
    monkeypatch.setattr(patching, "_patch_temporal_blocks", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        svd_fast.optimize(pipe)
    monkeypatch.undo()
    assert pipe.scheduler is scheduler and pipe.unet.conv_norm_out is norm_out and type(pipe) is StableVideoDiffusionPipeline
    assert all("forward" not in vars(module) for module in pipe.unet.modules())
    assert not any(type(getattr(m, "processor", None)).__name__ == "SingleTokenCrossAttnProcessor" for m in pipe.unet.modules())
    assert svd_fast.describe(pipe) == {}
    svd_fast.optimize(pipe)  # a clean pipeline again: optimize and restore work
    svd_fast.restore(pipe)


def test_optimize_refuses_what_it_cannot_patch(pipe) -> None:
    with pytest.raises(TypeError, match="Linear holds no diffusers"):
        svd_fast.optimize(torch.nn.Linear(4, 4))
    stock_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler()
    try:
        with pytest.raises(ValueError, match="DDIMScheduler"):
            svd_fast.optimize(pipe)
        assert svd_fast.describe(pipe) == {} and isinstance(pipe.scheduler, DDIMScheduler)
    finally:
        pipe.scheduler = stock_scheduler
    with pytest.raises(ValueError, match="sampler must be one of"):
        svd_fast.optimize(pipe, sampler="heun")
    with pytest.raises(ValueError, match="cache_interval"):
        svd_fast.optimize(pipe, cache_interval=0)
    svd_fast.optimize(pipe)
    try:
        assert svd_fast.optimize(pipe) is pipe  # idempotent
        with pytest.raises(ValueError, match="already optimized"):
            svd_fast.optimize(pipe.unet)  # would wrap the cross-attention twice
    finally:
        svd_fast.restore(pipe)


def test_low_memory_chunks_feed_forward_and_restores(pipe) -> None:
    unet = pipe.unet
    sample = torch.randn(2, 2, 8, TINY_HEIGHT // 2, TINY_WIDTH // 2)
    context = torch.randn(2, 1, unet.config.cross_attention_dim)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)
    with torch.no_grad():
        expected = unet(sample, torch.tensor(0.5), context, time_ids).sample
    stock_blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    svd_fast.optimize(unet, low_memory=True)
    try:
        chunked = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
        assert chunked and all(m._chunk_size == 1 for m in chunked)  # noqa: SLF001
        assert svd_fast.describe(unet)["patched"]["UNet feed-forward chunking"] == 1
        with torch.no_grad():
            result = unet(sample, torch.tensor(0.5), context, time_ids).sample
    finally:
        svd_fast.restore(unet)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
    assert all(m._chunk_size is None for m in stock_blocks)  # noqa: SLF001
