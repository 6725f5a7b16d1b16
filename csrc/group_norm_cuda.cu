// GroupNorm (+ modulation, + SiLU) forward and backward on CUDA. Deterministic: every reduction
// across threads or blocks runs in a fixed order (block_sum, column_sums), no float atomics.
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
// In one launch (gn_pipelined, gn_cl_pipelined; for tensors larger than L2: gn_plan): each unit's
// pass 2 (NCHW a group; channels-last a few groups of one sample) follows its pass 1 a few units
// later, so the re-read comes from L2 (see their sections). Deterministic too: the blocks signal
// each other with integer counters only.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

// Shifted Σ, Σ² of chunk `split` of group ng -> part[(ng·splits + split)·2 ..]: the shift is the
// group's first element, so the sums stay exact when |mean| >> std.
template <typename T, int V>
__device__ __forceinline__ void partials_chunk(const T* __restrict__ x, const GNDev& d, int64_t ng, int split,
                                               float* __restrict__ part, float* red) {
  const int64_t n = ng / d.G, g = ng % d.G;
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

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_partials(const T* __restrict__ x, GNDev d, float* __restrict__ part) {
  __shared__ float red[32];
  partials_chunk<T, V>(x, d, blockIdx.y, blockIdx.x, part, red);
}

// Merge the group's partials (every block of the group does it: splits <= 1024 pairs of floats).
template <typename T>
__device__ void group_stats(const T* x, const GNDev& d, const float* part, int64_t ng, double eps, float* smem2,
                            float* red) {
  const int64_t n = ng / d.G, g = ng % d.G;
  float s1 = 0.f, s2 = 0.f;
  for (int j = threadIdx.x; j < d.splits; j += blockDim.x) {  // (__ldcg: in one launch, other SMs wrote them)
    s1 += __ldcg(part + (ng * d.splits + j) * 2);
    s2 += __ldcg(part + (ng * d.splits + j) * 2 + 1);
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

// y = act(x·a_c + b_c) over chunk `split` of group ng, a_c = rstd·wf_c, b_c = bf_c − mean·a_c
// (coef: 2·Cg floats of shared memory).
template <typename T, int V>
__device__ __forceinline__ void normalize_chunk(const T* __restrict__ x, T* __restrict__ y, const GNDev& d, int64_t ng,
                                                int split, float mean, float rstd, const GNParams& p, bool silu,
                                                float* coef) {
  const int64_t n = ng / d.G, g = ng % d.G;
  // (not unrolled: unrolled 4x in gn_pipelined, ptxas kept its 64-bit trip bound on the stack)
#pragma unroll 1
  for (int cl = threadIdx.x; cl < static_cast<int>(d.Cg); cl += kThreads) {
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

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_normalize(const T* __restrict__ x, T* __restrict__ y, GNDev d,
                                                          const float* __restrict__ part, GNParams p, double eps,
                                                          bool silu, float* __restrict__ mean_out,
                                                          float* __restrict__ rstd_out) {
  KILN_DYNAMIC_SMEM(float, coef);  // a[Cg], b[Cg]: y = x·a + b per channel
  __shared__ float red[32], stats[2];
  const int split = reversed_x();  // the second pass: see reversed_x
  const int64_t ng = reversed_y();
  group_stats(x, d, part, ng, eps, stats, red);
  const float mean = stats[0], rstd = stats[1];
  if (split == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  normalize_chunk<T, V>(x, y, d, ng, split, mean, rstd, p, silu, coef);
}

// Per-channel factors of the backward in shared memory: wf[Cg], bf[Cg] (see ChannelMod).
__device__ void bwd_coefs(const GNDev& d, const GNParams& p, int64_t n, int64_t g, float* wf, float* bf) {
#pragma unroll 1  // (as normalize_chunk's)
  for (int cl = threadIdx.x; cl < static_cast<int>(d.Cg); cl += blockDim.x) {
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

// Per channel piece of chunk `split` of group ng: A = Σ dm, B = Σ dm·x̂ -> part (N·G, splits, 2,
// Cg). A chunk covers channels lo/HW .. (hi-1)/HW; a team of TEAM threads (a warp, or the whole
// block when pieces are long) reduces one piece at a time, in a fixed order. Entries of channels
// outside the chunk are never written nor read (only the overlapping chunks are summed).
template <typename T, int V, int TEAM>
__device__ __forceinline__ void bwd_partials_chunk(const T* __restrict__ dy, const T* __restrict__ x, const GNDev& d,
                                                   int64_t ng, int split, float mu, float r, bool silu,
                                                   const float* wf, const float* bf, float* red,
                                                   float* __restrict__ part) {
  const int64_t n = ng / d.G, g = ng % d.G;
  const int64_t lo = d.lo(split), hi = d.hi(split);
  const int team = threadIdx.x / TEAM, lane = threadIdx.x % TEAM;
  float* out = part + (ng * d.splits + split) * 2 * d.Cg;
  // TEAM == kThreads: one team, every thread runs the same iterations (block_sum syncs).
  for (int64_t c = lo / d.HW + team; c <= (hi - 1) / d.HW; c += kThreads / TEAM) {
    const int64_t seg_hi = min(hi, (c + 1) * d.HW);
    float a = 0.f, b = 0.f;
    // 2 trips at a time: 4 16-byte loads in flight a thread (nvcc did so by itself in
    // gn_bwd_partials, not inside gn_pipelined: 2 there, sm_90a, 2026-12-02)
#pragma unroll 2
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

template <typename T, int V, int TEAM>
__global__ void __launch_bounds__(kThreads) gn_bwd_partials(const T* __restrict__ dy, const T* __restrict__ x, GNDev d,
                                                             const float* __restrict__ mean,
                                                             const float* __restrict__ rstd, GNParams p, bool silu,
                                                             float* __restrict__ part) {
  KILN_DYNAMIC_SMEM(float, sm);  // wf[Cg], bf[Cg]
  __shared__ float red[32];
  const int64_t ng = blockIdx.y;
  bwd_coefs(d, p, ng / d.G, ng % d.G, sm, sm + d.Cg);
  __syncthreads();
  bwd_partials_chunk<T, V, TEAM>(dy, x, d, ng, blockIdx.x, mean[ng], rstd[ng], silu, sm, sm + d.Cg, red, part);
}

// A and B of channel cl of group ng: the sums of the chunks that overlap it, in chunk order.
struct SumPair {
  float a, b;
};
__device__ __forceinline__ SumPair channel_sums(const GNDev& d, const float* __restrict__ part, int64_t ng, int64_t cl) {
  float a = 0.f, b = 0.f;
  for (int64_t j = cl * d.HW / d.chunk; j <= ((cl + 1) * d.HW - 1) / d.chunk; ++j) {
    const float* pj = part + (ng * d.splits + j) * 2 * d.Cg;
    a += __ldcg(pj + cl);
    b += __ldcg(pj + d.Cg + cl);
  }
  return {a, b};
}

// A[n, c], B[n, c] for every channel. One thread each.
__global__ void gn_bwd_channel_sums(GNDev d, int64_t N, const float* __restrict__ part, float* __restrict__ A,
                                    float* __restrict__ B) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * d.C) return;
  const int64_t n = i / d.C, c = i % d.C;
  const SumPair ab = channel_sums(d, part, n * d.G + c / d.Cg, c % d.Cg);
  A[i] = ab.a;
  B[i] = ab.b;
}

// dx over chunk `split` of group ng: dx = r·(dm·wf − m1 − x̂·m2), with m1, m2 the group means of
// dx̂ = dm·wf and of dx̂·x̂.
template <typename T, int V>
__device__ __forceinline__ void dx_chunk(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                         const GNDev& d, int64_t ng, int split, float mu, float r, float m1, float m2,
                                         bool silu, const float* wf, const float* bf) {
  const T* const in[2] = {x, dy};
  stream_chunk<T, V>(d, ng / d.G, ng % d.G, split, in, [&](int64_t off, int64_t c, const Vec<T, V> (&v)[2]) {
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
  float s1 = 0.f, s2 = 0.f;
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    s1 += wf[cl] * A[n * d.C + g * d.Cg + cl];
    s2 += wf[cl] * B[n * d.C + g * d.Cg + cl];
  }
  const float m1 = block_sum(s1, red) / d.M, m2 = block_sum(s2, red) / d.M;
  dx_chunk<T, V>(dy, x, dx, d, ng, split, mean[ng], rstd[ng], m1, m2, silu, wf, bf);
}

// ================================ NCHW in one launch =========================================
//
// Why: the two launches above read all of x (and dy) in pass 1 before pass 2 re-reads it. At VAE
// shapes that is more than L2 holds (1x128x512x512 bf16: x 67 MB, x and dy 134 MB; 50 MB of L2 on
// an H100, 60 on an H200), so even walking backwards about half of the re-read comes from HBM:
// ~2.5 tensor-sizes moved in the forward and ~4.2 in the backward for an ideal 2 and 3, ceilings
// of ~80% and ~73% of copy bandwidth against issue 7's 80% (benchmarks/results/README.md).
// Here each group's pass 2 runs a few groups behind its pass 1 in one launch, so a chunk is
// re-read after a few MB of other traffic, from L2 (Triton's group_norm_triton_pipelined.py).
//
// Work items are (pass, group, chunk), claimed in a fixed order from a ticket counter by a grid
// of as many blocks as the SMs hold at once, each looping until the tickets run out:
//     P1(0) .. P1(lag-1), then P1(i + lag), P2(i) for i = 0, 1, ..., then the last lag P2s,
// P1(u) every chunk of group u's pass 1 (partials_chunk / bwd_partials_chunk), P2(u) every chunk
// of its pass 2 (normalize_chunk / dx_chunk). A P1 chunk counts itself on the group's flag; the
// last one reduces the group's partials in a fixed order (deterministic: no float atomics) and
// raises the flag once more; a P2 chunk first waits for that. No deadlock whatever the
// residency: P1 items never wait, and a P2 item waits only for items of earlier tickets, all
// claimed by running blocks that finish them without waiting (induction on the ticket).
// lag puts two grids' worth of tickets between P1(i)'s chunks and P2(i)'s, so the wait is rare.

// The one-launch state: sync[0] the ticket counter, sync[1 + u] group u's flag (P1 chunks done;
// splits + 1 once its statistics are out).
template <typename T>
struct PipeArgs {
  const T* x;
  const T* dy;  // backward only
  T* out;       // y or dx
  GNDev d;
  GNParams p;
  bool silu;
  float eps;
  float* mean;  // forward: written by each group's last P1 chunk; backward: read
  float* rstd;
  float* part;  // forward (N·G, splits, 2); backward (N·G, splits, 2, Cg)
  float* A;     // backward: (N, C) outputs, and m12 (N·G, 2) = the group means m1, m2 of dx_chunk
  float* B;
  float* m12;
  int* sync;
  int64_t units;  // N·G
  int64_t lag;
};

struct PipeItem {
  bool pass2;
  int64_t unit;
  int chunk;
};

// Ticket t -> its item, in the order above.
__device__ __forceinline__ PipeItem pipe_item(int64_t t, int64_t units, int splits, int64_t lag) {
  const int64_t blk = t / splits;
  const int chunk = static_cast<int>(t % splits);
  if (blk < lag) return {false, blk, chunk};
  const int64_t j = blk - lag, pairs = units - lag;
  if (j < 2 * pairs) return {(j & 1) != 0, (j & 1) ? j / 2 : j / 2 + lag, chunk};
  return {true, j - pairs, chunk};
}

// A P1 chunk counts itself on its group's flag: true in the group's last one (every block calls
// it). The barrier puts every thread's partials before thread 0's fenced add (release); the
// fence after it (acquire) and the second barrier put the other chunks' partials before the
// last one's reads.
__device__ __forceinline__ bool pipe_arrive(int* flag, int splits, int* last) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    *last = atomicAdd(flag, 1) == splits - 1;
    __threadfence();
  }
  __syncthreads();
  return *last != 0;
}

__device__ __forceinline__ void pipe_publish(int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(flag, 1);
  }
}

// A P2 chunk's wait for its group's statistics. A wait that times out (a broken schedule, never
// a real one) poisons them with NaN and raises the flag, so the outputs say so instead of being
// quietly wrong and the group's other chunks do not time out one after another.
__device__ __forceinline__ void pipe_wait(int* flag, int target, float* stats, int count) {
  if (threadIdx.x == 0 && !wait_at_least(flag, target)) {
    for (int i = 0; i < count; ++i) stats[i] = nanf("");
    __threadfence();
    atomicMax(flag, target);
  }
  __syncthreads();
}

// The last P1 chunk of group ng in the backward: A, B of its channels (outputs) and the group
// means m1 = Σ wf·A / M, m2 = Σ wf·B / M -> m12[2·ng ..].
template <typename T>
__device__ void pipe_bwd_finalize(const PipeArgs<T>& a, int64_t ng, const float* wf, float* red) {
  const GNDev& d = a.d;
  const int64_t first = (ng / d.G) * d.C + (ng % d.G) * d.Cg;  // (n, g·Cg) in (N, C)
  float s1 = 0.f, s2 = 0.f;
  for (int64_t cl = threadIdx.x; cl < d.Cg; cl += kThreads) {
    const SumPair ab = channel_sums(d, a.part, ng, cl);
    a.A[first + cl] = ab.a;
    a.B[first + cl] = ab.b;
    s1 += wf[cl] * ab.a;
    s2 += wf[cl] * ab.b;
  }
  s1 = block_sum(s1, red);
  s2 = block_sum(s2, red);
  if (threadIdx.x == 0) a.m12[2 * ng] = s1 / d.M, a.m12[2 * ng + 1] = s2 / d.M;
}

template <typename T, int V, bool BWD, int TEAM>
__device__ void pipe_pass1(const PipeArgs<T>& a, int64_t ng, int chunk, float* sm, float* red, float* stats,
                           int* last) {
  const GNDev& d = a.d;
  int* flag = a.sync + 1 + ng;
  if constexpr (BWD) {
    bwd_coefs(d, a.p, ng / d.G, ng % d.G, sm, sm + d.Cg);
    __syncthreads();
    bwd_partials_chunk<T, V, TEAM>(a.dy, a.x, d, ng, chunk, a.mean[ng], a.rstd[ng], a.silu, sm, sm + d.Cg, red,
                                   a.part);
    if (pipe_arrive(flag, d.splits, last)) {
      pipe_bwd_finalize(a, ng, sm, red);
      pipe_publish(flag);
    }
  } else {
    partials_chunk<T, V>(a.x, d, ng, chunk, a.part, red);
    if (pipe_arrive(flag, d.splits, last)) {
      group_stats(a.x, d, a.part, ng, a.eps, stats, red);
      if (threadIdx.x == 0) a.mean[ng] = stats[0], a.rstd[ng] = stats[1];
      pipe_publish(flag);
    }
  }
}

template <typename T, int V, bool BWD>
__device__ void pipe_pass2(const PipeArgs<T>& a, int64_t ng, int chunk, float* sm) {
  const GNDev& d = a.d;
  float* stats = BWD ? a.m12 + 2 * ng : a.mean + ng;
  pipe_wait(a.sync + 1 + ng, d.splits + 1, stats, BWD ? 2 : 1);
  if constexpr (BWD) {
    bwd_coefs(d, a.p, ng / d.G, ng % d.G, sm, sm + d.Cg);
    __syncthreads();
    dx_chunk<T, V>(a.dy, a.x, a.out, d, ng, chunk, a.mean[ng], a.rstd[ng], __ldcg(a.m12 + 2 * ng),
                   __ldcg(a.m12 + 2 * ng + 1), a.silu, sm, sm + d.Cg);
  } else {
    normalize_chunk<T, V>(a.x, a.out, d, ng, chunk, __ldcg(a.mean + ng), __ldcg(a.rstd + ng), a.p, a.silu, sm);
  }
}

// The work loop of a one-launch kernel: claim a ticket (thread 0; `ticket` in shared memory),
// run its item, until the tickets run out. pass1(unit, chunk), pass2(unit, chunk).
template <typename P1, typename P2>
__device__ __forceinline__ void pipe_run(int* counter, int64_t units, int splits, int64_t lag, int64_t* ticket,
                                         P1&& pass1, P2&& pass2) {
  const int64_t total = 2 * units * splits;
  for (;;) {
    if (threadIdx.x == 0) *ticket = atomicAdd(counter, 1);
    __syncthreads();
    const int64_t t = *ticket;
    __syncthreads();  // every thread has read it before thread 0 claims the next
    if (t >= total) return;
    const PipeItem it = pipe_item(t, units, splits, lag);
    if (it.pass2)
      pass2(it.unit, it.chunk);
    else
      pass1(it.unit, it.chunk);
  }
}

// TEAM: the backward partials' team (bwd_partials_chunk); unused in the forward.
template <typename T, int V, bool BWD, int TEAM>
__global__ void __launch_bounds__(kThreads) gn_pipelined(PipeArgs<T> a) {
  KILN_DYNAMIC_SMEM(float, sm);  // 2·Cg: forward a, b of normalize_chunk; backward wf, bf
  __shared__ float red[32], stats[2];
  __shared__ int64_t ticket;
  __shared__ int last;
  pipe_run(
      a.sync, a.units, a.d.splits, a.lag, &ticket,
      [&](int64_t u, int k) { pipe_pass1<T, V, BWD, TEAM>(a, u, k, sm, red, stats, &last); },
      [&](int64_t u, int k) { pipe_pass2<T, V, BWD>(a, u, k, sm); });
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

// `planes` per-channel coefficient planes of sample n (coef (N, planes, C)) for V channels from c0
// (__ldcg: in the one launch another SM wrote them).
template <int V, int P>
__device__ __forceinline__ void load_planes(const float* coef, int64_t n, int64_t C, int64_t c0, float (&out)[P][V]) {
#pragma unroll
  for (int q = 0; q < P; ++q)
#pragma unroll
    for (int v = 0; v < V; ++v) out[q][v] = __ldcg(coef + (n * P + q) * C + c0 + v);
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

// ================================ channels-last in one launch =================================
//
// As gn_pipelined, for (N, HW, C) rows: a unit is UG whole groups of one sample, W = UG·Cg
// contiguous channels of every token row (cl_unit_groups: at most 32 channels, at least one
// 16-byte vector a row where possible, ~4 MB of x; 1x128x512x512 bf16: 2 groups, 8 channels,
// 16 of each 256-byte row), and a chunk a run of tokens of it. A unit thus reads half of every
// 32-byte sector it touches; the other half is the next unit's, read a few MB of traffic later
// from L2, so HBM moves each byte about once (Triton's channels-last units likewise).
// Thread = (row lane, vector lane): VW = W / V vectors a row, `rows` = kThreads / VW rows at a time.

struct ClPipeDev {
  int64_t HW, C, G, Cg;
  int UG, W, VW, rows;  // groups and channels per unit, vectors per unit row, row lanes
  int64_t chunk;        // tokens per work item
  int splits;           // chunks per unit
  int64_t units;        // N·G / UG
  __device__ __forceinline__ int64_t n_of(int64_t u) const { return u / (G / UG); }
  __device__ __forceinline__ int64_t c_lo(int64_t u) const { return (u % (G / UG)) * W; }
};

template <typename T>
struct ClPipeArgs {
  const T* x;
  const T* dy;  // backward only
  T* out;
  ClPipeDev d;
  GNParams p;
  bool silu;
  float eps;
  float* mean;  // (N·G): forward written by each unit's finalize; backward read
  float* rstd;
  float* part;  // (units, splits, 2, W)
  float* coef;  // (N, 2, C) forward a, b; (N, 4, C) backward a, b, q, k: written by the finalize
  float* A;     // backward outputs (N, C)
  float* B;
  int* sync;
  int64_t lag;
};

// This thread's place: vector lane j (channels c_lo + j·V ..), row lane r; active if r < rows.
struct ClPipeLane {
  int j, r;
  bool active;
  __device__ ClPipeLane(const ClPipeDev& d)
      : j(threadIdx.x % d.VW), r(threadIdx.x / d.VW), active(threadIdx.x / d.VW < d.rows) {}
};

// Σ over row lanes (fixed order) of each thread's a[V], b[V] -> out[j·V + v] and out[W + j·V + v].
template <int V>
__device__ void unit_rows_to_partials(const float (&a)[V], const float (&b)[V], const ClPipeDev& d,
                                      const ClPipeLane& l, float* red, float* out) {
  float* ra = red;
  float* rb = red + kThreads * V;
#pragma unroll
  for (int v = 0; v < V; ++v) ra[threadIdx.x * V + v] = a[v], rb[threadIdx.x * V + v] = b[v];
  __syncthreads();
  if (l.active && l.r == 0) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float sa = 0.f, sb = 0.f;
      for (int r = 0; r < d.rows; ++r) sa += ra[(r * d.VW + l.j) * V + v], sb += rb[(r * d.VW + l.j) * V + v];
      out[l.j * V + v] = sa;
      out[d.W + l.j * V + v] = sb;
    }
  }
}

// Pass 1 of chunk k of unit u: forward Σ(x - p_c), Σ(x - p_c)² (p_c the channel's token 0);
// backward A = Σ dm, B = Σ dm·x̂ -> part[u, k].
template <typename T, int V, bool BWD>
__device__ void cl_pipe_pass1(const ClPipeArgs<T>& a, int64_t u, int k, float* red) {
  const ClPipeDev& d = a.d;
  const ClPipeLane l(d);
  const int64_t n = d.n_of(u), c0 = d.c_lo(u) + l.j * V, t0 = k * d.chunk, t1 = min(t0 + d.chunk, d.HW);
  const T* xn = a.x + n * d.HW * d.C;
  float s1[V], s2[V], q0[V], q1[V], q2[V], q3[V];  // forward: q0 the pivot; backward: mean, rstd, wf, bf
#pragma unroll
  for (int v = 0; v < V; ++v) s1[v] = s2[v] = q0[v] = q1[v] = q2[v] = q3[v] = 0.f;
  if (l.active) {
    if constexpr (BWD) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t ng = n * d.G + (c0 + v) / d.Cg;
        const ChannelMod md = channel_mod(a.p, n, c0 + v, d.C);
        q0[v] = a.mean[ng], q1[v] = a.rstd[ng], q2[v] = md.wf, q3[v] = md.bf;
      }
    } else {
      const Vec<T, V> pv = load_vec<T, V>(xn + c0);
#pragma unroll
      for (int v = 0; v < V; ++v) q0[v] = static_cast<float>(pv.v[v]);
    }
#pragma unroll 4
    for (int64_t t = t0 + l.r; t < t1; t += d.rows) {
      const Vec<T, V> xv = load_vec<T, V>(xn + t * d.C + c0);
      if constexpr (BWD) {
        const Vec<T, V> dv = load_vec<T, V>(a.dy + n * d.HW * d.C + t * d.C + c0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float xh = (static_cast<float>(xv.v[v]) - q0[v]) * q1[v];
          const float dm = dm_of(static_cast<float>(dv.v[v]), xh * q2[v] + q3[v], a.silu);
          s1[v] += dm;
          s2[v] += dm * xh;
        }
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float dv = static_cast<float>(xv.v[v]) - q0[v];
          s1[v] += dv;
          s2[v] += dv * dv;
        }
      }
    }
  }
  unit_rows_to_partials<V>(s1, s2, d, l, red, a.part + (u * d.splits + k) * 2 * d.W);
}

// The last pass-1 chunk of unit u: per channel totals over the chunks (fixed order: lane i of a
// channel sums chunks i, i + lanes, ..., then the lanes are added in order) -> fin[0, W) and
// fin[W, 2W); then the unit's statistics and per-channel coefficients (as gn_cl_stats /
// gn_cl_bwd_coefs) -> coef, and mean, rstd (forward) or A, B (backward).
template <typename T, bool BWD>
__device__ void cl_pipe_finalize(const ClPipeArgs<T>& a, int64_t u, float* red, float* fin) {
  const ClPipeDev& d = a.d;
  const int lanes = kThreads / d.W, c = threadIdx.x % d.W, lane = threadIdx.x / d.W;
  float s1 = 0.f, s2 = 0.f;
  if (lane < lanes)
    for (int k = lane; k < d.splits; k += lanes) {
      const float* pk = a.part + (u * d.splits + k) * 2 * d.W;
      s1 += __ldcg(pk + c);
      s2 += __ldcg(pk + d.W + c);
    }
  red[threadIdx.x] = s1, red[kThreads + threadIdx.x] = s2;
  __syncthreads();
  const int64_t n = d.n_of(u), c_lo = d.c_lo(u);
  if (threadIdx.x < d.W) {
    float t1 = 0.f, t2 = 0.f;
    for (int i = 0; i < lanes; ++i) t1 += red[i * d.W + threadIdx.x], t2 += red[kThreads + i * d.W + threadIdx.x];
    fin[threadIdx.x] = t1, fin[d.W + threadIdx.x] = t2;
    if constexpr (BWD) a.A[n * d.C + c_lo + threadIdx.x] = t1, a.B[n * d.C + c_lo + threadIdx.x] = t2;
  }
  __syncthreads();
  float* gstat = fin + 2 * d.W;  // per group of the unit: two floats
  const float hw = static_cast<float>(d.HW), M = static_cast<float>(d.Cg * d.HW);
  if (threadIdx.x < d.UG) {
    const int64_t g = c_lo / d.Cg + threadIdx.x, ng = n * d.G + g;
    const float* S1 = fin + threadIdx.x * d.Cg;
    const float* S2 = fin + d.W + threadIdx.x * d.Cg;
    if constexpr (BWD) {  // m1 = Σ wf·A / M, m2 = Σ wf·B / M
      float m1 = 0.f, m2 = 0.f;
      for (int64_t i = 0; i < d.Cg; ++i) {
        const float wf = channel_mod(a.p, n, g * d.Cg + i, d.C).wf;
        m1 += wf * S1[i], m2 += wf * S2[i];
      }
      gstat[2 * threadIdx.x] = m1 / M, gstat[2 * threadIdx.x + 1] = m2 / M;
    } else {  // mean and rstd from the shifted sums (gn_cl_stats)
      const T* x0 = a.x + n * d.HW * d.C + g * d.Cg;  // token 0 of the group's channels
      float s = 0.f;
      for (int64_t i = 0; i < d.Cg; ++i) s += S1[i] + hw * static_cast<float>(x0[i]);
      const float mean = s / M;
      float q = 0.f;
      for (int64_t i = 0; i < d.Cg; ++i) {
        const float dev = static_cast<float>(x0[i]) - mean;
        q += S2[i] + 2.f * dev * S1[i] + hw * dev * dev;
      }
      const float rstd = rsqrtf(fmaxf(q / M, 0.f) + a.eps);
      gstat[2 * threadIdx.x] = mean, gstat[2 * threadIdx.x + 1] = rstd;
      a.mean[ng] = mean, a.rstd[ng] = rstd;
    }
  }
  __syncthreads();
  if (threadIdx.x < d.W) {
    const int64_t cc = c_lo + threadIdx.x, gl = threadIdx.x / d.Cg;
    const ChannelMod md = channel_mod(a.p, n, cc, d.C);
    if constexpr (BWD) {  // dx = a·dm + q·x + k (gn_cl_bwd_coefs)
      const int64_t ng = n * d.G + cc / d.Cg;
      const float mu = a.mean[ng], r = a.rstd[ng], m1 = gstat[2 * gl], m2 = gstat[2 * gl + 1], ac = r * md.wf;
      a.coef[(n * 4) * d.C + cc] = ac;
      a.coef[(n * 4 + 1) * d.C + cc] = md.bf - mu * ac;
      a.coef[(n * 4 + 2) * d.C + cc] = -r * r * m2;
      a.coef[(n * 4 + 3) * d.C + cc] = r * r * m2 * mu - r * m1;
    } else {
      const float mean = gstat[2 * gl], rstd = gstat[2 * gl + 1];
      a.coef[(n * 2) * d.C + cc] = rstd * md.wf;
      a.coef[(n * 2 + 1) * d.C + cc] = md.bf - mean * rstd * md.wf;
    }
  }
}

// Pass 2 of chunk k of unit u: y = act(x·a + b), or dx = a·dm + q·x + k.
template <typename T, int V, bool BWD>
__device__ void cl_pipe_pass2(const ClPipeArgs<T>& a, int64_t u, int k) {
  constexpr int P = BWD ? 4 : 2;
  const ClPipeDev& d = a.d;
  const ClPipeLane l(d);
  const int64_t n = d.n_of(u), c0 = d.c_lo(u) + l.j * V, t0 = k * d.chunk, t1 = min(t0 + d.chunk, d.HW);
  pipe_wait(a.sync + 1 + u, d.splits + 1, a.coef + n * P * d.C + d.c_lo(u), d.W);  // (poisons plane a)
  if (!l.active) return;
  float cf[P][V];
  load_planes<V, P>(a.coef, n, d.C, c0, cf);
  const int64_t base = n * d.HW * d.C;
#pragma unroll 4
  for (int64_t t = t0 + l.r; t < t1; t += d.rows) {
    const int64_t off = base + t * d.C + c0;
    const Vec<T, V> xv = load_vec<T, V>(a.x + off);
    Vec<T, V> o;
    if constexpr (BWD) {
      const Vec<T, V> dv = load_vec<T, V>(a.dy + off);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float xf = static_cast<float>(xv.v[v]);
        const float dm = dm_of(static_cast<float>(dv.v[v]), xf * cf[0][v] + cf[1][v], a.silu);
        o.v[v] = static_cast<T>(cf[0][v] * dm + cf[2][v] * xf + cf[3][v]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float m = static_cast<float>(xv.v[v]) * cf[0][v] + cf[1][v];
        o.v[v] = static_cast<T>(a.silu ? m * sigmoidf_(m) : m);
      }
    }
    store_vec<T, V>(a.out + off, o);
  }
}

template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(kThreads) gn_cl_pipelined(ClPipeArgs<T> a) {
  KILN_DYNAMIC_SMEM(float, fin);  // 2·W channel totals, then 2·UG group statistics
  __shared__ float red[2 * kThreads * V];
  __shared__ int64_t ticket;
  __shared__ int last;
  int* flags = a.sync + 1;
  pipe_run(
      a.sync, a.d.units, a.d.splits, a.lag, &ticket,
      [&](int64_t u, int k) {
        cl_pipe_pass1<T, V, BWD>(a, u, k, red);
        if (pipe_arrive(flags + u, a.d.splits, &last)) {
          cl_pipe_finalize<T, BWD>(a, u, red, fin);
          pipe_publish(flags + u);
        }
      },
      [&](int64_t u, int k) { cl_pipe_pass2<T, V, BWD>(a, u, k); });
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

// ---- the NCHW one-launch plan ----

// Elements per work item: 8192 (16 KB of bf16 x: one trip of normalize_chunk's 4 vectors a
// thread, two of dx_chunk's), or a third of a small group so that every group has a few. At
// 1x128x512x512 bf16 that is 128 chunks a group, 8K tickets a launch; on 132 SMs the forward
// (80 registers, 3 blocks per SM) gets lag 3, a chunk's two reads 7 groups (15 MB of x) apart,
// the backward (98 registers, 2 blocks) lag 2, 5 groups (21 MB of x and dy) apart.
constexpr int64_t kPipeChunk = 8192;

GNDev make_pipe_dev(const GNShape& s, int V) {
  GNDev d{s.C, s.HW, s.Cg, s.G, s.group_size(), 0, 1};
  const int64_t third = (d.M + 2) / 3;
  d.chunk = std::min<int64_t>(kPipeChunk, (third + V - 1) / V * V);
  d.splits = static_cast<int>((d.M + d.chunk - 1) / d.chunk);
  return d;
}

// Groups between a group's P1 and its P2: P1(i)'s chunks are claimed (2·lag + 1)·splits tickets
// before P2(i)'s, at least two grids' worth, so they are done by then.
int64_t pipe_lag(int64_t grid, int splits, int64_t units) {
  const int64_t per_grid = (2 * grid + splits - 1) / splits;
  return std::min<int64_t>(units, std::max<int64_t>(1, per_grid / 2));
}

// Groups per channels-last unit (group_norm_triton_pipelined.unit_groups' rule): of the unit
// widths of at most 32 channels (a whole group if one is wider), those whose rows hold at least
// one 16-byte vector where any do; among them the widest whose x fits 4 MB (so that a chunk's
// two reads, ~3 units apart with x and dy, fit in half an L2), else the narrowest.
int cl_unit_groups(const GNShape& s, size_t itemsize) {
  std::vector<int> widths, whole, fitting;
  for (int d = 1; d <= s.G; ++d)
    if (s.G % d == 0 && (d == 1 || d * s.Cg <= 32)) widths.push_back(d);
  for (int d : widths)
    if (d * s.Cg * int64_t(itemsize) >= 16) whole.push_back(d);
  if (whole.empty()) whole.push_back(widths.back());
  for (int d : whole)
    if (s.HW * d * s.Cg * int64_t(itemsize) <= (int64_t(4) << 20)) fitting.push_back(d);
  return fitting.empty() ? whole.front() : fitting.back();
}

// A one-launch kernel's launch: as many blocks as the SMs hold at once (at most one a ticket),
// its lag, its counters (zeros: the ticket, then a flag per unit).
template <typename Args, typename... KArgs>
void launch_one(void (*kernel)(KArgs...), Args& a, int64_t smem_count, int splits, int64_t units,
                const at::Tensor& like, cudaStream_t stream) {
  const int64_t tickets = 2 * units * splits;
  KILN_CHECK(tickets < (int64_t(1) << 30), "group_norm (CUDA, one launch): ", tickets,
             " work items exceed the int ticket counter");
  const at::Tensor sync = at::zeros({1 + units}, like.options().dtype(at::kInt));
  a.sync = sync.data_ptr<int>();
  const size_t smem = smem_floats(kernel, smem_count);
  const int64_t grid = std::min<int64_t>(tickets, int64_t(sm_count()) * blocks_per_sm(kernel, kThreads, smem));
  a.lag = pipe_lag(grid, splits, units);
  KILN_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, smem, stream, a);
}

enum class Plan { TwoPass, Pipelined };

// KILN_CSRC_GN_PLAN = auto (default) | two_pass | pipelined. auto: the one launch when the bytes
// pass 1 reads (x; x and dy in the backward) exceed the L2, where the two-launch re-read comes
// partly from HBM (a rule from the traffic model, not yet from a measurement: the GroupNorm
// benchmark times both plans). Channels-last units wider than kThreads channels (C/G > 256)
// have only the two-launch plan.
Plan gn_plan(const GNShape& s, int tensors, size_t itemsize) {
  const char* env = std::getenv("KILN_CSRC_GN_PLAN");
  const std::string v = env ? env : "auto";
  KILN_CHECK(v == "auto" || v == "two_pass" || v == "pipelined", "KILN_CSRC_GN_PLAN='", v,
             "': expected auto, two_pass or pipelined");
  const bool one_ok = !s.channels_last || cl_unit_groups(s, itemsize) * s.Cg <= kThreads;
  KILN_CHECK(one_ok || v != "pipelined", "KILN_CSRC_GN_PLAN=pipelined: channels-last with C/G = ", s.Cg,
             " channels per group, more than a block's ", kThreads, " threads; use two_pass or auto");
  if (v == "two_pass" || !one_ok) return Plan::TwoPass;
  if (v == "pipelined") return Plan::Pipelined;
  const int64_t bytes = int64_t(tensors) * s.N * s.C * s.HW * static_cast<int64_t>(itemsize);
  return bytes > l2_bytes() ? Plan::Pipelined : Plan::TwoPass;
}

// The one launch, forward (dy, A, B null; mean, rstd written) or backward (mean, rstd read).
template <typename T, int V, bool BWD>
void launch_pipelined(const GNPrepared& pr, bool silu, double eps, const T* dy, T* out, float* mean, float* rstd,
                      float* A, float* B, cudaStream_t stream) {
  const GNShape& s = pr.s;
  const GNDev d = make_pipe_dev(s, V);
  const int64_t units = s.N * s.G;
  const at::TensorOptions f = pr.x.options().dtype(at::kFloat);
  at::Tensor part = at::empty({units, d.splits, BWD ? 2 * s.Cg : 2}, f);
  at::Tensor m12 = at::empty({BWD ? 2 * units : 0}, f);
  PipeArgs<T> a{pr.x.const_data_ptr<T>(), dy, out, d, pr.params(), silu, static_cast<float>(eps), mean, rstd,
                part.data_ptr<float>(), A, B, m12.data_ptr<float>(), nullptr, units, 0};
  if constexpr (BWD) {
    if (d.chunk >= 4 * d.HW)  // as launch_bwd_partials: a warp per channel piece
      return launch_one(gn_pipelined<T, V, BWD, 32>, a, 2 * d.Cg, d.splits, units, pr.x, stream);
  }
  launch_one(gn_pipelined<T, V, BWD, kThreads>, a, 2 * d.Cg, d.splits, units, pr.x, stream);
}

// The channels-last one launch: forward (dy, A, B null; mean, rstd written) or backward.
template <typename T, int V, bool BWD>
void launch_cl_pipelined(const GNPrepared& pr, bool silu, double eps, const T* dy, T* out, float* mean, float* rstd,
                         float* A, float* B, cudaStream_t stream) {
  const GNShape& s = pr.s;
  ClPipeDev d{s.HW, s.C, s.G, s.Cg, cl_unit_groups(s, sizeof(T)), 0, 0, 0, 0, 1, 0};
  d.W = static_cast<int>(d.UG * s.Cg);
  d.VW = d.W / V;
  d.rows = kThreads / d.VW;
  const int64_t third = (s.HW + 2) / 3;  // a few chunks a unit at small HW, as make_pipe_dev
  d.chunk = std::max<int64_t>(1, std::min<int64_t>(kPipeChunk / d.W, third));
  d.splits = static_cast<int>((s.HW + d.chunk - 1) / d.chunk);
  d.units = s.N * s.G / d.UG;
  const at::TensorOptions f = pr.x.options().dtype(at::kFloat);
  at::Tensor part = at::empty({d.units, d.splits, 2, d.W}, f);
  at::Tensor coef = at::empty({s.N, BWD ? 4 : 2, s.C}, f);
  ClPipeArgs<T> a{pr.x.const_data_ptr<T>(), dy, out, d, pr.params(), silu, static_cast<float>(eps), mean, rstd,
                  part.data_ptr<float>(), coef.data_ptr<float>(), A, B, nullptr, 0};
  launch_one(gn_cl_pipelined<T, V, BWD>, a, 2 * d.W + 2 * d.UG, d.splits, d.units, pr.x, stream);
}

// The unit's channels as V-wide vectors when its width allows (each unit's first channel then
// 16-byte aligned), else scalars.
template <typename T, int V, bool BWD>
void launch_cl_pipelined_any(const GNPrepared& pr, bool silu, double eps, const T* dy, T* out, float* mean,
                             float* rstd, float* A, float* B, cudaStream_t stream) {
  const int64_t W = cl_unit_groups(pr.s, sizeof(T)) * pr.s.Cg;
  if (W % V == 0)
    launch_cl_pipelined<T, V, BWD>(pr, silu, eps, dy, out, mean, rstd, A, B, stream);
  else
    launch_cl_pipelined<T, 1, BWD>(pr, silu, eps, dy, out, mean, rstd, A, B, stream);
}

constexpr int64_t kMaxCg = 12288;  // NCHW: 2·Cg fp32 of shared memory (wf, bf or a, b) in 96 KB
constexpr int kStatThreads = 128;  // per-(n, g) finalize blocks of the channels-last path

at::Tensor f32(const at::Tensor& like, at::IntArrayRef shape) { return at::empty(shape, like.options().dtype(at::kFloat)); }

template <typename T, int V>
void launch_fwd(const GNPrepared& pr, double eps, bool silu, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd,
                cudaStream_t stream) {
  const GNShape& s = pr.s;
  const T* x = pr.x.const_data_ptr<T>();
  const Plan plan = gn_plan(s, 1, sizeof(T));
  if (s.channels_last && plan == Plan::Pipelined)
    return launch_cl_pipelined_any<T, V, false>(pr, silu, eps, nullptr, y.data_ptr<T>(), mean.data_ptr<float>(),
                                                rstd.data_ptr<float>(), nullptr, nullptr, stream);
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
  if (plan == Plan::Pipelined)
    return launch_pipelined<T, V, false>(pr, silu, eps, nullptr, y.data_ptr<T>(), mean.data_ptr<float>(),
                                         rstd.data_ptr<float>(), nullptr, nullptr, stream);
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
  const Plan plan = gn_plan(s, 2, sizeof(T));
  if (s.channels_last && plan == Plan::Pipelined)
    return launch_cl_pipelined_any<T, V, true>(pr, silu, 0.0, dyp, dx.data_ptr<T>(), mean.data_ptr<float>(),
                                               rstd.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(),
                                               stream);
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
  if (plan == Plan::Pipelined)
    return launch_pipelined<T, V, true>(pr, silu, 0.0, dyp, dx.data_ptr<T>(), mean.data_ptr<float>(),
                                        rstd.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(), stream);
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
