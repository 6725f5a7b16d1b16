// GroupNorm (+ modulation, + SiLU) forward and backward on CUDA. Deterministic: every reduction
// across threads or blocks runs in a fixed order (block_sum, column_sums), no atomics.
//
// NCHW: a group's Cg·HW elements are contiguous, so every (n, g) group is cut into `splits`
// contiguous chunks, one block each: batch-1 VAE shapes (N·G = 32 groups) still put ~3 blocks on
// each of the 132 SMs of an H100 (PyTorch's kernel runs one block per group there). Loads are
// 16-byte vectors when HW % V == 0.
//   forward:  gn_partials (shifted Σ, Σ² of each chunk: exact when |mean| >> std) -> gn_normalize
//             (each block merges its group's partials, then y = x·a_c + b_c).
//   backward: gn_bwd_partials (per channel piece of each chunk: A = Σ dm, B = Σ dm·x̂, reduced by a
//             warp or the whole block) -> gn_bwd_channel_sums (A, B per (n, c): the few chunks
//             that overlap the channel, in order) -> gn_bwd_dx.
// Channels-last: one group's channels are Cg·itemsize bytes of a token row (8 bytes at C = 128,
// G = 32, bf16), so per-group blocks would use 8 of every 32-byte sector and scalar loads. Instead
// a block owns a chunk of tokens of one sample and all C channels; thread (row lane, channel
// vector) keeps per-channel sums in registers, and per-channel partials are merged per group later.
//   forward:  gn_cl_partials (per channel Σ(x - p_c), Σ(x - p_c)², p_c the channel's first token)
//             -> column_sums over chunks -> gn_cl_stats (per (n, g): mean, rstd and per-channel
//             a_c, b_c) -> gn_cl_apply (y = act(x·a_c + b_c)).
//   backward: gn_cl_bwd_partials (per channel A, B) -> column_sums (= the A, B outputs) ->
//             gn_cl_bwd_coefs (per channel dx = a·dm + q·x + k) -> gn_cl_dx.
// Traffic (both layouts): forward reads x twice and writes y; backward reads x, dy twice and
// writes dx; the partials are O(N·splits·C) floats. The second read walks the chunks backwards
// (reversed_x), so up to an L2's worth of it comes from L2 rather than HBM.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "common.h"
#include "cuda_utils.cuh"

namespace kiln {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }

// dL/dm (m the pre-activation output) from dy and m.
__device__ __forceinline__ float dm_of(float dy, float m, bool silu) {
  if (!silu) return dy;
  const float sg = sigmoidf_(m);
  return dy * sg * (1.f + m * (1.f - sg));
}

// The second passes (the y and dx kernels) take their blocks' chunks in the reverse order of the
// first: blocks start roughly in blockIdx order, so the chunks the first pass read last, still
// in L2 (50 MB on an H100, 60 MB on an H200), are re-read first (Triton's _program(REVERSE)).
__device__ __forceinline__ int reversed_x() { return static_cast<int>(gridDim.x - 1 - blockIdx.x); }
__device__ __forceinline__ int64_t reversed_y() { return int64_t(gridDim.y) - 1 - blockIdx.y; }

// ================================ NCHW ========================================================

struct GNDev {  // what the NCHW kernels need to walk a group: sizes and splits
  int64_t C, HW, Cg, G, M, chunk;  // M = Cg·HW elements per group, chunk = elements per block
  int splits;
  // Offset of element e of group (n, g): the group is contiguous, e = channel-in-group·HW + s.
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t g, int64_t e) const { return (n * C + g * Cg) * HW + e; }
  __device__ __forceinline__ int64_t lo(int split) const { return split * chunk; }
  __device__ __forceinline__ int64_t hi(int split) const { return min((split + 1) * chunk, M); }
};

// A thread's elements e = start, start + step, ... < end of a group and their channel c = e / HW,
// kept incrementally: a 64-bit division per vector compiles to a CALL of a ~70-instruction
// emulation, about a fifth of the ~350 thread-instructions an H100 can issue per 16-byte vector
// at copy speed (132 SMs · 4 · 32 lanes · 1.98 GHz / (3,019 GB/s / 32 B read + written)).
struct ChannelWalk {
  int64_t e, c, r, step, step_c, step_r, HW;
  __device__ ChannelWalk(int64_t start, int64_t step_, int64_t HW_)
      : e(start), c(start / HW_), r(start % HW_), step(step_), step_c(step_ / HW_), step_r(step_ % HW_), HW(HW_) {}
  __device__ __forceinline__ void next() {
    e += step, c += step_c, r += step_r;
    if (r >= HW) r -= HW, ++c;
  }
};

// Positions a thread loads before it uses any, in the NCHW loops that walk channels (gn_normalize:
// 4 vectors of x; gn_bwd_dx: 2 of x and 2 of dy). Left alone, nvcc keeps a ChannelWalk loop
// (carried channel index) at one 16-byte load of each input a trip (sm_90a disassembly,
// 2026-12-02): 16 KB of loads in flight per SM in gn_normalize at 4 blocks of 256 threads (32 in
// gn_bwd_dx), where streaming at copy speed asks ~32 KB (Little's law: ~4.3 TB/s x ~1 µs over
// 132 SMs). Batched: 64 bytes per thread; gn_normalize
// at 76 registers holds 3 blocks per SM, gn_bwd_dx at 64 four (4 positions there took 124: 2).
// gn_partials' plain loop nvcc unrolls 4x by itself.
constexpr int kMaxUnroll = 4;

// The next U positions of a walk: element offsets (-1 from `hi` on) and channels in group.
template <int U>
struct WalkBatch {
  int64_t off[U], c[U];
  __device__ __forceinline__ WalkBatch(ChannelWalk& w, int64_t hi, const GNDev& d, int64_t n, int64_t g) {
#pragma unroll
    for (int u = 0; u < U; ++u, w.next()) {
      off[u] = w.e < hi ? d.offset(n, g, w.e) : -1;
      c[u] = w.c;
    }
  }
};

// Chunk `split` of group (n, g), kMaxUnroll / K positions at a time: every position's vector of
// each of the K inputs is loaded first, then f(offset, channel in group, vectors) runs per position.
template <typename T, int V, int K, typename F>
__device__ __forceinline__ void stream_chunk(const GNDev& d, int64_t n, int64_t g, int split,
                                             const T* const (&in)[K], F&& f) {
  constexpr int U = kMaxUnroll / K;
  const int64_t hi = d.hi(split);
  for (ChannelWalk w(d.lo(split) + threadIdx.x * V, kThreads * V, d.HW); w.e < hi;) {
    const WalkBatch<U> at(w, hi, d, n, g);  // HW % V == 0: one channel per vector
    Vec<T, V> v[U][K];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (at.off[u] < 0) continue;
#pragma unroll
      for (int k = 0; k < K; ++k) v[u][k] = load_vec<T, V>(in[k] + at.off[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (at.off[u] >= 0) f(at.off[u], at.c[u], v[u]);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_partials(const T* __restrict__ x, GNDev d, float* __restrict__ part) {
  __shared__ float red[32];
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  const float shift = static_cast<float>(x[d.offset(n, g, 0)]);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t e = d.lo(split) + threadIdx.x * V; e < d.hi(split); e += kThreads * V) {
    const Vec<T, V> xv = load_vec<T, V>(x + d.offset(n, g, e));
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

// Merge the group's partials (every block of the group does it: splits <= 1024 pairs of floats).
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
    const float m1 = s1 / d.M;
    const float var = fmaxf(s2 / d.M - m1 * m1, 0.f);
    smem2[0] = static_cast<float>(x[d.offset(n, g, 0)]) + m1;  // mean
    smem2[1] = rsqrtf(var + static_cast<float>(eps));           // rstd
  }
  __syncthreads();
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_normalize(const T* __restrict__ x, T* __restrict__ y, GNDev d,
                                                          const float* __restrict__ part, GNParams p, double eps,
                                                          bool silu, float* __restrict__ mean_out,
                                                          float* __restrict__ rstd_out) {
  KILN_DYNAMIC_SMEM(float, coef);  // a[Cg], b[Cg]: y = x·a + b per channel
  __shared__ float red[32], stats[2];
  const int split = reversed_x();  // the second pass: see reversed_x
  const int64_t ng = reversed_y(), n = ng / d.G, g = ng % d.G;
  group_stats(x, d, part, ng, eps, stats, red);
  const float mean = stats[0], rstd = stats[1];
  if (split == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    const ChannelMod md = channel_mod(p, n, g * d.Cg + cl, d.C);
    coef[cl] = rstd * md.wf;
    coef[d.Cg + cl] = md.bf - mean * rstd * md.wf;
  }
  __syncthreads();
  const T* const in[1] = {x};
  stream_chunk<T, V>(d, n, g, split, in, [&](int64_t off, int64_t c, const Vec<T, V> (&v)[1]) {
    Vec<T, V> yv;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float m = static_cast<float>(v[0].v[i]) * coef[c] + coef[d.Cg + c];
      yv.v[i] = static_cast<T>(silu ? m * sigmoidf_(m) : m);
    }
    store_vec<T, V>(y + off, yv);
  });
}

// Per-channel factors of the backward in shared memory: wf[Cg], bf[Cg] (see ChannelMod).
__device__ void bwd_coefs(const GNDev& d, const GNParams& p, int64_t n, int64_t g, float* wf, float* bf) {
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += blockDim.x) {
    const ChannelMod md = channel_mod(p, n, g * d.Cg + cl, d.C);
    wf[cl] = md.wf;
    bf[cl] = md.bf;
  }
}

// Sum over a team of TEAM threads: a warp (32) or the block (kThreads); every member gets it.
template <int TEAM>
__device__ __forceinline__ float team_sum(float v, float* red) {
  if constexpr (TEAM == 32)
    return warp_sum(v);
  else
    return block_sum(v, red);
}

// Per channel piece of the block's chunk: A = Σ dm, B = Σ dm·x̂ -> part (N·G, splits, 2, Cg).
// A chunk covers channels lo/HW .. (hi-1)/HW; a team (warp, or the whole block when pieces are
// long) reduces one piece at a time, in a fixed order. Entries of channels outside the chunk
// are never written nor read (gn_bwd_channel_sums reads only the overlapping chunks).
template <typename T, int V, int TEAM>
__global__ void __launch_bounds__(kThreads) gn_bwd_partials(const T* __restrict__ dy, const T* __restrict__ x, GNDev d,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ rstd, GNParams p, bool silu,
                                                             float* __restrict__ part) {
  KILN_DYNAMIC_SMEM(float, sm);  // wf[Cg], bf[Cg]
  __shared__ float red[32];
  float *wf = sm, *bf = sm + d.Cg;
  const int split = blockIdx.x;
  const int64_t ng = blockIdx.y, n = ng / d.G, g = ng % d.G;
  bwd_coefs(d, p, n, g, wf, bf);
  __syncthreads();
  const float mu = mean[ng], r = rstd[ng];
  const int64_t lo = d.lo(split), hi = d.hi(split);
  const int team = threadIdx.x / TEAM, lane = threadIdx.x % TEAM;
  float* out = part + (ng * d.splits + split) * 2 * d.Cg;
  // TEAM == kThreads: one team, every thread runs the same iterations (block_sum syncs).
  for (int64_t c = lo / d.HW + team; c <= (hi - 1) / d.HW; c += kThreads / TEAM) {
    const int64_t seg_hi = min(hi, (c + 1) * d.HW);
    float a = 0.f, b = 0.f;
    for (int64_t e = max(lo, c * d.HW) + lane * V; e < seg_hi; e += TEAM * V) {
      const int64_t off = d.offset(n, g, e);
      const Vec<T, V> xv = load_vec<T, V>(x + off), dv = load_vec<T, V>(dy + off);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float xh = (static_cast<float>(xv.v[v]) - mu) * r;
        const float dm = dm_of(static_cast<float>(dv.v[v]), xh * wf[c] + bf[c], silu);
        a += dm;
        b += dm * xh;
      }
    }
    a = team_sum<TEAM>(a, red);
    b = team_sum<TEAM>(b, red);
    if (lane == 0) out[c] = a, out[d.Cg + c] = b;
  }
}

// A[n, c], B[n, c]: sums of the chunks that overlap channel c, in chunk order. One thread each.
__global__ void gn_bwd_channel_sums(GNDev d, int64_t N, const float* __restrict__ part, float* __restrict__ A,
                                    float* __restrict__ B) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * d.C) return;
  const int64_t n = i / d.C, c = i % d.C, g = c / d.Cg, cl = c % d.Cg, ng = n * d.G + g;
  float a = 0.f, b = 0.f;
  for (int64_t j = cl * d.HW / d.chunk; j <= ((cl + 1) * d.HW - 1) / d.chunk; ++j) {
    const float* pj = part + (ng * d.splits + j) * 2 * d.Cg;
    a += pj[cl];
    b += pj[d.Cg + cl];
  }
  A[i] = a;
  B[i] = b;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                                       GNDev d, const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, GNParams p, bool silu,
                                                       const float* __restrict__ A, const float* __restrict__ B) {
  KILN_DYNAMIC_SMEM(float, sm);  // wf[Cg], bf[Cg]
  __shared__ float red[32];
  float *wf = sm, *bf = sm + d.Cg;
  const int split = reversed_x();
  const int64_t ng = reversed_y(), n = ng / d.G, g = ng % d.G;
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
  const T* const in[2] = {x, dy};
  stream_chunk<T, V>(d, n, g, split, in, [&](int64_t off, int64_t c, const Vec<T, V> (&v)[2]) {
    Vec<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xh = (static_cast<float>(v[0].v[i]) - mu) * r;
      const float dm = dm_of(static_cast<float>(v[1].v[i]), xh * wf[c] + bf[c], silu);
      out.v[i] = static_cast<T>(r * (dm * wf[c] - m1 - xh * m2));
    }
    store_vec<T, V>(dx + off, out);
  });
}

// ================================ channels-last ===============================================

struct ClDev {  // x viewed as (N, HW, C) rows; a block walks tokens [split·chunk, ...) of sample n
  int64_t HW, C, G, Cg;
  int V;       // channels per vector (16 bytes, or 1 when C % (16 / itemsize) != 0)
  int64_t CV;  // V-wide channel vectors per row, C / V
  int tpr;     // threads per row: min(CV, kThreads); thread = (row lane, channel lane)
  int rows;    // rows in flight per block: kThreads / tpr
  int64_t chunk;
  int splits;
  __device__ __forceinline__ int passes() const { return static_cast<int>((CV + tpr - 1) / tpr); }
};

// This thread's place in the block's (rows × tpr) layout and its channel vector in pass k.
struct ClLane {
  int c_lane, r_lane;
  bool active;  // r_lane < rows (kThreads may not be a multiple of tpr)
  __device__ ClLane(const ClDev& d)
      : c_lane(threadIdx.x % d.tpr), r_lane(threadIdx.x / d.tpr), active(r_lane < d.rows) {}
  __device__ bool valid(const ClDev& d, int k) const { return active && c_lane + int64_t(k) * d.tpr < d.CV; }
  // First of the V channels of this thread's channel vector in pass k.
  __device__ int64_t c0(const ClDev& d, int k) const { return (c_lane + int64_t(k) * d.tpr) * d.V; }
};

__device__ __forceinline__ int64_t cl_t0(const ClDev& d, int64_t split) { return split * d.chunk; }
__device__ __forceinline__ int64_t cl_t1(const ClDev& d, int64_t t0) { return min(t0 + d.chunk, d.HW); }

// Sum each thread's a[V], b[V] over the block's row lanes (fixed order) and store them as this
// block's partials of its V channels: out[c] (first quantity) and out[C + c] (second).
// red: 2·kThreads·V floats of shared memory. Every thread of the block must call it.
template <int V>
__device__ void rows_to_partials(const float (&a)[V], const float (&b)[V], const ClDev& d, const ClLane& l,
                                 bool valid, int64_t c0, float* red, float* out) {
  float* ra = red;
  float* rb = red + kThreads * V;
  const int slot = (l.r_lane * d.tpr + l.c_lane) * V;
  if (valid) {
#pragma unroll
    for (int v = 0; v < V; ++v) ra[slot + v] = a[v], rb[slot + v] = b[v];
  }
  __syncthreads();
  if (valid && l.r_lane == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float sa = 0.f, sb = 0.f;
      for (int r = 0; r < d.rows; ++r) sa += ra[(r * d.tpr + l.c_lane) * V + v], sb += rb[(r * d.tpr + l.c_lane) * V + v];
      out[c0 + v] = sa;
      out[d.C + c0 + v] = sb;
    }
  }
  __syncthreads();  // red is reused by the next pass
}

// Per channel: Σ(x - p_c) and Σ(x - p_c)² over the block's tokens -> part (N, splits, 2, C).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_cl_partials(const T* __restrict__ x, ClDev d, float* __restrict__ part) {
  __shared__ float red[2 * kThreads * V];
  const ClLane l(d);
  const int64_t n = blockIdx.y, t0 = cl_t0(d, blockIdx.x), t1 = cl_t1(d, t0);
  const T* xn = x + n * d.HW * d.C;
  float* out = part + (n * d.splits + blockIdx.x) * 2 * d.C;
  for (int k = 0; k < d.passes(); ++k) {
    const bool valid = l.valid(d, k);
    const int64_t c0 = l.c0(d, k);
    float a[V], b[V], pivot[V];
#pragma unroll
    for (int v = 0; v < V; ++v) a[v] = b[v] = pivot[v] = 0.f;
    if (valid) {
      const Vec<T, V> pv = load_vec<T, V>(xn + c0);  // token 0 of the sample: the shift p_c
#pragma unroll
      for (int v = 0; v < V; ++v) pivot[v] = static_cast<float>(pv.v[v]);
#pragma unroll 4  // 4 independent 16-byte loads in flight per thread
      for (int64_t t = t0 + l.r_lane; t < t1; t += d.rows) {
        const Vec<T, V> xv = load_vec<T, V>(xn + t * d.C + c0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float dv = static_cast<float>(xv.v[v]) - pivot[v];
          a[v] += dv;
          b[v] += dv * dv;
        }
      }
    }
    rows_to_partials<V>(a, b, d, l, valid, c0, red, out);
  }
}

// Per (n, g) block: mean and rstd from the per-channel totals S1_c = Σ(x - p_c), S2_c, with
// mean = Σ_c(S1_c + HW·p_c)/M and Σ(x - mean)² = Σ_c [S2_c + 2(p_c - mean)S1_c + HW(p_c - mean)²];
// then coef (N, 2, C): y = x·a_c + b_c before the activation.
template <typename T>
__global__ void gn_cl_stats(const T* __restrict__ x, ClDev d, const float* __restrict__ S1,
                            const float* __restrict__ S2, GNParams p, double eps, float* __restrict__ mean_out,
                            float* __restrict__ rstd_out, float* __restrict__ coef) {
  __shared__ float red[32];
  const int64_t ng = blockIdx.x, n = ng / d.G, g = ng % d.G;
  const T* x0 = x + n * d.HW * d.C;  // token 0 of sample n
  const float hw = static_cast<float>(d.HW), M = static_cast<float>(d.Cg * d.HW);
  float s = 0.f;
  for (int64_t c = g * d.Cg + threadIdx.x; c < (g + 1) * d.Cg; c += blockDim.x)
    s += S1[n * d.C + c] + hw * static_cast<float>(x0[c]);
  const float mean = block_sum(s, red) / M;
  float q = 0.f;
  for (int64_t c = g * d.Cg + threadIdx.x; c < (g + 1) * d.Cg; c += blockDim.x) {
    const float dev = static_cast<float>(x0[c]) - mean, s1 = S1[n * d.C + c];
    q += S2[n * d.C + c] + 2.f * dev * s1 + hw * dev * dev;
  }
  const float rstd = rsqrtf(fmaxf(block_sum(q, red) / M, 0.f) + static_cast<float>(eps));
  if (threadIdx.x == 0) mean_out[ng] = mean, rstd_out[ng] = rstd;
  for (int64_t c = g * d.Cg + threadIdx.x; c < (g + 1) * d.Cg; c += blockDim.x) {
    const ChannelMod md = channel_mod(p, n, c, d.C);
    coef[(n * 2) * d.C + c] = rstd * md.wf;
    coef[(n * 2 + 1) * d.C + c] = md.bf - mean * rstd * md.wf;
  }
}

// `planes` per-channel coefficient planes of sample n (coef (N, planes, C)) for V channels from c0.
template <int V, int P>
__device__ __forceinline__ void load_planes(const float* coef, int64_t n, int64_t C, int64_t c0, float (&out)[P][V]) {
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int v = 0; v < V; ++v) out[q][v] = coef[(n * P + q) * C + c0 + v];
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_cl_apply(const T* __restrict__ x, T* __restrict__ y, ClDev d,
                                                         const float* __restrict__ coef, bool silu) {
  const ClLane l(d);
  const int64_t n = reversed_y(), t0 = cl_t0(d, reversed_x()), t1 = cl_t1(d, t0), base = n * d.HW * d.C;
  for (int k = 0; k < d.passes(); ++k) {
    if (!l.valid(d, k)) break;  // no block-wide syncs here: idle lanes may leave
    const int64_t c0 = l.c0(d, k);
    float ab[2][V];
    load_planes<V, 2>(coef, n, d.C, c0, ab);
#pragma unroll 4
    for (int64_t t = t0 + l.r_lane; t < t1; t += d.rows) {
      const int64_t off = base + t * d.C + c0;
      const Vec<T, V> xv = load_vec<T, V>(x + off);
      Vec<T, V> yv;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float m = static_cast<float>(xv.v[v]) * ab[0][v] + ab[1][v];
        yv.v[v] = static_cast<T>(silu ? m * sigmoidf_(m) : m);
      }
      store_vec<T, V>(y + off, yv);
    }
  }
}

// Per channel: A = Σ dm, B = Σ dm·x̂ over the block's tokens -> part (N, splits, 2, C).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_cl_bwd_partials(const T* __restrict__ dy, const T* __restrict__ x,
                                                                ClDev d, const float* __restrict__ mean,
                                                                const float* __restrict__ rstd, GNParams p, bool silu,
                                                                float* __restrict__ part) {
  __shared__ float red[2 * kThreads * V];
  const ClLane l(d);
  const int64_t n = blockIdx.y, t0 = cl_t0(d, blockIdx.x), t1 = cl_t1(d, t0), base = n * d.HW * d.C;
  float* out = part + (n * d.splits + blockIdx.x) * 2 * d.C;
  for (int k = 0; k < d.passes(); ++k) {
    const bool valid = l.valid(d, k);
    const int64_t c0 = l.c0(d, k);
    float a[V], b[V], mu[V], r[V], wf[V], bf[V];
#pragma unroll
    for (int v = 0; v < V; ++v) a[v] = b[v] = 0.f;
    if (valid) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t ng = n * d.G + (c0 + v) / d.Cg;
        const ChannelMod md = channel_mod(p, n, c0 + v, d.C);
        mu[v] = mean[ng], r[v] = rstd[ng], wf[v] = md.wf, bf[v] = md.bf;
      }
#pragma unroll 4  // 4 independent 16-byte loads in flight per thread
      for (int64_t t = t0 + l.r_lane; t < t1; t += d.rows) {
        const int64_t off = base + t * d.C + c0;
        const Vec<T, V> xv = load_vec<T, V>(x + off), dv = load_vec<T, V>(dy + off);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float xh = (static_cast<float>(xv.v[v]) - mu[v]) * r[v];
          const float dm = dm_of(static_cast<float>(dv.v[v]), xh * wf[v] + bf[v], silu);
          a[v] += dm;
          b[v] += dm * xh;
        }
      }
    }
    rows_to_partials<V>(a, b, d, l, valid, c0, red, out);
  }
}

// Per (n, g) block: m1 = Σ_c wf·A / M, m2 = Σ_c wf·B / M, then per channel of the group
// dx = r·(dm·wf − m1 − x̂·m2) = a·dm + q·x + k with a = r·wf, q = −r²·m2, k = r²·m2·mean − r·m1,
// and m = x·a + b (b = bf − mean·a) for SiLU's derivative -> coef (N, 4, C) = a, b, q, k.
__global__ void gn_cl_bwd_coefs(ClDev d, const float* __restrict__ mean, const float* __restrict__ rstd, GNParams p,
                                const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ coef) {
  __shared__ float red[32];
  const int64_t ng = blockIdx.x, n = ng / d.G, g = ng % d.G;
  const float M = static_cast<float>(d.Cg * d.HW);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = g * d.Cg + threadIdx.x; c < (g + 1) * d.Cg; c += blockDim.x) {
    const float wf = channel_mod(p, n, c, d.C).wf;
    s1 += wf * A[n * d.C + c];
    s2 += wf * B[n * d.C + c];
  }
  const float m1 = block_sum(s1, red) / M, m2 = block_sum(s2, red) / M;
  const float mu = mean[ng], r = rstd[ng];
  for (int64_t c = g * d.Cg + threadIdx.x; c < (g + 1) * d.Cg; c += blockDim.x) {
    const ChannelMod md = channel_mod(p, n, c, d.C);
    const float a = r * md.wf;
    coef[(n * 4) * d.C + c] = a;
    coef[(n * 4 + 1) * d.C + c] = md.bf - mu * a;
    coef[(n * 4 + 2) * d.C + c] = -r * r * m2;
    coef[(n * 4 + 3) * d.C + c] = r * r * m2 * mu - r * m1;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_cl_dx(const T* __restrict__ dy, const T* __restrict__ x,
                                                      T* __restrict__ dx, ClDev d, const float* __restrict__ coef,
                                                      bool silu) {
  const ClLane l(d);
  const int64_t n = reversed_y(), t0 = cl_t0(d, reversed_x()), t1 = cl_t1(d, t0), base = n * d.HW * d.C;
  for (int k = 0; k < d.passes(); ++k) {
    if (!l.valid(d, k)) break;
    const int64_t c0 = l.c0(d, k);
    float cf[4][V];  // a, b, q, k
    load_planes<V, 4>(coef, n, d.C, c0, cf);
#pragma unroll 4
    for (int64_t t = t0 + l.r_lane; t < t1; t += d.rows) {
      const int64_t off = base + t * d.C + c0;
      const Vec<T, V> xv = load_vec<T, V>(x + off), dv = load_vec<T, V>(dy + off);
      Vec<T, V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float xf = static_cast<float>(xv.v[v]);
        const float dm = dm_of(static_cast<float>(dv.v[v]), xf * cf[0][v] + cf[1][v], silu);
        out.v[v] = static_cast<T>(cf[0][v] * dm + cf[2][v] * xf + cf[3][v]);
      }
      store_vec<T, V>(dx + off, out);
    }
  }
}

// ---- host side -------------------------------------------------------------------------------

// Vector width for this layout: 16-byte vectors when every vector stays inside one channel run
// (NCHW: HW % V == 0) or row (channels-last: C % V == 0) and the pointers are 16-byte aligned.
template <typename T>
int vec_width(const GNShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int V = max_vec<T>();
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  const bool ok = s.channels_last ? s.C % V == 0 : s.HW % V == 0;
  return ok ? V : 1;
}

// Chunks of `len` units of which one block needs at least `min_len` (4 vectors per thread) so
// that N·splits blocks make ~per_sm per SM: (splits, chunk) with chunk a multiple of `align`.
std::pair<int, int64_t> split_plan(int64_t blocks_per_split, int64_t len, int64_t min_len, int64_t align,
                                   int64_t per_sm) {
  const int64_t target = per_sm * sm_count();
  int64_t splits = std::max<int64_t>(1, (target + blocks_per_split - 1) / blocks_per_split);
  splits = std::min<int64_t>({splits, std::max<int64_t>(1, (len + min_len - 1) / min_len), 1024});
  int64_t chunk = (len + splits - 1) / splits;
  chunk = (chunk + align - 1) / align * align;
  return {static_cast<int>((len + chunk - 1) / chunk), chunk};
}

GNDev make_dev(const GNShape& s, int V) {
  GNDev d{s.C, s.HW, s.Cg, s.G, s.group_size(), 0, 1};
  // 3 blocks per SM: what gn_normalize's 76 registers let an SM hold at once (a 4th would run
  // in a second wave, alone on its SM, with a third of the loads in flight)
  std::tie(d.splits, d.chunk) = split_plan(s.N * s.G, d.M, int64_t(kThreads) * V * 4, V, 3);
  return d;
}

// per_sm: blocks per SM the launches' registers let run at once in whole waves (sm_90a,
// 2026-12-02): forward 4 (gn_cl_partials 52 registers: 4 fit; gn_cl_apply 48: 5); backward 6
// (gn_cl_bwd_partials 101: 2 fit; gn_cl_dx 78: 3), where 4 left gn_cl_dx a second wave of one
// block per SM.
ClDev make_cl_dev(const GNShape& s, int V, int64_t per_sm) {
  ClDev d{s.HW, s.C, s.G, s.Cg, V, s.C / V, 0, 0, 0, 1};
  d.tpr = static_cast<int>(std::min<int64_t>(d.CV, kThreads));
  d.rows = kThreads / d.tpr;
  const int64_t min_tokens = std::max<int64_t>(1, int64_t(kThreads) * V * 4 / s.C);
  std::tie(d.splits, d.chunk) = split_plan(s.N, s.HW, min_tokens, 1, per_sm);
  return d;
}

constexpr int64_t kMaxCg = 12288;  // NCHW: 2·Cg fp32 of shared memory (wf, bf or a, b) in 96 KB
constexpr int kStatThreads = 128;  // per-(n, g) finalize blocks of the channels-last path

at::Tensor f32(const at::Tensor& like, at::IntArrayRef shape) { return at::empty(shape, like.options().dtype(at::kFloat)); }

template <typename T, int V>
void launch_fwd(const GNPrepared& pr, double eps, bool silu, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd,
                cudaStream_t stream) {
  const GNShape& s = pr.s;
  const T* x = pr.x.const_data_ptr<T>();
  if (s.channels_last) {
    const ClDev d = make_cl_dev(s, V, 4);
    const dim3 grid(d.splits, s.N);
    at::Tensor part = f32(mean, {s.N, d.splits, 2, s.C}), tot = f32(mean, {2, s.N, s.C}), coef = f32(mean, {s.N, 2, s.C});
    KILN_LAUNCH(gn_cl_partials<T, V>, grid, kThreads, 0, stream, x, d, part.data_ptr<float>());
    float* S1 = tot.data_ptr<float>();
    launch_column_sums(part.const_data_ptr<float>(), s.N, d.splits, 2 * s.C, s.C, S1, S1 + s.N * s.C, stream);
    KILN_LAUNCH(gn_cl_stats<T>, s.N * s.G, kStatThreads, 0, stream, x, d, S1, S1 + s.N * s.C, pr.params(), eps,
                mean.data_ptr<float>(), rstd.data_ptr<float>(), coef.data_ptr<float>());
    KILN_LAUNCH(gn_cl_apply<T, V>, grid, kThreads, 0, stream, x, y.data_ptr<T>(), d, coef.const_data_ptr<float>(),
                silu);
    return;
  }
  const GNDev d = make_dev(s, V);
  const dim3 grid(d.splits, s.N * s.G);
  at::Tensor part = f32(mean, {s.N * s.G, d.splits, 2});
  KILN_LAUNCH(gn_partials<T, V>, grid, kThreads, 0, stream, x, d, part.data_ptr<float>());
  const size_t smem = smem_floats(gn_normalize<T, V>, 2 * d.Cg);
  KILN_LAUNCH(gn_normalize<T, V>, grid, kThreads, smem, stream, x, y.data_ptr<T>(), d, part.data_ptr<float>(),
              pr.params(), eps, silu, mean.data_ptr<float>(), rstd.data_ptr<float>());
}

// NCHW backward partials: a warp per channel piece when the chunk spans >= 4 channels (short
// pieces: a block-wide sum per piece would leave most threads idle), else the whole block.
template <typename T, int V>
void launch_bwd_partials(const GNPrepared& pr, const GNDev& d, bool silu, const T* dy, const at::Tensor& mean,
                         const at::Tensor& rstd, at::Tensor& part, cudaStream_t stream) {
  const dim3 grid(d.splits, pr.s.N * pr.s.G);
  const T* x = pr.x.const_data_ptr<T>();
  const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  if (d.chunk >= 4 * d.HW) {
    auto kernel = gn_bwd_partials<T, V, 32>;
    KILN_LAUNCH(kernel, grid, kThreads, smem_floats(kernel, 2 * d.Cg), stream, dy, x, d, mp, rp, pr.params(), silu,
                part.data_ptr<float>());
  } else {
    auto kernel = gn_bwd_partials<T, V, kThreads>;
    KILN_LAUNCH(kernel, grid, kThreads, smem_floats(kernel, 2 * d.Cg), stream, dy, x, d, mp, rp, pr.params(), silu,
                part.data_ptr<float>());
  }
}

template <typename T, int V>
void launch_bwd(const GNPrepared& pr, bool silu, const at::Tensor& dy, const at::Tensor& mean, const at::Tensor& rstd,
                at::Tensor& dx, at::Tensor& A, at::Tensor& B, cudaStream_t stream) {
  const GNShape& s = pr.s;
  const T *x = pr.x.const_data_ptr<T>(), *dyp = dy.const_data_ptr<T>();
  const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  if (s.channels_last) {
    const ClDev d = make_cl_dev(s, V, 6);
    const dim3 grid(d.splits, s.N);
    at::Tensor part = f32(mean, {s.N, d.splits, 2, s.C}), coef = f32(mean, {s.N, 4, s.C});
    KILN_LAUNCH(gn_cl_bwd_partials<T, V>, grid, kThreads, 0, stream, dyp, x, d, mp, rp, pr.params(), silu,
                part.data_ptr<float>());
    launch_column_sums(part.const_data_ptr<float>(), s.N, d.splits, 2 * s.C, s.C, A.data_ptr<float>(),
                       B.data_ptr<float>(), stream);
    KILN_LAUNCH(gn_cl_bwd_coefs, s.N * s.G, kStatThreads, 0, stream, d, mp, rp, pr.params(),
                A.const_data_ptr<float>(), B.const_data_ptr<float>(), coef.data_ptr<float>());
    KILN_LAUNCH(gn_cl_dx<T, V>, grid, kThreads, 0, stream, dyp, x, dx.data_ptr<T>(), d, coef.const_data_ptr<float>(),
                silu);
    return;
  }
  const GNDev d = make_dev(s, V);
  at::Tensor part = f32(mean, {s.N * s.G, d.splits, 2, s.Cg});
  launch_bwd_partials<T, V>(pr, d, silu, dyp, mean, rstd, part, stream);
  const int64_t nc = s.N * s.C;
  KILN_LAUNCH(gn_bwd_channel_sums, static_cast<unsigned>((nc + kThreads - 1) / kThreads), kThreads, 0, stream, d,
              s.N, part.const_data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>());
  const dim3 grid(d.splits, s.N * s.G);
  KILN_LAUNCH(gn_bwd_dx<T, V>, grid, kThreads, smem_floats(gn_bwd_dx<T, V>, 2 * d.Cg), stream, dyp, x,
              dx.data_ptr<T>(), d, mp, rp, pr.params(), silu, A.const_data_ptr<float>(), B.const_data_ptr<float>());
}

void check_cuda_shape(const GNShape& s) {
  KILN_CHECK(s.channels_last || s.Cg <= kMaxCg, "group_norm (CUDA, NCHW): C/G = ", s.Cg,
             " channels per group exceeds ", kMaxCg, " (shared-memory bound; channels-last has no limit)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, double eps, std::string activation) {
  const bool silu = parse_activation(activation);
  const DeviceGuard guard(x);
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  check_cuda_shape(pr.s);
  at::Tensor y = at::empty_like(pr.x);
  at::Tensor mean = f32(x, {pr.s.N, pr.s.G});
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_fwd_cuda", [&] {
    constexpr int VMAX = max_vec<scalar_t>();
    if (vec_width<scalar_t>(pr.s, {pr.x.const_data_ptr(), y.const_data_ptr()}) == VMAX)
      launch_fwd<scalar_t, VMAX>(pr, eps, silu, y, mean, rstd, stream);
    else
      launch_fwd<scalar_t, 1>(pr, eps, silu, y, mean, rstd, stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, int64_t num_groups,
    std::string activation) {
  const bool silu = parse_activation(activation);
  const DeviceGuard guard(x);
  const GNPrepared pr = gn_prepare(x, num_groups, weight, bias, scale, shift);
  check_cuda_shape(pr.s);
  KILN_CHECK(dy.sizes() == x.sizes(), "group_norm backward: dy ", dy.sizes(), " != x ", x.sizes());
  const at::Tensor dyc = dy.to(pr.x.scalar_type()).contiguous(gn_memory_format(pr.x));
  const at::Tensor mc = mean.to(at::kFloat).contiguous(), rc = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(pr.x);
  at::Tensor A = at::zeros({pr.s.N, pr.s.C}, x.options().dtype(at::kFloat));  // zeros when x is empty (HW = 0)
  at::Tensor B = at::zeros_like(A);
  if (x.numel() == 0) return {dx, A, B};
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.x.scalar_type(), "kiln_group_norm_bwd_cuda", [&] {
    constexpr int VMAX = max_vec<scalar_t>();
    if (vec_width<scalar_t>(pr.s, {pr.x.const_data_ptr(), dyc.const_data_ptr(), dx.const_data_ptr()}) == VMAX)
      launch_bwd<scalar_t, VMAX>(pr, silu, dyc, mc, rc, dx, A, B, stream);
    else
      launch_bwd<scalar_t, 1>(pr, silu, dyc, mc, rc, dx, A, B, stream);
  });
  return {dx, A, B};
}

}  // namespace
}  // namespace kiln

KILN_CUDA_IMPL(m) {
  m.impl("group_norm_fwd", &kiln::group_norm_fwd_cuda);
  m.impl("group_norm_bwd", &kiln::group_norm_bwd_cuda);
}
