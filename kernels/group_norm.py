"""GroupNorm with optional per-sample modulation and SiLU.

Forward: x (N, C, *spatial) with 1-3 spatial dims, G groups of C/G channels;
    xhat = (x - mean_g) * rsqrt(var_g + eps)           (statistics over C/G channels x spatial)
    y = xhat * weight[c] + bias[c]
    y = y * (1 + scale[n, c]) + shift[n, c]             (when scale/shift are given)
    y = silu(y)                                         (when activation == "silu")
Dtype policy: statistics and arithmetic in fp32, output in x's dtype and memory format.
Backends: torch (this file's reference); triton (kernels/group_norm_triton.py, wrapped here
as the custom ops ``kiln::group_norm_fwd`` / ``kiln::group_norm_bwd``); csrc (the compiled
``kiln_ext::group_norm_fwd/bwd``, csrc/group_norm_*.{cpp,cu}). Both kernel backends share this
file's fake implementations and autograd, so opcheck and torch.compile(fullgraph=True) see
through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import csrc
from kiln.kernels.dispatch import (
    MAX_OFFSET,
    batch_chunks,
    batch_rows,
    compute_dtype,
    csrc_device_reason,
    dispatch,
    on_device_of,
    register,
    rows_within_offsets,
    triton_device_reason,
)

ACTIVATIONS = (None, "silu")


def _check(x, num_groups, activation, weight=None, bias=None, scale=None, shift=None):
    if x.dim() < 3 or x.dim() > 5:
        raise ValueError(f"group_norm: x must be (N, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}")
    if num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: channels {x.shape[1]} not divisible by num_groups {num_groups}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation {activation!r} not in {ACTIVATIONS}")
    # the kernels index these by channel (and sample): another shape read past them, or broadcast
    N, C = x.shape[:2]
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("scale", scale, (N, C)),
                           ("shift", shift, (N, C))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"group_norm: {name} must be {'(C,)' if len(shape) == 1 else '(N, C)'} = {shape}, "
                             f"got {tuple(t.shape)}")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """Channels-last(-3d) when x is stored that way (and not also plain contiguous), else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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
    # F.group_norm refuses an empty spatial extent ("Expected HxW > 0"); y is as empty as x
    y = F.group_norm(x.to(cdt), num_groups, None, None, eps) if x.numel() else x.to(cdt)
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
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


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
    _check(x, num_groups, activation, weight, bias, scale, shift)
    return dispatch(
        "group_norm", x, num_groups, weight, bias, eps, scale=scale, shift=shift,
        activation=activation,
    )


register("group_norm", "torch", group_norm_ref)


# --- Triton backend -----------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("kiln::group_norm_fwd", mutates_args=())
def _gn_fwd_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
    scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels.group_norm_triton import group_norm_fwd

    with on_device_of(x):
        return group_norm_fwd(x, num_groups, weight, bias, scale, shift, eps, activation)


@_gn_fwd_op.register_fake
def _gn_fwd_fake(x, num_groups, weight, bias, scale, shift, eps, activation):
    stats = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format_of(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("kiln::group_norm_bwd", mutates_args=())
def _gn_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, num_groups: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels.group_norm_triton import group_norm_bwd

    with on_device_of(x):
        return group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation)


@_gn_bwd_op.register_fake
def _gn_bwd_fake(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    sums = x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format_of(x)), sums, torch.empty_like(sums)


def _gn_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
    ctx.num_groups, ctx.activation = num_groups, activation


def _gn_autograd(bwd_op):
    """The backward of a group_norm_fwd op (Triton's or kiln_ext's) given its bwd op."""

    def backward(ctx, dy, _dmean, _drstd):
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        dx, a, b = bwd_op(dy, x, mean, rstd, weight, bias, scale, shift, ctx.num_groups, ctx.activation)
        # Parameter gradients from the per-(n, c) sums A = Σ_s dm, B = Σ_s dm·x̂ (O(N·C) work).
        f = 1 + scale.float() if scale is not None else 1.0
        w = weight.float()[None] if weight is not None else 1.0
        grads = [dx, None, None, None, None, None, None, None]
        if weight is not None and ctx.needs_input_grad[2]:
            grads[2] = (f * b).sum(0).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grads[3] = (f * a).sum(0).to(bias.dtype)
        if scale is not None and ctx.needs_input_grad[4]:
            d_scale = w * b + (bias.float()[None] * a if bias is not None else 0.0)
            grads[4] = d_scale.to(scale.dtype)
        if shift is not None and ctx.needs_input_grad[5]:
            grads[5] = a.to(shift.dtype)
        return tuple(grads)

    return backward


_gn_fwd_op.register_autograd(_gn_autograd(_gn_bwd_op), setup_context=_gn_setup_context)


def _gn_run(fwd_op, x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None):
    _check(x, num_groups, activation)
    if (scale is None) != (shift is None):  # the kernels modulate with both; fill the missing one
        scale = torch.zeros_like(shift) if scale is None else scale
        shift = torch.zeros_like(scale) if shift is None else shift
    y, _, _ = fwd_op(x, num_groups, weight, bias, scale, shift, eps, activation or "none")
    return y


def group_norm_triton(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None):
    """Triton backend of :func:`group_norm` (same contract). Past 32-bit offsets (an SDXL VAE
    decoding 17 images at 1024²), chunks of whole samples (dispatch.MAX_OFFSET)."""
    return _in_chunks(group_norm_triton, _gn_fwd_op, batch_chunks(x.shape[0], within=_rows_within_offsets(x)), x,
                      num_groups, weight, bias, eps, scale, shift, activation)


def _rows_within_offsets(x) -> int:
    return rows_within_offsets(x, tuple(x.shape))  # x and the output, laid out as x or contiguous


def _in_chunks(backend, fwd_op, chunks, x, num_groups, weight, bias, eps, scale, shift, activation):
    """``fwd_op`` on x, or ``backend`` on each chunk of whole samples joined in x's memory format
    (samples are independent; autograd sums the parameters' gradients over the chunks)."""
    if len(chunks) > 1:
        parts = [backend(x[c], num_groups, weight, bias, eps, scale=batch_rows(scale, c), shift=batch_rows(shift, c),
                         activation=activation) for c in chunks]
        return torch.cat(parts).contiguous(memory_format=memory_format_of(x))
    return _gn_run(fwd_op, x, num_groups, weight, bias, eps, scale=scale, shift=shift, activation=activation)


def _reasons(device_reason, offsets32: bool = False):
    def reasons(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None):
        out = [r for r in [device_reason(x)] if r]
        if x.dtype not in _FLOATS:
            out.append(f"dtype {x.dtype} is not fp32/fp16/bf16")
        if not 3 <= x.dim() <= 5:
            out.append(f"x has {x.dim()} dims; needs (N, C, *spatial) with 1-3 spatial dims")
        if x.dim() >= 2 and x.shape[1] % num_groups:
            out.append(f"channels {x.shape[1]} not divisible by num_groups {num_groups}")
        if activation not in ACTIVATIONS:
            out.append(f"activation {activation!r} not in {ACTIVATIONS}")
        for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
            if t is not None and t.device != x.device:
                out.append(f"{name} is on {t.device}, x on {x.device}")
        if offsets32 and not out and not _rows_within_offsets(x):
            out.append(f"one sample of x spans more than {MAX_OFFSET} elements: the kernels index with 32-bit "
                       "offsets (the csrc backend's with 64)")
        return out

    return reasons


register("group_norm", "triton", group_norm_triton, _reasons(triton_device_reason, offsets32=True))


# --- csrc backend (csrc/group_norm_cpu.cpp, csrc/group_norm_cuda.cu) ---------------------------

if csrc.loaded():
    torch.library.register_fake("kiln_ext::group_norm_fwd")(_gn_fwd_fake)
    torch.library.register_fake("kiln_ext::group_norm_bwd")(_gn_bwd_fake)
    torch.library.register_autograd(
        "kiln_ext::group_norm_fwd", _gn_autograd(torch.ops.kiln_ext.group_norm_bwd), setup_context=_gn_setup_context
    )


def group_norm_csrc(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None, activation=None):
    """C++/CUDA backend of :func:`group_norm` (same contract). Its NCHW CUDA kernels put N·G on
    the grid's y axis: past dispatch.MAX_GRID_Y, chunks of whole samples."""
    _check(x, num_groups, activation)
    return _in_chunks(group_norm_csrc, torch.ops.kiln_ext.group_norm_fwd, batch_chunks(x.shape[0], num_groups), x,
                      num_groups, weight, bias, eps, scale, shift, activation)


register("group_norm", "csrc", group_norm_csrc, _reasons(lambda x: csrc_device_reason(x, "group_norm_fwd")))


# --- drop-in module -------------------------------------------------------------------------


class GroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` (same constructor and state_dict) whose forward is kiln's group_norm.

    Takes what nn.GroupNorm takes, (N, C, *): inputs outside the op's 1-3 spatial dims ((N, C)
    features, 4-D volumes x time) run as (N, C, L), the spatial dims flattened (a view when x is
    contiguous), so that patch_group_norm never breaks a model that fed nn.GroupNorm such shapes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 or x.dim() > 5:
            flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, L)
            return group_norm(flat, self.num_groups, self.weight, self.bias, self.eps).reshape(x.shape)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def patch_group_norm(module: torch.nn.Module) -> int:
    """Swap every ``nn.GroupNorm`` inside ``module`` for :class:`GroupNorm` in place.

    Parameters are kept (same objects), so optimizers and state dicts stay valid. Returns the
    number of modules swapped.
    """
    count = 0
    for m in module.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = GroupNorm
            count += 1
    return count
