"""Ring attention: context parallel without the head split (``parallel.cp_attention = "ring"``).

Ulysses (model/sequence_parallel.py) trades a rank's 1/cp of the tokens for 1/cp of the heads,
so cp must divide the heads tensor parallelism leaves (xl: 24 heads, tp=8 leaves 3: cp 2 or 4
impossible). Here a rank keeps its tokens and every head; its keys and values travel around
the cp group instead (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Forward, rank r of n, local q, k, v (B, S/n, H, D) already normed and rotated, at step t = 0..n-1
it holds the keys and values of rank j = r - t (mod n) and merges that block's attention:
    s_j = q @ k_j^T * scale (keys masked by key_ok[:, tokens of j]), lse_j = logsumexp(s_j),
    o_j = softmax(s_j) @ v_j,  lse = logaddexp(lse, lse_j),
    o = o * exp(lse_old - lse) + o_j * exp(lse_j - lse)
while the next block is already on its way (the rotation is issued before the block's math).
Backward with the global o and lse (p_j = exp(s_j - lse) is block j's share of the softmax):
    delta = rowsum(do * o),  dv_j = p_j^T @ do,  ds_j = p_j * (do @ v_j^T - delta),
    dq += ds_j @ k_j * scale,  dk_j = ds_j^T @ q * scale
dk_j and dv_j ride around the ring with k_j and v_j, each rank adding its share; one last
rotation brings them home. Traffic per rank and block: forward (n-1) x K, V; backward (n-1) x
K, V, dK, dV (fp32) + 1 x dK, dV, against Ulysses' 4 all-to-alls of (n-1)/n of q, k, v, out.

Dtype policy: scores, softmax statistics and the accumulators in fp32 (block by block, heads in
chunks of at most ``SCORE_BYTES`` of scores), output in the input dtype. A query that sees no
valid key anywhere returns zeros (lse = -inf), as kiln.kernels.qk_norm_attention does. The
block math is plain PyTorch on every device: correct everywhere, not flash-fast on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

funcol_ops = torch.ops._c10d_functional

# Scores of one block are (B, heads, S/n, S/n) fp32, twice (s and p) while a chunk of heads is
# in flight: 2^28 bytes bounds that to 512 MiB (xl at 4096 px, cp=8: 8,200 tokens a rank, one
# head at a time at batch 1).
SCORE_BYTES = 1 << 28


def _head_chunks(B: int, Sq: int, Sk: int, H: int) -> int:
    return max(1, min(H, SCORE_BYTES // max(1, 4 * B * Sq * Sk)))


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The block math's dtype: fp32, or fp64 for fp64 inputs (the tests' oracle)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q, k, ok, scale):
    """(B, Sq, h, D), (B, Sk, h, D), (B, Sk) -> fp32 (B, h, Sq, Sk), masked keys -inf."""
    s = torch.einsum("bqhd,bkhd->bhqk", _acc(q), _acc(k)) * scale
    return s.masked_fill(~ok[:, None, None, :], float("-inf"))


def _finite(lse):
    """lse where finite, else 0: exp(s - it) is then 0 for rows whose keys are all masked."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))


def block_fwd(q, k, v, ok, scale):
    """One block's attention: -> o (B, Sq, H, D) fp32 (0 for rows with no valid key), lse
    (B, H, Sq) fp32 (-inf for those rows)."""
    B, Sq, H, _ = q.shape
    hc = _head_chunks(B, Sq, k.shape[1], H)
    outs, lses = [], []
    for h in range(0, H, hc):
        s = _scores(q[:, :, h:h + hc], k[:, :, h:h + hc], ok, scale)
        lse = torch.logsumexp(s, dim=-1)  # (B, h, Sq)
        p = torch.exp(s - _finite(lse)[..., None])
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, _acc(v[:, :, h:h + hc])))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


def merge(o, lse, o_j, lse_j):
    """Softmax-weighted sum of two partial attentions over disjoint keys."""
    new = torch.logaddexp(lse, lse_j)  # (B, H, Sq)
    keep = _finite(new)
    w, w_j = torch.exp(lse - keep), torch.exp(lse_j - keep)  # 0 where both are -inf
    return o * w.transpose(1, 2)[..., None] + o_j * w_j.transpose(1, 2)[..., None], new


def block_bwd(do, delta, q, k, v, ok, lse, scale):
    """One block's share of the gradients, given the global lse and delta = rowsum(do * o)
    (B, H, Sq): -> dq, dk, dv fp32 in the shapes of q, k, v."""
    B, Sq, H, _ = q.shape
    hc = _head_chunks(B, Sq, k.shape[1], H)
    dqs, dks, dvs = [], [], []
    for h in range(0, H, hc):
        sl = slice(h, h + hc)
        qh, kh, vh, doh = (_acc(t[:, :, sl]) for t in (q, k, v, do))
        p = torch.exp(_scores(qh, kh, ok, scale) - _finite(lse[:, sl].to(qh.dtype))[..., None])  # (B, h, Sq, Sk)
        dvs.append(torch.einsum("bhqk,bqhd->bkhd", p, doh))
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", doh, vh) - delta[:, sl, :, None].to(qh.dtype))
        dqs.append(torch.einsum("bhqk,bkhd->bqhd", ds, kh) * scale)
        dks.append(torch.einsum("bhqk,bqhd->bkhd", ds, qh) * scale)
    return torch.cat(dqs, dim=2), torch.cat(dks, dim=2), torch.cat(dvs, dim=2)


def _rotate(x: torch.Tensor, group_name: str, rank: int, n: int) -> torch.Tensor:
    """Send ``x`` to rank r+1 of the group, receive rank r-1's (same shape); returns a tensor to
    ``wait_tensor`` on. One functional all-to-all with a single non-empty split: a dispatcher op
    that checkpointing policies, counters and torch.compile see, and NCCL turns into one send and
    one receive."""
    send = [1 if j == (rank + 1) % n else 0 for j in range(n)]
    recv = [1 if j == (rank - 1) % n else 0 for j in range(n)]
    return funcol_ops.all_to_all_single(x.reshape(1, -1).contiguous(), recv, send, group_name)


@torch.library.custom_op("kiln::ring_attention_fwd", mutates_args=())
def _ring_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, scale: float,
                 group_name: str, r: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    oks = key_ok.chunk(n, dim=1)
    kv = torch.stack([k, v])  # (2, B, S/n, H, D): one message per step
    o = lse = None
    for t in range(n):
        nxt = _rotate(kv, group_name, r, n) if t < n - 1 else None  # in flight during this block's math
        o_j, lse_j = block_fwd(q, kv[0], kv[1], oks[(r - t) % n], scale)
        o, lse = (o_j, lse_j) if o is None else merge(o, lse, o_j, lse_j)
        if nxt is not None:
            kv = funcol_ops.wait_tensor(nxt).view_as(kv)
    return o.to(q.dtype), lse


@_ring_fwd_op.register_fake
def _(q, k, v, key_ok, scale, group_name, r, n):
    B, S, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("kiln::ring_attention_bwd", mutates_args=())
def _ring_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, scale: float, group_name: str, r: int,
                 n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    oks = key_ok.chunk(n, dim=1)
    delta = (_acc(do) * _acc(out)).sum(-1).transpose(1, 2)  # (B, H, S/n)
    kv = torch.stack([k, v])
    dq = torch.zeros_like(_acc(q))
    dkv = sent = None  # block j's dk, dv summed over the ranks it passed (fp32), on its way
    for t in range(n):
        nxt = _rotate(kv, group_name, r, n) if t < n - 1 else None
        dq_j, dk_j, dv_j = block_bwd(do, delta, q, kv[0], kv[1], oks[(r - t) % n], lse, scale)
        dq += dq_j
        mine = torch.stack([dk_j, dv_j])
        dkv = mine if sent is None else funcol_ops.wait_tensor(sent).view_as(mine) + mine
        # block j's gradients follow its keys to rank r+1; after the last block they go home
        sent = _rotate(dkv, group_name, r, n)
        if nxt is not None:
            kv = funcol_ops.wait_tensor(nxt).view_as(kv)
    dkv = funcol_ops.wait_tensor(sent).view_as(dkv)
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True)  # no aliased outputs


@_ring_bwd_op.register_fake
def _(do, q, k, v, key_ok, out, lse, scale, group_name, r, n):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_ok, scale, group_name, r, n = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_ok, out, lse)
    ctx.ring = (scale, group_name, r, n)


def _backward(ctx, dout, _dlse):
    q, k, v, key_ok, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_bwd_op(dout.contiguous(), q, k, v, key_ok, out, lse, *ctx.ring)
    return dq, dk, dv, None, None, None, None, None


_ring_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, group,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys.

    Args:
        q, k, v: (B, S/n, H, D) this rank's tokens (QK-norm and RoPE already applied), fp32 /
            fp16 / bf16; rank i of the group holds tokens i·S/n .. (i+1)·S/n of the sequence.
        key_ok: (B, S) bool, True = valid key, for the whole sequence (every rank holds it).
        group: the context-parallel process group (n ranks), or a 1-D DeviceMesh of it.
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        (B, S/n, H, D) in the input dtype; zeros for a query with no valid key.
    """
    if hasattr(group, "get_group"):
        group = group.get_group()
    n = dist.get_world_size(group)
    B, S, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"ring_attention: q, k, v must share one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(key_ok.shape) != (B, S * n):
        raise ValueError(f"ring_attention: key_ok must be (B, S/n x n) = ({B}, {S * n}) for {n} ranks, "
                         f"got {tuple(key_ok.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, _ = _ring_fwd_op(q, k, v, key_ok.bool(), scale, group.group_name, dist.get_rank(group), n)
    return out
