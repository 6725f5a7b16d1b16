"""QK RMSNorm + RoPE without the attention: the pre-kernel that feeds SDPA or flash-attn.

Forward, q and k (B, S, H, D) (views of a packed (B, S, 3, H, D) work; V is untouched):
    q_out = rope(rmsnorm(q) * q_weight[g(s)]),  k_out likewise with k_weight
with the conventions of :func:`kiln.kernels.qk_norm_attention` ((D,) or (G, D) weights,
``token_group`` (S,), rotate-half ``cos``/``sin`` (S, D) or None). Dtype policy: statistics and
rotation in fp32, outputs in the input dtype.
Backends: torch (this reference), triton (the pre-pass of the attention kernel,
``kernels/qk_norm_attention_triton.py``; forward and backward with the weight gradients), csrc
(``kiln_ext::qk_norm_rope_fwd/bwd``, csrc/qk_norm_rope_*.{cpp,cu}). Both kernel backends share
this file's fake implementations and autograd.
"""

from __future__ import annotations

import torch

from kiln.kernels import csrc
from kiln.kernels.dispatch import (
    MAX_OFFSET,
    batch_chunks,
    compute_dtype,
    csrc_device_reason,
    dispatch,
    join_batch,
    on_device_of,
    register,
    rows_within_offsets,
    triton_device_reason,
)
from kiln.kernels.rope import rotate_half


def check_args(op: str, q, k, q_weight, k_weight, cos, sin, token_group) -> None:
    """Errors that name the argument, before any backend runs: without them a wrong table or
    weight failed deep inside a backend, in a broadcast. Shapes and devices always; token_group's
    values only off the GPU (on it the check would sync every call: the kernels give NaN rows)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (B, S, H, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("q_weight", q_weight), ("k_weight", k_weight)):
        if t.device != q.device:  # (the tables and token_group may be elsewhere: the backends move them)
            raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")
    D = q.shape[-1]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.dim() not in (1, 2) or w.shape[-1] != D:
            raise ValueError(f"{op}: {name} must be (D,) or (G, D) with D = {D}, got shape {tuple(w.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin come together (both (S, D) tables, or both None)")
    if cos is not None and k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: cos, sin (S, D) rotate q and k alike: q has S = {q.shape[1]}, k {k.shape[1]}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and tuple(t.shape) != (q.shape[1], D):
            raise ValueError(f"{op}: {name} must be (S, D) = ({q.shape[1]}, {D}), got shape {tuple(t.shape)}")
    if token_group is not None and (tuple(token_group.shape) != (q.shape[1],) or token_group.is_floating_point()):
        raise ValueError(f"{op}: token_group must be an (S,) = ({q.shape[1]},) integer tensor, got "
                         f"{tuple(token_group.shape)} {token_group.dtype}")
    rows = [w.shape[0] for w in (q_weight, k_weight) if w.dim() == 2 and w.shape[0] > 1]
    if token_group is not None and rows and not token_group.is_cuda and not torch.compiler.is_compiling():
        # values too, where that costs no GPU sync (the CUDA kernels give a bad token's rows NaN)
        lo, hi = int(token_group.min()), int(token_group.max())
        if lo < 0 or hi >= min(rows):
            raise ValueError(f"{op}: token_group values must lie in [0, G) = [0, {min(rows)}) for the (G, D) "
                             f"weights, got values from {lo} to {hi}")


def norm_rope(x, weight, token_group, cos, sin, eps, cdt):
    """x (B, S, H, D) -> RMS-normalised with the token's weight row, then rotated, in dtype cdt."""
    xc = x.to(cdt)
    w = weight.to(cdt)
    if w.dim() == 2:
        w = w[token_group] if token_group is not None else w[0].expand(x.shape[1], -1)
        w = w[:, None, :]  # (S, 1, D)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * w
    if cos is not None:
        c, s = cos.to(x.device, cdt)[:, None, :], sin.to(x.device, cdt)[:, None, :]
        y = y * c + rotate_half(y) * s
    return y


def norm_rope_bwd(dy, x, weight, token_group, cos, sin, eps, cdt):
    """The gradients of :func:`norm_rope` written out, for code that runs its own backward (a
    custom op's, where autograd does not record): -> dx (like x), dweight (like weight).
    y = rope(x̂ · w), x̂ = x · rstd, rstd = (mean(x²) + eps)^-½; rotate_half is antisymmetric, so
    rope's transpose is dy·cos - rotate_half(dy·sin); then dx = rstd · (g - x̂ · mean(g · x̂)),
    g = dŷ · w, and dw sums dŷ · x̂ over the tokens of each weight row."""
    xc, dyc = x.to(cdt), dy.to(cdt)
    if cos is not None:
        c, s = cos.to(x.device, cdt)[:, None, :], sin.to(x.device, cdt)[:, None, :]
        dyc = dyc * c - rotate_half(dyc * s)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # (B, S, H, 1)
    xhat = xc * rstd
    w = weight.to(cdt)
    rows = token_group if token_group is not None else torch.zeros(x.shape[1], dtype=torch.long, device=x.device)
    w_tok = w[rows][:, None, :] if w.dim() == 2 else w  # (S, 1, D) or (D,)
    g = dyc * w_tok
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw_tok = (dyc * xhat).sum((0, 2))  # (S, D)
    dw = dw_tok.sum(0) if w.dim() == 1 else w.new_zeros(w.shape).index_add_(0, rows.to(x.device), dw_tok)
    return dx.to(x.dtype), dw.to(weight.dtype)


def qk_norm_rope_ref(q, k, q_weight, k_weight, *, cos=None, sin=None, token_group=None, eps=1e-6,
                     upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch definition of :func:`qk_norm_rope`; ``upcast=False`` computes in the input dtype."""
    cdt = compute_dtype(q.dtype, upcast)
    qo = norm_rope(q, q_weight, token_group, cos, sin, eps, cdt).to(q.dtype)
    ko = norm_rope(k, k_weight, token_group, cos, sin, eps, cdt).to(k.dtype)
    return qo, ko


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, *,
                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                 token_group: torch.Tensor | None = None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm + rotate-half RoPE of q and k (B, S, H, D); returns (q_out, k_out)."""
    check_args("qk_norm_rope", q, k, q_weight, k_weight, cos, sin, token_group)
    return dispatch("qk_norm_rope", q, k, q_weight, k_weight, cos=cos, sin=sin, token_group=token_group, eps=eps)


register("qk_norm_rope", "torch", qk_norm_rope_ref)


# --- Triton backend ----------------------------------------------------------------------------
@torch.library.custom_op("kiln::qk_norm_rope_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
            cos: torch.Tensor | None, sin: torch.Tensor | None, token_group: torch.Tensor | None, eps: float,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels.qk_norm_attention_triton import norm_rope_fwd

    with on_device_of(q):
        qo, rq = norm_rope_fwd(q, q_weight, token_group, cos, sin, eps)
        ko, rk = norm_rope_fwd(k, k_weight, token_group, cos, sin, eps)
    return qo, ko, rq, rk


@_fwd_op.register_fake
def _fwd_fake(q, k, q_weight, k_weight, cos, sin, token_group, eps):
    B, S, H, D = q.shape
    stats = q.new_empty((B, S, H), dtype=torch.float32)
    return q.new_empty((B, S, H, D)), k.new_empty((B, S, H, D)), stats, torch.empty_like(stats)


@torch.library.custom_op("kiln::qk_norm_rope_bwd", mutates_args=())
def _bwd_op(dqo: torch.Tensor, dko: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
            k_weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
            token_group: torch.Tensor | None, rstd_q: torch.Tensor, rstd_k: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from kiln.kernels.qk_norm_attention_triton import norm_rope_bwd

    with on_device_of(q):
        dq, dqw = norm_rope_bwd(dqo, q, q_weight, token_group, cos, sin, rstd_q)
        dk, dkw = norm_rope_bwd(dko, k, k_weight, token_group, cos, sin, rstd_k)
    return dq, dk, dqw, dkw


@_bwd_op.register_fake
def _bwd_fake(dqo, dko, q, k, q_weight, k_weight, cos, sin, token_group, rstd_q, rstd_k):
    shape = tuple(q.shape)
    return q.new_empty(shape), k.new_empty(shape), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, token_group, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, token_group, output[2], output[3])


def _autograd(bwd_op):
    """The backward of a qk_norm_rope_fwd op (Triton's or kiln_ext's) given its bwd op."""

    def backward(ctx, dqo, dko, _drq, _drk):
        q, k, q_weight, k_weight, cos, sin, token_group, rstd_q, rstd_k = ctx.saved_tensors
        dq, dk, dqw, dkw = bwd_op(dqo, dko, q, k, q_weight, k_weight, cos, sin, token_group, rstd_q, rstd_k)
        return dq, dk, dqw, dkw, None, None, None, None

    return backward


_fwd_op.register_autograd(_autograd(_bwd_op), setup_context=_setup)


def _run(fwd_op, q, k, q_weight, k_weight, *, cos=None, sin=None, token_group=None, eps=1e-6):
    qo, ko, _, _ = fwd_op(q, k, q_weight, k_weight, cos, sin, token_group, eps)
    return qo, ko


def _reasons(device_reason, offsets32: bool = False):
    def reasons(q, k, q_weight, k_weight, *, cos=None, sin=None, token_group=None, eps=1e-6) -> list[str]:
        out = [r for r in [device_reason(q)] if r]
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q.dtype != k.dtype:
            out.append(f"q, k dtypes {q.dtype}, {k.dtype}: need one of fp32/fp16/bf16 for both")
        if q.dim() != 4 or q.shape != k.shape:
            out.append(f"q, k shapes {tuple(q.shape)}, {tuple(k.shape)}: need equal (B, S, H, D)")
        elif q.shape[-1] % 2 or q.shape[-1] > 256:
            out.append(f"head dim {q.shape[-1]} must be even and at most 256")
        elif offsets32 and not rows_within_offsets(q, k, tuple(q.shape)):
            out.append(f"one batch row of q or k spans more than {MAX_OFFSET} elements: the kernels index with "
                       "32-bit offsets")
        return out

    return reasons


def _triton_backend(q, k, q_weight, k_weight, *, cos=None, sin=None, token_group=None, eps=1e-6):
    # batch chunks past 32-bit offsets (dispatch.MAX_OFFSET); autograd sums the weights' gradients
    chunks = batch_chunks(q.shape[0], within=rows_within_offsets(q, k, tuple(q.shape)))
    if len(chunks) > 1:
        return join_batch([_triton_backend(q[c], k[c], q_weight, k_weight, cos=cos, sin=sin, token_group=token_group,
                                           eps=eps) for c in chunks])
    return _run(_fwd_op, q, k, q_weight, k_weight, cos=cos, sin=sin, token_group=token_group, eps=eps)


register("qk_norm_rope", "triton", _triton_backend, _reasons(triton_device_reason, offsets32=True))


# --- csrc backend (csrc/qk_norm_rope_cpu.cpp, csrc/qk_norm_rope_cuda.cu) ------------------------

if csrc.loaded():
    torch.library.register_fake("kiln_ext::qk_norm_rope_fwd")(_fwd_fake)
    torch.library.register_fake("kiln_ext::qk_norm_rope_bwd")(_bwd_fake)
    torch.library.register_autograd(
        "kiln_ext::qk_norm_rope_fwd", _autograd(torch.ops.kiln_ext.qk_norm_rope_bwd), setup_context=_setup
    )


def _csrc_backend(*args, **kwargs):
    return _run(torch.ops.kiln_ext.qk_norm_rope_fwd, *args, **kwargs)


register("qk_norm_rope", "csrc", _csrc_backend, _reasons(lambda q: csrc_device_reason(q, "qk_norm_rope_fwd")))
