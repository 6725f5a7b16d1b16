// GroupNorm (+ modulation, + SiLU) forward and backward on the CPU: one task per (n, g) group,
// at::parallel_for across them; fp64 accumulation of the statistics (a group can hold 10^6
// elements), fp32 arithmetic elsewhere, output in x's dtype and memory format.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace kiln {
namespace {

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

template <typename T>
void gn_fwd(const T* x, T* y, float* mean_out, float* rstd_out, const GNShape& s, const GNParams& p, double eps,
            bool silu) {
  const int64_t sc = s.stride_c(), ss = s.stride_s();
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t ng = lo; ng < hi; ++ng) {
      const int64_t n = ng / s.G, c0 = (ng % s.G) * s.Cg;
      const T* xn = x + n * s.C * s.HW;
      double sum = 0, sq = 0;
      for (int64_t c = c0; c < c0 + s.Cg; ++c)
        for (int64_t i = 0; i < s.HW; ++i) sum += static_cast<double>(xn[c * sc + i * ss]);
      const double mu = sum / s.group_size();
      for (int64_t c = c0; c < c0 + s.Cg; ++c)
        for (int64_t i = 0; i < s.HW; ++i) {
          const double d = static_cast<double>(xn[c * sc + i * ss]) - mu;
          sq += d * d;
        }
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / s.group_size() + eps)), muf = static_cast<float>(mu);
      mean_out[ng] = muf;
      rstd_out[ng] = rstd;
      T* yn = y + n * s.C * s.HW;
      for (int64_t c = c0; c < c0 + s.Cg; ++c) {
        const ChannelMod md = channel_mod(p, n, c, s.C);
        for (int64_t i = 0; i < s.HW; ++i) {
          const int64_t o = c * sc + i * ss;
          float m = (static_cast<float>(xn[o]) - muf) * rstd * md.wf + md.bf;
          yn[o] = static_cast<T>(silu ? m * sigmoid(m) : m);
        }
      }
    }
  });
}

// dm = dL/dm (m the pre-activation output) from dy and the recomputed m.
inline float dm_of(float dy, float m, bool silu) {
  if (!silu) return dy;
  const float sg = sigmoid(m);
  return dy * sg * (1.f + m * (1.f - sg));
}

template <typename T>
void gn_bwd(const T* dy, const T* x, const float* mean, const float* rstd, T* dx, float* A, float* B, const GNShape& s,
            const GNParams& p, bool silu) {
  const int64_t sc = s.stride_c(), ss = s.stride_s();
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t ng = lo; ng < hi; ++ng) {
      const int64_t n = ng / s.G, c0 = (ng % s.G) * s.Cg, base = n * s.C * s.HW;
      const float mu = mean[ng], r = rstd[ng];
      // Pass 1: per-channel A_c = Σ dm, B_c = Σ dm·x̂, and the group sums of dx̂ = dm·w·f.
      double s1 = 0, s2 = 0;
      for (int64_t c = c0; c < c0 + s.Cg; ++c) {
        const ChannelMod md = channel_mod(p, n, c, s.C);
        double a = 0, b = 0;
        for (int64_t i = 0; i < s.HW; ++i) {
          const int64_t o = base + c * sc + i * ss;
          const float xh = (static_cast<float>(x[o]) - mu) * r;
          const float dm = dm_of(static_cast<float>(dy[o]), xh * md.wf + md.bf, silu);
          a += dm;
          b += static_cast<double>(dm) * xh;
        }
        A[n * s.C + c] = static_cast<float>(a);
        B[n * s.C + c] = static_cast<float>(b);
        s1 += a * md.wf;
        s2 += b * md.wf;
      }
      // Pass 2: dx = rstd · (dx̂ - mean(dx̂) - x̂ · mean(dx̂·x̂)).
      const float m1 = static_cast<float>(s1 / s.group_size()), m2 = static_cast<float>(s2 / s.group_size());
      for (int64_t c = c0; c < c0 + s.Cg; ++c) {
        const ChannelMod md = channel_mod(p, n, c, s.C);
        for (int64_t i = 0; i < s.HW; ++i) {
          const int64_t o = base + c * sc + i * ss;
          const float xh = (static_cast<float>(x[o]) - mu) * r;
          const float dm = dm_of(static_cast<float>(dy[o]), xh * md.wf + md.bf, silu);
          dx[o] = static_cast<T>(r * (dm * md.wf - m1 - xh * m2));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, double eps, std::string activation) {
  const bool silu = parse_activation(activation);
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  at::Tensor y = at::empty_like(pr.x);  // keeps the (dense) memory format of x
  at::Tensor mean = at::empty({pr.s.N, pr.s.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_fwd_cpu", [&] {
    gn_fwd<scalar_t>(pr.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                     rstd.data_ptr<float>(), pr.s, pr.params(), eps, silu);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, int64_t num_groups,
    std::string activation) {
  const bool silu = parse_activation(activation);
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  KILN_CHECK(dy.sizes() == x.sizes(), "group_norm backward: dy ", dy.sizes(), " != x ", x.sizes());
  const at::Tensor dyc = dy.to(pr.x.scalar_type()).contiguous(gn_memory_format(pr.x));
  const at::Tensor mc = mean.to(at::kFloat).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(pr.x);
  at::Tensor A = at::empty({pr.s.N, pr.s.C}, x.options().dtype(at::kFloat));
  at::Tensor B = at::empty_like(A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_bwd_cpu", [&] {
    gn_bwd<scalar_t>(dyc.const_data_ptr<scalar_t>(), pr.x.const_data_ptr<scalar_t>(), mc.const_data_ptr<float>(),
                     rc.const_data_ptr<float>(), dx.data_ptr<scalar_t>(), A.data_ptr<float>(), B.data_ptr<float>(),
                     pr.s, pr.params(), silu);
  });
  return {dx, A, B};
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln_ext, CPU, m) {
  m.impl("group_norm_fwd", &kiln::group_norm_fwd_cpu);
  m.impl("group_norm_bwd", &kiln::group_norm_bwd_cpu);
}
