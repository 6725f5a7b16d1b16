"""Building blocks of the MMDiT: embeddings, patchify, 2D RoPE tables, MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        dt = ctx.matmul_dtype
        g = (F.gelu(h, approximate="tanh") if ctx.gelu else h).to(dt)
        dy = dy.to(dt)
        dg = dy @ weight.to(dt)  # (..., in)
        dw = dy.flatten(0, -2).mT @ g.flatten(0, -2)  # (out, in); a slice's copy lives only here
        dg = dg.to(ctx.in_dtype)
        dh = torch.ops.aten.gelu_backward(dg, h, approximate="tanh") if ctx.gelu else dg
        db = dy.flatten(0, -2).sum(0).to(weight.dtype) if ctx.has_bias else None
        return dh, dw.to(weight.dtype), db, None


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
