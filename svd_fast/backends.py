"""Backend selection for svd_fast ops.

Every op has up to four implementations:

* ``reference``: plain PyTorch, the numerical ground truth; runs anywhere.
* ``cpu``: C++ kernel in the compiled extension ``svd_fast._C`` (CPU tensors).
* ``cuda``: CUDA kernel in the compiled extension (CUDA tensors, extension built with CUDA).
* ``triton``: Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

By default an op picks the first usable backend in :data:`DEFAULT_ORDER` for the device of its
input. A backend can be forced with the environment variable ``SVD_FAST_BACKEND`` or, for a
block of code, with :func:`use_backend`; a forced backend that cannot run raises
:class:`BackendUnavailableError` naming the reason. It never falls back silently.

:func:`last_backend` tells which backend the last call of an op ran on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import torch

BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")

# Preference per device type when nothing is forced. Triton on CPU tensors only runs in the
# (slow) interpreter, so it is never an automatic choice there. On CUDA, Triton comes first for now:
# its kernels' arithmetic is checked against the references on every CI run (under the interpreter),
# while the CUDA kernels have only been compiled, never run (no GPU was lent to development yet).
# Re-rank from bench/gpu_session.sh's measurements once the CUDA tests have passed on a GPU.
DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "SVD_FAST_BACKEND"

# A plain list rather than a ContextVar: torch.compile (dynamo) can trace reads of a list, not
# ContextVar.get, and ops must stay traceable. Innermost use_backend() is the last entry.
_forced_stack: list[str] = []
_last_backend: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a forced backend cannot run, or no backend can run an op."""


def _validate_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or ``SVD_FAST_BACKEND``; None for auto."""
    name = _forced_stack[-1] if _forced_stack else None
    if name is None:
        env_value = os.environ.get(ENV_VAR, "").strip()
        name = _validate_name(env_value, ENV_VAR) if env_value else None
    return None if name in (None, "auto") else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every svd_fast op inside the block to run on backend ``name`` ("auto" restores the default)."""
    _forced_stack.append(_validate_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced_stack.pop()


def last_backend(op_name: str) -> str | None:
    """Name of the backend the most recent call of ``op_name`` ran on (None if it has not run)."""
    return _last_backend.get(op_name)


def backends_used() -> dict[str, str]:
    """A copy of the op -> last backend map, for summaries and logs."""
    return dict(_last_backend)


UnavailableReason = Callable[[str], "str | None"]


def select_backend(
    op_name: str,
    device: torch.device,
    unavailable_reason: UnavailableReason,
    order: Mapping[str, tuple[str, ...]] = DEFAULT_ORDER,
) -> str:
    """Choose the backend for one call of ``op_name`` on ``device``.

    ``unavailable_reason(backend)`` returns None when the backend can run this call, else a short
    reason. ``order`` lets an op whose benchmarks rank its backends differently override the default
    preference per device type. The choice is recorded for :func:`last_backend`.
    """
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(forced)
        if reason is not None:
            raise BackendUnavailableError(f"{op_name}: backend {forced!r} was forced but cannot run: {reason}")
        chosen = forced
    else:
        reasons: dict[str, str] = {}
        chosen = None
        for backend in order.get(device.type, ("reference",)):
            reason = unavailable_reason(backend)
            if reason is None:
                chosen = backend
                break
            reasons[backend] = reason
        if chosen is None:
            listing = "; ".join(f"{name}: {why}" for name, why in reasons.items())
            raise BackendUnavailableError(f"{op_name}: no backend can run this call ({listing})")
    _last_backend[op_name] = chosen
    return chosen


def common_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Availability shared by all ops: is the backend built/installed and usable on this device?"""
    from svd_fast import _extension, _triton  # noqa: PLC0415 - both import backends (for the error type)

    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"input is on {device.type}, the cpu backend takes CPU tensors"
        return _extension.unavailable_reason()
    if backend == "cuda":
        if device.type != "cuda":
            return f"input is on {device.type}, the cuda backend takes CUDA tensors"
        return _extension.cuda_unavailable_reason()
    if backend == "triton":
        return _triton.unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
