"""Sequence-parallel boundaries of the MMDiT blocks (no-ops when tensor parallelism is off).

Under tensor parallelism (engine/parallel.py) every block keeps its activations as local
tensors split along the sequence, (B, S/tp, W): LayerNorm, adaLN modulation, gates and residual
adds run on 1/tp of the tokens. The column-parallel linears (QKV, MLP in, modulation) all-gather
the sequence; the row-parallel ones (attention out, MLP out) reduce-scatter back to it. These
helpers mark those boundaries with DTensor so that autograd inserts the matching collectives.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


def scatter_seq(x: torch.Tensor, tp: DeviceMesh | None) -> torch.Tensor:
    """Full (B, S, W) on every rank -> this rank's (B, S/tp, W); backward all-gathers."""
    if tp is None:
        return x
    return DTensor.from_local(x, tp, [Replicate()], run_check=False).redistribute(tp, [Shard(1)]).to_local()


def gather_seq(x: torch.Tensor, tp: DeviceMesh | None) -> torch.Tensor:
    """Local (B, S/tp, W) -> full (B, S, W) as a plain tensor; backward keeps this rank's rows."""
    if tp is None:
        return x
    return DTensor.from_local(x, tp, [Shard(1)], run_check=False).redistribute(tp, [Replicate()]).to_local()


def gathered_input(x: torch.Tensor, tp: DeviceMesh | None) -> torch.Tensor:
    """Input of column-parallel linears: a replicated DTensor of the full sequence.

    Several linears may consume it (QKV and MLP-in of a single-stream block): their input
    gradients add up as one partial sum, which the backward of this gather reduce-scatters once.
    """
    if tp is None:
        return x
    return DTensor.from_local(x, tp, [Shard(1)], run_check=False).redistribute(tp, [Replicate()])


def local_replicated(t: torch.Tensor) -> torch.Tensor:
    """A replicated tensor (modulation vectors, QK-norm weights) used on this rank's tokens or
    heads only: its gradient here is one rank's share of a sum over the TP group."""
    if isinstance(t, DTensor):
        return t.to_local(grad_placements=[Partial()])
    return t
