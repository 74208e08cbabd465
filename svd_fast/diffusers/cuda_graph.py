"""CUDA-graph capture of a module's forward (the UNet's denoising step), replayed for same-shaped inputs.

A denoising loop calls the UNet 25 times with identical shapes; at SVD's sizes the UNet launches thousands
of small kernels per call, and replaying one captured graph removes their launch overhead. The first call
with a new input signature (shapes, dtypes, devices, non-tensor arguments) warms up on a side stream and
captures a graph into static input/output buffers; later calls copy their inputs into those buffers,
replay, and return copies of the outputs (the buffers are overwritten by the next replay). Calls with
gradients enabled, or with inputs not on CUDA, run the module eagerly: graphs are an inference tool here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

LOGGER = logging.getLogger(__name__)
WARMUP_CALLS = 2
# More signatures than this means an argument changes on every call (e.g. a Python-float timestep), so each
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
    """Callable standing in for ``forward``: captures it once per input signature and replays the graph."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.captures: dict[tuple, _Capture] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or any(t.device.type != "cuda" for t in tensors):
            return self.forward(*args, **kwargs)
        key = (spec, _signature(leaves))
        capture = self.captures.get(key)
        if capture is None:
            capture = self._capture(leaves, spec)
            self.captures[key] = capture
            LOGGER.info("svd_fast: captured a CUDA graph (%d captured input signatures)", len(self.captures))
            if len(self.captures) == SIGNATURE_WARNING_THRESHOLD:
                LOGGER.warning(
                    "svd_fast: %d CUDA graphs captured for one forward: some argument changes on every call "
                    "(pass timesteps as tensors), so capture costs more than it saves",
                    len(self.captures),
                )
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
