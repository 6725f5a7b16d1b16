"""Triton GroupNorm kernels for channels-last tensors: every program reads whole token rows.

In channels-last memory a token's C channels are contiguous and one group's cg = C/G channels
are only cg·itemsize bytes of each row: 8 bytes at C = 128, G = 32 in bf16. Kernels that give
each (n, g) group its own programs (group_norm_triton.py's layout-agnostic path) then read 8 of
every 32-byte sector the memory system moves, 4x the bytes, and emit scalar 2-byte loads
(sm_90a disassembly: LDG.E.U16 only). Here a program owns a chunk of tokens of one sample and
all its channels, in blocks of BLOCK_C contiguous channels (64-256 bytes per row), so loads are
16-byte vectors and every sector fetched is used. Per-channel partial sums replace per-group
ones, and a small finalize kernel per (n, g) turns them into group statistics:

Forward: 1. _cl_stats_kernel (N, SPLIT): per channel, Σd and Σd² of d = x - p_c, p_c the
            channel's first token (shifted sums, as the NCHW path, stay exact when |mean| >> std);
         2. _cl_stats_finalize_kernel (N·G): mean = Σ_c(Σd_c + S·p_c)/M and
            Σ(x - mean)² = Σ_c [Σd²_c + 2(p_c - mean)Σd_c + S(p_c - mean)²], M = cg·S;
         3. _cl_fwd_kernel (N, SPLIT): y as in the NCHW path with per-channel mean, rstd, the
            grid walked backwards (the chunks pass 1 read last are re-read first, from L2).
Backward: 1. _cl_bwd_reduce_kernel (N, SPLIT): per channel A = Σ dm, B = Σ dm·x̂;
          2. _cl_bwd_finalize_kernel (N·G): A, B per (n, c) and the group sums
             g1 = Σ_c w·f·A, g2 = Σ_c w·f·B;
          3. _cl_bwd_dx_kernel (N, SPLIT): dx = rstd·(dm·f·w − g1/M − x̂·g2/M), backwards too.
Bytes: forward reads x twice and writes y; backward reads x and dy twice and writes dx (the
partial sums are O(N·SPLIT·C)). Deterministic: no atomics, fixed reduction order. The passes'
bodies are helpers over a channel range [c_lo, c_hi), so the one-launch kernels of
group_norm_triton_pipelined.py run them on blocks of groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.autotune import run_kernel
from kiln.kernels.group_norm_triton import _bwd_tile, _load_tile, _normalize_store

STAT_BLOCK = 64  # splits combined per step of a finalize kernel


@triton.jit
def _chunk(S, CHUNK, REVERSE: tl.constexpr):
    """This program's (n, sp, split, s_begin, s_end): tokens [s_begin, s_end) of sample n, chunk sp
    of split. REVERSE walks the grid backwards: the second passes (y, dx) re-read first what
    the first pass read last, still in L2 (50 MB on an H100), as group_norm_triton._program."""
    n, sp = tl.program_id(0), tl.program_id(1)
    if REVERSE:
        n = tl.num_programs(0) - 1 - n
        sp = tl.num_programs(1) - 1 - sp
    s_begin = sp * CHUNK
    return n, sp, tl.num_programs(1), s_begin, tl.minimum(s_begin + CHUNK, S)


@triton.jit
def _per_channel(a_ptr, b_ptr, n, offs_c, cg, G, cmask):
    """Each channel's entries of two (N, G) per-group fp32 arrays (mean and rstd, or g1 and g2);
    past L1 (.cg): the pipelined kernels read them in the launch that wrote them."""
    g = offs_c // cg
    return (tl.load(a_ptr + n * G + g, mask=cmask, other=0.0, cache_modifier=".cg"),
            tl.load(b_ptr + n * G + g, mask=cmask, other=0.0, cache_modifier=".cg"))


@triton.jit
def _cl_stats_chunk(x_ptr, part_ptr, n, sp, split, c_lo, c_hi, s_begin, s_end, C, stride_n, stride_c, stride_s,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of the forward on tokens [s_begin, s_end) and channels [c_lo, c_hi) of sample n."""
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < c_hi
        pivot = tl.load(x_ptr + n * stride_n + offs_c * stride_c, mask=cmask, other=0.0).to(tl.float32)
        acc_s = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_q = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            x, offs_c, offs_s, mask = _load_tile(x_ptr, n, c0, s0, c_hi, s_end, stride_n, stride_c, stride_s,
                                                 BLOCK_C, BLOCK_S)
            d = tl.where(mask, x - pivot[:, None], 0.0)
            acc_s += d
            acc_q += d * d
        base = part_ptr + ((n * split + sp) * 2) * C + offs_c  # part: (N, SPLIT, 2, C)
        tl.store(base, tl.sum(acc_s, axis=1), mask=cmask)
        tl.store(base + C, tl.sum(acc_q, axis=1), mask=cmask)


@triton.jit
def _cl_stats_kernel(x_ptr, part_ptr, C, S, CHUNK, stride_n, stride_c, stride_s,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    n, sp, split, s_begin, s_end = _chunk(S, CHUNK, False)
    _cl_stats_chunk(x_ptr, part_ptr, n, sp, split, 0, C, s_begin, s_end, C, stride_n, stride_c, stride_s,
                    BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _sum_splits(part_ptr, n, split, C, offs_c, cmask, row: tl.constexpr, CG_P2: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """Σ over splits of row ``row`` (0 or 1) of the (N, SPLIT, 2, C) partials, per channel (past
    L1, as _per_channel).

    Reduced once after the loop: a tl.sum inside it, whose result feeds two expressions, crashed
    Triton 3.8's sm_90 pipeline (OptimizeThreadLocality assertion; found by compile_for_sm90)."""
    acc = tl.zeros((CG_P2, BLOCK_P), tl.float32)
    for p0 in range(0, split, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = cmask[:, None] & (offs_p < split)[None, :]
        ptrs = part_ptr + ((n * split + offs_p[None, :]) * 2 + row) * C + offs_c[:, None]
        acc += tl.load(ptrs, mask=m, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=1)


@triton.jit
def _group_totals(part_ptr, n, g, C, G, split, CG_P2: tl.constexpr, BLOCK_P: tl.constexpr):
    """Group (n, g)'s channels and both partial rows summed over splits -> (cg, offs_c, cmask,
    row0, row1)."""
    cg = C // G
    offs_c = g * cg + tl.arange(0, CG_P2)
    cmask = tl.arange(0, CG_P2) < cg
    row0 = _sum_splits(part_ptr, n, split, C, offs_c, cmask, 0, CG_P2, BLOCK_P)
    row1 = _sum_splits(part_ptr, n, split, C, offs_c, cmask, 1, CG_P2, BLOCK_P)
    return cg, offs_c, cmask, row0, row1


@triton.jit
def _cl_group_stats(x_ptr, part_ptr, mean_ptr, rstd_ptr, n, g, C, S, G, split, eps, stride_n, stride_c,
                    CG_P2: tl.constexpr, BLOCK_P: tl.constexpr):
    """Mean and rstd of group (n, g) from its channels' partials, stored at n·G + g."""
    cg, offs_c, cmask, sd, sq = _group_totals(part_ptr, n, g, C, G, split, CG_P2, BLOCK_P)
    p = tl.load(x_ptr + n * stride_n + offs_c * stride_c, mask=cmask, other=0.0).to(tl.float32)
    s_f = S.to(tl.float32)
    m = (cg * S).to(tl.float32)
    mean = tl.sum(tl.where(cmask, sd + s_f * p, 0.0), axis=0) / m
    dev = p - mean
    var = tl.sum(tl.where(cmask, sq + 2.0 * dev * sd + s_f * dev * dev, 0.0), axis=0) / m
    tl.store(mean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps))


@triton.jit
def _cl_stats_finalize_kernel(x_ptr, part_ptr, mean_ptr, rstd_ptr, C, S, G, split, eps, stride_n, stride_c,
                              CG_P2: tl.constexpr, BLOCK_P: tl.constexpr):
    ng = tl.program_id(0)
    _cl_group_stats(x_ptr, part_ptr, mean_ptr, rstd_ptr, ng // G, ng % G, C, S, G, split, eps, stride_n, stride_c,
                    CG_P2, BLOCK_P)


@triton.jit
def _cl_fwd_chunk(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, n, c_lo, c_hi, s_begin,
                  s_end, C, G, stride_n, stride_c, stride_s,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2 of the forward on tokens [s_begin, s_end) and channels [c_lo, c_hi) of sample n."""
    cg = C // G
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mean, rstd = _per_channel(mean_ptr, rstd_ptr, n, offs_c, cg, G, offs_c < c_hi)
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            x, offs_c, offs_s, mask = _load_tile(x_ptr, n, c0, s0, c_hi, s_end, stride_n, stride_c, stride_s,
                                                 BLOCK_C, BLOCK_S)
            _normalize_store(x, mean[:, None], rstd[:, None], n, offs_c, offs_s, mask, C, y_ptr, w_ptr, b_ptr,
                             scale_ptr, shift_ptr, stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU)


@triton.jit
def _cl_fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, G, CHUNK,
                   stride_n, stride_c, stride_s,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    n, sp, split, s_begin, s_end = _chunk(S, CHUNK, True)
    _cl_fwd_chunk(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, n, 0, C, s_begin, s_end, C,
                  G, stride_n, stride_c, stride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _cl_bwd_reduce_chunk(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                         n, sp, split, c_lo, c_hi, s_begin, s_end, C, G,
                         stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of the backward on tokens [s_begin, s_end) and channels [c_lo, c_hi) of sample n."""
    cg = C // G
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < c_hi
        mean, rstd = _per_channel(mean_ptr, rstd_ptr, n, offs_c, cg, G, cmask)
        acc_a = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        acc_b = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            xhat, dm, f, w, offs_c, offs_s, mask = _bwd_tile(
                x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean[:, None], rstd[:, None], n, c0, s0, c_hi,
                s_end, C, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S)
            acc_a += dm
            acc_b += dm * xhat
        base = part_ptr + ((n * split + sp) * 2) * C + offs_c
        tl.store(base, tl.sum(acc_a, axis=1), mask=cmask)
        tl.store(base + C, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _cl_bwd_reduce_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                          C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    n, sp, split, s_begin, s_end = _chunk(S, CHUNK, False)
    _cl_bwd_reduce_chunk(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr,
                         n, sp, split, 0, C, s_begin, s_end, C, G, stride_n, stride_c, stride_s,
                         dstride_n, dstride_c, dstride_s, HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


@triton.jit
def _cl_bwd_group_sums(part_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr, n, g, C, G, split,
                       HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, CG_P2: tl.constexpr, BLOCK_P: tl.constexpr):
    """Group (n, g): A, B per channel (the parameter gradients' sums) and g1 = Σ_c w·f·A,
    g2 = Σ_c w·f·B."""
    cg, offs_c, cmask, a, b = _group_totals(part_ptr, n, g, C, G, split, CG_P2, BLOCK_P)
    tl.store(suma_ptr + n * C + offs_c, a, mask=cmask)
    tl.store(sumb_ptr + n * C + offs_c, b, mask=cmask)
    wf = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32) if HAS_W else cmask.to(tl.float32)
    if HAS_MOD:
        wf = wf * (1.0 + tl.load(scale_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32))
    tl.store(g1_ptr + n * G + g, tl.sum(wf * a, axis=0))
    tl.store(g2_ptr + n * G + g, tl.sum(wf * b, axis=0))


@triton.jit
def _cl_bwd_finalize_kernel(part_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr, C, G, split,
                            HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, CG_P2: tl.constexpr,
                            BLOCK_P: tl.constexpr):
    ng = tl.program_id(0)
    _cl_bwd_group_sums(part_ptr, w_ptr, scale_ptr, suma_ptr, sumb_ptr, g1_ptr, g2_ptr, ng // G, ng % G, C, G, split,
                       HAS_W, HAS_MOD, CG_P2, BLOCK_P)


@triton.jit
def _cl_bwd_dx_chunk(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr,
                     n, c_lo, c_hi, s_begin, s_end, C, S, G,
                     stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Pass 2 of the backward on tokens [s_begin, s_end) and channels [c_lo, c_hi) of sample n."""
    cg = C // G
    inv_m = 1.0 / (cg * S).to(tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < c_hi
        mean, rstd = _per_channel(mean_ptr, rstd_ptr, n, offs_c, cg, G, cmask)
        g1, g2 = _per_channel(g1_ptr, g2_ptr, n, offs_c, cg, G, cmask)
        for s0 in tl.range(s_begin, s_end, BLOCK_S, num_stages=STAGES):
            xhat, dm, f, w, offs_c, offs_s, mask = _bwd_tile(
                x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean[:, None], rstd[:, None], n, c0, s0, c_hi,
                s_end, C, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S)
            dxhat = dm * (f * w)[:, None]
            dx = rstd[:, None] * (dxhat - (g1 * inv_m)[:, None] - xhat * (g2 * inv_m)[:, None])
            ptrs = dx_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
            tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr,
                      C, S, G, CHUNK, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    n, sp, split, s_begin, s_end = _chunk(S, CHUNK, True)
    _cl_bwd_dx_chunk(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr,
                     n, 0, C, s_begin, s_end, C, S, G, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                     HAS_W, HAS_B, HAS_MOD, SILU, BLOCK_C, BLOCK_S, STAGES)


# ---------------------------------------------------------------------------------------
# Launchers (called by group_norm_triton's for channels-last x)
# ---------------------------------------------------------------------------------------


def block_c(C: int) -> int:
    """Channels per block: the largest power of two <= 128 dividing C when that is >= 32 (64+
    contiguous bytes per row in 16-bit, no masked lanes: 96 -> 32, 320 -> 64, 640 -> 128),
    else C rounded up to a power of two (<= 128) with the rest masked."""
    for b in (128, 64, 32):
        if C % b == 0:
            return b
    return min(128, triton.next_power_of_2(C))


def launch_config(x: torch.Tensor, num_groups: int, knobs) -> dict:
    """Blocks and the split along tokens for channels-last x under ``knobs`` (group_norm_triton.Knobs)."""
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    bc = block_c(C)
    bs = max(1, min(triton.next_power_of_2(S), knobs.tile // bc))
    if x.is_cuda:
        target = knobs.programs_per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 3 * N  # interpreter: a few chunks per sample, so the split paths are tested
    split = max(1, min(triton.cdiv(target, N), triton.cdiv(S, bs)))
    chunk = triton.cdiv(triton.cdiv(S, split), bs) * bs
    return {"S": S, "split": triton.cdiv(S, chunk), "chunk": chunk, "BLOCK_C": bc, "BLOCK_S": bs,
            "CG_P2": triton.next_power_of_2(C // num_groups), "num_warps": knobs.num_warps, "STAGES": knobs.stages}


def fwd(x, strides, num_groups, params, flags, eps, cfg):
    """y (channels-last like x) and (mean, rstd) (N, G) fp32."""
    N, C = x.shape[:2]
    G, split = num_groups, cfg["split"]
    y = torch.empty_like(x)
    part = torch.empty(N * split * 2 * C, device=x.device, dtype=torch.float32)
    mean = torch.empty(N, G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = (N, split)
    blocks = {k: cfg[k] for k in ("BLOCK_C", "BLOCK_S", "STAGES", "num_warps")}
    run_kernel(_cl_stats_kernel, grid, x, part, C, cfg["S"], cfg["chunk"], *strides, **blocks)
    run_kernel(_cl_stats_finalize_kernel, (N * G,), x, part, mean, rstd, C, cfg["S"], G, split, eps, strides[0],
               strides[1], CG_P2=cfg["CG_P2"], BLOCK_P=STAT_BLOCK)
    run_kernel(_cl_fwd_kernel, grid, x, y, mean, rstd, *params, C, cfg["S"], G, cfg["chunk"], *strides, **flags,
               **blocks)
    return y, mean, rstd


def bwd(dy, x, strides, dstrides, mean, rstd, num_groups, params, flags, cfg):
    """dx (channels-last like x) and the per-(n, c) sums A, B (N, C) fp32."""
    N, C = x.shape[:2]
    G, split = num_groups, cfg["split"]
    part = torch.empty(N * split * 2 * C, device=x.device, dtype=torch.float32)
    sum_a = torch.empty(N, C, device=x.device, dtype=torch.float32)
    sum_b = torch.empty_like(sum_a)
    g1 = torch.empty(N, G, device=x.device, dtype=torch.float32)
    g2 = torch.empty_like(g1)
    dx = torch.empty_like(x)
    grid = (N, split)
    blocks = {k: cfg[k] for k in ("BLOCK_C", "BLOCK_S", "STAGES", "num_warps")}
    run_kernel(_cl_bwd_reduce_kernel, grid, x, dy, mean, rstd, *params, part, C, cfg["S"], G, cfg["chunk"], *strides,
               *dstrides, **flags, **blocks)
    w_ptr, _, scale_ptr, _ = params
    run_kernel(_cl_bwd_finalize_kernel, (N * G,), part, w_ptr, scale_ptr, sum_a, sum_b, g1, g2, C, G, split,
               HAS_W=flags["HAS_W"], HAS_MOD=flags["HAS_MOD"], CG_P2=cfg["CG_P2"], BLOCK_P=STAT_BLOCK)
    run_kernel(_cl_bwd_dx_kernel, grid, x, dy, dx, mean, rstd, *params, g1, g2, C, cfg["S"], G, cfg["chunk"], *strides,
               *dstrides, **flags, **blocks)
    return dx, sum_a, sum_b
