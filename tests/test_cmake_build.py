"""The CMake build (CMakeLists.txt) compiles the same extension as setup.py, and its module works: importing it
registers the ops, and its own functions only report how it was built.

Built in a fresh process because loading a second copy of svd_fast._C into this one would register
the svd_fast ops twice.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
]


def test_cmake_build_produces_working_extension(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}", "-DSVD_FAST_WITH_CUDA=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True, text=True)
    [library] = build_dir.glob("_C*.so")
    check = textwrap.dedent(
        f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(library)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        x = torch.randn(2, 8, 4, 4) * 3 + 10
        y, _, _ = torch.ops.svd_fast.group_norm_forward(x, 4, None, None, 1e-5, True)
        expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, eps=1e-5))
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        print(module.built_with_cuda(), module.cuda_architectures(), bool(module.cxx_compiler()), module.torch_version() == torch.__version__.split("+")[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False [] True True"
