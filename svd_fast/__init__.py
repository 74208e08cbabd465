"""svd_fast: fast kernels, sampling, training and data curation for Stable Video Diffusion."""

from svd_fast import backends, ops
from svd_fast.backends import BackendUnavailableError, backends_used, last_backend, use_backend

__version__ = "0.1.0"

_PATCHING_EXPORTS = ("optimize", "restore", "describe")
_LORA_EXPORTS = ("load_lora", "unload_lora", "fuse_lora", "unfuse_lora", "set_lora_scale", "lora_adapters")


def __getattr__(name: str) -> object:
    # optimize/restore import diffusers: load them on first use so `import svd_fast` stays light.
    if name in _PATCHING_EXPORTS:
        from svd_fast.diffusers import patching  # noqa: PLC0415 - diffusers loads only when a model is built

        return getattr(patching, name)
    if name in _LORA_EXPORTS:
        from svd_fast.diffusers import lora  # noqa: PLC0415

        return getattr(lora, name)
    raise AttributeError(f"module 'svd_fast' has no attribute {name!r}")

__all__ = [
    "BackendUnavailableError",
    "backends",
    "backends_used",
    "describe",
    "last_backend",
    "ops",
    "optimize",
    "restore",
    "use_backend",
    *_LORA_EXPORTS,
]
