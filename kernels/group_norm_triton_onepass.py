"""Triton GroupNorm for NCHW groups that fit on chip: one program per (n, g), one read of x.

When a whole group (C/G channels × S positions, each padded to a power of two) fits in one
program's registers, the forward reads x once (statistics, then the normalised output from the
same registers) and the backward reads x and dy once: 2 and 3 element-passes of memory traffic
instead of the two-pass path's 3 and 5 (group_norm_triton.py). The price is N·G programs and no
split of a group, so it pays where N·G fills the GPU or the tensor is small enough that one
launch instead of two is the saving (latent-resolution UNet/VAE blocks: 2×320×32×32 at G = 32
is 10 channels × 1,024 positions per group). It is a launch candidate, offered to the autotuner
only where the group fits (``fits``); the GPU's timing decides between it and the two-pass
kernels, per shape class (issue 5: one pass where a group fits on chip, two otherwise, chosen
by measurement).

Variance is the exact two-pass formula in registers: the mean first, then Σ(x - mean)², so no
shifted sums are needed. Channels-last tensors never take this path: one group is a strided
8-64 byte piece of every token row there (group_norm_triton_cl.py reads whole rows instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.autotune import run_kernel
from kiln.kernels.group_norm_triton import Knobs, _bwd_tile, _load_tile, _normalize_store

# Whole-group tiles of at most `tile` elements, 32 per thread: the backward holds x̂, dm and the
# tile's indices at once and compiles for sm_90a without spills at 96-126 registers (64 per
# thread at 8 warps reached 255 and spilled). Groups up to 4,096 elements on 4 warps, up to
# 16,384 (e.g. 16 channels × 32 × 32) on 16.
CANDIDATES = [Knobs(4096, 4, 1, kind="onepass"), Knobs(16384, 16, 1, kind="onepass")]


def blocks(x: torch.Tensor, num_groups: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): one group of NCHW x padded to powers of two."""
    cg = x.shape[1] // num_groups
    return triton.next_power_of_2(cg), triton.next_power_of_2(x[0, 0].numel())


def fits(x: torch.Tensor, num_groups: int, knobs: Knobs) -> bool:
    block_c, block_s = blocks(x, num_groups)
    return block_c * block_s <= knobs.tile


@triton.jit
def _group(C, G):
    ng = tl.program_id(0)
    cg = C // G
    return ng, ng // G, ng % G, cg


@triton.jit
def _onepass_fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                        C, S, G, eps, stride_n, stride_c, stride_s,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    ng, n, g, cg = _group(C, G)
    x, offs_c, offs_s, mask = _load_tile(x_ptr, n, g * cg, 0, (g + 1) * cg, S, stride_n, stride_c, stride_s,
                                         BLOCK_C, BLOCK_S)
    inv_m = 1.0 / (cg * S).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) * inv_m  # padding loaded as 0
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) * inv_m + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    _normalize_store(x, mean, rstd, n, offs_c, offs_s, mask, C, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                     stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU)


@triton.jit
def _onepass_bwd_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                        suma_ptr, sumb_ptr, C, S, G, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    ng, n, g, cg = _group(C, G)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    xhat, dm, f, w, offs_c, offs_s, mask = _bwd_tile(
        x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, g * cg, 0, (g + 1) * cg, S, C,
        stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S)
    # per channel A = Σ dm, B = Σ dm·x̂ (the parameter gradients' sums), then the group's
    # Σ dx̂ = Σ_c w·f·A and Σ dx̂·x̂ = Σ_c w·f·B; dm is 0 outside the group
    a = tl.sum(dm, axis=1)
    b = tl.sum(dm * xhat, axis=1)
    cmask = offs_c < (g + 1) * cg
    tl.store(suma_ptr + n * C + offs_c, a, mask=cmask)
    tl.store(sumb_ptr + n * C + offs_c, b, mask=cmask)
    wf = w * f
    inv_m = 1.0 / (cg * S).to(tl.float32)
    g1 = tl.sum(wf * a, axis=0) * inv_m
    g2 = tl.sum(wf * b, axis=0) * inv_m
    dx = rstd * (dm * wf[:, None] - g1 - xhat * g2)
    ptrs = dx_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def fwd(x, strides, num_groups, params, flags, eps, knobs: Knobs):
    """(y, mean, rstd) of NCHW x whose groups fit ``knobs.tile``."""
    N, C = x.shape[:2]
    block_c, block_s = blocks(x, num_groups)
    y = torch.empty_like(x)
    mean = torch.empty(N, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    run_kernel(_onepass_fwd_kernel, (N * num_groups,), x, y, mean, rstd, *params, C, x[0, 0].numel(), num_groups, eps,
               *strides, **flags, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=knobs.num_warps)
    return y, mean, rstd


def bwd(dy, x, strides, dstrides, mean, rstd, num_groups, params, flags, knobs: Knobs):
    """(dx, A, B) of NCHW x whose groups fit ``knobs.tile``."""
    N, C = x.shape[:2]
    block_c, block_s = blocks(x, num_groups)
    dx = torch.empty_like(x)
    sum_a = torch.empty(N, C, device=x.device, dtype=torch.float32)
    sum_b = torch.empty_like(sum_a)
    run_kernel(_onepass_bwd_kernel, (N * num_groups,), x, dy, dx, mean, rstd, *params, sum_a, sum_b, C,
               x[0, 0].numel(), num_groups, *strides, *dstrides, **flags, BLOCK_C=block_c, BLOCK_S=block_s,
               num_warps=knobs.num_warps)
    return dx, sum_a, sum_b
