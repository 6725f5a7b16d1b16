"""QK-norm + RoPE attention: per-head RMSNorm of Q and K, rotary embedding, then attention.

Forward, per batch b, head h (q, k, v: (B, S, H, D)):
    qn = rmsnorm(q) * q_weight[g(s)],  kn = rmsnorm(k) * k_weight[g(s)]   (fp32 statistics)
    qr = qn * cos + rotate_half(qn) * sin,  same for kn                   (cos, sin: (S, D))
    out = softmax(qr @ kr^T * scale + mask) @ v
where g(s) = token_group[s] selects a row of a (G, D) weight (MMDiT: text vs image weights);
(D,) weights use one row for all tokens. ``key_padding_mask`` (B, S) marks valid keys (True);
``causal`` adds the lower-triangular mask. A query that sees no valid key returns zeros, so
outputs at padded positions stay finite. Packed QKV (B, S, 3, H, D) works through views
(``qkv.unbind(2)``): nothing here needs contiguous inputs.

Dtype policy: norm and RoPE in fp32, attention in the input dtype (fp32 accumulation inside
SDPA), output in the input dtype. Backends: torch (this file's reference with upcast=False) and
triton (``qk_norm_attention_triton.py``: norm+RoPE pre-pass, flash attention forward/backward,
wrapped below as the ``kiln::qk_norm_attention_fwd/bwd`` custom ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels.dispatch import (
    MAX_OFFSET,
    batch_chunks,
    batch_rows,
    compute_dtype,
    dispatch,
    join_batch,
    on_device_of,
    register,
    rows_within_offsets,
    triton_device_reason,
)
from kiln.kernels.qk_norm_rope import check_args, norm_rope


def _attention_mask(key_padding_mask, causal, s_q, s_k, device):
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        tri = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril()
        mask = tri if mask is None else mask & tri
    return mask


def qk_norm_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    causal: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch definition of :func:`qk_norm_attention`.

    ``upcast=True`` runs everything in fp32 (the test oracle); ``upcast=False`` runs the norm in
    fp32 and the attention in the input dtype (the eager path a user would write).
    """
    cdt = compute_dtype(q.dtype, upcast)
    ndt = compute_dtype(q.dtype)  # the norm's statistics are at least fp32 either way
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qn = norm_rope(q, q_weight, token_group, cos, sin, eps, ndt).to(cdt)
    kn = norm_rope(k, k_weight, token_group, cos, sin, eps, ndt).to(cdt)
    mask = _attention_mask(key_padding_mask, causal, S, k.shape[1], q.device)
    out = F.scaled_dot_product_attention(
        qn.transpose(1, 2), kn.transpose(1, 2), v.to(cdt).transpose(1, 2), attn_mask=mask,
        scale=scale,
    )  # (B, H, S, D)
    if mask is not None:
        # A query with no valid key (causal + leading padding, or a fully padded row) would be NaN: 0.
        seen = mask.expand(B, 1, S, k.shape[1]).any(-1, keepdim=True)  # (B, 1, S, 1)
        out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).to(q.dtype)


def qk_norm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Fused per-head QK RMSNorm + rotate-half RoPE + attention.

    Args:
        q, k, v: (B, S, H, D), fp32/fp16/bf16; views of a packed (B, S, 3, H, D) tensor work.
        q_weight, k_weight: (D,) or (G, D) RMSNorm weights; with (G, D), ``token_group`` picks
            the row of each token.
        cos, sin: (S, D) RoPE tables applied after the norm to Q and K, or None for no RoPE.
        token_group: (S,) integer group index in [0, G) (checked for CPU tensors; on a GPU, where
            that would sync, a token outside it gets NaN rows).
        key_padding_mask: (B, S) bool, True = valid key; a query that sees none returns zeros.
        eps: RMSNorm epsilon. scale: softmax scale, default 1/sqrt(D). causal: lower-triangular.
    Returns:
        (B, S, H, D) in the input dtype.
    """
    check_args("qk_norm_attention", q, k, q_weight, k_weight, cos, sin, token_group)
    if v.device != q.device:
        raise ValueError(f"qk_norm_attention: v is on {v.device}, q on {q.device}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], k.shape[1]):
        raise ValueError(f"qk_norm_attention: key_padding_mask must be (B, S) = ({q.shape[0]}, {k.shape[1]}), "
                         f"got shape {tuple(key_padding_mask.shape)}")
    return dispatch(
        "qk_norm_attention", q, k, v, q_weight, k_weight, cos=cos, sin=sin,
        token_group=token_group, key_padding_mask=key_padding_mask, eps=eps, scale=scale,
        causal=causal,
    )


def _torch_backend(q, k, v, q_weight, k_weight, **kw):
    return qk_norm_attention_ref(q, k, v, q_weight, k_weight, upcast=False, **kw)


register("qk_norm_attention", "torch", _torch_backend)


# --- Triton backend (kernels in qk_norm_attention_triton.py) ----------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Below compute capability 8.0 (V100 7.0, T4 / RTX 20xx 7.5) Triton 3.8 builds these kernels' dots
# as FMA loops, no MMA instruction in any candidate (16-bit, D = 64 / 128 / 256), with 0.5-21 KB
# of spilled registers per thread and 32-192 KB of shared memory (a T4 has 64 KB): SDPA's
# kernels (the reference backend) are the better path there. Checked 2026-12-06 by building
# every pre-Hopper candidate for sm_70 and sm_75.
MIN_CAPABILITY = (8, 0)


@torch.library.custom_op("kiln::qk_norm_attention_fwd", mutates_args=())
def _qkna_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, token_group: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, eps: float, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels import qk_norm_attention_triton as T

    with on_device_of(q):
        qn, rstd_q = T.norm_rope_fwd(q, q_weight, token_group, cos, sin, eps)
        kn, rstd_k = T.norm_rope_fwd(k, k_weight, token_group, cos, sin, eps)
        out, lse = T.attention_fwd(qn, kn, v, key_padding_mask, scale, causal)
    return out, lse, rstd_q, rstd_k


@_qkna_fwd_op.register_fake
def _(q, k, v, q_weight, k_weight, cos, sin, token_group, key_padding_mask, eps, scale, causal):
    from kiln.kernels.qk_norm_attention_triton import side_cols

    B, S, H, D = q.shape
    stats = q.new_empty((B, S, H), dtype=torch.float32)
    lse = q.new_empty((B, H, side_cols(S)), dtype=torch.float32)
    return q.new_empty((B, S, H, D)), lse, stats, torch.empty_like(stats)


@torch.library.custom_op("kiln::qk_norm_attention_bwd", mutates_args=())
def _qkna_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rstd_q: torch.Tensor, rstd_k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, token_group: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, eps: float, scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels import qk_norm_attention_triton as T

    # Q̂, K̂ are recomputed (one bandwidth-bound pass) rather than kept alive from the forward
    with on_device_of(q):
        qn, _ = T.norm_rope_fwd(q, q_weight, token_group, cos, sin, eps)
        kn, _ = T.norm_rope_fwd(k, k_weight, token_group, cos, sin, eps)
        dqn, dkn, dv = T.attention_bwd(dout, qn, kn, v, out, lse, key_padding_mask, scale, causal)
        dq, dqw = T.norm_rope_bwd(dqn, q, q_weight, token_group, cos, sin, rstd_q)
        dk, dkw = T.norm_rope_bwd(dkn, k, k_weight, token_group, cos, sin, rstd_k)
    return dq, dk, dv, dqw, dkw


@_qkna_bwd_op.register_fake
def _(dout, q, k, v, out, lse, rstd_q, rstd_k, q_weight, k_weight, cos, sin, token_group, key_padding_mask,
      eps, scale, causal):
    shape = tuple(q.shape)
    return (q.new_empty(shape), k.new_empty(shape), v.new_empty(shape), torch.empty_like(q_weight),
            torch.empty_like(k_weight))


def _qkna_setup_context(ctx, inputs, output):
    q, k, v, q_weight, k_weight, cos, sin, token_group, key_padding_mask, eps, scale, causal = inputs
    out, lse, rstd_q, rstd_k = output
    ctx.save_for_backward(q, k, v, out, lse, rstd_q, rstd_k, q_weight, k_weight, cos, sin, token_group,
                          key_padding_mask)
    ctx.eps, ctx.scale, ctx.causal = eps, scale, causal


def _qkna_backward(ctx, dout, _dlse, _drq, _drk):
    q, k, v, out, lse, rstd_q, rstd_k, q_weight, k_weight, cos, sin, token_group, mask = ctx.saved_tensors
    dq, dk, dv, dqw, dkw = _qkna_bwd_op(dout, q, k, v, out, lse, rstd_q, rstd_k, q_weight, k_weight, cos, sin,
                                        token_group, mask, ctx.eps, ctx.scale, ctx.causal)
    return dq, dk, dv, dqw, dkw, None, None, None, None, None, None, None


_qkna_fwd_op.register_autograd(_qkna_backward, setup_context=_qkna_setup_context)


def _triton_backend(q, k, v, q_weight, k_weight, *, cos=None, sin=None, token_group=None, key_padding_mask=None,
                    eps=1e-6, scale=None, causal=False):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # batch rows are independent: chunks of them past a grid's 65,535 rows (B·H programs along y)
    # or 32-bit offsets (dispatch.MAX_GRID_Y, MAX_OFFSET); autograd sums the weights' gradients
    chunks = batch_chunks(q.shape[0], grid_units=q.shape[2], within=_rows_within_offsets(q, k, v))
    if len(chunks) > 1:
        return join_batch([_triton_backend(q[c], k[c], v[c], q_weight, k_weight, cos=cos, sin=sin,
                                           token_group=token_group, key_padding_mask=batch_rows(key_padding_mask, c),
                                           eps=eps, scale=scale, causal=causal) for c in chunks])
    out, _, _, _ = _qkna_fwd_op(q, k, v, q_weight, k_weight, cos, sin, token_group, key_padding_mask, eps, scale,
                                causal)
    return out


def _triton_reasons(q, k, v, q_weight, k_weight, *, cos=None, sin=None, token_group=None, key_padding_mask=None,
                    eps=1e-6, scale=None, causal=False) -> list[str]:
    return flash_reasons(q, k, v)


def flash_reasons(q, k, v) -> list[str]:
    """Why the Triton flash-attention kernels (qk_norm_attention_triton.attention_fwd / _bwd)
    will not take q, k, v (B, S, H, D); empty when they will. Also ring attention's test for its
    blocks (kiln.model.ring_attention)."""
    reasons = [r for r in [triton_device_reason(q), _gpu_reason(q)] if r]
    if q.dtype not in _FLOATS or not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of fp32/fp16/bf16 for all three")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        reasons.append(f"q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: need equal (B, S, H, D)")
    elif q.shape[-1] % 16 or q.shape[-1] > 256:
        reasons.append(f"head dim {q.shape[-1]} is not a multiple of 16 up to 256")
    if any(t.stride(-1) != 1 for t in (q, k, v) if t.dim() == 4):
        reasons.append("the head dimension of q, k, v must have stride 1")
    elif not reasons and not _rows_within_offsets(q, k, v):
        reasons.append(f"one batch row of q, k or v spans more than {MAX_OFFSET} elements: the Triton kernels "
                       "index with 32-bit offsets")
    return reasons


def _gpu_reason(q: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return None
    if torch.version.hip:  # an MI300X reports compute capability 9.4: it would get Hopper's TMA tiles
        return "ROCm: the fused attention's launch lists are for NVIDIA GPUs, so SDPA runs it"
    gpu = torch.cuda.get_device_properties(q.device)  # (folded to a constant by torch.compile)
    if (gpu.major, gpu.minor) >= MIN_CAPABILITY:
        return None
    return (f"{gpu.name} has compute capability {gpu.major}.{gpu.minor}: below 8.0 Triton builds the fused "
            "attention without tensor-core MMA (FMA loops, spilled registers), so SDPA runs it")


def _rows_within_offsets(q, k, v) -> int:
    # q, k, v and the contiguous (B, S, H, D) tensors the kernels write (normalised Q, K; out, dq ...)
    return rows_within_offsets(q, k, v, tuple(q.shape))


register("qk_norm_attention", "triton", _triton_backend, _triton_reasons)
