"""Ring attention: context parallel without the head split (``parallel.cp_attention = "ring"``).

Ulysses (model/sequence_parallel.py) trades a rank's 1/cp of the tokens for 1/cp of the heads,
so cp must divide the heads tensor parallelism leaves (xl: 24 heads, tp=8 leaves 3: cp 2 or 4
impossible). Here a rank keeps its tokens and every head; its keys and values travel around
the cp group instead (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Forward, rank r of n, local q, k, v (B, S/n, H, D) normed and rotated (by the op itself when it is
given the QK-norm weights: the backward renorms rather than keep the normed copies), at step t = 0..n-1
it holds the keys and values of rank j = r - t (mod n) and merges that block's attention:
    s_j = q @ k_j^T * scale (keys masked by key_ok[:, tokens of j]), lse_j = logsumexp(s_j),
    o_j = softmax(s_j) @ v_j,  lse = logaddexp(lse, lse_j),
    o = o * exp(lse_old - lse) + o_j * exp(lse_j - lse)
while the next block is already on its way (the rotation is issued before the block's math).
Backward with the global o and lse (p = exp(s - lse) is a block's share of the softmax): the
keys stay and the queries travel. Rank r computes delta = rowsum(do * o) of its queries once and
sends q, do, lse, delta (one message) around the ring; at step t it holds those of rank j = r - t
(mod n) and runs the block of q_j against its own k, v:
    dv += p^T @ do_j,  ds = p * (do_j @ v^T - delta_j),  dk += ds^T @ q_j * scale,
    dq_j += ds @ k * scale
dk and dv add up where their keys live; dq_j rides with q_j (fp32), each rank adding its share,
and one last rotation brings it home. Traffic per rank and block: forward (n-1) x K, V;
backward (n-1) x q, dO (+ lse, delta: 8 bytes a row and head) and n x dQ (fp32), against
Ulysses' 4 all-to-alls of (n-1)/n of q, k, v, out. (Keys travelling instead, with dK, dV in fp32
behind them, as kiln did until Dec 7, sends n x dK, dV: at cp=4 in bf16, 44 against 28 bytes per
element of K in the backward, 56 against 40 a step with the forward.)

Blocks run one of two ways, chosen once per call (``ring_attention``) and kept for its backward:
- flash: kiln's Triton kernels (kiln.kernels.qk_norm_attention_triton.attention_fwd / _bwd,
  those of qk_norm_attention after its norm pass) on each block: no score matrix in memory,
  a block's output and gradients in the input dtype, merged and summed in fp32 (as
  FlashAttention-based rings do; n roundings where one kernel rounds once: with fp32 outputs
  7 of the kernels' 16-bit launch candidates spill registers or pass Hopper's 227 KB of shared
  memory, by the sm_90a compile check of 2026-12-07). Taken wherever those kernels take q, k,
  v (flash_reasons: a CUDA GPU of compute capability >= 8.0, fp32 / fp16 / bf16, head dim a
  multiple of 16 up to 256; the CPU only under TRITON_INTERPRET=1 with use_backend("triton"),
  how the tests run it);
- eager: plain PyTorch, scores, softmax statistics and accumulators in fp32 (fp64 for fp64
  inputs), heads in chunks of at most ``SCORE_BYTES`` of scores; correct everywhere, the CPU's
  path.
Output in the input dtype. A query that sees no valid key anywhere returns zeros (lse = -inf),
as kiln.kernels.qk_norm_attention does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kiln.kernels.dispatch import MAX_GRID_Y, compute_dtype, on_device_of
from kiln.kernels.qk_norm_rope import check_args, norm_rope, norm_rope_bwd

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


def flash_block_fwd(q, k, v, ok, scale):
    """block_fwd on the Triton flash kernel, for q, k, v of one shape (the kernels take as many
    keys as queries; every rank holds S/n tokens): -> o (B, Sq, H, D) fp32 (the kernel's, in the
    input dtype, widened for the merge), lse (B, H, Sq) fp32 natural log, -inf for rows with no
    valid key."""
    from kiln.kernels import qk_norm_attention_triton as T

    with on_device_of(q):
        o, lse2 = T.attention_fwd(q, k, v, ok, scale, False)  # lse2: base 2, +1e30 for rows without a key
    lse2 = lse2[..., :q.shape[1]]
    return o.float(), torch.where(lse2 < 1e29, lse2 * math.log(2.0), float("-inf"))


def _side(rows: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, H, S) fp32 rows in the flash backward's layout: padded to side_cols(S) with ``fill``."""
    from kiln.kernels.qk_norm_attention_triton import side_cols

    B, H, S = rows.shape
    out = rows.new_full((B, H, side_cols(S)), fill)
    out[..., :S] = rows
    return out


def flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """The merged lse (B, H, S) in the flash backward's layout: base 2, rows padded to
    side_cols(S), +1e30 where no key was valid (so that every p recomputes to 0)."""
    return _side(torch.where(torch.isfinite(lse), lse * (1.0 / math.log(2.0)), 1e30), 1e30)


def flash_block_bwd(do, delta, q, k, v, ok, lse, scale):
    """block_bwd on the Triton flash kernels, same arguments (the global lse and delta of q's
    rows): -> dq, dk, dv in the input dtype."""
    from kiln.kernels import qk_norm_attention_triton as T

    with on_device_of(q):
        return T.attention_bwd(do, q, k, v, None, flash_lse(lse), ok, scale, False, delta=_side(delta, 0.0))


def use_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this call's blocks run on the flash kernels (see the module docstring); one
    launch covers all B·H rows of a block, so past MAX_GRID_Y of them the eager path runs."""
    from kiln.kernels.qk_norm_attention import flash_reasons

    return not flash_reasons(q, k, v) and q.shape[0] * q.shape[2] <= MAX_GRID_Y


def _rotate(x: torch.Tensor, group_name: str, rank: int, n: int) -> torch.Tensor:
    """Send ``x`` to rank r+1 of the group, receive rank r-1's (same shape); returns a tensor to
    ``wait_tensor`` on. One functional all-to-all with a single non-empty split: a dispatcher op
    that checkpointing policies, counters and torch.compile see, and NCCL turns into one send and
    one receive."""
    send = [1 if j == (rank + 1) % n else 0 for j in range(n)]
    recv = [1 if j == (rank - 1) % n else 0 for j in range(n)]
    return funcol_ops.all_to_all_single(x.reshape(1, -1).contiguous(), recv, send, group_name)


def _ring_forward(q, k, v, oks, scale, group_name, r, n, flash):
    """The forward ring on normed, rotated q, k: -> out (input dtype), lse (B, H, S/n) fp32."""
    kv = torch.stack([k, v])  # (2, B, S/n, H, D): one message per step
    block = flash_block_fwd if flash else block_fwd
    o = lse = None
    for t in range(n):
        nxt = _rotate(kv, group_name, r, n) if t < n - 1 else None  # in flight during this block's math
        o_j, lse_j = block(q, kv[0], kv[1], oks[(r - t) % n], scale)
        o, lse = (o_j, lse_j) if o is None else merge(o, lse, o_j, lse_j)
        if nxt is not None:
            kv = funcol_ops.wait_tensor(nxt).view_as(kv)
    return o.to(q.dtype), lse


def _pack(q, do, lse, delta) -> torch.Tensor:
    """A rank's queries for the backward ring in one message: q, do (B, S/n, H, D) in their dtype,
    then lse, delta (B, H, S/n) in the statistics' (fp32; fp64 for fp64), as bytes."""
    return torch.cat([torch.stack([q, do]).flatten().view(torch.uint8),
                      torch.stack([lse, delta.to(lse.dtype)]).flatten().view(torch.uint8)])


def _unpack(message, q, stats):
    """-> q, do, lse, delta of a :func:`_pack` message (views into it)."""
    B, S, H, D = q.shape
    message = message.reshape(-1)
    split = 2 * q.numel() * q.element_size()
    q_do = message[:split].view(q.dtype).view(2, B, S, H, D)
    rows = message[split:].view(stats).view(2, B, H, S)
    return q_do[0], q_do[1], rows[0], rows[1]


def _ring_backward(do, q, k, v, oks, out, lse, scale, group_name, r, n, flash):
    """The backward ring: -> dq, dk, dv of the normed, rotated q, k and of v, fp32. Keys stay;
    queries travel (module docstring)."""
    delta = torch.einsum("bshd,bshd->bhs", _acc(do), _acc(out))  # (B, H, S/n): once, not once a block
    block = flash_block_bwd if flash else block_bwd
    queries = _pack(q, do, lse, delta)
    dk, dv = torch.zeros_like(_acc(k)), torch.zeros_like(_acc(v))
    dq = sent = None  # the queries in hand's dq summed over the ranks they passed (fp32), on its way
    for t in range(n):
        nxt = _rotate(queries, group_name, r, n) if t < n - 1 else None  # in flight during this block
        q_j, do_j, lse_j, delta_j = _unpack(queries, q, lse.dtype)
        dq_j, dk_j, dv_j = block(do_j, delta_j, q_j, k, v, oks[r], lse_j, scale)
        dk += dk_j
        dv += dv_j
        mine = dq_j.to(dk.dtype)
        dq = mine if sent is None else funcol_ops.wait_tensor(sent).view_as(mine) + mine
        # rank j's dq follows its queries to rank r+1; after the last block it goes home
        sent = _rotate(dq, group_name, r, n) if n > 1 else None  # (one rank: home already)
        if nxt is not None:
            queries = funcol_ops.wait_tensor(nxt)
    dq = funcol_ops.wait_tensor(sent).view_as(dq) if sent is not None else dq
    return dq, dk, dv


def _prepass(x, w, cos, sin, token_group, eps, flash):
    """QK-norm + RoPE of this rank's q or k in its dtype, as qk_norm_attention's pre-pass:
    -> (y, rstd (B, S/n, H) fp32 on the flash path / None)."""
    if flash:
        from kiln.kernels.qk_norm_attention_triton import norm_rope_fwd

        return norm_rope_fwd(x, w, token_group, cos, sin, eps)
    return norm_rope(x, w, token_group, cos, sin, eps, compute_dtype(x.dtype)).to(x.dtype), None


def _prepass_bwd(dy, x, w, cos, sin, token_group, eps, rstd, flash):
    """-> dx (like x), dw (like w) of :func:`_prepass`."""
    if flash:
        from kiln.kernels.qk_norm_attention_triton import norm_rope_bwd as triton_bwd

        return triton_bwd(dy.to(x.dtype), x, w, token_group, cos, sin, rstd)
    return norm_rope_bwd(dy, x, w, token_group, cos, sin, eps, compute_dtype(x.dtype))


@torch.library.custom_op("kiln::ring_attention_fwd", mutates_args=())
def _ring_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, token_group: torch.Tensor | None, eps: float, scale: float,
                 group_name: str, r: int, n: int, flash: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(q):
        if q_weight is not None:  # the normed q, k live during this op only (the backward renorms)
            q, _ = _prepass(q, q_weight, cos, sin, token_group, eps, flash)
            k, _ = _prepass(k, k_weight, cos, sin, token_group, eps, flash)
        return _ring_forward(q, k, v, key_ok.chunk(n, dim=1), scale, group_name, r, n, flash)


@_ring_fwd_op.register_fake
def _(q, k, v, key_ok, q_weight, k_weight, cos, sin, token_group, eps, scale, group_name, r, n, flash):
    B, S, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("kiln::ring_attention_bwd", mutates_args=())
def _ring_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 token_group: torch.Tensor | None, eps: float, scale: float, group_name: str, r: int, n: int,
                 flash: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv in the inputs' dtypes and dq_weight, dk_weight (empty without the norm)."""
    with on_device_of(q):
        qn, kn, rstd_q, rstd_k = q, k, None, None
        if q_weight is not None:
            qn, rstd_q = _prepass(q, q_weight, cos, sin, token_group, eps, flash)
            kn, rstd_k = _prepass(k, k_weight, cos, sin, token_group, eps, flash)
        dq, dk, dv = _ring_backward(do, qn, kn, v, key_ok.chunk(n, dim=1), out, lse, scale, group_name, r, n, flash)
        dqw, dkw = q.new_empty(0), q.new_empty(0)
        if q_weight is not None:
            dq, dqw = _prepass_bwd(dq, q, q_weight, cos, sin, token_group, eps, rstd_q, flash)
            dk, dkw = _prepass_bwd(dk, k, k_weight, cos, sin, token_group, eps, rstd_k, flash)
    # new tensors, none an alias of another output (custom ops may not return views of one buffer)
    return dq.to(q.dtype), dk.to(k.dtype, copy=True), dv.to(v.dtype, copy=True), dqw, dkw


@_ring_bwd_op.register_fake
def _(do, q, k, v, key_ok, out, lse, q_weight, k_weight, cos, sin, token_group, eps, scale, group_name, r, n,
      flash):
    dqw, dkw = ((torch.empty_like(w) if w is not None else q.new_empty(0)) for w in (q_weight, k_weight))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dqw, dkw


def _setup_context(ctx, inputs, output):
    q, k, v, key_ok, q_weight, k_weight, cos, sin, token_group, eps, scale, group_name, r, n, flash = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_ok, out, lse, q_weight, k_weight, cos, sin, token_group)
    ctx.ring = (eps, scale, group_name, r, n, flash)


def _backward(ctx, dout, _dlse):
    q, k, v, key_ok, out, lse, q_weight, k_weight, cos, sin, token_group = ctx.saved_tensors
    dq, dk, dv, dqw, dkw = _ring_bwd_op(dout.contiguous(), q, k, v, key_ok, out, lse, q_weight, k_weight, cos,
                                        sin, token_group, *ctx.ring)
    if q_weight is None:
        dqw = dkw = None
    return dq, dk, dv, None, dqw, dkw, None, None, None, None, None, None, None, None, None


_ring_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, group,
                   scale: float | None = None, *, q_weight: torch.Tensor | None = None,
                   k_weight: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                   sin: torch.Tensor | None = None, token_group: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, with QK-norm and RoPE of this
    rank's tokens fused in when the weights are given (as kiln.kernels.qk_norm_attention).

    Args:
        q, k, v: (B, S/n, H, D) this rank's tokens, fp32 / fp16 / bf16; rank i of the group holds
            tokens i·S/n .. (i+1)·S/n of the sequence. Without weights q and k are used as they
            are (already normed and rotated, if at all).
        key_ok: (B, S) bool, True = valid key, for the whole sequence (every rank holds it).
        group: the context-parallel process group (n ranks), or a 1-D DeviceMesh of it.
        scale: softmax scale, default 1/sqrt(D).
        q_weight, k_weight: (D,) or (G, D) RMSNorm weights of q and k; cos, sin: (S/n, D) RoPE
            tables of this rank's tokens or None; token_group: (S/n,) their weight rows; eps.
            The op keeps q, k as given and renorms them in its backward: no normed copies kept.
    Returns:
        (B, S/n, H, D) in the input dtype; zeros for a query with no valid key. Blocks on the
        flash kernels where use_flash(q, k, v), else eager (module docstring).
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
    if (q_weight is None) != (k_weight is None):
        raise ValueError("ring_attention: q_weight and k_weight come together (the fused QK-norm), or neither")
    if q_weight is not None:
        check_args("ring_attention", q, k, q_weight, k_weight, cos, sin, token_group)
    elif cos is not None or token_group is not None:
        raise ValueError("ring_attention: cos / sin / token_group come with q_weight and k_weight (the fused "
                         "QK-norm); without the norm apply RoPE to q and k before the call")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, _ = _ring_fwd_op(q, k, v, key_ok.bool(), q_weight, k_weight, cos, sin, token_group, eps, scale,
                          group.group_name, dist.get_rank(group), n, use_flash(q, k, v))
    return out
