// QK RMSNorm + rotate-half RoPE on CUDA, forward and backward: a warp per item of R rows, the
// heads h0 .. h0 + R - 1 of one token (b, s) (R = rows_per_item: 4 for bf16 at D = 128).
//
// Lane l holds the P contiguous pairs (j, j + D/2) for j = l·P .. l·P + P - 1 < D/2, so the
// rotate-half partner of every element it owns is in its own registers (no shuffles for RoPE) and,
// when P is 2 or 4 and the row is aligned, each half moves as one P-element vector (bf16 D = 128:
// 4-byte loads, D = 256: 8-byte; fp32 tables 8-16 bytes) instead of P scalar loads. The row's sum
// of squares is one warp reduction. Rows are read through their (b, s, h) strides, so q and k may
// be views of a packed (B, S, 3, H, D) QKV; a warp steps through its items with carries instead of
// three 64-bit divisions per item: each is a CALL of a ~70-instruction emulation, and at D = 128 a
// lane moves 16 bytes per row, for which an H100 at copy speed can issue only ~180 instructions.
// D <= 256 -> P <= 4.
// Why items of one token's heads: the token's tables (its weight row, cos and sin: 6·P fp32 a
// lane, 1 KB a warp at D = 128, four times the row's 256 bytes of bf16 x) are loaded once for
// the item's rows, together with them, where a warp per row loaded them for every row, after the
// row's reduction: a second round trip each. The rows' loads all go out before any is used.
// The weight gradient (G, D) is deterministic: each warp accumulates its rows into its own (G, D)
// slice of shared memory (a lane owns its columns: no atomics), the block adds its 8 slices in
// order into one (G, D) partial, and column_sums adds the blocks' partials in order (grid capped
// at 8 blocks per SM: ~1k partials, 1 MB at G·D = 256).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda_utils.cuh"

namespace kiln {
namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps;

struct RopeDev {
  RowShape shape;
  const float *w, *cos, *sin;  // w (G, D); cos, sin (S, D) or nullptr
  const int64_t* tg;           // (S,) or nullptr
};

RopeDev make_dev(const RopeArgs& a) {
  return {a.shape, a.weight.const_data_ptr<float>(),
          a.cos.defined() ? a.cos.const_data_ptr<float>() : nullptr,
          a.sin.defined() ? a.sin.const_data_ptr<float>() : nullptr,
          a.token_group.defined() ? a.token_group.const_data_ptr<int64_t>() : nullptr};
}

// Rows per item (the loads a warp has in flight before it uses any): 4 for 16-bit types, fewer
// for 4- and 8-byte types at D > 64, whose rows at 4 spilled (fp32 at D = 128: 8 bytes). A warp
// per row (48 registers, 5 blocks of 8 warps per SM) held 10 KB of x in flight per SM at bf16
// D = 128, a third of what streaming at copy speed asks (~32 KB: ~4.3 TB/s x ~1 µs over 132 SMs,
// Little's law). sm_90a, 2026-12-02, bf16: forward 64 registers at D = 128 (4 blocks: 32 KB of x
// in flight) and 104 at 256 (2 blocks: 32 KB); backward 122 and 188 (2 and 1 blocks: 32 KB of
// x and dy).
template <typename T, int P>
constexpr int rows_per_item() {
  return sizeof(T) <= 2 || P == 1 ? 4 : P == 2 ? 2 : 1;
}

// This warp's items i = first, first + step, ... of the (B, S, C) grid of items, C = ceil(H / R)
// per token (R rows per item), advanced by adding the step's (b, s, c) digits with carries
// (step_c < C and step_s < S, so one carry each).
template <int R>
struct ItemWalk {
  int64_t i, b, s, c, C, step, step_b, step_s, step_c;
  __device__ ItemWalk(const RowShape& sh, int64_t first, int64_t step_) : i(first), C((sh.H + R - 1) / R) {
    b = first / (sh.S * C), s = (first / C) % sh.S, c = first % C;
    step = step_, step_b = step_ / (sh.S * C), step_s = (step_ / C) % sh.S, step_c = step_ % C;
  }
  __device__ __forceinline__ void next(const RowShape& sh) {
    i += step, c += step_c, s += step_s, b += step_b;
    if (c >= C) c -= C, ++s;
    if (s >= sh.S) s -= sh.S, ++b;
  }
  __device__ __forceinline__ bool more(const RowShape& sh) const { return i < sh.B * sh.S * C; }
  __device__ __forceinline__ int64_t h0() const { return c * R; }
  __device__ __forceinline__ int rows(const RowShape& sh) const {  // < R in a token's last item
    return static_cast<int>(min(int64_t(R), sh.H - h0()));
  }
  __device__ __forceinline__ int64_t row(const RowShape& sh, int u) const { return (b * sh.S + s) * sh.H + h0() + u; }
  __device__ __forceinline__ int64_t offset(const RowShape& sh, int u) const {
    return b * sh.sb + s * sh.ss + (h0() + u) * sh.sh;
  }
};

template <int R>
__device__ __forceinline__ ItemWalk<R> warp_items(const RowShape& sh) {
  return ItemWalk<R>(sh, int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5), int64_t(gridDim.x) * kWarps);
}

// Elements j0 .. j0 + P - 1 of p as floats (0 past `end`): one P-wide vector when VEC (then
// end % P == 0, so a lane's P elements are all in range or all out), else P scalar loads.
template <int P, bool VEC, typename T>
__device__ __forceinline__ void load_part(const T* p, int64_t j0, int64_t end, float (&out)[P]) {
  if constexpr (VEC) {
    if (j0 < end) {
      const Vec<T, P> v = load_vec<T, P>(p + j0);
#pragma unroll
      for (int q = 0; q < P; ++q) out[q] = static_cast<float>(v.v[q]);
    } else {
#pragma unroll
      for (int q = 0; q < P; ++q) out[q] = 0.f;
    }
  } else {
#pragma unroll
    for (int q = 0; q < P; ++q) out[q] = j0 + q < end ? static_cast<float>(p[j0 + q]) : 0.f;
  }
}

template <int P, bool VEC, typename T>
__device__ __forceinline__ void store_part(T* p, int64_t j0, int64_t end, const float (&in)[P]) {
  if constexpr (VEC) {
    if (j0 >= end) return;
    Vec<T, P> v;
#pragma unroll
    for (int q = 0; q < P; ++q) v.v[q] = static_cast<T>(in[q]);
    store_vec<T, P>(p + j0, v);
  } else {
#pragma unroll
    for (int q = 0; q < P; ++q)
      if (j0 + q < end) p[j0 + q] = static_cast<T>(in[q]);
  }
}

// Token s's weight row, or -1 when token_group[s] is outside [0, G): the host checks the values
// only of CPU tensors (a check here would sync the GPU every call), so a bad one makes that
// token's rows NaN instead of reading, and in the backward adding to, memory past the (G, D) weight.
__device__ __forceinline__ int64_t weight_row(const RopeDev& d, int64_t s) {
  const int64_t g = d.tg ? d.tg[s] : 0;
  return g >= 0 && g < d.shape.G ? g : -1;
}

// The tables a lane needs for row token s: weights (lo, hi halves; NaN for row g = -1) and, with
// RoPE, cos and sin.
template <int P, bool VEC>
struct RowTables {
  float w_lo[P], w_hi[P], c_lo[P], c_hi[P], s_lo[P], s_hi[P];
  __device__ __forceinline__ RowTables(const RopeDev& d, int64_t s, int64_t g, int64_t j0) {
    const int64_t D = d.shape.D, h2 = D / 2;
    if (g >= 0) {
      load_part<P, VEC>(d.w + g * D, j0, h2, w_lo);
      load_part<P, VEC>(d.w + g * D + h2, j0, h2, w_hi);
    } else {
#pragma unroll
      for (int p = 0; p < P; ++p) w_lo[p] = w_hi[p] = nanf("");
    }
    if (d.cos) {
      load_part<P, VEC>(d.cos + s * D, j0, h2, c_lo);
      load_part<P, VEC>(d.cos + s * D + h2, j0, h2, c_hi);
      load_part<P, VEC>(d.sin + s * D, j0, h2, s_lo);
      load_part<P, VEC>(d.sin + s * D + h2, j0, h2, s_hi);
    }
  }
};

template <typename T, int P, bool VEC>
__global__ void __launch_bounds__(kThreads) norm_rope_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  float* __restrict__ rstd, RopeDev d, float eps) {
  constexpr int R = rows_per_item<T, P>();
  const int lane = threadIdx.x & 31;
  const int64_t D = d.shape.D, h2 = D / 2, j0 = int64_t(lane) * P;
  for (ItemWalk<R> w = warp_items<R>(d.shape); w.more(d.shape); w.next(d.shape)) {
    const int n = w.rows(d.shape);  // the same for the whole warp (warp_sum below)
    float lo[R][P], hi[R][P];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (u >= n) continue;
      load_part<P, VEC>(x + w.offset(d.shape, u), j0, h2, lo[u]);
      load_part<P, VEC>(x + w.offset(d.shape, u) + h2, j0, h2, hi[u]);
    }
    const RowTables<P, VEC> t(d, w.s, weight_row(d, w.s), j0);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (u >= n) continue;
      float sq = 0.f;
#pragma unroll
      for (int p = 0; p < P; ++p) sq += lo[u][p] * lo[u][p] + hi[u][p] * hi[u][p];
      const float rs = rsqrtf(warp_sum(sq) / D + eps);
      const int64_t r = w.row(d.shape, u);
      if (lane == 0) rstd[r] = rs;
      float out_lo[P], out_hi[P];
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const float a = lo[u][p] * rs * t.w_lo[p], b = hi[u][p] * rs * t.w_hi[p];
        out_lo[p] = d.cos ? a * t.c_lo[p] - b * t.s_lo[p] : a;
        out_hi[p] = d.cos ? b * t.c_hi[p] + a * t.s_hi[p] : b;
      }
      store_part<P, VEC>(y + r * D, j0, h2, out_lo);
      store_part<P, VEC>(y + r * D + h2, j0, h2, out_hi);
    }
  }
}

// One row of the backward from its loaded dy and x halves: dx stored, the weight-gradient terms
// added to this warp's slice dw_w (lane-owned columns: no atomics).
template <int P, bool VEC, typename T>
__device__ __forceinline__ void row_bwd(const RopeDev& d, const RowTables<P, VEC>& t, int64_t r, int64_t g,
                                        int64_t j0, float rs, const float (&da)[P], const float (&db)[P],
                                        float (&xh_lo)[P], float (&xh_hi)[P], T* __restrict__ dx, float* dw_w) {
  const int64_t D = d.shape.D, h2 = D / 2;
  float dn_lo[P], dn_hi[P];
  float dot = 0.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    // transpose of the rotation, then x̂ = x·rstd
    dn_lo[p] = d.cos ? da[p] * t.c_lo[p] + db[p] * t.s_hi[p] : da[p];
    dn_hi[p] = d.cos ? db[p] * t.c_hi[p] - da[p] * t.s_lo[p] : db[p];
    xh_lo[p] *= rs, xh_hi[p] *= rs;
    dot += dn_lo[p] * t.w_lo[p] * xh_lo[p] + dn_hi[p] * t.w_hi[p] * xh_hi[p];
  }
  dot = warp_sum(dot) / D;
  float out_lo[P], out_hi[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    out_lo[p] = rs * (dn_lo[p] * t.w_lo[p] - xh_lo[p] * dot);
    out_hi[p] = rs * (dn_hi[p] * t.w_hi[p] - xh_hi[p] * dot);
    if (j0 + p < h2 && g >= 0) {
      dw_w[g * D + j0 + p] += dn_lo[p] * xh_lo[p];
      dw_w[g * D + h2 + j0 + p] += dn_hi[p] * xh_hi[p];
    }
  }
  store_part<P, VEC>(dx + r * D, j0, h2, out_lo);
  store_part<P, VEC>(dx + r * D + h2, j0, h2, out_hi);
}

template <typename T, int P, bool VEC>
__global__ void __launch_bounds__(kThreads) norm_rope_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  const float* __restrict__ rstd, T* __restrict__ dx,
                                                                  float* __restrict__ dw_part, RopeDev d) {
  KILN_DYNAMIC_SMEM(float, dw_s);  // (kWarps, G, D): one slice per warp
  const int64_t gd = d.shape.G * d.shape.D;
  for (int64_t i = threadIdx.x; i < kWarps * gd; i += kThreads) dw_s[i] = 0.f;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  float* dw_w = dw_s + (threadIdx.x >> 5) * gd;
  constexpr int R = rows_per_item<T, P>();
  const int64_t D = d.shape.D, h2 = D / 2, j0 = int64_t(lane) * P;
  for (ItemWalk<R> w = warp_items<R>(d.shape); w.more(d.shape); w.next(d.shape)) {
    const int n = w.rows(d.shape);  // the same for the whole warp (warp_sum in row_bwd)
    float dy_lo[R][P], dy_hi[R][P], x_lo[R][P], x_hi[R][P], rs[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (u >= n) continue;
      const int64_t r = w.row(d.shape, u), off = w.offset(d.shape, u);
      rs[u] = rstd[r];
      load_part<P, VEC>(dy + r * D, j0, h2, dy_lo[u]);
      load_part<P, VEC>(dy + r * D + h2, j0, h2, dy_hi[u]);
      load_part<P, VEC>(x + off, j0, h2, x_lo[u]);
      load_part<P, VEC>(x + off + h2, j0, h2, x_hi[u]);
    }
    const int64_t g = weight_row(d, w.s);
    const RowTables<P, VEC> t(d, w.s, g, j0);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (u >= n) continue;
      row_bwd<P, VEC>(d, t, w.row(d.shape, u), g, j0, rs[u], dy_lo[u], dy_hi[u], x_lo[u], x_hi[u], dx, dw_w);
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < gd; i += kThreads) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += dw_s[w * gd + i];
    dw_part[blockIdx.x * gd + i] = t;
  }
}

template <typename T, int P>
int grid_for(const RowShape& sh) {
  constexpr int R = rows_per_item<T, P>();
  const int64_t items = sh.B * sh.S * ((sh.H + R - 1) / R);
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8LL * sm_count())));
}

// kWarps (G, D) fp32 weight-gradient slices in shared memory: 8 · 3072 · 4 B = 96 KB, the most
// every sm_80+ GPU grants one block (G = 2, D = 128: 8 KB).
constexpr int64_t kMaxGD = 3072;

// Whether P-element vectors are legal: P = 2 or 4, D/2 a multiple of P (a lane's P elements are
// all in range or all out), x's strides multiples of P and every pointer aligned to its vector.
bool vectors_ok(const RopeArgs& a, int P, std::initializer_list<const at::Tensor*> rows) {
  const RowShape& sh = a.shape;
  if ((P != 2 && P != 4) || (sh.D / 2) % P || sh.sb % P || sh.ss % P || sh.sh % P) return false;
  auto aligned = [P](const at::Tensor& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (P * t.element_size()) == 0;
  };
  for (const at::Tensor* t : rows)
    if (!aligned(*t)) return false;
  return aligned(a.weight) && aligned(a.cos) && aligned(a.sin);
}

// Calls f(P, VEC) as integral constants for this head dim (P = ceil(D/2 / 32) pairs per lane);
// C++17 generic lambdas (the GPU machines' torch 2.11 builds with -std=c++17).
template <typename F>
void with_pairs(int64_t D, bool vec, F&& f) {
  using std::integral_constant;
  const int64_t pairs = (D / 2 + 31) / 32;
  if (pairs == 2 && vec)
    f(integral_constant<int, 2>{}, std::true_type{});
  else if (pairs == 4 && vec)
    f(integral_constant<int, 4>{}, std::true_type{});
  else if (pairs <= 1)
    f(integral_constant<int, 1>{}, std::false_type{});
  else if (pairs == 2)
    f(integral_constant<int, 2>{}, std::false_type{});
  else if (pairs == 3)
    f(integral_constant<int, 3>{}, std::false_type{});
  else
    f(integral_constant<int, 4>{}, std::false_type{});
}

void check_cuda(const RopeArgs& a) {
  KILN_CHECK(a.shape.D <= 256, "qk_norm_rope (CUDA): head dim ", a.shape.D, " exceeds 256");
  KILN_CHECK(a.shape.G * a.shape.D <= kMaxGD, "qk_norm_rope (CUDA): G·D = ", a.shape.G * a.shape.D, " exceeds ",
             kMaxGD);
}

std::tuple<at::Tensor, at::Tensor> norm_rope_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group, double eps) {
  const DeviceGuard guard(x);
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  check_cuda(a);
  const RowShape& sh = a.shape;
  at::Tensor y = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor rstd = at::empty({sh.B, sh.S, sh.H}, x.options().dtype(at::kFloat));
  if (sh.rows() == 0) return {y, rstd};
  const RopeDev d = make_dev(a);
  const cudaStream_t stream = current_stream();
  const bool vec = vectors_ok(a, static_cast<int>((sh.D / 2 + 31) / 32), {&a.x, &y});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_fwd_cuda", [&] {
    with_pairs(sh.D, vec, [&](auto pairs, auto vector) {
      constexpr int P = decltype(pairs)::value;
      constexpr bool VEC = decltype(vector)::value;
      KILN_LAUNCH(norm_rope_fwd_kernel<scalar_t, P, VEC>, grid_for<scalar_t, P>(sh), kThreads, 0, stream,
                  a.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<float>(), d,
                  static_cast<float>(eps));
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> norm_rope_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group,
                                                 const at::Tensor& rstd) {
  const DeviceGuard guard(x);
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  check_cuda(a);
  const RowShape& sh = a.shape;
  KILN_CHECK(dy.sizes() == x.sizes(), "qk_norm_rope backward: gradient ", dy.sizes(), " != input ", x.sizes());
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor dw = at::zeros({sh.G, sh.D}, x.options().dtype(at::kFloat));  // zeros when there are no rows
  if (sh.rows() > 0) {
    const RopeDev d = make_dev(a);
    const cudaStream_t stream = current_stream();
    int grid = 0;
    at::Tensor part;  // (grid, G·D): each block's weight-gradient partial
    const bool vec = vectors_ok(a, static_cast<int>((sh.D / 2 + 31) / 32), {&a.x, &dyc, &dx});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_bwd_cuda", [&] {
      with_pairs(sh.D, vec, [&](auto pairs, auto vector) {
        constexpr int P = decltype(pairs)::value;
        constexpr bool VEC = decltype(vector)::value;
        grid = grid_for<scalar_t, P>(sh);
        part = at::empty({grid, sh.G * sh.D}, dw.options());
        auto kernel = norm_rope_bwd_kernel<scalar_t, P, VEC>;
        KILN_LAUNCH(kernel, grid, kThreads, smem_floats(kernel, kWarps * sh.G * sh.D), stream,
                    dyc.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), rc.const_data_ptr<float>(),
                    dx.data_ptr<scalar_t>(), part.data_ptr<float>(), d);
      });
    });
    const int64_t gd = sh.G * sh.D;
    launch_column_sums(part.const_data_ptr<float>(), 1, grid, gd, gd, dw.data_ptr<float>(), nullptr, stream);
  }
  return {dx, dw.reshape(weight.sizes()).to(weight.scalar_type())};
}

}  // namespace
}  // namespace kiln

KILN_CUDA_IMPL(m) {
  m.impl("qk_norm_rope_fwd", &kiln::qk_pair_fwd<&kiln::norm_rope_fwd>);
  m.impl("qk_norm_rope_bwd", &kiln::qk_pair_bwd<&kiln::norm_rope_bwd>);
}
