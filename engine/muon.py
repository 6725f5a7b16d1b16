"""Muon for sharded parameters: the update of ``torch.optim.Muon``, for DTensors of any layout.

Muon orthogonalises each weight matrix's momentum with a Newton-Schulz iteration, which needs
the whole matrix; torch.optim.Muon takes plain tensors only, so FSDP2 shards, tensor-parallel
pieces and pipeline stages could not use it. Here the momentum lives on the shards (it is
elementwise) and only the orthogonalisation is redistributed:

- matrices of one global shape and layout form a group; each gets an owner among the ranks that
  hold its shards (round-robin, across groups), and one all-to-all sends every shard to its
  owner (in bf16, which the iteration rounds to first anyway: (N-1)/N of a rank's momentum
  shards, half their fp32 bytes);
- each owner runs Newton-Schulz on its whole matrices: 1/N of the work per rank (a replica
  group under HSDP does the same share as the others, so nothing crosses replicas);
- a second all-to-all returns each rank's shard of the results, and every rank applies its shard
  of the update.

That is for weights sharded over one mesh dimension (FSDP, HSDP, TP alone, FSDP over dp_shard x
cp). FSDP x TP shards a weight over two (and strided): there DTensor redistributes the stacked
group instead, with the collectives it picks (on CPU all-gathers and slicing: N times the bytes).

In one process (plain tensors) it is the same per-matrix iteration. The arithmetic of each
matrix is torch.optim.Muon's (bf16 iteration, quintic coefficients, Frobenius normalisation,
lr adjustment): equal to it bit for bit in one process, and on sharded weights equal bit for bit
to one process given the same gradients (tests/test_muon.py, tests/muon_layouts.py).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, slope at 0 maximised (Jordan et al.)
NS_STEPS = 5
LR_ADJUSTMENTS = ("original", "match_rms_adamw")


def newton_schulz(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = 1e-7) -> torch.Tensor:
    """(m, n) -> the approximately orthogonal factor U·S'·Vᵀ (S' ~ 1) of g, in bf16."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.shape[0] > g.shape[1]
    if tall:  # iterate on the wide side: X Xᵀ is the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    return x.T if tall else x


def adjusted_lr(lr: float, how: str, shape: torch.Size) -> float:
    """original: lr·sqrt(max(1, m/n)); match_rms_adamw (Moonshot): 0.2·sqrt(max(m, n))·lr, an
    update RMS like AdamW's, so AdamW's learning rate carries over."""
    m, n = shape[:2]
    return lr * (0.2 * math.sqrt(max(m, n)) if how == "match_rms_adamw" else math.sqrt(max(1, m / n)))


def _chunks(size: int, n: int) -> list[int]:
    """How torch.chunk (and so DTensor's Shard) splits ``size`` over n ranks: ceil(size / n)
    each, the last ones shorter or empty."""
    c = -(-size // n)
    return [max(0, min(c, size - r * c)) for r in range(n)]


def _one_shard_dim(u: DTensor) -> tuple[int, int] | None:
    """(mesh dim, tensor dim) when exactly one mesh dimension shards the weight, with a plain
    Shard (FSDP, HSDP's shard dim, TP alone); None for 2-D sharding (FSDP x TP)."""
    split = [(i, p) for i, p in enumerate(u.placements) if not isinstance(p, Replicate)]
    if len(split) == 1 and type(split[0][1]) is Shard:
        return split[0][0], split[0][1].dim
    return None


class _Owners:
    """Round-robin owners across groups, so that groups smaller than the shard group do not all
    land on its first ranks."""

    def __init__(self):
        self.next = 0

    def take(self, k: int, n: int) -> list[int]:
        owners = [(self.next + i) % n for i in range(k)]
        self.next = (self.next + k) % n
        return owners


def _all_to_all(pieces: list[torch.Tensor], recv_numels: list[int], group) -> list[torch.Tensor]:
    """Send pieces[j] (flat) to rank j; returns what each rank r sent here (flat, recv_numels[r])."""
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(recv, send, recv_numels, [p.numel() for p in pieces], group=group)
    return list(recv.split(recv_numels))


def _orthogonalize_sharded(us: list[DTensor], mesh_dim: int, dim: int, owners: list[int], **ns) -> list[DTensor]:
    """Newton-Schulz of k same-shape matrices sharded along ``dim`` over one mesh dimension:
    each matrix's shards go to its owner (one all-to-all, bf16: what the iteration rounds to
    anyway), the owner iterates on the whole matrix, the results' shards come back (another)."""
    mesh, group = us[0].device_mesh, us[0].device_mesh.get_group(mesh_dim)
    n, me = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    shape = us[0].shape
    sizes = _chunks(shape[dim], n)
    other = shape[1 - dim]
    local = [u.to_local().bfloat16() for u in us]  # this rank's (sizes[me] rows or columns) of each
    mine = [i for i, o in enumerate(owners) if o == me]
    # matrices out: to rank j, my shard of each matrix j owns; in: every rank's shard of mine
    got = _all_to_all([torch.stack([local[i] for i, o in enumerate(owners) if o == j]) if j in owners
                       else local[0].new_empty(0) for j in range(n)],
                      [len(mine) * sizes[r] * other for r in range(n)], group)
    parts = [g.view(len(mine), *((sizes[r], other) if dim == 0 else (other, sizes[r]))) for r, g in enumerate(got)]
    whole = torch.cat(parts, dim=dim + 1)  # (len(mine), m, n)
    done = [newton_schulz(x, **ns) for x in whole]
    # results back: to rank r, its rows (dim 0) or columns (dim 1) of each matrix I own
    bounds = [sum(sizes[:r]) for r in range(n + 1)]
    back = _all_to_all([torch.stack([x.narrow(dim, bounds[r], sizes[r]) for x in done]) if done
                        else local[0].new_empty(0) for r in range(n)],
                       [owners.count(j) * local[0].numel() for j in range(n)], group)
    from_owner = [iter(b.view(owners.count(j), *local[0].shape)) for j, b in enumerate(back)]
    return [DTensor.from_local(next(from_owner[o]), mesh, u.placements, shape=u.shape, stride=u.stride(),
                               run_check=False) for u, o in zip(us, owners, strict=True)]


def _orthogonalize_any(us: list[DTensor], **ns) -> list[DTensor]:
    """Any layout (FSDP x TP's 2-D and strided shards): DTensor redistributes the stacked
    (k, m, n) bf16 updates so that each rank holds whole matrices (dim 0 split over the mesh
    dimensions that shard the weight) and back, with the collectives DTensor picks."""
    stacked = torch.stack([u.bfloat16() for u in us])  # (k, m, n), placements shifted by one dim
    mesh = stacked.device_mesh
    layout = [Replicate() if isinstance(p, Replicate) else Shard(0) for p in us[0].placements]
    mine = stacked.redistribute(mesh, layout)  # this rank's whole matrices, (k_r, m, n)
    local = mine.to_local()
    done = torch.stack([newton_schulz(x, **ns) for x in local]) if len(local) else local
    back = DTensor.from_local(done, mesh, layout, shape=mine.shape, stride=mine.stride())
    return list(back.redistribute(mesh, stacked.placements).unbind(0))


def orthogonalize(updates: list[torch.Tensor], **ns) -> list[torch.Tensor]:
    """Newton-Schulz of every matrix in ``updates`` (plain tensors or DTensors, any layout); the
    results come back in each input's layout."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        if isinstance(u, DTensor):
            groups[(tuple(u.shape), u.device_mesh, tuple(u.placements))].append(i)
        else:
            out[i] = newton_schulz(u, **ns)
    owners = _Owners()
    for idx in groups.values():
        us = [updates[i] for i in idx]
        simple = _one_shard_dim(us[0])
        if simple is None:
            results = _orthogonalize_any(us, **ns)
        else:
            mesh_dim, dim = simple
            results = _orthogonalize_sharded(us, mesh_dim, dim, owners.take(len(us), us[0].device_mesh.size(mesh_dim)),
                                             **ns)
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


class ShardedMuon(torch.optim.Optimizer):
    """``torch.optim.Muon`` (same hyperparameters, defaults and state: ``momentum_buffer``) whose
    parameters may be DTensors sharded over FSDP, TP and HSDP meshes; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None):
        if adjust_lr_fn not in (None, *LR_ADJUSTMENTS):
            raise ValueError(f"adjust_lr_fn must be one of {LR_ADJUSTMENTS} or None, got {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            mu, updates = group["momentum"], []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
            ns = dict(coefficients=group["ns_coefficients"], steps=group["ns_steps"], eps=group["eps"])
            lr, decay = group["lr"], group["weight_decay"]
            for p, o in zip(params, orthogonalize(updates, **ns), strict=True):
                p.mul_(1 - lr * decay)
                p.add_(o, alpha=-adjusted_lr(lr, group["adjust_lr_fn"] or "original", p.shape))
        return loss
