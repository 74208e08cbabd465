"""CUDA-graph capture of a module's forward (the UNet's denoising step), replayed for same-shaped inputs.

A denoising loop calls the UNet 25 times with identical shapes; at SVD's sizes the UNet launches thousands
of small kernels per call, and replaying one captured graph removes their launch overhead. The first call
with a new input signature (shapes, dtypes, devices, non-tensor arguments) warms up on a side stream and
captures a graph into static input/output buffers; later calls copy their inputs into those buffers,
replay, and return copies of the outputs (the buffers are overwritten by the next replay). Calls with
gradients enabled, or with inputs not on CUDA, run the module eagerly: graphs are an inference tool here.

Each capture holds its static buffers and the graph's private memory pool (about one UNet forward's
activations), so captures are kept in an LRU cache of ``max_captures`` signatures: one process generating at
several resolutions or frame counts in turn re-captures a shape evicted since, instead of growing without bound.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

LOGGER = logging.getLogger(__name__)
WARMUP_CALLS = 2
# Shapes kept captured: generation at a few resolutions / frame counts (with and without CFG) in one process.
DEFAULT_MAX_CAPTURES = 4
# More captures than this means an argument changes on every call (e.g. a Python-float timestep), so each
# call captures a new graph: slower than eager, and worth a warning.
SIGNATURE_WARNING_THRESHOLD = 8


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]
    static_output: Any


def _signature(leaves: list[Any]) -> tuple:
    return tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else ("value", repr(leaf))
        for leaf in leaves
    )


class CUDAGraphedForward:
    """Callable standing in for ``forward``: captures it once per input signature (at most ``max_captures``
    kept, least recently used evicted) and replays the graph."""

    device_type = "cuda"

    def __init__(self, forward: Callable[..., Any], max_captures: int = DEFAULT_MAX_CAPTURES) -> None:
        if isinstance(max_captures, bool) or not isinstance(max_captures, int) or max_captures < 1:
            raise ValueError(f"max_captures must be a positive integer, got {max_captures!r}")
        self.forward = forward
        self.max_captures = max_captures
        self.captures: OrderedDict[tuple, _Capture] = OrderedDict()
        self.captured = 0  # captures made, evicted ones included

    def clear(self) -> None:
        """Drop every capture (the next call of each shape captures again), e.g. after the forward changed."""
        self.captures.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or any(t.device.type != self.device_type for t in tensors):
            return self.forward(*args, **kwargs)
        key = (spec, _signature(leaves))
        capture = self.captures.get(key)
        if capture is None:
            if len(self.captures) >= self.max_captures:
                self.captures.popitem(last=False)  # its graph and memory pool are freed with it
            capture = self._capture(leaves, spec)
            self.captures[key] = capture
            self.captured += 1
            LOGGER.info("svd_fast: captured a CUDA graph (%d kept, %d captured in all)", len(self.captures), self.captured)
            if self.captured == SIGNATURE_WARNING_THRESHOLD:
                LOGGER.warning(
                    "svd_fast: %d CUDA graphs captured for one forward: some argument changes on every call "
                    "(pass timesteps as tensors) or more shapes alternate than max_captures=%d keeps, so capture "
                    "costs more than it saves",
                    self.captured, self.max_captures,
                )  # fmt: skip
        else:
            self.captures.move_to_end(key)
        for static, tensor in zip(capture.static_inputs, tensors):
            static.copy_(tensor)
        capture.graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, capture.static_output)

    def _capture(self, leaves: list[Any], spec: pytree.TreeSpec) -> _Capture:
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static_leaves, spec)
        # Warm-up on a side stream, as torch.cuda.graph requires: lazy initialisation, autotuning and the
        # allocator's first growth must not happen during capture.
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_CALLS):
                self.forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.forward(*static_args, **static_kwargs)
        static_inputs = [leaf for leaf in static_leaves if isinstance(leaf, torch.Tensor)]
        return _Capture(graph, static_inputs, static_output)
