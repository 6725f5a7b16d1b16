"""The compiled extension (``csrc/`` -> ``kiln.kernels._C``): loading it and why it may be absent.

``pip install`` builds it ahead of time (setup.py): the CPU part everywhere, the CUDA part where
torch is a CUDA build and nvcc exists. Importing kiln never fails because of it: when the
library is missing or does not load (built for another torch, ``KILN_BUILD_EXT=0``), the
``csrc`` backend reports the reason through ``kiln.kernels.available_backends()``.
The op modules (group_norm.py, qk_norm_rope.py) register the fake and autograd halves of their
``kiln_ext::`` ops when :func:`loaded` is true.
"""

from __future__ import annotations

import importlib
import re

import torch


def _load() -> str | None:
    try:
        importlib.import_module("kiln.kernels._C")
    except ImportError as e:  # missing file, or built against another torch (undefined symbol)
        hint = "" if "No module named" not in str(e) else " (reinstall without KILN_BUILD_EXT=0 to build it)"
        return f"the kiln_ext extension did not load: {e}{hint}"
    return None


# Loaded once at import: the dispatch point asks on every call, torch.compile traces through it.
_LOAD_ERROR = _load()
_OPS = ("group_norm_fwd", "group_norm_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd")
_CUDA_OPS = frozenset(
    op for op in _OPS
    if _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"kiln_ext::{op}", "CUDA")
)


def library_path() -> str:
    """File of the loaded extension (for reading its compiled kernels, ``sm90.csrc_sass_facts``)."""
    return importlib.import_module("kiln.kernels._C").__file__


def load_error() -> str | None:
    """None when ``torch.ops.kiln_ext`` is loaded, else why not."""
    return _LOAD_ERROR


def loaded() -> bool:
    return load_error() is None


def build_info() -> str:
    """"cpu" or "cpu+cuda:<archs>" as compiled (setup.py), or the load error."""
    return torch.ops.kiln_ext.build_info() if loaded() else f"unavailable: {load_error()}"


def has_cuda_kernels(op: str) -> bool:
    return op in _CUDA_OPS


def parse_archs(archs: str) -> list[tuple[int, int, bool, bool] | None]:
    """The entries of a TORCH_CUDA_ARCH_LIST ("8.0+PTX;9.0a") as (major, minor, arch-specific
    "a", "+PTX"); None for a name torch expands itself ("Ampere")."""
    parsed = []
    for entry in filter(None, re.split(r"[;, ]", archs)):
        match = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", entry)
        parsed.append((int(match[1]), int(match[2]), match[3] == "a", bool(match[4])) if match else None)
    return parsed


# What the CUDA part was compiled for, read once: the dispatch point asks on every call, and
# torch.compile traces through it (tuples compare there; a regex would break the graph).
CUDA_ARCHS = build_info().partition("cuda:")[2] if loaded() else ""
_BUILT = parse_archs(CUDA_ARCHS)


def runs_on(built: list[tuple[int, int, bool, bool] | None], capability: tuple[int, int]) -> bool:
    """Whether code built for ``built`` (parse_archs) has something a GPU of ``capability`` can
    run. Machine code for sm_XY runs on X.Z with Z >= Y (sm_80 on an A10's 8.6 or an L40S's 8.9)
    but never across a major version (no sm_80 or sm_90a code runs on a B200, 10.0, or an RTX
    5090, 12.0); sm_XYa only on X.Y itself; "+PTX" adds compute_XY code, which the driver
    compiles at load for any GPU of X.Y or newer (compute_XYa: X.Y only)."""
    for entry in built:
        if entry is None:  # a named list: cannot tell, so do not refuse
            return True
        major, minor, specific, ptx = entry
        if specific and capability == (major, minor):
            return True
        if not specific and (capability[0] == major and capability[1] >= minor or ptx and capability >= (major, minor)):
            return True
    return False


def gpu_reason(index: int) -> str | None:
    """Why the CUDA part has no code GPU ``index`` runs (None when it has)."""
    # get_device_properties, not get_device_capability: torch.compile folds it to a constant
    gpu = torch.cuda.get_device_properties(index)
    if runs_on(_BUILT, (gpu.major, gpu.minor)):
        return None
    sm = f"{gpu.major}.{gpu.minor}"
    return (f"the extension's CUDA code was built for {CUDA_ARCHS} (TORCH_CUDA_ARCH_LIST) and none of it runs on "
            f"{gpu.name} (compute capability {sm}): reinstall with TORCH_CUDA_ARCH_LIST='{sm}' or add +PTX to an "
            f"entry")


def device_reason(t: torch.Tensor, op: str, forced: bool) -> str | None:
    """Why the csrc backend will not run ``op`` on tensor ``t`` (None when it will).

    CUDA tensors when the CUDA part was compiled; CPU tensors only when ``use_backend("csrc")``
    forces it: in automatic selection the plain-PyTorch reference stays the CPU path, so a
    model's CPU numerics do not depend on whether the extension happened to build. The CUDA
    kernels reduce without atomics (fixed order), so deterministic mode needs no exception.
    """
    if t.is_cuda:
        if not has_cuda_kernels(op):
            return f"the extension was built without CUDA kernels ({build_info()})"
        return gpu_reason(t.device.index)
    if t.device.type != "cpu":
        return f"tensors are on {t.device.type}; csrc runs on cpu and cuda"
    return None if forced else "CPU tensors run on the reference unless use_backend('csrc') forces the C++ CPU ops"
