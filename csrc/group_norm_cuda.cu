// GroupNorm (+ modulation, + SiLU) forward and backward on CUDA.
//
// Work split: every (n, g) group is cut into `splits` contiguous chunks, one block each, so that
// batch-1 VAE shapes (N·G = 32 groups) still put ~4 blocks on each of the 132 SMs of an H100
// (PyTorch's kernel runs one block per group there). Forward = 2 kernels: partial sums of the
// chunk (shifted by the group's first element, so fp32 keeps the variance when |mean| >> std),
// then normalise (each block merges its group's partials first). Backward = 2 kernels: per-channel
// A = Σ dm and B = Σ dm·x̂ (thread-local accumulators, flushed to shared memory when the channel
// changes, then one global atomicAdd per channel and block), then dx. Loads and stores are 16-byte
// vectors when the layout allows: NCHW when HW % V == 0, channels-last when C/G % V == 0.
// Traffic: forward reads x twice and writes y once; backward reads x, dy twice and writes dx.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda_utils.cuh"

namespace kiln {
namespace {

constexpr int kThreads = 256;

struct GNDev {  // what the kernels need to walk a group: sizes, splits, layout
  int64_t C, HW, Cg, G, M, chunk;  // M = Cg·HW elements per group, chunk = elements per block
  int splits;
  bool cl;
  // Offset of element e (multiple of V) of group (n, g) and its first channel (within the group).
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t g, int64_t e, int64_t& cl_out) const {
    if (!cl) {
      cl_out = e / HW;
      return (n * C + g * Cg) * HW + e;
    }
    const int64_t s = e / Cg;
    cl_out = e - s * Cg;
    return (n * HW + s) * C + g * Cg + cl_out;
  }
};

// Channel of lane v of a vector whose first element is in channel c (NCHW: all V share it).
__device__ __forceinline__ int64_t lane_channel(const GNDev& d, int64_t c, int v) { return d.cl ? c + v : c; }

__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }

// ---- forward ---------------------------------------------------------------------------------

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_partials(const T* __restrict__ x, GNDev d, float* __restrict__ part) {
  __shared__ float red[32];
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  int64_t c;
  const float shift = static_cast<float>(x[d.offset(n, g, 0, c)]);
  const int64_t lo = split * d.chunk, hi = min(lo + d.chunk, d.M);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t e = lo + threadIdx.x * V; e < hi; e += kThreads * V) {
    const Vec<T, V> xv = load_vec<T, V>(x + d.offset(n, g, e, c));
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float t = static_cast<float>(xv.v[v]) - shift;
      s1 += t;
      s2 += t * t;
    }
  }
  s1 = block_sum(s1, red);
  s2 = block_sum(s2, red);
  if (threadIdx.x == 0) {
    part[(ng * d.splits + split) * 2] = s1;
    part[(ng * d.splits + split) * 2 + 1] = s2;
  }
}

// Merge the group's partials (every block of the group does it: splits <= a few hundred floats).
template <typename T>
__device__ void group_stats(const T* x, const GNDev& d, const float* part, int64_t ng, double eps, float* smem2,
                            float* red) {
  const int64_t n = ng / d.G, g = ng % d.G;
  float s1 = 0.f, s2 = 0.f;
  for (int j = threadIdx.x; j < d.splits; j += blockDim.x) {
    s1 += part[(ng * d.splits + j) * 2];
    s2 += part[(ng * d.splits + j) * 2 + 1];
  }
  s1 = block_sum(s1, red);
  s2 = block_sum(s2, red);
  if (threadIdx.x == 0) {
    int64_t c;
    const float m1 = s1 / d.M;
    const float var = fmaxf(s2 / d.M - m1 * m1, 0.f);
    smem2[0] = static_cast<float>(x[d.offset(n, g, 0, c)]) + m1;  // mean
    smem2[1] = rsqrtf(var + static_cast<float>(eps));             // rstd
  }
  __syncthreads();
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_normalize(const T* __restrict__ x, T* __restrict__ y, GNDev d,
                                                          const float* __restrict__ part, GNParams p, double eps,
                                                          bool silu, float* __restrict__ mean_out,
                                                          float* __restrict__ rstd_out) {
  extern __shared__ float coef[];  // a[Cg], b[Cg]: y = x·a + b per channel
  __shared__ float red[32], stats[2];
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  group_stats(x, d, part, ng, eps, stats, red);
  const float mean = stats[0], rstd = stats[1];
  if (split == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    const int64_t ch = g * d.Cg + cl;
    const float w = p.weight ? p.weight[ch] : 1.f, b = p.bias ? p.bias[ch] : 0.f;
    const float f = p.scale ? 1.f + p.scale[n * d.C + ch] : 1.f, sh = p.shift ? p.shift[n * d.C + ch] : 0.f;
    coef[cl] = rstd * w * f;
    coef[d.Cg + cl] = (b - mean * rstd * w) * f + sh;
  }
  __syncthreads();
  const int64_t lo = split * d.chunk, hi = min(lo + d.chunk, d.M);
  for (int64_t e = lo + threadIdx.x * V; e < hi; e += kThreads * V) {
    int64_t c;
    const int64_t off = d.offset(n, g, e, c);
    const Vec<T, V> xv = load_vec<T, V>(x + off);
    Vec<T, V> yv;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t cv = lane_channel(d, c, v);
      const float m = static_cast<float>(xv.v[v]) * coef[cv] + coef[d.Cg + cv];
      yv.v[v] = static_cast<T>(silu ? m * sigmoidf_(m) : m);
    }
    store_vec<T, V>(y + off, yv);
  }
}

// ---- backward --------------------------------------------------------------------------------

// Per-channel factors of the backward, in shared memory: wf = w·(1+scale) (dx̂ = dm·wf) and the
// pre-activation m = x̂·wf + bf, needed for SiLU's derivative.
__device__ void bwd_coefs(const GNDev& d, const GNParams& p, int64_t n, int64_t g, float* wf, float* bf) {
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += blockDim.x) {
    const int64_t ch = g * d.Cg + cl;
    const float w = p.weight ? p.weight[ch] : 1.f, b = p.bias ? p.bias[ch] : 0.f;
    const float f = p.scale ? 1.f + p.scale[n * d.C + ch] : 1.f, sh = p.shift ? p.shift[n * d.C + ch] : 0.f;
    wf[cl] = w * f;
    bf[cl] = b * f + sh;
  }
}

__device__ __forceinline__ float dm_of(float dy, float m, bool silu) {
  if (!silu) return dy;
  const float sg = sigmoidf_(m);
  return dy * sg * (1.f + m * (1.f - sg));
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_bwd_sums(const T* __restrict__ dy, const T* __restrict__ x, GNDev d,
                                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                                         GNParams p, bool silu, float* __restrict__ A,
                                                         float* __restrict__ B) {
  extern __shared__ float sm[];  // wf[Cg], bf[Cg], sumA[Cg], sumB[Cg]
  float *wf = sm, *bf = sm + d.Cg, *sa = sm + 2 * d.Cg, *sb = sm + 3 * d.Cg;
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  bwd_coefs(d, p, n, g, wf, bf);
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) sa[cl] = sb[cl] = 0.f;
  __syncthreads();
  const float mu = mean[ng], r = rstd[ng];
  int64_t cur[V];
  float acc_a[V], acc_b[V];
#pragma unroll
  for (int v = 0; v < V; ++v) cur[v] = -1, acc_a[v] = acc_b[v] = 0.f;
  const int64_t lo = split * d.chunk, hi = min(lo + d.chunk, d.M);
  for (int64_t e = lo + threadIdx.x * V; e < hi; e += kThreads * V) {
    int64_t c;
    const int64_t off = d.offset(n, g, e, c);
    const Vec<T, V> xv = load_vec<T, V>(x + off), dv = load_vec<T, V>(dy + off);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t cv = lane_channel(d, c, v);
      if (cv != cur[v]) {  // flush: NCHW flushes once per channel run, channels-last rarely
        if (cur[v] >= 0) atomicAdd(sa + cur[v], acc_a[v]), atomicAdd(sb + cur[v], acc_b[v]);
        cur[v] = cv, acc_a[v] = acc_b[v] = 0.f;
      }
      const float xh = (static_cast<float>(xv.v[v]) - mu) * r;
      const float dm = dm_of(static_cast<float>(dv.v[v]), xh * wf[cv] + bf[cv], silu);
      acc_a[v] += dm;
      acc_b[v] += dm * xh;
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (cur[v] >= 0) atomicAdd(sa + cur[v], acc_a[v]), atomicAdd(sb + cur[v], acc_b[v]);
  __syncthreads();
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    atomicAdd(A + n * d.C + g * d.Cg + cl, sa[cl]);
    atomicAdd(B + n * d.C + g * d.Cg + cl, sb[cl]);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                                       GNDev d, const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, GNParams p, bool silu,
                                                       const float* __restrict__ A, const float* __restrict__ B) {
  extern __shared__ float sm[];  // wf[Cg], bf[Cg]
  __shared__ float red[32];
  float *wf = sm, *bf = sm + d.Cg;
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  bwd_coefs(d, p, n, g, wf, bf);
  __syncthreads();
  // mean over the group of dx̂ = dm·wf and of dx̂·x̂, from the per-channel sums.
  float s1 = 0.f, s2 = 0.f;
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    s1 += wf[cl] * A[n * d.C + g * d.Cg + cl];
    s2 += wf[cl] * B[n * d.C + g * d.Cg + cl];
  }
  const float m1 = block_sum(s1, red) / d.M, m2 = block_sum(s2, red) / d.M;
  const float mu = mean[ng], r = rstd[ng];
  const int64_t lo = split * d.chunk, hi = min(lo + d.chunk, d.M);
  for (int64_t e = lo + threadIdx.x * V; e < hi; e += kThreads * V) {
    int64_t c;
    const int64_t off = d.offset(n, g, e, c);
    const Vec<T, V> xv = load_vec<T, V>(x + off), dv = load_vec<T, V>(dy + off);
    Vec<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t cv = lane_channel(d, c, v);
      const float xh = (static_cast<float>(xv.v[v]) - mu) * r;
      const float dm = dm_of(static_cast<float>(dv.v[v]), xh * wf[cv] + bf[cv], silu);
      out.v[v] = static_cast<T>(r * (dm * wf[cv] - m1 - xh * m2));
    }
    store_vec<T, V>(dx + off, out);
  }
}

// ---- host side -------------------------------------------------------------------------------

// Vector width for this layout (16-byte vectors when every vector stays inside one run).
template <typename T>
int vec_width(const GNShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int V = max_vec<T>();
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  const bool ok = s.channels_last ? s.Cg % V == 0 : s.HW % V == 0;
  return ok ? V : 1;
}

GNDev make_dev(const GNShape& s, int V) {
  GNDev d{s.C, s.HW, s.Cg, s.G, s.group_size(), 0, 1, s.channels_last};
  // ~4 blocks per SM in all, each chunk at least 4 vectors per thread and a multiple of V.
  const int64_t target = 4LL * sm_count(), groups = s.N * s.G;
  const int64_t min_chunk = int64_t(kThreads) * V * 4;
  int64_t splits = std::max<int64_t>(1, (target + groups - 1) / groups);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (d.M + min_chunk - 1) / min_chunk));
  splits = std::min<int64_t>(splits, 1024);
  int64_t chunk = (d.M + splits - 1) / splits;
  chunk = (chunk + V - 1) / V * V;
  d.splits = static_cast<int>((d.M + chunk - 1) / chunk);
  d.chunk = chunk;
  return d;
}

constexpr int64_t kMaxCg = 6144;  // 4·Cg fp32 of shared memory in gn_bwd_sums must fit in 96 KB

// Dynamic shared memory of `floats` fp32 for `kernel`, opting in above the default 48 KB.
template <typename Kernel>
size_t smem_floats(Kernel kernel, int64_t floats) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  return bytes;
}

template <typename T, int V>
void launch_fwd(const GNPrepared& pr, const GNDev& d, double eps, bool silu, at::Tensor& y, at::Tensor& mean,
                at::Tensor& rstd, cudaStream_t stream) {
  at::Tensor part = at::empty({pr.s.N * pr.s.G, d.splits, 2}, mean.options());
  const dim3 grid(d.splits, pr.s.N * pr.s.G);
  const T* x = pr.x.const_data_ptr<T>();
  gn_partials<T, V><<<grid, kThreads, 0, stream>>>(x, d, part.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem = smem_floats(gn_normalize<T, V>, 2 * d.Cg);
  gn_normalize<T, V><<<grid, kThreads, smem, stream>>>(x, y.data_ptr<T>(), d, part.data_ptr<float>(), pr.params(),
                                                       eps, silu, mean.data_ptr<float>(), rstd.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void launch_bwd(const GNPrepared& pr, const GNDev& d, bool silu, const at::Tensor& dy, const at::Tensor& mean,
                const at::Tensor& rstd, at::Tensor& dx, at::Tensor& A, at::Tensor& B, cudaStream_t stream) {
  const dim3 grid(d.splits, pr.s.N * pr.s.G);
  const T *x = pr.x.const_data_ptr<T>(), *dyp = dy.const_data_ptr<T>();
  gn_bwd_sums<T, V><<<grid, kThreads, smem_floats(gn_bwd_sums<T, V>, 4 * d.Cg), stream>>>(dyp, x, d, mean.const_data_ptr<float>(),
                                                      rstd.const_data_ptr<float>(), pr.params(), silu,
                                                      A.data_ptr<float>(), B.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gn_bwd_dx<T, V><<<grid, kThreads, smem_floats(gn_bwd_dx<T, V>, 2 * d.Cg), stream>>>(dyp, x, dx.data_ptr<T>(), d, mean.const_data_ptr<float>(),
                                                    rstd.const_data_ptr<float>(), pr.params(), silu,
                                                    A.const_data_ptr<float>(), B.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda_shape(const GNShape& s) {
  KILN_CHECK(s.Cg <= kMaxCg, "group_norm (CUDA): C/G = ", s.Cg, " channels per group exceeds ", kMaxCg,
             " (shared-memory bound)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, double eps, std::string activation) {
  const bool silu = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  check_cuda_shape(pr.s);
  at::Tensor y = at::empty_like(pr.x);
  at::Tensor mean = at::empty({pr.s.N, pr.s.G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_fwd_cuda", [&] {
    constexpr int VMAX = max_vec<scalar_t>();
    if (vec_width<scalar_t>(pr.s, {pr.x.const_data_ptr(), y.const_data_ptr()}) == VMAX)
      launch_fwd<scalar_t, VMAX>(pr, make_dev(pr.s, VMAX), eps, silu, y, mean, rstd, stream);
    else
      launch_fwd<scalar_t, 1>(pr, make_dev(pr.s, 1), eps, silu, y, mean, rstd, stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, int64_t num_groups,
    std::string activation) {
  // per-channel sums use atomicAdd (shared, then global): fp32 summation order varies run to run
  at::globalContext().alertNotDeterministic("kiln_ext::group_norm_bwd (CUDA)");
  const bool silu = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  check_cuda_shape(pr.s);
  KILN_CHECK(dy.sizes() == x.sizes(), "group_norm backward: dy ", dy.sizes(), " != x ", x.sizes());
  const at::Tensor dyc = dy.to(pr.x.scalar_type()).contiguous(gn_memory_format(pr.x));
  const at::Tensor mc = mean.to(at::kFloat).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(pr.x);
  at::Tensor A = at::zeros({pr.s.N, pr.s.C}, x.options().dtype(at::kFloat));
  at::Tensor B = at::zeros_like(A);
  if (x.numel() == 0) return {dx, A, B};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_bwd_cuda", [&] {
    constexpr int VMAX = max_vec<scalar_t>();
    if (vec_width<scalar_t>(pr.s, {pr.x.const_data_ptr(), dyc.const_data_ptr(), dx.const_data_ptr()}) == VMAX)
      launch_bwd<scalar_t, VMAX>(pr, make_dev(pr.s, VMAX), silu, dyc, mc, rc, dx, A, B, stream);
    else
      launch_bwd<scalar_t, 1>(pr, make_dev(pr.s, 1), silu, dyc, mc, rc, dx, A, B, stream);
  });
  return {dx, A, B};
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln_ext, CUDA, m) {
  m.impl("group_norm_fwd", &kiln::group_norm_fwd_cuda);
  m.impl("group_norm_bwd", &kiln::group_norm_bwd_cuda);
}
