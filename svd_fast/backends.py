"""The backend registry: which implementation of an op runs a call, and why the others cannot.

Every op has up to four implementations:

* ``reference``: plain PyTorch, the numerical ground truth; runs anywhere.
* ``cpu``: C++ kernel in the compiled extension ``svd_fast._C`` (CPU tensors).
* ``cuda``: CUDA kernel in the compiled extension (CUDA tensors, extension built with CUDA).
* ``triton``: Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

Each op declares, once per backend, what that backend accepts (:func:`register`): device types,
dtypes, limits on facts of the call (e.g. at most 64 frames) and its priority per device type. An
op call asks :func:`select_backend` with its input and those facts; the first backend by priority
that accepts the call and is built/installed runs it. A backend can be forced with the environment
variable ``SVD_FAST_BACKEND`` or, for a block of code, with :func:`use_backend`; a forced backend
that cannot run raises :class:`BackendUnavailableError` naming the reason. It never falls back
silently. :func:`last_backend` tells which backend the last call of an op ran on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping

import torch

BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")

ENV_VAR = "SVD_FAST_BACKEND"

# A plain list rather than a ContextVar: torch.compile (dynamo) can trace reads of a list, not
# ContextVar.get, and ops must stay traceable. Innermost use_backend() is the last entry.
_forced_stack: list[str] = []
_last_backend: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a forced backend cannot run, or no backend can run an op."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """An upper bound on one fact of a call, e.g. ``Limit("num_frames", 64, "frames per position")``."""

    fact: str
    maximum: int
    description: str


@dataclasses.dataclass(frozen=True)
class Entry:
    """What one backend of one op accepts, and its rank per device type (lower runs first).

    A device type missing from ``priority`` is never chosen automatically there, only when forced
    (e.g. Triton on CPU tensors, which runs in the slow interpreter).
    """

    op: str
    backend: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: Mapping[str, int]
    limits: tuple[Limit, ...] = ()

    def rejection(self, device: torch.device, dtype: torch.dtype, facts: Mapping[str, int]) -> str | None:
        """Why this backend cannot run the call (None when it can)."""
        if device.type not in self.devices:
            return f"input is on {device.type}, the {self.backend} backend takes {'/'.join(self.devices)} tensors"
        if dtype not in self.dtypes:
            return f"the {self.backend} kernel does not take {dtype} input (takes {', '.join(map(str, self.dtypes))})"
        for limit in self.limits:
            value = facts[limit.fact]
            if value > limit.maximum:
                return f"the {self.backend} kernel holds at most {limit.maximum} {limit.description}, got {limit.fact}={value}"
        return _build_reason(self.backend, device)


_registry: dict[str, dict[str, Entry]] = {}


def register(
    op: str,
    backend: str,
    *,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    priority: Mapping[str, int],
    limits: tuple[Limit, ...] = (),
) -> Entry:
    """Declare ``backend`` of ``op``: the devices, dtypes and limits it accepts and its priority per device type."""
    if backend not in BACKENDS:
        raise ValueError(f"register: unknown backend {backend!r}; expected one of {BACKENDS}")
    entries = _registry.setdefault(op, {})
    if backend in entries:
        raise ValueError(f"register: {op!r} already declares backend {backend!r}")
    entry = Entry(op, backend, tuple(devices), tuple(dtypes), dict(priority), tuple(limits))
    entries[backend] = entry
    return entry


def entries(op: str) -> dict[str, Entry]:
    """The declared backends of ``op`` (backend -> Entry)."""
    return dict(_registry[op])


def registered_ops() -> tuple[str, ...]:
    return tuple(_registry)


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


def unavailable_reasons(op_name: str, x: torch.Tensor, **facts: int) -> dict[str, str | None]:
    """backend -> why it cannot run this call of ``op_name`` on ``x`` (None: it can), for every backend."""
    declared = _registry[op_name]
    return {
        backend: (
            declared[backend].rejection(x.device, x.dtype, facts)
            if backend in declared
            else f"{op_name} has no {backend} implementation"
        )
        for backend in BACKENDS
    }


def select_backend(op_name: str, x: torch.Tensor, **facts: int) -> str:
    """Choose the backend for one call of ``op_name`` whose main input is ``x``.

    ``facts`` are the call's values the entries' limits name (e.g. ``num_frames=25``). The choice is
    recorded for :func:`last_backend`.
    """
    declared = _registry[op_name]
    forced = forced_backend()
    if forced is not None:
        entry = declared.get(forced)
        reason = f"{op_name} has no {forced} implementation" if entry is None else entry.rejection(x.device, x.dtype, facts)
        if reason is not None:
            raise BackendUnavailableError(f"{op_name}: backend {forced!r} was forced but cannot run: {reason}")
        chosen = forced
    else:
        ranked = sorted(
            (entry for entry in declared.values() if x.device.type in entry.priority),
            key=lambda entry: entry.priority[x.device.type],
        )
        reasons: dict[str, str] = {}
        chosen = None
        for entry in ranked:
            reason = entry.rejection(x.device, x.dtype, facts)
            if reason is None:
                chosen = entry.backend
                break
            reasons[entry.backend] = reason
        if chosen is None:
            listing = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or f"none ranked for {x.device.type}"
            raise BackendUnavailableError(f"{op_name}: no backend can run this call ({listing})")
    _last_backend[op_name] = chosen
    return chosen


def _build_reason(backend: str, device: torch.device) -> str | None:
    """Is the backend built/installed and usable on this device?"""
    from svd_fast import _extension, _triton  # noqa: PLC0415 - both import backends (for the error type)

    if backend == "cpu":
        return _extension.unavailable_reason()
    if backend == "cuda":
        return _extension.cuda_unavailable_reason()
    if backend == "triton":
        return _triton.unavailable_reason(device)
    return None
