"""Rotary position embedding, rotate-half convention.

Forward: ``y = x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]`` over the
two halves of the head dimension. x (B, S, H, D); cos, sin (S, D), shared over batch and heads.
Tokens with cos = 1, sin = 0 pass unchanged (MMDiT text tokens).
Dtype policy: computed in fp32, output in x's dtype.
"""

from __future__ import annotations

import torch

from kiln.kernels.dispatch import compute_dtype, dispatch, register


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, upcast: bool = True
) -> torch.Tensor:
    """Plain-PyTorch rotate-half RoPE; cos/sin (S, D) broadcast over batch and heads."""
    cdt = compute_dtype(x.dtype, upcast)
    xc = x.to(cdt)
    c = cos.to(cdt)[:, None, :]  # (S, 1, D)
    s = sin.to(cdt)[:, None, :]
    return (xc * c + rotate_half(xc) * s).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, S, H, D) by the (S, D) tables ``cos`` and ``sin``."""
    return dispatch("apply_rope", x, cos, sin)


register("apply_rope", "torch", apply_rope_ref)
