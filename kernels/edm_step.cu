// CUDA kernels of the fused EDM sampling ops (schemas and CPU kernels: csrc/edm_step.cpp).
// Same algorithm as the CPU kernel: one (b, f) slab of C*H*W contiguous elements per blockIdx.x,
// a grid-stride loop over the slab; loads converted to float32, math in float32, one store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "edm_step_common.h"

namespace svd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksPerSlab = 65535;  // gridDim.y limit

template <typename scalar_t>
__global__ void euler_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ uncond,
                                  const scalar_t* __restrict__ cond, const float* __restrict__ guidance,
                                  scalar_t* __restrict__ x_next, scalar_t* __restrict__ denoised, int64_t frames,
                                  int64_t slab, SlabStrides xs, SlabStrides us, SlabStrides cs, int64_t g_sb,
                                  int64_t g_sf, float c_skip, float c_out, float ratio) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / frames, f = row % frames;
  const scalar_t* xr = x + b * xs.batch + f * xs.frame;
  const scalar_t* ur = uncond + b * us.batch + f * us.frame;
  const scalar_t* cr = cond ? cond + b * cs.batch + f * cs.frame : nullptr;
  const float w = guidance ? guidance[b * g_sb + f * g_sf] : 0.0f;
  scalar_t* outr = x_next + row * slab;
  scalar_t* denr = denoised ? denoised + row * slab : nullptr;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < slab; i += int64_t(gridDim.y) * blockDim.x) {
    const float xv = static_cast<float>(xr[i]);
    float guided = static_cast<float>(ur[i]);
    if (cr) guided += w * (static_cast<float>(cr[i]) - guided);
    const float d = c_skip * xv + c_out * guided;
    outr[i] = static_cast<scalar_t>(xv + (xv - d) * ratio);
    if (denr) denr[i] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t>
__global__ void prepare_model_input_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cond,
                                           scalar_t* __restrict__ out, int64_t batch, int64_t frames,
                                           int64_t x_slab, int64_t cond_slab, SlabStrides xs, SlabStrides cs,
                                           float c_in, bool do_cfg) {
  const int64_t row = blockIdx.x;
  const int64_t out_batch = row / frames, f = row % frames;
  // With CFG, output samples [0, B) are the unconditional half, [B, 2B) the conditional one.
  const bool unconditional = do_cfg && out_batch < batch;
  const int64_t b = out_batch % batch;
  const scalar_t* xr = x + b * xs.batch + f * xs.frame;
  const scalar_t* cr = cond + b * cs.batch + f * cs.frame;
  const int64_t out_slab = x_slab + cond_slab;
  scalar_t* outr = out + row * out_slab;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < out_slab;
       i += int64_t(gridDim.y) * blockDim.x) {
    if (i < x_slab) {
      outr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * c_in);
    } else {
      outr[i] = unconditional ? scalar_t(0) : cr[i - x_slab];
    }
  }
}

dim3 slab_grid(int64_t rows, int64_t slab) {
  const int64_t blocks = std::min<int64_t>((slab + kThreads - 1) / kThreads, kMaxBlocksPerSlab);
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(blocks));
}

std::tuple<at::Tensor, at::Tensor> edm_euler_step_cuda(const at::Tensor& x_in, const at::Tensor& uncond_in,
                                                       const std::optional<at::Tensor>& cond_in, double sigma,
                                                       double sigma_next, const std::optional<at::Tensor>& guidance,
                                                       bool return_denoised) {
  check_edm_euler_step_args(x_in, uncond_in, cond_in, sigma, guidance);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = slab_view(x_in), uncond = slab_view(uncond_in);
  const at::Tensor cond = cond_in.has_value() ? slab_view(*cond_in) : at::Tensor();
  const EulerCoefficients k = euler_coefficients(sigma, sigma_next);
  at::Tensor x_next = at::empty(x.sizes(), x.options());
  at::Tensor denoised = return_denoised ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int64_t frames = x.size(1), rows = x.size(0) * frames, slab = x.numel() / rows;
  TORCH_CHECK(rows <= INT32_MAX, "edm_euler_step: too many (batch, frame) slabs for one launch: ", rows);
  const float* g = cond.defined() ? guidance->const_data_ptr<float>() : nullptr;
  const int64_t g_sb = cond.defined() ? guidance->stride(0) : 0, g_sf = cond.defined() ? guidance->stride(1) : 0;
  const SlabStrides cs = cond.defined() ? slab_strides(cond) : SlabStrides{0, 0};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edm_euler_step_cuda", [&] {
    euler_step_kernel<scalar_t><<<slab_grid(rows, slab), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), uncond.const_data_ptr<scalar_t>(),
        cond.defined() ? cond.const_data_ptr<scalar_t>() : nullptr, g, x_next.mutable_data_ptr<scalar_t>(),
        return_denoised ? denoised.mutable_data_ptr<scalar_t>() : nullptr, frames, slab, slab_strides(x),
        slab_strides(uncond), cs, g_sb, g_sf, static_cast<float>(k.c_skip), static_cast<float>(k.c_out),
        static_cast<float>(k.step_ratio));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_next, denoised};
}

at::Tensor edm_prepare_model_input_cuda(const at::Tensor& x_in, const at::Tensor& cond_in, double sigma,
                                        bool do_cfg) {
  check_edm_prepare_model_input_args(x_in, cond_in, sigma);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = slab_view(x_in), cond = slab_view(cond_in);
  const int64_t batch = x.size(0), frames = x.size(1);
  at::Tensor out = at::empty({batch * (do_cfg ? 2 : 1), frames, x.size(2) + cond.size(2), x.size(3), x.size(4)},
                             x.options());
  const int64_t x_slab = x.numel() / (batch * frames);
  const int64_t cond_slab = cond.size(2) * cond.size(3) * cond.size(4);
  const int64_t rows = out.size(0) * frames;
  TORCH_CHECK(rows <= INT32_MAX, "edm_prepare_model_input: too many (batch, frame) slabs for one launch: ", rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edm_prepare_model_input_cuda", [&] {
    prepare_model_input_kernel<scalar_t><<<slab_grid(rows, x_slab + cond_slab), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), cond.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), batch,
        frames, x_slab, cond_slab, slab_strides(x), slab_strides(cond), static_cast<float>(input_scale(sigma)),
        do_cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CUDA, m) {
  m.impl("edm_euler_step", &edm_euler_step_cuda);
  m.impl("edm_prepare_model_input", &edm_prepare_model_input_cuda);
}

}  // namespace svd_fast
