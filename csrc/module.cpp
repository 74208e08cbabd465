// The Python module svd_fast._C (pybind11). Importing it runs the TORCH_LIBRARY registrations of every
// csrc/*.cpp and kernels/*.cu file linked into it, which define torch.ops.svd_fast.*: those ops are the
// extension's only compute API. The module's own functions only report how the extension was built
// (svd_fast._extension.build_info).
#include <torch/extension.h>
#include <torch/version.h>

#include <string>
#include <vector>

// With CUDA, the build (setup.py, CMakeLists.txt) defines SVD_FAST_CUDA_ARCHITECTURES as the comma-separated
// compute capabilities the kernels were compiled for, e.g. 80,90 (numbers: a string literal would need shell
// quoting through ninja).
#ifndef SVD_FAST_CUDA_ARCHITECTURES
#define SVD_FAST_CUDA_ARCHITECTURES
#endif

namespace {

bool built_with_cuda() {
#ifdef SVD_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<int> cuda_architectures() { return {SVD_FAST_CUDA_ARCHITECTURES}; }

std::string cxx_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "svd_fast compiled kernels: importing registers torch.ops.svd_fast.*; the functions report the build";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cuda_architectures", &cuda_architectures, "Compute capabilities (e.g. 90 for sm_90) the CUDA kernels were compiled for; empty without CUDA");
  m.def("cxx_compiler", &cxx_compiler, "The C++ compiler that built the extension");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); }, "The torch version the extension was built against");
}
