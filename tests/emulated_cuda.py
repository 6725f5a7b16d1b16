"""kiln_ext's CUDA kernels run on the CPU: csrc/*.cu compiled as C++ with KILN_CUDA_EMU
(csrc/emu/cuda_emu.h: the blocks of a launch one after another, a block's threads as fibers that
switch at barriers and shuffles), registered as library ``kiln_emu`` (with
``emulator_selftest``, kernels that carry the bugs the emulator must report).

:func:`as_csrc_cpu` makes them the CPU kernels of the ``kiln_ext`` ops for a while, so every
csrc test (dispatch, autograd, the 2x rule) runs the CUDA code on CPU tensors. Built once per
machine and torch (ninja; 16 s on the 2-core development machine, the AddressSanitizer variant
about a minute) under the system's temporary folder or KILN_EMU_BUILD."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
OPS = ("group_norm_fwd", "group_norm_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd")


ASAN = os.environ.get("KILN_EMU_ASAN") == "1"  # this process runs under AddressSanitizer (asan_env)


def build() -> None:
    """Compile and load the kiln_emu library (a no-op once loaded); with -fsanitize=address when
    this process runs under AddressSanitizer."""
    if hasattr(torch.ops.kiln_emu, "group_norm_fwd"):
        return
    from torch.utils.cpp_extension import load

    variant = "-asan" if ASAN else ""
    root = Path(os.environ.get("KILN_EMU_BUILD") or tempfile.gettempdir())
    folder = root / f"kiln_emu{variant}-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "emu" / f for f in ("emulated_ops.cpp", "group_norm_cuda.cpp", "qk_norm_rope_cuda.cpp",
                                                 "selftest.cpp")]
    # -O1 (not timed against other levels): the whole build took 16 s here on 2 cores
    flags = ["-DKILN_CUDA_EMU", "-O1", "-fno-strict-aliasing"]
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []
    load(name="kiln_emu", sources=[str(s) for s in sources], build_directory=str(folder), is_python_module=False,
         extra_cflags=flags + asan, extra_ldflags=asan)


def asan_env() -> dict:
    """Environment for a Python process whose emulated kernels run under AddressSanitizer: the
    compiler's libasan preloaded (with libstdc++, which it must find already loaded to intercept
    C++ throws: Triton's import throws), leak checks off (Python and torch keep their
    allocations at exit)."""
    cxx = os.environ.get("CXX", "c++")

    def lib(name: str) -> str:
        out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True)
        path = out.stdout.strip()
        if not os.path.isabs(path):
            raise FileNotFoundError(f"{cxx} -print-file-name={name}: the compiler has no {name}")
        return os.path.realpath(path)

    return {**os.environ, "LD_PRELOAD": f"{lib('libasan.so')} {lib('libstdc++.so')}",
            "ASAN_OPTIONS": "detect_leaks=0", "KILN_EMU_ASAN": "1"}


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def as_csrc_cpu(sms: int | None = None, order: str = "forward", gn_plan: str | None = None,
                l2_bytes: int | None = None, resident: int | None = None, seed: int | None = None):
    """Within: kiln_ext's ops on CPU tensors run the emulated CUDA kernels, on ``sms`` emulated
    SMs (the launch plans' sm_count; default an H100's 132), each block's warps given priority
    in ``order`` ("forward": warp 0 first, or "reverse"), the NCHW GroupNorm on ``gn_plan``
    (KILN_CSRC_GN_PLAN: "two_pass", "pipelined", or by default "auto", which compares the bytes
    with an L2 of ``l2_bytes``, default an H100's 50 MB), with ``resident`` blocks at once
    (default 1: in turn) whose turns are drawn from ``seed``. The C++ CPU kernels are back on exit
    (the dispatcher keeps the kernel an override displaced)."""
    build()
    env = {"KILN_EMU_SMS": str(sms) if sms else None, "KILN_EMU_ORDER": order, "KILN_CSRC_GN_PLAN": gn_plan,
           "KILN_EMU_L2_BYTES": str(l2_bytes) if l2_bytes else None,
           "KILN_EMU_RESIDENT": str(resident) if resident else None, "KILN_EMU_SEED": str(seed) if seed else None}
    saved = {k: os.environ.get(k) for k in env}
    lib = torch.library.Library("kiln_ext", "IMPL")
    try:
        for k, v in env.items():
            _set_env(k, v)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            for op in OPS:
                lib.impl(op, getattr(torch.ops.kiln_emu, op), "CPU")
        yield
    finally:
        lib._destroy()
        for k, v in saved.items():
            _set_env(k, v)
