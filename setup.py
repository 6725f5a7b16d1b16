"""Builds kiln's compiled ops (csrc/ -> kiln.kernels._C); everything else is in pyproject.toml.

- CPU part always (unless KILN_BUILD_EXT=0); CUDA part too when torch is a CUDA build and nvcc
  is found (CUDA_HOME, else the toolkit that `nvcc` on PATH belongs to, else /usr/local/cuda),
  unless KILN_BUILD_CUDA=0.
- CUDA architectures: TORCH_CUDA_ARCH_LIST when set, else "8.0+PTX;9.0a": machine code for the
  A100 (also what the 8.6 / 8.9 GPUs run) and the H100 with the sm_90a features, plus compute_80
  PTX, which the driver compiles at first load for the GPUs neither runs on (B200 10.0, RTX 5090
  12.0: no sm_8x or sm_90a code runs across a major version). The PTX costs the build 5 s of 127
  and the library 0.8 MB of 32 (2 cores, nvcc 13.0, 2026-12-06); the first load on a Blackwell
  GPU compiles it (ptxas takes 16 s for it here), cached by the driver afterwards. Native
  Blackwell code instead: add "10.0;12.0" (nvcc >= 12.8; about 1 min of nvcc each). The list is
  baked into the library (torch.ops.kiln_ext.build_info()); kiln.kernels.csrc.runs_on reads it.
- A failed compile fails the install: a kiln that silently lacks its kernels is worse than none.
"""

import glob
import os
import shutil

from setuptools import setup

DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: prefer a root that has the headers
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _wheel_cuda_includes() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (cuSPARSE, cuBLAS, ...): torch's
    CUDA headers include them, and a bare toolkit (or a pip build env) may not have them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = set()
    for root in nvidia.__path__:
        found.update(os.path.dirname(h) for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h")))
    return sorted(found)


def _extensions():
    if os.environ.get("KILN_BUILD_EXT", "1") == "0":
        print("kiln: KILN_BUILD_EXT=0, skipping the csrc extension")
        return [], {}
    home = _cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    cuda = bool(torch.version.cuda) and home is not None and os.environ.get("KILN_BUILD_CUDA", "1") != "0"
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3"]  # torch adds the -std it needs (C++20 for 2.14, C++17 for 2.11)
    if not cuda:
        print(f"kiln: building the csrc extension for the CPU only (torch CUDA {torch.version.cuda}, CUDA_HOME {home})")
        ext = cpp_extension.CppExtension("kiln.kernels._C", sources, extra_compile_args={"cxx": cxx})
    else:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        print(f"kiln: building the csrc extension for the CPU and CUDA {archs} (CUDA_HOME {home})")
        defs = [f'-DKILN_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", *defs]
        ext = cpp_extension.CUDAExtension(
            "kiln.kernels._C", sources + sorted(glob.glob("csrc/*.cu")),
            include_dirs=_wheel_cuda_includes(),
            extra_compile_args={"cxx": cxx + defs, "nvcc": nvcc},
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
