// kiln_ext: the library of kiln's compiled ops (schemas.h). Implementations register per
// device beside their kernels (group_norm_cpu.cpp, qk_norm_rope_cpu.cpp, *.cu); fake tensors and
// autograd are registered from Python (kiln/kernels/csrc.py and the op modules), and the ops are
// reached only through kiln.kernels' dispatch point as backend "csrc".
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "schemas.h"

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
  kiln::define_ops(m);
  m.def("build_info() -> str", &build_info);
}

// Importing kiln.kernels._C loads this library, which runs the registrations above; the module
// itself is empty (no pybind11: the ops live in torch.ops.kiln_ext).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kiln_ext ops (see torch.ops.kiln_ext)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
