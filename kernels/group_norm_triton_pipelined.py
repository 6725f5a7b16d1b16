"""Triton GroupNorm in one launch: pass 2 of a group runs a few groups behind its pass 1.

Why: the two-launch paths (group_norm_triton.py, group_norm_triton_cl.py) read the whole tensor
in pass 1 before pass 2 re-reads it. At VAE shapes the tensor is larger than L2 (1x128x512x512
bf16: x is 67 MB, x + dy 134 MB; H100/H200 L2 50 MB), so most of the re-read comes from HBM:
the forward moves ~2.5 and the backward ~4.5 tensor-sizes for an ideal 2 and 3, a ceiling of
~80% and ~67-73% of copy bandwidth (benchmarks/results/README.md), under issue 5's 80% target.
Here the two passes are interleaved unit by unit, so each chunk's re-read follows its first
read by a few MB of traffic and comes from L2: an ideal 2 / 3 tensor-sizes, one launch.

A unit is one group in NCHW (a contiguous run of C/G·S elements) and, in channels-last, UG
whole groups of one sample: a token row holds every group there, so a unit reads a 16-64 byte
piece of each row (unit_groups: at most 32 channels, at most 4 MB where possible; 2 groups of
4 channels at 1x128x512x512 bf16) rather than the 8 bytes of one group. Work items are
(phase, unit, chunk); programs claim them in a fixed order from an atomic ticket counter (a
persistent grid of a few programs per SM, each looping until the tickets run out):

    P1(0) .. P1(LAG-1), then P1(i + LAG), P2(i) for i = 0, 1, ..., then the last P2s

where P1(u) is every chunk of unit u's pass 1 (forward: shifted sums; backward: per-channel
A = Σ dm, B = Σ dm·x̂) and P2(u) every chunk of its pass 2 (y or dx). One kernel,
_gn_pipelined_kernel, serves both directions and layouts (constexpr BWD and CL); its phase
bodies are the two-launch kernels' own chunk helpers. A P1 chunk stores its partials, then
counts itself on the unit's flag (release); the unit's last P1 chunk reduces the partials to
its groups' statistics in a fixed order (deterministic, no float atomics) and bumps the flag
once more. A P2 chunk spins (acquire) until the flag says the statistics are there. LAG is chosen so the P1 chunks
of unit i were claimed about two grids' worth of tickets before P2(i), so they are done and
P2 rarely waits. The L2 reuse distance (bytes claimed between a chunk's two reads) is then
(2·LAG + 1) units' chunks: 9-25 MB of x and dy in the backward at issue 5's VAE shapes on an
H100, against 50 MB of L2 (reuse_distance; tests/test_group_norm_triton.py checks it).

No deadlock, whatever the residency: a ticket is claimed only by a running program; P1 items
never wait, and a P2 item waits only for P1 items with smaller tickets, all claimed by running
programs that finish them (induction on the ticket). Under the interpreter programs run one
after another and the first takes every ticket in order, so no wait ever spins. A spin is still
bounded (MAX_SPINS): a broken schedule gives NaN outputs (_wait), not a hung device or test,
nor quietly wrong numbers.

Loads of data written during the launch (partials, statistics) bypass L1 (``.cg``): L1 is not
coherent across SMs. In the sm_90a PTX (triton 3.8) every ticket and flag atomic is one
thread's (``@p atom.global.gpu.acq_rel.add``, p = thread 0), its result broadcast through
shared memory behind a ``bar.sync``, and a ``bar.sync`` precedes each release: the pattern of
CUTLASS's semaphore.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import group_norm_triton_cl as cl
from kiln.kernels.autotune import run_kernel
from kiln.kernels.group_norm import memory_format_of
from kiln.kernels.group_norm_triton import (
    Knobs,
    _bwd_dx_chunk,
    _bwd_group_sums,
    _bwd_reduce_chunk,
    _fwd_chunk,
    _group_stats,
    _stats_chunk,
    launch_config,
)

# 2048-4096-element tiles, 2 of them per work item (4-8K elements: 8-16 KB of bf16 x, twice that
# with dy), 4 programs of 4 warps or 1 of 16 per SM (528 or 132 on an H100): little enough work
# in flight that a chunk's two reads stay within ~25 MB of x and dy at issue 5's shapes
# (reuse_distance). The first requests an item's two tiles together (stages = 3, cp.async) and so
# keeps group_norm_triton.IN_FLIGHT_TARGET bytes of loads in flight per SM in both directions and
# layouts (loads_in_flight: 32-64 KB). Its forward is capped at 128 registers, so that 4 programs of
# 4 warps fit an SM's 64K: triton 3.6 (the GPU machine's) compiled the channels-last one at 139
# (3 programs, 24 KB in flight), and at 128 it does not spill; 3.8 stays under 128 anyway. Not the
# backward: at 128 it spills 60-104 bytes (it takes 242-249 under 3.6, 2 programs, 32 KB). The
# second, unstaged, claims half as many tickets (one atomic on one counter each: 8K per
# 1x128x512x512 forward against 16K). Both compile for sm_90a without spills under triton 3.8
# and 3.6 (2026-12-06).
CANDIDATES = [Knobs(2048, 4, 4, kind="pipelined", stages=3, fwd_registers=128), Knobs(4096, 16, 1, kind="pipelined")]
TILES_PER_ITEM = 2
# channels-last units (unit_groups): at most 32 channels (64 bytes of a bf16 row), at least one
# 16-byte load per row, x-bytes within 4 MB where possible, so that LAG 1's three units of x and
# dy (25 MB) fit half of an H100's 50 MB L2
UNIT_CHANNELS = 32
MIN_SEGMENT = 16
UNIT_BYTES = 4 << 20
# chunks per NCHW group: at most MAX_PARTIALS / BLOCK_C, since the finalize reduces BLOCK_C x
# SPLIT_P2 partials at once (256 chunks at C/G = 4, 64 at 16). At 1x128x512x512 the 256 keep
# chunks at two 2048-element tiles, where a cap of 128 made them 4 tiles and, with 528 programs,
# put 38 MB of x and dy between a chunk's two reads (reuse_distance)
MAX_PARTIALS = 1024


def max_split(block_c: int) -> int:
    return MAX_PARTIALS // block_c
# ~1 s of 0.5-1 µs atomics on a GPU, where a real wait is microseconds; under the interpreter
# programs run one after another, so a wait that does not pass at once never will
MAX_SPINS = tl.constexpr(8 if os.environ.get("TRITON_INTERPRET") == "1" else 1 << 20)


@triton.jit
def _item(t, NG, SPLIT, LAG):
    """Ticket t -> (phase 0 or 1, unit, chunk) in the order of the module docstring."""
    blk = t // SPLIT
    sp = t % SPLIT
    j = blk - LAG
    pairs = NG - LAG
    head = blk < LAG
    in_pairs = j < 2 * pairs
    odd = j % 2
    phase = tl.where(head, 0, tl.where(in_pairs, odd, 1))
    ng = tl.where(head, blk, tl.where(in_pairs, j // 2 + (1 - odd) * LAG, j - pairs))
    return phase, ng, sp


@triton.jit
def _arrive(flag_ptr, SPLIT):
    """Count a finished pass-1 chunk on its unit's flag; True for the unit's last one. The
    barrier orders every thread's stores before the (cumulative) release."""
    tl.debug_barrier()
    return tl.atomic_add(flag_ptr, 1, sem="acq_rel") == SPLIT - 1


@triton.jit
def _publish(flag_ptr):
    tl.debug_barrier()
    tl.atomic_add(flag_ptr, 1, sem="release")


@triton.jit
def _wait(flag_ptr, target, stat_ptr, first, UG):
    """Spin until the flag reaches target. Past MAX_SPINS (a broken schedule, never a real wait)
    poison the unit's statistics (stat_ptr[first : first + UG], its groups' mean or g1) with NaN
    and force the flag, so the outputs say so loudly instead of being quietly wrong, and the
    unit's other chunks do not spin out one after another."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    spins = 0
    while (seen < target) & (spins < MAX_SPINS):
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
        spins += 1
    if seen < target:
        for i in range(UG):
            tl.store(stat_ptr + first + i, float("nan"))
        tl.debug_barrier()
        tl.atomic_max(flag_ptr, target, sem="release")


@triton.jit
def _cl_unit(u, sp, C, S, G, UG, CHUNK, UNIT_ALIGN: tl.constexpr):
    """Channels-last unit u = n·(G/UG) + block: UG whole groups of sample n (their channels are
    contiguous in every token row) -> (n, first group, c_lo, c_hi, s_begin, s_end) of chunk sp.
    c_lo and c_hi are built as multiples of UNIT_ALIGN (the unit width's largest power-of-two
    factor) so that Triton can prove the channel loads aligned: computed plainly, sm_90a got
    2-byte scalar loads only."""
    per_sample = G // UG
    n = u // per_sample
    g0 = (u % per_sample) * UG
    width = UG * (C // G) // UNIT_ALIGN
    c_lo = (u % per_sample) * width * UNIT_ALIGN
    s_begin = sp * CHUNK
    return n, g0, c_lo, c_lo + width * UNIT_ALIGN, s_begin, tl.minimum(s_begin + CHUNK, S)


# The kernel's arguments, passed whole to the phase helpers below (forward: out = y, dy = x and
# the backward-only buffers are dummies; backward: out = dx)
@triton.jit
def _pass1(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u, sp,
           C, S, G, UG, CHUNK, SPLIT, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
           BWD: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
           SILU: tl.constexpr, UNIT_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
           STAGES: tl.constexpr):
    """Chunk sp of unit u, pass 1: its partial sums (forward: Σd, Σd²; backward: Σ dm, Σ dm·x̂)."""
    if CL:
        n, g0, c_lo, c_hi, s_begin, s_end = _cl_unit(u, sp, C, S, G, UG, CHUNK, UNIT_ALIGN)
        if BWD:
            cl._cl_bwd_reduce_chunk(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                                    n, sp, SPLIT, c_lo, c_hi, s_begin, s_end, C, G, stride_n, stride_c, stride_s,
                                    dstride_n, dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S,
                                    STAGES)
        else:
            cl._cl_stats_chunk(x_ptr, part_ptr, n, sp, SPLIT, c_lo, c_hi, s_begin, s_end, C, stride_n, stride_c,
                               stride_s, BLOCK_C, BLOCK_S, STAGES)
    elif BWD:
        _bwd_reduce_chunk(x_ptr, dy_ptr, tl.load(mean_ptr + u), tl.load(rstd_ptr + u), u, sp, SPLIT, w_ptr, b_ptr,
                          scale_ptr, shift_ptr, part_ptr, C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n,
                          dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)
    else:
        _stats_chunk(x_ptr, part_ptr, u, sp, SPLIT, C, S, G, CHUNK, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S,
                     STAGES)


@triton.jit
def _finalize(x_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr, u,
              C, S, G, UG, SPLIT, eps, stride_n, stride_c, BWD: tl.constexpr, CL: tl.constexpr,
              HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, SPLIT_P2: tl.constexpr, CG_P2: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Unit u's statistics from all its partials, by its last pass-1 chunk: forward mean and
    rstd; backward A, B per channel and each group's g1 = Σ dx̂, g2 = Σ dx̂·x̂."""
    if CL:
        n = u // (G // UG)
        g0 = (u % (G // UG)) * UG
        for g in range(g0, g0 + UG):
            if BWD:
                cl._cl_bwd_group_sums(part_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr, n, g, C, G,
                                      SPLIT, HAS_W, HAS_MOD, CG_P2, BLOCK_P)
            else:
                cl._cl_group_stats(x_ptr, part_ptr, mean_ptr, rstd_ptr, n, g, C, S, G, SPLIT, eps, stride_n,
                                   stride_c, CG_P2, BLOCK_P)
    elif BWD:
        g1, g2 = _bwd_group_sums(part_ptr, suma_ptr, sumb_ptr, w_ptr, scale_ptr, u, SPLIT, True, C, G, HAS_W, HAS_MOD,
                                 SPLIT_P2, BLOCK_C)
        tl.store(g1_ptr + u, g1)
        tl.store(g2_ptr + u, g2)
    else:
        mean, rstd = _group_stats(x_ptr, part_ptr, u // G, u % G, C // G, u, SPLIT, eps, stride_n, stride_c, SPLIT_P2)
        tl.store(mean_ptr + u, mean)
        tl.store(rstd_ptr + u, rstd)


@triton.jit
def _pass2(x_ptr, dy_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr, u, sp,
           C, S, G, UG, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
           BWD: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
           SILU: tl.constexpr, UNIT_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
           STAGES: tl.constexpr):
    """Chunk sp of unit u, pass 2: y, or dx, from the unit's statistics (read past L1)."""
    if CL:
        n, g0, c_lo, c_hi, s_begin, s_end = _cl_unit(u, sp, C, S, G, UG, CHUNK, UNIT_ALIGN)
        if BWD:
            cl._cl_bwd_dx_chunk(x_ptr, dy_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                g1_ptr, g2_ptr, n, c_lo, c_hi, s_begin, s_end, C, S, G, stride_n, stride_c, stride_s,
                                dstride_n, dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)
        else:
            cl._cl_fwd_chunk(x_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, n, c_lo, c_hi,
                             s_begin, s_end, C, G, stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU,
                             BLOCK_C, BLOCK_S, STAGES)
    else:
        mean = tl.load(mean_ptr + u, cache_modifier=".cg")
        rstd = tl.load(rstd_ptr + u, cache_modifier=".cg")
        if BWD:
            _bwd_dx_chunk(x_ptr, dy_ptr, out_ptr, mean, rstd, tl.load(g1_ptr + u, cache_modifier=".cg"),
                          tl.load(g2_ptr + u, cache_modifier=".cg"), u, sp, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                          HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)
        else:
            _fwd_chunk(x_ptr, out_ptr, mean, rstd, u, sp, w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, G, CHUNK,
                       stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _gn_pipelined_kernel(x_ptr, dy_ptr, out_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                         suma_ptr, sumb_ptr, g1_ptr, g2_ptr, sync_ptr, C, S, G, UG, CHUNK, NG, SPLIT, LAG, eps,
                         stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                         BWD: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_MOD: tl.constexpr, SILU: tl.constexpr, SPLIT_P2: tl.constexpr, CG_P2: tl.constexpr,
                         BLOCK_P: tl.constexpr, UNIT_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Forward (BWD false) or backward of NCHW or channels-last (CL) x over NG units of SPLIT
    chunks. sync_ptr[0] is the ticket counter, sync_ptr[1 + u] unit u's flag (SPLIT + 1 =
    statistics ready)."""
    total = 2 * NG * SPLIT
    t = tl.atomic_add(sync_ptr, 1)
    while t < total:
        phase, u, sp = _item(t, NG, SPLIT, LAG)
        flag = sync_ptr + 1 + u
        if phase == 0:
            _pass1(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, u, sp,
                   C, S, G, UG, CHUNK, SPLIT, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                   BWD, CL, HAS_W, HAS_B, HAS_MOD, SILU, UNIT_ALIGN, BLOCK_C, BLOCK_S, STAGES)
            if _arrive(flag, SPLIT):
                _finalize(x_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr,
                          u, C, S, G, UG, SPLIT, eps, stride_n, stride_c, BWD, CL, HAS_W, HAS_MOD, SPLIT_P2, CG_P2,
                          BLOCK_P, BLOCK_C)
                _publish(flag)
        else:
            _wait(flag, SPLIT + 1, g1_ptr if BWD else mean_ptr, u * UG, UG)  # (a unit's groups: u·UG on)
            _pass2(x_ptr, dy_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr,
                   u, sp, C, S, G, UG, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                   BWD, CL, HAS_W, HAS_B, HAS_MOD, SILU, UNIT_ALIGN, BLOCK_C, BLOCK_S, STAGES)
        t = tl.atomic_add(sync_ptr, 1)


# ---------------------------------------------------------------------------------------
# Schedule and launchers
# ---------------------------------------------------------------------------------------


def lag(grid: int, split: int, units: int) -> int:
    """Units (groups; channels-last: blocks of groups) between a unit's pass 1 and its pass 2:
    P1(i)'s chunks come (2·LAG + 1)·SPLIT tickets before P2(i)'s, at least two grids' worth, so
    they finished long before."""
    return min(units, max(1, triton.cdiv(triton.cdiv(2 * grid, split) - 1, 2)))


def unit_groups(x: torch.Tensor, num_groups: int) -> int:
    """Groups per channels-last unit. A unit spans at most UNIT_CHANNELS channels and, where it
    can, at least MIN_SEGMENT bytes of each row (one 16-byte load); among those widths the widest
    whose x-bytes fit UNIT_BYTES, else the narrowest. 1x128x512x512 bf16: 2 groups (8 channels,
    4 MB; 32 channels would be 17 MB, and three units of x and dy 100 MB, twice the L2)."""
    C, S, size = x.shape[1], x[0, 0].numel(), x.element_size()
    cg = C // num_groups
    widths = [d for d in range(1, num_groups + 1) if num_groups % d == 0 and (d == 1 or d * cg <= UNIT_CHANNELS)]
    whole = [d for d in widths if d * cg * size >= MIN_SEGMENT] or widths[-1:]
    fitting = [d for d in whole if S * d * cg * size <= UNIT_BYTES]
    return fitting[-1] if fitting else whole[0]


def _nchw_chunks(x: torch.Tensor, num_groups: int, knobs: Knobs, gpu: bool) -> dict:
    cfg = launch_config(x, num_groups, knobs)
    if gpu:  # ~TILES_PER_ITEM tiles of one group per chunk, at most max_split chunks
        cg, S, block_s = x.shape[1] // num_groups, cfg["S"], cfg["BLOCK_S"]
        per_item = max(1, TILES_PER_ITEM * knobs.tile // cg // block_s) * block_s
        cfg["chunk"] = max(per_item, triton.cdiv(triton.cdiv(S, max_split(cfg["BLOCK_C"])), block_s) * block_s)
        cfg["split"] = triton.cdiv(S, cfg["chunk"])
    unused = {"CG_P2": 1, "BLOCK_P": 1, "UNIT_ALIGN": 1}  # the channels-last kernel's
    return {**cfg, "UG": 1, "units": x.shape[0] * num_groups, **unused}


def _cl_chunks(x: torch.Tensor, num_groups: int, knobs: Knobs, gpu: bool) -> dict:
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    ug = unit_groups(x, num_groups)
    block_c = triton.next_power_of_2(ug * (C // num_groups))
    block_s = max(1, min(triton.next_power_of_2(S), knobs.tile // block_c))
    # GPU: TILES_PER_ITEM tiles of rows per chunk; interpreter: 3 chunks per unit
    chunk = TILES_PER_ITEM * block_s if gpu else triton.cdiv(triton.cdiv(S, 3), block_s) * block_s
    width = ug * (C // num_groups)
    return {"S": S, "chunk": chunk, "split": triton.cdiv(S, chunk), "UG": ug, "units": N * num_groups // ug,
            "BLOCK_C": block_c, "BLOCK_S": block_s, "CG_P2": triton.next_power_of_2(C // num_groups),
            "BLOCK_P": cl.STAT_BLOCK, "UNIT_ALIGN": width & -width, "num_warps": knobs.num_warps,
            "STAGES": knobs.stages}


def schedule(x: torch.Tensor, num_groups: int, knobs: Knobs, sms: int | None = None) -> dict:
    """Blocks, chunk, SPLIT, units, programs and LAG for x. A unit is a group (NCHW) or UG groups
    of one sample (channels-last). On a GPU with ``sms`` SMs (x's device's count by default) a
    chunk is ~TILES_PER_ITEM tiles of one unit and the grid programs_per_sm programs per SM;
    under the interpreter a few chunks per unit (so the interleaving is exercised) and 3
    programs."""
    if sms is None and x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    gpu = sms is not None
    cl_layout = memory_format_of(x) != torch.contiguous_format
    cfg = (_cl_chunks if cl_layout else _nchw_chunks)(x, num_groups, knobs, gpu)
    grid = min(2 * cfg["units"] * cfg["split"], knobs.programs_per_sm * sms if gpu else 3)
    split_p2 = 1 if cl_layout else triton.next_power_of_2(cfg["split"])  # (NCHW's; fixed where unused: one compile)
    return {**cfg, "channels_last": cl_layout, "SPLIT_P2": split_p2, "grid": grid,
            "lag": lag(grid, cfg["split"], cfg["units"]), "fwd_registers": knobs.fwd_registers}


def reuse_distance(cfg: dict, x: torch.Tensor, tensors: int) -> int:
    """Bytes of ``tensors`` x-sized inputs claimed between a chunk's first read (P1) and its
    re-read (P2), (2·LAG + 1)·SPLIT chunks: what L2 must hold for the re-read to hit."""
    elements = x.numel() // (cfg["units"] * cfg["split"])
    return (2 * cfg["lag"] + 1) * cfg["split"] * elements * x.element_size() * tensors


def _launch(x, dy, out, mean, rstd, params, flags, strides, dstrides, eps, cfg, bwd: bool):
    """The one launch: (A, B) per (n, c) in the backward, None in the forward."""
    N, C = x.shape[:2]
    G = mean.shape[1]
    f32 = {"device": x.device, "dtype": torch.float32}
    # partials: count, Σd, Σd² per group and chunk in the NCHW forward, else two sums per channel and chunk
    nchw_fwd = not (bwd or cfg["channels_last"])
    part = torch.empty(N * G * cfg["split"] * 3 if nchw_fwd else N * C * cfg["split"] * 2, **f32)
    # backward: A, B per (n, c) and g1, g2 per (n, g); the forward passes empty placeholders
    shapes = ((N, C), (N, C), (N, G), (N, G)) if bwd else ((0,),) * 4
    sums = tuple(torch.empty(shape, **f32) for shape in shapes)
    sync = torch.zeros(1 + cfg["units"], device=x.device, dtype=torch.int32)  # the ticket, then a flag per unit
    keys = ("SPLIT_P2", "CG_P2", "BLOCK_P", "UNIT_ALIGN", "BLOCK_C", "BLOCK_S", "STAGES", "num_warps")
    cap = {} if bwd or not cfg["fwd_registers"] else {"maxnreg": cfg["fwd_registers"]}
    run_kernel(_gn_pipelined_kernel, (cfg["grid"],), x, dy, out, part, mean, rstd, *params, *sums, sync, C, cfg["S"],
               G, cfg["UG"], cfg["chunk"], cfg["units"], cfg["split"], cfg["lag"], eps, *strides, *dstrides,
               BWD=bwd, CL=cfg["channels_last"], **flags, **{k: cfg[k] for k in keys}, **cap)
    return sums[:2] if bwd else None


def fwd(x, strides, num_groups, params, flags, eps, knobs: Knobs):
    """(y, mean, rstd) of x (NCHW or channels-last) in one launch."""
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[0], num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _launch(x, x, y, mean, rstd, params, flags, strides, strides, eps, schedule(x, num_groups, knobs), bwd=False)
    return y, mean, rstd


def bwd(dy, x, strides, dstrides, mean, rstd, num_groups, params, flags, knobs: Knobs):
    """(dx, A, B) of x (NCHW or channels-last) in one launch; A, B (N, C) give the parameter
    gradients."""
    dx = torch.empty_like(x)
    sum_a, sum_b = _launch(x, dy, dx, mean, rstd, params, flags, strides, dstrides, 0.0,
                           schedule(x, num_groups, knobs), bwd=True)
    return dx, sum_a, sum_b
