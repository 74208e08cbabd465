// Launch helpers shared by the CUDA kernels in kernels/: the current device's shared-memory limits, the 1-D grid
// limit and the dynamic shared-memory opt-in (each failing with a message that names the op), and the choice of a
// kernel instantiation from a run-time flag.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace svd_fast::launch {

constexpr size_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory above this needs the opt-in
constexpr int64_t kReservedSharedPerBlock = 1024;  // what the hardware reserves per resident block (sm_80+)

struct DeviceLimits {
  int64_t max_shared_per_block;  // with the opt-in
  int64_t shared_per_sm;
};

inline DeviceLimits current_device_limits() {
  int device = 0, per_block = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return {per_block, per_sm};
}

// `what` says what the bytes hold and which arguments make them too many.
inline void check_shared_memory(int64_t bytes, const DeviceLimits& limits, const char* op, const char* what) {
  TORCH_CHECK(bytes <= limits.max_shared_per_block, op, ": ", what, " needs ", bytes,
              " bytes of shared memory per block, the device allows ", limits.max_shared_per_block);
}

// Blocks of a 1-D grid: dimension x allows 2^31 - 1 (y and z only 65,535), so the kernels use x alone.
inline unsigned grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= INT32_MAX, op, ": ", blocks, " blocks exceed the CUDA grid limit of 2^31 - 1 (split the input)");
  return static_cast<unsigned>(blocks);
}

// Opts `kernel` in to `bytes` of dynamic shared memory above the default; `bytes` was checked with
// check_shared_memory.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSharedBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Calls body(std::true_type{}) or body(std::false_type{}), so that the flag is a template argument of the kernel.
template <typename Body>
void dispatch_bool(bool flag, Body&& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace svd_fast::launch
