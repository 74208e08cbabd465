// CUDA kernels of the fused temporal attention (schemas and CPU kernels: csrc/temporal_attention.cpp;
// contract: q, k, v (B*F, S, H*D) with any strides, out contiguous in the input dtype, lse float32 (B*F, S, H)).
//
// One warp per position (b, s, h); consecutive warps take consecutive flattened positions p = s*H + h of one
// video, so their loads of a frame row are adjacent in memory. A warp reads its F x D tiles of q, k, v (and
// grad_out for the backward) exactly once, converts them to float32 and keeps them in shared memory; every
// output element is written exactly once. Within a warp two lane mappings alternate:
//   - lanes over key frames j (j = lane, lane + 32): each lane computes whole dot products q_i . k_j from
//     shared memory with float4 reads, so the F x F scores need no warp reductions; the softmax over j is a
//     warp max and a warp sum.
//   - lanes over channels d (d = lane + 32c, c < kDimsPerLane): the weighted sums over frames
//     (out_i = sum_j P_ij v_j, the gradients), accumulated in registers and stored straight to global memory.
// Both mappings work on blocks of kRowBlock rows at once, so each shared-memory read of a k/v row feeds
// kRowBlock rows of arithmetic. All arithmetic is float32; float64 is left to the other backends.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "temporal_attention_common.h"

namespace svd_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxFrames = 64;     // two key frames per lane at most
constexpr int kMaxHeadDim = 128;   // four channels per lane at most
constexpr int kRowBlock = 4;       // rows per register block; one float4 of probabilities per frame
static_assert(kRowBlock == 4, "the row blocks are read and written as one float4 (.x .y .z .w)");
constexpr int kMaxWarpsPerBlock = 4;
constexpr int kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in

// Shape of one warp's float32 tiles in shared memory. Every tile and row starts at a multiple of 4 floats
// (16 bytes) so rows can be read as float4.
struct TileLayout {
  int frames;       // F
  int head_dim;     // D
  int padded_dim;   // D rounded up to 4; the columns D..padded_dim-1 hold zeros, so float4 dot products are exact
  int row_stride;   // floats from one frame's row to the next: padded_dim/4 rounded up to an ODD number of float4s,
                    // so lanes j reading row j as float4 hit distinct banks (conflict-free)
  int frames4;      // F rounded up to 4: row length of the F x F probability matrices of the backward
};

// The flattened positions (b, p = s*H + h) the warps walk through.
struct PositionGrid {
  int64_t total;      // B * S * H
  int64_t per_video;  // S * H
  int64_t heads;      // H
};

TileLayout make_tile_layout(const TemporalAttentionGeometry& g) {
  TileLayout t;
  t.frames = static_cast<int>(g.frames);
  t.head_dim = static_cast<int>(g.head_dim);
  t.padded_dim = (t.head_dim + 3) / 4 * 4;
  t.row_stride = ((t.padded_dim / 4) | 1) * 4;
  t.frames4 = (t.frames + 3) / 4 * 4;
  return t;
}

PositionGrid make_position_grid(const TemporalAttentionGeometry& g) {
  return {g.batch * g.positions * g.heads, g.positions * g.heads, g.heads};
}

// Floats of shared memory one warp needs.
int64_t forward_warp_floats(const TileLayout& t) {
  return 3 * int64_t(t.frames) * t.row_stride  // q, k, v tiles
         + int64_t(t.frames4) * kRowBlock;    // probabilities of one row block, [j][r]
}

int64_t backward_warp_floats(const TileLayout& t) {
  return 4 * int64_t(t.frames) * t.row_stride     // q, k, v, grad_out tiles
         + 2 * int64_t(t.frames) * t.frames4      // P and dS, [i][j]
         + 2 * int64_t(t.frames4);                // lse_i and Delta_i
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// Offset of (b, frame 0, s, h, channel 0) in a tensor with strides st.
__device__ __forceinline__ int64_t position_base(const TemporalStrides& st, const TileLayout& t, int64_t b, int64_t s,
                                                 int64_t h) {
  return b * t.frames * st.row + s * st.position + h * t.head_dim * st.channel;
}

// Copies the F x D tile of one position into shared memory as float32, zero-filling columns D..padded_dim-1.
template <int kDimsPerLane, typename scalar_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, const TemporalStrides& st,
                                          int64_t base, const TileLayout& t, int lane, float* tile) {
#pragma unroll 4
  for (int f = 0; f < t.frames; ++f) {
    const scalar_t* row = src + base + f * st.row;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < t.padded_dim)
        tile[f * t.row_stride + d] = d < t.head_dim ? static_cast<float>(row[d * st.channel]) : 0.0f;
    }
  }
}

// Contiguous (B*F, S, H*D) output: element (b, f, p, d) is at ((b*F + f) * S*H + p) * D + d.
__device__ __forceinline__ int64_t output_offset(const PositionGrid& grid, const TileLayout& t, int64_t b, int64_t p,
                                                 int f) {
  return ((b * t.frames + f) * grid.per_video + p) * t.head_dim;
}

// dst[frames f0 .. f0+kRowBlock-1 of this position] = acc, masked to f < F and d < D.
template <int kDimsPerLane, typename scalar_t>
__device__ __forceinline__ void store_rows(const float (&acc)[kRowBlock][kDimsPerLane], const PositionGrid& grid,
                                           const TileLayout& t, int64_t b, int64_t p, int f0, int lane,
                                           scalar_t* __restrict__ dst) {
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) {
    if (f0 + r >= t.frames) break;
    scalar_t* row = dst + output_offset(grid, t, b, p, f0 + r);
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < t.head_dim) row[d] = static_cast<scalar_t>(acc[r][c]);
    }
  }
}

// For key frame j (one lane) and the query rows i0 .. i0+kRowBlock-1: acc[r] += a_{i0+r} . b_j over the padded
// row. Query rows past F are clamped to F-1: their results are computed but never used.
__device__ __forceinline__ void row_block_dots(const float* a_tile, const float* b_row, const TileLayout& t, int i0,
                                               float (&acc)[kRowBlock]) {
  const float* a_rows[kRowBlock];
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) a_rows[r] = a_tile + min(i0 + r, t.frames - 1) * t.row_stride;
#pragma unroll 4
  for (int d = 0; d < t.padded_dim; d += 4) {
    const float4 bv = load4(b_row + d);
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) acc[r] += dot4(load4(a_rows[r] + d), bv);
  }
}

// Dynamic shared memory, 16-byte aligned for the float4 reads.
__device__ __forceinline__ float* warp_shared(int64_t warp_floats) {
  extern __shared__ float4 shared_tiles[];
  return reinterpret_cast<float*>(shared_tiles) + (threadIdx.x / kWarpSize) * warp_floats;
}

template <typename scalar_t, int kDimsPerLane>
__global__ void temporal_attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                                  const scalar_t* __restrict__ v, TemporalStrides qs,
                                                  TemporalStrides ks, TemporalStrides vs, PositionGrid grid,
                                                  TileLayout t, int64_t warp_floats, float scale,
                                                  scalar_t* __restrict__ out, float* __restrict__ lse) {
  const int64_t position = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (position >= grid.total) return;  // whole warps leave together: the shuffles below keep full masks
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = position / grid.per_video, p = position % grid.per_video;
  const int64_t s = p / grid.heads, h = p % grid.heads;

  float* q_tile = warp_shared(warp_floats);
  float* k_tile = q_tile + t.frames * t.row_stride;
  float* v_tile = k_tile + t.frames * t.row_stride;
  float* probs = v_tile + t.frames * t.row_stride;  // [j][r]: P_{i0+r, j} of the current row block
  load_tile<kDimsPerLane>(q, qs, position_base(qs, t, b, s, h), t, lane, q_tile);
  load_tile<kDimsPerLane>(k, ks, position_base(ks, t, b, s, h), t, lane, k_tile);
  load_tile<kDimsPerLane>(v, vs, position_base(vs, t, b, s, h), t, lane, v_tile);
  __syncwarp();

  for (int i0 = 0; i0 < t.frames; i0 += kRowBlock) {
    // Scores of rows i0.. against key frames j = lane, lane + 32 (-inf where j >= F).
    float scores[2][kRowBlock];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = lane + half * kWarpSize;
      float acc[kRowBlock] = {};
      if (j < t.frames) row_block_dots(q_tile, k_tile + j * t.row_stride, t, i0, acc);
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) scores[half][r] = j < t.frames ? scale * acc[r] : -INFINITY;
    }
    // Softmax over j per row, with max subtraction; frame 0 is always valid, so the max is finite.
    float p_of_row[2][kRowBlock];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
      const float row_max = warp_max(fmaxf(scores[0][r], scores[1][r]));
      float e[2];
#pragma unroll
      for (int half = 0; half < 2; ++half)
        e[half] = lane + half * kWarpSize < t.frames ? expf(scores[half][r] - row_max) : 0.0f;
      const float sum = warp_sum(e[0] + e[1]);
      p_of_row[0][r] = e[0] / sum;
      p_of_row[1][r] = e[1] / sum;
      const int i = i0 + r;
      if (lane == 0 && i < t.frames) lse[(b * t.frames + i) * grid.per_video + p] = row_max + logf(sum);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = lane + half * kWarpSize;
      if (j < t.frames)
        *reinterpret_cast<float4*>(probs + j * kRowBlock) =
            make_float4(p_of_row[half][0], p_of_row[half][1], p_of_row[half][2], p_of_row[half][3]);
    }
    __syncwarp();
    // out_i = sum_j P_ij v_j, lanes over channels.
    float acc[kRowBlock][kDimsPerLane] = {};
    for (int j = 0; j < t.frames; ++j) {
      const float4 pj = load4(probs + j * kRowBlock);
      const float* v_row = v_tile + j * t.row_stride;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) {
        const int d = lane + c * kWarpSize;
        const float vd = d < t.head_dim ? v_row[d] : 0.0f;
        acc[0][c] += pj.x * vd;
        acc[1][c] += pj.y * vd;
        acc[2][c] += pj.z * vd;
        acc[3][c] += pj.w * vd;
      }
    }
    store_rows<kDimsPerLane>(acc, grid, t, b, p, i0, lane, out);
    __syncwarp();  // probs is rewritten by the next row block
  }
}

template <typename scalar_t, int kDimsPerLane>
__global__ void temporal_attention_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ out, const float* __restrict__ lse,
    TemporalStrides gs, TemporalStrides qs, TemporalStrides ks, TemporalStrides vs, TemporalStrides os,
    PositionGrid grid, TileLayout t, int64_t warp_floats, float scale, scalar_t* __restrict__ grad_q,
    scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v) {
  const int64_t position = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (position >= grid.total) return;  // whole warps leave together: the shuffles below keep full masks
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = position / grid.per_video, p = position % grid.per_video;
  const int64_t s = p / grid.heads, h = p % grid.heads;

  float* q_tile = warp_shared(warp_floats);
  float* k_tile = q_tile + t.frames * t.row_stride;
  float* v_tile = k_tile + t.frames * t.row_stride;
  float* do_tile = v_tile + t.frames * t.row_stride;
  float* probs = do_tile + t.frames * t.row_stride;  // [i][j] = P_ij
  float* dscores = probs + t.frames * t.frames4;     // [i][j] = scale * dS_ij
  float* row_lse = dscores + t.frames * t.frames4;
  float* delta = row_lse + t.frames4;                // Delta_i = grad_out_i . out_i
  load_tile<kDimsPerLane>(q, qs, position_base(qs, t, b, s, h), t, lane, q_tile);
  load_tile<kDimsPerLane>(k, ks, position_base(ks, t, b, s, h), t, lane, k_tile);
  load_tile<kDimsPerLane>(v, vs, position_base(vs, t, b, s, h), t, lane, v_tile);
  load_tile<kDimsPerLane>(grad_out, gs, position_base(gs, t, b, s, h), t, lane, do_tile);
  for (int f = lane; f < t.frames; f += kWarpSize) row_lse[f] = lse[(b * t.frames + f) * grid.per_video + p];
  __syncwarp();
  // Delta_i from out (read once, never stored) and the grad_out tile.
  const int64_t out_base = position_base(os, t, b, s, h);
  for (int i = 0; i < t.frames; ++i) {
    const scalar_t* out_row = out + out_base + i * os.row;
    float partial = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < t.head_dim) partial += do_tile[i * t.row_stride + d] * static_cast<float>(out_row[d * os.channel]);
    }
    const float total = warp_sum(partial);
    if (lane == 0) delta[i] = total;
  }
  __syncwarp();

  // P_ij = exp(scale q_i.k_j - lse_i), scale * dS_ij = scale * P_ij (grad_out_i.v_j - Delta_i); lanes over j.
  for (int i0 = 0; i0 < t.frames; i0 += kRowBlock) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = lane + half * kWarpSize;
      if (j >= t.frames4) continue;
      if (j >= t.frames) {  // zero padding columns: the float4 reads below cover them
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) {
          if (i0 + r < t.frames) probs[(i0 + r) * t.frames4 + j] = dscores[(i0 + r) * t.frames4 + j] = 0.0f;
        }
        continue;
      }
      float qk[kRowBlock] = {}, dov[kRowBlock] = {};
      row_block_dots(q_tile, k_tile + j * t.row_stride, t, i0, qk);
      row_block_dots(do_tile, v_tile + j * t.row_stride, t, i0, dov);
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) {
        const int i = i0 + r;
        if (i >= t.frames) break;
        const float prob = expf(scale * qk[r] - row_lse[i]);
        probs[i * t.frames4 + j] = prob;
        dscores[i * t.frames4 + j] = scale * prob * (dov[r] - delta[i]);
      }
    }
  }
  __syncwarp();

  // grad_v_j = sum_i P_ij grad_out_i and grad_k_j = sum_i scale dS_ij q_i for key frames j0..j0+3;
  // lanes over channels. j0 is a multiple of 4 and rows are frames4 long, so the float4 reads are aligned.
  for (int j0 = 0; j0 < t.frames; j0 += kRowBlock) {
    float acc_v[kRowBlock][kDimsPerLane] = {}, acc_k[kRowBlock][kDimsPerLane] = {};
    for (int i = 0; i < t.frames; ++i) {
      const float4 pi = load4(probs + i * t.frames4 + j0);
      const float4 dsi = load4(dscores + i * t.frames4 + j0);
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) {
        const int d = lane + c * kWarpSize;
        const float gd = d < t.head_dim ? do_tile[i * t.row_stride + d] : 0.0f;
        const float qd = d < t.head_dim ? q_tile[i * t.row_stride + d] : 0.0f;
        acc_v[0][c] += pi.x * gd;
        acc_v[1][c] += pi.y * gd;
        acc_v[2][c] += pi.z * gd;
        acc_v[3][c] += pi.w * gd;
        acc_k[0][c] += dsi.x * qd;
        acc_k[1][c] += dsi.y * qd;
        acc_k[2][c] += dsi.z * qd;
        acc_k[3][c] += dsi.w * qd;
      }
    }
    store_rows<kDimsPerLane>(acc_v, grid, t, b, p, j0, lane, grad_v);
    store_rows<kDimsPerLane>(acc_k, grid, t, b, p, j0, lane, grad_k);
  }

  // grad_q_i = sum_j scale dS_ij k_j for query frames i0..i0+3 (rows past F clamped, never stored).
  for (int i0 = 0; i0 < t.frames; i0 += kRowBlock) {
    const float* ds_rows[kRowBlock];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) ds_rows[r] = dscores + min(i0 + r, t.frames - 1) * t.frames4;
    float acc_q[kRowBlock][kDimsPerLane] = {};
    for (int j = 0; j < t.frames; ++j) {
      float ds[kRowBlock];
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) ds[r] = ds_rows[r][j];
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) {
        const int d = lane + c * kWarpSize;
        const float kd = d < t.head_dim ? k_tile[j * t.row_stride + d] : 0.0f;
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) acc_q[r][c] += ds[r] * kd;
      }
    }
    store_rows<kDimsPerLane>(acc_q, grid, t, b, p, i0, lane, grad_q);
  }
}

void check_cuda_support(const at::Tensor& q, const TemporalAttentionGeometry& g, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float16 and bfloat16, got ", q.scalar_type(),
              " (float64 runs on the other backends)");
  TORCH_CHECK(g.frames <= kMaxFrames, op, ": the CUDA kernel supports num_frames <= ", kMaxFrames, ", got ",
              g.frames);
  TORCH_CHECK(g.head_dim <= kMaxHeadDim, op, ": the CUDA kernel supports head_dim = H*D / num_heads <= ",
              kMaxHeadDim, ", got ", g.head_dim);
}

// Launch shape: warps per block (as many as fit, up to kMaxWarpsPerBlock) and the dynamic shared memory.
struct LaunchShape {
  unsigned blocks;
  int warps;
  size_t shared_bytes;
};

LaunchShape launch_shape(int64_t total_positions, int64_t warp_floats, const char* op) {
  int device = 0, max_shared = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t warp_bytes = warp_floats * int64_t(sizeof(float));
  TORCH_CHECK(warp_bytes <= max_shared, op, ": one position needs ", warp_bytes,
              " bytes of shared memory (num_frames and head_dim too large together), the device allows ",
              max_shared, " per block");
  const int warps = static_cast<int>(std::min<int64_t>(kMaxWarpsPerBlock, max_shared / warp_bytes));
  const int64_t blocks = (total_positions + warps - 1) / warps;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many positions B*S*H = ", total_positions, " for one launch");
  return {static_cast<unsigned>(blocks), warps, static_cast<size_t>(warps * warp_bytes)};
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSharedBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Calls body(scalar_t{}) for the three supported dtypes (check_cuda_support rejects the others first).
template <typename Body>
void dispatch_dtype(at::ScalarType dtype, Body&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(at::Half{}); break;
    case at::kBFloat16: body(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "temporal_attention: unsupported dtype ", dtype, " in the CUDA kernel");
  }
}

// Calls body(std::integral_constant<int, ceil(D/32)>{}) so the channels per lane are a compile-time constant.
template <typename Body>
void dispatch_dims_per_lane(int64_t head_dim, Body&& body) {
  switch ((head_dim + kWarpSize - 1) / kWarpSize) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    default: body(std::integral_constant<int, 4>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, int64_t num_frames,
                                                                   int64_t num_heads, double scale) {
  const TemporalAttentionGeometry g = temporal_attention_geometry(q, k, v, num_frames, num_heads);
  check_cuda_support(q, g, "temporal_attention_forward");
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), g.positions, g.heads}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const TileLayout t = make_tile_layout(g);
  const PositionGrid grid = make_position_grid(g);
  const int64_t warp_floats = forward_warp_floats(t);
  const LaunchShape launch = launch_shape(grid.total, warp_floats, "temporal_attention_forward");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    dispatch_dims_per_lane(g.head_dim, [&](auto dims_per_lane) {
      const auto kernel = temporal_attention_forward_kernel<scalar_t, decltype(dims_per_lane)::value>;
      allow_shared_memory(kernel, launch.shared_bytes);
      kernel<<<launch.blocks, launch.warps * kWarpSize, launch.shared_bytes, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          temporal_strides(q), temporal_strides(k), temporal_strides(v), grid, t, warp_floats,
          static_cast<float>(scale), out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_frames, int64_t num_heads, double scale) {
  const TemporalAttentionGeometry g = temporal_attention_geometry(q, k, v, num_frames, num_heads);
  check_temporal_tensor(grad_out, "grad_out", q);
  check_temporal_tensor(out, "out", q);
  check_temporal_lse(lse, q, g);
  check_cuda_support(q, g, "temporal_attention_backward");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = at::empty_like(grad_q);
  at::Tensor grad_v = at::empty_like(grad_q);
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  const TileLayout t = make_tile_layout(g);
  const PositionGrid grid = make_position_grid(g);
  const int64_t warp_floats = backward_warp_floats(t);
  const LaunchShape launch = launch_shape(grid.total, warp_floats, "temporal_attention_backward");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    dispatch_dims_per_lane(g.head_dim, [&](auto dims_per_lane) {
      const auto kernel = temporal_attention_backward_kernel<scalar_t, decltype(dims_per_lane)::value>;
      allow_shared_memory(kernel, launch.shared_bytes);
      kernel<<<launch.blocks, launch.warps * kWarpSize, launch.shared_bytes, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<float>(),
          temporal_strides(grad_out), temporal_strides(q), temporal_strides(k), temporal_strides(v),
          temporal_strides(out), grid, t, warp_floats, static_cast<float>(scale), grad_q.mutable_data_ptr<scalar_t>(),
          grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CUDA, m) {
  m.impl("temporal_attention_forward", &temporal_attention_forward_cuda);
  m.impl("temporal_attention_backward", &temporal_attention_backward_cuda);
}

}  // namespace svd_fast
