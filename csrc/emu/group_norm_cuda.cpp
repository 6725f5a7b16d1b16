// ../group_norm_cuda.cu compiled as C++ with KILN_CUDA_EMU: its kernels run on the CPU (cuda_emu.h).
#include "../group_norm_cuda.cu"
