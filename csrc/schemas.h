// Every schema of kiln's compiled ops, in one place: defined by kiln_ext (kiln_ext.cpp) and by the
// tests' CPU emulation of the CUDA kernels (emu/emulated_ops.cpp, library kiln_emu).
#pragma once

#include <torch/library.h>

namespace kiln {

inline void define_ops(torch::Library& m) {
  // GroupNorm(+affine, +(1 + scale)·y + shift, +SiLU); mean/rstd are (N, G) fp32 statistics.
  m.def("group_norm_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // dx plus the per-(n, c) sums A = Σ_s dm and B = Σ_s dm·x̂ (fp32) from which Python forms the
  // weight/bias/scale/shift gradients in O(N·C) (same split as the Triton backend).
  m.def("group_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "Tensor? scale, Tensor? shift, int num_groups, str activation) -> (Tensor, Tensor, Tensor)");
  // Per-head RMSNorm + rotate-half RoPE of q and k (B, S, H, D); returns q_out, k_out and the
  // (B, S, H) fp32 reciprocal RMS of each for the backward.
  m.def("qk_norm_rope_fwd(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor? cos, Tensor? sin, "
        "Tensor? token_group, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_bwd(Tensor dq_out, Tensor dk_out, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, "
        "Tensor? cos, Tensor? sin, Tensor? token_group, Tensor rstd_q, Tensor rstd_k) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace kiln
