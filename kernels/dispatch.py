"""The one dispatch point of kiln's ops.

Every public op (``kiln.kernels.rms_norm`` & co.) is a call to :func:`dispatch` with the op's
name. Backends register an implementation per op together with a ``not_supported_reasons``
function that inspects the actual arguments (device, dtype, shapes) and returns why it cannot
run them, as xformers' fmha dispatch does. Selection:

- inside ``with use_backend("triton"):`` every op that backend implements runs on it; if it
  refuses the arguments, the error lists every reason it gave (a forced backend never silently
  falls back). Ops it does not implement at all take the automatic choice, so a whole model can
  run "on triton" while only some of its ops have Triton kernels;
- otherwise the backends are tried in ``PRIORITY`` order and the first that accepts runs.

Backend availability (is Triton importable, is there a GPU or ``TRITON_INTERPRET=1``, is the
compiled extension loaded) is reported by :func:`available_backends`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kiln.kernels import csrc

# A CUDA grid takes at most 65535 blocks along y. Kernels that put a batch-sized count there
# (attention: B·H, with query blocks along x so that programs running together share a few
# heads' K and V in L2; the csrc NCHW GroupNorm: N·G, with a group's splits along x) run past it
# on chunks of whole batch rows, which are independent: views in, one copy joins the outputs.
# Reached by window attention (batch x windows x heads: 128 x 64 x 12 = 98,304) and by video
# VAEs folding frames into the batch (2,048 frames x 32 groups = 65,536).
MAX_GRID_Y = 65535
# Triton kernels index with 32-bit offsets (index x stride products in int32; 64-bit address
# math would take registers and instructions in every loop), so each tensor they touch must
# span at most MAX_OFFSET elements from its base. Past it (an SDXL VAE decoding 17 images at
# 1024²: 17·128·1024² = 2.28e9 elements) they too run on batch chunks, each view's base at its
# first row; one batch row past it is refused with that reason (csrc kernels index with 64 bits).
MAX_OFFSET = 2**31 - 1


def batch_chunks(rows: int, grid_units: int = 0, within: int | None = None) -> list[slice]:
    """Slices of ``rows`` batch rows, each at most MAX_GRID_Y // ``grid_units`` rows (the programs
    one row puts on a grid's y axis; 0: none) and at most ``within`` rows (rows_within_offsets);
    one slice, all of them, below both limits."""
    per = min(MAX_GRID_Y // grid_units if grid_units else rows, within if within is not None else rows)
    per = max(1, per)
    return [slice(b, min(b + per, rows)) for b in range(0, rows, per)]


def rows_within_offsets(*tensors: torch.Tensor | tuple[int, ...]) -> int:
    """How many batch rows (dim 0) of these tensors' layouts fit within MAX_OFFSET elements of
    the first one's start, however many the tensors have (0: not even one row does). A shape
    stands for the contiguous tensor a kernel writes."""
    rows = MAX_OFFSET
    for t in tensors:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
        strides = t.stride() if isinstance(t, torch.Tensor) else [math.prod(shape[i + 1:]) for i in range(len(shape))]
        one = sum((n - 1) * abs(st) for n, st in zip(shape[1:], strides[1:], strict=True) if n > 0)
        if one > MAX_OFFSET:
            return 0
        if strides[0]:
            rows = min(rows, (MAX_OFFSET - one) // abs(strides[0]) + 1)
    return rows


def batch_rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``t[rows]``, or None for an absent optional argument."""
    return None if t is None else t[rows]


def join_batch(parts: list) -> torch.Tensor | tuple:
    """Per-chunk outputs (tensors or tuples of them) joined along the batch dim."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return torch.cat(parts)


# Fastest first; "torch" (the plain-PyTorch reference) accepts everything and comes last.
PRIORITY = ("triton", "csrc", "torch")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_backend", default=None)
# The same choice as a plain module global, read while torch.compile traces: dynamo reads module
# globals and guards on them (a change recompiles), but torch 2.11, the GPU machine's, cannot
# trace ContextVar.get (fullgraph=True failed). Process-wide, so only the ContextVar is per thread.
_forced_in_compile: str | None = None


def current_backend() -> str | None:
    """The backend ``use_backend`` forces here (None: automatic selection)."""
    if torch.compiler.is_compiling():
        return _forced_in_compile
    return _forced.get()


class BackendError(RuntimeError):
    """A forced backend cannot run the given arguments; the message lists every reason."""


@dataclass(frozen=True)
class Impl:
    fn: Callable
    not_supported_reasons: Callable[..., list[str]]


_REGISTRY: dict[str, dict[str, Impl]] = {}


def _accept_all(*args, **kwargs) -> list[str]:
    return []


def register(op: str, backend: str, fn: Callable, reasons: Callable | None = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in PRIORITY:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(PRIORITY)}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, reasons or _accept_all)


# Looked up once: find_spec walks sys.path (~100 µs a call, measured on the CI machine), and
# every op call asks for the availability of its backends.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason() -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not set to 1"
    return None


@contextlib.contextmanager
def on_device_of(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s GPU the current device inside the block. Triton launches a kernel on the
    current device and its current stream, not on its tensors' device: with a model spread over
    GPUs in one process (a diffusers ``device_map``, pipeline stages on cuda:0 and cuda:1) the
    kernels for cuda:1's tensors would run on cuda:0, unordered with cuda:1's stream. (The csrc
    ops take a device guard in C++.) Every Triton op's body runs inside one."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def triton_device_reason(t: torch.Tensor) -> str | None:
    """Why the Triton backend will not take tensor ``t`` (None when it will).

    CUDA tensors always; CPU tensors only under TRITON_INTERPRET=1 *and* when ``triton`` is
    forced with ``use_backend`` (how CI tests the kernels): in automatic selection the plain
    PyTorch reference stays the CPU path, the interpreter being ~1000x slower.
    """
    if t.is_cuda:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {t.device.type}; Triton needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if current_backend() != "triton":
        return "CPU tensors run on the reference unless use_backend('triton') forces the interpreter"
    return None


def csrc_unavailable_reason() -> str | None:
    return csrc.load_error()


def csrc_device_reason(t: torch.Tensor, op: str) -> str | None:
    """Why the csrc backend will not take tensor ``t`` for ``op`` (None when it will)."""
    return csrc.device_reason(t, op, forced=current_backend() == "csrc")


_AVAILABILITY: dict[str, Callable[[], str | None]] = {
    "torch": lambda: None,
    "triton": triton_unavailable_reason,
    "csrc": csrc_unavailable_reason,
}


def available_backends() -> dict[str, str | None]:
    """Map each backend to ``None`` when it can run here, else the reason it cannot."""
    return {name: _AVAILABILITY[name]() for name in PRIORITY}


def implemented_ops() -> dict[str, list[str]]:
    """Map each registered op to the backends that implement it."""
    return {op: [b for b in PRIORITY if b in impls] for op, impls in sorted(_REGISTRY.items())}


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op inside the block onto backend ``name`` (``None`` restores auto)."""
    if name is not None and name not in PRIORITY:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(PRIORITY)}")
    global _forced_in_compile
    token, outer = _forced.set(name), _forced_in_compile
    _forced_in_compile = name
    try:
        yield
    finally:
        _forced.reset(token)
        _forced_in_compile = outer


def _refusals(op: str, backend: str, args: tuple, kwargs: dict) -> list[str]:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return [f"{backend} has no implementation of {op}"]
    down = _AVAILABILITY[backend]()
    if down is not None:
        return [down]
    return impl.not_supported_reasons(*args, **kwargs)


def select(op: str, *args, **kwargs) -> str:
    """Name of the backend that would run ``op`` on these arguments."""
    forced = current_backend()
    if forced is not None and forced in _REGISTRY.get(op, {}):
        reasons = _refusals(op, forced, args, kwargs)
        if reasons:
            raise BackendError(f"backend {forced!r} cannot run {op}: " + "; ".join(reasons))
        return forced
    collected = []
    for backend in PRIORITY:
        reasons = _refusals(op, backend, args, kwargs)
        if not reasons:
            return backend
        collected.append(f"{backend}: " + "; ".join(reasons))
    raise BackendError(f"no backend can run {op}: " + " | ".join(collected))


def implementation(op: str, *args, **kwargs) -> Callable:
    """The function that runs ``op`` on these arguments (the selected backend's): to run it
    again later, outside a use_backend block, on the same backend (model/layers.RemadeInputLinears)."""
    return _REGISTRY[op][select(op, *args, **kwargs)].fn


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on the selected backend."""
    return implementation(op, *args, **kwargs)(*args, **kwargs)


def compute_dtype(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """The dtype a reference computes in: at least fp32 when upcasting (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32) if upcast else dtype
