"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in the Triton interpreter, which must be switched
on before triton is first imported: here, before any test module imports svd_fast's kernels.

GPU cases carry the ``gpu`` marker (``requires_cuda``): they skip where there is no CUDA device, and
on a CUDA machine a skipped ``gpu`` case is reported as a failure, so that ``pytest -m gpu`` cannot
pass by skipping. Cases that also need an optional package (flash-attn, DALI, deepspeed) carry
``gpu_optional`` (``requires_cuda_and_package``) and may skip with their reason. Cases that force
Triton on CPU tensors (``requires_triton_interpreter``) skip when the interpreter is off, as on a
CUDA machine, where the triton-cuda cases run the same kernels.
"""

import os

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests that must not be affected by a backend forced in the caller's shell.
os.environ.pop("SVD_FAST_BACKEND", None)

# "1" or "0" overrides whether skipped gpu cases fail (default: they fail where CUDA is available).
GPU_TESTS_MUST_RUN_ENV = "SVD_FAST_GPU_TESTS_MUST_RUN"

requires_cuda = pytest.mark.gpu
requires_cuda_and_package = [pytest.mark.gpu, pytest.mark.gpu_optional]
requires_triton_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRETER_ON,
    reason="forces Triton on CPU tensors, which needs the Triton interpreter (TRITON_INTERPRET=1); "
    "with it off the triton-cuda cases run these kernels on a GPU",
)


def _gpu_tests_must_run() -> bool:
    override = os.environ.get(GPU_TESTS_MUST_RUN_ENV, "").strip()
    return override == "1" if override else CUDA_AVAILABLE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and _gpu_tests_must_run()
        and item.get_closest_marker("gpu") is not None
        and item.get_closest_marker("gpu_optional") is None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"gpu test skipped where GPU tests must run ({GPU_TESTS_MUST_RUN_ENV} or CUDA present): {reason}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
