"""Sequence-parallel boundaries of the MMDiT blocks (no-ops when tensor / context parallelism is off).

Under tensor parallelism (engine/parallel.py) every block keeps its activations as local
tensors split along the sequence, (B, S/tp, W): LayerNorm, adaLN modulation, gates and residual
adds run on 1/tp of the tokens. The column-parallel linears (QKV, MLP in, modulation) all-gather
the sequence; the row-parallel ones (attention out, MLP out) reduce-scatter back to it. These
helpers mark those boundaries with DTensor so that autograd inserts the matching collectives.

Under context parallelism (Ulysses) a rank holds 1/cp of every sample's tokens through the
whole model with whole weights. Attention needs every token: ``seq_to_heads`` all-to-alls the
(B, S/cp, H, D) projections into (B, S, H/cp, D) and ``heads_to_seq`` sends the output back.
Each all-to-all moves (cp-1)/cp of its tensor, 4 per block (q, k, v in one, and the output)
against TP's 4 all-gathers / reduce-scatters of the (wider) activations.

A block that is not checkpointed runs under :class:`Regather` (engine/parallel.py): the
column-parallel matmuls keep their gathered inputs as this rank's shard and gather them again
in the backward, as Megatron-LM's sequence parallelism does.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

funcol_ops = torch.ops._c10d_functional


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
    Under :class:`Regather` the linears keep ``x`` (this rank's rows) for their backward instead.
    """
    if tp is None:
        return x
    full = DTensor.from_local(x, tp, [Shard(1)], run_check=False).redistribute(tp, [Replicate()])
    if _REGATHER:
        _REGATHER[-1].note(full, x)
    return full


class _Rows:
    """One gathered input's rows on this rank; gathered again, once, for all the saved views."""

    def __init__(self, shard: torch.Tensor, mesh: DeviceMesh):
        self.shard, self.mesh, self.uses, self.full = shard, mesh, 0, None

    def gathered(self) -> torch.Tensor:
        full = self.full
        if full is None:
            full = gather_seq(self.shard, self.mesh)
        self.uses -= 1
        self.full = full if self.uses > 0 else None  # held until its last view is unpacked
        return full


class _SavedView:
    """What the graph keeps of a view of a gathered input: its rows and where it sat."""

    def __init__(self, rows: _Rows, local: torch.Tensor, offset: int, saved: torch.Tensor):
        self.rows, self.size, self.stride, self.offset = rows, local.size(), local.stride(), offset
        dt = isinstance(saved, DTensor)
        self.spec = (saved.device_mesh, saved.placements, saved.shape, saved.stride()) if dt else None


_REGATHER: list[Regather] = []  # the scope gathered_input reports to


class Regather:
    """``forward`` of a block under tensor parallelism that keeps what it all-gathers as this rank's
    rows: every saved view of a :func:`gathered_input` output is packed as the shard it came
    from, and the backward all-gathers it again when it needs it (one gather for the views of
    the same input: a single-stream block's QKV and MLP-in share one). Without it every TP rank
    holds the column-parallel matmuls' inputs whole, 4 bytes per token and unit of width of a
    double-stream block's 28 (2 of a single-stream block's 22): at tp=2 16.3 -> 14.3, 12.2 -> 11.2
    (tests/block_memory.py), for 2 all-gathers more a block in the backward (TP traffic x1.25).

    Views are recognised by their storage (a weak reference to it, so that memory freed and
    reused during the forward is not mistaken for a gathered input) and rebuilt with the same
    size, stride and offset, as a DTensor with the same placements where they were one."""

    def __init__(self, forward):
        # an object, not a closure: a deep copy of the block gets one around its own forward
        self.forward, self.inputs = forward, {}  # storage pointer -> (its weak ref, offset, dtype, rows)

    def note(self, full: DTensor, shard: torch.Tensor) -> None:
        local = full._local_tensor  # not to_local(): no autograd node for a lookup
        if not local.is_contiguous():  # gathered again it is contiguous: its views would not fit
            return
        storage = local.untyped_storage()
        rows = _Rows(shard.detach(), full.device_mesh)
        self.inputs[storage.data_ptr()] = (weakref.ref(storage), local.storage_offset(), local.dtype, rows)

    def pack(self, saved: torch.Tensor):
        local = saved._local_tensor if isinstance(saved, DTensor) else saved
        try:
            storage = local.untyped_storage()
            entry = self.inputs.get(storage.data_ptr())
        except (RuntimeError, NotImplementedError):  # no real storage (a fake or wrapper tensor)
            return saved
        if entry is None or entry[0]() is not storage or entry[2] != local.dtype:
            return saved
        _, offset, _, rows = entry
        rows.uses += 1
        return _SavedView(rows, local, local.storage_offset() - offset, saved)

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, _SavedView):
            return packed
        full = packed.rows.gathered()
        view = full.as_strided(packed.size, packed.stride, full.storage_offset() + packed.offset)
        if packed.spec is None:
            return view
        mesh, placements, shape, stride = packed.spec
        return DTensor.from_local(view, mesh, placements, run_check=False, shape=shape, stride=stride)

    def __call__(self, *args):
        _REGATHER.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return self.forward(*args)
        finally:
            _REGATHER.pop()
            self.inputs.clear()


def local_replicated(t: torch.Tensor) -> torch.Tensor:
    """A replicated tensor (modulation vectors, QK-norm weights) used on this rank's tokens or
    heads only: its gradient here is one rank's share of a sum over the TP group."""
    if isinstance(t, DTensor):
        return t.to_local(grad_placements=[Partial()])
    return t


def _all_to_all(x: torch.Tensor, group, split_dim: int, cat_dim: int) -> torch.Tensor:
    """Chunk j of ``x`` along ``split_dim`` goes to rank j; what rank j sent is concatenated
    along ``cat_dim`` in rank order."""
    n = dist.get_world_size(group)
    send = x.unflatten(split_dim, (n, -1)).movedim(split_dim, 0).contiguous()  # (n, ...) chunk j for rank j
    # the functional op (not dist.all_to_all_single): one dispatcher op, which checkpointing
    # policies (engine/parallel.py) and tests/count_collectives.py see
    recv = funcol_ops.all_to_all_single(send, [1] * n, [1] * n, group.group_name)
    recv = funcol_ops.wait_tensor(recv)
    return recv.movedim(0, cat_dim).flatten(cat_dim, cat_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, split_dim: int, cat_dim: int):
        ctx.group, ctx.dims = group, (split_dim, cat_dim)
        return _all_to_all(x, group, split_dim, cat_dim)

    @staticmethod
    def backward(ctx, grad):
        split_dim, cat_dim = ctx.dims
        return _all_to_all(grad, ctx.group, cat_dim, split_dim), None, None, None


def seq_to_heads(x: torch.Tensor, cp: DeviceMesh | None, head_dim: int = 2) -> torch.Tensor:
    """(B, S/cp, H, ...) this rank's tokens, every head -> (B, S, H/cp, ...) every token of this
    rank's heads, tokens in rank order (rank 0's, then rank 1's, ...)."""
    if cp is None:
        return x
    return _AllToAll.apply(x, cp.get_group(), head_dim, 1)


def heads_to_seq(x: torch.Tensor, cp: DeviceMesh | None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (B, S, H/cp, D) -> (B, S/cp, H, D)."""
    if cp is None:
        return x
    return _AllToAll.apply(x, cp.get_group(), 1, 2)


def local_tokens(x: torch.Tensor, cp: DeviceMesh | None) -> torch.Tensor:
    """This rank's 1/cp of the tokens (dim 1) of a tensor every rank of the cp group holds;
    the gradient of the others stays zero here (they are their own ranks' share)."""
    if cp is None:
        return x
    return x.chunk(cp.size(), dim=1)[cp.get_local_rank()]
