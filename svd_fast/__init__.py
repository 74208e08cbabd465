"""svd_fast: fast kernels, sampling, training and data curation for Stable Video Diffusion."""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Every one loads on first use, so `import svd_fast` (and the
# command line's argument parsing and --help) imports neither torch nor diffusers.
_LAZY_EXPORTS = {
    "backends": "svd_fast",
    "ops": "svd_fast",
    "BackendUnavailableError": "svd_fast.backends",
    "backends_used": "svd_fast.backends",
    "last_backend": "svd_fast.backends",
    "use_backend": "svd_fast.backends",
    "optimize": "svd_fast.diffusers.patching",
    "restore": "svd_fast.diffusers.patching",
    "describe": "svd_fast.diffusers.patching",
    "load_lora": "svd_fast.diffusers.lora",
    "unload_lora": "svd_fast.diffusers.lora",
    "fuse_lora": "svd_fast.diffusers.lora",
    "unfuse_lora": "svd_fast.diffusers.lora",
    "set_lora_scale": "svd_fast.diffusers.lora",
    "lora_adapters": "svd_fast.diffusers.lora",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'svd_fast' has no attribute {name!r}")
    if module_name == "svd_fast":
        return importlib.import_module(f"svd_fast.{name}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_EXPORTS])


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
    "load_lora",
    "unload_lora",
    "fuse_lora",
    "unfuse_lora",
    "set_lora_scale",
    "lora_adapters",
]
