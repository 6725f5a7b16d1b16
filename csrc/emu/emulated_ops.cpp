// The kiln_emu library: kiln_ext's schemas, implemented on CPU tensors by the CUDA kernels of
// ../*.cu run under the emulator (cuda_emu.h; the kernels register from group_norm_cuda.cpp and
// qk_norm_rope_cuda.cpp beside this file). Built by the tests only (tests/emulated_cuda.py).
#include "../schemas.h"

TORCH_LIBRARY(kiln_emu, m) { kiln::define_ops(m); }
