// Kernels with the bugs the emulator must report (tests/test_csrc_emulated.py): a shared-memory
// race (a missing __syncthreads), a block that needs another's output, a deadlock, a barrier in
// divergent code, a shuffle with an exited lane, too much shared memory, a wait no running block
// can end; and a legal barrier after other threads have exited, a legal wait between resident blocks.
// kiln_emu::emulator_selftest(name) runs one and returns what its threads read.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../cuda_utils.cuh"

namespace {

// Warp w stores w + 1 in slot w, then reads the next warp's slot: with the barrier every read
// sees the stored value; without it, what a warp reads depends on which warps ran first.
template <bool kBarrier>
__global__ void neighbour_read(float* out) {
  __shared__ float slot[8];
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) slot[warp] = warp + 1.f;
  if constexpr (kBarrier) __syncthreads();
  const float seen = slot[(warp + 1) % warps];
  out[threadIdx.x] = kiln::warp_sum(seen) / 32;  // a shuffle lets one warp run ahead of the next
  __syncthreads();
  if ((threadIdx.x & 31) == 0) slot[warp] = -1.f;  // what a late reader would see
}

// Block b adds to what block b - 1 wrote: right only if the blocks run in order, which a GPU
// does not promise.
__global__ void chained_blocks(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 1.f + (blockIdx.x > 0 ? out[blockIdx.x - 1] : 0.f);
}

// Half of each warp waits at the barrier, the other half at a shuffle that needs the first half.
__global__ void half_warp_barrier(float* out) {
  if ((threadIdx.x & 31) < 16)
    __syncthreads();
  else
    out[threadIdx.x] = kiln::warp_sum(1.f);
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Warps 1-7 leave at once: warp 0's barrier waits for nobody else (exited threads count as
// arrived, as on the GPU), and the exited threads are not run again.
__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = kiln::warp_sum(1.f);
}

__global__ void dynamic_smem(float* out) {
  KILN_DYNAMIC_SMEM(float, buf);
  out[threadIdx.x] = buf[threadIdx.x];
}

// Block 1 waits for block 0's signal: fine when both are resident (KILN_EMU_RESIDENT=2), a
// wait nobody can end when the blocks run in turn and block 1 comes first (reverse order).
__global__ void signal_chain(float* out, int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    out[0] = 1.f;
    __threadfence();
    atomicAdd(flag, 1);
  }
  if (blockIdx.x == 1 && threadIdx.x == 0) {
    wait_at_least(flag, 1);
    out[1] = out[0] + 1.f;
  }
}

at::Tensor emulator_selftest(const std::string& name) {
  at::Tensor out = at::zeros({256}, at::kFloat);
  float* o = out.data_ptr<float>();
  if (name == "race")
    KILN_LAUNCH(neighbour_read<false>, 1, 256, 0, nullptr, o);
  else if (name == "no_race")
    KILN_LAUNCH(neighbour_read<true>, 1, 256, 0, nullptr, o);
  else if (name == "chained_blocks")
    KILN_LAUNCH(chained_blocks, 8, 32, 0, nullptr, o);
  else if (name == "deadlock")
    KILN_LAUNCH(half_warp_barrier, 1, 256, 0, nullptr, o);
  else if (name == "divergent_barrier")
    KILN_LAUNCH(divergent_barrier, 1, 256, 0, nullptr, o);
  else if (name == "barrier_after_exit")
    KILN_LAUNCH(barrier_after_exit, 1, 256, 0, nullptr, o);
  else if (name == "exited_lane")
    KILN_LAUNCH(shuffle_after_exit, 1, 256, 0, nullptr, o);
  else if (name == "smem_nan")
    KILN_LAUNCH(dynamic_smem, 1, 256, 256 * sizeof(float), nullptr, o);
  else if (name == "signal_chain") {
    at::Tensor flag = at::zeros({1}, at::kInt);
    KILN_LAUNCH(signal_chain, 2, 32, 0, nullptr, o, flag.data_ptr<int>());
  } else if (name == "smem_too_big")
    KILN_LAUNCH(dynamic_smem, 1, 256, 228 * 1024, nullptr, o);
  else
    TORCH_CHECK(false, "emulator_selftest: unknown case ", name);
  return out;
}

}  // namespace

// Polls of wait_at_least that found their counter short so far (the resident blocks really waited).
int64_t emulator_waits() { return kiln_emu::short_polls().load(); }

TORCH_LIBRARY_FRAGMENT(kiln_emu, m) {
  m.def("emulator_selftest(str name) -> Tensor", &emulator_selftest);
  m.def("emulator_waits() -> int", &emulator_waits);
}
