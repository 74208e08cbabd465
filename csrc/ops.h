// Declarations of svd_fast's C++ entry points. Each op is defined in csrc/<op>.cpp: its schema
// (TORCH_LIBRARY_FRAGMENT), its CPU kernel (TORCH_LIBRARY_IMPL CPU) and the function below, which
// calls the op through the dispatcher so it runs the CPU or CUDA kernel by the inputs' device.
// kernels/<op>.cu registers the CUDA kernel (TORCH_LIBRARY_IMPL CUDA) when CUDA is built.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace svd_fast {

// GroupNorm over (N, C, *spatial) with optional fused SiLU. Returns (output, mean, rstd);
// mean and rstd are float32 of shape (N, num_groups).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu);

// Returns (grad_input, grad_weight, grad_bias); grad_weight/grad_bias have shape (C,) and the
// weight's dtype (the input's dtype when there is no weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu);

// Fused EDM (v-prediction) Euler step with per-frame classifier-free guidance (csrc/edm_step.cpp).
// Returns (x_next, denoised); denoised is empty unless return_denoised. guidance: float32 (B, F).
std::tuple<at::Tensor, at::Tensor> edm_euler_step(const at::Tensor& x, const at::Tensor& model_out_uncond,
                                                  const std::optional<at::Tensor>& model_out_cond, double sigma,
                                                  double sigma_next, const std::optional<at::Tensor>& guidance,
                                                  bool return_denoised);

// c_in scaling + channel concat with the conditioning latents + CFG batch doubling (uncond half first).
at::Tensor edm_prepare_model_input(const at::Tensor& x, const at::Tensor& cond_latents, double sigma, bool do_cfg);

// Fused temporal attention over the frame axis of frame-major (B*F, S, H*D) q/k/v with any strides
// (csrc/temporal_attention.cpp). Returns (out, lse): out contiguous (B*F, S, H*D) in q's dtype, lse the
// log-sum-exp of the scaled scores, contiguous (B*F, S, H), float32 (float64 for float64 input).
std::tuple<at::Tensor, at::Tensor> temporal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, int64_t num_frames,
                                                              int64_t num_heads, double scale);

// Returns (grad_q, grad_k, grad_v), contiguous (B*F, S, H*D) in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_frames, int64_t num_heads, double scale);

}  // namespace svd_fast
