"""Triton GroupNorm (+affine, +per-sample scale/shift, +SiLU), forward and backward.

x (N, C, *spatial) is viewed as (N, C, S) through its strides and read in place (y and dx keep
x's memory format; no permute copies). This file's kernels serve NCHW, where a group is one
contiguous run of (C/G)·S elements; channels-last tensors go to group_norm_triton_cl.py, whose
programs read whole token rows (a group's channels are only 8-32 bytes of each row there).
Group (n, g) holds M = (C/G)·S elements; its reduction is split over SPLIT programs along S,
so batch 1 with G = 32 still launches ~4 programs per SM instead of 32 blocks in all. Groups
that fit one program (<= 16,384 padded elements) also have a one-pass candidate that reads x once
(group_norm_triton_onepass.py), and every tensor, NCHW or channels-last, one-launch candidates
that run pass 2 of a group a few groups behind its pass 1, so the re-read comes from L2
(group_norm_triton_pipelined.py, built from this file's and group_norm_triton_cl.py's per-chunk
helpers); the GPU's timing picks among them.

Forward, two launches:
  1. _gn_stats_kernel  (N·G, SPLIT): per chunk count and the sums of d and d² for
     d = x - pivot (the group's first element: E[d²] - E[d]² keeps its digits when
     |mean| >> std, where E[x²] - E[x]² would cancel), written to a small fp32 buffer;
  2. _gn_fwd_kernel    (N·G, SPLIT): combines its group's SPLIT partials into mean and rstd,
     then y = act((x̂·w + b)·(1 + scale) + shift). Programs run in reverse order of pass 1,
     so the chunks read last by pass 1 (still in L2, 50 MB on H100) are re-read first.
Backward, with dm = dy·act'(m) and f = 1 + scale:
  1. _gn_bwd_reduce_kernel: per (n, c) and chunk, A = Σ_s dm and B = Σ_s dm·x̂;
  2. _gn_bwd_dx_kernel: group sums Σ dx̂ = Σ_c w·f·A and Σ dx̂·x̂ = Σ_c w·f·B, then
     dx = rstd·(dx̂ − Σdx̂/M − x̂·Σdx̂x̂/M) with dx̂ = dm·f·w.
  Parameter gradients follow from A and B in O(N·C): d_shift = A, d_scale = w·B + b·A,
  d_bias = Σ_n f·A, d_weight = Σ_n f·B.
Loads in flight: every chunk loop walks its tiles with tl.range(num_stages=STAGES); at STAGES > 1
Triton issues the next STAGES - 1 tiles' loads as cp.async copies into shared memory while the
program computes on the current one. Unstaged, sm_90a code keeps one tile per program in flight
(one 16-byte load per thread per loop trip), 16 KB per SM with the 2026-11-24 default, half of
what streaming at copy speed asks (IN_FLIGHT_TARGET, loads_in_flight).
Dtype policy: loads upcast to fp32, statistics and arithmetic in fp32, stores in x's dtype.
Bytes: forward reads x twice and writes y once; backward reads x and dy twice, writes dx once.
Limits: x must be contiguous in NCHW or channels-last(-3d) form (others are made so).
Measured (H100, 2026-11-24, eager timing, before the channels-last rewrite and the dispatcher's
~100 µs/call fix): 24% of copy bandwidth forward at 1x128x512x512 NCHW; device-only (graph)
numbers are the next GPU session's first measurement (benchmarks/group_norm.py).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.autotune import choose, results_agree, run_kernel, size_class
from kiln.kernels.group_norm import memory_format_of

STATS_BUFFER_DTYPE = torch.float32


@dataclass(frozen=True)
class Knobs:
    """Launch knobs: elements per tile, warps per program, programs per SM (the reduction split),
    and the kind of kernel: "split" (this file's two launches), "onepass" (one program per group
    holding all of it, group_norm_triton_onepass.py; ``tile`` is then the largest padded group it
    takes) or "pipelined" (one launch, pass 2 of a group a few groups behind its pass 1,
    group_norm_triton_pipelined.py)."""

    tile: int
    num_warps: int
    programs_per_sm: int
    kind: str = "split"
    stages: int = 1
    # registers a thread the forward launch may use (Triton's maxnreg; None: the compiler's choice),
    # so that programs_per_sm programs fit an SM's 64K registers
    fwd_registers: int | None = None

    def __str__(self) -> str:
        if self.kind == "onepass":
            return f"onepass{self.tile}/w{self.num_warps}"
        tail = (f"/s{self.stages}" if self.stages > 1 else "") + ("/pipelined" if self.kind == "pipelined" else "")
        tail += f"/fwd-r{self.fwd_registers}" if self.fwd_registers else ""
        return f"tile{self.tile}/w{self.num_warps}/pps{self.programs_per_sm}{tail}"


# Candidates, the first the default (interpreter, deterministic mode, KILN_AUTOTUNE=0); on a GPU
# kernels/autotune.py times them once per shape class. All compile for sm_90a without spills
# (compile_for_sm90, triton 3.8, and 3.6, the GPU machine's, since cf40144) and keep
# tile / (32 · warps) >= 8 elements per thread, so 16-bit data moves in 16-byte loads. ``stages``
# > 1 software-pipelines each program's walk over its chunk (Triton stages the next stages - 1
# tiles through shared memory with cp.async while it computes on one): a streaming kernel runs at
# copy speed only with enough loads in flight (loads_in_flight), and one 2048-element tile per
# program of 8 warps, as the 2026-11-24 default had, gives 16 KB per SM in the forward, half of
# IN_FLIGHT_TARGET. The last candidate is that default, kept to measure what staging buys.
CANDIDATES = [Knobs(2048, 4, 4, stages=3), Knobs(4096, 8, 2, stages=3), Knobs(1024, 4, 8, stages=4),
              Knobs(2048, 8, 4)]
DEFAULT = CANDIDATES[0]

# Little's law: a streaming kernel reaches copy speed only with bandwidth x latency bytes of loads
# in flight: ~4.3 TB/s (an H200's copy) x ~1 µs (an HBM load under full load; ~0.5-0.6 µs idle) over
# 132 SMs is ~32 KB per SM (an H100, ~3 TB/s: ~23 KB). An estimate to check against the GPU's
# timings (benchmarks/results/README.md), not a measurement.
IN_FLIGHT_TARGET = 32 * 1024


def loads_in_flight(knobs: Knobs, report: dict, tensors: int, element_size: int) -> int:
    """Bytes of loads one SM keeps in flight running a kernel compiled with ``knobs`` (report:
    sm90.compile_sm90's): programs resident at once (at most programs_per_sm; fewer where
    registers or shared memory run out) x tiles each has requested (stages - 1, or the one it
    waits on) x the tile's bytes in each of ``tensors`` inputs (x; x and dy in the backward)."""
    from kiln.kernels.sm90 import resident_programs

    programs = min(knobs.programs_per_sm, resident_programs(report))
    return programs * max(1, knobs.stages - 1) * knobs.tile * element_size * tensors


@triton.jit
def _load_tile(ptr, n, c0, s0, C_END, S_END, stride_n, stride_c, stride_s,
               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask = (offs_c[:, None] < C_END) & (offs_s[None, :] < S_END)
    ptrs = ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), offs_c, offs_s, mask


@triton.jit
def _program(REVERSE: tl.constexpr):
    """This program's (ng, sp, split): chunk sp of SPLIT along S of group ng = n·G + g. REVERSE
    walks the grid backwards, so a second pass re-reads first the chunks the first pass read
    last (still in L2, 50 MB on an H100)."""
    split = tl.num_programs(1)
    ng = tl.program_id(0)
    sp = tl.program_id(1)
    if REVERSE:
        ng = tl.num_programs(0) - 1 - ng
        sp = split - 1 - sp
    return ng, sp, split


@triton.jit
def _chunk(ng, sp, C, S, G, CHUNK):
    """(n, g, cg, s_begin, s_end) of chunk sp of group ng."""
    n, g = ng // G, ng % G
    s_begin = sp * CHUNK
    return n, g, C // G, s_begin, tl.minimum(s_begin + CHUNK, S)


@triton.jit
def _stats_chunk(x_ptr, part_ptr, ng, sp, split, C, S, G, CHUNK, stride_n, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of the forward on one chunk: its count, Σd and Σd² into the partials buffer."""
    n, g, cg, s_begin, s_end = _chunk(ng, sp, C, S, G, CHUNK)
    # Shifted sums around a pivot (the group's first element, the same for every chunk):
    # var = E[d²] - E[d]² with d = x - pivot stays exact when |mean| >> std, and the loop is
    # pure loads + FMAs (one reduction at the end), so loads of consecutive tiles overlap.
    pivot = tl.load(x_ptr + n * stride_n + g * cg * stride_c).to(tl.float32)
    acc_s = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    acc_q = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(g * cg, (g + 1) * cg, BLOCK_C):
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            x, offs_c, offs_s, mask = _load_tile(x_ptr, n, c0, s0, (g + 1) * cg, s_end, stride_n, stride_c,
                                                 stride_s, BLOCK_C, BLOCK_S)
            d = tl.where(mask, x - pivot, 0.0)
            acc_s += d
            acc_q += d * d
    base = part_ptr + (ng * split + sp) * 3
    tl.store(base, (cg * (s_end - s_begin)).to(tl.float32))
    tl.store(base + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    tl.store(base + 2, tl.sum(tl.sum(acc_q, axis=1), axis=0))


@triton.jit
def _gn_stats_kernel(x_ptr, part_ptr, C, S, G, CHUNK, stride_n, stride_c, stride_s,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    ng, sp, split = _program(False)
    _stats_chunk(x_ptr, part_ptr, ng, sp, split, C, S, G, CHUNK, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _group_stats(x_ptr, part_ptr, n, g, cg, ng, split, eps, stride_n, stride_c, SPLIT_P2: tl.constexpr):
    """Mean and rstd of group ng from its SPLIT partials. The loads bypass L1 (.cg): in the
    pipelined kernel other SMs wrote them during this launch, and L1 is not coherent."""
    offs = tl.arange(0, SPLIT_P2)
    m = offs < split
    base = part_ptr + (ng * split + offs) * 3
    total = tl.sum(tl.load(base, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
    mean_d = tl.sum(tl.load(base + 1, mask=m, other=0.0, cache_modifier=".cg"), axis=0) / total
    sum_q = tl.sum(tl.load(base + 2, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
    var = tl.maximum(sum_q / total - mean_d * mean_d, 0.0)
    pivot = tl.load(x_ptr + n * stride_n + g * cg * stride_c).to(tl.float32)
    return pivot + mean_d, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _modulated(x, mean, rstd, n, offs_c, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr):
    # returns (xhat, m, f, w): m is the pre-activation output, f = 1 + scale, w the weight
    cmask = offs_c < C
    xhat = (x - mean) * rstd
    if HAS_W:
        w = tl.load(w_ptr + offs_c, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full(offs_c.shape, 1.0, tl.float32)
    a = xhat * w[:, None]
    if HAS_B:
        a = a + tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    f = tl.full(offs_c.shape, 1.0, tl.float32)
    if HAS_MOD:
        f = 1.0 + tl.load(scale_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        a = a * f[:, None] + tl.load(shift_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    return xhat, a, f, w


@triton.jit
def _normalize_store(x, mean, rstd, n, offs_c, offs_s, mask, C, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                     stride_n, stride_c, stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
                     SILU: tl.constexpr):
    """y = act((x̂·w + b)·(1 + scale) + shift) of a tile, stored at its (n, c, s) positions."""
    xhat, y, f, w = _modulated(x, mean, rstd, n, offs_c, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_W, HAS_B, HAS_MOD)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    ptrs = y_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_chunk(x_ptr, y_ptr, mean, rstd, ng, sp, w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, G, CHUNK,
               stride_n, stride_c, stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
               SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2 of the forward on one chunk: y from x and its group's mean and rstd."""
    n, g, cg, s_begin, s_end = _chunk(ng, sp, C, S, G, CHUNK)
    for c0 in range(g * cg, (g + 1) * cg, BLOCK_C):
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            x, offs_c, offs_s, mask = _load_tile(x_ptr, n, c0, s0, (g + 1) * cg, s_end, stride_n, stride_c,
                                                 stride_s, BLOCK_C, BLOCK_S)
            _normalize_store(x, mean, rstd, n, offs_c, offs_s, mask, C, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                             stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU)


@triton.jit
def _gn_fwd_kernel(x_ptr, y_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                   C, S, G, CHUNK, eps, stride_n, stride_c, stride_s,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                   SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    ng, sp, split = _program(True)
    mean, rstd = _group_stats(x_ptr, part_ptr, ng // G, ng % G, C // G, ng, split, eps, stride_n, stride_c,
                              SPLIT_P2)
    if sp == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    _fwd_chunk(x_ptr, y_ptr, mean, rstd, ng, sp, w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, G, CHUNK,
               stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _dm(dy, m, SILU: tl.constexpr):
    if SILU:
        sig = 1.0 / (1.0 + tl.exp(-m))
        return dy * sig * (1.0 + m * (1.0 - sig))
    return dy


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, c0, s0, C_END, S_END, C,
              stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Load x and dy tiles; return x̂, dm = dy·act'(m) (0 outside the tile), f, w and the tile."""
    x, offs_c, offs_s, mask = _load_tile(x_ptr, n, c0, s0, C_END, S_END, stride_n, stride_c, stride_s,
                                         BLOCK_C, BLOCK_S)
    dy, offs_c2, offs_s2, mask2 = _load_tile(dy_ptr, n, c0, s0, C_END, S_END, dstride_n, dstride_c, dstride_s,
                                             BLOCK_C, BLOCK_S)
    xhat, m, f, w = _modulated(x, mean, rstd, n, offs_c, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_W, HAS_B, HAS_MOD)
    return xhat, tl.where(mask, _dm(dy, m, SILU), 0.0), f, w, offs_c, offs_s, mask


@triton.jit
def _bwd_reduce_chunk(x_ptr, dy_ptr, mean, rstd, ng, sp, split, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                      C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of the backward on one chunk: per channel A = Σ dm and B = Σ dm·x̂ into the partials."""
    n, g, cg, s_begin, s_end = _chunk(ng, sp, C, S, G, CHUNK)
    for c0 in range(g * cg, (g + 1) * cg, BLOCK_C):
        acc_a = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)  # reduced once per channel block
        acc_b = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            xhat, dm, f, w, offs_c, offs_s, mask = _bwd_tile(
                x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, c0, s0, (g + 1) * cg, s_end, C,
                stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S)
            acc_a += dm
            acc_b += dm * xhat
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < (g + 1) * cg
        base = part_ptr + ((n * C + offs_c) * split + sp) * 2
        tl.store(base, tl.sum(acc_a, axis=1), mask=cmask)
        tl.store(base + 1, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _gn_bwd_reduce_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                          C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    ng, sp, split = _program(False)
    _bwd_reduce_chunk(x_ptr, dy_ptr, tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng), ng, sp, split,
                      w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr, C, S, G, CHUNK,
                      stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                      HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _bwd_group_sums(part_ptr, suma_ptr, sumb_ptr, w_ptr, scale_ptr, ng, split, store, C, G,
                    HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr):
    """Group ng's Σ dx̂ = Σ_c w·f·A and Σ dx̂·x̂ = Σ_c w·f·B from the per-channel partials of pass 1
    (loads past L1, as in _group_stats); with ``store``, A and B per (n, c) for the parameter
    gradients too."""
    n, g = ng // G, ng % G
    cg = C // G
    g1 = 0.0
    g2 = 0.0
    offs_p = tl.arange(0, SPLIT_P2)
    for c0 in range(g * cg, (g + 1) * cg, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < (g + 1) * cg
        pm = cmask[:, None] & (offs_p[None, :] < split)
        base = part_ptr + ((n * C + offs_c[:, None]) * split + offs_p[None, :]) * 2
        a = tl.sum(tl.load(base, mask=pm, other=0.0, cache_modifier=".cg"), axis=1)
        b = tl.sum(tl.load(base + 1, mask=pm, other=0.0, cache_modifier=".cg"), axis=1)
        tl.store(suma_ptr + n * C + offs_c, a, mask=cmask & store)
        tl.store(sumb_ptr + n * C + offs_c, b, mask=cmask & store)
        w = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32) if HAS_W else cmask.to(tl.float32)
        f = tl.full((BLOCK_C,), 1.0, tl.float32)
        if HAS_MOD:
            f = 1.0 + tl.load(scale_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        g1 += tl.sum(w * f * a, axis=0)
        g2 += tl.sum(w * f * b, axis=0)
    return g1, g2


@triton.jit
def _bwd_dx_chunk(x_ptr, dy_ptr, dx_ptr, mean, rstd, g1, g2, ng, sp, w_ptr, b_ptr, scale_ptr, shift_ptr,
                  C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2 of the backward on one chunk: dx = rstd·(dx̂ − Σdx̂/M − x̂·Σdx̂x̂/M), dx̂ = dm·f·w."""
    n, g, cg, s_begin, s_end = _chunk(ng, sp, C, S, G, CHUNK)
    inv_m = 1.0 / (cg * S).to(tl.float32)
    for c0 in range(g * cg, (g + 1) * cg, BLOCK_C):
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            xhat, dm, f, w, offs_c, offs_s, mask = _bwd_tile(
                x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, c0, s0, (g + 1) * cg, s_end, C,
                stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S)
            dxhat = dm * (f * w)[:, None]
            dx = rstd * (dxhat - g1 * inv_m - xhat * (g2 * inv_m))
            ptrs = dx_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
            tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                      suma_ptr, sumb_ptr, C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                      SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    ng, sp, split = _program(True)
    g1, g2 = _bwd_group_sums(part_ptr, suma_ptr, sumb_ptr, w_ptr, scale_ptr, ng, split, sp == 0, C, G,
                             HAS_W, HAS_MOD, SPLIT_P2, BLOCK_C)
    _bwd_dx_chunk(x_ptr, dy_ptr, dx_ptr, tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng), g1, g2, ng, sp,
                  w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, G, CHUNK, stride_n, stride_c, stride_s,
                  dstride_n, dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


# ---------------------------------------------------------------------------------------
# Launch configuration and launchers
# ---------------------------------------------------------------------------------------


def _as_ncs(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Make x NCHW- or channels-last-contiguous; return it with strides of the (N, C, S) view."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    stride_s = x.stride(-1) if fmt == torch.contiguous_format else x.shape[1]
    return x, x.stride(0), x.stride(1), stride_s


def launch_config(x: torch.Tensor, num_groups: int, knobs: Knobs = DEFAULT) -> dict:
    """Block sizes and the split of each group's reduction (SPLIT programs along S), NCHW x."""
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    cg = C // num_groups
    block_c = min(triton.next_power_of_2(cg), 16)
    # 2048-element tiles over 8 warps: 8 fp32 values per thread per live tensor
    block_s = max(16, min(triton.next_power_of_2(S), knobs.tile // block_c))
    if x.is_cuda:
        # ~4 programs per SM: 528 on an H100; at batch 1 with G = 32 that splits each group 16 ways
        target = knobs.programs_per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4 * N * num_groups  # interpreter: a few chunks per group, so the split paths are tested
    split = max(1, min(triton.cdiv(target, N * num_groups), triton.cdiv(S, block_s), 64))
    chunk = triton.cdiv(triton.cdiv(S, split), block_s) * block_s
    split = triton.cdiv(S, chunk)
    return {"S": S, "split": split, "chunk": chunk, "BLOCK_C": block_c, "BLOCK_S": block_s,
            "SPLIT_P2": triton.next_power_of_2(split), "num_warps": knobs.num_warps, "STAGES": knobs.stages}


def _dummy(x):
    return x.new_empty(0)


def _params_and_flags(x, weight, bias, scale, shift, activation):
    d = _dummy(x)
    params = tuple(t if t is not None else d for t in (weight, bias, scale, shift))
    flags = {"HAS_W": weight is not None, "HAS_B": bias is not None, "HAS_MOD": scale is not None,
             "SILU": activation == "silu"}
    return params, flags


def _channels_last(x) -> bool:
    return memory_format_of(x) != torch.contiguous_format


def candidates(x: torch.Tensor, num_groups: int) -> list[Knobs]:
    """Launch candidates for x: the two-pass knobs, plus the one-pass ones where an NCHW group
    fits on chip (their fit depends only on C/G and the power-of-two class of S: the key's)."""
    from kiln.kernels import group_norm_triton_onepass as onepass
    from kiln.kernels import group_norm_triton_pipelined as pipelined

    if _channels_last(x):
        return CANDIDATES + pipelined.CANDIDATES
    fitting = [k for k in onepass.CANDIDATES if onepass.fits(x, num_groups, k)]
    return CANDIDATES + pipelined.CANDIDATES + fitting


def _pick(direction: str, x: torch.Tensor, num_groups: int, flags: dict, launch) -> Knobs:
    N, C = x.shape[:2]
    layout = "cl" if _channels_last(x) else "nchw"
    key = (f"group_norm_{direction}", layout, str(x.dtype).removeprefix("torch."), C, num_groups,
           flags["HAS_MOD"], flags["SILU"], size_class(N), size_class(x[0, 0].numel()))
    return choose(key, candidates(x, num_groups), launch, x, agree=results_agree)


def group_norm_fwd(x, num_groups, weight, bias, scale, shift, eps, activation):
    """Forward launcher: returns (y, mean (N, G), rstd (N, G)) with y in x's memory format."""
    if not x.numel():  # an empty batch or spatial extent: nothing to launch (the splits divide by S)
        stats = x.new_zeros(x.shape[0], num_groups, dtype=torch.float32)
        return torch.empty_like(x, memory_format=memory_format_of(x)), stats, stats.clone()
    x, sn, sc, ss = _as_ncs(x)
    params, flags = _params_and_flags(x, weight, bias, scale, shift, activation)

    def launch(knobs: Knobs):
        if knobs.kind == "pipelined":  # one launch, pass 2 behind pass 1 (group_norm_triton_pipelined.py)
            from kiln.kernels import group_norm_triton_pipelined as pipelined

            return pipelined.fwd(x, (sn, sc, ss), num_groups, params, flags, eps, knobs)
        if _channels_last(x):  # whole token rows per program (group_norm_triton_cl.py)
            from kiln.kernels import group_norm_triton_cl as cl

            cfg = cl.launch_config(x, num_groups, knobs)
            return cl.fwd(x, (sn, sc, ss), num_groups, params, flags, eps, cfg)
        if knobs.kind == "onepass":  # the whole group in one program (group_norm_triton_onepass.py)
            from kiln.kernels import group_norm_triton_onepass as onepass

            return onepass.fwd(x, (sn, sc, ss), num_groups, params, flags, eps, knobs)
        return _fwd_nchw(x, (sn, sc, ss), num_groups, params, flags, eps, launch_config(x, num_groups, knobs))

    return launch(_pick("fwd", x, num_groups, flags, launch))


def _fwd_nchw(x, strides, num_groups, params, flags, eps, cfg):
    N, C = x.shape[:2]
    y = torch.empty_like(x)
    part = torch.empty(N * num_groups * cfg["split"] * 3, device=x.device, dtype=STATS_BUFFER_DTYPE)
    mean = torch.empty(N, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = (N * num_groups, cfg["split"])
    blocks = {k: cfg[k] for k in ("BLOCK_C", "BLOCK_S", "STAGES", "num_warps")}
    run_kernel(_gn_stats_kernel, grid, x, part, C, cfg["S"], num_groups, cfg["chunk"], *strides, **blocks)
    run_kernel(_gn_fwd_kernel, grid, x, y, part, mean, rstd, *params, C, cfg["S"], num_groups, cfg["chunk"], eps,
               *strides, **flags, SPLIT_P2=cfg["SPLIT_P2"], **blocks)
    return y, mean, rstd


def group_norm_bwd(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    """Backward launcher: returns (dx, A, B) where A, B (N, C) give the parameter gradients."""
    if not x.numel():  # sums over no elements
        sums = x.new_zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        return torch.empty_like(x, memory_format=memory_format_of(x)), sums, sums.clone()
    x, sn, sc, ss = _as_ncs(x)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    _, dsn, dsc, dss = _as_ncs(dy)
    params, flags = _params_and_flags(x, weight, bias, scale, shift, activation)

    def launch(knobs: Knobs):
        if knobs.kind == "pipelined":
            from kiln.kernels import group_norm_triton_pipelined as pipelined

            return pipelined.bwd(dy, x, (sn, sc, ss), (dsn, dsc, dss), mean, rstd, num_groups, params, flags, knobs)
        if _channels_last(x):
            from kiln.kernels import group_norm_triton_cl as cl

            cfg = cl.launch_config(x, num_groups, knobs)
            return cl.bwd(dy, x, (sn, sc, ss), (dsn, dsc, dss), mean, rstd, num_groups, params, flags, cfg)
        if knobs.kind == "onepass":
            from kiln.kernels import group_norm_triton_onepass as onepass

            return onepass.bwd(dy, x, (sn, sc, ss), (dsn, dsc, dss), mean, rstd, num_groups, params, flags, knobs)
        cfg = launch_config(x, num_groups, knobs)
        return _bwd_nchw(dy, x, (sn, sc, ss), (dsn, dsc, dss), mean, rstd, num_groups, params, flags, cfg)

    return launch(_pick("bwd", x, num_groups, flags, launch))


def _bwd_nchw(dy, x, strides, dstrides, mean, rstd, num_groups, params, flags, cfg):
    N, C = x.shape[:2]
    part = torch.empty(N * C * cfg["split"] * 2, device=x.device, dtype=torch.float32)
    sum_a = torch.empty(N, C, device=x.device, dtype=torch.float32)
    sum_b = torch.empty_like(sum_a)
    dx = torch.empty_like(x)
    grid = (N * num_groups, cfg["split"])
    blocks = {k: cfg[k] for k in ("BLOCK_C", "BLOCK_S", "STAGES", "num_warps")}
    run_kernel(_gn_bwd_reduce_kernel, grid, x, dy, mean, rstd, *params, part, C, cfg["S"], num_groups, cfg["chunk"],
               *strides, *dstrides, **flags, **blocks)
    run_kernel(_gn_bwd_dx_kernel, grid, x, dy, dx, mean, rstd, *params, part, sum_a, sum_b, C, cfg["S"], num_groups,
               cfg["chunk"], *strides, *dstrides, **flags, SPLIT_P2=cfg["SPLIT_P2"], **blocks)
    return dx, sum_a, sum_b


def _sm90_report(kernel, dt: str, constexprs: dict, ones: tuple, layout: str, knobs: Knobs | None,
                 tensors: int = 1, max_registers: int | None = None) -> dict:
    """One kernel compiled for sm_90a with ``dt`` data, a launch's alignment and unit strides, at
    ``knobs``'s warps and stages (None: a finalize kernel, Triton's default 4 warps) and the
    launch's register cap, with the loads it keeps in flight per SM (loads_in_flight;
    ``tensors`` tile-sized inputs)."""
    from kiln.kernels.sm90 import compile_sm90

    i32, f32 = "i32", "*fp32"
    data = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "out_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr")
    pool = {**dict.fromkeys(data, f"*{dt}"),
            **dict.fromkeys(("part_ptr", "mean_ptr", "rstd_ptr", "suma_ptr", "sumb_ptr", "g1_ptr", "g2_ptr"), f32),
            **dict.fromkeys(("C", "S", "G", "UG", "CHUNK", "split", "NG", "SPLIT", "LAG"), i32), "sync_ptr": "*i32",
            "eps": "fp32"}
    strides = tuple(f"{p}stride_{a}" for p in ("", "d") for a in "ncs")
    sig = {k: (i32 if k in strides else pool[k]) for k in kernel.arg_names if k in pool or k in strides}
    if "STAGES" in kernel.arg_names:
        constexprs = {**constexprs, "STAGES": knobs.stages}
    r = compile_sm90(kernel, sig, constexprs, knobs.num_warps if knobs else 4,
                     aligned=("C", "S", "CHUNK", *strides), ones=ones, max_registers=max_registers)
    r = {**r, "dtype": dt, "layout": layout}
    if knobs is None:
        return r
    # one-pass kernels launch a program per group, so what shares an SM depends on N·G: not modelled
    size = 2 if dt == "bf16" else 4
    flight = None if knobs.kind == "onepass" else loads_in_flight(knobs, r, tensors, size)
    return {**r, "knobs": str(knobs), "in_flight_bytes": flight}


def compile_for_sm90() -> list[dict]:
    """Compile every kernel for sm_90a in the configurations the launchers pick (CI check).

    Specialised as a real launch is: NCHW has a unit spatial stride, channels-last a unit channel
    stride (Triton's JIT turns an argument equal to 1 into a constant), the other strides and
    lengths of VAE shapes are multiples of 16.
    """
    from kiln.kernels import group_norm_triton_cl as cl
    from kiln.kernels import group_norm_triton_onepass as onepass
    from kiln.kernels import group_norm_triton_pipelined as pipelined
    from kiln.kernels.sm90 import in_parallel

    jobs = []  # _sm90_report's arguments per kernel, built in parallel at the end

    def add(*args) -> None:
        jobs.append(functools.partial(_sm90_report, *args))

    flags = {"HAS_W": True, "HAS_B": True, "HAS_MOD": True, "SILU": True}
    nchw, cl_ones = ("stride_s", "dstride_s"), ("stride_c", "dstride_c")
    finalize = {"CG_P2": 16, "BLOCK_P": cl.STAT_BLOCK}
    # every candidate's tile, warps and stages in bf16 (the training dtype); the default in fp32
    for dt, knob_set in (("bf16", CANDIDATES), ("fp32", [DEFAULT])):
        for knobs in knob_set:
            for block_c in (4, 16):  # C/G = 4 (C = 128, G = 32) and 10-16 (C = 320-512)
                blocks = {"BLOCK_C": block_c, "BLOCK_S": knobs.tile // block_c}
                for kernel, extra, tensors in ((_gn_stats_kernel, {}, 1),
                                               (_gn_fwd_kernel, {**flags, "SPLIT_P2": 16}, 1),
                                               (_gn_bwd_reduce_kernel, flags, 2),
                                               (_gn_bwd_dx_kernel, {**flags, "SPLIT_P2": 16}, 2)):
                    add(kernel, dt, {**extra, **blocks}, nchw, "nchw", knobs, tensors)
            for block_c in (32, 128):  # C = 96 and C = 128-640
                blocks = {"BLOCK_C": block_c, "BLOCK_S": knobs.tile // block_c}
                for kernel, extra, tensors in ((cl._cl_stats_kernel, {}, 1), (cl._cl_fwd_kernel, flags, 1),
                                               (cl._cl_bwd_reduce_kernel, flags, 2), (cl._cl_bwd_dx_kernel, flags, 2)):
                    add(kernel, dt, {**extra, **blocks}, cl_ones, "channels_last", knobs, tensors)
        if dt == "bf16":  # one-pass candidates at their largest group, narrow and wide channel blocks
            for knobs in onepass.CANDIDATES:
                for block_c in (4, 16):
                    blocks = {"BLOCK_C": block_c, "BLOCK_S": knobs.tile // block_c}
                    for kernel, tensors in ((onepass._onepass_fwd_kernel, 1), (onepass._onepass_bwd_kernel, 2)):
                        add(kernel, dt, {**flags, **blocks}, nchw, "nchw", knobs, tensors)
            for knobs in pipelined.CANDIDATES:  # NCHW: SPLIT_P2 at its largest (max_split chunks per group)
                for bwd, block_c in itertools.product((False, True), (4, 16)):
                    blocks = {"BLOCK_C": block_c, "BLOCK_S": knobs.tile // block_c,
                              "SPLIT_P2": pipelined.max_split(block_c), "CG_P2": 1, "BLOCK_P": 1, "UNIT_ALIGN": 1}
                    add(pipelined._gn_pipelined_kernel, dt, {**flags, **blocks, "BWD": bwd, "CL": False}, nchw, "nchw",
                        knobs, 1 + bwd, None if bwd else knobs.fwd_registers)
                # channels-last units: 2 groups of 4 channels (1x128x512x512), 2 of 16 (C = 512)
                for bwd, (width, cg_p2) in itertools.product((False, True), ((8, 4), (32, 16))):
                    blocks = {"BLOCK_C": width, "BLOCK_S": knobs.tile // width, "SPLIT_P2": 1, "CG_P2": cg_p2,
                              "BLOCK_P": cl.STAT_BLOCK, "UNIT_ALIGN": width}
                    add(pipelined._gn_pipelined_kernel, dt, {**flags, **blocks, "BWD": bwd, "CL": True}, cl_ones,
                        "channels_last", knobs, 1 + bwd, None if bwd else knobs.fwd_registers)
        add(cl._cl_stats_finalize_kernel, dt, finalize, ("stride_c",), "channels_last", None)
        add(cl._cl_bwd_finalize_kernel, dt, {"HAS_W": True, "HAS_MOD": True, **finalize}, (), "channels_last", None)
    return in_parallel(jobs)
