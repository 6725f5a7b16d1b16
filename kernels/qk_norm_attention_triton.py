"""Triton kernels of :func:`kiln.kernels.qk_norm_attention`: a norm+RoPE pre-pass and flash attention.

Structure (forward):
  1. ``_norm_rope_fwd_kernel`` — one bandwidth-bound pass over Q and K: per-head RMSNorm with the
     token's weight row, rotate-half RoPE, written in the input dtype, plus 1/rms per
     (token, head) in fp32 (4 bytes per 2·D bytes of input) for the backward.
  2. ``_attn_fwd_kernel`` — FlashAttention-2 forward on the normalised tensors: one program per
     (BLOCK_M queries, batch·head), online softmax in base 2 with fp32 statistics, key padding and
     causal masks, log-sum-exp saved for the backward. Its tiles come in through pointer loads
     (cp.async pipelined) or, for the ``tma`` launch candidates on Hopper, through the Tensor
     Memory Accelerator (host tensor descriptors; sm_90a code: UTMALDG, no per-thread tile loads),
     and for the ``ws`` candidates warp-specialised as FlashAttention-3 is: Triton's Hopper pass
     (``tl.range(warp_specialize=True)``) turns the key loop into a producer warp group that only
     issues TMA copies and two consumer warp groups with 64 query rows each, registers moved to
     the consumers (setmaxnreg 232 / 40), and for the ``overlap`` candidates one key block ahead,
     so that each block's softmax runs while the previous block's P·V is on the tensor cores
     (FlashAttention-3's intra-warpgroup overlap, _fwd_block_overlap). Which is faster is the
     autotuner's measurement on the GPU.
Backward: ``_bwd_delta_kernel`` (rowsum(dO·O) per query), ``_attn_bwd_dkdv_kernel`` (one
program per key block, loops over queries) and
``_attn_bwd_dq_kernel`` (one per query block, loops over keys; both warp-specialised in their
``ws`` candidates, dK/dV then computed transposed, keys as the rows the consumers split) — no
atomics, so gradients are deterministic — or, in the "atomic" backward, the dkdv kernel alone,
adding each query block's dQ share into an fp32 buffer with atomics as FlashAttention-2 does (5
matmuls instead of 7; which of the two runs is timed by the autotuner, see ``_bwd_mode``),
then ``_norm_rope_bwd_kernel`` maps dQ̂, dK̂ back
through RoPE and the norm and writes per-program partial sums of the norm-weight gradients
(reduced over tokens in torch).
The normalised Q̂, K̂ are recomputed by the pre-pass in the backward instead of being saved: one
more bandwidth-bound pass saves 2·B·S·H·D elements of activation memory per attention.

Why a pre-pass rather than fusing the norm into the attention prologue: every K tile is read by
S/BLOCK_M query programs, so a fused K norm would redo the norm and the rotate-half gather that
many times, while the pre-pass reads and writes Q and K once (~4·B·S·H·D·2 bytes; at S=4096,
H·D=3072, B=1 that is ~0.1 GB, ~35 µs at 3 TB/s, against ~1.2 ms of attention FLOPs at
450 TFLOP/s). This is the design's arithmetic, not yet a measurement on a GPU: the benchmark
(benchmarks/attention.py) has the providers to check it.

Masks use a finite -1e30 (not -inf), so a block whose keys are all masked cannot produce
inf - inf = NaN. In the non-causal forward, keys past S and padded keys are a per-key -1e30 bias on
the raw scores (_key_bias: an add a score instead of compares and selects; a row's first valid
key's block rescale wipes any all-masked block before it, and a batch row with no valid key at all
ends with the bias as its max: the epilogue writes it as zeros); causal rows and the backward zero
masked probabilities explicitly, so a causal query with no valid key at all ends with l = 0 and is
written as zeros (the reference's definition; the contract asks for a valid key in every row).

Interpreter note: under TRITON_INTERPRET=1, bf16 tl.dot and bf16 arithmetic are wrong
(ENVIRONMENT.md), so bf16 inputs are upcast to fp32 before every dot there (``UPCAST``); on a GPU
the dots run in the input dtype on tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from kiln.kernels.autotune import LaunchConfig, choose, results_agree, run_kernel, size_class, uses_default

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for masked scores (a constexpr: kernels read it)
BLOCK_T = 16  # tokens per pre-pass program
DELTA_BLOCK = 64  # queries per program of the backward's rowsum(dO · O)


def _interpreter_descriptor_add() -> None:
    """Give Triton's interpreter the descriptor reduction it lacks (3.6 and 3.8: ``desc.atomic_add``
    reaches ``InterpreterBuilder.create_descriptor_reduce``, which is not there), so the TMA dQ
    adds run on CPU as on the GPU, through the same box coordinates. The interpreter runs one
    program at a time, so the box's load + add + store is the reduction exactly; ADD only, the
    one kiln uses. Nothing changes where Triton has its own."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != interpreter._ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind} in the interpreter (kiln adds only)")
        old = self.create_descriptor_load(desc, indices, None, None)
        return self.create_descriptor_store(desc, interpreter.TensorHandle(old.data + value.data, old.dtype), indices)

    builder.create_descriptor_reduce = create_descriptor_reduce


_interpreter_descriptor_add()


# Candidate (BLOCK_M, BLOCK_N, warps, stages[, tma[, ws | overlap]]) per kernel, 16-bit inputs; the
# first is the default. ``tma`` candidates load their Q, K, V (and dO) tiles with the Tensor Memory
# Accelerator (host-built tensor descriptors over the (B, S, H·D) view; rows past S come back as
# zeros, as the masked loads give) instead of per-thread loads plus cp.async: they run where
# _tma_ok holds. ``ws`` candidates are also warp-specialised (LaunchConfig.ws): 4 warps per
# consumer group, 12 launched; 128 rows split 64 / 64 (BLOCK_M queries in fwd and dq, BLOCK_N keys
# in dkdv). ``overlap`` forward candidates run one key block ahead (_fwd_block_overlap). Each is
# compiled for sm_90a in CI with a real launch's specialisation (compile_for_sm90), with and
# without the pad mask, and has no spills (also under the GPU machine's Triton 3.6, checked on
# 2026-12-02), HGMMA (warpgroup) dots, 16-byte or TMA tile loads, and issues exactly its dots' MMA
# work a loop trip.
# That last rule (2026-12-02, sm90.mma_loop_ops' "hgmma_macs"): a 64-row score tile at 8 warps gets
# Triton's layout of 8 warps along the rows (it does so for a dot whose result feeds another),
# and a warpgroup MMA covers 64 rows, so both warp groups computed the same Q·K^T and dO·V^T: 1.5x
# the MMA work in dkdv at BLOCK_M = 64 (the old D = 128 default, 64x64/w8), 1.67x in dq's 64x64/w8
# (also a default), 1.4x in the atomic 64x64/w8 ones. Now 64-row tiles run at 4 warps and 8-warp
# ones take 128 rows; the one exception is dkdv at D = 256 (ALLOWED_REPLICATION).
# Dropped on that evidence: BLOCK_M = 32 in the backward (its dots fall back to HMMA, the
# pre-Hopper path), 128-row tiles at 4 warps for D = 128 (240-544 bytes spilled), the old D = 256
# default 32x32 (HMMA only), warp-specialised dK/dV with 128 queries per step (3 KB spilled) or 3
# stages at D = 128 (40 bytes), and warp-specialised dq at D = 256 (only 32-key steps fit, in 226
# of the 227 KiB of shared memory), the pointer dq 128x64/w4/s3 at D = 64 (0 spills under Triton
# 3.8, 32 bytes under the GPU machine's 3.6), and every replicating candidate above, with the
# D = 256 dkdv TMA and dq 64x64 pointer tiles, which also spilled without the pad mask (20-72
# bytes). Which candidate wins is for the GPU to say (kernels/autotune.py).
_C = LaunchConfig
_WS = dict(tma=True, ws=True)
_OVL = dict(tma=True, overlap=True)
ATTN_CANDIDATES = {
    # D <= 64
    ("fwd", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(128, 64, 4, 3),
                  _C(128, 64, 8, 3, tma=True), _C(128, 128, 8, 3, tma=True),
                  _C(128, 64, 8, 3, **_OVL), _C(128, 128, 8, 3, **_OVL),
                  _C(128, 64, 4, 3, **_WS), _C(128, 128, 4, 2, **_WS)],
    ("dkdv", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 3, tma=True),
                   _C(128, 128, 8, 2, tma=True), _C(64, 128, 4, 3, **_WS)],
    ("dq", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 4, 3),
                 _C(128, 64, 8, 3, tma=True), _C(128, 64, 4, 3, **_WS), _C(128, 128, 4, 2, **_WS)],
    # 64 < D <= 128: dkdv's 64x64 at 4 warps holds dK, dV and the K, V tiles in 242 registers (255
    # under 3.6) with 2 stages, 128 queries a step at 8 warps in 195-250. Its default is the
    # 2-stage one measured on an H100 (benchmarks/results/README.md, 2026-12-02); the 1-stage one
    # (unpipelined loads: 112 KB of shared memory, 181 KB with 2) was the default while pre-Hopper
    # GPUs shared these lists, and stays a candidate
    ("fwd", 128): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 64, 8, 4),
                   _C(128, 64, 8, 3, tma=True), _C(128, 64, 8, 4, tma=True), _C(128, 128, 8, 2, tma=True),
                   _C(128, 64, 8, 3, **_OVL), _C(128, 128, 8, 2, **_OVL),
                   _C(128, 64, 4, 3, **_WS), _C(128, 128, 4, 2, **_WS)],
    ("dkdv", 128): [_C(128, 64, 8, 2), _C(128, 64, 8, 1), _C(64, 64, 4, 1), _C(128, 64, 8, 2, tma=True),
                    _C(64, 64, 4, 2, tma=True), _C(64, 128, 4, 2, **_WS)],
    ("dq", 128): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3),
                  _C(128, 64, 8, 3, tma=True), _C(128, 64, 4, 3, **_WS), _C(128, 128, 4, 2, **_WS)],
    # the "atomic" backward's dkdv kernel (dQ added with fp32 atomics, see _bwd_mode): its dQ tile
    # takes registers. ``bulk-dq`` ones add their dQ tiles by TMA bulk reduction (_dq_atomic_add),
    # 20-32 registers fewer, with their per-thread TMA twins as the control (at D = 64). At D = 128
    # the 64-query tiles at 8 warps replicate (1.4x the MMA work), 4 warps spill 8-288 bytes, and
    # 128 queries a step fit only per-thread (255 registers, no spill under 3.8 or 3.6, 225 KB of
    # shared memory; bulk-dq's staged 128x128 fp32 tile takes it to 241 KB, over the 227 KB).
    # At D = 64 the 128-key 64x128/w8/s2 spilled 8-32 bytes (dropped); 128x64/w8/s3 bulk-dq is
    # spill-free (184 registers). At D = 256 every candidate spills (516+ bytes) and there is none;
    # nor a warp-specialised one (the pass fails on the atomics, see _attn_bwd_dkdv_kernel)
    ("dkdv_dq", 64): [_C(64, 64, 4, 3), _C(64, 64, 4, 3, tma=True), _C(64, 64, 4, 3, tma=True, bulk_dq=True),
                      _C(128, 64, 8, 3, tma=True, bulk_dq=True)],
    ("dkdv_dq", 128): [_C(128, 64, 8, 2, tma=True)],
    ("dkdv_dq", 256): [],
    # 128 < D <= 256: two stages (three need > 227 KB of shared memory at 64x64); the forward's
    # pointer 64x64 at 4 warps (255 registers) spills 64 bytes since its row max moved to unscaled
    # scores (2026-12-02): dropped. dkdv keeps its replicating 64x64/w8 (ALLOWED_REPLICATION)
    ("fwd", 256): [_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 64, 4, 2, tma=True), _C(128, 64, 8, 2, tma=True),
                   _C(128, 32, 8, 2, **_OVL), _C(128, 64, 4, 2, **_WS)],
    ("dkdv", 256): [_C(64, 64, 8, 2)],
    ("dq", 256): [_C(128, 32, 8, 2), _C(128, 16, 8, 2), _C(128, 32, 8, 2, tma=True)],
}
# (kernel, D bucket) whose candidates may issue more MMA work than their dots: dkdv at D = 256, where
# 128 queries a step need 64 KB a stage for each of Q and dO (256 KB at 2 stages) and 4 warps hold
# dK and dV in 256 fp32 registers a thread; its 64x64/w8 computes Q·K^T and dO·V^T twice (1.5x)
ALLOWED_REPLICATION = {("dkdv", 256)}
# fp32 takes full-precision FMA dots (no tensor cores): the correctness path (deterministic fp32
# runs), small tiles, a list per head-dim bucket. Triton's FMA dots hold both operands' slices in
# registers, so staging (stages > 1) often costs more registers than it hides: one list for all
# head dims (fwd 32x32/w4/s3, dK/dV 32x32/w8/s3, ...) spilled at D = 128 (1.9 KB in the forward,
# 1.4 KB in dK/dV) and D = 256 (sm_90a, triton 3.8, 2026-12-06). Every candidate below compiles
# spill-free for sm_90a and sm_80 under triton 3.8 (checked in CI at D = 64, 128 and 256) and 3.6,
# and for sm_100a and sm_120a under 3.8 (CI too, arch_defaults) and 3.6, the
# first with the most work a program where registers allowed; the second is smaller: it fits a
# 99 KB GPU where the first does not (see below), elsewhere it is one more for the autotuner.
FP32_CANDIDATES = {
    ("fwd", 64): [_C(64, 32, 8, 1), _C(32, 16, 8, 1)],  # 90 / 64 registers; 32x32/w8/s1 8 bytes on sm_100a (3.6)
    ("dkdv", 64): [_C(32, 32, 8, 1), _C(32, 16, 8, 1)],  # 108 / 52
    ("dq", 64): [_C(64, 32, 8, 2), _C(32, 32, 8, 3)],  # 88 / 64
    ("dkdv_dq", 64): [_C(32, 16, 8, 1), _C(16, 32, 8, 1)],  # 61 / 64
    ("fwd", 128): [_C(32, 16, 8, 3), _C(32, 16, 8, 1)],  # 77 / 62
    ("dkdv", 128): [_C(16, 32, 8, 1), _C(16, 16, 8, 1)],  # 90 / 64; 32x32/w8/s1 spills 408 bytes under 3.6
    ("dq", 128): [_C(32, 32, 8, 3), _C(32, 16, 8, 2)],  # 78 / 76; the first takes 100 KB
    # 16x16/w8/s1 spills 8-24 bytes on sm_80 (3.6), 16x32/w8/s1 8 on sm_120a
    ("dkdv_dq", 128): [_C(32, 16, 8, 1), _C(16, 16, 4, 1)],  # 104 / 116
    ("fwd", 256): [_C(32, 16, 8, 2), _C(16, 16, 4, 2)],  # 98 / 119; 16x16/w8/s2 8 bytes on sm_120a
    ("dkdv", 256): [_C(32, 16, 8, 1), _C(16, 16, 8, 1)],  # 108 / 90; 98 KB / 65 KB
    ("dq", 256): [_C(32, 16, 8, 2), _C(16, 16, 8, 2)],  # 118 / 64; 98 KB / 65 KB
    ("dkdv_dq", 256): [_C(32, 16, 8, 1), _C(16, 16, 8, 1)],  # 159 / 110; 98 KB / 65 KB
}
# Pre-Hopper GPUs (sm_80 / sm_86 / sm_89: HMMA dots, no TMA) have 16-bit lists of their own: the
# lists above are Hopper's, and compiled for sm_80 (Triton 3.8, 2026-12-06) some spilled there, the
# worst of them the only dK/dV candidate at D = 256 (64x64/w8/s2: 19-21 KB, at 32 registers) and
# dK/dV 128x64/w8/s2 at D = 128 (18-20 KB); smaller spills in fwd at D = 256 (24-208 bytes),
# dK/dV at D = 64 and 128 (12-376) and dq at D = 128 and 256 (12-212); and at D = 256 no 16-bit
# backward fitted a 99 KB GPU. Each candidate below compiles for sm_80 without spills, with and
# without the pad mask, under Triton 3.8 and 3.6 (CI checks it, arch_defaults), picked from a
# scan of tiles (16-128 x 16-128, 4 / 8 warps, 1-4 stages) for the most work a program: the first fits an
# A100 (163 KB a program), and one of each fits the 99 KB of an sm_86 / sm_89 GPU (RTX 3090 / 4090,
# A10, L4, L40S), which takes the first that fits (autotune.fitting; shared memory in KB after
# each, where it decides that). The forward lists at D <= 128 are Hopper's pointer tiles, which
# were spill-free there. Which one is fastest is the autotuner's timing on such a GPU.
PRE_HOPPER_CANDIDATES = {
    ("fwd", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(128, 64, 4, 3)],
    ("dkdv", 64): [_C(128, 32, 8, 3), _C(128, 32, 8, 2), _C(128, 32, 4, 1)],  # 64 keys: 128x64/w8/s1 60 bytes (3.6)
    ("dq", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3)],
    ("dkdv_dq", 64): [_C(32, 128, 8, 1), _C(128, 32, 8, 1)],  # Hopper's 64x64/w4/s3: 48 bytes (3.6)
    ("fwd", 128): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 64, 8, 4)],  # 88 / 96 / 128
    ("dkdv", 128): [_C(128, 64, 8, 1), _C(64, 64, 8, 1), _C(128, 32, 8, 1)],  # 112 / 72 / 88
    ("dq", 128): [_C(64, 64, 4, 3), _C(128, 32, 8, 3), _C(64, 64, 8, 2)],  # 104 / 96 / 72
    ("dkdv_dq", 128): [],  # (Hopper's one is a TMA tile: the separate backward runs)
    ("fwd", 256): [_C(64, 64, 8, 2), _C(64, 32, 8, 2), _C(32, 64, 8, 2)],  # 104 / 68 / 84
    ("dkdv", 256): [_C(64, 32, 8, 1), _C(16, 64, 8, 1), _C(32, 32, 8, 1)],  # 100 / 82 / 66
    ("dq", 256): [_C(64, 64, 8, 2), _C(64, 32, 8, 1), _C(64, 16, 8, 2)],  # 136 / 96 / 82
    ("dkdv_dq", 256): [],
}
# Datacenter Blackwell (sm_100 / sm_103: B200, GB200, B300; TMA, dots on tcgen05 into tensor
# memory, 227 KB a program) takes Hopper's candidates that Triton 3.8 builds cleanly for sm_100a
# (2026-12-06, with and without the pad mask; registers and stack from Triton's own cubin, see
# sm90.resource_usage): 0 bytes of stack, the dots on tcgen05.mma, within 227 KB. Left out: the
# warp-specialised ones (that pass is Hopper's design: on sm_100a the D = 128 / 256 forwards
# spill 336 / 1,536 bytes, and dK/dV at D = 128 and dq 128x128 build to 4 registers with no MMA
# at all), dK/dV 128x64/w8/s2 at D = 128 (257 KB, pointer and TMA), the atomic dK/dV at D = 128
# (273 KB: the separate backward runs), the pointer atomic 64x64/w4/s3 at D = 64 (16 bytes of
# stack) and the pointer forwards 128x64/w8/s3 and 128x128/w8/s3 at D = 64 (8 bytes each under the
# GPU machine's Triton 3.6; every other one has none there either); dK/dV at D = 256 (Hopper's
# one needs 273 KB) takes the pre-Hopper list (160 / 96 / 66 KB). No B200 has timed any of them;
# the autotuner does, on the first one that runs there.
SM100_CANDIDATES = {
    ("fwd", 64): [_C(64, 64, 4, 3), _C(128, 64, 4, 3), _C(128, 64, 8, 3, tma=True), _C(128, 128, 8, 3, tma=True),
                  _C(128, 64, 8, 3, **_OVL), _C(128, 128, 8, 3, **_OVL)],
    ("dkdv", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 3, tma=True),
                   _C(128, 128, 8, 2, tma=True)],
    ("dq", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 4, 3), _C(128, 64, 8, 3, tma=True)],
    ("dkdv_dq", 64): [_C(64, 64, 4, 3, tma=True), _C(64, 64, 4, 3, tma=True, bulk_dq=True),
                      _C(128, 64, 8, 3, tma=True, bulk_dq=True)],
    ("fwd", 128): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 64, 8, 4), _C(128, 64, 8, 3, tma=True),
                   _C(128, 64, 8, 4, tma=True), _C(128, 128, 8, 2, tma=True),
                   _C(128, 64, 8, 3, **_OVL), _C(128, 128, 8, 2, **_OVL)],
    ("dkdv", 128): [_C(128, 64, 8, 1), _C(64, 64, 4, 1), _C(64, 64, 4, 2, tma=True)],
    ("dq", 128): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(128, 64, 8, 3, tma=True)],
    ("dkdv_dq", 128): [],
    ("fwd", 256): [_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 64, 4, 2, tma=True), _C(128, 64, 8, 2, tma=True),
                   _C(128, 32, 8, 2, **_OVL)],
    ("dkdv", 256): PRE_HOPPER_CANDIDATES[("dkdv", 256)],
    ("dq", 256): [_C(128, 32, 8, 2), _C(128, 16, 8, 2), _C(128, 32, 8, 2, tma=True)],
    ("dkdv_dq", 256): [],
}
# Consumer Blackwell (sm_120: RTX 5090, RTX PRO 6000; HMMA dots as before Hopper, 99 KB a
# program) takes pointer tiles that build cleanly for sm_120a (Triton 3.8, 2026-12-06; checked as
# above). Hopper's lists were no use there: their TMA and warp-specialised tiles spilled 8 bytes
# to 8 KB (dq 128x32/w8/s2/tma at D = 256) and the warp-specialised forwards fail Triton's pass
# pipeline; of the pre-Hopper lists, five candidates spill on sm_120a (16-104 bytes) and the ones
# over 99 KB never fit. What is left, in order of work a program, with the KB each takes:
SM120_CANDIDATES = {
    ("fwd", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3)],  # 40 / 48
    ("dkdv", 64): [_C(128, 32, 8, 2), _C(128, 32, 4, 1)],  # 49 / 48
    ("dq", 64): [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3)],  # 48 / 64 / 48
    ("dkdv_dq", 64): [_C(32, 128, 8, 1), _C(128, 32, 8, 1)],  # 68 / 52
    ("fwd", 128): [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],  # 96 / 88
    ("dkdv", 128): [_C(128, 32, 8, 1), _C(64, 64, 8, 1)],  # 88 / 72
    ("dq", 128): [_C(128, 32, 8, 3), _C(64, 64, 8, 2)],  # 96 / 72
    ("dkdv_dq", 128): [],
    ("fwd", 256): [_C(64, 32, 8, 2)],  # 68
    ("dkdv", 256): [_C(16, 64, 8, 1), _C(32, 32, 8, 1)],  # 82 / 66
    ("dq", 256): [_C(64, 32, 8, 1), _C(64, 16, 8, 2)],  # 96 / 82
    ("dkdv_dq", 256): [],
}
# 16-bit candidate lists per GPU family (_arch), and the shared memory a program may take on each
# family's GPUs, for the CI check that every kernel has a default there (arch_defaults; Hopper's
# 227 KB is checked with its sm_90a compiles)
ARCH_CANDIDATES = {"sm80": PRE_HOPPER_CANDIDATES, "sm90": ATTN_CANDIDATES, "sm100": SM100_CANDIDATES,
                   "sm120": SM120_CANDIDATES}
ARCH_SHARED = {
    "sm80": {"sm_80 (A100)": 163 * 1024, "sm_86 / sm_89 (RTX 3090 / 4090, A10, L4, L40S)": 99 * 1024},
    "sm100": {"sm_100 / sm_103 (B200, GB200, B300)": 227 * 1024},
    "sm120": {"sm_120 (RTX 5090, RTX PRO 6000)": 99 * 1024},
}


def attn_candidates(kernel: str, dtype: torch.dtype, D: int, tma: bool = False,
                    arch: str = "sm90") -> list[LaunchConfig]:
    """Launch-config candidates of attention kernel ``kernel`` ("fwd", "dkdv", "dq", "dkdv_dq": dkdv
    adding dQ with atomics) on a GPU of family ``arch`` (:func:`_arch`; its 16-bit lists in
    ARCH_CANDIDATES, fp32 the same everywhere): the TMA ones only when ``tma`` (the tensors allow
    descriptors, see :func:`_tma_ok`), the warp-specialised ones unless ``KILN_ATTN_WS=0`` (a
    switch for a Triton whose warp specialisation misbehaves), the bulk-dq ones unless
    ``KILN_ATTN_BULK_DQ=0`` (likewise for its TMA bulk reductions), the overlapped forward ones
    unless ``KILN_ATTN_OVERLAP=0``."""
    bucket = 64 if D <= 64 else 128 if D <= 128 else 256
    if dtype == torch.float32:
        return FP32_CANDIDATES[(kernel, bucket)]
    off = {flag for flag, env in (("ws", "KILN_ATTN_WS"), ("bulk_dq", "KILN_ATTN_BULK_DQ"),
                                  ("overlap", "KILN_ATTN_OVERLAP")) if os.environ.get(env, "1") == "0"}
    cands = ARCH_CANDIDATES[arch][(kernel, bucket)]
    return [c for c in cands if (tma or not c.tma) and not any(getattr(c, flag) for flag in off)]


def tuning_key(kernel: str, q: torch.Tensor, flags: tuple, tma: bool) -> tuple:
    """Autotuner key: (kernel, dtype, D, has_pad, causal, tma, S class, B·H class)."""
    B, S, H, D = q.shape
    return (kernel, str(q.dtype).removeprefix("torch."), D, *flags, tma, size_class(S), size_class(B * H))


def _pick(kernel: str, q: torch.Tensor, flags: tuple, launch, tma: bool = False) -> LaunchConfig:
    """The launch config for ``kernel``. ``launch`` returns the tensors it wrote: a candidate whose
    results disagree with the default's is not used (autotune.choose)."""
    key = tuning_key(kernel, q, flags, tma)
    return choose(key, _candidates(kernel, q, tma), launch, q, agree=results_agree)


def _candidates(kernel: str, q: torch.Tensor, tma: bool) -> list[LaunchConfig]:
    return attn_candidates(kernel, q.dtype, q.shape[3], tma, arch=_arch(q))


# compute capability major -> candidate family; 8.x and any other (pointer tiles on HMMA dots run
# on every GPU Triton's 16-bit dots support) -> "sm80". sm_103 and sm_110 build as sm_100a does
# (three candidates spot-checked, 2026-12-06: tcgen05 dots, the same shared memory, no stack)
_ARCH_OF_MAJOR = {9: "sm90", 10: "sm100", 11: "sm100", 12: "sm120"}


def _arch(t: torch.Tensor) -> str:
    """The candidate family (ARCH_CANDIDATES) of ``t``'s GPU: "sm90" (Hopper; also the
    interpreter's, CPU tensors), "sm100" (datacenter Blackwell, compute capability 10.x / 11.x),
    "sm120" (consumer Blackwell, 12.x), "sm80" (Ampere and Ada, 8.x, and anything else)."""
    if not t.is_cuda:
        return "sm90"
    return _ARCH_OF_MAJOR.get(torch.cuda.get_device_capability(t.device)[0], "sm80")


def _upcast(dtype: torch.dtype) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dots (tl.dot's default TF32 keeps 10 mantissa bits, ~1e-3
    # relative, 100x PyTorch's fp32 attention error); fp16/bf16 dots are exact products anyway
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Pre-pass: RMSNorm (weight row per token) + rotate-half RoPE
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rot_index(d, HALF: tl.constexpr):
    # rotate_half([a, b]) = [-b, a]: position d reads d + HALF (negated) or d - HALF
    return tl.where(d < HALF, d + HALF, d - HALF), tl.where(d < HALF, -1.0, 1.0)


@triton.jit
def _weight_rows(w_ptr, g, swg, cols, mask, G, HAS_GROUP: tl.constexpr):
    """fp32 weights (BLOCK_T, len(cols)) of the tokens' groups g. A g outside [0, G) (a bad
    token_group: values are checked on the host only for CPU tensors, where it costs no GPU sync)
    gives NaN, where it read past the (G, D) weight."""
    if HAS_GROUP:
        ok = (g >= 0) & (g < G)
        w = tl.load(w_ptr + g[:, None] * swg + cols[None, :], mask=mask & ok[:, None], other=0.0).to(tl.float32)
        return tl.where(ok[:, None], w, float("nan"))
    return tl.load(w_ptr + g[:, None] * swg + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _norm_rope_fwd_kernel(
    x_ptr, w_ptr, g_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
    n_tok, S, G, sxb, sxs, sxh, sxd, sob, sos, soh, sod, swg, sc_s, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_GROUP: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid, h = tl.program_id(0), tl.program_id(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # flat (b, s) token index
    d = tl.arange(0, BLOCK_D)
    tm, dm = t < n_tok, d < D
    m2 = tm[:, None] & dm[None, :]
    b, s = t // S, t % S
    base = b * sxb + s * sxs + h * sxh
    x = tl.load(x_ptr + base[:, None] + d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_T,)
    g = tl.load(g_ptr + s, mask=tm, other=0) if HAS_GROUP else tl.zeros_like(s)
    w = _weight_rows(w_ptr, g, swg, d, m2, G, HAS_GROUP)
    y = x * rstd[:, None] * w
    if HAS_ROPE:
        dr, sign = _rot_index(d, D // 2)
        xr = tl.load(x_ptr + base[:, None] + dr[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        wr = _weight_rows(w_ptr, g, swg, dr, m2, G, HAS_GROUP)
        c = tl.load(cos_ptr + s[:, None] * sc_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + s[:, None] * sc_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
        y = y * c + sign[None, :] * (xr * rstd[:, None] * wr) * sn
    obase = b * sob + s * sos + h * soh
    tl.store(out_ptr + obase[:, None] + d[None, :] * sod, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(rstd_ptr + t * tl.num_programs(1) + h, rstd, mask=tm)


@triton.jit
def _norm_rope_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, g_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, dw_ptr,
    n_tok, S, G, sxb, sxs, sxh, sxd, sdb, sds, sdh, sdd, swg, sc_s,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_GROUP: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid, h = tl.program_id(0), tl.program_id(1)
    H = tl.num_programs(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tm, dm = t < n_tok, d < D
    m2 = tm[:, None] & dm[None, :]
    b, s = t // S, t % S
    dbase = b * sdb + s * sds + h * sdh
    dy = tl.load(dy_ptr + dbase[:, None] + d[None, :] * sdd, mask=m2, other=0.0).to(tl.float32)
    if HAS_ROPE:
        # y_out = y·cos + R(y)·sin, R^T z = -sign · z[rot]  =>  dy = g·cos - sign · (g·sin)[rot]
        dr, sign = _rot_index(d, D // 2)
        dyr = tl.load(dy_ptr + dbase[:, None] + dr[None, :] * sdd, mask=m2, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + s[:, None] * sc_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
        snr = tl.load(sin_ptr + s[:, None] * sc_s + dr[None, :], mask=m2, other=0.0).to(tl.float32)
        dy = dy * c - sign[None, :] * dyr * snr
    xbase = b * sxb + s * sxs + h * sxh
    x = tl.load(x_ptr + xbase[:, None] + d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + t * H + h, mask=tm, other=0.0)
    g = tl.load(g_ptr + s, mask=tm, other=0) if HAS_GROUP else tl.zeros_like(s)
    w = _weight_rows(w_ptr, g, swg, d, m2, G, HAS_GROUP)  # a bad group's rows: NaN dx, no dw part
    xhat = x * rstd[:, None]
    dxhat = dy * w
    dx = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / D)[:, None])
    tl.store(dx_ptr + t[:, None] * (H * D) + h * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)
    # partial weight gradients of this program, one row per group: dw_ptr (programs, H, G, D)
    prog = pid * H + h
    for gi in range(G):
        part = tl.sum(tl.where((g == gi)[:, None], dy * xhat, 0.0), axis=0)
        tl.store(dw_ptr + (prog * G + gi) * D + d, part, mask=dm)


def _strides4(x):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _group_args(weight: torch.Tensor, token_group: torch.Tensor | None, x: torch.Tensor):
    w2 = weight if weight.dim() == 2 else weight[None]
    has_group = w2.shape[0] > 1 and token_group is not None
    # tables and groups may live elsewhere (the CPU), as the csrc ops and the reference allow
    g = (token_group.to(device=x.device, dtype=torch.int32).contiguous() if has_group
         else torch.zeros(1, dtype=torch.int32, device=x.device))
    return w2.contiguous(), g, has_group


def norm_rope_fwd(x, weight, token_group, cos, sin, eps):
    """(B, S, H, D) -> normalised + rotated (B, S, H, D) in x.dtype, and rstd (B, S, H) fp32."""
    B, S, H, D = x.shape
    out = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B, S, H), dtype=torch.float32, device=x.device)
    w2, g, has_group = _group_args(weight, token_group, x)
    has_rope = cos is not None
    c = cos.to(x.device).contiguous() if has_rope else w2
    sn = sin.to(x.device).contiguous() if has_rope else w2
    grid = (triton.cdiv(B * S, BLOCK_T), H)
    _norm_rope_fwd_kernel[grid](
        x, w2, g, c, sn, out, rstd, B * S, S, w2.shape[0], *_strides4(x), *_strides4(out), w2.stride(0),
        c.stride(0) if has_rope else 0, eps, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=BLOCK_T,
        HAS_GROUP=has_group, HAS_ROPE=has_rope,
    )
    return out, rstd


def norm_rope_bwd(dy, x, weight, token_group, cos, sin, rstd):
    """Gradients of :func:`norm_rope_fwd`: dx (B, S, H, D) in x.dtype and dweight (like weight)."""
    B, S, H, D = x.shape
    w2, g, has_group = _group_args(weight, token_group, x)
    G = w2.shape[0] if has_group else 1
    has_rope = cos is not None
    c = cos.to(x.device).contiguous() if has_rope else w2
    sn = sin.to(x.device).contiguous() if has_rope else w2
    dx = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    n_prog = triton.cdiv(B * S, BLOCK_T)
    dw_part = torch.empty((n_prog, H, G, D), dtype=torch.float32, device=x.device)
    _norm_rope_bwd_kernel[(n_prog, H)](
        dy, x, w2, g, c, sn, rstd, dx, dw_part, B * S, S, G, *_strides4(x), *_strides4(dy), w2.stride(0),
        c.stride(0) if has_rope else 0, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=BLOCK_T,
        HAS_GROUP=has_group, HAS_ROPE=has_rope,
    )
    dw = dw_part.sum((0, 1))  # (G, D)
    if weight.dim() == 1:
        dw = dw[0]
    elif not has_group:  # (G, D) weight without token_group: every token used row 0
        dw = torch.cat([dw, dw.new_zeros(weight.shape[0] - 1, D)])
    return dx, dw.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Flash attention on the normalised tensors
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile(ptr, b, h, sb, ss, sh, offs, offs_d, S, dm, UPCAST: tl.constexpr):
    """The (len(offs), BLOCK_D) tile of tokens ``offs`` of (batch b, head h); zeros outside."""
    x = tl.load(ptr + b * sb + h * sh + offs[:, None] * ss + offs_d[None, :],
                mask=(offs < S)[:, None] & dm[None, :], other=0.0)
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _src_tile(src, b, h, sb, ss, sh, start, offs, offs_d, S, dm, BLOCK: tl.constexpr, D: tl.constexpr,
              UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Tokens start .. start + BLOCK of (batch b, head h) from ``src``: a pointer (masked loads) or,
    when TMA, a tensor descriptor over the (B, S, H·D) view (one bulk copy; rows past S are
    zero-filled by the hardware, like the masked loads' other=0)."""
    if TMA:
        x = src.load([b, start, h * D]).reshape(BLOCK, D)
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = _tile(src, b, h, sb, ss, sh, offs, offs_d, S, dm, UPCAST)
    return x


@triton.jit
def _kept_tile(ptr, b, h, sb, ss, sh, start, offs, offs_d, S, H, dm, BLOCK: tl.constexpr, D: tl.constexpr,
               UPCAST: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """The tile a program keeps through its whole loop (Q in fwd and dq, K and V in dkdv). When
    warp-specialised it comes through a descriptor made in the kernel, (BLOCK, D) boxes over batch
    b's (S, H·D) rows: Triton's pass splits such a box between the two consumer groups, but not a
    host descriptor's box (a compile error), and it refuses pointer loads in specialised code
    ("unsupported load type for producer commit")."""
    if WS:
        desc = tl.make_tensor_descriptor(ptr + b * sb, shape=[S, H * D], strides=[ss, 1], block_shape=[BLOCK, D])
        x = desc.load([start, h * D])
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = _src_tile(ptr, b, h, sb, ss, sh, start, offs, offs_d, S, dm, BLOCK, D, UPCAST, TMA)
    return x


@triton.jit
def _side_load(ptr, row, S, SR, start, BLOCK: tl.constexpr):
    """Tokens start .. start + BLOCK of row ``row`` of a side buffer (lse, delta, pad mask: rows of
    SR = side_cols(S) elements, zeros past S) through a descriptor made in the kernel: how
    warp-specialised code reads them (see _kept_tile). A descriptor's base must be 16-byte
    aligned, hence SR, and so must its box's start (a multiple of BLOCK >= 16 elements)."""
    desc = tl.make_tensor_descriptor(ptr + row * SR, shape=[S], strides=[1], block_shape=[BLOCK])
    return desc.load([start])


@triton.jit
def _block_coords(H, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Program (block of BLOCK tokens, batch·head) -> (pid, bh, b, h, token offsets, d offsets, d mask)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    return pid, bh, bh // H, bh % H, pid * BLOCK + tl.arange(0, BLOCK), offs_d, offs_d < D


@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, S, SR, H, sob, sos, soh, sdb, sds, sdh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO · O) in fp32 for BLOCK_M queries of one (batch, head), into (B, H, SR).

    One read of O and dO in their own dtype (4 bytes per element in 16-bit): the eager
    ``(do.float() * out.float()).sum(-1)`` it replaces moved 28 bytes per element through three
    fp32 temporaries (0.46 GB of them at B3 S4173 H24 D128)."""
    pid_m, bh, b, h, offs_m, offs_d, dm = _block_coords(H, D, BLOCK_D, BLOCK_M)
    o = _tile(o_ptr, b, h, sob, sos, soh, offs_m, offs_d, S, dm, True)
    do = _tile(do_ptr, b, h, sdb, sds, sdh, offs_m, offs_d, S, dm, True)
    tl.store(delta_ptr + bh * SR + offs_m, tl.sum(o * do, axis=1), mask=offs_m < S)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, bh, S, SR, start, BLOCK: tl.constexpr, WS: tl.constexpr):
    """Forward log-sum-exp (base 2) and rowsum(dO * O) of queries start .. start + BLOCK; past S,
    lse = +1e30 (every p recomputes to 0) or, warp-specialised, 0 (those rows are masked or never
    stored there)."""
    if WS:
        lse = _side_load(lse_ptr, bh, S, SR, start, BLOCK)
        delta = _side_load(delta_ptr, bh, S, SR, start, BLOCK)
    else:
        offs_m = start + tl.arange(0, BLOCK)
        lse = tl.load(lse_ptr + bh * SR + offs_m, mask=offs_m < S, other=-NEG)
        delta = tl.load(delta_ptr + bh * SR + offs_m, mask=offs_m < S, other=0.0)
    return lse, delta


@triton.jit
def _key_ok(start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD: tl.constexpr, WS: tl.constexpr):
    """(BLOCK_N,) which keys start_n + offs_n count: before S and, with a pad mask, not padded (the
    mask through a descriptor the kernel makes when warp-specialised, see _side_load)."""
    ok = offs_n < S
    if HAS_PAD:
        if WS:
            keep = _side_load(pad_ptr, b, S, SR, start_n, offs_n.shape[0])
        else:
            keep = tl.load(pad_ptr + b * SR + offs_n, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _valid(offs_m, start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):
    """Which (query, key) pairs of a (BLOCK_M, BLOCK_N) tile count: keys that count (_key_ok), not
    after the query when causal."""
    valid = _key_ok(start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD, WS)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _key_bias(start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD: tl.constexpr, WS: tl.constexpr):
    """(BLOCK_N,) score bias of keys start_n + offs_n for the forward's non-causal rows: 0 where the
    key counts (_key_ok), NEG otherwise. One add a score instead of per-score compares and selects
    (the mask is a column's, the same for every query): exp2 of a biased score is exactly 0 once
    the row's max is a real score, and a block of only such keys before the row's first valid one
    is wiped by that block's rescale (alpha = 0); a row without any valid key is zeroed at the end.
    Not in the backward: there its per-key vector stays live across the dkdv kernel's query loop
    (28-220 bytes of spills at 64x128 and D = 256), and a negative scale would turn the bias
    positive after the FFMA's multiply."""
    return tl.where(_key_ok(start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD, WS), 0.0, NEG)


@triton.jit
def _probs(q, k, lse, scale_log2, offs_m, start_n, offs_n, S, SR, pad_ptr, b, MASKED: tl.constexpr,
           HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, WS: tl.constexpr):
    """Backward's recomputed probabilities exp2(s·scale_log2 - lse) of a (BLOCK_M, BLOCK_N) tile
    (one FFMA and one exp2 a score); invalid keys zeroed when MASKED (one select: rows past S
    need none, their lse is +1e30, so p = 0)."""
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(_valid(offs_m, start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD, CAUSAL, WS), p, 0.0)
    return p


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh, start_n, offs_m,
              offs_d, dm, S, SR, scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              TMA: tl.constexpr, WS: tl.constexpr):
    """One key block of dQ: returns dq + dS·K for the keys at start_n."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _src_tile(k_ptr, b, h, skb, sks, skh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    v = _src_tile(v_ptr, b, h, svb, svs, svh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    p = _probs(q, k, lse, scale_log2, offs_m, start_n, offs_n, S, SR, pad_ptr, b, MASKED, HAS_PAD, CAUSAL, PREC, WS)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _scores(q, k_ptr, b, h, skb, sks, skh, start_n, offs_d, S, dm, BLOCK_N: tl.constexpr, D: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Raw scores Q·K^T of key block start_n (BLOCK_M, BLOCK_N); keys past S read as zeros."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _src_tile(k_ptr, b, h, skb, sks, skh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    return tl.dot(q, tl.trans(k), input_precision=PREC)


@triton.jit
def _fwd_softmax(s, m_i, l_i, pad_ptr, b, start_n, offs_m, S, SR, scale_log2, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr,
                 SCALE_POS: tl.constexpr):
    """The online softmax of one key block's raw scores s (BLOCK_M, BLOCK_N): returns (p, alpha,
    m_new, l_new), m in units of s·scale_log2. With a positive scale (SCALE_POS) the row max is
    taken on the raw scores and scaled once per row, so a score's scaling folds into its exp2
    argument (one FFMA, s·scale_log2 - m): one instruction a score fewer, in a loop that issued
    ~11.5 a score (368 a thread a trip at 128x64, 8 warps, bf16 D = 128, sm_90a; 338 now) against
    the ~16 a score the SM's issue rate allows at full tensor-core speed. A non-positive scale
    scales every score first. Masked blocks: non-causal ones add the keys' bias (_key_bias;
    padded, 581 -> 455 a trip with both changes), causal ones select."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if SCALE_POS:
        s_max = s
    else:
        s = s * scale_log2
        s_max = s
    if MASKED and not CAUSAL:  # keys past S or padded: the NEG bias (_key_bias), no selects
        s = s + _key_bias(start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD, WS)[None, :]
        s_max = s
    if MASKED and CAUSAL:  # a causal row may have no valid key at all: selects keep its l at 0
        valid = _valid(offs_m, start_n, offs_n, S, SR, pad_ptr, b, HAS_PAD, CAUSAL, WS)
        s_max = tl.where(valid, s_max, NEG)
    m_blk = tl.max(s_max, axis=1)
    m_new = tl.maximum(m_i, m_blk * scale_log2 if SCALE_POS else m_blk)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2((s * scale_log2 if SCALE_POS else s) - m_new[:, None])
    if MASKED and CAUSAL:
        p = tl.where(valid, p, 0.0)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _fwd_block(q, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh, start_n, offs_m, offs_d,
               dm, S, SR, scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               TMA: tl.constexpr, WS: tl.constexpr, SCALE_POS: tl.constexpr):
    """One key block, FlashAttention-2's order: scores, softmax, then P·V; returns the updated
    (acc, m_i, l_i). K and V are loaded before the dot, not through _scores: that order is 5
    instructions a trip shorter (338 / 455 at 128x64/w8/s3/tma, unpadded / padded)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _src_tile(k_ptr, b, h, skb, sks, skh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    v = _src_tile(v_ptr, b, h, svb, svs, svh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N), unscaled
    p, alpha, m_i, l_i = _fwd_softmax(s, m_i, l_i, pad_ptr, b, start_n, offs_m, S, SR, scale_log2, BLOCK_N, MASKED,
                                      HAS_PAD, CAUSAL, WS, SCALE_POS)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_block_overlap(q, s, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh, start_n,
                       offs_m, offs_d, dm, S, SR, scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                       PREC: tl.constexpr, TMA: tl.constexpr, SCALE_POS: tl.constexpr):
    """One key block, run one block ahead (FlashAttention-3's intra-warpgroup overlap): s holds
    block start_n's raw scores; returns the updated (acc, m_i, l_i) and the next block's scores.

    In _fwd_block's order the next trip's Q·K^T is issued after this P·V, and waiting for it
    waits for both (warpgroup MMAs retire in order), so the softmax never runs beside an MMA:
    sm_90a, bf16 D = 128, 128x64/w8: 0 of a trip's 34 exp2s (32 scores, 2 row rescales) issue
    while an HGMMA is in flight (sm90.mma_loop_ops' "ex2_beside_mma"). Here the softmax of
    block j runs while P_{j-1}·V_{j-1} is still on the tensor cores: 34 of 34. The order below
    is what Triton's WGMMA pipeliner needs to keep P·V asynchronous: the accumulator's first use
    (the rescale) after the first full wait, which the next scores' dot brings (its result feeds
    the next trip's softmax, so the pass waits for it at once). Costs: the next K tile one stage
    earlier (+16 KB of shared memory), the scores of one block past the last per program (1 of
    2·S/BLOCK_N dots: 0.8% at S = 4173; keys past S read as zeros), 7 instructions a thread a
    trip (345 against 338; 484 against 455 padded; V's load before the next scores' dot saves 6-9)
    and 33 registers (171)."""
    p, alpha, m_i, l_i = _fwd_softmax(s, m_i, l_i, pad_ptr, b, start_n, offs_m, S, SR, scale_log2, BLOCK_N, MASKED,
                                      HAS_PAD, CAUSAL, False, SCALE_POS)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    v = _src_tile(v_ptr, b, h, svb, svs, svh, start_n, offs_n, offs_d, S, dm, BLOCK_N, D, UPCAST, TMA)
    s = _scores(q, k_ptr, b, h, skb, sks, skh, start_n + BLOCK_N, offs_d, S, dm, BLOCK_N, D, UPCAST, PREC, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_i, l_i, s


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pad_ptr,
    S, SR, H, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr, SCALE_POS: tl.constexpr, OVERLAP: tl.constexpr,
):
    """FlashAttention-2 forward; k_ptr, v_ptr are tensor descriptors when TMA, and so is q_ptr
    unless WS (then the kernel makes Q's descriptor, see _kept_tile). With OVERLAP the loops run
    one key block ahead (_fwd_block_overlap)."""
    tl.static_assert(not (WS and OVERLAP), "warp-specialised loops are scheduled by Triton's pass")
    pid_m, bh, b, h, offs_m, offs_d, dm = _block_coords(H, D, BLOCK_D, BLOCK_M)
    q = _kept_tile(q_ptr, b, h, sqb, sqs, sqh, pid_m * BLOCK_M, offs_m, offs_d, S, H, dm, BLOCK_M, D, UPCAST, TMA, WS)
    m_i = tl.full((BLOCK_M,), NEG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    # Without padding or causality only the last key block can hold invalid keys: the blocks
    # before it skip the score masks (a compare and two selects per score; estimated at ~10% of a
    # 64x64x128 tile's issue slots next to its MMAs and exp2s, not yet timed on a GPU). Not when
    # warp-specialised: Triton 3.8's pass fails on a kernel with two loops (an assertion in
    # NVGPUWarpSpecialization), so there one loop masks every block.
    n_full = 0 if (HAS_PAD or CAUSAL or WS) else (S // BLOCK_N) * BLOCK_N
    if OVERLAP:
        s = _scores(q, k_ptr, b, h, skb, sks, skh, 0, offs_d, S, dm, BLOCK_N, D, UPCAST, PREC, TMA)
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i, s = _fwd_block_overlap(q, s, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh,
                                                  svb, svs, svh, start_n, offs_m, offs_d, dm, S, SR, scale_log2, D,
                                                  BLOCK_N, False, False, False, UPCAST, PREC, TMA, SCALE_POS)
        for start_n in range(n_full, hi, BLOCK_N):
            acc, m_i, l_i, s = _fwd_block_overlap(q, s, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh,
                                                  svb, svs, svh, start_n, offs_m, offs_d, dm, S, SR, scale_log2, D,
                                                  BLOCK_N, True, HAS_PAD, CAUSAL, UPCAST, PREC, TMA, SCALE_POS)
    else:
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh,
                                       start_n, offs_m, offs_d, dm, S, SR, scale_log2, D, BLOCK_N, False, False,
                                       False, UPCAST, PREC, TMA, False, SCALE_POS)
        for start_n in tl.range(n_full, hi, BLOCK_N, warp_specialize=WS):
            acc, m_i, l_i = _fwd_block(q, acc, m_i, l_i, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh,
                                       start_n, offs_m, offs_d, dm, S, SR, scale_log2, D, BLOCK_N, True, HAS_PAD,
                                       CAUSAL, UPCAST, PREC, TMA, WS, SCALE_POS)
    seen = l_i > 0
    if HAS_PAD and not CAUSAL:
        # a batch row whose keys are all padded kept the bias as its max (NEG·min(1, scale_log2); a real
        # score's is bounded by |q||k|·scale_log2, ~16 at D = 128 with unit norm weights) and averaged
        # V: written as zeros like a causal row's
        floor = tl.minimum(scale_log2, 1.0) * -5.0e29 if SCALE_POS else -5.0e29  # NEG / 2 in m's units
        seen = seen & (m_i > floor)
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m < S)[:, None] & dm[None, :])
    # log-sum-exp in base 2; rows with no valid key get +1e30 so that every p recomputes to 0, and
    # so does the row padding up to SR (written, not left as whatever the allocation held)
    lse = tl.where(seen & (offs_m < S), m_i + tl.log2(tl.where(seen, l_i, 1.0)), -NEG)
    tl.store(lse_ptr + bh * SR + offs_m, lse, mask=offs_m < SR)


@triton.jit
def _dq_atomic_add(dq_ptr, ds, k, b, h, start_m, sgb, sgs, sgh, offs_m, offs_d, dm, S, scale, PREC: tl.constexpr,
                   BULK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """dQ += scale · dS·K for queries start_m + offs_m, into the fp32 (B, S, H, D) accumulator:
    every key block's program adds to the same query rows. Per-thread red.global.add.f32 (REDG: 32
    a thread per 64x128 tile at 8 warps), or when BULK (LaunchConfig.bulk_dq) dq_ptr is a host
    descriptor over the accumulator's (B, S, H·D) view and the tile goes in one bulk tensor
    reduction (cp.reduce.async.bulk.tensor .add, UTMAREDG: the TMA unit adds it in L2, the warps
    only stage it in shared memory), FlashAttention-3's way; rows past S are dropped by the
    hardware. The same fp32 adds reach L2 either way; the bulk one frees registers and issue slots
    (216 registers instead of 236 in the bf16 D = 128 64x64/w8/s3 kernel)."""
    part = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale  # (BLOCK_M, BLOCK_D)
    if BULK:
        dq_ptr.atomic_add([b, start_m, h * D], part.reshape(1, BLOCK_M, D))
    else:
        tl.atomic_add(dq_ptr + b * sgb + h * sgh + offs_m[:, None] * sgs + offs_d[None, :], part,
                      mask=(offs_m < S)[:, None] & dm[None, :], sem="relaxed")


@triton.jit
def _dkdv_block_t(dk, dv, k, v, keep, q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh, start_m, offs_n, offs_d, dm, S,
                  SR, scale_log2, D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One query block of the warp-specialised dK, dV, computed transposed (s^T = K·Q^T, keys as
    rows) so that the keys are the rows the two consumer groups split; q_ptr, do_ptr are host
    descriptors. Returns the updated (dk, dv)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _src_tile(q_ptr, b, h, 0, 0, 0, start_m, offs_m, offs_d, S, dm, BLOCK_M, D, UPCAST, True)
    do = _src_tile(do_ptr, b, h, 0, 0, 0, start_m, offs_m, offs_d, S, dm, BLOCK_M, D, UPCAST, True)
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh, S, SR, start_m, BLOCK_M, True)
    valid = (offs_m < S)[None, :]
    if HAS_PAD:
        valid = valid & (keep != 0)[:, None]
    if CAUSAL:
        valid = valid & (offs_n[:, None] <= offs_m[None, :])
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2  # (BLOCK_N, BLOCK_M)
    p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pad_ptr, dk_ptr, dv_ptr, dq_ptr,
    S, SR, H, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_BULK: tl.constexpr = False,
):
    """dK, dV of BLOCK_N keys, looping over query blocks; q, do (and k, v unless WS) are
    descriptors when TMA. With DQ_ATOMIC also dQ (the "atomic" backward): each query block's
    scale · dS·K is added into dq_ptr, a zeroed fp32 (B, S, H, D) buffer, so the dq kernel and its
    recomputed QK^T and dO·V^T (2 of the backward's 7 matmuls) are not needed; with DQ_BULK dq_ptr
    is a descriptor and the adds are bulk reductions (_dq_atomic_add). Not with WS: Triton's warp
    specialisation fails on the atomics, pointer and descriptor ones alike (3.8,
    NVGPUWarpSpecialization; the descriptor reduction in WSDataPartition, "Unexpected
    asyncTaskIds.size()", with 64 or 128 keys a step)."""
    tl.static_assert(not (WS and DQ_ATOMIC), "the atomic dQ has no warp-specialised variant")
    pid_n, bh, b, h, offs_n, offs_d, dm = _block_coords(H, D, BLOCK_D, BLOCK_N)
    k = _kept_tile(k_ptr, b, h, skb, sks, skh, pid_n * BLOCK_N, offs_n, offs_d, S, H, dm, BLOCK_N, D, UPCAST, TMA, WS)
    v = _kept_tile(v_ptr, b, h, svb, svs, svh, pid_n * BLOCK_N, offs_n, offs_d, S, H, dm, BLOCK_N, D, UPCAST, TMA, WS)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    if WS:
        keep = _side_load(pad_ptr, b, S, SR, pid_n * BLOCK_N, BLOCK_N) if HAS_PAD else 0
        for start_m in tl.range(lo, S, BLOCK_M, warp_specialize=True):
            dk, dv = _dkdv_block_t(dk, dv, k, v, keep, q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh, start_m, offs_n,
                                   offs_d, dm, S, SR, scale_log2, D, BLOCK_M, HAS_PAD, CAUSAL, UPCAST, PREC)
    else:
        for start_m in range(lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _src_tile(q_ptr, b, h, sqb, sqs, sqh, start_m, offs_m, offs_d, S, dm, BLOCK_M, D, UPCAST, TMA)
            do = _src_tile(do_ptr, b, h, sdb, sds, sdh, start_m, offs_m, offs_d, S, dm, BLOCK_M, D, UPCAST, TMA)
            lse, delta = _row_stats(lse_ptr, delta_ptr, bh, S, SR, start_m, BLOCK_M, False)
            # without padding or causality no mask is needed here: keys past S only feed dK, dV rows
            # that are never stored
            p = _probs(q, k, lse, scale_log2, offs_m, 0, offs_n, S, SR, pad_ptr, b, HAS_PAD or CAUSAL, HAS_PAD, CAUSAL,
                       PREC, False)  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if DQ_ATOMIC:
                _dq_atomic_add(dq_ptr, ds, k, b, h, start_m, sgb, sgs, sgh, offs_m, offs_d, dm, S, scale, PREC,
                               DQ_BULK, BLOCK_M, D)
    out_mask = (offs_n < S)[:, None] & dm[None, :]
    g_off = b * sgb + h * sgh + offs_n[:, None] * sgs + offs_d[None, :]  # dk, dv: (B, S, H, D)
    tl.store(dk_ptr + g_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pad_ptr, dq_ptr,
    S, SR, H, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr,
):
    """dQ of BLOCK_M queries, looping over key blocks; k, v (and q, do unless WS) are descriptors
    when TMA."""
    pid_m, bh, b, h, offs_m, offs_d, dm = _block_coords(H, D, BLOCK_D, BLOCK_M)
    q_mask = (offs_m < S)[:, None] & dm[None, :]
    q = _kept_tile(q_ptr, b, h, sqb, sqs, sqh, pid_m * BLOCK_M, offs_m, offs_d, S, H, dm, BLOCK_M, D, UPCAST, TMA, WS)
    do = _kept_tile(do_ptr, b, h, sdb, sds, sdh, pid_m * BLOCK_M, offs_m, offs_d, S, H, dm, BLOCK_M, D, UPCAST, TMA,
                    WS)
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh, S, SR, pid_m * BLOCK_M, BLOCK_M, WS)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    n_full = 0 if (HAS_PAD or CAUSAL or WS) else (S // BLOCK_N) * BLOCK_N  # as in the forward
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh, start_n,
                       offs_m, offs_d, dm, S, SR, scale_log2, D, BLOCK_N, False, False, False, UPCAST, PREC, TMA, False)
    for start_n in tl.range(n_full, hi, BLOCK_N, warp_specialize=WS):
        dq = _dq_block(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, b, h, skb, sks, skh, svb, svs, svh, start_n,
                       offs_m, offs_d, dm, S, SR, scale_log2, D, BLOCK_N, True, HAS_PAD, CAUSAL, UPCAST, PREC, TMA, WS)
    tl.store(dq_ptr + b * sgb + h * sgh + offs_m[:, None] * sgs + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def side_cols(S: int) -> int:
    """Row length of the per-token side buffers (lse, delta: fp32 (B, H, ·); the pad mask: int8
    (B, ·)): S rounded up to 16 elements, so that every row starts 16-byte aligned, as the
    descriptors of the warp-specialised kernels need (also works on torch.compile's SymInts)."""
    return (S + 15) // 16 * 16


def _pad_arg(key_padding_mask, q):
    """The pad mask as int8 (B, side_cols(S)) rows (True = valid key), or a placeholder."""
    if key_padding_mask is None:
        return torch.zeros(1, dtype=torch.int8, device=q.device), False
    B, S = key_padding_mask.shape
    pad = torch.zeros((B, side_cols(S)), dtype=torch.int8, device=q.device)
    pad[:, :S] = key_padding_mask
    return pad, True


def _qkv_strides(q, k, v):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))


def _check_last_dim(*ts):
    for t in ts:
        if t.stride(-1) != 1:
            raise ValueError("qk_norm_attention (triton): the head dimension must be contiguous (stride 1)")


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether tensor descriptors over the (B, S, H·D) view can move these tensors' tiles: 16-bit,
    D a power of two (the box is exactly one head wide), heads adjacent (stride D), 16-byte aligned
    base and row strides; compute capability 9.0+ on CUDA (the interpreter emulates them)."""
    for t in ts:
        D, es = t.shape[3], t.element_size()
        if (t.dtype not in (torch.float16, torch.bfloat16) or D < 16 or D & (D - 1) or t.stride(3) != 1
                or t.stride(2) != D or t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16):
            return False
    if ts[0].is_cuda:
        return torch.cuda.get_device_capability(ts[0].device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


def _descriptor(t: torch.Tensor, rows: int):
    """Tensor descriptor of (B, S, H, D) ``t`` as (B, S, H·D) with (1, rows, D) boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, S, H, D = t.shape
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], [1, rows, D])


# The tensors each kernel keeps through its loop; warp-specialised, the kernel makes their
# descriptors itself (see _kept_tile), so they go in as tensors.
_KEPT = {"fwd": ("q",), "dq": ("q", "do"), "dkdv": ("k", "v"), "dkdv_dq": ("k", "v")}


def _sources(cfg: LaunchConfig, kernel: str, q, k, v, do=None) -> tuple:
    """The kernel's q, k, v (, do) arguments: the tensors, or descriptors with the config's boxes
    (queries and dO by BLOCK_M rows, keys and values by BLOCK_N)."""
    names, ts = ("q", "k", "v", "do"), (q, k, v) if do is None else (q, k, v, do)
    if not cfg.tma:
        return ts
    rows = (cfg.block_m, cfg.block_n, cfg.block_n, cfg.block_m)
    kept = _KEPT[kernel] if cfg.ws else ()
    return tuple(t if n in kept else _descriptor(t, r) for n, t, r in zip(names, ts, rows, strict=False))


def _dq_target(cfg: LaunchConfig, dq_acc: list, atomic: bool, placeholder: torch.Tensor):
    """The dkdv kernel's dq argument: the atomic mode's fp32 accumulator, as a descriptor with
    (1, BLOCK_M, D) boxes for bulk_dq configs (their dQ tiles go in by bulk reduction), or an
    unused placeholder when the kernel does not add dQ."""
    if not atomic:
        return placeholder
    return _descriptor(dq_acc[0], cfg.block_m) if cfg.bulk_dq else dq_acc[0]


def _launch(kernel, grid, cfg: LaunchConfig, device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with the config's launch knobs, through
    :func:`autotune.run_kernel` (which only compiles while the autotuner compiles candidates).
    Descriptors made in the kernel (warp-specialised configs) need Triton's global-scratch
    allocator (128 bytes per descriptor and program): torch's caching allocator, set in a copy of
    the caller's context, so for this launch only and whatever allocator the caller has set stays
    as it was."""
    def run():
        if cfg.ws and device.type == "cuda":  # the caching allocator orders its blocks on the current stream
            triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        run_kernel(kernel, grid, *args, **kwargs, TMA=cfg.tma, WS=cfg.ws, **cfg.kwargs())

    contextvars.copy_context().run(run)


def attention_fwd(q, k, v, key_padding_mask, scale, causal):
    """Flash attention on (B, S, H, D) views; returns out (B, S, H, D) and the log-sum-exp (base 2)
    lse (B, H, side_cols(S)) fp32, entries past S unused."""
    _check_last_dim(q, k, v)
    B, S, H, D = q.shape
    SR = side_cols(S)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, SR), dtype=torch.float32, device=q.device)
    pad, has_pad = _pad_arg(key_padding_mask, q)

    def launch(cfg: LaunchConfig):
        _launch(_attn_fwd_kernel, (triton.cdiv(S, cfg.block_m), B * H), cfg, q.device,
                *_sources(cfg, "fwd", q, k, v), out, lse, pad, S, SR, H, *_qkv_strides(q, k, v), out.stride(0),
                out.stride(1), out.stride(2), scale * LOG2E, D=D, BLOCK_D=triton.next_power_of_2(D),
                HAS_PAD=has_pad, CAUSAL=causal, UPCAST=_upcast(q.dtype), PREC=_precision(q.dtype),
                SCALE_POS=scale > 0, OVERLAP=cfg.overlap)
        return (out,)  # what a candidate is checked on (lse past S is unused)

    launch(_pick("fwd", q, (has_pad, causal), launch, _tma_ok(q, k, v)))
    return out, lse


def attention_bwd(do, q, k, v, out, lse, key_padding_mask, scale, causal, mode: str | None = None,
                  delta: torch.Tensor | None = None):
    """dq, dk, dv (B, S, H, D) of :func:`attention_fwd`; ``mode`` as ``KILN_ATTN_BWD`` (_bwd_mode),
    which it overrides. ``delta``: rowsum(do * out) fp32 (B, H, side_cols(S)) where the caller
    has it (ring attention: once per rank's queries, not once per block); ``out`` is then unused."""
    _check_last_dim(q, k, v)
    B, S, H, D = q.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    SR = side_cols(S)
    if delta is None:
        out = out if out.stride(-1) == 1 else out.contiguous()
        delta = torch.empty((B, H, SR), dtype=torch.float32, device=q.device)
        _bwd_delta_kernel[(triton.cdiv(S, DELTA_BLOCK), B * H)](
            out, do, delta, S, SR, H, *out.stride()[:3], *do.stride()[:3], D=D, BLOCK_D=triton.next_power_of_2(D),
            BLOCK_M=DELTA_BLOCK)
    elif tuple(delta.shape) != (B, H, SR) or delta.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError(f"attention_bwd: delta must be contiguous fp32 ({B}, {H}, {SR}), got "
                         f"{delta.dtype} {tuple(delta.shape)}")
    pad, has_pad = _pad_arg(key_padding_mask, q)
    dq = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    common = dict(D=D, BLOCK_D=triton.next_power_of_2(D), HAS_PAD=has_pad, CAUSAL=causal,
                  UPCAST=_upcast(q.dtype), PREC=_precision(q.dtype))
    strides = (*_qkv_strides(q, k, v), do.stride(0), do.stride(1), do.stride(2), *dq.stride()[:3])

    dq_acc = []  # the atomic mode's fp32 accumulator, made on first use (see _dq_target)

    def launch_dkdv(cfg: LaunchConfig, atomic: bool = False):
        if atomic:
            dq_acc[:] = dq_acc or [torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)]
            dq_acc[0].zero_()  # zeroed in every launch: the autotuner's timing runs repeat it
        _launch(_attn_bwd_dkdv_kernel, (triton.cdiv(S, cfg.block_n), B * H), cfg, q.device,
                *_sources(cfg, "dkdv", q, k, v, do), lse, delta, pad, dk, dv, _dq_target(cfg, dq_acc, atomic, dk),
                S, SR, H, *strides, scale, scale * LOG2E, DQ_ATOMIC=atomic, DQ_BULK=atomic and cfg.bulk_dq, **common)
        return (dk, dv, dq_acc[0]) if atomic else (dk, dv)

    def launch_dq(cfg: LaunchConfig):
        _launch(_attn_bwd_dq_kernel, (triton.cdiv(S, cfg.block_m), B * H), cfg, q.device,
                *_sources(cfg, "dq", q, k, v, do), lse, delta, pad, dq, S, SR, H, *strides, scale, scale * LOG2E,
                **common)
        return (dq,)

    tma, flags = _tma_ok(q, k, v, do), (has_pad, causal)
    if _bwd_mode(q, flags, tma, launch_dkdv, launch_dq, mode) == "atomic":
        return dq_acc[0].to(q.dtype), dk, dv
    return dq, dk, dv


BWD_MODES = ("auto", "separate", "atomic")


def _bwd_mode(q, flags: tuple, tma: bool, launch_dkdv, launch_dq, setting: str | None = None) -> str:
    """Run the backward's dK, dV, dQ kernels one of two ways and say which:

    - "separate" (the default): the dkdv kernel, then the dq kernel, each recomputing QK^T and
      dO·V^T (7 matmuls for the backward's 5); no atomics, so bit-for-bit deterministic;
    - "atomic": the dkdv kernel also adds each query block's dQ share into an fp32 buffer with
      atomics (5 matmuls plus S/BLOCK_N fp32 adds per dQ element, FlashAttention-2's way); the
      order of those adds varies from run to run.
    ``KILN_ATTN_BWD`` = auto (default) | separate | atomic. Under auto, "atomic" is used only when
    the autotuner timed it faster on this GPU, never under torch.use_deterministic_algorithms;
    it has candidates only at D <= 128, and at D = 128 only with TMA tiles (the others spill), so
    elsewhere even "atomic" runs "separate"."""
    mode = setting or os.environ.get("KILN_ATTN_BWD", "auto")
    if mode not in BWD_MODES:
        raise ValueError(f"KILN_ATTN_BWD={mode!r}: allowed values are {', '.join(BWD_MODES)}")
    key = tuning_key("bwd", q, flags, tma)
    if mode == "auto" and (torch.are_deterministic_algorithms_enabled() or uses_default(key, q)):
        mode = "separate"  # (nothing timed or remembered: the default, without tuning atomic candidates)
    has_atomic = mode != "separate" and bool(_candidates("dkdv_dq", q, tma))
    plans = {}  # mode -> its kernels' launch configs (tuned here on first use); the default first
    if mode != "atomic" or not has_atomic:
        plans["separate"] = (_pick("dkdv", q, flags, launch_dkdv, tma), _pick("dq", q, flags, launch_dq, tma))
    if has_atomic:
        plans["atomic"] = (_pick("dkdv_dq", q, flags, lambda cfg: launch_dkdv(cfg, True), tma),)

    def run(name: str) -> None:
        if name == "atomic":
            launch_dkdv(plans[name][0], True)
        else:
            launch_dkdv(plans[name][0])
            launch_dq(plans[name][1])

    mode = choose(key, list(plans), run, q) if len(plans) > 1 else next(iter(plans))
    run(mode)
    return mode


def default_scale(D: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


CONFIGS_SM90 = [("bf16", 64), ("bf16", 128), ("fp16", 128), ("bf16", 256), ("fp32", 64), ("fp32", 128), ("fp32", 256)]
CONFIGS_ARCH = [(dt, D) for dt in ("bf16", "fp32") for D in (64, 128, 256)]  # (fp16 lays out as bf16)
_ARCH_TARGET = {"sm80": 80, "sm100": 100, "sm120": 120}  # arch_defaults' compute capability per family
_TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sm90_signature(sig: dict, kernel: str, cfg: LaunchConfig, dt: str, D: int) -> dict:
    """An attention kernel's signature for ``cfg``: with TMA, Q, K, V (and dO, and the atomic
    backward's dQ accumulator) are host tensor descriptors with (1, rows, D) boxes, except the
    tensors a warp-specialised kernel keeps."""
    if not cfg.tma:
        return sig
    boxes = {"q_ptr": cfg.block_m, "k_ptr": cfg.block_n, "v_ptr": cfg.block_n}
    if kernel != "fwd":
        boxes["do_ptr"] = cfg.block_m
    kept = {f"{n}_ptr" for n in _KEPT[kernel]} if cfg.ws else set()
    descs = {a: f"tensordesc<{dt}[1, {rows}, {D}]>" for a, rows in boxes.items() if a not in kept}
    if cfg.bulk_dq:  # the fp32 dQ accumulator, added to by bulk reductions (_dq_target)
        descs["dq_ptr"] = f"tensordesc<fp32[1, {cfg.block_m}, {D}]>"
    return {**sig, **descs}


def _attn_compile_args(name: str, cfg: LaunchConfig, dt: str, D: int, has_pad: bool) -> tuple:
    """(kernel, signature, constexprs, aligned integer arguments) of attention kernel ``name``
    ("fwd", "dkdv", "dq", "dkdv_dq") at ``cfg`` for an ahead-of-time compile (kiln.kernels.sm90)."""
    i32 = "i32"
    qkv = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}"}
    strides = {f"s{a}{b}": i32 for a in "qkvodg" for b in "bsh"}
    common = {**qkv, "do_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "pad_ptr": "*i8"}
    tail = {"S": i32, "SR": i32, "H": i32, **{k: i32 for k in strides if k[1] in "qkvdg"}, "scale": "fp32",
            "scale_log2": "fp32"}
    kernel, sig = {
        "fwd": (_attn_fwd_kernel, {**qkv, "o_ptr": f"*{dt}", "lse_ptr": "*fp32", "pad_ptr": "*i8", "S": i32,
                                   "SR": i32, "H": i32, **{k: i32 for k in strides if k[1] in "qkvo"},
                                   "scale_log2": "fp32"}),
        "dkdv": (_attn_bwd_dkdv_kernel, {**common, "dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}", "dq_ptr": f"*{dt}", **tail}),
        "dkdv_dq": (_attn_bwd_dkdv_kernel, {**common, "dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}", "dq_ptr": "*fp32",
                                            **tail}),
        "dq": (_attn_bwd_dq_kernel, {**common, "dq_ptr": f"*{dt}", **tail}),
    }[name]
    flags = {"D": D, "BLOCK_D": D, "HAS_PAD": has_pad, "CAUSAL": False, "UPCAST": False,
             "PREC": _precision(_TORCH_DT[dt]), "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
             "TMA": cfg.tma, "WS": cfg.ws}
    if kernel is _attn_fwd_kernel:
        flags["SCALE_POS"], flags["OVERLAP"] = True, cfg.overlap
    if kernel is _attn_bwd_dkdv_kernel:
        flags["DQ_ATOMIC"], flags["DQ_BULK"] = name == "dkdv_dq", cfg.bulk_dq
    return kernel, _sm90_signature(sig, name, cfg, dt, D), flags, (*strides, "SR")


def compile_for_sm90(configs=CONFIGS_SM90) -> list[dict]:
    """Compile every kernel for sm_90a in every configuration a launch may use (CI check).

    Specialised as a real launch is: 16-byte aligned pointers and strides, unit head-dim strides;
    S, H and the token count are taken as arbitrary (S = 4096 + 77 is not a multiple of 16).
    """
    from kiln.kernels.sm90 import compile_sm90, in_parallel

    jobs = []  # (build, what to add to its report), built in parallel below
    i32 = "i32"
    for dt, D in configs:
        tag = {"dtype": dt, "head_dim": D}
        flags = {"D": D, "BLOCK_D": D, "BLOCK_T": BLOCK_T, "HAS_GROUP": True, "HAS_ROPE": True}
        ptrs = {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "g_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
        pre = {f"s{a}{b}": i32 for a in ("x", "o", "d") for b in "bshd"}
        pre_aligned = (*[k for k in pre if not k.endswith("d")], "swg", "sc_s")
        pre_ones = ("sxd", "sod", "sdd")
        fwd_sig = {**ptrs, "out_ptr": f"*{dt}", "rstd_ptr": "*fp32", "n_tok": i32, "S": i32, "G": i32,
                   **{k: i32 for k in pre if k[1] in "xo"}, "swg": i32, "sc_s": i32, "eps": "fp32"}
        bwd_sig = {"dy_ptr": f"*{dt}", **ptrs, "rstd_ptr": "*fp32", "dx_ptr": f"*{dt}", "dw_ptr": "*fp32",
                   "n_tok": i32, "S": i32, "G": i32, **{k: i32 for k in pre if k[1] in "xd"}, "swg": i32,
                   "sc_s": i32}
        for kernel, sig in ((_norm_rope_fwd_kernel, fwd_sig), (_norm_rope_bwd_kernel, bwd_sig)):
            jobs.append((functools.partial(compile_sm90, kernel, sig, flags, aligned=pre_aligned, ones=pre_ones), tag))
        strides = {f"s{a}{b}": i32 for a in "qkvodg" for b in "bsh"}
        delta_sig = {"o_ptr": f"*{dt}", "do_ptr": f"*{dt}", "delta_ptr": "*fp32", "S": i32, "SR": i32, "H": i32,
                     **{k: i32 for k in strides if k[1] in "od"}}
        jobs.append((functools.partial(compile_sm90, _bwd_delta_kernel, delta_sig,
                                       {"D": D, "BLOCK_D": D, "BLOCK_M": DELTA_BLOCK}, aligned=(*strides, "SR")), tag))
        for name in ("fwd", "dkdv", "dq", "dkdv_dq"):
            for cfg in attn_candidates(name, _TORCH_DT[dt], D, tma=True):
                # 16-bit candidates with and without the pad mask: the loops differ (the unmasked
                # forward loop, the mask loads), and so do registers and spills (the D = 256 dkdv
                # TMA and dq 64x64 tiles spilled only without it, 20-72 bytes, 2026-12-02); and
                # Triton's warp-specialisation pass takes some loads and not others
                for has_pad in _pad_variants(dt):
                    kernel, sig, flags, aligned = _attn_compile_args(name, cfg, dt, D, has_pad)
                    jobs.append((functools.partial(compile_sm90, kernel, sig, flags, cfg.num_warps, cfg.num_stages,
                                                   aligned=aligned),
                                 {**tag, "tma": cfg.tma, "ws": cfg.ws, "bulk_dq": cfg.bulk_dq, "overlap": cfg.overlap,
                                  "candidates": name, "has_pad": has_pad}))
    return [{**r, **extra} for r, (_, extra) in zip(in_parallel([build for build, _ in jobs]), jobs, strict=True)]


def _pad_variants(dt: str) -> tuple[bool, ...]:
    """With and without the pad mask for 16-bit builds (their loops, registers and spills differ);
    fp32, the correctness path, with it only."""
    return (True,) if dt == "fp32" else (True, False)


def arch_defaults(arch: str = "sm80", configs=CONFIGS_ARCH) -> list[dict]:
    """Per dtype, head dim and shared-memory limit of GPU family ``arch`` ("sm80", "sm100",
    "sm120"; ARCH_SHARED), each attention kernel's candidates (ARCH_CANDIDATES[arch]; fp32:
    FP32_CANDIDATES) built for that GPU (CI check): the default the launcher takes there (the
    first that fits, autotune.first_fit) with its shared memory, or the error it raises where
    none fits; and every candidate's stack bytes (spilled registers) and, 16-bit, its MMA
    instructions, with and without the pad mask (the loops differ, and so did spills: dkdv
    64x64/w4/s1 at D = 128 on sm_80, 12 bytes only without it; the shared memory is the same)."""
    from kiln.kernels.autotune import first_fit

    builds = _build_all(arch, configs)
    rows = []
    for dt, D in configs:
        pads = _pad_variants(dt)
        for name in ("fwd", "dkdv", "dq", "dkdv_dq"):
            candidates = attn_candidates(name, _TORCH_DT[dt], D, tma=True, arch=arch)

            def report(cfg: LaunchConfig, has_pad: bool = True, name=name, dt=dt, D=D) -> dict:
                r = builds[(name, dt, D, cfg, has_pad)]
                if isinstance(r, Exception):
                    raise r
                return r

            def built(cfg: LaunchConfig, pads=pads, report=report) -> dict | str:
                try:
                    rs = [report(cfg, has_pad) for has_pad in pads]
                except Exception as e:  # (first_fit below warns of it too)
                    return f"fails to compile ({type(e).__name__})"
                return {"stack_bytes": max(r["stack_bytes"] for r in rs),
                        "mma": sorted(set.intersection(*(set(r["mma"]) for r in rs)))}

            for gpu, limit in ARCH_SHARED[arch].items() if candidates else ():
                row = {"arch": arch, "kernel": name, "dtype": dt, "head_dim": D, "gpu": gpu, "limit": limit,
                       "default": None}
                with warnings.catch_warnings(record=True) as caught:  # (candidates that fail to compile)
                    warnings.simplefilter("always")
                    try:
                        cfg = candidates[first_fit(candidates, lambda c: report(c)["shared_bytes"], limit,
                                                   f"{name}/{dt}/{D}")]
                        row.update(default=str(cfg), shared_bytes=report(cfg)["shared_bytes"])
                    except RuntimeError as e:
                        row["error"] = str(e)
                row["candidates"] = {str(c): built(c) for c in candidates}
                rows.append({**row, "warnings": [str(w.message) for w in caught]})
    return rows


def _build_all(arch: str, configs) -> dict:
    """Every (kernel, dtype, D, candidate, pad mask) of ``arch``'s lists built for its GPU
    (sm90.compile_for_arch: its report, or the exception the build raised), in parallel."""
    from kiln.kernels.sm90 import compile_for_arch, in_parallel

    jobs = [(name, dt, D, cfg, has_pad) for dt, D in configs for name in ("fwd", "dkdv", "dq", "dkdv_dq")
            for cfg in attn_candidates(name, _TORCH_DT[dt], D, tma=True, arch=arch)
            for has_pad in _pad_variants(dt)]

    def build(name, dt, D, cfg, has_pad):
        kernel, sig, flags, aligned = _attn_compile_args(name, cfg, dt, D, has_pad)
        try:
            return compile_for_arch(kernel, sig, flags, cfg.num_warps, cfg.num_stages, _ARCH_TARGET[arch],
                                    aligned=aligned)
        except Exception as e:  # (Triton's compile errors have no common base class)
            return e

    return dict(zip(jobs, in_parallel([functools.partial(build, *job) for job in jobs]), strict=True))
