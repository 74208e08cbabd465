// CUDA kernels of the fused temporal attention (schemas and CPU kernels: csrc/temporal_attention.cpp;
// contract: q, k, v (B*F, S, H*D) with any strides, out contiguous in the input dtype, lse float32 (B*F, S, H)).
//
// Tiles live in shared memory in the input dtype (fp16/bf16/fp32), read from global memory once with 16-byte
// vector loads when the strides allow (the q/k/v slices of a fused QKV projection do); all arithmetic is float32
// and the softmax is exact (max-subtracted, over all F frames at once). Consecutive blocks take consecutive
// flattened positions p = s*H + h of one video, so their loads of a frame row are adjacent in memory.
//
// Forward: a block of kBlockWarps warps takes `positions_per_block` positions (2 when shared memory allows the
// occupancy target, else 1). The block loads the K and V tiles (F x D) of its positions once; the warps of a
// position split its query rows in blocks of kRowBlock rows. Per row block a warp stages the q rows in float32,
// then alternates two lane mappings:
//   - lanes over key frames j (j = lane, lane + 32): each lane computes whole dot products q_i . k_j, reading
//     its k row as 16-byte chunks (rows padded to an odd number of chunks: conflict-free) and the q rows as
//     broadcasts, so the F x F scores need no warp reductions; the softmax over j is a warp max and a warp sum.
//   - lanes over channels d (d = lane + 32c, c < kDimsPerLane): out_i = sum_j P_ij v_j, accumulated in
//     registers and stored straight to global memory.
// Backward: one warp per position (as many per block as shared memory allows, up to kBlockWarps) with the
// q, k, v, grad_out tiles in the input dtype and P, dS (F x F) in float32: at F = 64, D = 128 in fp16/bf16 that
// is 101 KB, inside sm_80's 163 KB (float32 input at that size is refused with the numbers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "launch_common.cuh"
#include "temporal_attention_common.h"

namespace svd_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxFrames = 64;     // two key frames per lane at most
constexpr int kMaxHeadDim = 128;   // four channels per lane at most
constexpr int kRowBlock = 4;       // rows per register block; one float4 of probabilities per frame
static_assert(kRowBlock == 4, "the row blocks are read and written as one float4 (.x .y .z .w)");
constexpr int kBlockWarps = 4;
// Resident forward blocks per SM that the register budget must allow. SVD's case (fp16/bf16, 16-byte loads,
// D = 64): 8 blocks x 4 warps = 32 of 64 warp slots, 50% occupancy, <= 64 registers. float32, unaligned inputs
// and D <= 32 (whose fully unrolled PV loop keeps more values live) would spill there and get 4 blocks.
template <typename scalar_t, int kDimsPerLane, bool kVector>
constexpr int kForwardMinBlocks = sizeof(scalar_t) == 2 && kVector && kDimsPerLane > 1 ? 8 : 4;

// Elements of scalar_t in one 16-byte chunk.
template <typename scalar_t>
constexpr int kChunk = 16 / sizeof(scalar_t);

// A chunk as a value: reading it through this type (not by indexing a reinterpreted uint4) keeps it in registers.
template <typename scalar_t>
struct alignas(16) Chunk {
  scalar_t v[kChunk<scalar_t>];
};

// Shape of the tiles in shared memory, in elements of the tile's type.
struct TileLayout {
  int frames;       // F
  int head_dim;     // D
  int padded_dim;   // D rounded up to 8; the columns D..padded_dim-1 hold zeros, so chunked dot products are exact
  int row_stride;   // elements from one frame's row to the next: an ODD number of 16-byte chunks, so lanes j
                    // reading row j in chunks hit distinct banks (conflict-free)
  int frames4;      // F rounded up to 4: row length of the F x F probability matrices of the backward
};

// The flattened positions (b, p = s*H + h).
struct PositionGrid {
  int64_t total;      // B * S * H
  int64_t per_video;  // S * H
  int64_t heads;      // H
};

template <typename scalar_t>
TileLayout make_tile_layout(const TemporalAttentionGeometry& g) {
  TileLayout t;
  t.frames = static_cast<int>(g.frames);
  t.head_dim = static_cast<int>(g.head_dim);
  t.padded_dim = (t.head_dim + 7) / 8 * 8;
  t.row_stride = ((t.padded_dim / kChunk<scalar_t>) | 1) * kChunk<scalar_t>;
  t.frames4 = (t.frames + 3) / 4 * 4;
  return t;
}

PositionGrid make_position_grid(const TemporalAttentionGeometry& g) {
  return {g.batch * g.positions * g.heads, g.positions * g.heads, g.heads};
}

// Forward shared memory: positions_per_block x (K, V tiles), then per warp the float32 q rows of its row block
// and the probabilities of that block, [j][r].
template <typename scalar_t>
int64_t forward_position_bytes(const TileLayout& t) {
  return 2 * int64_t(t.frames) * t.row_stride * int64_t(sizeof(scalar_t));
}

int64_t forward_warp_bytes(const TileLayout& t) {
  return (int64_t(kRowBlock) * t.padded_dim + int64_t(t.frames) * kRowBlock) * int64_t(sizeof(float));
}

// Backward shared memory of one warp (= one position): q, k, v, grad_out tiles, P and dS, lse_i and Delta_i.
template <typename scalar_t>
int64_t backward_warp_bytes(const TileLayout& t) {
  return 4 * int64_t(t.frames) * t.row_stride * int64_t(sizeof(scalar_t)) +
         (2 * int64_t(t.frames) * t.frames4 + 2 * int64_t(t.frames4)) * int64_t(sizeof(float));
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

// One 16-byte chunk of a tile, converted to float32.
template <typename scalar_t>
__device__ __forceinline__ void load_chunk(const scalar_t* p, float (&out)[kChunk<scalar_t>]) {
  const Chunk<scalar_t> raw = *reinterpret_cast<const Chunk<scalar_t>*>(p);
#pragma unroll
  for (int i = 0; i < kChunk<scalar_t>; ++i) out[i] = static_cast<float>(raw.v[i]);
}

// Offset of (b, frame 0, s, h, channel 0) in a tensor with strides st.
__device__ __forceinline__ int64_t position_base(const TemporalStrides& st, const PositionGrid& grid, int head_dim,
                                                 int frames, int64_t position) {
  const int64_t b = position / grid.per_video, p = position % grid.per_video;
  const int64_t s = p / grid.heads, h = p % grid.heads;
  return b * frames * st.row + s * st.position + h * head_dim * st.channel;
}

// Copies the F x D tile of one position into `tile` (row stride t.row_stride), zero-filling columns
// D..padded_dim-1, with `count` threads numbered `index`. kVector: channel stride 1 and every row start 16-byte
// aligned (checked on the host), so whole chunks are copied.
template <bool kVector, typename scalar_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, const TemporalStrides& st, int64_t base,
                                          const TileLayout& t, int index, int count, scalar_t* tile) {
  constexpr int C = kChunk<scalar_t>;
  const int chunks = t.padded_dim / C;
  for (int e = index; e < t.frames * chunks; e += count) {
    const int f = e / chunks, d0 = (e % chunks) * C;
    const scalar_t* row = src + base + f * st.row;
    scalar_t* dst = tile + f * t.row_stride + d0;
    if (kVector && d0 < t.head_dim) {
      *reinterpret_cast<Chunk<scalar_t>*>(dst) = *reinterpret_cast<const Chunk<scalar_t>*>(row + d0);
    } else {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int d = d0 + i;
        dst[i] = d < t.head_dim ? row[d * st.channel] : scalar_t(0);
      }
    }
  }
}

// Contiguous (B*F, S, H*D) output: element (b, f, p, d) is at ((b*F + f) * S*H + p) * D + d.
__device__ __forceinline__ int64_t output_offset(const PositionGrid& grid, const TileLayout& t, int64_t position,
                                                 int f) {
  const int64_t b = position / grid.per_video, p = position % grid.per_video;
  return ((b * t.frames + f) * grid.per_video + p) * t.head_dim;
}

// dst[frames f0 .. f0+kRowBlock-1 of this position] = acc, masked to f < F and d < D.
template <int kDimsPerLane, typename scalar_t>
__device__ __forceinline__ void store_rows(const float (&acc)[kRowBlock][kDimsPerLane], const PositionGrid& grid,
                                           const TileLayout& t, int64_t position, int f0, int lane,
                                           scalar_t* __restrict__ dst) {
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) {
    if (f0 + r >= t.frames) break;
    scalar_t* row = dst + output_offset(grid, t, position, f0 + r);
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < t.head_dim) row[d] = static_cast<scalar_t>(acc[r][c]);
    }
  }
}

// Dynamic shared memory, 16-byte aligned for the chunk reads.
__device__ __forceinline__ unsigned char* shared_base() {
  extern __shared__ uint4 shared_memory[];
  return reinterpret_cast<unsigned char*>(shared_memory);
}

template <typename scalar_t, int kDimsPerLane, bool kVector>
__global__ void __launch_bounds__(kBlockWarps* kWarpSize, kForwardMinBlocks<scalar_t, kDimsPerLane, kVector>)
    temporal_attention_forward_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    TemporalStrides qs, TemporalStrides ks, TemporalStrides vs, PositionGrid grid, TileLayout t,
    int positions_per_block, int warps_per_position, float scale, scalar_t* __restrict__ out,
    float* __restrict__ lse) {
  constexpr int C = kChunk<scalar_t>;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first = int64_t(blockIdx.x) * positions_per_block;
  const int tile_elements = t.frames * t.row_stride;
  unsigned char* shared = shared_base();
  scalar_t* kv_tiles = reinterpret_cast<scalar_t*>(shared);  // [position][k, v][F][row_stride]
  float* warp_area = reinterpret_cast<float*>(shared + positions_per_block * 2 * tile_elements * sizeof(scalar_t)) +
                     warp * (kRowBlock * t.padded_dim + t.frames * kRowBlock);
  float* q_rows = warp_area;                               // [r][padded_dim], float32
  float* probs = q_rows + kRowBlock * t.padded_dim;        // [j][r]: P_{i0+r, j} of the current row block

  // K and V of all the block's positions, each element read once, by all the block's threads.
  for (int local = 0; local < positions_per_block && first + local < grid.total; ++local) {
    scalar_t* k_tile = kv_tiles + 2 * local * tile_elements;
    load_tile<kVector>(k, ks, position_base(ks, grid, t.head_dim, t.frames, first + local), t, threadIdx.x,
                       blockDim.x, k_tile);
    load_tile<kVector>(v, vs, position_base(vs, grid, t.head_dim, t.frames, first + local), t, threadIdx.x,
                       blockDim.x, k_tile + tile_elements);
  }
  __syncthreads();  // the only block-wide barrier: warps below may leave independently

  const int local = warp / warps_per_position;
  const int64_t position = first + local;
  if (position >= grid.total) return;  // whole warps leave together: the shuffles below keep full masks
  const scalar_t* k_tile = kv_tiles + 2 * local * tile_elements;
  const scalar_t* v_tile = k_tile + tile_elements;
  const int64_t q_base = position_base(qs, grid, t.head_dim, t.frames, position);
  const int64_t b = position / grid.per_video, p = position % grid.per_video;

  for (int i0 = (warp % warps_per_position) * kRowBlock; i0 < t.frames; i0 += warps_per_position * kRowBlock) {
    // Stage q rows i0.. in float32 (rows past F and columns past D as zeros): each q element is read once.
    for (int e = lane; e < kRowBlock * (t.padded_dim / C); e += kWarpSize) {
      const int r = e / (t.padded_dim / C), d0 = (e % (t.padded_dim / C)) * C;
      const int i = i0 + r;
      const scalar_t* row = q + q_base + int64_t(i) * qs.row;
      float* dst = q_rows + r * t.padded_dim + d0;
      if (kVector && i < t.frames && d0 < t.head_dim) {
        const Chunk<scalar_t> raw = *reinterpret_cast<const Chunk<scalar_t>*>(row + d0);
#pragma unroll
        for (int c = 0; c < C; ++c) dst[c] = static_cast<float>(raw.v[c]);
      } else {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int d = d0 + c;
          dst[c] = i < t.frames && d < t.head_dim ? static_cast<float>(row[d * qs.channel]) : 0.0f;
        }
      }
    }
    __syncwarp();
    // Scores of rows i0.. against key frames j = lane, lane + 32 (-inf where j >= F).
    float scores[2][kRowBlock];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = lane + half * kWarpSize;
      float acc[kRowBlock] = {};
      if (j < t.frames) {
        const scalar_t* k_row = k_tile + j * t.row_stride;
        for (int d = 0; d < t.padded_dim; d += C) {
          float kc[C];
          load_chunk(k_row + d, kc);
#pragma unroll
          for (int c4 = 0; c4 < C; c4 += 4) {
#pragma unroll
            for (int r = 0; r < kRowBlock; ++r) {
              const float4 qv = load4(q_rows + r * t.padded_dim + d + c4);
              acc[r] += qv.x * kc[c4] + qv.y * kc[c4 + 1] + qv.z * kc[c4 + 2] + qv.w * kc[c4 + 3];
            }
          }
        }
      }
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
      const scalar_t* v_row = v_tile + j * t.row_stride;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) {
        const int d = lane + c * kWarpSize;
        const float vd = d < t.head_dim ? static_cast<float>(v_row[d]) : 0.0f;
        acc[0][c] += pj.x * vd;
        acc[1][c] += pj.y * vd;
        acc[2][c] += pj.z * vd;
        acc[3][c] += pj.w * vd;
      }
    }
    store_rows<kDimsPerLane>(acc, grid, t, position, i0, lane, out);
    __syncwarp();  // q_rows and probs are rewritten by the next row block
  }
}

// For key frame j (one lane) and the query rows i0 .. i0+kRowBlock-1: acc[r] += a_{i0+r} . b_j over the padded
// row. Query rows past F are clamped to F-1: their results are computed but never used.
template <typename scalar_t>
__device__ __forceinline__ void row_block_dots(const scalar_t* a_tile, const scalar_t* b_row, const TileLayout& t,
                                               int i0, float (&acc)[kRowBlock]) {
  constexpr int C = kChunk<scalar_t>;
  const scalar_t* a_rows[kRowBlock];
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) a_rows[r] = a_tile + min(i0 + r, t.frames - 1) * t.row_stride;
  for (int d = 0; d < t.padded_dim; d += C) {
    float bc[C];
    load_chunk(b_row + d, bc);
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
      float ac[C];
      load_chunk(a_rows[r] + d, ac);
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r] += ac[c] * bc[c];
    }
  }
}

template <typename scalar_t, int kDimsPerLane, bool kVector>
__global__ void __launch_bounds__(kBlockWarps* kWarpSize, 1) temporal_attention_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ out, const float* __restrict__ lse,
    TemporalStrides gs, TemporalStrides qs, TemporalStrides ks, TemporalStrides vs, TemporalStrides os,
    PositionGrid grid, TileLayout t, int64_t warp_bytes, float scale, scalar_t* __restrict__ grad_q,
    scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v) {
  const int64_t position = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (position >= grid.total) return;  // whole warps leave together: the shuffles below keep full masks
  const int lane = threadIdx.x % kWarpSize;
  const int64_t b = position / grid.per_video, p = position % grid.per_video;

  const int tile_elements = t.frames * t.row_stride;
  unsigned char* area = shared_base() + (threadIdx.x / kWarpSize) * warp_bytes;
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(area);
  scalar_t* k_tile = q_tile + tile_elements;
  scalar_t* v_tile = k_tile + tile_elements;
  scalar_t* do_tile = v_tile + tile_elements;
  float* probs = reinterpret_cast<float*>(do_tile + tile_elements);  // [i][j] = P_ij
  float* dscores = probs + t.frames * t.frames4;                      // [i][j] = scale * dS_ij
  float* row_lse = dscores + t.frames * t.frames4;
  float* delta = row_lse + t.frames4;                                 // Delta_i = grad_out_i . out_i
  load_tile<kVector>(q, qs, position_base(qs, grid, t.head_dim, t.frames, position), t, lane, kWarpSize, q_tile);
  load_tile<kVector>(k, ks, position_base(ks, grid, t.head_dim, t.frames, position), t, lane, kWarpSize, k_tile);
  load_tile<kVector>(v, vs, position_base(vs, grid, t.head_dim, t.frames, position), t, lane, kWarpSize, v_tile);
  load_tile<kVector>(grad_out, gs, position_base(gs, grid, t.head_dim, t.frames, position), t, lane, kWarpSize,
                     do_tile);
  for (int f = lane; f < t.frames; f += kWarpSize) row_lse[f] = lse[(b * t.frames + f) * grid.per_video + p];
  __syncwarp();
  // Delta_i from out (read once, never stored) and the grad_out tile.
  const int64_t out_base = position_base(os, grid, t.head_dim, t.frames, position);
  for (int i = 0; i < t.frames; ++i) {
    const scalar_t* out_row = out + out_base + i * os.row;
    float partial = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < t.head_dim)
        partial += static_cast<float>(do_tile[i * t.row_stride + d]) * static_cast<float>(out_row[d * os.channel]);
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
        const float gd = d < t.head_dim ? static_cast<float>(do_tile[i * t.row_stride + d]) : 0.0f;
        const float qd = d < t.head_dim ? static_cast<float>(q_tile[i * t.row_stride + d]) : 0.0f;
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
    store_rows<kDimsPerLane>(acc_v, grid, t, position, j0, lane, grad_v);
    store_rows<kDimsPerLane>(acc_k, grid, t, position, j0, lane, grad_k);
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
        const float kd = d < t.head_dim ? static_cast<float>(k_tile[j * t.row_stride + d]) : 0.0f;
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) acc_q[r][c] += ds[r] * kd;
      }
    }
    store_rows<kDimsPerLane>(acc_q, grid, t, position, i0, lane, grad_q);
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

// Whole 16-byte chunks can be copied from every tensor: channel stride 1, D and the row/position strides
// multiples of a chunk, 16-byte aligned data.
template <typename scalar_t>
bool vector_loads(const TemporalAttentionGeometry& g, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int C = kChunk<scalar_t>;
  if (g.head_dim % C != 0) return false;
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) {
    return t->stride(2) == 1 && t->stride(0) % C == 0 && t->stride(1) % C == 0 &&
           reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  });
}

struct LaunchShape {
  unsigned blocks;
  int threads;
  int positions_per_block;  // the backward has one warp per position: also its warps per block
  size_t shared_bytes;
};

unsigned grid_blocks(int64_t total_positions, int positions_per_block, const char* op) {
  return launch::grid_size((total_positions + positions_per_block - 1) / positions_per_block, op);
}

// Two positions per block (K/V loads of adjacent heads coalesce, fewer blocks) when kForwardMinBlocks such blocks
// still fit one SM's shared memory; else one position, with its four warps splitting the query rows.
template <typename scalar_t>
LaunchShape forward_launch_shape(const TileLayout& t, int64_t total_positions) {
  const launch::DeviceLimits limits = launch::current_device_limits();
  const auto bytes = [&](int positions) {
    return positions * forward_position_bytes<scalar_t>(t) + kBlockWarps * forward_warp_bytes(t);
  };
  const bool two_fit =
      (bytes(2) + launch::kReservedSharedPerBlock) * kForwardMinBlocks<scalar_t, 2, true> <= limits.shared_per_sm;
  const int positions = two_fit ? 2 : 1;
  launch::check_shared_memory(bytes(positions), limits, "temporal_attention_forward",
                              "one position (num_frames and head_dim too large together)");
  return {grid_blocks(total_positions, positions, "temporal_attention_forward"), kBlockWarps * kWarpSize, positions,
          static_cast<size_t>(bytes(positions))};
}

// One warp per position, as many warps as fit (up to kBlockWarps).
template <typename scalar_t>
LaunchShape backward_launch_shape(const TileLayout& t, int64_t total_positions) {
  const launch::DeviceLimits limits = launch::current_device_limits();
  const int64_t warp_bytes = backward_warp_bytes<scalar_t>(t);
  launch::check_shared_memory(warp_bytes, limits, "temporal_attention_backward",
                              "one position (num_frames and head_dim too large together for this dtype)");
  const int warps = static_cast<int>(std::min<int64_t>(kBlockWarps, limits.max_shared_per_block / warp_bytes));
  return {grid_blocks(total_positions, warps, "temporal_attention_backward"), warps * kWarpSize, warps,
          static_cast<size_t>(warps * warp_bytes)};
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

// Calls body(std::integral_constant<int, ceil(padded D/32)>{}) so the channels per lane are a compile-time constant.
template <typename Body>
void dispatch_dims_per_lane(int padded_dim, Body&& body) {
  switch ((padded_dim + kWarpSize - 1) / kWarpSize) {
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
  const PositionGrid grid = make_position_grid(g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const TileLayout t = make_tile_layout<scalar_t>(g);
    const LaunchShape shape = forward_launch_shape<scalar_t>(t, grid.total);
    dispatch_dims_per_lane(t.padded_dim, [&](auto dims_per_lane) {
      launch::dispatch_bool(vector_loads<scalar_t>(g, {&q, &k, &v}), [&](auto vector) {
        const auto kernel =
            temporal_attention_forward_kernel<scalar_t, decltype(dims_per_lane)::value, decltype(vector)::value>;
        launch::allow_shared_memory(kernel, shape.shared_bytes);
        kernel<<<shape.blocks, shape.threads, shape.shared_bytes, stream>>>(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            temporal_strides(q), temporal_strides(k), temporal_strides(v), grid, t, shape.positions_per_block,
            kBlockWarps / shape.positions_per_block, static_cast<float>(scale), out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
  const PositionGrid grid = make_position_grid(g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const TileLayout t = make_tile_layout<scalar_t>(g);
    const LaunchShape shape = backward_launch_shape<scalar_t>(t, grid.total);
    const int64_t warp_bytes = backward_warp_bytes<scalar_t>(t);
    dispatch_dims_per_lane(t.padded_dim, [&](auto dims_per_lane) {
      launch::dispatch_bool(vector_loads<scalar_t>(g, {&q, &k, &v, &grad_out}), [&](auto vector) {
        const auto kernel =
            temporal_attention_backward_kernel<scalar_t, decltype(dims_per_lane)::value, decltype(vector)::value>;
        launch::allow_shared_memory(kernel, shape.shared_bytes);
        kernel<<<shape.blocks, shape.threads, shape.shared_bytes, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<float>(),
            temporal_strides(grad_out), temporal_strides(q), temporal_strides(k), temporal_strides(v),
            temporal_strides(out), grid, t, warp_bytes, static_cast<float>(scale),
            grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
            grad_v.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
