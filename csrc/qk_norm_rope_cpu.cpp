// QK RMSNorm + rotate-half RoPE on the CPU, forward and backward: one task per (b, s, h) row
// of D elements, at::parallel_for across rows; fp32 arithmetic, outputs in the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace kiln {
namespace {

struct RowPtrs {  // what one row (b, s, h) needs: weight row, cos/sin rows (nullptr = no RoPE)
  const float *w, *cos, *sin;
};

inline RowPtrs row_ptrs(const RopeArgs& a, int64_t s) {
  const int64_t D = a.shape.D;
  const int64_t g = a.token_group.defined() ? a.token_group.const_data_ptr<int64_t>()[s] : 0;
  const float* cos = a.cos.defined() ? a.cos.const_data_ptr<float>() + s * D : nullptr;
  const float* sin = a.sin.defined() ? a.sin.const_data_ptr<float>() + s * D : nullptr;
  return {a.weight.const_data_ptr<float>() + g * D, cos, sin};
}

inline void check_groups(const RopeArgs& a) {
  if (!a.token_group.defined()) return;
  const int64_t* tg = a.token_group.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < a.shape.S; ++s)
    KILN_CHECK(tg[s] >= 0 && tg[s] < a.shape.G, "qk_norm_rope: token_group[", s, "] = ", tg[s], " outside [0, ",
               a.shape.G, ")");
}

template <typename T>
void norm_rope_fwd_rows(const RopeArgs& a, double eps, T* y, float* rstd) {
  const RowShape& sh = a.shape;
  const int64_t D = sh.D, h2 = D / 2;
  const T* x = a.x.const_data_ptr<T>();
  at::parallel_for(0, sh.rows(), 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> n(D);
    for (int64_t r = lo; r < hi; ++r) {
      int64_t s;
      const T* xr = x + sh.offset(r, s);
      const RowPtrs p = row_ptrs(a, s);
      float sq = 0;
      for (int64_t j = 0; j < D; ++j) sq += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
      const float rs = 1.f / std::sqrt(sq / D + static_cast<float>(eps));
      rstd[r] = rs;
      for (int64_t j = 0; j < D; ++j) n[j] = static_cast<float>(xr[j]) * rs * p.w[j];
      T* yr = y + r * D;
      for (int64_t j = 0; j < D; ++j) {
        if (!p.cos) {
          yr[j] = static_cast<T>(n[j]);
          continue;
        }
        const float rot = j < h2 ? -n[j + h2] : n[j - h2];  // rotate_half
        yr[j] = static_cast<T>(n[j] * p.cos[j] + rot * p.sin[j]);
      }
    }
  });
}

// dx and the per-row weight-gradient contributions dn·x̂ (fp32, (rows, D)), reduced afterwards.
template <typename T>
void norm_rope_bwd_rows(const RopeArgs& a, const T* dy, const float* rstd, T* dx, float* dw_rows) {
  const RowShape& sh = a.shape;
  const int64_t D = sh.D, h2 = D / 2;
  const T* x = a.x.const_data_ptr<T>();
  at::parallel_for(0, sh.rows(), 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> dn(D);
    for (int64_t r = lo; r < hi; ++r) {
      int64_t s;
      const T* xr = x + sh.offset(r, s);
      const T* dyr = dy + r * D;
      const RowPtrs p = row_ptrs(a, s);
      for (int64_t j = 0; j < D; ++j) {  // transpose of the rotation: dn = dy·cos + rotate_half^T(dy·sin)
        const float d = static_cast<float>(dyr[j]);
        if (!p.cos) {
          dn[j] = d;
          continue;
        }
        const float rot = j < h2 ? static_cast<float>(dyr[j + h2]) * p.sin[j + h2]
                                 : -static_cast<float>(dyr[j - h2]) * p.sin[j - h2];
        dn[j] = d * p.cos[j] + rot;
      }
      const float rs = rstd[r];
      float dot = 0;  // Σ_j dx̂_j x̂_j with dx̂ = dn·w
      for (int64_t j = 0; j < D; ++j) {
        const float xh = static_cast<float>(xr[j]) * rs;
        dw_rows[r * D + j] = dn[j] * xh;
        dot += dn[j] * p.w[j] * xh;
      }
      dot /= D;
      T* dxr = dx + r * D;
      for (int64_t j = 0; j < D; ++j) {
        const float xh = static_cast<float>(xr[j]) * rs;
        dxr[j] = static_cast<T>(rs * (dn[j] * p.w[j] - xh * dot));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> norm_rope_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group, double eps) {
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  check_groups(a);
  const RowShape& sh = a.shape;
  at::Tensor y = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor rstd = at::empty({sh.B, sh.S, sh.H}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_fwd_cpu", [&] {
    norm_rope_fwd_rows<scalar_t>(a, eps, y.data_ptr<scalar_t>(), rstd.data_ptr<float>());
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> norm_rope_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group,
                                                 const at::Tensor& rstd) {
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  const RowShape& sh = a.shape;
  KILN_CHECK(dy.sizes() == x.sizes(), "qk_norm_rope backward: gradient ", dy.sizes(), " != input ", x.sizes());
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor dw_rows = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_bwd_cpu", [&] {
    norm_rope_bwd_rows<scalar_t>(a, dyc.const_data_ptr<scalar_t>(), rc.const_data_ptr<float>(),
                                 dx.data_ptr<scalar_t>(), dw_rows.data_ptr<float>());
  });
  // Weight gradient: Σ over batch and heads, then over the tokens of each group.
  // IntArrayRef spelled out: torch 2.11 also has sum(DimnameList), which makes {0, 2} ambiguous
  at::Tensor per_token = dw_rows.sum(at::IntArrayRef{0, 2});  // (S, D)
  at::Tensor dw = at::zeros({sh.G, sh.D}, per_token.options());
  if (a.token_group.defined())
    dw.index_add_(0, a.token_group, per_token);
  else
    dw[0] = per_token.sum(0);
  return {dx, dw.reshape(weight.sizes()).to(weight.scalar_type())};
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln_ext, CPU, m) {
  m.impl("qk_norm_rope_fwd", &kiln::qk_pair_fwd<&kiln::norm_rope_fwd>);
  m.impl("qk_norm_rope_bwd", &kiln::qk_pair_bwd<&kiln::norm_rope_bwd>);
}
