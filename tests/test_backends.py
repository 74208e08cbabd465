"""The backend registry: declarations, selection by priority, forcing and the reasons it reports."""

from __future__ import annotations

import pytest
import torch

from svd_fast import _extension, backends
from svd_fast.ops import temporal_attention

OPS = ("group_norm", "temporal_attention", "edm_euler_step", "edm_prepare_model_input")


def test_every_op_declares_every_backend_once() -> None:
    for op in OPS:
        declared = backends.entries(op)
        assert sorted(declared) == sorted(backends.BACKENDS), op
        assert "reference" in {e.backend for e in declared.values() if "cpu" in e.priority}
        cuda_ranks = [e.priority["cuda"] for e in declared.values() if "cuda" in e.priority]
        assert len(cuda_ranks) == len(set(cuda_ranks)), f"{op}: two backends share a CUDA priority"
        assert "cpu" not in declared["triton"].priority, "the interpreter must never be an automatic choice"


def test_registering_twice_or_an_unknown_backend_is_an_error() -> None:
    with pytest.raises(ValueError, match="already declares"):
        backends.register("group_norm", "cpu", torch.relu, devices=("cpu",), dtypes=(torch.float32,), priority={})
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register("group_norm", "metal", torch.relu, devices=("mps",), dtypes=(torch.float32,), priority={})
    with pytest.raises(TypeError, match="must be callable"):
        backends.register("group_norm_again", "cpu", "group_norm_forward", devices=("cpu",), dtypes=(torch.float32,), priority={})


def test_selection_returns_the_entry_whose_callable_runs_and_whose_probe_decides(monkeypatch) -> None:
    calls = []
    monkeypatch.setitem(backends._registry, "probe_test", {})
    backends.register("probe_test", "cpu", lambda x: calls.append("cpu") or x, devices=("cpu",), dtypes=(torch.float32,),
                      priority={"cpu": 0}, probe=lambda device: "not built here")  # fmt: skip
    backends.register("probe_test", "reference", lambda x: calls.append("reference") or x, devices=("cpu",), dtypes=(torch.float32,),
                      priority={"cpu": 1})  # fmt: skip
    x = torch.zeros(2)
    entry = backends.select_backend("probe_test", x)
    assert entry.backend == "reference" and entry.implementation(x) is x and calls == ["reference"]
    assert backends.unavailable_reasons("probe_test", x)["cpu"] == "not built here"
    with backends.use_backend("cpu"), pytest.raises(backends.BackendUnavailableError, match="not built here"):
        backends.select_backend("probe_test", x)


def test_reasons_name_device_dtype_and_limit() -> None:
    q = torch.randn(65, 1, 8)
    reasons = backends.unavailable_reasons("temporal_attention", q, num_frames=65, head_dim=8)
    assert reasons["reference"] is None
    assert "takes cuda tensors" in reasons["cuda"]
    if reasons["triton"] is not None and "triton is not installed" not in reasons["triton"]:
        assert "at most 64 frames per position, got num_frames=65" in reasons["triton"]
    double_reasons = backends.unavailable_reasons("temporal_attention", q.double(), num_frames=5, head_dim=8)
    assert "does not take torch.float64" in double_reasons["triton"]


def test_auto_order_follows_priority_and_forcing_lists_the_reason() -> None:
    q = torch.randn(2 * 3, 4, 16)
    temporal_attention(q, q, q, 3, 2)
    # The C++ kernel ranks first on CPU tensors; the reference only runs where the extension is missing.
    expected = "cpu" if _extension.unavailable_reason() is None else "reference"
    assert backends.last_backend("temporal_attention") == expected
    with backends.use_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="'cuda' was forced but cannot run"):
        temporal_attention(q, q, q, 3, 2)


def test_no_runnable_backend_lists_every_reason(monkeypatch) -> None:
    declared = backends.entries("group_norm")
    monkeypatch.setitem(backends._registry, "group_norm_without_reference", {
        name: entry for name, entry in declared.items() if name in ("cuda", "triton")
    })  # fmt: skip
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(backends.BackendUnavailableError, match="no backend can run this call"):
        backends.select_backend("group_norm_without_reference", x.to("meta"))
