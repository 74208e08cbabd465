// CUDA kernels of GroupNorm(+SiLU) (schemas and CPU kernels: csrc/group_norm.cpp). Same split
// reduction as the Triton kernels (svd_fast/triton/group_norm.py): each (sample, group) is cut
// into tiles of tile_s spatial positions x all D channels of the group, one block per tile, so
// SVD's temporal norms (2.3M elements per group, 64 groups) still fill the GPU.
//
// forward   1. partial_stats_kernel: per tile count, mean and M2 (squared deviations from the tile's
//              own mean, so inputs far from zero keep their precision).
//           2. combine_stats_kernel: one block per group merges its tiles (Chan et al.) -> mean, rstd.
//           3. normalize_kernel: elementwise (x - mean) * rstd * weight + bias, optional SiLU.
// backward  1. backward_partials_kernel: per tile sums of dxhat, dxhat * xhat (per group) and of
//              dz * xhat, dz (per channel); summed over tiles with at::sum.
//           2. backward_dx_kernel: elementwise dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
// Loads are converted to the accumulation type (float for fp16/bf16/fp32, double for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "group_norm_common.h"

namespace svd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileElements = 4096;
constexpr int64_t kMaxTilesPerGroup = 65535;  // gridDim.y limit

// Addressing of one group's tile: element e of the tile is (channel d, spatial s) with the
// layout's fastest-varying index fastest, so consecutive threads touch consecutive addresses.
struct Layout {
  int64_t channels, spatial, channels_per_group, num_groups, tile_s;
  bool channels_last;
};

// In-tile indices are 32-bit (a tile holds ~kTileElements elements): 64-bit integer division
// is emulated on the GPU and would cost more than the memory access it addresses.
struct TileIndex {
  int64_t group_base;  // offset of (n, first channel of the group, s = 0)
  int64_t first_channel;
  int64_t s0;
  int32_t length;  // valid elements in this tile: spatial positions * D
  int32_t length_s;  // valid spatial positions in this tile
  int32_t channels_per_group;
};

__device__ inline TileIndex tile_index(const Layout& L, int64_t row, int64_t tile) {
  const int64_t n = row / L.num_groups, group = row % L.num_groups;
  TileIndex t;
  t.first_channel = group * L.channels_per_group;
  t.group_base = n * L.channels * L.spatial + (L.channels_last ? t.first_channel : t.first_channel * L.spatial);
  t.s0 = tile * L.tile_s;
  t.length_s = static_cast<int32_t>(std::min(L.tile_s, L.spatial - t.s0));
  t.channels_per_group = static_cast<int32_t>(L.channels_per_group);
  t.length = t.length_s * t.channels_per_group;
  return t;
}

// Memory offset and channel of element e of a tile.
__device__ inline void element(const Layout& L, const TileIndex& t, int32_t e, int64_t& offset, int64_t& channel) {
  int32_t d;
  if (L.channels_last) {
    d = e % t.channels_per_group;
    offset = t.group_base + (t.s0 + e / t.channels_per_group) * L.channels + d;
  } else {
    d = e / t.length_s;
    offset = t.group_base + d * L.spatial + t.s0 + e % t.length_s;
  }
  channel = t.first_channel + d;
}

__device__ inline float exp_acc(float v) { return expf(v); }
__device__ inline double exp_acc(double v) { return exp(v); }
__device__ inline float sqrt_acc(float v) { return sqrtf(v); }
__device__ inline double sqrt_acc(double v) { return sqrt(v); }

template <typename acc_t>
__device__ inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_acc(-z));
}

// Sum of v over the block; every thread gets the result. `shared` holds kThreads values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();  // shared is reused by the caller's next reduction
  return total;
}

// Chan et al.: merge (count_b, mean_b, m2_b) into (count, mean, m2).
template <typename acc_t>
__device__ inline void chan_merge(acc_t& count, acc_t& mean, acc_t& m2, acc_t count_b, acc_t mean_b, acc_t m2_b) {
  const acc_t merged = count + count_b;
  if (count_b == acc_t(0)) return;
  const acc_t delta = mean_b - mean;
  mean += delta * (count_b / merged);
  m2 += m2_b + delta * delta * (count * count_b / merged);
  count = merged;
}

template <typename scalar_t, typename acc_t>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, Layout L, acc_t* __restrict__ tile_count,
                                     acc_t* __restrict__ tile_mean, acc_t* __restrict__ tile_m2) {
  __shared__ acc_t shared[kThreads];
  const int64_t row = blockIdx.x, tile = blockIdx.y;
  const TileIndex t = tile_index(L, row, tile);
  int64_t offset, channel;
  acc_t sum = 0;
  for (int32_t e = threadIdx.x; e < t.length; e += kThreads) {
    element(L, t, e, offset, channel);
    sum += static_cast<acc_t>(x[offset]);
  }
  const acc_t count = static_cast<acc_t>(t.length);
  const acc_t mean = block_sum(sum, shared) / count;
  acc_t m2 = 0;
  for (int32_t e = threadIdx.x; e < t.length; e += kThreads) {
    element(L, t, e, offset, channel);
    const acc_t d = static_cast<acc_t>(x[offset]) - mean;
    m2 += d * d;
  }
  m2 = block_sum(m2, shared);
  if (threadIdx.x == 0) {
    const int64_t out = row * gridDim.y + tile;
    tile_count[out] = count;
    tile_mean[out] = mean;
    tile_m2[out] = m2;
  }
}

template <typename acc_t>
__global__ void combine_stats_kernel(const acc_t* __restrict__ tile_count, const acc_t* __restrict__ tile_mean,
                                     const acc_t* __restrict__ tile_m2, int64_t num_tiles, double eps,
                                     float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  __shared__ acc_t s_count[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int64_t row = blockIdx.x;
  acc_t count = 0, mean = 0, m2 = 0;
  for (int64_t i = threadIdx.x; i < num_tiles; i += kThreads) {
    const int64_t k = row * num_tiles + i;
    chan_merge(count, mean, m2, tile_count[k], tile_mean[k], tile_m2[k]);
  }
  s_count[threadIdx.x] = count;
  s_mean[threadIdx.x] = mean;
  s_m2[threadIdx.x] = m2;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int other = threadIdx.x + stride;
      chan_merge(s_count[threadIdx.x], s_mean[threadIdx.x], s_m2[threadIdx.x], s_count[other], s_mean[other],
                 s_m2[other]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean_out[row] = static_cast<float>(s_mean[0]);
    rstd_out[row] = static_cast<float>(acc_t(1) / sqrt_acc(s_m2[0] / s_count[0] + static_cast<acc_t>(eps)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, Layout L, const float* __restrict__ mean_in,
                                 const float* __restrict__ rstd_in, const scalar_t* __restrict__ weight,
                                 const scalar_t* __restrict__ bias, bool silu, scalar_t* __restrict__ y) {
  const int64_t row = blockIdx.x;
  const TileIndex t = tile_index(L, row, blockIdx.y);
  const acc_t mean = mean_in[row], rstd = rstd_in[row];
  int64_t offset, channel;
  for (int32_t e = threadIdx.x; e < t.length; e += kThreads) {
    element(L, t, e, offset, channel);
    acc_t z = (static_cast<acc_t>(x[offset]) - mean) * rstd;
    if (weight) z *= static_cast<acc_t>(weight[channel]);
    if (bias) z += static_cast<acc_t>(bias[channel]);
    if (silu) z *= sigmoid(z);
    y[offset] = static_cast<scalar_t>(z);
  }
}

// dz (gradient w.r.t. the affine output z, recomputed from xhat; dy without SiLU) and dxhat.
template <typename scalar_t, typename acc_t>
__device__ inline void grad_before_affine(acc_t dy, acc_t xhat, const scalar_t* weight, const scalar_t* bias,
                                          int64_t channel, bool silu, acc_t& dz, acc_t& dxhat) {
  const acc_t w = weight ? static_cast<acc_t>(weight[channel]) : acc_t(1);
  dz = dy;
  if (silu) {
    const acc_t z = xhat * w + (bias ? static_cast<acc_t>(bias[channel]) : acc_t(0));
    const acc_t s = sigmoid(z);
    dz *= s * (acc_t(1) + z * (acc_t(1) - s));
  }
  dxhat = dz * w;
}

// Dynamic shared memory: kThreads values for block_sum, then 2 * D per-channel sums.
template <typename scalar_t, typename acc_t>
__global__ void backward_partials_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, Layout L,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                         bool silu, acc_t* __restrict__ sum_dxhat_out,
                                         acc_t* __restrict__ sum_dxhat_xhat_out, acc_t* __restrict__ dweight_partial,
                                         acc_t* __restrict__ dbias_partial) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* channel_dw = shared + kThreads;
  acc_t* channel_db = channel_dw + L.channels_per_group;
  for (int64_t d = threadIdx.x; d < L.channels_per_group; d += kThreads) channel_dw[d] = channel_db[d] = acc_t(0);
  __syncthreads();
  const int64_t row = blockIdx.x, tile = blockIdx.y;
  const TileIndex t = tile_index(L, row, tile);
  const acc_t mean = mean_in[row], rstd = rstd_in[row];
  acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
  // Each thread keeps the running dweight/dbias sums of its current channel and adds them to
  // shared memory only when its channel changes: a thread's channel changes rarely in the
  // contiguous layout, so the block does ~D atomics per thread instead of one per element.
  int64_t held = -1;
  acc_t held_dw = 0, held_db = 0;
  int64_t offset, channel;
  for (int32_t e = threadIdx.x; e < t.length; e += kThreads) {
    element(L, t, e, offset, channel);
    const acc_t xhat = (static_cast<acc_t>(x[offset]) - mean) * rstd;
    acc_t dz, dxhat;
    grad_before_affine(static_cast<acc_t>(dy[offset]), xhat, weight, bias, channel, silu, dz, dxhat);
    sum_dxhat += dxhat;
    sum_dxhat_xhat += dxhat * xhat;
    const int64_t local = channel - t.first_channel;
    if (local != held) {
      if (held >= 0) {
        atomicAdd(&channel_dw[held], held_dw);
        atomicAdd(&channel_db[held], held_db);
      }
      held = local;
      held_dw = held_db = 0;
    }
    held_dw += dz * xhat;
    held_db += dz;
  }
  if (held >= 0) {
    atomicAdd(&channel_dw[held], held_dw);
    atomicAdd(&channel_db[held], held_db);
  }
  sum_dxhat = block_sum(sum_dxhat, shared);
  sum_dxhat_xhat = block_sum(sum_dxhat_xhat, shared);  // block_sum's barriers also order the atomics above
  const int64_t out = row * gridDim.y + tile;
  if (threadIdx.x == 0) {
    sum_dxhat_out[out] = sum_dxhat;
    sum_dxhat_xhat_out[out] = sum_dxhat_xhat;
  }
  // Per-channel partials laid out (N, tiles, C): summed over N and tiles afterwards.
  const int64_t n = row / L.num_groups;
  acc_t* dw_row = dweight_partial + (n * gridDim.y + tile) * L.channels + t.first_channel;
  acc_t* db_row = dbias_partial + (n * gridDim.y + tile) * L.channels + t.first_channel;
  for (int64_t d = threadIdx.x; d < L.channels_per_group; d += kThreads) {
    dw_row[d] = channel_dw[d];
    db_row[d] = channel_db[d];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_dx_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, Layout L,
                                   const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                   const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, bool silu,
                                   const acc_t* __restrict__ mean_dxhat_in,
                                   const acc_t* __restrict__ mean_dxhat_xhat_in, scalar_t* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const TileIndex t = tile_index(L, row, blockIdx.y);
  const acc_t mean = mean_in[row], rstd = rstd_in[row];
  const acc_t mean_dxhat = mean_dxhat_in[row], mean_dxhat_xhat = mean_dxhat_xhat_in[row];
  int64_t offset, channel;
  for (int32_t e = threadIdx.x; e < t.length; e += kThreads) {
    element(L, t, e, offset, channel);
    const acc_t xhat = (static_cast<acc_t>(x[offset]) - mean) * rstd;
    acc_t dz, dxhat;
    grad_before_affine(static_cast<acc_t>(dy[offset]), xhat, weight, bias, channel, silu, dz, dxhat);
    dx[offset] = static_cast<scalar_t>(rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
  }
}

Layout make_layout(const GroupNormGeometry& geo) {
  Layout L;
  L.channels = geo.channels;
  L.spatial = geo.spatial;
  L.channels_per_group = geo.channels_per_group;
  L.num_groups = geo.num_groups;
  L.channels_last = geo.channels_last;
  const int64_t min_tile_s = (geo.spatial + kMaxTilesPerGroup - 1) / kMaxTilesPerGroup;
  L.tile_s = std::max<int64_t>({int64_t(1), kTileElements / geo.channels_per_group, min_tile_s});
  L.tile_s = std::min(L.tile_s, geo.spatial);
  TORCH_CHECK(L.tile_s * geo.channels_per_group <= INT32_MAX, "group_norm: a group of ",
              geo.channels_per_group * geo.spatial, " elements is too large for the CUDA kernels' 32-bit tile indices");
  return L;
}

dim3 tile_grid(const GroupNormGeometry& geo, const Layout& L) {
  const int64_t rows = geo.batch * geo.num_groups;
  TORCH_CHECK(rows <= INT32_MAX, "group_norm: too many (sample, group) pairs for one launch: ", rows);
  const int64_t tiles = (geo.spatial + L.tile_s - 1) / L.tile_s;
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
}

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cuda(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const GroupNormGeometry geo = group_norm_geometry(input, num_groups);
  const Layout L = make_layout(geo);
  const dim3 grid = tile_grid(geo, L);
  const at::Tensor x = input.contiguous(geo.memory_format);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x, x.options(), geo.memory_format);
  at::Tensor mean = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({3, int64_t(grid.x), int64_t(grid.y)}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* count = partial.mutable_data_ptr<acc_t>();
    acc_t* tile_mean = count + partial.size(1) * partial.size(2);
    acc_t* tile_m2 = tile_mean + partial.size(1) * partial.size(2);
    partial_stats_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), L, count,
                                                                         tile_mean, tile_m2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_stats_kernel<acc_t><<<grid.x, kThreads, 0, stream>>>(count, tile_mean, tile_m2, grid.y, eps,
                                                                 mean.mutable_data_ptr<float>(),
                                                                 rstd.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), L, mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
        w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        silu, y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  check_group_norm_backward_args(grad_output, input, mean_in, rstd_in, num_groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const GroupNormGeometry geo = group_norm_geometry(input, num_groups);
  const Layout L = make_layout(geo);
  const dim3 grid = tile_grid(geo, L);
  const at::Tensor x = input.contiguous(geo.memory_format);
  const at::Tensor dy = grad_output.contiguous(geo.memory_format);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x, x.options(), geo.memory_format);
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor group_partials = at::empty({2, int64_t(grid.x), int64_t(grid.y)}, acc_options);
  at::Tensor channel_partials = at::empty({2, geo.batch, int64_t(grid.y), geo.channels}, acc_options);
  at::Tensor group_means;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w_ptr = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    acc_t* sum_dxhat = group_partials.mutable_data_ptr<acc_t>();
    acc_t* sum_dxhat_xhat = sum_dxhat + group_partials.size(1) * group_partials.size(2);
    acc_t* dweight_partial = channel_partials.mutable_data_ptr<acc_t>();
    acc_t* dbias_partial = dweight_partial + channel_partials[0].numel();
    const size_t shared_bytes = (kThreads + 2 * geo.channels_per_group) * sizeof(acc_t);
    backward_partials_kernel<scalar_t, acc_t><<<grid, kThreads, shared_bytes, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), L, mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), w_ptr, b_ptr, silu, sum_dxhat, sum_dxhat_xhat, dweight_partial,
        dbias_partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // (2, N*G) means over each group's D*S elements, contiguous.
    group_means = group_partials.sum(2).div_(static_cast<double>(geo.channels_per_group * geo.spatial));
    const acc_t* mean_dxhat = group_means.const_data_ptr<acc_t>();
    backward_dx_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), L, mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), w_ptr, b_ptr, silu, mean_dxhat, mean_dxhat + group_means.size(1),
        dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto param_dtype = w.defined() ? w.scalar_type() : input.scalar_type();
  return {dx, channel_partials[0].sum({0, 1}).to(param_dtype), channel_partials[1].sum({0, 1}).to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CUDA, m) {
  m.impl("group_norm_forward", &group_norm_forward_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace svd_fast
