// Shared helpers of kiln_ext's CPU and CUDA implementations: argument checks and the index
// layouts of the two ops. Kernels see raw pointers plus the sizes/strides gathered here, so the
// CPU and CUDA files compute exactly the same thing from the same description.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#ifdef __CUDACC__
#define KILN_HD __host__ __device__
#else
#define KILN_HD
#endif

#define KILN_CHECK(cond, ...) TORCH_CHECK(cond, "kiln_ext: ", __VA_ARGS__)
#define KILN_CHECK_FLOAT(t, name)                                                              \
  KILN_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||              \
                 (t).scalar_type() == at::kBFloat16,                                           \
             name, " must be float32, float16 or bfloat16, got ", (t).scalar_type())
#define KILN_CHECK_SAME_DEVICE(a, b, name)                                                     \
  KILN_CHECK((a).device() == (b).device(), name, " is on ", (b).device(), " but x is on ", (a).device())

namespace kiln {

// ---- GroupNorm -------------------------------------------------------------------------------
// x (N, C, *spatial) is viewed as (N, C, HW) with HW the product of the spatial dims. Both memory
// formats flatten the spatial dims contiguously relative to each other, so element (n, c, s)
// lives at n*C*HW + c*stride_c + s*stride_s with (stride_c, stride_s) = (HW, 1) for NCHW and
// (1, C) for channels-last(-3d).
struct GNShape {
  int64_t N, C, HW, G, Cg;
  bool channels_last;
  int64_t stride_c() const { return channels_last ? 1 : HW; }
  int64_t stride_s() const { return channels_last ? C : 1; }
  int64_t group_size() const { return Cg * HW; }
};

inline at::MemoryFormat gn_memory_format(const at::Tensor& x) {
  // Same rule as kiln.kernels.group_norm.memory_format_of.
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

inline GNShape gn_shape(const at::Tensor& x, int64_t G) {
  KILN_CHECK(x.dim() >= 3 && x.dim() <= 5, "group_norm: x must be (N, C, *spatial) with 1-3 spatial dims, got ",
             x.sizes());
  KILN_CHECK(G > 0 && x.size(1) % G == 0, "group_norm: channels ", x.size(1), " not divisible by num_groups ", G);
  GNShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.numel() / std::max<int64_t>(s.N * s.C, 1);
  s.G = G;
  s.Cg = s.C / G;
  s.channels_last = gn_memory_format(x) != at::MemoryFormat::Contiguous;
  return s;
}

// Optional per-channel (C,) or per-sample (N, C) parameter as contiguous fp32 (or undefined).
inline at::Tensor as_f32(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name,
                         at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  KILN_CHECK_SAME_DEVICE(x, *t, name);
  KILN_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

inline bool parse_activation(const std::string& activation) {
  KILN_CHECK(activation == "none" || activation == "silu", "group_norm: activation must be 'none' or 'silu', got '",
             activation, "'");
  return activation == "silu";
}

// Raw pointers of the optional fp32 parameters (nullptr = absent).
struct GNParams {
  const float *weight, *bias, *scale, *shift;
};

// Affine + modulation of channel c of sample n (CPU and CUDA): m = x̂·wf + bf with
// wf = w·(1 + scale), bf = bias·(1 + scale) + shift.
struct ChannelMod {
  float wf, bf;
};

KILN_HD inline ChannelMod channel_mod(const GNParams& p, int64_t n, int64_t c, int64_t C) {
  const float w = p.weight ? p.weight[c] : 1.f, b = p.bias ? p.bias[c] : 0.f;
  const float f = p.scale ? 1.f + p.scale[n * C + c] : 1.f, sh = p.shift ? p.shift[n * C + c] : 0.f;
  return {w * f, b * f + sh};
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// x in its own dense memory format and the optional parameters as contiguous fp32.
struct GNPrepared {
  at::Tensor x, weight, bias, scale, shift;
  GNShape s;
  GNParams params() const { return {ptr_or_null(weight), ptr_or_null(bias), ptr_or_null(scale), ptr_or_null(shift)}; }
};

inline GNPrepared gn_prepare(const at::Tensor& x_in, int64_t G, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                 const c10::optional<at::Tensor>& shift) {
  KILN_CHECK_FLOAT(x_in, "group_norm: x");
  GNPrepared r;
  r.x = x_in.contiguous(gn_memory_format(x_in));
  r.s = gn_shape(r.x, G);
  r.weight = as_f32(weight, r.x, "group_norm: weight", {r.s.C});
  r.bias = as_f32(bias, r.x, "group_norm: bias", {r.s.C});
  r.scale = as_f32(scale, r.x, "group_norm: scale", {r.s.N, r.s.C});
  r.shift = as_f32(shift, r.x, "group_norm: shift", {r.s.N, r.s.C});
  return r;
}

// ---- QK RMSNorm + RoPE -------------------------------------------------------------------------
// x (B, S, H, D) with any strides on B, S, H and a unit stride on D (views of a packed QKV work).
struct RowShape {
  int64_t B, S, H, D, G;
  int64_t sb, ss, sh;  // element strides of x
  KILN_HD int64_t rows() const { return B * S * H; }
  // Element offset of row r = (b, s, h) in x; its token s is returned too (it picks weights and RoPE).
  KILN_HD int64_t offset(int64_t r, int64_t& s) const {
    const int64_t b = r / (S * H), h = r % H;
    s = (r / H) % S;
    return b * sb + s * ss + h * sh;
  }
};

struct RopeArgs {
  at::Tensor x, weight, token_group, cos, sin;  // weight (G, D) fp32; token_group (S,) int64 or undefined
  RowShape shape;
};

inline RopeArgs rope_args(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& token_group) {
  KILN_CHECK(x_in.dim() == 4, "qk_norm_rope: q and k must be (B, S, H, D), got ", x_in.sizes());
  KILN_CHECK_FLOAT(x_in, "qk_norm_rope: q/k");
  RopeArgs a;
  a.x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const int64_t S = a.x.size(1), D = a.x.size(3);
  KILN_CHECK(D % 2 == 0, "qk_norm_rope: head dim ", D, " must be even (rotate-half RoPE)");
  KILN_CHECK_SAME_DEVICE(a.x, weight, "qk_norm_rope: weight");
  KILN_CHECK((weight.dim() == 1 && weight.size(0) == D) || (weight.dim() == 2 && weight.size(1) == D),
             "qk_norm_rope: weights must be (D,) or (G, D) with D = ", D, ", got ", weight.sizes());
  a.weight = weight.to(at::kFloat).reshape({-1, D}).contiguous();
  const bool has_cos = cos.has_value() && cos->defined(), has_sin = sin.has_value() && sin->defined();
  KILN_CHECK(has_cos == has_sin, "qk_norm_rope: give both cos and sin or neither");
  if (has_cos) {
    KILN_CHECK(cos->sizes() == at::IntArrayRef({S, D}) && sin->sizes() == at::IntArrayRef({S, D}),
               "qk_norm_rope: cos and sin must be (S, D) = (", S, ", ", D, "), got ", cos->sizes(), " and ",
               sin->sizes());
    a.cos = cos->to(a.x.device(), at::kFloat).contiguous();
    a.sin = sin->to(a.x.device(), at::kFloat).contiguous();
  }
  if (token_group.has_value() && token_group->defined() && a.weight.size(0) > 1) {
    KILN_CHECK(token_group->dim() == 1 && token_group->size(0) == S, "qk_norm_rope: token_group must be (S,) = (",
               S, ",), got ", token_group->sizes());
    a.token_group = token_group->to(a.x.device(), at::kLong).contiguous();
  }
  a.shape = {a.x.size(0), S, a.x.size(2), D, a.weight.size(0), a.x.stride(0), a.x.stride(1), a.x.stride(2)};
  return a;
}

// The two ops run q and k through one per-tensor function each (CPU and CUDA alike):
//   Fwd(x, weight, cos, sin, token_group, eps) -> (y, rstd)
//   Bwd(dy, x, weight, cos, sin, token_group, rstd) -> (dx, dweight)
using OptTensor = c10::optional<at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <auto Fwd>
Tensors4 qk_pair_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                     const OptTensor& cos, const OptTensor& sin, const OptTensor& token_group, double eps) {
  auto [qo, rq] = Fwd(q, q_weight, cos, sin, token_group, eps);
  auto [ko, rk] = Fwd(k, k_weight, cos, sin, token_group, eps);
  return {qo, ko, rq, rk};
}

template <auto Bwd>
Tensors4 qk_pair_bwd(const at::Tensor& dqo, const at::Tensor& dko, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& q_weight, const at::Tensor& k_weight, const OptTensor& cos,
                     const OptTensor& sin, const OptTensor& token_group, const at::Tensor& rstd_q,
                     const at::Tensor& rstd_k) {
  auto [dq, dqw] = Bwd(dqo, q, q_weight, cos, sin, token_group, rstd_q);
  auto [dk, dkw] = Bwd(dko, k, k_weight, cos, sin, token_group, rstd_k);
  return {dq, dk, dqw, dkw};
}

}  // namespace kiln
