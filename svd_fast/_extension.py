"""Loads the compiled extension ``svd_fast._C`` and reports what it was built with.

Importing ``svd_fast._C`` registers the C++ ops (``torch.ops.svd_fast.*``) for CPU and, when built
with CUDA, for CUDA: those ops are its only API. The module's own functions only report build facts
(:func:`build_info`). The package works without it (reference and Triton backends); the reasons
below are what the backend selector reports when the extension is missing.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from svd_fast import _C  # noqa: PLC0415 - imported lazily so the package imports without it
    except ImportError as error:
        return None, f"compiled extension svd_fast._C is not importable ({error}); reinstall with `pip install --no-build-isolation -e .`"
    return _C, None


def extension() -> ModuleType:
    """The loaded ``svd_fast._C`` module; raises ImportError with the reason if it is missing."""
    module, reason = _load()
    if module is None:
        raise ImportError(reason)
    return module


def unavailable_reason() -> str | None:
    return _load()[1]


def cuda_unavailable_reason() -> str | None:
    module, reason = _load()
    if module is None:
        return reason
    if not module.built_with_cuda():
        return "svd_fast._C was built without CUDA kernels (CPU torch or SVD_FAST_BUILD_CUDA=0 at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def build_info() -> dict[str, object]:
    """What the extension was built with, for bug reports and the demo summary."""
    module, reason = _load()
    if module is None:
        return {"extension": False, "reason": reason}
    return {
        "extension": True,
        "cuda_kernels": bool(module.built_with_cuda()),
        "cuda_architectures": [f"sm_{code}" for code in module.cuda_architectures()],
        "compiler": module.cxx_compiler(),
        "built_against_torch": module.torch_version(),
    }
