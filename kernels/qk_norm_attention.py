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
SDPA), output in the input dtype. Backends: torch (this file). The Triton kernel arrives with
its own issue and registers here through the same dispatch point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels.dispatch import compute_dtype, dispatch, register
from kiln.kernels.rope import rotate_half


def _norm_rope(x, weight, token_group, cos, sin, eps, cdt):
    # x (B, S, H, D) -> normalised and rotated, in dtype cdt
    xc = x.to(cdt)
    w = weight.to(cdt)
    if w.dim() == 2:
        w = w[token_group] if token_group is not None else w[0].expand(x.shape[1], -1)
        w = w[:, None, :]  # (S, 1, D)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * w
    if cos is not None:
        c, s = cos.to(cdt)[:, None, :], sin.to(cdt)[:, None, :]
        y = y * c + rotate_half(y) * s
    return y


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
    qn = _norm_rope(q, q_weight, token_group, cos, sin, eps, ndt).to(cdt)
    kn = _norm_rope(k, k_weight, token_group, cos, sin, eps, ndt).to(cdt)
    mask = _attention_mask(key_padding_mask, causal, S, k.shape[1], q.device)
    out = F.scaled_dot_product_attention(
        qn.transpose(1, 2), kn.transpose(1, 2), v.to(cdt).transpose(1, 2), attn_mask=mask,
        scale=scale,
    )  # (B, H, S, D)
    if mask is not None:
        # A query with no valid key (causal + leading padding) would be NaN: define it as 0.
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
        token_group: (S,) integer group index in [0, G).
        key_padding_mask: (B, S) bool, True = valid key; each row needs one valid key.
        eps: RMSNorm epsilon. scale: softmax scale, default 1/sqrt(D). causal: lower-triangular.
    Returns:
        (B, S, H, D) in the input dtype.
    """
    return dispatch(
        "qk_norm_attention", q, k, v, q_weight, k_weight, cos=cos, sin=sin,
        token_group=token_group, key_padding_mask=key_padding_mask, eps=eps, scale=scale,
        causal=causal,
    )


def _torch_backend(q, k, v, q_weight, k_weight, **kw):
    return qk_norm_attention_ref(q, k, v, q_weight, k_weight, upcast=False, **kw)


register("qk_norm_attention", "torch", _torch_backend)
