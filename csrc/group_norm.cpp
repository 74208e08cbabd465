// GroupNorm(+SiLU): op schemas, CPU kernels, and the dispatcher entry points declared in ops.h.
//
// Layouts: input of shape (N, C, *spatial) stored contiguous (N, C, S) or channels_last
// (N, S, C); anything else is made contiguous first. Statistics are accumulated in
// at::opmath_type (float for fp16/bf16/fp32, double for fp64) with a two-pass mean/variance so
// that inputs far from zero keep their precision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "group_norm_common.h"
#include "ops.h"

namespace svd_fast {
namespace {

// Walks the elements of one (sample, group) in memory order for either layout and hands each
// element's offset and channel to `visit`. Contiguous: D channel rows of S elements;
// channels_last: S rows of D consecutive channels.
template <typename Visit>
inline void for_each_in_group(const GroupNormGeometry& g, int64_t n, int64_t group, Visit&& visit) {
  const int64_t first_channel = group * g.channels_per_group;
  if (!g.channels_last) {
    const int64_t base = (n * g.channels + first_channel) * g.spatial;
    for (int64_t d = 0; d < g.channels_per_group; ++d) {
      const int64_t row = base + d * g.spatial;
      const int64_t channel = first_channel + d;
      for (int64_t s = 0; s < g.spatial; ++s) visit(row + s, channel);
    }
  } else {
    const int64_t base = n * g.spatial * g.channels + first_channel;
    for (int64_t s = 0; s < g.spatial; ++s) {
      const int64_t row = base + s * g.channels;
      for (int64_t d = 0; d < g.channels_per_group; ++d) visit(row + d, first_channel + d);
    }
  }
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

template <typename scalar_t>
void forward_cpu_kernel(const GroupNormGeometry& geo, const scalar_t* x, const scalar_t* weight,
                        const scalar_t* bias, double eps, bool silu, scalar_t* y, float* mean_out,
                        float* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_total = geo.batch * geo.num_groups;
  const acc_t count = static_cast<acc_t>(geo.channels_per_group * geo.spatial);
  at::parallel_for(0, groups_total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / geo.num_groups;
      const int64_t group = ng % geo.num_groups;
      acc_t sum = 0;
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t) { sum += static_cast<acc_t>(x[i]); });
      const acc_t mean = sum / count;
      acc_t sq = 0;
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t) {
        const acc_t d = static_cast<acc_t>(x[i]) - mean;
        sq += d * d;
      });
      const acc_t rstd = acc_t(1) / std::sqrt(sq / count + static_cast<acc_t>(eps));
      mean_out[ng] = static_cast<float>(mean);
      rstd_out[ng] = static_cast<float>(rstd);
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t c) {
        acc_t z = (static_cast<acc_t>(x[i]) - mean) * rstd;
        if (weight) z *= static_cast<acc_t>(weight[c]);
        if (bias) z += static_cast<acc_t>(bias[c]);
        if (silu) z *= sigmoid(z);
        y[i] = static_cast<scalar_t>(z);
      });
    }
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const GroupNormGeometry& geo, const scalar_t* dy, const scalar_t* x,
                         const float* mean_in, const float* rstd_in, const scalar_t* weight,
                         const scalar_t* bias, bool silu, scalar_t* dx, at::opmath_type<scalar_t>* dw_partial,
                         at::opmath_type<scalar_t>* db_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_total = geo.batch * geo.num_groups;
  const acc_t count = static_cast<acc_t>(geo.channels_per_group * geo.spatial);
  at::parallel_for(0, groups_total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / geo.num_groups;
      const int64_t group = ng % geo.num_groups;
      const acc_t mean = mean_in[ng];
      const acc_t rstd = rstd_in[ng];
      // dz: gradient before the SiLU (equal to dy without it); recomputed from x, never stored.
      auto grad_z = [&](int64_t i, int64_t c, acc_t xhat) {
        acc_t g = static_cast<acc_t>(dy[i]);
        if (silu) {
          acc_t z = xhat;
          if (weight) z *= static_cast<acc_t>(weight[c]);
          if (bias) z += static_cast<acc_t>(bias[c]);
          const acc_t s = sigmoid(z);
          g *= s * (acc_t(1) + z * (acc_t(1) - s));
        }
        return g;
      };
      acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
      acc_t* dw_row = dw_partial + n * geo.channels;
      acc_t* db_row = db_partial + n * geo.channels;
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t c) {
        const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
        const acc_t dz = grad_z(i, c, xhat);
        dw_row[c] += dz * xhat;
        db_row[c] += dz;
        const acc_t dxhat = weight ? dz * static_cast<acc_t>(weight[c]) : dz;
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
      });
      const acc_t mean_dxhat = sum_dxhat / count;
      const acc_t mean_dxhat_xhat = sum_dxhat_xhat / count;
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t c) {
        const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
        const acc_t dz = grad_z(i, c, xhat);
        const acc_t dxhat = weight ? dz * static_cast<acc_t>(weight[c]) : dz;
        dx[i] = static_cast<scalar_t>(rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cpu(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  const GroupNormGeometry geo = group_norm_geometry(input, num_groups);
  const at::Tensor x = input.contiguous(geo.memory_format);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x, x.options(), geo.memory_format);
  at::Tensor mean = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_forward_cpu", [&] {
    forward_cpu_kernel<scalar_t>(geo, x.const_data_ptr<scalar_t>(),
                                 w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
                                 b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, eps, silu,
                                 y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                                 rstd.mutable_data_ptr<float>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  check_group_norm_backward_args(grad_output, input, mean, rstd, num_groups);
  const GroupNormGeometry geo = group_norm_geometry(input, num_groups);
  const at::Tensor x = input.contiguous(geo.memory_format);
  const at::Tensor dy = grad_output.contiguous(geo.memory_format);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x, x.options(), geo.memory_format);
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per-sample partial sums for dweight/dbias, summed over the batch afterwards: each (n, g)
  // task owns its own slice, so no two threads write the same element.
  at::Tensor dw_partial = at::zeros({geo.batch, geo.channels}, x.options().dtype(acc_dtype));
  at::Tensor db_partial = at::zeros({geo.batch, geo.channels}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_cpu_kernel<scalar_t>(geo, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  mean.contiguous().const_data_ptr<float>(),
                                  rstd.contiguous().const_data_ptr<float>(),
                                  w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
                                  b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, silu,
                                  dx.mutable_data_ptr<scalar_t>(), dw_partial.mutable_data_ptr<acc_t>(),
                                  db_partial.mutable_data_ptr<acc_t>());
  });
  const auto param_dtype = w.defined() ? w.scalar_type() : input.scalar_type();
  return {dx, dw_partial.sum(0).to(param_dtype), db_partial.sum(0).to(param_dtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("svd_fast::group_norm_forward", "")
                       .typed<decltype(group_norm_forward)>();
  return op.call(input, num_groups, weight, bias, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("svd_fast::group_norm_backward", "")
                       .typed<decltype(group_norm_backward)>();
  return op.call(grad_output, input, mean, rstd, weight, bias, num_groups, silu);
}

TORCH_LIBRARY_FRAGMENT(svd_fast, m) {
  m.def(
      "group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "bool silu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("group_norm_forward", &group_norm_forward_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace svd_fast
