"""adaLN modulation: LayerNorm without affine, then a per-sample scale and shift.

Forward: ``y = LN(x) * (1 + scale[:, None]) + shift[:, None]``; x (B, S, C), shift/scale (B, C).
The modulation is per sample (one vector per image, from the timestep and pooled text), so its
cost is O(B·C), not O(B·S·C). Dtype policy: statistics in fp32, output in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.dispatch import compute_dtype, dispatch, register


def adaln_modulate_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch adaLN modulation (the spec and the CPU backend)."""
    cdt = compute_dtype(x.dtype, upcast)
    y = F.layer_norm(x.to(cdt), (x.shape[-1],), eps=eps)
    y = y * (1 + scale.to(cdt)[:, None, :]) + shift.to(cdt)[:, None, :]
    return y.to(x.dtype)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` for x (B, S, C) and per-sample shift/scale (B, C)."""
    return dispatch("adaln_modulate", x, shift, scale, eps)


register("adaln_modulate", "torch", adaln_modulate_ref)
