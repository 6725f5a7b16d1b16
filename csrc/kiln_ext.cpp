// kiln_ext: every schema of kiln's compiled ops, in one place. Implementations register per
// device beside their kernels (group_norm_cpu.cpp, qk_norm_rope_cpu.cpp, *.cu); fake tensors and
// autograd are registered from Python (kiln/kernels/csrc.py and the op modules), and the ops are
// reached only through kiln.kernels' dispatch point as backend "csrc".
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef KILN_CUDA_ARCHS
#define KILN_CUDA_ARCHS ""
#endif

namespace {

// "cpu" or "cpu+cuda:<archs>": lets tests and `kiln backends` see what this build carries.
std::string build_info() {
  const std::string archs = KILN_CUDA_ARCHS;
  return archs.empty() ? "cpu" : "cpu+cuda:" + archs;
}

}  // namespace

TORCH_LIBRARY(kiln_ext, m) {
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
  m.def("build_info() -> str", &build_info);
}

// Importing kiln.kernels._C loads this library, which runs the registrations above; the module
// itself is empty (no pybind11: the ops live in torch.ops.kiln_ext).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kiln_ext ops (see torch.ops.kiln_ext)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
