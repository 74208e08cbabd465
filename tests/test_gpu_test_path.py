"""The GPU test path: gpu-marked cases cannot pass by skipping on a GPU machine, interpreter-only cases
skip cleanly when the Triton interpreter is off (as on a CUDA machine), and eager Triton launches leave
nothing behind in torch's kernel side table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import GPU_TESTS_MUST_RUN_ENV, requires_cuda, requires_triton_interpreter

from svd_fast import backends
from svd_fast.ops import edm_euler_step, group_norm, temporal_attention

REPO = Path(__file__).resolve().parent.parent
OP_TEST_FILES = ("tests/test_group_norm.py", "tests/test_temporal_attention.py", "tests/test_edm_step.py")

SAMPLE_TESTS = '''
import pytest

@pytest.mark.gpu
def test_gpu_case_that_skips():
    pytest.skip("pretend the kernel is missing")

@pytest.mark.gpu
@pytest.mark.gpu_optional
def test_gpu_case_needing_an_optional_package():
    pytest.skip("pretend DALI is missing")

def test_plain_case():
    pass
'''


def _pytest(args: list[str], env_overrides: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **env_overrides}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.parametrize("must_run", ["1", "0"])
def test_skipped_gpu_case_fails_only_where_gpu_tests_must_run(tmp_path: Path, must_run: str) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    # The real conftest as a plugin, the real marker registrations from pyproject.toml.
    result = _pytest(
        ["-p", "conftest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), "-m", "gpu", "test_sample.py"],
        {GPU_TESTS_MUST_RUN_ENV: must_run}, tmp_path,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1]
    if must_run == "1":
        assert result.returncode == 1, result.stdout
        # A skip raised by a marker happens in set-up, so pytest counts the failure as an error.
        assert ("1 failed" in summary or "1 error" in summary) and "1 skipped" in summary, summary
        assert "gpu test skipped where GPU tests must run" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "2 skipped" in summary, summary
    assert "1 deselected" in summary, summary


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="reproduces a CUDA machine's test run on a CPU machine")
def test_op_tests_pass_with_the_interpreter_off() -> None:
    """With TRITON_INTERPRET=0 (a CUDA machine's setting) the op test files have no failure: the cases
    that force Triton on CPU tensors skip with their reason."""
    result = _pytest(["-rs", *OP_TEST_FILES], {"TRITON_INTERPRET": "0", GPU_TESTS_MUST_RUN_ENV: "0"}, REPO)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-4000:]
    assert "failed" not in summary and "error" not in summary, summary
    assert "needs the Triton interpreter" in result.stdout


def _side_table_sizes() -> tuple[int, int]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=requires_triton_interpreter), pytest.param("cuda", marks=requires_cuda)],
)
def test_eager_triton_launches_leave_the_kernel_side_table_alone(device: str) -> None:
    x = torch.randn(2, 4, 3, 5, device=device)
    q = torch.randn(2 * 3, 4, 2 * 8, device=device)
    latents = torch.randn(1, 2, 4, 3, 5, device=device)

    def calls() -> None:
        group_norm(x, 2, activation="silu")
        temporal_attention(q, q, q, 3, 2)
        edm_euler_step(latents, latents, latents, 1.0, 0.5, 2.0)

    with backends.use_backend("triton"):
        calls()  # first launches compile and may register kernels once
        before = _side_table_sizes()
        for _ in range(5):
            calls()
    assert _side_table_sizes() == before
    assert backends.last_backend("group_norm") == "triton"
