// GroupNorm(+SiLU): op schemas and CPU kernels.
//
// Layouts (group_norm_common.h): planar (contiguous (N, C, S), or a channel-planar strided view such as SVD's
// permuted (B, C, F, H, W) one, read in place) or channels_last (N, S, C); anything else is made contiguous
// first. Outputs take the input's strides. Elementwise math is in at::opmath_type
// (float for fp16/bf16/fp32, double for fp64). The reductions over a whole group (up to millions
// of elements) add short opmath blocks into double, since one long float sum loses ~count * 2^-24
// relative precision; the forward's mean pass sums x minus a pivot and the variance pass sums
// squared deviations from the mean, so that inputs far from zero keep their precision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "group_norm_common.h"

namespace svd_fast {
namespace {

// Offset of element 0 of channel `channel` of sample n in the planar layout.
inline int64_t planar_base(const GroupNormGeometry& g, int64_t n, int64_t channel) {
  return n * g.batch_stride + channel * g.channel_stride;
}

// Walks the elements of one (sample, group) in memory order for either layout and hands each
// element's offset and channel to `visit`. Planar: D channels of `outer` runs of `inner` elements;
// channels_last: S rows of D consecutive channels.
template <typename Visit>
inline void for_each_in_group(const GroupNormGeometry& g, int64_t n, int64_t group, Visit&& visit) {
  const int64_t first_channel = group * g.channels_per_group;
  if (!g.channels_last) {
    for (int64_t channel = first_channel; channel < first_channel + g.channels_per_group; ++channel) {
      for (int64_t o = 0; o < g.outer; ++o) {
        const int64_t row = planar_base(g, n, channel) + o * g.outer_stride;
        for (int64_t i = 0; i < g.inner; ++i) visit(row + i, channel);
      }
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

// Sum over p[0, len) of f(p[i]) in blocks: kLanes independent accumulators (which the compiler
// turns into SIMD lanes) over at most kBlock elements, each block then added in double. Callers pass
// values already shifted near zero, so the short acc_t sums lose nothing that matters.
template <typename acc_t, typename scalar_t, typename F>
inline double blocked_sum(const scalar_t* p, int64_t len, F f) {
  constexpr int kLanes = 8;
  constexpr int64_t kBlock = 1024;
  double total = 0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t end = std::min(len, start + kBlock);
    acc_t lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += f(static_cast<acc_t>(p[i + j]));
    }
    double block = 0;
    for (; i < end; ++i) block += f(static_cast<acc_t>(p[i]));
    for (int j = 0; j < kLanes; ++j) block += lanes[j];
    total += block;
  }
  return total;
}

// Calls visit(row_pointer_offset, length, first_channel, channel_step) for each contiguous run of a
// group: planar layout, D * outer runs of `inner` elements of one channel; channels_last, S runs of D channels.
template <typename Visit>
inline void for_each_run(const GroupNormGeometry& g, int64_t n, int64_t group, Visit&& visit) {
  const int64_t first_channel = group * g.channels_per_group;
  if (!g.channels_last) {
    for (int64_t channel = first_channel; channel < first_channel + g.channels_per_group; ++channel) {
      for (int64_t o = 0; o < g.outer; ++o) visit(planar_base(g, n, channel) + o * g.outer_stride, g.inner, channel, 0);
    }
  } else {
    const int64_t base = n * g.spatial * g.channels + first_channel;
    for (int64_t s = 0; s < g.spatial; ++s) visit(base + s * g.channels, g.channels_per_group, first_channel, 1);
  }
}

// y = (x - mean) * scale + shift over one run, then SiLU. kPerElement: scale/shift advance with
// the element (channels_last runs span channels), else one channel's values for the whole run.
// Template flags keep branches and strides out of the loops so that they vectorize.
template <bool kPerElement, bool kSilu, typename scalar_t, typename acc_t>
inline void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, acc_t mean, const acc_t* scale,
                          const acc_t* shift) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t k = kPerElement ? i : 0;
    acc_t z = (static_cast<acc_t>(x[i]) - mean) * scale[k] + shift[k];
    if constexpr (kSilu) z *= sigmoid(z);
    y[i] = static_cast<scalar_t>(z);
  }
}

template <bool kPerElement, typename scalar_t, typename acc_t>
inline void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, acc_t mean, const acc_t* scale,
                          const acc_t* shift, bool silu) {
  if (silu) {
    normalize_run<kPerElement, true>(x, y, len, mean, scale, shift);
  } else {
    normalize_run<kPerElement, false>(x, y, len, mean, scale, shift);
  }
}

template <typename scalar_t>
void forward_cpu_kernel(const GroupNormGeometry& geo, const scalar_t* x, const scalar_t* weight,
                        const scalar_t* bias, double eps, bool silu, scalar_t* y, float* mean_out,
                        float* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_total = geo.batch * geo.num_groups;
  const double count = static_cast<double>(geo.channels_per_group * geo.spatial);
  at::parallel_for(0, groups_total, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scale(geo.channels_per_group), shift(geo.channels_per_group);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / geo.num_groups;
      const int64_t group = ng % geo.num_groups;
      // Pass 1 sums x - pivot (pivot: the group's first element), so that for off-centre data the
      // summands are of the size of the spread, not of the mean.
      const acc_t pivot = static_cast<acc_t>(
          x[geo.channels_last ? n * geo.spatial * geo.channels + group * geo.channels_per_group
                              : planar_base(geo, n, group * geo.channels_per_group)]);
      double shifted_sum = 0;
      for_each_run(geo, n, group, [&](int64_t offset, int64_t len, int64_t, int64_t) {
        shifted_sum += blocked_sum<acc_t>(x + offset, len, [pivot](acc_t v) { return v - pivot; });
      });
      const double mean_sum = static_cast<double>(pivot) + shifted_sum / count;
      const acc_t mean = static_cast<acc_t>(mean_sum);
      double sq = 0;
      for_each_run(geo, n, group, [&](int64_t offset, int64_t len, int64_t, int64_t) {
        sq += blocked_sum<acc_t>(x + offset, len, [mean](acc_t v) { return (v - mean) * (v - mean); });
      });
      const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(sq / count + eps));
      mean_out[ng] = static_cast<float>(mean);
      rstd_out[ng] = static_cast<float>(rstd);
      const int64_t first_channel = group * geo.channels_per_group;
      for (int64_t d = 0; d < geo.channels_per_group; ++d) {
        scale[d] = weight ? rstd * static_cast<acc_t>(weight[first_channel + d]) : rstd;
        shift[d] = bias ? static_cast<acc_t>(bias[first_channel + d]) : acc_t(0);
      }
      for_each_run(geo, n, group, [&](int64_t offset, int64_t len, int64_t channel, int64_t step) {
        const int64_t d = channel - first_channel;
        if (step == 0) {
          normalize_run<false>(x + offset, y + offset, len, mean, scale.data() + d, shift.data() + d, silu);
        } else {
          normalize_run<true>(x + offset, y + offset, len, mean, scale.data() + d, shift.data() + d, silu);
        }
      });
    }
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const GroupNormGeometry& geo, const scalar_t* dy, const scalar_t* x,
                         const float* mean_in, const float* rstd_in, const scalar_t* weight,
                         const scalar_t* bias, bool silu, scalar_t* dx, double* dw_partial,
                         double* db_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_total = geo.batch * geo.num_groups;
  const double count = static_cast<double>(geo.channels_per_group * geo.spatial);
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
      double sum_dxhat = 0, sum_dxhat_xhat = 0;
      double* dw_row = dw_partial + n * geo.channels;
      double* db_row = db_partial + n * geo.channels;
      for_each_in_group(geo, n, group, [&](int64_t i, int64_t c) {
        const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
        const acc_t dz = grad_z(i, c, xhat);
        dw_row[c] += dz * xhat;
        db_row[c] += dz;
        const acc_t dxhat = weight ? dz * static_cast<acc_t>(weight[c]) : dz;
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
      });
      const acc_t mean_dxhat = static_cast<acc_t>(sum_dxhat / count);
      const acc_t mean_dxhat_xhat = static_cast<acc_t>(sum_dxhat_xhat / count);
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
  const at::Tensor x = group_norm_kernel_input(input, geo);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x);
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
  const at::Tensor x = group_norm_kernel_input(input, geo);
  const at::Tensor dy = group_norm_same_layout(grad_output, x);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  // Per-sample partial sums for dweight/dbias, summed over the batch afterwards: each (n, g)
  // task owns its own slice, so no two threads write the same element.
  at::Tensor dw_partial = at::zeros({geo.batch, geo.channels}, x.options().dtype(at::kDouble));
  at::Tensor db_partial = at::zeros({geo.batch, geo.channels}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cpu", [&] {
    backward_cpu_kernel<scalar_t>(geo, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  mean.contiguous().const_data_ptr<float>(),
                                  rstd.contiguous().const_data_ptr<float>(),
                                  w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
                                  b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, silu,
                                  dx.mutable_data_ptr<scalar_t>(), dw_partial.mutable_data_ptr<double>(),
                                  db_partial.mutable_data_ptr<double>());
  });
  const auto param_dtype = w.defined() ? w.scalar_type() : input.scalar_type();
  return {dx, dw_partial.sum(0).to(param_dtype), db_partial.sum(0).to(param_dtype)};
}

}  // namespace

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
