"""svd_fast: fast kernels, sampling, training and data curation for Stable Video Diffusion."""

from svd_fast import backends, ops
from svd_fast.backends import BackendUnavailableError, backends_used, last_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "backends",
    "backends_used",
    "last_backend",
    "ops",
    "use_backend",
]
