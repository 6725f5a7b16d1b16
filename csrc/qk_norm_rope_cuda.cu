// QK RMSNorm + rotate-half RoPE on CUDA, forward and backward: one warp per (b, s, h) row.
//
// Lane l holds the pairs (j, j + D/2) for j = l, l + 32, ... < D/2, so the rotate-half partner of
// every element it owns is in its own registers (no shuffles for RoPE); the row's sum of squares
// is one warp reduction. Rows are read through their (b, s, h) strides, so q and k may be views
// of a packed (B, S, 3, H, D) QKV. D <= 256 -> at most 4 pairs per lane (template P).
// The weight gradient (G, D) is deterministic: each warp accumulates its rows into its own (G, D)
// slice of shared memory (a lane owns its columns: no atomics), the block adds its 8 slices in
// order into one (G, D) partial, and column_sums adds the blocks' partials in order (grid capped
// at 8 blocks per SM: ~1k partials, 1 MB at G·D = 256).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

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

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) norm_rope_fwd_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                  float* __restrict__ rstd, RopeDev d, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t h2 = d.shape.D / 2;
  const int64_t rows = d.shape.rows();
  for (int64_t r = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * kWarps) {
    int64_t s;
    const T* xr = x + d.shape.offset(r, s);
    float lo[P], hi[P];
    float sq = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = lane + 32 * p;
      lo[p] = j < h2 ? static_cast<float>(xr[j]) : 0.f;
      hi[p] = j < h2 ? static_cast<float>(xr[j + h2]) : 0.f;
      sq += lo[p] * lo[p] + hi[p] * hi[p];
    }
    const float rs = rsqrtf(warp_sum(sq) / d.shape.D + eps);
    if (lane == 0) rstd[r] = rs;
    const float* w = d.w + (d.tg ? d.tg[s] : 0) * d.shape.D;
    T* yr = y + r * d.shape.D;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = lane + 32 * p;
      if (j >= h2) continue;
      const float a = lo[p] * rs * w[j], b = hi[p] * rs * w[j + h2];
      if (d.cos) {
        const float* c = d.cos + s * d.shape.D;
        const float* sn = d.sin + s * d.shape.D;
        yr[j] = static_cast<T>(a * c[j] - b * sn[j]);
        yr[j + h2] = static_cast<T>(b * c[j + h2] + a * sn[j + h2]);
      } else {
        yr[j] = static_cast<T>(a);
        yr[j + h2] = static_cast<T>(b);
      }
    }
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) norm_rope_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  const float* __restrict__ rstd, T* __restrict__ dx,
                                                                  float* __restrict__ dw_part, RopeDev d) {
  extern __shared__ float dw_s[];  // (kWarps, G, D): one slice per warp
  const int64_t gd = d.shape.G * d.shape.D;
  for (int64_t i = threadIdx.x; i < kWarps * gd; i += kThreads) dw_s[i] = 0.f;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  float* dw_w = dw_s + (threadIdx.x >> 5) * gd;
  const int64_t h2 = d.shape.D / 2;
  const int64_t rows = d.shape.rows();
  for (int64_t r = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * kWarps) {
    int64_t s;
    const T* xr = x + d.shape.offset(r, s);
    const T* dyr = dy + r * d.shape.D;
    const int64_t g = d.tg ? d.tg[s] : 0;
    const float* w = d.w + g * d.shape.D;
    const float rs = rstd[r];
    float dn_lo[P], dn_hi[P], xh_lo[P], xh_hi[P];
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = lane + 32 * p;
      dn_lo[p] = dn_hi[p] = xh_lo[p] = xh_hi[p] = 0.f;
      if (j >= h2) continue;
      const float da = static_cast<float>(dyr[j]), db = static_cast<float>(dyr[j + h2]);
      if (d.cos) {  // transpose of the rotation
        const float* c = d.cos + s * d.shape.D;
        const float* sn = d.sin + s * d.shape.D;
        dn_lo[p] = da * c[j] + db * sn[j + h2];
        dn_hi[p] = db * c[j + h2] - da * sn[j];
      } else {
        dn_lo[p] = da, dn_hi[p] = db;
      }
      xh_lo[p] = static_cast<float>(xr[j]) * rs;
      xh_hi[p] = static_cast<float>(xr[j + h2]) * rs;
      dot += dn_lo[p] * w[j] * xh_lo[p] + dn_hi[p] * w[j + h2] * xh_hi[p];
    }
    dot = warp_sum(dot) / d.shape.D;
    T* dxr = dx + r * d.shape.D;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = lane + 32 * p;
      if (j >= h2) continue;
      dxr[j] = static_cast<T>(rs * (dn_lo[p] * w[j] - xh_lo[p] * dot));
      dxr[j + h2] = static_cast<T>(rs * (dn_hi[p] * w[j + h2] - xh_hi[p] * dot));
      dw_w[g * d.shape.D + j] += dn_lo[p] * xh_lo[p];
      dw_w[g * d.shape.D + j + h2] += dn_hi[p] * xh_hi[p];
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

int grid_for(int64_t rows) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8LL * sm_count())));
}

// kWarps (G, D) fp32 weight-gradient slices in shared memory: 8 · 3072 · 4 B = 96 KB, the most
// every sm_80+ GPU grants one block (G = 2, D = 128: 8 KB).
constexpr int64_t kMaxGD = 3072;

#define KILN_PAIRS_SWITCH(D, ...)          \
  [&] {                                    \
    const int64_t pairs = ((D) / 2 + 31) / 32; \
    if (pairs <= 1) {                      \
      constexpr int P = 1;                 \
      __VA_ARGS__();                       \
    } else if (pairs == 2) {               \
      constexpr int P = 2;                 \
      __VA_ARGS__();                       \
    } else if (pairs == 3) {               \
      constexpr int P = 3;                 \
      __VA_ARGS__();                       \
    } else {                               \
      constexpr int P = 4;                 \
      __VA_ARGS__();                       \
    }                                      \
  }()

void check_cuda(const RopeArgs& a) {
  KILN_CHECK(a.shape.D <= 256, "qk_norm_rope (CUDA): head dim ", a.shape.D, " exceeds 256");
  KILN_CHECK(a.shape.G * a.shape.D <= kMaxGD, "qk_norm_rope (CUDA): G·D = ", a.shape.G * a.shape.D, " exceeds ",
             kMaxGD);
}

std::tuple<at::Tensor, at::Tensor> norm_rope_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  check_cuda(a);
  const RowShape& sh = a.shape;
  at::Tensor y = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor rstd = at::empty({sh.B, sh.S, sh.H}, x.options().dtype(at::kFloat));
  if (sh.rows() == 0) return {y, rstd};
  const RopeDev d = make_dev(a);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_fwd_cuda", [&] {
    KILN_PAIRS_SWITCH(sh.D, [&] {
      norm_rope_fwd_kernel<scalar_t, P><<<grid_for(sh.rows()), kThreads, 0, stream>>>(
          a.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<float>(), d, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> norm_rope_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& cos,
                                                 const c10::optional<at::Tensor>& sin,
                                                 const c10::optional<at::Tensor>& token_group,
                                                 const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RopeArgs a = rope_args(x, weight, cos, sin, token_group);
  check_cuda(a);
  const RowShape& sh = a.shape;
  KILN_CHECK(dy.sizes() == x.sizes(), "qk_norm_rope backward: gradient ", dy.sizes(), " != input ", x.sizes());
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty({sh.B, sh.S, sh.H, sh.D}, x.options());
  at::Tensor dw = at::zeros({sh.G, sh.D}, x.options().dtype(at::kFloat));  // zeros when there are no rows
  if (sh.rows() > 0) {
    const RopeDev d = make_dev(a);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int grid = grid_for(sh.rows());
    at::Tensor part = at::empty({grid, sh.G * sh.D}, dw.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kiln_norm_rope_bwd_cuda", [&] {
      KILN_PAIRS_SWITCH(sh.D, [&] {
        auto kernel = norm_rope_bwd_kernel<scalar_t, P>;
        kernel<<<grid, kThreads, smem_floats(kernel, kWarps * sh.G * sh.D), stream>>>(
            dyc.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), rc.const_data_ptr<float>(),
            dx.data_ptr<scalar_t>(), part.data_ptr<float>(), d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    const int64_t gd = sh.G * sh.D;
    launch_column_sums(part.const_data_ptr<float>(), 1, grid, gd, gd, dw.data_ptr<float>(), nullptr, stream);
  }
  return {dx, dw.reshape(weight.sizes()).to(weight.scalar_type())};
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln_ext, CUDA, m) {
  m.impl("qk_norm_rope_fwd", &kiln::qk_pair_fwd<&kiln::norm_rope_fwd>);
  m.impl("qk_norm_rope_bwd", &kiln::qk_pair_bwd<&kiln::norm_rope_bwd>);
}
