"""Launch configurations of kiln's Triton kernels, chosen by timing on the GPU once per shape class.

A kernel module lists candidate configs per kernel (attention: :class:`LaunchConfig` tiles, warps,
stages and pointer or TMA tile loads; GroupNorm: its tile / warps / split knobs); every candidate
is compiled for sm_90a in CI (``compile_for_sm90``: no spills, HGMMA dots, 16-byte or TMA loads),
the first one is the default.
On a CUDA device the launcher times all candidates on the real arguments the first time a key
(kernel, dtype, head dim or channels, flags, power-of-two size classes) is seen and keeps the
fastest, as ``triton.autotune`` does, but:

- the default is used, untimed, under the interpreter, with
  ``torch.use_deterministic_algorithms(True)`` (a config picked by timing could differ between a
  run and its resume, and block sizes change the summation order, so losses would not repeat
  bit for bit), while a CUDA graph is being captured, and with ``KILN_AUTOTUNE=0``;
- choices are visible (:func:`choices`), so benchmark rows can say which config they timed.

Candidates must leave their outputs as one launch would (overwrite them, or zero what they
accumulate into within the launch, as the attention's atomic backward does): timing runs each
one on the caller's buffers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # tiles moved by the Tensor Memory Accelerator (tensor descriptors), Hopper+
    # warp-specialised (with tma): Triton adds a producer warp group that only issues the TMA copies
    # and splits the program's kept rows between two consumer warp groups of num_warps warps each
    # (3 · num_warps warps launched), as FlashAttention-3 does
    ws: bool = False

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def __str__(self) -> str:
        tail = "/ws" if self.ws else "/tma" if self.tma else ""
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}{tail}"


_CHOSEN: dict[tuple, object] = {}
_DEFAULTS_ONLY = [False]


def size_class(n: int) -> int:
    """Power-of-two class of a size, so a 4096 + 77 and a 4096 + 120 sequence share one choice."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def tuning_allowed(t: torch.Tensor) -> str | None:
    """Why candidates are not timed for tensor ``t`` (None when they are)."""
    if not t.is_cuda:
        return "not a CUDA tensor"
    if os.environ.get("KILN_AUTOTUNE", "1") == "0":
        return "KILN_AUTOTUNE=0"
    if _DEFAULTS_ONLY[0]:
        return "inside autotune.defaults_only()"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms requested"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def choose(key: tuple, candidates: Sequence, launch: Callable[[object], object], probe: torch.Tensor):
    """The config to launch for ``key``: remembered, timed now, or the default (candidates[0])."""
    if _DEFAULTS_ONLY[0] or len(candidates) == 1:
        return candidates[0]
    if key in _CHOSEN:
        return _CHOSEN[key]
    if tuning_allowed(probe) is not None:
        return candidates[0]
    from triton.testing import do_bench

    times = []
    for cfg in candidates:
        try:
            times.append(do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=25))
        except Exception:  # a candidate the device cannot run (e.g. out of shared memory) drops out
            times.append(float("inf"))
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _CHOSEN[key] = best
    return best


def choices() -> dict[str, str]:
    """Every choice made so far in this process, for benchmark rows and logs."""
    return {"/".join(map(str, k)): str(v) for k, v in _CHOSEN.items()}


@contextlib.contextmanager
def defaults_only() -> Iterator[None]:
    """Launch every kernel with its default config inside the block (benchmarks: tuned vs not)."""
    _DEFAULTS_ONLY[0] = True
    try:
        yield
    finally:
        _DEFAULTS_ONLY[0] = False


def forget() -> None:
    """Drop every choice (tests; a benchmark comparing defaults with tuned configs)."""
    _CHOSEN.clear()
