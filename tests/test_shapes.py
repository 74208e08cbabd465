"""One process, several input shapes: the CUDA-graph wrapper's LRU cache of captures (eviction tested on the CPU
with a stand-in for the capture), and torch.compile of an optimized UNet at two shapes (same outputs as eager,
one recompilation)."""

from __future__ import annotations

import pytest
import torch

import svd_fast
from svd_fast.diffusers.cuda_graph import CUDAGraphedForward, _Capture
from svd_fast.diffusers.tiny import TINY_UNET_CONFIG


class _StandInGraph:
    """Replays by running the forward on the static inputs into the static output, as a CUDA graph would."""

    def __init__(self, forward, static_args, static_output) -> None:
        self.forward, self.static_args, self.static_output = forward, static_args, static_output
        self.replays = 0

    def replay(self) -> None:
        self.static_output.copy_(self.forward(*self.static_args))
        self.replays += 1


class _CPUGraphedForward(CUDAGraphedForward):
    device_type = "cpu"

    def _capture(self, leaves, spec):
        static = [leaf.clone() for leaf in leaves]
        output = self.forward(*static)
        return _Capture(_StandInGraph(self.forward, static, output), static, output)


def test_captures_are_kept_per_shape_in_an_lru_cache_of_the_given_size() -> None:
    def forward(x):
        return x * 2 + 1

    wrapped = _CPUGraphedForward(forward, max_captures=2)
    shapes = {"a": (2, 3), "b": (4,), "c": (1, 5)}

    def call(name: str, value: float) -> None:
        x = torch.full(shapes[name], value)
        with torch.no_grad():
            result = wrapped(x)
        assert torch.equal(result, forward(x))  # the replay's output for this call's input, a copy

    call("a", 1.0)
    call("b", 2.0)
    call("a", 3.0)  # a hit: "a" becomes the most recently used
    assert wrapped.captured == 2 and [key[1][0][0] for key in wrapped.captures] == [(4,), (2, 3)]
    call("c", 4.0)  # full: "b", the least recently used, is evicted
    assert wrapped.captured == 3 and [key[1][0][0] for key in wrapped.captures] == [(2, 3), (1, 5)]
    call("b", 5.0)  # captured again, evicting "a"
    assert wrapped.captured == 4 and [key[1][0][0] for key in wrapped.captures] == [(1, 5), (4,)]
    assert [capture.graph.replays for capture in wrapped.captures.values()] == [1, 1]
    wrapped.clear()
    assert not wrapped.captures
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_captures must be a positive integer"):
            CUDAGraphedForward(forward, max_captures=bad)
    with pytest.raises(ValueError, match="cuda_graph_cache must be a positive integer"):
        svd_fast.optimize(torch.nn.Sequential(), cuda_graph_cache=0)


INDUCTOR_MISMATCH = (
    "inductor on the CPU gave a compiled optimized tiny UNet off eager by up to 0.15 (relative 14) at the first shape "
    "in the one run that got that far on the shared, overloaded machine (issue #28 report); not yet explained"
)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.xfail(reason=INDUCTOR_MISMATCH, strict=False)])])
def test_compiled_optimized_unet_at_two_shapes_matches_eager_with_one_recompilation(compiler: str) -> None:
    """One graph per shape (dynamic=False: the frame count stays a constant of the fused temporal ops): the second
    shape is one recompilation, the first shape again none."""
    from diffusers import UNetSpatioTemporalConditionModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**TINY_UNET_CONFIG).eval()
    svd_fast.optimize(unet, backend="reference")
    generator = torch.Generator().manual_seed(0)

    def inputs(frames: int, side: int) -> tuple:
        return (
            torch.randn(1, frames, unet.config.in_channels, side, side, generator=generator),
            torch.tensor(0.5),
            torch.randn(1, 1, unet.config.cross_attention_dim, generator=generator),
            torch.tensor([[6.0, 127.0, 0.02]]),
        )

    shapes = [inputs(2, 4), inputs(3, 8)]
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(unet, backend=compiler, dynamic=False, fullgraph=True)
        with torch.no_grad():
            for arguments in (*shapes, shapes[0]):
                eager = unet(*arguments).sample
                # fp32, the same math traced (and with inductor fused and reordered): rounding-level differences only.
                torch.testing.assert_close(compiled(*arguments).sample, eager, rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 2  # shape 1, then one recompilation for shape 2; shape 1 again reused
    finally:
        svd_fast.restore(unet)
        torch._dynamo.reset()
