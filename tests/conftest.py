"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in the Triton interpreter, which must be switched
on before triton is first imported: here, before any test module imports svd_fast's kernels.

GPU cases carry the ``gpu`` marker (tests/utils.py's ``requires_cuda``): they skip where there is no CUDA
device, and on a CUDA machine a skipped ``gpu`` case is reported as a failure, so that ``pytest -m gpu``
cannot pass by skipping. Cases that also need an optional package (flash-attn, DALI, deepspeed) carry
``gpu_optional`` and may skip with their reason. Plain helpers and markers live in tests/utils.py (test files
import them from there, never from conftest).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that must not be affected by a backend forced in the caller's shell.
os.environ.pop("SVD_FAST_BACKEND", None)

from utils import CUDA_AVAILABLE, GPU_TESTS_MUST_RUN_ENV  # noqa: E402 - utils reads TRITON_INTERPRET, set just above


def _gpu_tests_must_run() -> bool:
    override = os.environ.get(GPU_TESTS_MUST_RUN_ENV, "").strip()
    return override == "1" if override else CUDA_AVAILABLE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-xdist (make test) hands modules to its workers in collection order: the modules holding `slow` cases
    # go first, so that no worker is left running a long compile alone at the end while the other idles.
    slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_modules)
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
