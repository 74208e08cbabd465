// Fused temporal attention: op schemas, CPU kernels, and the dispatcher entry points declared in ops.h.
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

#include "ops.h"
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

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

// scores[i*F + j] = scale * q_i . k_j
template <typename acc_t>
inline void scaled_scores(const acc_t* q, const acc_t* k, int64_t frames, int64_t head_dim, acc_t scale,
                          acc_t* scores) {
  for (int64_t i = 0; i < frames; ++i)
    for (int64_t j = 0; j < frames; ++j) scores[i * frames + j] = scale * dot(q + i * head_dim, k + j * head_dim, head_dim);
}

template <typename scalar_t>
void forward_cpu_kernel(const TemporalAttentionGeometry& g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                        TemporalStrides qs, TemporalStrides ks, TemporalStrides vs, double scale, scalar_t* out,
                        at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = g.frames, D = g.head_dim;
  const int64_t total = g.batch * g.positions * g.heads;
  at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(F * D), kt(F * D), vt(F * D), ot(F * D), scores(F * F);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t h = index % g.heads, s = (index / g.heads) % g.positions, b = index / (g.heads * g.positions);
      gather(q, qs, g, b, s, h, qt.data());
      gather(k, ks, g, b, s, h, kt.data());
      gather(v, vs, g, b, s, h, vt.data());
      scaled_scores(qt.data(), kt.data(), F, D, static_cast<acc_t>(scale), scores.data());
      for (int64_t i = 0; i < F; ++i) {
        acc_t* row = scores.data() + i * F;
        const acc_t row_max = *std::max_element(row, row + F);
        acc_t sum = 0;
        for (int64_t j = 0; j < F; ++j) sum += (row[j] = std::exp(row[j] - row_max));
        acc_t* o = ot.data() + i * D;
        std::fill(o, o + D, acc_t(0));
        for (int64_t j = 0; j < F; ++j) {
          const acc_t p = row[j] / sum;
          const acc_t* vj = vt.data() + j * D;
          for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
        }
        lse[((b * F + i) * g.positions + s) * g.heads + h] = row_max + std::log(sum);
      }
      scatter(ot.data(), g, b, s, h, out);
    }
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const TemporalAttentionGeometry& g, const scalar_t* grad_out, const scalar_t* q,
                         const scalar_t* k, const scalar_t* v, const scalar_t* out,
                         const at::opmath_type<scalar_t>* lse, TemporalStrides gs, TemporalStrides qs,
                         TemporalStrides ks, TemporalStrides vs, TemporalStrides os, double scale, scalar_t* grad_q,
                         scalar_t* grad_k, scalar_t* grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = g.frames, D = g.head_dim;
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const int64_t total = g.batch * g.positions * g.heads;
  at::parallel_for(0, total, 32, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(F * D), kt(F * D), vt(F * D), dO_tile(F * D), ot(F * D);
    std::vector<acc_t> dqt(F * D), dkt(F * D), dvt(F * D), probs(F * F), delta(F);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t h = index % g.heads, s = (index / g.heads) % g.positions, b = index / (g.heads * g.positions);
      gather(q, qs, g, b, s, h, qt.data());
      gather(k, ks, g, b, s, h, kt.data());
      gather(v, vs, g, b, s, h, vt.data());
      gather(grad_out, gs, g, b, s, h, dO_tile.data());
      gather(out, os, g, b, s, h, ot.data());
      scaled_scores(qt.data(), kt.data(), F, D, scale_acc, probs.data());
      for (int64_t i = 0; i < F; ++i) {
        const acc_t row_lse = lse[((b * F + i) * g.positions + s) * g.heads + h];
        for (int64_t j = 0; j < F; ++j) probs[i * F + j] = std::exp(probs[i * F + j] - row_lse);
        delta[i] = dot(dO_tile.data() + i * D, ot.data() + i * D, D);
      }
      std::fill(dqt.begin(), dqt.end(), acc_t(0));
      std::fill(dkt.begin(), dkt.end(), acc_t(0));
      std::fill(dvt.begin(), dvt.end(), acc_t(0));
      for (int64_t i = 0; i < F; ++i) {
        const acc_t* dOi = dO_tile.data() + i * D;
        for (int64_t j = 0; j < F; ++j) {
          const acc_t p = probs[i * F + j];
          const acc_t ds = scale_acc * p * (dot(dOi, vt.data() + j * D, D) - delta[i]);
          const acc_t* kj = kt.data() + j * D;
          const acc_t* qi = qt.data() + i * D;
          acc_t* dvj = dvt.data() + j * D;
          acc_t* dqi = dqt.data() + i * D;
          acc_t* dkj = dkt.data() + j * D;
          for (int64_t d = 0; d < D; ++d) {
            dvj[d] += p * dOi[d];
            dqi[d] += ds * kj[d];
            dkj[d] += ds * qi[d];
          }
        }
      }
      scatter(dqt.data(), g, b, s, h, grad_q);
      scatter(dkt.data(), g, b, s, h, grad_k);
      scatter(dvt.data(), g, b, s, h, grad_v);
    }
  });
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
    forward_cpu_kernel<scalar_t>(g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                 v.const_data_ptr<scalar_t>(), temporal_strides(q), temporal_strides(k),
                                 temporal_strides(v), scale, out.mutable_data_ptr<scalar_t>(),
                                 lse.mutable_data_ptr<at::opmath_type<scalar_t>>());
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
    backward_cpu_kernel<scalar_t>(
        g, grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<at::opmath_type<scalar_t>>(),
        temporal_strides(grad_out), temporal_strides(q), temporal_strides(k), temporal_strides(v), temporal_strides(out),
        scale, grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
        grad_v.mutable_data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> temporal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, int64_t num_frames,
                                                              int64_t num_heads, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("svd_fast::temporal_attention_forward", "")
                       .typed<decltype(temporal_attention_forward)>();
  return op.call(q, k, v, num_frames, num_heads, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_frames, int64_t num_heads, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("svd_fast::temporal_attention_backward", "")
                       .typed<decltype(temporal_attention_backward)>();
  return op.call(grad_out, q, k, v, out, lse, num_frames, num_heads, scale);
}

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
