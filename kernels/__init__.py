"""kiln.kernels: the ops that matter, each behind one dispatch point.

Public ops (plain-PyTorch references are the ``*_ref`` functions, the spec and test oracle):
``rms_norm``, ``apply_rope``, ``qk_norm_rope``, ``qk_norm_attention``, ``group_norm``,
``adaln_modulate``.
Backends: ``torch`` (always), ``triton`` and ``csrc`` as they land. Force one with
``with kiln.kernels.use_backend("triton"): ...``; ``available_backends()`` says what runs here.
"""

from kiln.kernels.adaln_modulate import adaln_modulate, adaln_modulate_ref
from kiln.kernels.dispatch import (
    BackendError,
    available_backends,
    current_backend,
    implemented_ops,
    select,
    use_backend,
)
from kiln.kernels.group_norm import GroupNorm, group_norm, group_norm_ref, patch_group_norm
from kiln.kernels.qk_norm_attention import qk_norm_attention, qk_norm_attention_ref
from kiln.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from kiln.kernels.rms_norm import rms_norm, rms_norm_ref
from kiln.kernels.rope import apply_rope, apply_rope_ref, rotate_half

__all__ = [
    "BackendError",
    "GroupNorm",
    "patch_group_norm",
    "adaln_modulate",
    "adaln_modulate_ref",
    "apply_rope",
    "apply_rope_ref",
    "available_backends",
    "current_backend",
    "group_norm",
    "group_norm_ref",
    "implemented_ops",
    "qk_norm_attention",
    "qk_norm_attention_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotate_half",
    "select",
    "use_backend",
]
