// CUDA kernels of GroupNorm(+SiLU) (schemas and CPU kernels: csrc/group_norm.cpp; layouts:
// csrc/group_norm_common.h). The input is read where it is: planar layouts (contiguous, or SVD's permuted
// (B, C, F, H, W) view, through its strides) and channels_last in the forward; the backward copies
// channels_last input to planar.
//
// forward   1. partial_stats_kernel: each block takes a tile of one (sample, group) and sums x - K and
//              (x - K)^2 with K the group's first element (shifted data: sums the size of the spread, not of
//              the mean), -> the tile's count, mean and M2.                                     (reads x once)
//           2. combine_stats_kernel: one block per group merges its tiles (Chan et al.) -> mean, rstd.
//           3. normalize_kernel: y = (x - mean) * scale + shift, optional SiLU.     (reads x again, writes y once)
// backward  1. backward_partials_kernel: a tile is part of one channel of one (sample, group): block sums of
//              dxhat and dxhat * xhat (per group) and of dz * xhat and dz (per channel), each tile writing its
//              own slot; torch sums the slots. No atomics: dweight/dbias are deterministic.
//           2. backward_dx_kernel: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
//
// Addressing without per-element integer division: a tile is a range of 16-byte vectors of a group, whose
// position is kept as digits (d: channel, o: outer spatial index, c: vector within a contiguous run) that each
// thread advances by its constant step with two carries. Elementwise math is float (double for float64) with
// __expf and __fdividef in the float SiLU (relative error ~1e-7, far below the fp16/bf16 outputs' rounding).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "group_norm_common.h"
#include "launch_common.cuh"

namespace svd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;          // forward: 4 x 256 threads = 50% occupancy, <= 64 registers
constexpr int kBackwardMinBlocks = 2;  // backward (training only): two loaded tensors per element, <= 128 registers
constexpr int kUnroll = 4;                       // vectors in flight per thread
constexpr int64_t kTileVectors = 2 * kUnroll * kThreads;

// Elements per 16-byte access (1 when the layout does not allow it: see vector_width).
template <typename scalar_t>
constexpr int kVectorWidth = 16 / sizeof(scalar_t);

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

// The vectors of one (sample, group) (or, in the backward, of one channel of it) as three digits, d (slowest)
// o, c (fastest, vectors of V contiguous elements), and how a thread's cursor moves by kThreads vectors.
// Planar: d = channel, o = outer spatial index, c = vector in the contiguous run.
// Channels-last: d has size 1, o = spatial position (stride C), c = vector of V channels.
struct Walk {
  int64_t d_stride, o_stride;            // element strides of the digits (c's is V)
  int32_t d_size, o_size, c_size;
  int32_t step_d, step_o, step_c;        // kThreads vectors, in digits
  int64_t step_delta;                    // offset change of a step without carries
  int64_t carry_c_delta, carry_o_delta;  // offset change when c, then o, wrap
  int32_t vectors;                       // vectors in the walked range (a group, or one channel of it)
  int32_t tile_vectors;
  int32_t tiles;                         // per walked range
};

struct Cursor {
  int32_t d, o, c;
  int64_t offset;
};

Walk make_walk(int64_t d_size, int64_t d_stride, int64_t o_size, int64_t o_stride, int64_t c_size, int vector) {
  const int64_t vectors = d_size * o_size * c_size;
  // Margin: the loops test v + u * kThreads < end in 32 bits.
  TORCH_CHECK(vectors <= INT32_MAX - kUnroll * kThreads, "group_norm: a group of ", vectors * vector,
              " elements is too large for the CUDA kernels' 32-bit in-group indices");
  Walk w;
  w.d_stride = d_stride;
  w.o_stride = o_stride;
  w.d_size = static_cast<int32_t>(d_size);
  w.o_size = static_cast<int32_t>(o_size);
  w.c_size = static_cast<int32_t>(c_size);
  w.step_c = static_cast<int32_t>(kThreads % c_size);
  w.step_o = static_cast<int32_t>((kThreads / c_size) % o_size);
  w.step_d = static_cast<int32_t>(kThreads / (c_size * o_size));
  w.step_delta = w.step_c * int64_t(vector) + w.step_o * o_stride + w.step_d * d_stride;
  w.carry_c_delta = o_stride - c_size * vector;
  w.carry_o_delta = d_stride - o_size * o_stride;
  w.vectors = static_cast<int32_t>(vectors);
  w.tile_vectors = static_cast<int32_t>(std::min<int64_t>(kTileVectors, vectors));
  w.tiles = static_cast<int32_t>((vectors + w.tile_vectors - 1) / w.tile_vectors);
  return w;
}

// One 32-bit division per thread and kernel, not per element.
template <int V>
__device__ __forceinline__ Cursor cursor_at(const Walk& w, int32_t vector, int64_t base) {
  Cursor k;
  k.c = vector % w.c_size;
  const int32_t run = vector / w.c_size;
  k.o = run % w.o_size;
  k.d = run / w.o_size;
  k.offset = base + k.d * w.d_stride + k.o * w.o_stride + int64_t(k.c) * V;
  return k;
}

// c + step_c < 2 * c_size and o + step_o + 1 < 2 * o_size, so one conditional subtraction per digit suffices.
__device__ __forceinline__ void advance(const Walk& w, Cursor& k) {
  k.c += w.step_c;
  k.o += w.step_o;
  k.d += w.step_d;
  k.offset += w.step_delta;
  if (k.c >= w.c_size) {
    k.c -= w.c_size;
    k.o += 1;
    k.offset += w.carry_c_delta;
  }
  if (k.o >= w.o_size) {
    k.o -= w.o_size;
    k.d += 1;
    k.offset += w.carry_o_delta;
  }
}

// Where the (sample, group) rows start: planar strides, or channels_last (N, S, C).
struct GroupBase {
  int64_t batch_stride, channel_stride;
  int32_t num_groups, channels_per_group;
  __device__ __forceinline__ int64_t of(int64_t row) const {
    const int64_t n = row / num_groups, group = row % num_groups;
    return n * batch_stride + group * channels_per_group * channel_stride;
  }
};

// Conversions in the loops through the CUDA intrinsics on the raw bits: c10's BFloat16 conversions cost
// sm_90 register spills at the 64-register budget; these are one instruction each.
__device__ __forceinline__ float to_acc(c10::Half v) { return __half2float(__ushort_as_half(v.x)); }
__device__ __forceinline__ float to_acc(c10::BFloat16 v) { return __uint_as_float(uint32_t(v.x) << 16); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(at::opmath_type<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(__half_as_ushort(__float2half_rn(v)), c10::Half::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(v)), c10::BFloat16::from_bits());
  } else {
    return v;
  }
}

__device__ __forceinline__ float fast_silu(float z) { return __fdividef(z, 1.0f + __expf(-z)); }
__device__ __forceinline__ double fast_silu(double z) { return z / (1.0 + exp(-z)); }
__device__ __forceinline__ float sigmoid(float z) { return __fdividef(1.0f, 1.0f + __expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// Sum over the block, deterministic (fixed shuffle and shared-memory order); every thread gets the result.
// kValues sums at once share the barriers.
template <int kValues, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[kValues]) {
  __shared__ acc_t warp_sums[kValues][kThreads / 32];
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) warp_sums[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    acc_t total = 0;
#pragma unroll
    for (int j = 0; j < kThreads / 32; ++j) total += warp_sums[i][j];
    v[i] = total;
  }
  __syncthreads();  // warp_sums is reused by the next call
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

// Grid: rows * tiles blocks, tile fastest.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks) partial_stats_kernel(const scalar_t* __restrict__ x, GroupBase base,
                                                                 Walk w, at::opmath_type<scalar_t>* __restrict__ tile_count,
                                                                 at::opmath_type<scalar_t>* __restrict__ tile_mean,
                                                                 at::opmath_type<scalar_t>* __restrict__ tile_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x / w.tiles;
  const int32_t tile = blockIdx.x % w.tiles;
  const int64_t group_base = base.of(row);
  const acc_t pivot = static_cast<acc_t>(x[group_base]);
  const int32_t begin = tile * w.tile_vectors, end = min(begin + w.tile_vectors, w.vectors);
  Cursor k = cursor_at<V>(w, begin + threadIdx.x, group_base);
  acc_t sums[2] = {0, 0};  // x - pivot, (x - pivot)^2
  for (int32_t v = begin + threadIdx.x; v < end; v += kUnroll * kThreads) {
    Vec<scalar_t, V> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads < end) in[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(x + k.offset);
      advance(w, k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads >= end) break;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t shifted = to_acc(in[u].v[e]) - pivot;
        sums[0] += shifted;
        sums[1] += shifted * shifted;
      }
    }
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    const acc_t count = static_cast<acc_t>(end - begin) * V;
    const acc_t shift = sums[0] / count;
    tile_count[blockIdx.x] = count;
    tile_mean[blockIdx.x] = pivot + shift;
    tile_m2[blockIdx.x] = max(sums[1] - sums[0] * shift, acc_t(0));
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) combine_stats_kernel(const acc_t* __restrict__ tile_count,
                                                                 const acc_t* __restrict__ tile_mean,
                                                                 const acc_t* __restrict__ tile_m2, int32_t tiles,
                                                                 double eps, float* __restrict__ mean_out,
                                                                 float* __restrict__ rstd_out) {
  __shared__ acc_t s_count[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int64_t row = blockIdx.x;
  acc_t count = 0, mean = 0, m2 = 0;
  for (int32_t i = threadIdx.x; i < tiles; i += kThreads) {
    const int64_t k = row * tiles + i;
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
    rstd_out[row] = static_cast<float>(acc_t(1) / sqrt(s_m2[0] / s_count[0] + static_cast<acc_t>(eps)));
  }
}

// Dynamic shared memory: the group's per-channel scale = rstd * weight and shift = bias (2 * D values), so that
// the loop does one subtraction and one FMA per element whatever the layout.
template <typename scalar_t, int V, bool kChannelsLast, bool kSilu>
__global__ void __launch_bounds__(kThreads, kMinBlocks) normalize_kernel(const scalar_t* __restrict__ x, GroupBase base, Walk w,
                                                             const float* __restrict__ mean_in,
                                                             const float* __restrict__ rstd_in,
                                                             const scalar_t* __restrict__ weight,
                                                             const scalar_t* __restrict__ bias,
                                                             scalar_t* __restrict__ y) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* scale = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* shift = scale + base.channels_per_group;
  const int64_t row = blockIdx.x / w.tiles;
  const int32_t tile = blockIdx.x % w.tiles;
  const acc_t mean = mean_in[row], rstd = rstd_in[row];
  const int64_t first_channel = (row % base.num_groups) * base.channels_per_group;
  for (int32_t d = threadIdx.x; d < base.channels_per_group; d += kThreads) {
    scale[d] = weight ? rstd * static_cast<acc_t>(weight[first_channel + d]) : rstd;
    shift[d] = bias ? static_cast<acc_t>(bias[first_channel + d]) : acc_t(0);
  }
  __syncthreads();
  const int64_t group_base = base.of(row);
  const int32_t begin = tile * w.tile_vectors, end = min(begin + w.tile_vectors, w.vectors);
  Cursor k = cursor_at<V>(w, begin + threadIdx.x, group_base);
  for (int32_t v = begin + threadIdx.x; v < end; v += kUnroll * kThreads) {
    Vec<scalar_t, V> in[kUnroll];
    int64_t offset[kUnroll];
    int32_t channel[kUnroll];  // planar: the vector's channel; channels_last: its first channel
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      offset[u] = k.offset;
      channel[u] = kChannelsLast ? k.c * V : k.d;
      if (v + u * kThreads < end) in[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(x + k.offset);
      advance(w, k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads >= end) break;
      Vec<scalar_t, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int32_t d = kChannelsLast ? channel[u] + e : channel[u];
        acc_t z = (to_acc(in[u].v[e]) - mean) * scale[d] + shift[d];
        if constexpr (kSilu) z = fast_silu(z);
        out.v[e] = from_acc<scalar_t>(z);
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(y + offset[u]) = out;
    }
  }
}

// Backward tiles: one channel of one (sample, group) per walked range. Grid: rows * D * tiles blocks.
struct BackwardTile {
  int64_t row;
  int32_t d, tile;
};

__device__ __forceinline__ BackwardTile backward_tile(const Walk& w, int32_t channels_per_group) {
  const int64_t plane = blockIdx.x / w.tiles;
  return {plane / channels_per_group, static_cast<int32_t>(plane % channels_per_group),
          static_cast<int32_t>(blockIdx.x % w.tiles)};
}

// dz (gradient w.r.t. the affine output z, recomputed; dy without SiLU) and dxhat = dz * weight.
template <bool kSilu, typename acc_t>
__device__ __forceinline__ void grad_before_affine(acc_t dy, acc_t xhat, acc_t weight, acc_t bias, acc_t& dz,
                                                   acc_t& dxhat) {
  dz = dy;
  if constexpr (kSilu) {
    const acc_t z = xhat * weight + bias;
    const acc_t s = sigmoid(z);
    dz *= s * (acc_t(1) + z * (acc_t(1) - s));
  }
  dxhat = dz * weight;
}

// Writes per block: [0] sum dxhat, [1] sum dxhat * xhat, [2] sum dz * xhat, [3] sum dz, each an array of
// gridDim.x values laid out (N, G, D, tiles).
template <typename scalar_t, int V, bool kSilu>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks) backward_partials_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, GroupBase base, int64_t channel_stride, Walk w,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const BackwardTile t = backward_tile(w, base.channels_per_group);
  const int64_t channel = (t.row % base.num_groups) * base.channels_per_group + t.d;
  const acc_t mean = mean_in[t.row], rstd = rstd_in[t.row];
  const acc_t wt = weight ? static_cast<acc_t>(weight[channel]) : acc_t(1);
  const acc_t bs = bias ? static_cast<acc_t>(bias[channel]) : acc_t(0);
  const int32_t begin = t.tile * w.tile_vectors, end = min(begin + w.tile_vectors, w.vectors);
  Cursor k = cursor_at<V>(w, begin + threadIdx.x, base.of(t.row) + t.d * channel_stride);
  acc_t sums[4] = {0, 0, 0, 0};
  for (int32_t v = begin + threadIdx.x; v < end; v += kUnroll * kThreads) {
    Vec<scalar_t, V> xs[kUnroll], dys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads < end) {
        xs[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(x + k.offset);
        dys[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(dy + k.offset);
      }
      advance(w, k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads >= end) break;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t xhat = (to_acc(xs[u].v[e]) - mean) * rstd;
        acc_t dz, dxhat;
        grad_before_affine<kSilu>(to_acc(dys[u].v[e]), xhat, wt, bs, dz, dxhat);
        sums[0] += dxhat;
        sums[1] += dxhat * xhat;
        sums[2] += dz * xhat;
        sums[3] += dz;
      }
    }
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partials[i * int64_t(gridDim.x) + blockIdx.x] = sums[i];
  }
}

template <typename scalar_t, int V, bool kSilu>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks) backward_dx_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, GroupBase base, int64_t channel_stride, Walk w,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, const at::opmath_type<scalar_t>* __restrict__ mean_dxhat_in,
    const at::opmath_type<scalar_t>* __restrict__ mean_dxhat_xhat_in, scalar_t* __restrict__ dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const BackwardTile t = backward_tile(w, base.channels_per_group);
  const int64_t channel = (t.row % base.num_groups) * base.channels_per_group + t.d;
  const acc_t mean = mean_in[t.row], rstd = rstd_in[t.row];
  const acc_t mean_dxhat = mean_dxhat_in[t.row], mean_dxhat_xhat = mean_dxhat_xhat_in[t.row];
  const acc_t wt = weight ? static_cast<acc_t>(weight[channel]) : acc_t(1);
  const acc_t bs = bias ? static_cast<acc_t>(bias[channel]) : acc_t(0);
  const int32_t begin = t.tile * w.tile_vectors, end = min(begin + w.tile_vectors, w.vectors);
  Cursor k = cursor_at<V>(w, begin + threadIdx.x, base.of(t.row) + t.d * channel_stride);
  for (int32_t v = begin + threadIdx.x; v < end; v += kUnroll * kThreads) {
    Vec<scalar_t, V> xs[kUnroll], dys[kUnroll];
    int64_t offset[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      offset[u] = k.offset;
      if (v + u * kThreads < end) {
        xs[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(x + k.offset);
        dys[u] = *reinterpret_cast<const Vec<scalar_t, V>*>(dy + k.offset);
      }
      advance(w, k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kThreads >= end) break;
      Vec<scalar_t, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t xhat = (to_acc(xs[u].v[e]) - mean) * rstd;
        acc_t dz, dxhat;
        grad_before_affine<kSilu>(to_acc(dys[u].v[e]), xhat, wt, bs, dz, dxhat);
        out.v[e] = from_acc<scalar_t>(rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(dx + offset[u]) = out;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vectors need every run length, stride and base pointer to be a multiple of the vector.
template <typename scalar_t>
int vector_width(const GroupNormGeometry& geo, std::initializer_list<const void*> pointers) {
  constexpr int V = kVectorWidth<scalar_t>;
  bool ok = std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return aligned16(p); });
  if (geo.channels_last) {
    ok = ok && geo.channels_per_group % V == 0 && geo.channels % V == 0;
  } else {
    ok = ok && geo.inner % V == 0 && geo.outer_stride % V == 0 && geo.channel_stride % V == 0 &&
         geo.batch_stride % V == 0;
  }
  return ok ? V : 1;
}

GroupBase group_base(const GroupNormGeometry& geo) {
  TORCH_CHECK(geo.num_groups <= INT32_MAX && geo.channels_per_group <= INT32_MAX, "group_norm: too many channels");
  if (geo.channels_last)
    return {geo.spatial * geo.channels, 1, static_cast<int32_t>(geo.num_groups),
            static_cast<int32_t>(geo.channels_per_group)};
  return {geo.batch_stride, geo.channel_stride, static_cast<int32_t>(geo.num_groups),
          static_cast<int32_t>(geo.channels_per_group)};
}

// All vectors of one (sample, group).
Walk group_walk(const GroupNormGeometry& geo, int V) {
  if (geo.channels_last) return make_walk(1, 0, geo.spatial, geo.channels, geo.channels_per_group / V, V);
  return make_walk(geo.channels_per_group, geo.channel_stride, geo.outer, geo.outer_stride, geo.inner / V, V);
}

// All vectors of one channel of one (sample, group), planar layout.
Walk channel_walk(const GroupNormGeometry& geo, int V) {
  return make_walk(1, 0, geo.outer, geo.outer_stride, geo.inner / V, V);
}

// Per-channel scale/shift in dynamic shared memory: checked against the device only when above the default.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= launch::kDefaultSharedBytes) return;
  launch::check_shared_memory(static_cast<int64_t>(bytes), launch::current_device_limits(), "group_norm",
                              "the per-channel scale/shift (channels per group too large)");
  launch::allow_shared_memory(kernel, bytes);
}

// Calls body(std::integral_constant<int, V>{}) with V the vector width or 1.
template <typename scalar_t, typename Body>
void dispatch_vector(int width, Body&& body) {
  if (width == kVectorWidth<scalar_t>) {
    body(std::integral_constant<int, kVectorWidth<scalar_t>>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cuda(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const GroupNormGeometry geo = group_norm_geometry(input, num_groups);
  const at::Tensor x = group_norm_kernel_input(input, geo);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({geo.batch, num_groups}, x.options().dtype(at::kFloat));
  const int64_t rows = geo.batch * num_groups;
  TORCH_CHECK(rows <= INT32_MAX, "group_norm: too many (sample, group) pairs for one launch: ", rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int width = vector_width<scalar_t>(geo, {x.const_data_ptr(), y.const_data_ptr()});
    dispatch_vector<scalar_t>(width, [&](auto vector) {
      constexpr int V = decltype(vector)::value;
      const Walk walk = group_walk(geo, V);
      const GroupBase base = group_base(geo);
      const unsigned blocks = launch::grid_size(rows * walk.tiles, "group_norm");
      at::Tensor partial = at::empty({3, int64_t(blocks)}, x.options().dtype(acc_dtype(x.scalar_type())));
      acc_t* count = partial.mutable_data_ptr<acc_t>();
      partial_stats_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), base, walk,
                                                                         count, count + blocks, count + 2 * blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      combine_stats_kernel<acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          count, count + blocks, count + 2 * blocks, walk.tiles, eps, mean.mutable_data_ptr<float>(),
          rstd.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t shared_bytes = 2 * geo.channels_per_group * sizeof(acc_t);
      launch::dispatch_bool(geo.channels_last, [&](auto channels_last) {
        launch::dispatch_bool(silu, [&](auto with_silu) {
          const auto kernel = normalize_kernel<scalar_t, V, decltype(channels_last)::value, decltype(with_silu)::value>;
          allow_shared_memory(kernel, shared_bytes);
          kernel<<<blocks, kThreads, shared_bytes, stream>>>(
              x.const_data_ptr<scalar_t>(), base, walk, mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
              w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
              b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  check_group_norm_args(input, num_groups, weight, bias);
  check_group_norm_backward_args(grad_output, input, mean_in, rstd_in, num_groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  // The backward's tiles are per channel, which channels_last does not store contiguously: read a planar copy.
  const GroupNormGeometry input_geo = group_norm_geometry(input, num_groups);
  const at::Tensor x = input_geo.channels_last ? input.contiguous() : group_norm_kernel_input(input, input_geo);
  const GroupNormGeometry geo = group_norm_geometry(x, num_groups);
  const at::Tensor dy = group_norm_same_layout(grad_output, x);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  const int64_t rows = geo.batch * num_groups;
  at::Tensor partials;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w_ptr = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const int width = vector_width<scalar_t>(geo, {x.const_data_ptr(), dy.const_data_ptr(), dx.const_data_ptr()});
    dispatch_vector<scalar_t>(width, [&](auto vector) {
      constexpr int V = decltype(vector)::value;
      const Walk walk = channel_walk(geo, V);
      const GroupBase base = group_base(geo);
      const unsigned blocks = launch::grid_size(rows * geo.channels_per_group * walk.tiles, "group_norm");
      partials = at::empty({4, geo.batch, num_groups, geo.channels_per_group, walk.tiles},
                           x.options().dtype(acc_dtype(x.scalar_type())));
      launch::dispatch_bool(silu, [&](auto with_silu) {
        backward_partials_kernel<scalar_t, V, decltype(with_silu)::value><<<blocks, kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), base, geo.channel_stride, walk,
            mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), w_ptr, b_ptr,
            partials.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      // (2, N*G) means over each group's D*S elements, contiguous; torch's sums are deterministic.
      const at::Tensor group_means =
          partials.narrow(0, 0, 2).sum({3, 4}).div_(static_cast<double>(geo.channels_per_group * geo.spatial));
      const acc_t* mean_dxhat = group_means.const_data_ptr<acc_t>();
      launch::dispatch_bool(silu, [&](auto with_silu) {
        backward_dx_kernel<scalar_t, V, decltype(with_silu)::value><<<blocks, kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), base, geo.channel_stride, walk,
            mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), w_ptr, b_ptr, mean_dxhat, mean_dxhat + rows,
            dx.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // (N, G, D, tiles) -> (C,): sum over samples and tiles.
  const at::Tensor channel_sums = partials.narrow(0, 2, 2).flatten(2, 3).sum({1, 3});
  const auto param_dtype = w.defined() ? w.scalar_type() : input.scalar_type();
  const at::Tensor grad_input = input_geo.channels_last ? dx.contiguous(input.suggest_memory_format()) : dx;
  return {grad_input, channel_sums[0].to(param_dtype), channel_sums[1].to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CUDA, m) {
  m.impl("group_norm_forward", &group_norm_forward_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace svd_fast
