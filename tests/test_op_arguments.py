"""Property-based tests of the ops' argument checks (hypothesis): any argument drawn from a wide space either
runs (and matches the reference backend) or is refused with ValueError/TypeError naming the argument; no other
exception, no crash inside a kernel. Runs the auto backend (the C++ kernels on CPU) against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svd_fast import backends
from svd_fast.ops import edm_euler_step, edm_prepare_model_input, group_norm, temporal_attention

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool])
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3), st.none(), st.text(max_size=2), st.booleans()
)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.int32, torch.bool):
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _runs_or_names_argument(call, names: tuple[str, ...]) -> object | None:
    """The result of ``call()``, or None when it was refused with ValueError/TypeError naming one of ``names``."""
    try:
        return call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(name in message for name in names), f"the error does not name the argument: {message}"
        return None


def _same_as_reference(result: object, call) -> None:
    with backends.use_backend("reference"):
        expected = call()
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(results, expecteds):
        tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}.get(got.dtype, 3e-2)
        torch.testing.assert_close(got.double(), want.double(), atol=tolerance, rtol=tolerance, equal_nan=True)


@SETTINGS
@given(
    rank=st.integers(2, 6),
    channels=st.integers(1, 12),
    num_groups=st.one_of(st.integers(-2, 13), st.floats(allow_nan=True), st.booleans()),
    dtype=DTYPES,
    eps=FLOATS,
    activation=st.sampled_from([None, "silu", "relu", ""]),
    with_weight=st.booleans(),
    weight_channels_off=st.integers(0, 1),
)
def test_group_norm_runs_or_names_the_argument(rank, channels, num_groups, dtype, eps, activation, with_weight, weight_channels_off) -> None:
    shape = (2, channels) + (3,) * (rank - 2)
    x = _tensor(shape, dtype)
    weight = _tensor((channels + weight_channels_off,), dtype) if with_weight else None

    def call():
        return group_norm(x, num_groups, weight, None, eps, activation)

    names = ("x", "num_groups", "weight", "eps", "activation")
    result = _runs_or_names_argument(call, names)
    if result is not None:
        assert rank in (4, 5) and isinstance(num_groups, int) and channels % num_groups == 0
        _same_as_reference(result, call)


@SETTINGS
@given(
    num_frames=st.one_of(st.integers(-1, 5), st.floats(allow_nan=True)),
    num_heads=st.one_of(st.integers(-1, 4), st.none()),
    rows=st.integers(1, 8),
    width=st.integers(1, 8),
    dtype=DTYPES,
    scale=FLOATS,
    k_shape_off=st.integers(0, 1),
)
def test_temporal_attention_runs_or_names_the_argument(num_frames, num_heads, rows, width, dtype, scale, k_shape_off) -> None:
    q = _tensor((rows, 3, width), dtype)
    k = _tensor((rows, 3, width + k_shape_off), dtype)
    v = _tensor((rows, 3, width), dtype)

    def call():
        return temporal_attention(q, k, v, num_frames, num_heads, scale)

    result = _runs_or_names_argument(call, ("q", "k", "num_frames", "num_heads", "scale"))
    if result is not None:
        assert rows % num_frames == 0 and width % num_heads == 0 and k_shape_off == 0
        _same_as_reference(result, call)


@SETTINGS
@given(
    sigma=FLOATS,
    sigma_next=FLOATS,
    guidance=st.one_of(FLOATS, st.sampled_from(["frames", "batch-frames", "wrong"])),
    with_cond=st.booleans(),
    dtype=DTYPES,
    return_denoised=st.one_of(st.booleans(), st.integers(0, 1)),
)
def test_edm_euler_step_runs_or_names_the_argument(sigma, sigma_next, guidance, with_cond, dtype, return_denoised) -> None:
    x = _tensor((1, 3, 2, 4, 4), dtype)
    uncond = _tensor(x.shape, dtype)
    cond = _tensor(x.shape, dtype) if with_cond else None
    if guidance == "frames":
        guidance = torch.linspace(1.0, 3.0, 3)
    elif guidance == "batch-frames":
        guidance = torch.full((1, 3), float("nan"))
    elif guidance == "wrong":
        guidance = torch.ones(5)

    def call():
        return edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance, return_denoised)

    result = _runs_or_names_argument(call, ("x", "model_out", "sigma", "sigma_next", "guidance", "return_denoised"))
    if result is not None:
        assert isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0
        _same_as_reference(result, call)


@SETTINGS
@given(
    sigma=FLOATS,
    do_cfg=st.one_of(st.booleans(), st.none(), st.integers(0, 1)),
    cond_shape=st.sampled_from(["per-frame", "one-frame", "4-d", "wrong-batch", "wrong-size"]),
    dtype=DTYPES,
)
def test_edm_prepare_model_input_runs_or_names_the_argument(sigma, do_cfg, cond_shape, dtype) -> None:
    x = _tensor((2, 3, 4, 4, 4), dtype)
    shapes = {
        "per-frame": (2, 3, 4, 4, 4), "one-frame": (2, 1, 4, 4, 4), "4-d": (2, 4, 4, 4),
        "wrong-batch": (3, 3, 4, 4, 4), "wrong-size": (2, 3, 4, 5, 4),
    }  # fmt: skip
    cond = _tensor(shapes[cond_shape], dtype)

    def call():
        return edm_prepare_model_input(x, cond, sigma, do_cfg)

    result = _runs_or_names_argument(call, ("x", "cond_latents", "sigma", "do_cfg"))
    if result is not None:
        assert cond_shape not in ("wrong-batch", "wrong-size") and isinstance(do_cfg, bool)
        _same_as_reference(result, call)


def test_a_refusal_that_names_no_argument_fails_the_property() -> None:
    def refuse():
        raise ValueError("something went wrong")

    with pytest.raises(AssertionError, match="does not name"):
        _runs_or_names_argument(refuse, ("x",))
