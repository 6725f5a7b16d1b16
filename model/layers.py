"""Building blocks of the MMDiT: embeddings, patchify, 2D RoPE tables, MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...,) scalars -> (..., dim) [cos | sin] features at geometric frequencies (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in here: autocast's when it is on for t's device."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LeanLinear(torch.autograd.Function):
    """linear(h) or linear(gelu(h)) keeping only h, as it came, for the backward.

    gelu: the backward recomputes gelu(h) (one elementwise pass over the hidden). Autograd
    through the two would keep h and gelu(h), 2 x 4W values per token: a double-stream block
    kept 38 bytes per token and unit of width without checkpointing, 30 with this; a
    single-stream one 30, 22 (tests/block_memory.py).
    Without gelu, for a token slice of a (B, S, W) tensor (the double-stream block's text and
    image parts of its attention output): F.linear keeps the contiguous copy it makes of a
    slice that is not contiguous (B > 1); this keeps the slice, a view of what attention keeps
    anyway, and copies again in the backward (30 -> 28 bytes per token and unit of width).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, gelu: bool):
        dt = _autocast_dtype(h)  # the forward matmul's dtype: its gradients are computed in it, as autograd's are
        # what autograd would keep of a plain linear's input: the autocast copy where there is one
        kept = h if gelu or h.dtype == dt else h.to(dt)
        ctx.save_for_backward(kept, weight)
        ctx.matmul_dtype, ctx.in_dtype, ctx.has_bias, ctx.gelu = dt, h.dtype, bias is not None, gelu
        return F.linear(F.gelu(h, approximate="tanh") if gelu else h, weight, bias)  # autocast casts as usual

    @staticmethod
    def backward(ctx, dy):
        h, weight = ctx.saved_tensors
        g = F.gelu(h, approximate="tanh") if ctx.gelu else h
        dg, dw, db = _linear_grads(ctx, dy, g, weight, ctx.has_bias)  # a slice's copy lives only in here
        dh = torch.ops.aten.gelu_backward(dg, h, approximate="tanh") if ctx.gelu else dg
        return dh, dw, db, None


def _linear_grads(ctx, dy: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """Gradients of linear(g) in ctx.matmul_dtype (as autograd computes them under autocast):
    of g (in ctx.in_dtype), the weight and, with ``has_bias``, the bias."""
    dt = ctx.matmul_dtype
    g, dy = g.to(dt), dy.to(dt)
    dg = (dy @ weight.to(dt)).to(ctx.in_dtype)  # (..., in)
    dw = dy.flatten(0, -2).mT @ g.flatten(0, -2)  # (out, in)
    db = dy.flatten(0, -2).sum(0).to(weight.dtype) if has_bias else None
    return dg, dw.to(weight.dtype), db


class RemadeInputLinears(torch.autograd.Function):
    """linear_i(h) for linears that read one h, which ``remake(*args)`` makes again from tensors
    kept anyway: keeps those, not h, and makes h again (once) in the backward for the weight
    gradients.

    The blocks' QKV and MLP-in read the adaLN modulation of the block (or residual) input,
    which the modulation keeps with two fp32 statistics a token (kernels/adaln_modulate.py);
    keeping the modulated copy too is 2 bytes per token and unit of width a modulation, 4 of a
    double-stream block's 24 without checkpointing, 2 of a single-stream block's 20 (measured,
    tests/block_memory.py). ``remake`` is the modulation's implementation on the backend the
    forward used (kernels.dispatch.implementation): one modulation forward more in the backward,
    bit for bit the same h. Apply: ``RemadeInputLinears.apply(h, remake, len(args), *args,
    weight_1, bias_1, weight_2, ...)`` -> (linear_1(h), linear_2(h), ...).
    """

    @staticmethod
    def forward(ctx, h, remake, n_args: int, *rest):
        args, wb = rest[:n_args], rest[n_args:]
        weights, biases = wb[0::2], wb[1::2]
        ctx.save_for_backward(*args, *weights)
        ctx.remake, ctx.n_args, ctx.matmul_dtype, ctx.in_dtype = remake, n_args, _autocast_dtype(h), h.dtype
        ctx.has_biases = [b is not None for b in biases]
        return tuple(F.linear(h, w, b) for w, b in zip(weights, biases, strict=True))  # autocast casts as usual

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        args, weights = saved[:ctx.n_args], saved[ctx.n_args:]
        h, dh, grads = ctx.remake(*args), None, []
        for dy, w, has_bias in zip(dys, weights, ctx.has_biases, strict=True):
            dg, dw, db = _linear_grads(ctx, dy, h, w, has_bias)
            dh = dg if dh is None else dh + dg
            grads += [dw, db]
        return dh, None, None, *(None for _ in args), *grads


class GeluLinear(nn.Linear):
    """An ``nn.Linear`` applied to gelu(input) (tanh approximation) that keeps only the input
    for its backward. Still a Linear: tensor parallel shards it, FSDP wraps it, names stay."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _LeanLinear.apply(h, self.weight, self.bias, True)


class SliceLinear(nn.Linear):
    """An ``nn.Linear`` for a slice of a larger activation that something else keeps (a view):
    it keeps the view for its backward, not a contiguous copy of it. Still a Linear."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _LeanLinear.apply(h, self.weight, self.bias, False)


# fp32 bytes of one chunk of per-sample weight gradients in _GatedLinears' backward: 256 MiB,
# 1 sample a chunk for xl's MLP output layer (3072 x 12288), 7 for its attention projection
_PER_SAMPLE_BYTES = 2**28
# tokens a sample (on this rank) from which gated_residual keeps no branch. The per-sample weight
# gradients are written in fp32 and read twice (12 bytes an element) for 2·S FLOPs an element:
# on an H100 (~990 TFLOP/s bf16, 3.35 TB/s, ~300 FLOPs a byte) compute-bound from S ~ 1800; below,
# the backward of a gated linear would slow down by up to several times at 256 px (333 tokens),
# where the branch's 2 bytes per token and unit of width matter least
LEAN_GATE_TOKENS = 2048
_BMM_TO_FP32 = hasattr(torch.ops.aten.bmm, "dtype")  # bmm(..., out_dtype=): CUDA, bf16 / fp16 in, fp32 out


def _per_sample_mm(dy: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(b, S, N) x (b, S, K) -> (b, N, K) fp32: each sample's weight gradient, products of
    low-precision inputs accumulated and returned in fp32 (as one dW matmul accumulates)."""
    if not dy.is_cuda or dy.dtype == torch.float32:  # CPU has no bf16 -> fp32 bmm: exact products in fp32
        return torch.bmm(dy.mT.float(), a.float())
    if _BMM_TO_FP32:
        return torch.bmm(dy.mT, a, out_dtype=torch.float32)
    return torch.bmm(dy.mT, a).float()  # an older torch: rounded to bf16 / fp16 as dW's matmul rounds


class _GatedLinears(torch.autograd.Function):
    """out = x + gate[:, None] * sum_i linear_i(h_i) (gelu(h_i) where asked): an adaLN-Zero gated
    residual branch that does not keep the branch.

    Autograd keeps the branch for gate's gradient, dgate[b, n] = sum_s dout[b, s, n] * y[b, s, n],
    B·S·W values: 4 of a double-stream block's 28 bytes per token and unit of width without
    checkpointing (two gated branches a stream), 2 of a single-stream block's 22. With
    y = a W^T + bias, that sum is sum_k W[n, k] M_b[n, k] + bias[n] sum_s dout[b, s, n], where
    M_b = dout_b^T a_b is sample b's share of the weight gradient, which dW needs anyway:
    dW = sum_b gate_b[:, None] * M_b. So the backward runs dW's matmul per sample (the same FLOPs,
    in chunks of _PER_SAMPLE_BYTES) and gets dgate from it; it keeps h_i as they came (their
    producers keep them too) and recomputes gelu as _LeanLinear does.
    """

    @staticmethod
    def forward(ctx, x, gate, gelus, *hwb):
        terms = [hwb[i:i + 3] for i in range(0, len(hwb), 3)]
        dt = _autocast_dtype(terms[0][0])
        y = None
        for (h, w, b), gelu in zip(terms, gelus, strict=True):
            t = F.linear(F.gelu(h, approximate="tanh") if gelu else h, w, b)  # autocast casts as usual
            y = t if y is None else y + t
        out = x + gate[:, None] * y
        kept = [h if gelu or h.dtype == dt else h.to(dt) for (h, _, _), gelu in zip(terms, gelus, strict=True)]
        ctx.save_for_backward(gate, *kept, *(w for _, w, _ in terms), *(b for _, _, b in terms))
        ctx.dt, ctx.gelus, ctx.prod_dtype = dt, gelus, torch.promote_types(gate.dtype, y.dtype)
        ctx.dtypes = (x.dtype, [h.dtype for h, _, _ in terms])
        return out  # (B, S, N)

    @staticmethod
    def backward(ctx, dout):
        n = len(ctx.gelus)
        saved = ctx.saved_tensors  # once: under checkpointing each read unpacks (recomputes) them
        gate, hs, ws, bs = saved[0], *(saved[1 + i * n:1 + (i + 1) * n] for i in range(3))
        dt, (x_dtype, h_dtypes) = ctx.dt, ctx.dtypes
        dz = dout.to(ctx.prod_dtype)  # the gradient of gate * y, as autograd's add hands it on
        dy = (dz * gate[:, None]).to(dt)  # (B, S, N)
        g32, dz_dt = gate.float(), dz.to(dt)
        dgate = torch.zeros_like(g32)  # (B, N)
        grads = []
        for h, w, b, gelu, h_dtype in zip(hs, ws, bs, ctx.gelus, h_dtypes, strict=True):
            wd = w.to(dt)
            a = (F.gelu(h, approximate="tanh") if gelu else h).to(dt)  # (B, S, K)
            da = (dy @ wd).to(h_dtype)
            dh = torch.ops.aten.gelu_backward(da, h, approximate="tanh") if gelu else da
            dw, w32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device), wd.float()  # (N, K)
            step = max(1, _PER_SAMPLE_BYTES // (4 * w.numel()))
            for i in range(0, a.shape[0], step):
                m = _per_sample_mm(dz_dt[i:i + step], a[i:i + step])  # (b, N, K)
                dw += torch.einsum("bn,bnk->nk", g32[i:i + step], m)
                dgate[i:i + step] += torch.einsum("nk,bnk->bn", w32, m)
            db = None
            if b is not None:
                col = dz.float().sum(1)  # (B, N)
                dgate += col * b.to(dt).float()
                db = (g32 * col).sum(0).to(b.dtype)
            grads += [dh, dw.to(w.dtype), db]
        return dout.to(x_dtype), dgate.to(gate.dtype), None, *grads


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: list[tuple[nn.Linear, torch.Tensor]]) -> torch.Tensor:
    """x + gate[:, None] * sum(linear(h) for linear, h in branch), x (B, S, N), gate (B, N); a
    GeluLinear applies gelu to its h. Keeps only the h's (_GatedLinears) from LEAN_GATE_TOKENS
    tokens a sample; with fewer, and under tensor parallelism (DTensor weights: the branch is this
    rank's rows of a reduce-scatter), autograd keeps the branch (2 bytes per token and unit of
    width a gated branch, / tp)."""
    if x.shape[1] < LEAN_GATE_TOKENS or any(isinstance(lin.weight, DTensor) for lin, _ in branch):
        y = None
        for lin, h in branch:
            y = lin(h) if y is None else y + lin(h)
        return x + gate[:, None] * y
    hwb = [t for lin, h in branch for t in (h, lin.weight, lin.bias)]
    return _GatedLinears.apply(x, gate, tuple(isinstance(lin, GeluLinear) for lin, _ in branch), *hwb)


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = GeluLinear(hidden, dim_out)  # gelu inside: the hidden is kept once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))  # fc2(gelu(fc1(x)))


class ScalarEmbedder(nn.Module):
    """Embed k scalars per sample (timestep, or SDXL micro-conditioning) into the width.

    Timesteps t in [0, 1] are scaled by ``scale`` (1000) so the sinusoid frequencies cover them
    as in DiT; sizes and crop offsets (pixels) use scale 1.
    """

    def __init__(self, count: int, width: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = MLP(count * freq_dim, width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, count) -> (B, width)
        feats = sinusoidal_embedding(x * self.scale, self.freq_dim)  # (B, count, freq_dim)
        return self.mlp(feats.flatten(1).to(self.mlp.fc1.weight.dtype))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), row-major over patches."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p); inverse of :func:`patchify` for an h x w grid."""
    B = x.shape[0]
    x = x.reshape(B, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, h * p, w * p)


def rope_2d(h: int, w: int, head_dim: int, theta: float = 10000.0, device=None):
    """Rotate-half cos/sin tables (h*w, head_dim) for a grid of h x w patches.

    The D/2 rotation pairs split evenly between the row and the column coordinate, so any
    aspect ratio gets its own positions (no interpolation of a learned table).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64),
        torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half pairs i and i + D/2
    return angles.cos().float(), angles.sin().float()


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos absolute position embedding (h*w, dim) for any grid (DiT / SD3).

    Half the channels encode the row, half the column, so a non-square grid needs no table
    interpolation. Gives tokens their absolute place directly; RoPE alone only reaches it
    through attention to the (unrotated) text tokens, which the 1.9M-parameter demo learns slowly.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    emb_y = sinusoidal_embedding(ys.reshape(-1), dim // 2)
    emb_x = sinusoidal_embedding(xs.reshape(-1), dim // 2)
    return torch.cat([emb_y, emb_x], dim=-1)
