// Fused temporal attention: op schemas and CPU kernels.
//
// Each position (b, s, h) attends over its F frames, reading q/k/v where they are in the frame-major
// (B*F, S, H*D) layout (any strides; see temporal_attention_common.h) and writing the output in that
// layout: the permute copies of the diffusers path never happen. Per position the F x D tiles are
// gathered into a small buffer in at::opmath_type (float; double for double input), the F x F scores and
// softmax computed there, and the result written back. The backward recomputes the probabilities from
// the saved log-sum-exp, as flash-attention does, so the forward keeps no F x F matrix.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "temporal_attention_common.h"

namespace svd_fast {
namespace {

// Offset of frame 0, channel 0 of position (b, s, h), and the step between consecutive frames.
struct PositionAddress {
  int64_t base;
  int64_t frame_step;
};

inline PositionAddress position_address(const TemporalStrides& st, const TemporalAttentionGeometry& g, int64_t b,
                                        int64_t s, int64_t h) {
  return {b * g.frames * st.row + s * st.position + h * g.head_dim * st.channel, st.row};
}

template <typename acc_t, typename scalar_t>
inline void gather(const scalar_t* src, const TemporalStrides& st, const TemporalAttentionGeometry& g, int64_t b,
                   int64_t s, int64_t h, acc_t* tile) {
  const PositionAddress a = position_address(st, g, b, s, h);
  for (int64_t f = 0; f < g.frames; ++f) {
    const scalar_t* row = src + a.base + f * a.frame_step;
    for (int64_t d = 0; d < g.head_dim; ++d) tile[f * g.head_dim + d] = static_cast<acc_t>(row[d * st.channel]);
  }
}

// Outputs are allocated contiguous (B*F, S, H*D), so their strides are known.
template <typename acc_t, typename scalar_t>
inline void scatter(const acc_t* tile, const TemporalAttentionGeometry& g, int64_t b, int64_t s, int64_t h,
                    scalar_t* dst) {
  const int64_t channels = g.heads * g.head_dim;
  for (int64_t f = 0; f < g.frames; ++f) {
    scalar_t* row = dst + ((b * g.frames + f) * g.positions + s) * channels + h * g.head_dim;
    for (int64_t d = 0; d < g.head_dim; ++d) row[d] = static_cast<scalar_t>(tile[f * g.head_dim + d]);
  }
}

// kLanes independent partial sums: a single running sum is a serial dependency chain that the compiler may
// not reorder (no -ffast-math), while independent lanes vectorise.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  acc_t total = 0;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// scores[i*F + j] = scale * q_i . k_j
template <typename acc_t>
inline void scaled_scores(const acc_t* q, const acc_t* k, int64_t frames, int64_t head_dim, acc_t scale,
                          acc_t* scores) {
  for (int64_t i = 0; i < frames; ++i)
    for (int64_t j = 0; j < frames; ++j) scores[i * frames + j] = scale * dot(q + i * head_dim, k + j * head_dim, head_dim);
}

// The per-position work is compiled twice, for AVX2 and for baseline x86-64, and the loader picks one for
// the CPU it runs on (GCC function multi-versioning): the extension is built without -march flags, so
// without this the inner loops would only use SSE2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVD_FAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SVD_FAST_CPU_CLONES
#endif

template <typename scalar_t>
struct ForwardArgs {
  TemporalAttentionGeometry g;
  const scalar_t *q, *k, *v;
  TemporalStrides qs, ks, vs;
  at::opmath_type<scalar_t> scale;
  scalar_t* out;
  at::opmath_type<scalar_t>* lse;
};

// Scratch tiles of one position, in acc_t: q, k, v, output (F x D each) and the scores (F x F).
template <typename acc_t>
struct ForwardScratch {
  explicit ForwardScratch(int64_t F, int64_t D) : q(F * D), k(F * D), v(F * D), o(F * D), scores(F * F) {}
  std::vector<acc_t> q, k, v, o, scores;
};

template <typename scalar_t>
SVD_FAST_CPU_CLONES void forward_position(const ForwardArgs<scalar_t>& a, int64_t b, int64_t s, int64_t h,
                                          ForwardScratch<at::opmath_type<scalar_t>>& t) {
  using acc_t = at::opmath_type<scalar_t>;
  const TemporalAttentionGeometry& g = a.g;
  const int64_t F = g.frames, D = g.head_dim;
  gather(a.q, a.qs, g, b, s, h, t.q.data());
  gather(a.k, a.ks, g, b, s, h, t.k.data());
  gather(a.v, a.vs, g, b, s, h, t.v.data());
  scaled_scores(t.q.data(), t.k.data(), F, D, a.scale, t.scores.data());
  for (int64_t i = 0; i < F; ++i) {
    acc_t* row = t.scores.data() + i * F;
    const acc_t row_max = *std::max_element(row, row + F);
    acc_t sum = 0;
    for (int64_t j = 0; j < F; ++j) sum += (row[j] = std::exp(row[j] - row_max));
    acc_t* o = t.o.data() + i * D;
    std::fill(o, o + D, acc_t(0));
    for (int64_t j = 0; j < F; ++j) {
      const acc_t p = row[j] / sum;
      const acc_t* vj = t.v.data() + j * D;
      for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
    }
    a.lse[((b * F + i) * g.positions + s) * g.heads + h] = row_max + std::log(sum);
  }
  scatter(t.o.data(), g, b, s, h, a.out);
}

// Calls visit(b, s, h, scratch) for every position (b, s, h), in parallel; each thread owns one Scratch.
template <typename Scratch, typename Visit>
void for_each_position(const TemporalAttentionGeometry& g, int64_t grain, Visit&& visit) {
  at::parallel_for(0, g.batch * g.positions * g.heads, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(g.frames, g.head_dim);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t h = index % g.heads, s = (index / g.heads) % g.positions, b = index / (g.heads * g.positions);
      visit(b, s, h, scratch);
    }
  });
}

template <typename scalar_t>
struct BackwardArgs {
  TemporalAttentionGeometry g;
  const scalar_t *grad_out, *q, *k, *v, *out;
  const at::opmath_type<scalar_t>* lse;
  TemporalStrides gs, qs, ks, vs, os;
  at::opmath_type<scalar_t> scale;
  scalar_t *grad_q, *grad_k, *grad_v;
};

template <typename acc_t>
struct BackwardScratch {
  explicit BackwardScratch(int64_t F, int64_t D)
      : q(F * D), k(F * D), v(F * D), grad_out(F * D), out(F * D), grad_q(F * D), grad_k(F * D), grad_v(F * D),
        probs(F * F), delta(F) {}
  std::vector<acc_t> q, k, v, grad_out, out, grad_q, grad_k, grad_v, probs, delta;
};

template <typename scalar_t>
SVD_FAST_CPU_CLONES void backward_position(const BackwardArgs<scalar_t>& a, int64_t b, int64_t s, int64_t h,
                                           BackwardScratch<at::opmath_type<scalar_t>>& t) {
  using acc_t = at::opmath_type<scalar_t>;
  const TemporalAttentionGeometry& g = a.g;
  const int64_t F = g.frames, D = g.head_dim;
  gather(a.q, a.qs, g, b, s, h, t.q.data());
  gather(a.k, a.ks, g, b, s, h, t.k.data());
  gather(a.v, a.vs, g, b, s, h, t.v.data());
  gather(a.grad_out, a.gs, g, b, s, h, t.grad_out.data());
  gather(a.out, a.os, g, b, s, h, t.out.data());
  scaled_scores(t.q.data(), t.k.data(), F, D, a.scale, t.probs.data());
  for (int64_t i = 0; i < F; ++i) {
    const acc_t row_lse = a.lse[((b * F + i) * g.positions + s) * g.heads + h];
    for (int64_t j = 0; j < F; ++j) t.probs[i * F + j] = std::exp(t.probs[i * F + j] - row_lse);
    t.delta[i] = dot(t.grad_out.data() + i * D, t.out.data() + i * D, D);
  }
  std::fill(t.grad_q.begin(), t.grad_q.end(), acc_t(0));
  std::fill(t.grad_k.begin(), t.grad_k.end(), acc_t(0));
  std::fill(t.grad_v.begin(), t.grad_v.end(), acc_t(0));
  for (int64_t i = 0; i < F; ++i) {
    const acc_t* dOi = t.grad_out.data() + i * D;
    const acc_t* qi = t.q.data() + i * D;
    acc_t* dqi = t.grad_q.data() + i * D;
    for (int64_t j = 0; j < F; ++j) {
      const acc_t p = t.probs[i * F + j];
      const acc_t ds = a.scale * p * (dot(dOi, t.v.data() + j * D, D) - t.delta[i]);
      const acc_t* kj = t.k.data() + j * D;
      acc_t* dvj = t.grad_v.data() + j * D;
      acc_t* dkj = t.grad_k.data() + j * D;
      for (int64_t d = 0; d < D; ++d) {
        dvj[d] += p * dOi[d];
        dqi[d] += ds * kj[d];
        dkj[d] += ds * qi[d];
      }
    }
  }
  scatter(t.grad_q.data(), g, b, s, h, a.grad_q);
  scatter(t.grad_k.data(), g, b, s, h, a.grad_k);
  scatter(t.grad_v.data(), g, b, s, h, a.grad_v);
}

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> temporal_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, int64_t num_frames,
                                                                  int64_t num_heads, double scale) {
  const TemporalAttentionGeometry g = temporal_attention_geometry(q, k, v, num_frames, num_heads);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), g.positions, g.heads}, q.options().dtype(lse_dtype(q)));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> args{g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), temporal_strides(q), temporal_strides(k),
                                     temporal_strides(v), static_cast<acc_t>(scale), out.mutable_data_ptr<scalar_t>(),
                                     lse.mutable_data_ptr<acc_t>()};
    for_each_position<ForwardScratch<acc_t>>(g, 64, [&](int64_t b, int64_t s, int64_t h, ForwardScratch<acc_t>& t) {
      forward_position(args, b, s, h, t);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_frames, int64_t num_heads, double scale) {
  const TemporalAttentionGeometry g = temporal_attention_geometry(q, k, v, num_frames, num_heads);
  check_temporal_tensor(grad_out, "grad_out", q);
  check_temporal_tensor(out, "out", q);
  check_temporal_lse(lse, q, g);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_k = at::empty_like(grad_q);
  at::Tensor grad_v = at::empty_like(grad_q);
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> args{g, grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                      k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                      out.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<acc_t>(),
                                      temporal_strides(grad_out), temporal_strides(q), temporal_strides(k),
                                      temporal_strides(v), temporal_strides(out), static_cast<acc_t>(scale),
                                      grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
                                      grad_v.mutable_data_ptr<scalar_t>()};
    for_each_position<BackwardScratch<acc_t>>(g, 32, [&](int64_t b, int64_t s, int64_t h, BackwardScratch<acc_t>& t) {
      backward_position(args, b, s, h, t);
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(svd_fast, m) {
  m.def(
      "temporal_attention_forward(Tensor q, Tensor k, Tensor v, int num_frames, int num_heads, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "temporal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int num_frames, int num_heads, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("temporal_attention_forward", &temporal_attention_forward_cpu);
  m.impl("temporal_attention_backward", &temporal_attention_backward_cpu);
}

}  // namespace svd_fast
