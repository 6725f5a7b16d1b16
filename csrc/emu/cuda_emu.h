// A CPU stand-in for the slice of CUDA that kiln's kernels use, so that the .cu files' kernels run
// on a GPU-less machine, unchanged, as C++ (tests/test_csrc_emulated.py). Compiled when
// KILN_CUDA_EMU is defined (cuda_utils.cuh then includes this instead of the CUDA headers).
//
// Model: the blocks of a launch run one after another; a block's threads are fibers (ucontext) on
// one OS thread, switched only at __syncthreads and warp shuffles, so a run is deterministic and
// its interleaving chosen (run_block): each warp runs as far ahead of the others as it can, warp
// 0 first or, with KILN_EMU_ORDER=reverse, the last first (and the blocks last to first). A
// missing barrier, or a block that reads what another block of the same launch writes, then
// gives the two orders different values (the tests compare them bit for bit).
// With KILN_EMU_RESIDENT=R > 1, R blocks are resident at once, for kernels whose blocks signal
// each other (integer atomics, wait_at_least): one OS thread each (its own fibers, shared memory
// and `__shared__` statics), of which one runs at a time (Baton); the turn passes at every
// integer atomic and every unsuccessful poll of wait_at_least, to a block drawn by a generator
// seeded with KILN_EMU_SEED. Blocks then really wait for each other, in an order that changes
// with the seed.
// What it checks, with an error naming the kernel's problem instead of a hang or a wrong number:
// - a __syncthreads or shuffle that not every live thread (or lane) reaches: deadlock; threads
//   waiting at __syncthreads on different source lines (a barrier in divergent code);
// - a full-mask shuffle in a warp some of whose lanes have exited;
// - dynamic shared memory over the 227 KB an sm_90 block may have; it is filled with NaN at every
//   block's start, so a read before any write shows up in the results.
// - a block that waits for a counter no block has yet raised (wait_at_least): blocks run in turn,
//   so it would wait forever; on a GPU the one-launch GroupNorm's ticket order rules that out
//   (a block waits only for work of earlier tickets), so here it is a broken schedule.
// Not modelled: memory ordering between threads other than at barriers (integer atomics and
// fences act at once: one fiber runs at a time), timing, registers. `__shared__` arrays are
// function-local thread_local statics: one block at a time uses them on each OS thread.
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace kiln_emu {

constexpr size_t kMaxSharedBytes = 227 * 1024;  // dynamic shared memory an sm_90 block may opt into
constexpr size_t kStackBytes = 256 * 1024;

enum class State { Ready, Block, Warp, Done };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int lin = 0;  // linear thread index: x + y·bx + z·bx·by
  State state = State::Ready;
  int site = 0;  // the source line of the __syncthreads it waits at
};

struct Launch {
  std::string kernel;
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  std::vector<float> smem;
  ucontext_t sched;
  Fiber* cur = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Launch*& launch_state() {
  static thread_local Launch* l = nullptr;
  return l;
}

// The turn among the OS threads of resident blocks (KILN_EMU_RESIDENT): exactly one runs.
class Baton {
 public:
  Baton(int n, uint64_t seed) : live_(n, 1), rng_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  // Wait for the first turn; false if the launch failed meanwhile.
  bool start(int me) {
    std::unique_lock<std::mutex> lk(m_);
    cv_.wait(lk, [&] { return turn_ == me || failed_; });
    return !failed_;
  }
  // Hand the turn to a live block (perhaps this one) and wait to get it back.
  void pass(int me) {
    std::unique_lock<std::mutex> lk(m_);
    turn_ = draw();
    cv_.notify_all();
    cv_.wait(lk, [&] { return turn_ == me || failed_; });
  }
  bool failed() {
    std::lock_guard<std::mutex> lk(m_);
    return failed_;
  }
  void finish(int me) {
    std::lock_guard<std::mutex> lk(m_);
    live_[me] = 0;
    for (char v : live_)
      if (v) {
        turn_ = draw();
        break;
      }
    cv_.notify_all();
  }
  void fail() {
    std::lock_guard<std::mutex> lk(m_);
    failed_ = true;
    cv_.notify_all();
  }
  int live() {
    std::lock_guard<std::mutex> lk(m_);
    int n = 0;
    for (char v : live_) n += v;
    return n;
  }

 private:
  int draw() {  // a live block, uniformly (xorshift64)
    rng_ ^= rng_ << 13, rng_ ^= rng_ >> 7, rng_ ^= rng_ << 17;
    std::vector<int> alive;
    for (int i = 0; i < static_cast<int>(live_.size()); ++i)
      if (live_[i]) alive.push_back(i);
    return alive[rng_ % alive.size()];
  }
  std::mutex m_;
  std::condition_variable cv_;
  int turn_ = 0;
  std::vector<char> live_;
  bool failed_ = false;
  uint64_t rng_;
};

struct Residency {
  Baton* baton = nullptr;
  int slot = 0;
};
inline Residency& residency() {
  static thread_local Residency r;
  return r;
}
// Polls of wait_at_least that found the counter short, over all launches (emulator_waits).
inline std::atomic<int64_t>& short_polls() {
  static std::atomic<int64_t> n{0};
  return n;
}
inline Launch& L() { return *launch_state(); }

inline const dim3& thread_idx() { return L().cur->tid; }
inline const dim3& block_idx() { return L().block_idx; }
inline const dim3& block_dim() { return L().block; }
inline const dim3& grid_dim() { return L().grid; }

// Park the running fiber in `s` and return to the scheduler; it resumes once released.
inline void park(State s) {
  Launch& l = L();
  Fiber* f = l.cur;
  f->state = s;
  swapcontext(&f->ctx, &l.sched);
}

inline void fiber_entry() {
  Launch& l = L();
  try {
    l.body();
  } catch (const std::exception& e) {  // unwinding must not leave the fiber's stack
    if (l.error.empty()) l.error = e.what();
  }
  l.cur->state = State::Done;
  swapcontext(&l.cur->ctx, &l.sched);
}

inline std::string failure(const std::string& why) {
  return "kiln CUDA emulation: kernel " + L().kernel + ", block (" + std::to_string(L().block_idx.x) + ", " +
         std::to_string(L().block_idx.y) + "): " + why;
}

// An error found by the scheduler: thrown at once.
[[noreturn]] inline void fail(const std::string& why) { throw std::runtime_error(failure(why)); }

// An error found by a running thread (a fiber): recorded, and the fiber ends there; run_block
// throws it on its own stack. (Not thrown on the fiber's stack: AddressSanitizer's unwinding
// checks misread a switched stack, 2026-12-02.)
[[noreturn]] inline void fiber_fail(const std::string& why) {
  Launch& l = L();
  if (l.error.empty()) l.error = failure(why);
  l.cur->state = State::Done;
  swapcontext(&l.cur->ctx, &l.sched);
  std::abort();  // never resumed
}

// A point where another resident block may run (every integer atomic, every short poll).
inline void handoff() {
  Residency& r = residency();
  if (!r.baton) return;
  r.baton->pass(r.slot);
  if (r.baton->failed()) fiber_fail("stopped: another resident block failed");
}

// Release the fibers waiting at a barrier once everyone it waits for is there: the block
// barrier waits for every live thread, a warp barrier for every lane of its warp.
inline bool release_barriers() {
  Launch& l = L();
  const int n = static_cast<int>(l.fibers.size());
  bool any = false;
  int live = 0, at_block = 0, site = -1;
  for (const Fiber& f : l.fibers) {
    live += f.state != State::Done;
    if (f.state != State::Block) continue;
    ++at_block;
    if (site >= 0 && f.site != site)
      fail("__syncthreads reached at different places (lines " + std::to_string(site) + " and " +
           std::to_string(f.site) + "): a barrier in code the block does not run alike");
    site = f.site;
  }
  if (live > 0 && at_block == live) {  // threads that have exited count as arrived
    for (Fiber& f : l.fibers)
      if (f.state == State::Block) f.state = State::Ready;
    any = true;
  }
  for (int w = 0; w < n; w += 32) {
    int at_warp = 0, done = 0, lanes = std::min(32, n - w);
    for (int i = w; i < w + lanes; ++i) at_warp += l.fibers[i].state == State::Warp, done += l.fibers[i].state == State::Done;
    if (at_warp == 0) continue;
    if (done > 0) fail("a full-mask warp shuffle in a warp with exited lanes");
    if (at_warp == lanes) {
      for (int i = w; i < w + lanes; ++i) l.fibers[i].state = State::Ready;
      any = true;
    }
  }
  return any;
}

inline bool reverse_order() {
  const char* e = std::getenv("KILN_EMU_ORDER");
  return e && std::string(e) == "reverse";
}

// Warps take turns by priority (warp 0 first, or the last first in reverse order): the first
// warp with a runnable lane runs each such lane up to its next barrier or shuffle, and again
// after every shuffle, until it waits at a __syncthreads or ends; only then does the next warp
// move. A warp thus runs as far ahead of the others as a real one may, and a shared-memory
// race that a missing barrier opens reads the other warps' values of a different phase.
inline void run_block() {
  Launch& l = L();
  const int n = static_cast<int>(l.fibers.size()), warps = (n + 31) / 32;
  const bool rev = reverse_order();
  std::fill(l.smem.begin(), l.smem.end(), std::numeric_limits<float>::quiet_NaN());
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &l.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
  }
  for (;;) {
    bool ran = false;
    for (int k = 0; k < warps && !ran; ++k) {
      const int w = rev ? warps - 1 - k : k, lanes = std::min(32, n - 32 * w);
      for (int j = 0; j < lanes; ++j) {
        Fiber& f = l.fibers[32 * w + (rev ? lanes - 1 - j : j)];
        if (f.state != State::Ready) continue;
        l.cur = &f;
        swapcontext(&l.sched, &f.ctx);
        ran = true;
        if (!l.error.empty()) throw std::runtime_error(l.error);
      }
    }
    bool done = true;
    for (const Fiber& f : l.fibers) done = done && f.state == State::Done;
    if (done) return;
    if (!release_barriers() && !ran)
      fail("deadlock: a __syncthreads or warp shuffle that not every live thread reaches");
  }
}

inline int resident_blocks() {
  const char* e = std::getenv("KILN_EMU_RESIDENT");
  return e ? std::max(1, std::atoi(e)) : 1;
}

// A launch's per-OS-thread state: fibers (one per thread of a block) and dynamic shared memory.
template <typename Params, typename Kernel>
void prepare(Launch& l, const char* name, Kernel kernel, const Params& params, dim3 grid, dim3 block,
             size_t smem_bytes) {
  l.kernel = name;
  l.grid = grid;
  l.block = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  l.fibers.resize(n);
  l.slots.assign(n, 0);
  l.smem.assign((smem_bytes + sizeof(float) - 1) / sizeof(float), 0.f);
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.stack.resize(kStackBytes);
    f.lin = i;
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  l.body = [kernel, &params] { std::apply(kernel, params); };  // each thread gets its own copies of the arguments
}

// Blocks k = first, first + stride, ... of the launch (last to first in reverse order).
inline void run_blocks(Launch& l, unsigned first, unsigned stride) {
  const bool rev = reverse_order();  // blocks last to first too: a block must not need another's results
  const unsigned blocks = l.grid.x * l.grid.y * l.grid.z;
  for (unsigned k = first; k < blocks; k += stride) {
    const unsigned b = rev ? blocks - 1 - k : k;
    l.block_idx = dim3(b % l.grid.x, (b / l.grid.x) % l.grid.y, b / (l.grid.x * l.grid.y));
    run_block();
  }
}

// R resident blocks: OS thread i runs blocks i, i + R, ... while holding the baton.
template <typename Params, typename Kernel>
void run_resident(int R, const char* name, Kernel kernel, const Params& params, dim3 grid, dim3 block,
                  size_t smem_bytes) {
  const char* seed = std::getenv("KILN_EMU_SEED");
  Baton baton(R, seed ? std::strtoull(seed, nullptr, 10) : 1);
  std::vector<std::string> errors(R);
  std::vector<std::thread> threads;
  for (int i = 0; i < R; ++i)
    threads.emplace_back([&, i] {
      Launch l;
      prepare(l, name, kernel, params, grid, block, smem_bytes);
      launch_state() = &l;
      residency() = {&baton, i};
      try {
        if (baton.start(i)) run_blocks(l, i, R);
      } catch (const std::exception& e) {
        errors[i] = e.what();
        baton.fail();
      }
      residency() = {};
      launch_state() = nullptr;
      baton.finish(i);
    });
  for (std::thread& t : threads) t.join();
  for (const std::string& e : errors)  // the first block's own error, not a block stopped by it
    if (!e.empty() && e.find("another resident block failed") == std::string::npos) throw std::runtime_error(e);
}

// Runs kernel(args...) over the grid: what `kernel<<<grid, block, smem, stream>>>(args...)` does.
template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  if (smem_bytes > kMaxSharedBytes)
    throw std::runtime_error(std::string("kiln CUDA emulation: kernel ") + name + " asks for " +
                             std::to_string(smem_bytes) + " bytes of dynamic shared memory (sm_90: 227 KB)");
  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const unsigned blocks = grid.x * grid.y * grid.z;
  const int R = static_cast<int>(std::min<unsigned>(resident_blocks(), blocks));
  if (R > 1) return run_resident(R, name, kernel, params, grid, block, smem_bytes);
  Launch l;
  prepare(l, name, kernel, params, grid, block, smem_bytes);
  Launch* outer = launch_state();
  launch_state() = &l;
  try {
    run_blocks(l, 0, 1);
  } catch (...) {
    launch_state() = outer;
    throw;
  }
  launch_state() = outer;
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  Launch& l = L();
  const int me = l.cur->lin, partner = (me & ~31) | ((me & 31) ^ lane_mask);
  if (partner >= static_cast<int>(l.fibers.size())) fiber_fail("a warp shuffle with a lane past the block's threads");
  std::memcpy(&l.slots[me], &v, sizeof(T));
  park(State::Warp);  // every lane has written
  T r;
  std::memcpy(&r, &l.slots[partner], sizeof(T));
  park(State::Warp);  // every lane has read before the next shuffle writes
  return r;
}

inline float* dynamic_smem() { return L().smem.data(); }

inline int sm_count() {
  const char* e = std::getenv("KILN_EMU_SMS");
  return e ? std::max(1, std::atoi(e)) : 132;
}

}  // namespace kiln_emu

#define threadIdx (::kiln_emu::thread_idx())
#define blockIdx (::kiln_emu::block_idx())
#define blockDim (::kiln_emu::block_dim())
#define gridDim (::kiln_emu::grid_dim())

namespace kiln_emu {
inline void sync_block(int line) {
  L().cur->site = line;
  park(State::Block);
}
}  // namespace kiln_emu
#define __syncthreads() ::kiln_emu::sync_block(__LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) ::kiln_emu::fiber_fail("only full-mask shuffles are emulated");
  return ::kiln_emu::shfl_xor(v, lane_mask);
}

// Integer atomics and fences: with one fiber running at a time, plain reads and writes; each
// atomic lets another resident block run first.
inline int atomicAdd(int* p, int v) {
  ::kiln_emu::handoff();
  const int old = *p;
  *p += v;
  return old;
}
inline int atomicMax(int* p, int v) {
  ::kiln_emu::handoff();
  const int old = *p;
  *p = std::max(old, v);
  return old;
}
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
// Polls until *flag >= target, letting the other resident blocks run in between. A wait that no
// block still running can end (blocks in turn: it does not pass at once; resident blocks: all
// others have finished, or 10^6 polls) is a broken schedule, reported as such.
inline bool wait_at_least(const int* flag, int target) {
  ::kiln_emu::Residency& r = ::kiln_emu::residency();
  for (int polls = 0; *flag < target; ++polls) {
    if (!r.baton || r.baton->live() == 1 || polls == 1000000)
      ::kiln_emu::fiber_fail("waits for a counter at " + std::to_string(*flag) + " to reach " + std::to_string(target) +
                       ", which no block still running can raise (a broken ticket order)");
    ++::kiln_emu::short_polls();
    ::kiln_emu::handoff();
  }
  return true;
}

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }

// CUDA's min/max device overloads, for the mixed integer arguments the kernels pass
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
