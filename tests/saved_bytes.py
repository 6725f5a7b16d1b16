"""What a forward leaves alive for its backward, measured: the bytes of every tensor storage
created inside it (its inputs included) that only the autograd graph still holds afterwards.

Storages are followed by weak reference (a storage's Python object lives exactly as long as
the storage), so checkpointing, saved-tensor hooks, custom autograd functions and custom ops
all count what they really keep.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class _Created(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {s.data_ptr() for s in _storages((args, kwargs))}
        # a view (of a weight, say) is not new memory: only storages no argument had
        self.storages += [weakref.ref(s) for s in _storages(out) if s.data_ptr() not in seen]
        return out

    def alive(self) -> dict[int, int]:
        """data pointer -> bytes of the recorded storages still allocated."""
        live = (r() for r in self.storages)
        return {s.data_ptr(): s.nbytes() for s in live if s is not None and s.nbytes() > 0}


def _storages(tree) -> list[torch.UntypedStorage]:
    """The storages of the tensors in ``tree``; a wrapper subclass's (DTensor, a functional
    collective's AsyncCollectiveTensor) are its inner tensors'."""
    out = []
    for t in tree_flatten(tree)[0]:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            out += _storages([getattr(t, n) for n in names])
        else:
            out.append(t.untyped_storage())
    return out


def held_for_backward(forward, make_inputs) -> int:
    """Bytes that ``forward(*make_inputs())`` keeps for its backward, its outputs not counted.
    Inputs are made inside the measurement and dropped after the forward: one the graph saves
    counts, one it does not is freed (make them non-leaf, as a previous layer's output is: the
    graph holds every leaf that requires grad)."""
    created = _Created()
    with created:
        inputs = make_inputs()
        out = forward(*inputs)
    del inputs
    gc.collect()  # the Triton interpreter keeps its launch arguments in reference cycles
    outputs = {s.data_ptr() for s in _storages(out)}
    return sum(n for ptr, n in created.alive().items() if ptr not in outputs)
