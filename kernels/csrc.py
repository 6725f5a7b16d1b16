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
        return None
    if t.device.type != "cpu":
        return f"tensors are on {t.device.type}; csrc runs on cpu and cuda"
    return None if forced else "CPU tensors run on the reference unless use_backend('csrc') forces the C++ CPU ops"
