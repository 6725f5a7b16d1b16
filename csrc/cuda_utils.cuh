// Device helpers shared by kiln_ext's CUDA kernels: launches, vector loads, block reductions,
// the fixed-order column sum that makes every cross-block reduction deterministic (no float
// atomics), and the integer counters by which the blocks of one launch signal each other.
// The host side reaches CUDA only through launch_kernel (KILN_LAUNCH), DeviceGuard,
// current_stream, sm_count, l2_bytes, blocks_per_sm and KILN_CUDA_IMPL, so that with KILN_CUDA_EMU defined the same .cu
// files compile as C++ and their kernels run on the CPU (emu/cuda_emu.h, a tests-only build).
#pragma once

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#ifdef KILN_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kiln {

// kernel<<<grid, block, smem, stream>>>(args...), then a launch check that names the launch
// (`what`: its source text, from KILN_LAUNCH).
template <typename... KArgs, typename... Args>
void launch_kernel(const char* what, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
#ifdef KILN_CUDA_EMU
  kiln_emu::launch(what, kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "kiln_ext: KILN_LAUNCH(", what, "): ", cudaGetErrorString(err));
#endif
}
#define KILN_LAUNCH(...) ::kiln::launch_kernel(#__VA_ARGS__, __VA_ARGS__)

#ifdef KILN_CUDA_EMU
// Dynamic shared memory (one per kernel): `extern __shared__ T name[]` on the GPU.
#define KILN_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::kiln_emu::dynamic_smem())
// The emulated kernels implement kiln_emu's copies of the schemas, on CPU tensors.
#define KILN_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(kiln_emu, CPU, m)
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int sm_count() { return kiln_emu::sm_count(); }  // KILN_EMU_SMS, default an H100's 132
inline int64_t l2_bytes() {  // KILN_EMU_L2_BYTES, default an H100's 50 MB
  const char* e = std::getenv("KILN_EMU_L2_BYTES");
  return e ? std::atoll(e) : int64_t(50) << 20;
}
template <typename Kernel>
int blocks_per_sm(Kernel, int, size_t) {
  return 2;
}
#else
#define KILN_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define KILN_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(kiln_ext, CUDA, m)
struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
};
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int64_t l2_bytes() { return at::cuda::getCurrentDeviceProperties()->l2CacheSize; }
// Blocks of `kernel` one SM holds at once (registers, shared memory, threads).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return std::max(1, n);
}

// ---- signals between the blocks of one launch (group_norm_cuda.cu's one-launch plan) --------
// A counter in global memory: a block's thread 0 adds to it after a __syncthreads and a fence
// (release: every thread's earlier stores are visible first) and another block's thread 0
// spins on an acquire load, then releases its block with a __syncthreads. Data written during
// the launch is read with __ldcg (from L2: L1 is not coherent between SMs).
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Spin until *flag >= target; false after ~1 s (2^20 tries ~1 µs apart): a broken schedule,
// never a real wait (those are microseconds), is reported in the results instead of a hung GPU.
__device__ __forceinline__ bool wait_at_least(const int* flag, int target) {
  for (int i = 0; i < (1 << 20); ++i) {
    if (load_acquire(flag) >= target) return true;
    __nanosleep(1000);
  }
  return false;
}
#endif

// V contiguous elements moved as one 16-byte (or narrower) transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem32 may still be read by a previous call
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  v = lane < warps ? smem32[lane] : 0.f;
  return warp_sum(v);
}

// Widest vector width (elements) for a 16-byte transaction of T, 1 when pointers are unaligned.
template <typename T>
constexpr int max_vec() {
  return 16 / sizeof(T);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Dynamic shared memory of `floats` fp32 for `kernel`, opting in above the default 48 KB.
template <typename Kernel>
size_t smem_floats(Kernel kernel, int64_t floats) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
#ifndef KILN_CUDA_EMU  // (the emulator checks the 227 KB limit at the launch)
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#endif
  return bytes;
}

namespace {  // one copy per .cu file (internal linkage)

constexpr int kSumRows = 8;  // row lanes of column_sums' (32, kSumRows) blocks

// Σ over r of part[n, r, col] (part (N, rows, cols) fp32) in a fixed order, so the reduction of
// per-block partials is bitwise reproducible (atomicAdd's order is not). Columns < split_col go to
// out0 (N, split_col), the rest to out1 (N, cols - split_col). Grid (ceil(cols / 32), N), block
// (32, kSumRows): lane y sums rows y, y + 8, ..., then lane y = 0 adds the 8 sums in order.
__global__ void __launch_bounds__(32 * kSumRows) column_sums(const float* __restrict__ part, int64_t rows, int64_t cols,
                                                            int64_t split_col, float* __restrict__ out0,
                                                            float* __restrict__ out1) {
  __shared__ float sums[kSumRows][33];
  const int64_t n = blockIdx.y, col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kSumRows) s += part[(n * rows + r) * cols + col];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  float t = 0.f;
#pragma unroll
  for (int y = 0; y < kSumRows; ++y) t += sums[y][threadIdx.x];
  if (col < split_col)
    out0[n * split_col + col] = t;
  else
    out1[n * (cols - split_col) + col - split_col] = t;
}

inline void launch_column_sums(const float* part, int64_t N, int64_t rows, int64_t cols, int64_t split_col,
                               float* out0, float* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(N)), block(32, kSumRows);
  KILN_LAUNCH(column_sums, grid, block, 0, stream, part, rows, cols, split_col, out0, out1);
}

}  // namespace

}  // namespace kiln
