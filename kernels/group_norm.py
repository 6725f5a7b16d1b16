"""GroupNorm with optional per-sample modulation and SiLU.

Forward: x (N, C, *spatial) with 1-3 spatial dims, G groups of C/G channels;
    xhat = (x - mean_g) * rsqrt(var_g + eps)           (statistics over C/G channels x spatial)
    y = xhat * weight[c] + bias[c]
    y = y * (1 + scale[n, c]) + shift[n, c]             (when scale/shift are given)
    y = silu(y)                                         (when activation == "silu")
Dtype policy: statistics and arithmetic in fp32, output in x's dtype and memory format.
Backends: torch (this file); Triton and csrc arrive with their own issues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.dispatch import compute_dtype, dispatch, register

ACTIVATIONS = (None, "silu")


def _check(x, num_groups, activation):
    if x.dim() < 3 or x.dim() > 5:
        raise ValueError(f"group_norm: x must be (N, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}")
    if x.shape[1] % num_groups:
        raise ValueError(f"group_norm: channels {x.shape[1]} not divisible by num_groups {num_groups}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation {activation!r} not in {ACTIVATIONS}")


def _per_channel(t, x, cdt):
    # (C,) or (N, C) -> broadcastable against (N, C, *spatial)
    return t.to(cdt).reshape(*t.shape, *([1] * (x.dim() - 2)))


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch definition of :func:`group_norm` (the spec and the CPU backend)."""
    _check(x, num_groups, activation)
    cdt = compute_dtype(x.dtype, upcast)
    y = F.group_norm(x.to(cdt), num_groups, None, None, eps)
    if weight is not None:
        y = y * _per_channel(weight, x, cdt)
    if bias is not None:
        y = y + _per_channel(bias, x, cdt)
    if scale is not None:
        y = y * (1 + _per_channel(scale, x, cdt))
    if shift is not None:
        y = y + _per_channel(shift, x, cdt)
    if activation == "silu":
        y = F.silu(y)
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        fmt = torch.channels_last_3d
    return y.to(x.dtype).contiguous(memory_format=fmt)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """GroupNorm(+affine, +``(1 + scale)·y + shift``, +SiLU) of x (N, C, *spatial).

    Args:
        x: (N, C, *spatial), 1-3 spatial dims, NCHW or channels-last, fp32/fp16/bf16.
        num_groups: G, divides C. weight, bias: (C,) affine or None. eps: variance epsilon.
        scale, shift: (N, C) per-sample modulation or None. activation: None or "silu".
    Returns:
        y with x's shape, dtype and memory format.
    """
    return dispatch(
        "group_norm", x, num_groups, weight, bias, eps, scale=scale, shift=shift,
        activation=activation,
    )


register("group_norm", "torch", group_norm_ref)
