"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in the Triton interpreter, which must be switched
on before triton is first imported: here, before any test module imports svd_fast's kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that must not be affected by a backend forced in the caller's shell.
os.environ.pop("SVD_FAST_BACKEND", None)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
