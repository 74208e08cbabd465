"""The backend registry: which implementation of an op runs a call, and why the others cannot.

Every op has up to four implementations:

* ``reference``: plain PyTorch, the numerical ground truth; runs anywhere.
* ``cpu``: C++ kernel in the compiled extension ``svd_fast._C`` (CPU tensors).
* ``cuda``: CUDA kernel in the compiled extension (CUDA tensors, extension built with CUDA).
* ``triton``: Triton kernel (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).

Each op declares, once per backend, the implementation (a callable) and what that backend accepts
(:func:`register`): device types, dtypes, limits on facts of the call (e.g. at most 64 frames), a probe
saying whether it is built/installed, and its priority per device type. An op call asks
:func:`select_backend` with its input and those facts and calls the implementation of the entry it
returns: the first backend by priority that accepts the call and is built/installed. A backend can be forced with the environment
variable ``SVD_FAST_BACKEND`` or, for a block of code, with :func:`use_backend`; a forced backend
that cannot run raises :class:`BackendUnavailableError` naming the reason. It never falls back
silently. :func:`last_backend` tells which backend the last call of an op ran on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

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
    """One backend of one op: its ``implementation``, what it accepts, and its rank per device type (lower
    runs first). ``probe(device)`` says why the backend is not built/installed/usable there (None: it is).

    A device type missing from ``priority`` is never chosen automatically there, only when forced
    (e.g. Triton on CPU tensors, which runs in the slow interpreter).
    """

    op: str
    backend: str
    implementation: Callable[..., Any]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: Mapping[str, int]
    limits: tuple[Limit, ...] = ()
    probe: Callable[[torch.device], str | None] | None = None

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
        return None if self.probe is None else self.probe(device)


_registry: dict[str, dict[str, Entry]] = {}


def register(
    op: str,
    backend: str,
    implementation: Callable[..., Any],
    *,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    priority: Mapping[str, int],
    limits: tuple[Limit, ...] = (),
    probe: Callable[[torch.device], str | None] | None = None,
) -> Entry:
    """Declare ``backend`` of ``op``: the callable that runs it, the devices, dtypes and limits it accepts, the
    probe of whether it is built/installed (None: always) and its priority per device type."""
    if backend not in BACKENDS:
        raise ValueError(f"register: unknown backend {backend!r}; expected one of {BACKENDS}")
    if not callable(implementation):
        raise TypeError(f"register: implementation of {op!r} on {backend!r} must be callable, got {type(implementation).__name__}")
    entries = _registry.setdefault(op, {})
    if backend in entries:
        raise ValueError(f"register: {op!r} already declares backend {backend!r}")
    entry = Entry(op, backend, implementation, tuple(devices), tuple(dtypes), dict(priority), tuple(limits), probe)
    entries[backend] = entry
    return entry


def registered_ops() -> tuple[str, ...]:
    """The ops that declared backends (svd_fast.checks checks a forced backend against each)."""
    return tuple(_registry)


def entries(op: str) -> dict[str, Entry]:
    """The declared backends of ``op`` (backend -> Entry)."""
    return dict(_registry[op])


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


def select_backend(op_name: str, x: torch.Tensor, **facts: int) -> Entry:
    """The entry (backend and implementation) that runs one call of ``op_name`` whose main input is ``x``.

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
        chosen = entry
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
                chosen = entry
                break
            reasons[entry.backend] = reason
        if chosen is None:
            listing = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or f"none ranked for {x.device.type}"
            raise BackendUnavailableError(f"{op_name}: no backend can run this call ({listing})")
    _last_backend[op_name] = chosen.backend
    return chosen
