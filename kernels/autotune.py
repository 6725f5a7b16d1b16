"""Launch configurations of kiln's Triton kernels, chosen by timing on the GPU once per shape class.

A kernel module lists candidate configs per kernel (attention: :class:`LaunchConfig` tiles, warps,
stages and pointer or TMA tile loads; GroupNorm: its kernel kind and tile / warps / split
knobs); every candidate is compiled for sm_90a in CI (``compile_for_sm90``: no spills, HGMMA
dots, 16-byte or TMA loads), the first one is the default.
On a CUDA device the launcher times all candidates on the real arguments the first time a key
(kernel, dtype, head dim or channels, flags, power-of-two size classes; :func:`choose` adds the
GPU's name) is seen and keeps the fastest, as ``triton.autotune`` does, but:

- the default is used, untimed, under the interpreter, with
  ``torch.use_deterministic_algorithms(True)`` (a config picked by timing could differ between a
  run and its resume, and block sizes change the summation order, so losses would not repeat
  bit for bit), while a CUDA graph is being captured, and with ``KILN_AUTOTUNE=0``;
- choices are visible (:func:`choices`), so benchmark rows can say which config they timed, and
  so is every candidate's median (:func:`timings`), so one benchmark run on a GPU also measures
  the alternatives the choice was made against;
- with ``agree`` (GroupNorm, attention), a candidate whose results differ from the default's is
  dropped before it is timed: a kernel that skips work would otherwise win the timing;
- the default is the first candidate whose kernels fit the GPU's shared memory per program
  (:func:`fitting`): lists are ordered for the largest GPU they serve (Hopper's and B200's
  227 KB; attention's pre-Hopper lists an A100's 163 KB), and a smaller one (an sm_86 / sm_89
  GPU, 99 KB: RTX 3090 / 4090, A10, L4, L40S) takes the first one that fits instead of failing
  at launch; none fitting is an error that names the limit and the need.

Candidates must leave their outputs as one launch would (overwrite them, or zero what they
accumulate into within the launch, as the attention's atomic backward does): timing runs each
one on the caller's buffers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import warnings
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
    # the atomic backward's dkdv kernel (with tma): dQ tiles added by TMA bulk reductions instead of
    # per-thread fp32 atomics (qk_norm_attention_triton._dq_atomic_add)
    bulk_dq: bool = False
    # the forward (with tma, not ws): the next key block's scores issued before this block's P·V, so
    # the softmax runs while P·V is on the tensor cores (qk_norm_attention_triton._fwd_block_overlap)
    overlap: bool = False

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def __str__(self) -> str:
        tail = ("/ws" if self.ws else "/tma" if self.tma else "") + ("/bulk-dq" if self.bulk_dq else "")
        tail += "/ovl" if self.overlap else ""
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}{tail}"


_CHOSEN: dict[tuple, object] = {}
_TIMES: dict[tuple, dict[str, float | None]] = {}  # key -> candidate -> median ms (None: dropped)
_DEFAULTS_ONLY = [False]
# None: run_kernel launches; a list: it only compiles, into the list. A context variable, so that
# one thread compiling candidates leaves another thread's launches launching (a process-wide
# flag would have them skip their kernels, silently)
_COMPILING: contextvars.ContextVar[list | None] = contextvars.ContextVar("kiln_compile_only", default=None)
_FIRST_FIT: dict[tuple, int] = {}  # (key, shared-memory limit) -> index of the first candidate that fits


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


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_key(key: tuple, probe: torch.Tensor) -> tuple:
    """``key`` and the device of ``probe`` (the GPU's name, e.g. "NVIDIA H100 80GB HBM3"; "cpu"
    off CUDA): a process that launches on two kinds of GPU keeps a choice for each, where an
    H100's 227 KB TMA config would fail to launch on an L4 (99 KB). The name, not the index: the
    eight GPUs of a node share one choice."""
    return (*key, _gpu_name(probe.device.index) if probe.is_cuda else probe.device.type)


def uses_default(key: tuple, probe: torch.Tensor) -> bool:
    """Whether :func:`choose` takes the default for ``key`` now (nothing remembered, nothing to be
    timed), so a caller can skip building candidates that could only matter to a timing."""
    return _DEFAULTS_ONLY[0] or (device_key(key, probe) not in _CHOSEN and tuning_allowed(probe) is not None)


def choose(key: tuple, candidates: Sequence, launch: Callable[[object], object], probe: torch.Tensor,
           agree: Callable[[object, object], bool] | None = None):
    """The config to launch for ``key``: remembered, timed now, or the default (the first of
    ``candidates`` that fits the GPU, :func:`fitting`; candidates[0] off CUDA).

    With ``agree(default_result, result)``, each other candidate's result is first compared with
    the default's, and one that disagrees is dropped with a warning instead of timed: a wrong
    kernel that skips work is also a fast one (the one-launch GroupNorm's schedule if a Triton
    version miscompiled its ticket atomics, or attention candidates no GPU has run yet). A
    result is a copy of the tensors ``launch`` returns (launches that write into the caller's
    buffers return those buffers)."""
    key = device_key(key, probe)
    if key in _CHOSEN and not _DEFAULTS_ONLY[0]:
        return _CHOSEN[key]
    timed = len(candidates) > 1 and not _DEFAULTS_ONLY[0] and tuning_allowed(probe) is None
    if timed:  # all compiled at once first: fitting's compiles are then Triton cache hits
        _compile_all(candidates, launch)
    candidates = fitting(key, candidates, launch, probe)
    if not timed:
        return candidates[0]
    times = _times(key, candidates, launch, agree)
    _TIMES[key] = {str(c): (ms if math.isfinite(ms) else None) for c, ms in zip(candidates, times, strict=True)}
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _CHOSEN[key] = best
    return best


def _times(key: tuple, candidates: Sequence, launch: Callable[[object], object],
           agree: Callable[[object, object], bool] | None) -> list[float]:
    """Median milliseconds of each candidate; inf for one that fails or disagrees (choose)."""
    from triton.testing import do_bench

    def result(cfg):
        return tuple(t.clone() for t in launch(cfg))

    reference = None
    if agree is not None:
        try:
            reference = result(candidates[0])
        except Exception:  # the default cannot run: it drops out when timed, the rest go unchecked
            pass
    times = []
    for cfg in candidates:
        try:
            if reference is not None and cfg is not candidates[0] and not agree(reference, result(cfg)):
                warnings.warn(f"autotune {'/'.join(map(str, key))}: {cfg} disagrees with the default "
                              f"{candidates[0]}; not used", stacklevel=3)
                times.append(float("inf"))
                continue
            times.append(do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=25))
        except Exception:  # a candidate the device cannot run (e.g. out of shared memory) drops out
            times.append(float("inf"))
    return times


def shared_memory_limit(probe: torch.Tensor) -> int | None:
    """Bytes of shared memory one program may take on ``probe``'s GPU: the opt-in per-block limit
    Triton checks at launch (227 KB on H100 / H200, 163 KB on A100, 99 KB on sm_86 / sm_89);
    None off CUDA (the interpreter has no limit)."""
    if not probe.is_cuda:
        return None
    return torch.cuda.get_device_properties(probe.device).shared_memory_per_block_optin


def shared_bytes(launch: Callable[[object], object], cfg) -> int:
    """The most shared memory any kernel ``launch(cfg)`` launches takes: compiled, not run (a
    compile the first launch would make anyway; Triton caches it)."""
    with compile_only() as compiled:
        launch(cfg)
    return max((k.metadata.shared for k in compiled), default=0)


def first_fit(candidates: Sequence, need: Callable[[object], int], limit: int, what: str) -> int:
    """Index of the first candidate whose ``need(candidate)`` bytes of shared memory fit ``limit``;
    a RuntimeError naming ``what``, the limit and each candidate's need when none does. A
    candidate whose compile fails (a GPU the lists were not checked on) is passed over with a
    warning that says why."""
    needs = []  # what each candidate needs, as the error lists it
    for i, cfg in enumerate(candidates):
        try:
            n = need(cfg)
        except Exception as e:  # (Triton's compile errors have no common base class)
            warnings.warn(f"{what}: {cfg} does not compile for this GPU ({type(e).__name__}: {e}); "
                          "trying the next candidate", stacklevel=3)
            needs.append(f"fails to compile ({type(e).__name__})")
            continue
        if n <= limit:
            return i
        needs.append(f"{n / 1024:.1f} KB")
    listed = ", ".join(f"{c} {n}" for c, n in zip(candidates, needs, strict=True))
    raise RuntimeError(f"{what}: no launch config fits this GPU's {limit / 1024:.0f} KB of shared memory a "
                       f"program (needs: {listed}); run it on a GPU with more, or use the PyTorch reference "
                       f"(kiln.kernels.use_backend('torch'))")


def fitting(key: tuple, candidates: Sequence, launch: Callable[[object], object], probe: torch.Tensor) -> list:
    """``candidates`` from the first one that fits ``probe``'s GPU (:func:`first_fit`, remembered per
    key and limit): the default becomes the first that fits; later ones that do not drop out
    when timed. All of them off CUDA."""
    limit = shared_memory_limit(probe)
    if limit is None:
        return list(candidates)
    if (key, limit) not in _FIRST_FIT:
        what = "/".join(map(str, key))
        _FIRST_FIT[(key, limit)] = first_fit(candidates, lambda cfg: shared_bytes(launch, cfg), limit, what)
    return list(candidates[_FIRST_FIT[(key, limit)]:])


def results_agree(reference: Sequence[torch.Tensor], result: Sequence[torch.Tensor], rtol: float = 0.02) -> bool:
    """Whether two candidates' output tensors match within ``rtol`` of each reference tensor's
    largest magnitude (2%: a few bf16 rounding steps, while a kernel that skipped work is off by
    the size of the data)."""
    return all(torch.allclose(o.float(), r.float(), rtol=rtol, atol=rtol * float(r.abs().max()) + 1e-6)
               for r, o in zip(reference, result, strict=True))


def run_kernel(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; only its compile inside :func:`compile_only` (while
    :func:`choose` compiles all candidates at once, or measures their shared memory). Every
    launch inside a candidate's ``launch`` goes through here."""
    compiled = _COMPILING.get()
    if compiled is not None:
        compiled.append(kernel.warmup(*args, grid=grid, **kwargs))
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def compile_only() -> Iterator[list]:
    """Inside the block, in this thread (context) only, :func:`run_kernel` compiles instead of
    launching; yields the list of compiled kernels (Triton's warmup results)."""
    compiled: list = []
    token = _COMPILING.set(compiled)
    try:
        yield compiled
    finally:
        _COMPILING.reset(token)


def _compile_all(candidates: Sequence, launch: Callable[[object], object]) -> None:
    """Compile every candidate's kernels on a thread pool before any is timed (Triton's
    AsyncCompileMode; ptxas and most of the MLIR passes run outside the GIL). Measured on 2 CPU
    cores: 4 attention forward candidates for sm_90a in 8.2 s instead of 13.6 s serially (the
    GPU machine has 16 cores for a kernel's 7-8 candidates). A Triton without
    AsyncCompileMode compiles each candidate when it is first timed, as before."""
    import triton

    async_mode = getattr(triton, "AsyncCompileMode", None)
    outer = getattr(getattr(triton.runtime, "_async_compile", None), "active_mode", None)
    workers = min(len(candidates), os.cpu_count() or 1)
    if async_mode is None or workers < 2 or (outer is not None and outer.get() is not None):
        return  # (one AsyncCompileMode at a time: a caller's own, torch.compile's say, stays in charge)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool, async_mode(pool, ignore_errors=True), compile_only():
        for cfg in candidates:
            try:
                launch(cfg)
            except Exception:  # it fails again when timed, and drops out there
                pass


def choices() -> dict[str, str]:
    """Every choice made so far in this process, for benchmark rows and logs."""
    return {"/".join(map(str, k)): str(v) for k, v in _CHOSEN.items()}


def timings() -> dict[str, dict[str, float | None]]:
    """Each timed key's candidates with their median milliseconds (None: failed, or disagreed with
    the default), for benchmark rows: the model behind a candidate list is checked against them."""
    return {"/".join(map(str, k)): dict(v) for k, v in _TIMES.items()}


@contextlib.contextmanager
def defaults_only() -> Iterator[None]:
    """Launch every kernel with its default config inside the block (benchmarks: tuned vs not)."""
    _DEFAULTS_ONLY[0] = True
    try:
        yield
    finally:
        _DEFAULTS_ONLY[0] = False


def forget() -> None:
    """Drop every choice and timing (tests; a benchmark comparing defaults with tuned configs)."""
    _CHOSEN.clear()
    _TIMES.clear()
    _FIRST_FIT.clear()
