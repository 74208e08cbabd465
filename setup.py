"""Builds svd_fast and its compiled extension svd_fast._C.

C++ sources in csrc/ (op registration, CPU kernels, the pybind11 module) are always built.
CUDA sources in kernels/ are built when torch is a CUDA build and a CUDA toolkit is found
(torch.utils.cpp_extension.CUDA_HOME). SVD_FAST_BUILD_CUDA=1 forces them (and fails loudly if
impossible), SVD_FAST_BUILD_CUDA=0 skips them. TORCH_CUDA_ARCH_LIST picks the GPU architectures.

Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed
(an isolated build would fetch a different torch).
"""

import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, _get_cuda_arch_flags

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda_kernels() -> bool:
    switch = os.environ.get("SVD_FAST_BUILD_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if switch == "0":
        return False
    if switch == "1":
        if not possible:
            raise RuntimeError(
                "SVD_FAST_BUILD_CUDA=1 but CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if switch:
        raise RuntimeError(f"SVD_FAST_BUILD_CUDA must be 0 or 1, got {switch!r}")
    return possible


def cuda_architectures() -> str:
    """The compute capabilities nvcc builds SASS for, "80,90", for svd_fast._C.cuda_architectures(). Read from
    the same -gencode flags CUDAExtension passes (TORCH_CUDA_ARCH_LIST, else the visible GPUs)."""
    codes = {int(code) for flag in _get_cuda_arch_flags() for code in re.findall(r"code=sm_(\d+)", flag)}
    return ",".join(str(code) for code in sorted(codes))


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: at::parallel_for in the CPU kernels is an OpenMP region in torch's CPU builds; without the
    # flag the pragma is ignored and every kernel runs on one thread.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if not build_cuda_kernels():
        print("svd_fast: building CPU kernels only")
        return CppExtension(
            "svd_fast._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    print(f"svd_fast: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME})")
    cuda_sources = sorted(glob.glob("kernels/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "svd_fast._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("SVD_FAST_WITH_CUDA", "1"), ("SVD_FAST_CUDA_ARCHITECTURES", cuda_architectures())],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["svd_fast", "svd_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
