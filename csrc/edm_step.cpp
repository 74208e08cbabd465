// Fused EDM sampling ops: op schemas and CPU kernels.
//
// edm_euler_step:          guided = u + w[b, f] * (c - u); D = c_skip * x + c_out * guided;
//                          x_next = x + (x - D) * (sigma_next - sigma) / sigma   (one pass over memory)
// edm_prepare_model_input: cat([c_in * x, cond], channels), batch doubled for classifier-free
//                          guidance with the unconditional half (zero conditioning latents) first.
// Math in float32 whatever the storage dtype; coefficients are computed in double on the host.
// Sampling only: these ops have no autograd formula.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "edm_step_common.h"

namespace svd_fast {
namespace {

// kHasCond / kDenoised are template parameters so that the inner loop has no branches and the
// compiler vectorises it.
template <typename scalar_t, bool kHasCond, bool kDenoised>
void euler_step_cpu_kernel(const at::Tensor& x, const at::Tensor& uncond, const at::Tensor* cond,
                           const at::Tensor* guidance, const EulerCoefficients& k, at::Tensor& x_next,
                           at::Tensor* denoised) {
  const int64_t frames = x.size(1);
  const int64_t rows = x.size(0) * frames;
  const int64_t slab = x.numel() / rows;
  const SlabStrides xs = slab_strides(x), us = slab_strides(uncond);
  const SlabStrides cs = kHasCond ? slab_strides(*cond) : SlabStrides{0, 0};
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* u_data = uncond.const_data_ptr<scalar_t>();
  const scalar_t* c_data = kHasCond ? cond->const_data_ptr<scalar_t>() : nullptr;
  const float* g_data = kHasCond ? guidance->const_data_ptr<float>() : nullptr;
  const int64_t g_sb = kHasCond ? guidance->stride(0) : 0, g_sf = kHasCond ? guidance->stride(1) : 0;
  scalar_t* out = x_next.mutable_data_ptr<scalar_t>();
  scalar_t* den = kDenoised ? denoised->mutable_data_ptr<scalar_t>() : nullptr;
  const float c_skip = static_cast<float>(k.c_skip), c_out = static_cast<float>(k.c_out);
  const float ratio = static_cast<float>(k.step_ratio);
  // Grain: split rows into chunks of at least ~32k elements so small slabs do not pay per-task overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(slab, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / frames, f = row % frames;
      const scalar_t* __restrict__ xr = x_data + b * xs.batch + f * xs.frame;
      const scalar_t* __restrict__ ur = u_data + b * us.batch + f * us.frame;
      const scalar_t* __restrict__ cr = kHasCond ? c_data + b * cs.batch + f * cs.frame : nullptr;
      const float w = kHasCond ? g_data[b * g_sb + f * g_sf] : 0.0f;
      scalar_t* __restrict__ outr = out + row * slab;
      scalar_t* __restrict__ denr = kDenoised ? den + row * slab : nullptr;
      for (int64_t i = 0; i < slab; ++i) {
        const float xv = static_cast<float>(xr[i]);
        float guided = static_cast<float>(ur[i]);
        if constexpr (kHasCond) guided += w * (static_cast<float>(cr[i]) - guided);
        const float d = c_skip * xv + c_out * guided;
        outr[i] = static_cast<scalar_t>(xv + (xv - d) * ratio);
        if constexpr (kDenoised) denr[i] = static_cast<scalar_t>(d);
      }
    }
  });
}

template <typename scalar_t>
void prepare_model_input_cpu_kernel(const at::Tensor& x, const at::Tensor& cond, float c_in, bool do_cfg,
                                    at::Tensor& out) {
  const int64_t batch = x.size(0), frames = x.size(1);
  const int64_t x_slab = x.numel() / (batch * frames);
  const int64_t cond_slab = cond.size(2) * cond.size(3) * cond.size(4);
  const int64_t out_slab = x_slab + cond_slab;
  const SlabStrides xs = slab_strides(x), cs = slab_strides(cond);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* c_data = cond.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t out_rows = out.size(0) * frames;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(out_slab, 1));
  at::parallel_for(0, out_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t out_batch = row / frames, f = row % frames;
      // With CFG, output samples [0, B) are the unconditional half, [B, 2B) the conditional one.
      const bool unconditional = do_cfg && out_batch < batch;
      const int64_t b = out_batch % batch;
      const scalar_t* xr = x_data + b * xs.batch + f * xs.frame;
      const scalar_t* cr = c_data + b * cs.batch + f * cs.frame;
      scalar_t* outr = out_data + row * out_slab;
      for (int64_t i = 0; i < x_slab; ++i) outr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * c_in);
      scalar_t* cond_out = outr + x_slab;
      if (unconditional) {
        std::fill(cond_out, cond_out + cond_slab, scalar_t(0));
      } else {
        std::copy(cr, cr + cond_slab, cond_out);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> edm_euler_step_cpu(const at::Tensor& x_in, const at::Tensor& uncond_in,
                                                      const std::optional<at::Tensor>& cond_in, double sigma,
                                                      double sigma_next, const std::optional<at::Tensor>& guidance,
                                                      bool return_denoised) {
  check_edm_euler_step_args(x_in, uncond_in, cond_in, sigma, guidance);
  const at::Tensor x = slab_view(x_in), uncond = slab_view(uncond_in);
  const at::Tensor cond = cond_in.has_value() ? slab_view(*cond_in) : at::Tensor();
  const EulerCoefficients k = euler_coefficients(sigma, sigma_next);
  at::Tensor x_next = at::empty(x.sizes(), x.options());
  at::Tensor denoised = return_denoised ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edm_euler_step_cpu", [&] {
    const at::Tensor* cond_ptr = cond.defined() ? &cond : nullptr;
    const at::Tensor* guidance_ptr = cond.defined() ? &*guidance : nullptr;
    at::Tensor* denoised_ptr = return_denoised ? &denoised : nullptr;
    if (cond_ptr && return_denoised) {
      euler_step_cpu_kernel<scalar_t, true, true>(x, uncond, cond_ptr, guidance_ptr, k, x_next, denoised_ptr);
    } else if (cond_ptr) {
      euler_step_cpu_kernel<scalar_t, true, false>(x, uncond, cond_ptr, guidance_ptr, k, x_next, denoised_ptr);
    } else if (return_denoised) {
      euler_step_cpu_kernel<scalar_t, false, true>(x, uncond, cond_ptr, guidance_ptr, k, x_next, denoised_ptr);
    } else {
      euler_step_cpu_kernel<scalar_t, false, false>(x, uncond, cond_ptr, guidance_ptr, k, x_next, denoised_ptr);
    }
  });
  return {x_next, denoised};
}

at::Tensor edm_prepare_model_input_cpu(const at::Tensor& x_in, const at::Tensor& cond_in, double sigma,
                                       bool do_cfg) {
  check_edm_prepare_model_input_args(x_in, cond_in, sigma);
  const at::Tensor x = slab_view(x_in), cond = slab_view(cond_in);
  at::Tensor out = at::empty({x.size(0) * (do_cfg ? 2 : 1), x.size(1), x.size(2) + cond.size(2), x.size(3), x.size(4)},
                             x.options());
  const float c_in = static_cast<float>(input_scale(sigma));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edm_prepare_model_input_cpu", [&] {
    prepare_model_input_cpu_kernel<scalar_t>(x, cond, c_in, do_cfg, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svd_fast, m) {
  m.def(
      "edm_euler_step(Tensor x, Tensor model_out_uncond, Tensor? model_out_cond, float sigma, float sigma_next, "
      "Tensor? guidance, bool return_denoised) -> (Tensor, Tensor)");
  m.def("edm_prepare_model_input(Tensor x, Tensor cond_latents, float sigma, bool do_cfg) -> Tensor");
}

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("edm_euler_step", &edm_euler_step_cpu);
  m.impl("edm_prepare_model_input", &edm_prepare_model_input_cpu);
}

}  // namespace svd_fast
