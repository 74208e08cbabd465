"""GroupNorm(+SiLU): every backend vs a float64 ground truth, layouts, gradients, torch.library checks, bad input.

Tolerance rule: tests/utils.py's assert_within_torch_error, with torch.nn.functional.group_norm (+ silu) run
in the storage dtype as the baseline and the group's size as the reduction length (the per-channel sums over
batch and positions for dweight and dbias).
Inputs are off-centre (mean ~100, std ~1): a one-pass sum-of-squares variance fails there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_within_torch_error, requires_cuda, requires_triton_interpreter

from svd_fast import backends
from svd_fast.nn import FusedGroupNorm
from svd_fast.ops import group_norm

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tiny (the Triton interpreter is slow) but several tiles per group, so the cross-tile combine runs. Under the
# interpreter's plan, 4d has exact tiles of 2 groups x 2 channels x 16 positions (H*W = 48: EVEN_S), 5d a masked
# tail (H*W = 20).
SHAPES = {"4d": (2, 4, 6, 8), "5d": (2, 6, 3, 4, 5)}
GROUPS = 2
EPS = 1e-5

BACKEND_PARAMS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=requires_triton_interpreter),
    pytest.param("cuda", "cuda", id="cuda", marks=requires_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=requires_cuda),
]
COMPILED_BACKEND_PARAMS = [p for p in BACKEND_PARAMS if p.id != "reference"]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _inputs(shape, dtype, device="cpu", affine=True, channels_last=False, centre=100.0):
    x = (torch.randn(shape, dtype=torch.float64) + centre).to(device, dtype)
    if channels_last:
        x = _channels_last(x)
    if not affine:
        return x, None, None
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).to(device, dtype)
    bias = torch.randn(shape[1], dtype=torch.float64).to(device, dtype)
    return x, weight, bias


def _torch_group_norm(x, weight, bias, silu):
    y = F.group_norm(x, GROUPS, weight, bias, EPS)
    return F.silu(y) if silu else y


def _group_size(x: torch.Tensor) -> int:
    return x.numel() // (x.shape[0] * GROUPS)


def _gradient_reduction_lengths(x: torch.Tensor) -> dict[str, int]:
    """dx sums over its group; dweight and dbias sum over the batch and the positions of their channel."""
    return {"x": _group_size(x), "weight": x.numel() // x.shape[1], "bias": x.numel() // x.shape[1]}


def _double(t):
    return None if t is None else t.double()


def _expected_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


@pytest.mark.parametrize(("backend", "device"), BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_forward_matches_float64(backend, device, dtype, rank, channels_last) -> None:
    for affine, silu in ((True, True), (False, False)):
        x, weight, bias = _inputs(SHAPES[rank], dtype, device, affine, channels_last)
        truth = _torch_group_norm(x.double(), _double(weight), _double(bias), silu)
        with backends.use_backend(backend):
            y = group_norm(x, GROUPS, weight, bias, EPS, activation="silu" if silu else None)
        assert backends.last_backend("group_norm") == backend
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=_expected_format(x)), "output memory format must follow the input"
        torch_y = _torch_group_norm(x, weight, bias, silu)
        assert_within_torch_error(y, truth, torch_y, dtype, _group_size(x), what=f"affine={affine} silu={silu}")


def _temporal_resnet_view(x_frames: torch.Tensor, batch: int) -> torch.Tensor:
    """SVD's temporal resnets: (B*F, C, H, W) activations seen as (B, C, F, H, W) by a permute (no copy)."""
    return x_frames.unflatten(0, (batch, -1)).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize(("backend", "device"), BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permuted_temporal_view_matches_float64(backend, device, dtype) -> None:
    """The (B, C, F, H, W) permuted view, forward and float32 gradients, against the float64 truth."""
    batch, channels, frames, height, width = SHAPES["5d"]
    frames_first, weight, bias = _inputs((batch * frames, channels, height, width), dtype, device)
    x = _temporal_resnet_view(frames_first, batch)
    assert not x.is_contiguous()
    truth = _torch_group_norm(x.double(), _double(weight), _double(bias), True)
    with backends.use_backend(backend):
        y = group_norm(x, GROUPS, weight, bias, EPS, activation="silu")
    # Either layout is fine downstream (a Conv3d follows): contiguous, or the input's own permuted strides.
    assert backends.last_backend("group_norm") == backend and (y.is_contiguous() or y.stride() == x.stride())
    assert_within_torch_error(y, truth, _torch_group_norm(x, weight, bias, True), dtype, _group_size(x), what="forward")
    if dtype != torch.float32 or backend == "reference":
        return
    grad_output = torch.randn(x.shape, dtype=dtype, device=device)
    expected = _gradients("reference", *(_double(t) for t in (x, weight, bias, grad_output)), True)
    torch_grads = _gradients("reference", x, weight, bias, grad_output, True)
    lengths = _gradient_reduction_lengths(x)
    for name, actual, truth_grad, torch_grad in zip(("x", "weight", "bias"), _gradients(backend, x, weight, bias, grad_output, True), expected, torch_grads):
        assert_within_torch_error(actual, truth_grad, torch_grad, torch.float32, lengths[name], what=f"grad_{name}")


# SVD's UNet at 576x1024 (latents 72x128), CFG batch 2: (H, W, channels) per level, concatenated skips included,
# and the VAE decoder's levels at 14 frames per decode chunk.
UNET_LEVELS = ((72, 128, (320, 640, 960)), (36, 64, (640, 1280, 1920)), (18, 32, (1280, 2560)), (9, 16, (1280, 2560)))
VAE_LEVELS = ((72, 128, 512), (144, 256, 512), (288, 512, 512), (576, 1024, 256), (576, 1024, 128))


def _svd_shapes():
    for frames in (14, 25):
        for height, width, channel_list in UNET_LEVELS:
            for channels in channel_list:
                yield (2 * frames, channels, height, width)
                yield (2, channels, frames, height, width)
    for height, width, channels in VAE_LEVELS:
        yield (14, channels, height, width)


def test_triton_plan_has_no_idle_lanes_at_every_svd_shape_and_a_one_dimensional_grid() -> None:
    """At every SVD / SVD-XT GroupNorm shape (UNet 4-D and the temporal resnets' 5-D view, VAE decoder) the
    two-pass tiles divide each axis (no padding lane), cover each group exactly once and move at least a
    16-byte fp16 vector per thread; the one-pass plan is taken where the group fits, on 4-D groups only."""
    pytest.importorskip("triton", reason="the Triton launch plan needs triton")
    from svd_fast.triton import group_norm as triton_group_norm

    one_pass = []
    for shape in _svd_shapes():
        plan = triton_group_norm.launch_plan(shape, 32)
        group_size = plan.channels_per_group * plan.frames * plan.positions
        if plan.one_pass:
            one_pass.append(shape)
            assert plan.grid == (shape[0] * 32,) and plan.block_s >= group_size and plan.num_warps <= 16
            assert plan.block_s // (32 * plan.num_warps) <= triton_group_norm.ONE_PASS_ELEMENTS_PER_THREAD
            continue
        tile = plan.block_g * plan.block_c * plan.block_s
        assert plan.even_s and plan.idle_lane_fraction == 0.0, shape
        assert plan.positions % plan.block_s == 0 and plan.channels_per_group % plan.block_c == 0 and 32 % plan.block_g == 0
        assert plan.tiles * plan.block_c * plan.block_s == group_size, "tiles cover each group once"
        assert plan.grid == (shape[0] * 32 // plan.block_g * plan.tiles,) and plan.grid[0] < 2**31
        assert tile >= 32 * 8 * plan.num_warps, f"{shape}: lanes without a full vector"
    # The deep UNet levels (9x16 at every width, 18x32 at 1280 channels), 4-D only (a 5-D group spans all frames).
    assert {(s[1], s[-2]) for s in one_pass} == {(1280, 9), (2560, 9), (1280, 18)} and all(len(s) == 4 for s in one_pass)
    view = _temporal_resnet_view(torch.empty(2 * 25, 320, 72, 128, device="meta"), 2)
    assert triton_group_norm.layout_strides(view) == (25 * 320 * 72 * 128, 72 * 128, 320 * 72 * 128, 1)
    # A crop of W: rows of a frame no longer follow each other at a fixed stride, H and W cannot merge.
    assert triton_group_norm.layout_strides(torch.empty(2, 4, 6, 10)[..., :7]) is None
    # The VAE's 5-D norms at 200 frames: far over grid dimension 1's 65,535 programs.
    plan = triton_group_norm.launch_plan((1, 128, 200, 576, 1024), 32)
    assert len(plan.grid) == 1 and 65_535 < plan.grid[0] < 2**31


@requires_triton_interpreter
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_triton_one_pass_plan_matches_float64(layout) -> None:
    """The one-pass kernel (group in registers; the interpreter's budget is 64 elements) against the float64
    truth, forward and the gradients through it (the backward runs on two-pass tiles from its statistics)."""
    from svd_fast.triton import group_norm as triton_group_norm

    shape = (3, 4, 2, 4, 4) if layout == "permuted" else (3, 4, 4, 8)
    x, weight, bias = _inputs(shape, torch.float32)
    if layout == "permuted":
        x = _temporal_resnet_view(_inputs((shape[0] * shape[2], *shape[1:2], *shape[3:]), torch.float32)[0], shape[0])
    elif layout == "channels_last":
        x = _channels_last(x)
    assert triton_group_norm.launch_plan(tuple(x.shape), GROUPS, interpreter=True).one_pass
    grad_output = torch.randn(x.shape)
    truth = _gradients("reference", *(_double(t) for t in (x, weight, bias, grad_output)), True)
    torch_grads = _gradients("reference", x, weight, bias, grad_output, True)
    with backends.use_backend("triton"):
        y = group_norm(x, GROUPS, weight, bias, EPS, "silu")
    assert y.is_contiguous() or y.is_contiguous(memory_format=_expected_format(x))
    assert_within_torch_error(y, _torch_group_norm(x.double(), _double(weight), _double(bias), True), _torch_group_norm(x, weight, bias, True),
                              torch.float32, _group_size(x), what="forward")  # fmt: skip
    lengths = _gradient_reduction_lengths(x)
    for name, actual, expected, torch_grad in zip(("x", "weight", "bias"), _gradients("triton", x, weight, bias, grad_output, True), truth, torch_grads):
        assert_within_torch_error(actual, expected, torch_grad, torch.float32, lengths[name], what=f"grad_{name}")


@pytest.mark.parametrize(("backend", "device"), COMPILED_BACKEND_PARAMS)
def test_statistics_are_float32_and_robust_off_centre(backend, device) -> None:
    """mean/rstd of the compiled ops are float32 (N, G), accurate for data centred at 1e4 with std 1."""
    op = torch.ops.svd_fast.group_norm_forward_triton if backend == "triton" else torch.ops.svd_fast.group_norm_forward
    x = _inputs(SHAPES["5d"], torch.float32, device, affine=False, centre=1e4)[0]
    _y, mean, rstd = op(x, GROUPS, None, None, EPS, False)
    grouped = x.double().reshape(x.shape[0], GROUPS, -1)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (x.shape[0], GROUPS)
    torch.testing.assert_close(mean.double(), grouped.mean(-1), rtol=1e-6, atol=0)
    true_rstd = (grouped.var(-1, unbiased=False) + EPS).rsqrt()
    torch.testing.assert_close(rstd.double(), true_rstd, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradcheck_float64(backend, channels_last) -> None:
    x, weight, bias = _inputs((2, 4, 3, 3), torch.float64, channels_last=channels_last, centre=3.0)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    with backends.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: group_norm(*a[:1], GROUPS, *a[1:], EPS, "silu"), (x, weight, bias))
        assert torch.autograd.gradcheck(lambda a: group_norm(a, GROUPS, None, None, EPS, None), (x,))


def _gradients(backend, x, weight, bias, grad_output, silu):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    with backends.use_backend(backend):
        y = group_norm(leaves[0], GROUPS, *(leaves[1:] or (None, None)), EPS, "silu" if silu else None)
    y.backward(grad_output)
    return [t.grad for t in leaves]


@pytest.mark.parametrize(("backend", "device"), COMPILED_BACKEND_PARAMS)
@pytest.mark.parametrize("rank", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gradients_float32_match_float64(backend, device, rank, channels_last) -> None:
    """dx, dweight, dbias in float32 against float64, within the rule (baseline: torch's float32 autograd)."""
    for affine, silu in ((True, True), (True, False), (False, True)):
        x, weight, bias = _inputs(SHAPES[rank], torch.float32, device, affine, channels_last)
        grad_output = _channels_last(torch.randn_like(x)) if channels_last else torch.randn_like(x)
        truth = _gradients("reference", *(_double(t) for t in (x, weight, bias, grad_output)), silu)
        torch_grads = _gradients("reference", x, weight, bias, grad_output, silu)
        grads = _gradients(backend, x, weight, bias, grad_output, silu)
        for name, actual, expected, torch_grad in zip(("x", "weight", "bias"), grads, truth, torch_grads):
            assert actual.dtype == torch.float32 and actual.shape == expected.shape
            if name == "x":
                assert actual.is_contiguous(memory_format=_expected_format(x))
            length = _gradient_reduction_lengths(x)[name]
            assert_within_torch_error(actual, expected, torch_grad, torch.float32, length, what=f"grad_{name} affine={affine} silu={silu}")


@pytest.mark.parametrize(("backend", "device"), COMPILED_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_output_dtypes_and_layout(backend, device, dtype) -> None:
    """dx keeps x's dtype and layout; dweight/dbias are (C,) in the parameters' dtype (x's without them)."""
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.svd_fast, f"group_norm_forward{suffix}")
    backward = getattr(torch.ops.svd_fast, f"group_norm_backward{suffix}")
    x, weight, bias = _inputs(SHAPES["5d"], dtype, device, channels_last=True, centre=1.0)
    for params in ((weight, bias), (None, None)):
        _y, mean, rstd = forward(x, GROUPS, *params, EPS, True)
        grad_x, grad_weight, grad_bias = backward(torch.randn_like(x), x, mean, rstd, *params, GROUPS, True)
        assert grad_x.dtype == dtype and grad_x.is_contiguous(memory_format=torch.channels_last_3d)
        assert grad_weight.shape == grad_bias.shape == (x.shape[1],)
        assert grad_weight.dtype == grad_bias.dtype == dtype
        assert torch.isfinite(grad_x).all() and torch.isfinite(grad_weight).all()


@pytest.mark.parametrize(("backend", "device"), COMPILED_BACKEND_PARAMS)
def test_opcheck(backend, device) -> None:
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.svd_fast, f"group_norm_forward{suffix}")
    backward = getattr(torch.ops.svd_fast, f"group_norm_backward{suffix}")
    x, weight, bias = _inputs((2, 4, 2, 3), torch.float32, device, centre=1.0)
    torch.library.opcheck(forward, (x.requires_grad_(), GROUPS, weight.requires_grad_(), bias, EPS, True))
    torch.library.opcheck(forward, (_channels_last(x.detach()), GROUPS, None, None, EPS, False))
    _y, mean, rstd = forward(x.detach(), GROUPS, weight.detach(), bias, EPS, True)
    torch.library.opcheck(
        backward, (torch.randn_like(x), x.detach(), mean, rstd, weight.detach(), bias, GROUPS, True)
    )


@pytest.mark.parametrize(("backend", "device"), COMPILED_BACKEND_PARAMS)
def test_torch_compile_fullgraph(backend, device) -> None:
    x, weight, bias = _inputs((2, 4, 2, 3), torch.float32, device, centre=1.0)

    def fn(a, w, b):
        return group_norm(a, GROUPS, w, b, EPS, "silu") * 2.0

    torch._dynamo.reset()
    # aot_eager traces forward and backward through the fake implementations without inductor's
    # C++ compile (minutes on this CPU); graph breaks fail the test (fullgraph=True).
    with backends.use_backend(backend):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        compiled(*leaves).sum().backward()
        eager_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        fn(*eager_leaves).sum().backward()
        torch.testing.assert_close(compiled(x, weight, bias), fn(x, weight, bias))
        assert backends.last_backend("group_norm") == backend
    for compiled_leaf, eager_leaf in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


def test_forced_unavailable_backend_names_reason(monkeypatch) -> None:
    x = _inputs((1, 4, 2, 2), torch.float32)[0]
    with backends.use_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="cuda.*cannot run"):
        group_norm(x, GROUPS)
    with backends.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        group_norm(x.double(), GROUPS)
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    group_norm(x, GROUPS)
    assert backends.last_backend("group_norm") == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    group_norm(x, GROUPS)
    # Auto on CPU tensors: ATen's vectorised path, measured faster than the scalar C++ kernel.
    assert backends.last_backend("group_norm") == "reference"
    with backends.use_backend("cpu"):  # the context manager wins over the environment
        group_norm(x, GROUPS)
    assert backends.last_backend("group_norm") == "cpu"


def _bad_calls():
    x, weight, bias = _inputs((2, 4, 2, 2), torch.float32)
    return [
        ("num_groups", lambda: group_norm(x, 3, weight, bias)),
        ("num_groups", lambda: group_norm(x, 0)),
        ("weight", lambda: group_norm(x, GROUPS, weight[:3], bias)),
        ("bias", lambda: group_norm(x, GROUPS, weight, bias.half())),
        ("x", lambda: group_norm(x[:0], GROUPS)),
        ("x", lambda: group_norm(x[0], GROUPS)),
        ("x", lambda: group_norm(x.int(), GROUPS)),
        ("activation", lambda: group_norm(x, GROUPS, activation="gelu")),
        ("eps", lambda: group_norm(x, GROUPS, eps=-1.0)),
    ]


@pytest.mark.parametrize(("argument", "call"), _bad_calls(), ids=[f"{i}-{a}" for i, (a, _) in enumerate(_bad_calls())])
def test_bad_input_names_argument(argument, call) -> None:
    with pytest.raises((ValueError, TypeError), match=argument):
        call()


def test_module_matches_torch_and_round_trips_state_dict() -> None:
    torch_module = torch.nn.GroupNorm(GROUPS, 4)
    with torch.no_grad():
        torch_module.weight.uniform_(0.5, 1.5)
        torch_module.bias.normal_()
    module = FusedGroupNorm.from_torch(torch_module, activation="silu")
    assert module.weight is torch_module.weight and module.bias is torch_module.bias
    x = _inputs((2, 4, 3, 3), torch.float32, affine=False, centre=5.0)[0]
    torch.testing.assert_close(module(x), F.silu(torch_module(x)))
    fresh = FusedGroupNorm(GROUPS, 4, activation="silu")
    fresh.load_state_dict(torch_module.state_dict())
    torch.testing.assert_close(fresh(x), module(x))
    assert set(fresh.state_dict()) == set(torch_module.state_dict())
    plain = FusedGroupNorm(GROUPS, 4, affine=False, dtype=torch.float64)
    assert plain.weight is None and not list(plain.parameters())
    torch.testing.assert_close(plain(x.double()), F.group_norm(x.double(), GROUPS, eps=1e-5))
    with pytest.raises(ValueError, match="num_groups"):
        FusedGroupNorm(3, 4)
    with pytest.raises(ValueError, match="activation"):
        FusedGroupNorm(GROUPS, 4, activation="relu")


def test_cpu_kernel_reads_permuted_temporal_view_in_place() -> None:
    """SVD's temporal resnets normalise a (B, C, F, H, W) permuted view of a (B, F, C, H, W) tensor: the C++ kernel
    reads it through its strides (layout logic shared with the CUDA kernel in csrc/group_norm_common.h), matches
    the float64 truth, gives the backward of a contiguous copy, and returns outputs with the input's strides."""
    batch, frames, channels, height, width = 2, 3, 8, 4, 5
    base = torch.randn(batch, frames, channels, height, width, dtype=torch.float64) + 100.0
    grad_base = torch.randn(batch, frames, channels, height, width, dtype=torch.float64)
    weight = torch.rand(channels, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, dtype=torch.float64)
    forward, backward = torch.ops.svd_fast.group_norm_forward, torch.ops.svd_fast.group_norm_backward
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x, grad_output = (t.to(dtype).permute(0, 2, 1, 3, 4) for t in (base, grad_base))
        w, b = weight.to(dtype), bias.to(dtype)
        assert not x.is_contiguous()
        y, mean, rstd = forward(x, GROUPS, w, b, EPS, True)
        assert y.stride() == x.stride()
        truth = _torch_group_norm(x.double(), weight, bias, silu=True)
        torch.testing.assert_close(y.double(), truth, rtol=tolerance, atol=tolerance)
        grads = backward(grad_output, x, mean, rstd, w, b, GROUPS, True)
        assert grads[0].stride() == x.stride()
        # The same op on a contiguous copy, with the same float32 statistics: the strided read changes nothing.
        expected = backward(grad_output.contiguous(), x.contiguous(), mean, rstd, w, b, GROUPS, True)
        for actual, reference_grad in zip(grads, expected):
            torch.testing.assert_close(actual, reference_grad, rtol=tolerance, atol=tolerance)
        # grad_output in another layout than x is read correctly too.
        mixed = backward(grad_output.contiguous(), x, mean, rstd, w, b, GROUPS, True)
        for actual, reference_grad in zip(mixed, expected):
            torch.testing.assert_close(actual, reference_grad, rtol=tolerance, atol=tolerance)
