"""Fused temporal attention: every backend vs a float64 truth, layouts, gradients, torch.library checks, bad input,
and the frame-major transformer block vs diffusers' TemporalBasicTransformerBlock.

Tolerance rule: tests/utils.py's assert_within_torch_error, with PyTorch's own computation in the storage dtype
(diffusers' path: permute + SDPA + permute, in that dtype) as the baseline, a reduction length of head_dim
(the scores' dot product) + frames (the sums over keys), and the output's magnitude times the scores' (see
_score_conditioning).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_within_torch_error, requires_cuda, requires_triton_interpreter

from svd_fast import backends
from svd_fast.ops import temporal_attention
from svd_fast.ops.temporal_attention import GPU_MAX_FRAMES, GPU_MAX_HEAD_DIM
from svd_fast.reference import temporal_attention as reference

BACKEND_PARAMS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=requires_triton_interpreter),
    pytest.param("cuda", "cuda", id="cuda", marks=requires_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=requires_cuda),
]
COMPILED_OPS = {"cpu": "temporal_attention_forward", "cuda": "temporal_attention_forward", "triton": "temporal_attention_forward_triton"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _qkv(batch, frames, positions, heads, head_dim, dtype=torch.float32, device="cpu", offset=0.5, layout="fused"):
    """q, k, v in frame-major (B*F, S, H*D) with a non-trivial layout.

    "fused": slices of one (B*F, S, 3*H*D) projection output (row stride 3*H*D), what a fused QKV linear gives;
    "transposed": views of (S, B*F, H*D) storage; "contiguous": three separate tensors.
    """
    channels = heads * head_dim
    if layout == "fused":
        base = torch.randn(batch * frames, positions, 3 * channels, dtype=torch.float64) + offset
        tensors = base.to(device, dtype).split(channels, dim=2)
    elif layout == "transposed":
        tensors = [
            (torch.randn(positions, batch * frames, channels, dtype=torch.float64) + offset).to(device, dtype).transpose(0, 1)
            for _ in range(3)
        ]
    else:
        tensors = [(torch.randn(batch * frames, positions, channels, dtype=torch.float64) + offset).to(device, dtype) for _ in range(3)]
    return tuple(tensors)


def _truth(q, k, v, frames, heads, scale):
    return reference.temporal_attention(q.double(), k.double(), v.double(), frames, heads, scale)


def _torch_own(q, k, v, frames, heads, scale):
    """diffusers' path in the storage dtype: permute to (B*S, H, F, D), SDPA, permute back."""
    pm = [reference.to_position_major(t, frames, heads) for t in (q, k, v)]
    return reference.to_frame_major(F.scaled_dot_product_attention(*pm, scale=scale))


def _score_conditioning(q, k, frames, heads, scale) -> float:
    """max(1, scale * max sum_d |q_d k_d|): the softmax turns an absolute error of a score into the same relative
    error of its weight (exp(s + e) = exp(s) (1 + e + ...)), and a score's absolute error is relative to the
    magnitude of its terms, so the outputs' relative error bound grows by this factor (scores near -128 in
    test_gradients_where_every_score_is_far_below_zero)."""
    q4, k4 = (reference.to_position_major(t.double().abs(), frames, heads) for t in (q, k))
    return max(1.0, scale * (q4 @ k4.transpose(-1, -2)).max().item())


def _run(backend: str, *args) -> torch.Tensor:
    with backends.use_backend(backend):
        out = temporal_attention(*args)
    assert backends.last_backend("temporal_attention") == backend
    return out


def _cases():
    """(frames, head_dim) pairs: SVD's 14 and 25 frames, 1, 2, odd counts, the GPU kernels' maximum of 64
    frames, and head_dim 40/80/128 besides SVD's 64."""
    return [(f, 64) for f in (1, 2, 3, 14, 25, 32)] + [(GPU_MAX_FRAMES, 16), (5, 40), (7, 80), (3, 128)]


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(backend: str, device: str, dtype: torch.dtype) -> None:
    for frames, head_dim in _cases():
        heads, positions = 2, 3
        q, k, v = _qkv(2, frames, positions, heads, head_dim, dtype, device)
        scale = head_dim**-0.5
        out = _run(backend, q, k, v, frames, heads)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        truth = _truth(q, k, v, frames, heads, scale)
        own = _torch_own(q, k, v, frames, heads, scale)
        magnitude = truth.abs().max().item() * _score_conditioning(q, k, frames, heads, scale)
        assert_within_torch_error(out, truth, own, dtype, head_dim + frames, magnitude, f"F={frames} D={head_dim}")


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_PARAMS if p.values[0] != "reference"])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_layouts_and_log_sum_exp(backend: str, device: str, layout: str) -> None:
    """Any input strides; the saved log-sum-exp is right even where exp(score) overflows float32 (offset 4:
    scores around 128), which a softmax without the max subtraction gets wrong."""
    frames, heads, head_dim = 14, 2, 64
    q, k, v = _qkv(1, frames, 3, heads, head_dim, torch.float32, device, offset=4.0, layout=layout)
    scale = head_dim**-0.5
    op = getattr(torch.ops.svd_fast, COMPILED_OPS[backend])
    out, lse = op(q, k, v, frames, heads, scale)
    assert lse.shape == (q.shape[0], q.shape[1], heads) and lse.dtype == torch.float32
    truth_lse = reference.temporal_attention_lse(q.double(), k.double(), frames, heads, scale)
    assert truth_lse.max() > 100  # the case really overflows a naive exp
    torch.testing.assert_close(lse.double(), truth_lse, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out.double(), _truth(q, k, v, frames, heads, scale), rtol=1e-5, atol=1e-5)


def _gradients(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad_out.to(leaves[0].dtype))
    return [leaf.grad for leaf in leaves]


def _backend_gradients(backend, inputs, grad_out, frames, heads):
    def attend(*t):
        with backends.use_backend(backend):
            return temporal_attention(*t, frames, heads)

    return _gradients(attend, inputs, grad_out)


def _assert_gradients_within_rule(base, grad_out, fused, frames, heads, scale):
    """grad_q, grad_k, grad_v against the float64 truth, within the tolerance rule. With one frame the true
    grad_q and grad_k are zero (the softmax over one key is constant): what a kernel returns there is the rest
    of cancelling dP = grad_out . v against delta = grad_out . out (out = v), so the rounding is counted at the
    magnitude of the cancelled sum, sum_d |grad_out_d v_d|, times the |k| or |q| and scale it is multiplied by."""
    truth = _gradients(lambda *t: _truth(*t, frames, heads, scale), [t.double() for t in base], grad_out)
    own = _gradients(lambda *t: _torch_own(*t, frames, heads, scale), base, grad_out)
    dtype = base[0].dtype
    head_dim = base[0].shape[-1] // heads
    q, k, v = (t.double() for t in base)
    cancelled = reference.to_position_major(grad_out.double(), frames, heads) * reference.to_position_major(v, frames, heads)
    cancelled = cancelled.abs().sum(-1).max().item()
    conditioning = _score_conditioning(q, k, frames, heads, scale)
    for name, got, expected, baseline, factor in zip("qkv", fused, truth, own, (k, q, None)):
        assert got.dtype == dtype and got.shape == expected.shape
        if frames == 1 and factor is not None:
            magnitude = cancelled * factor.abs().max().item() * scale
        else:
            magnitude = expected.abs().max().item()
        magnitude *= conditioning
        assert_within_torch_error(got, expected, baseline, dtype, head_dim + frames, magnitude, f"F={frames} grad_{name}")


@pytest.mark.parametrize("backend,device", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_reference(backend: str, device: str, dtype: torch.dtype) -> None:
    frames, heads, head_dim = (14, 2, 64) if dtype == torch.float32 else (25, 1, 64)
    base = _qkv(2, frames, 3, heads, head_dim, dtype, device)
    grad_out = torch.randn(base[0].shape, dtype=torch.float64).to(device, dtype)
    fused = _backend_gradients(backend, base, grad_out, frames, heads)
    _assert_gradients_within_rule(base, grad_out, fused, frames, heads, head_dim**-0.5)


@requires_triton_interpreter
@pytest.mark.parametrize("frames,head_dim", [(1, 64), (3, 40), (25, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_backward_odd_frames_strided_inputs(frames: int, head_dim: int, dtype: torch.dtype) -> None:
    """The Triton backward at frame counts padded to 16 or 32 (1, 3, 25), a head_dim that is not a power of two,
    transposed (non-contiguous) inputs and 3 videos of 2 * 3 positions (blocks of 4 positions: partial blocks)."""
    heads = 2
    base = _qkv(3, frames, 3, heads, head_dim, dtype, layout="transposed")
    grad_out = torch.randn(base[0].shape, dtype=torch.float64).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    assert not grad_out.is_contiguous()
    fused = _backend_gradients("triton", base, grad_out, frames, heads)
    _assert_gradients_within_rule(base, grad_out, fused, frames, heads, head_dim**-0.5)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_PARAMS if p.values[0] != "reference"])
# The interpreter evaluates exp2 of the padded keys before tl.where discards it, as a GPU does, but numpy warns.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_gradients_where_every_score_is_far_below_zero(backend: str, device: str) -> None:
    """q ~ +4 and k ~ -4: scores and the log-sum-exp near -128, where exp(-lse) overflows float32. A kernel
    that pads frames must not let a padded key (score 0) reach exp2(0 - lse) = inf: the gradients stay finite."""
    frames, heads, head_dim = 3, 2, 64
    q, _, v = _qkv(2, frames, 3, heads, head_dim, torch.float32, device, offset=4.0, layout="contiguous")
    k = _qkv(2, frames, 3, heads, head_dim, torch.float32, device, offset=-4.0, layout="contiguous")[1]
    scale = head_dim**-0.5
    assert reference.temporal_attention_lse(q.double(), k.double(), frames, heads, scale).max() < -89
    grad_out = torch.randn(q.shape, dtype=torch.float64).to(device, torch.float32)
    fused = _backend_gradients(backend, (q, k, v), grad_out, frames, heads)
    assert all(g.isfinite().all() for g in fused)
    _assert_gradients_within_rule((q, k, v), grad_out, fused, frames, heads, scale)


def test_cpu_kernel_gradcheck_float64() -> None:
    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 5, 2, 2, 8, torch.float64, layout="contiguous"))
    with backends.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: temporal_attention(*t, 5, 2), (q, k, v))


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_PARAMS if p.values[0] != "reference"])
def test_opcheck(backend: str, device: str) -> None:
    """Schema, fake implementation and autograd registration agree with the kernels (torch.library.opcheck)."""
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(1, 3, 2, 2, 16, torch.float32, layout="contiguous"))
    torch.library.opcheck(getattr(torch.ops.svd_fast, COMPILED_OPS[backend]), (q, k, v, 3, 2, 0.25))


def test_compiles_with_torch_compile() -> None:
    q, k, v = _qkv(1, 4, 3, 2, 16, torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def attend(q, k, v):
        return temporal_attention(q, k, v, 4, 2) * 2

    with backends.use_backend("cpu"):
        torch.testing.assert_close(attend(q, k, v), 2 * _truth(q, k, v, 4, 2, 16**-0.5).float(), rtol=1e-5, atol=1e-5)


def test_more_positions_than_a_cuda_grid_dimension() -> None:
    """B*S*H = 70,000 positions, above the 65,535 grid limit at which PyTorch's flash/efficient SDPA fail on CUDA."""
    frames, heads, head_dim, positions = 2, 2, 4, 35_000
    q, k, v = _qkv(1, frames, positions, heads, head_dim, layout="contiguous")
    assert positions * heads > 65_535
    with backends.use_backend("cpu"):
        out = temporal_attention(q, k, v, frames, heads)
    torch.testing.assert_close(out.double(), _truth(q, k, v, frames, heads, head_dim**-0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_triton_launch_plan_covers_every_position_with_a_1d_grid(backward: bool) -> None:
    """The Triton launch plan (a pure function of the shape) at SVD-XT's top level with CFG (2 videos of 9216
    positions x 5 heads: more programs than a grid's dimension 1 or 2 allows) and at other frame counts."""
    from svd_fast.triton import temporal_attention as triton_kernels

    for frames, heads, head_dim in ((25, 5, 64), (14, 5, 64), (1, 5, 64), (GPU_MAX_FRAMES, 1, GPU_MAX_HEAD_DIM), (3, 2, 40)):
        positions = 9216 * heads
        plan = triton_kernels.launch_plan((2 * frames, 9216, heads * head_dim), frames, heads, backward=backward)
        assert (plan.batch, plan.positions, plan.frames, plan.head_dim) == (2, positions, frames, head_dim)
        assert len(plan.grid) == 1 and plan.grid[0] < 2**31
        blocks_per_video = plan.grid[0] // plan.batch
        assert plan.grid[0] == plan.batch * blocks_per_video
        assert (blocks_per_video - 1) * plan.block_p < positions <= blocks_per_video * plan.block_p
        assert plan.frames_pad % 16 == 0 and frames <= plan.frames_pad < max(2 * frames, 17)
        assert plan.head_dim_pad >= max(head_dim, 16) and plan.head_dim_pad & (plan.head_dim_pad - 1) == 0
        if plan.block_p > 1:
            tile_elements = triton_kernels.GPU_BACKWARD_TILE_ELEMENTS if backward else triton_kernels.GPU_FORWARD_TILE_ELEMENTS
            assert plan.block_p * plan.frames_pad * plan.head_dim_pad <= tile_elements
    svd_xt = triton_kernels.launch_plan((50, 9216, 320), 25, 5, backward=backward)
    assert svd_xt.grid[0] > 65_535 and svd_xt.block_p == 1
    assert svd_xt.kwargs(interpreter=False)["num_warps"] == (triton_kernels.BACKWARD_WARPS if backward else triton_kernels.FORWARD_WARPS)
    interpreted = triton_kernels.launch_plan((4, 3, 16), 2, 2, backward=backward, interpreter=True)
    assert interpreted.block_p == 4 and interpreted.grid == (2 * 2,) and "num_warps" not in interpreted.kwargs(interpreter=True)


def test_bad_input_raises_clear_errors() -> None:
    q, k, v = _qkv(2, 3, 4, 2, 8, layout="contiguous")
    with pytest.raises(ValueError, match="k must have q's shape"):
        temporal_attention(q, k[:, :2], v, 3, 2)
    with pytest.raises(ValueError, match="multiple of num_frames=4"):
        temporal_attention(q, k, v, 4, 2)
    with pytest.raises(ValueError, match="multiple of num_heads=3"):
        temporal_attention(q, k, v, 3, 3)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        temporal_attention(q, k, v, 0, 2)
    with pytest.raises(ValueError, match="3-D"):
        temporal_attention(q[0], k[0], v[0], 3, 2)
    with pytest.raises(TypeError, match="v dtype torch.float16 must match"):
        temporal_attention(q, k, v.half(), 3, 2)
    with pytest.raises(TypeError, match="dtype must be one of"):
        temporal_attention(q.int(), k.int(), v.int(), 3, 2)
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        temporal_attention(q, k, v, 3, 2, scale=-1.0)
    with pytest.raises(RuntimeError, match="not a multiple of num_frames"):  # the C++ op checks on its own too
        torch.ops.svd_fast.temporal_attention_forward(q, k, v, 4, 2, 0.5)


def test_frame_and_dtype_limits_of_gpu_kernels_are_reported() -> None:
    from svd_fast.triton import temporal_attention as triton_kernels

    assert (triton_kernels.MAX_FRAMES, triton_kernels.MAX_HEAD_DIM) == (GPU_MAX_FRAMES, GPU_MAX_HEAD_DIM)
    frames = GPU_MAX_FRAMES + 1
    q, k, v = _qkv(1, frames, 1, 1, 8, layout="contiguous")
    with backends.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match=f"at most {GPU_MAX_FRAMES} frames"):
        temporal_attention(q, k, v, frames, 1)
    with backends.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        temporal_attention(q.double(), k.double(), v.double(), frames, 1)
    out = temporal_attention(q, k, v, frames, 1)  # auto mode: the CPU kernel has no frame limit
    assert backends.last_backend("temporal_attention") == "cpu"
    torch.testing.assert_close(out.double(), _truth(q, k, v, frames, 1, 8**-0.5), rtol=1e-5, atol=1e-6)


# --- the frame-major transformer block ---------------------------------------------------------


def _diffusers_block(dim=64, heads=2, cross_attention_dim=48):
    from diffusers.models.attention import TemporalBasicTransformerBlock

    block = TemporalBasicTransformerBlock(dim, dim, heads, dim // heads, cross_attention_dim=cross_attention_dim).eval()
    with torch.no_grad():  # non-trivial norms: diffusers initialises LayerNorm to identity
        for module in block.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return block


def _block_inputs(block, batch=2, frames=5, positions=6):
    hidden = torch.randn(batch * frames, positions, block.norm_in.normalized_shape[0]) + 1.0
    # SVD's temporal context: one CLIP token per video, repeated for every spatial position (position-major).
    context = torch.randn(batch, 1, block.attn2.to_v.in_features).repeat_interleave(positions, dim=0)
    return hidden, context, frames


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=requires_triton_interpreter)])
def test_fused_block_matches_diffusers_block(backend: str) -> None:
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    block = _diffusers_block()
    fused = FusedTemporalBasicTransformerBlock.from_diffusers(block)
    assert list(fused.state_dict()) == list(block.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), block.parameters()))
    hidden, context, frames = _block_inputs(block)
    with torch.no_grad():
        expected = block(hidden, num_frames=frames, encoder_hidden_states=context)
        with backends.use_backend(backend):
            got = fused(hidden, num_frames=frames, encoder_hidden_states=context)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert backends.last_backend("temporal_attention") == backend


def test_fused_block_gradients_match_diffusers_block() -> None:
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    block = _diffusers_block()
    fused = FusedTemporalBasicTransformerBlock.from_diffusers(block)
    hidden, context, frames = _block_inputs(block)

    def gradients(module):
        module.zero_grad()
        x = hidden.clone().requires_grad_()
        module(x, num_frames=frames, encoder_hidden_states=context).square().mean().backward()
        return {"input": x.grad, **{name: p.grad for name, p in block.named_parameters()}}

    expected = gradients(block)
    with backends.use_backend("cpu"):
        got = gradients(fused)
    unused = {name for name, grad in got.items() if grad is None}
    # The shortcut never computes attn2's query, key or norm2: their true gradient is zero (the softmax over one
    # key is constant), which diffusers' path reproduces up to rounding.
    assert unused == {"norm2.weight", "norm2.bias", "attn2.to_q.weight", "attn2.to_k.weight"}
    for name in unused:
        assert expected[name].abs().max() < 1e-6, name
    for name in got.keys() - unused:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_block_falls_back_exactly_and_chunks() -> None:
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    block = _diffusers_block()
    fused = FusedTemporalBasicTransformerBlock.from_diffusers(block)
    hidden, _context, frames = _block_inputs(block)
    several_tokens = torch.randn(hidden.shape[0] // frames * hidden.shape[1], 3, block.attn2.to_v.in_features)
    with torch.no_grad():
        expected = block(hidden, num_frames=frames, encoder_hidden_states=several_tokens)
        torch.testing.assert_close(fused(hidden, num_frames=frames, encoder_hidden_states=several_tokens), expected, rtol=1e-5, atol=1e-5)
        block.set_chunk_feed_forward(1)
        fused.set_chunk_feed_forward(1)
        torch.testing.assert_close(fused(hidden, num_frames=frames, encoder_hidden_states=several_tokens), expected, rtol=1e-5, atol=1e-5)


def test_fused_block_uses_fused_qkv_projection() -> None:
    """With diffusers' fuse_projections() the block reads q/k/v as strided slices of one projection output."""
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    block = _diffusers_block()
    fused = FusedTemporalBasicTransformerBlock.from_diffusers(block)
    hidden, context, frames = _block_inputs(block)
    with torch.no_grad():
        expected = block(hidden, num_frames=frames, encoder_hidden_states=context)
        block.attn1.fuse_projections()
        block.attn1.to_q.weight.zero_()  # proves the fused path runs: to_q is no longer read
        with backends.use_backend("cpu"):
            got = fused(hidden, num_frames=frames, encoder_hidden_states=context)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_block_rejects_what_it_cannot_reproduce() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    class CustomProcessor(AttnProcessor2_0):
        pass

    block = _diffusers_block()
    block.attn1.set_processor(CustomProcessor())
    with pytest.raises(ValueError, match="custom processor CustomProcessor"):
        FusedTemporalBasicTransformerBlock.from_diffusers(block)
    with pytest.raises(ValueError, match="expected a diffusers TemporalBasicTransformerBlock"):
        FusedTemporalBasicTransformerBlock.from_diffusers(torch.nn.Linear(2, 2))


def test_fused_block_cross_attention_runs_on_one_row_per_video() -> None:
    """The single-token cross-attention projects B context rows (not B*S identical ones) and broadcasts: same
    result as projecting every row, with the context built as diffusers' TransformerSpatioTemporalModel does."""
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    block = _diffusers_block()
    fused = FusedTemporalBasicTransformerBlock.from_diffusers(block)
    batch, frames, positions = 2, 5, 6
    hidden = torch.randn(batch * frames, positions, block.norm_in.normalized_shape[0]) + 1.0
    # diffusers: encoder_hidden_states (B*F, 1, C_ctx) -> first frame's token broadcast over the H*W positions.
    encoder_hidden_states = torch.randn(batch * frames, 1, block.attn2.to_v.in_features)
    first_frame = encoder_hidden_states[None, :].reshape(batch, frames, -1, encoder_hidden_states.shape[-1])[:, 0]
    context = first_frame[:, None].broadcast_to(batch, positions, 1, encoder_hidden_states.shape[-1])
    context = context.reshape(batch * positions, 1, encoder_hidden_states.shape[-1])
    seen_rows = []
    hook = block.attn2.to_v.register_forward_hook(lambda _module, args, _output: seen_rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            got = fused._cross_attention(hidden, frames, context)  # noqa: SLF001 - the shortcut under test
            every_row = block.attn2.to_out[1](block.attn2.to_out[0](block.attn2.to_v(context)))  # (B*S, 1, C)
            expected = (hidden.unflatten(0, (batch, frames)) + every_row.view(batch, 1, positions, -1)).flatten(0, 1)
            diffusers_result = block(hidden, num_frames=frames, encoder_hidden_states=context)
            fused_result = fused(hidden, num_frames=frames, encoder_hidden_states=context)
    finally:
        hook.remove()
    assert seen_rows[0] == batch
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_result, diffusers_result, rtol=1e-5, atol=1e-5)
