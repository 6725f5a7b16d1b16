"""RMSNorm over the last dimension.

Forward: ``y = x * rsqrt(mean(x**2, -1) + eps) * weight``; x (..., D), weight (D,).
Dtype policy: statistics in fp32, output in x's dtype.
Backends: torch (this reference). Fused Triton/csrc versions live inside the QK-norm ops.
"""

from __future__ import annotations

import torch

from kiln.kernels.dispatch import compute_dtype, dispatch, register


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, upcast: bool = True
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm; ``upcast=False`` computes in x's own dtype (test baseline)."""
    cdt = compute_dtype(x.dtype, upcast)
    xc = x.to(cdt)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(cdt)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x`` (..., D) with per-channel ``weight`` (D,) or none."""
    return dispatch("rms_norm", x, weight, eps)


register("rms_norm", "torch", rms_norm_ref)
