"""MMDiT denoiser (SD3 / Flux lineage).

Double-stream blocks keep separate text and image weights and attend jointly over the
concatenated [text, image] sequence; optional single-stream blocks (Flux) then process the
concatenation with one set of weights. Conditioning vector c = timestep + pooled text +
SDXL micro-conditioning (original size, crop top-left, target size) drives adaLN-Zero
modulation. Q and K get a per-head RMSNorm (text and image rows of a (2, D) weight in the
double-stream blocks) and 2D RoPE on image tokens. The output layer is zero-initialised so the
untrained model predicts v = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.engine.errors import ConfigError
from kiln.kernels import adaln_modulate, apply_rope, qk_norm_attention, qk_norm_rope
from kiln.kernels.dispatch import implementation
from kiln.model.layers import (
    MLP,
    GeluLinear,
    RemadeInputLinears,
    ScalarEmbedder,
    SliceLinear,
    gated_residual,
    patchify,
    rope_2d,
    sincos_2d,
    unpatchify,
)
from kiln.model.ring_attention import ring_attention
from kiln.model.sequence_parallel import (
    gather_seq,
    gathered_input,
    heads_to_seq,
    local_replicated,
    local_tokens,
    scatter_seq,
    seq_to_heads,
)

TEXT_GROUP, IMAGE_GROUP = 0, 1
ATTENTION_PATHS = ("fused", "norm_rope_sdpa")


@dataclass
class MMDiTConfig:
    width: int = 128
    depth: int = 2  # double-stream blocks
    single_depth: int = 2  # single-stream blocks after them
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_channels: int = 3  # 3 in pixel space, the VAE's latent channels otherwise
    text_dim: int = 192  # per-token text features (set from the text encoder at build time)
    pooled_dim: int = 192  # pooled text vector
    qk_norm: bool = True
    # How QK-norm attention runs: "fused" = kiln.kernels.qk_norm_attention (norm + RoPE + flash
    # attention in one op); "norm_rope_sdpa" = the kiln.kernels.qk_norm_rope pre-kernel (e.g. the
    # csrc backend) feeding torch's SDPA (cuDNN/flash on GPU).
    attention: str = "fused"
    adaln_zero: bool = True
    rope_theta: float = 10000.0
    abs_pos: bool = True  # add fixed 2D sin-cos positions to image tokens (SD3) besides RoPE

    def validate(self) -> None:
        for name in ("width", "heads", "patch_size", "in_channels", "text_dim", "pooled_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0 or self.single_depth < 0 or self.depth + self.single_depth == 0:
            raise ConfigError("model.depth + model.single_depth must be >= 1 (both >= 0)")
        if self.width % self.heads:
            raise ConfigError(f"model.width ({self.width}) must be divisible by model.heads ({self.heads})")
        if (self.width // self.heads) % 4:
            raise ConfigError(
                f"model head dim width/heads = {self.width // self.heads} must be a multiple of 4 (2D RoPE)"
            )
        if self.attention not in ATTENTION_PATHS:
            raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention!r}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


def _sdpa(q, k, v, key_mask):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
    )
    return out.transpose(1, 2)


def _attend(q, k, v, qw, kw, rope, token_group, key_mask, cfg: MMDiTConfig, ring=None):
    """Joint attention on (B, S, H, D) views; QK-norm through kiln's ops when enabled. Under
    ring attention (``ring``: the cp mesh) q, k, v, rope and token_group are this rank's S/cp
    tokens, key_mask the whole sequence's."""
    cos, sin = rope
    if ring is not None:
        if cfg.qk_norm:  # the norm and RoPE inside the ring op, as in qk_norm_attention
            return ring_attention(q, k, v, key_mask, ring, q_weight=local_replicated(qw),
                                  k_weight=local_replicated(kw), cos=cos, sin=sin, token_group=token_group)
        return ring_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, key_mask, ring)
    if not cfg.qk_norm:
        return _sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, key_mask)
    qw, kw = local_replicated(qw), local_replicated(kw)
    if cfg.attention == "norm_rope_sdpa":
        q, k = qk_norm_rope(q, k, qw, kw, cos=cos, sin=sin, token_group=token_group)
        return _sdpa(q, k, v, key_mask)
    return qk_norm_attention(q, k, v, qw, kw, cos=cos, sin=sin, token_group=token_group, key_padding_mask=key_mask)


def _modulated(linears: list[nn.Linear], x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tp=None):
    """[linear(adaln_modulate(x, shift, scale)) for each linear]: the column-parallel matmuls that
    read a modulation. They keep x (kept by the modulation anyway), not the modulated copy
    (layers.RemadeInputLinears); under tensor parallelism they read its all-gather, whose rows
    sequence_parallel.Regather keeps instead."""
    h = adaln_modulate(x, shift, scale)  # (B, S', W)
    if tp is not None:
        h = gathered_input(h, tp)  # (B, S, W)
        return [lin(h) for lin in linears]
    remake = implementation("adaln_modulate", x, shift, scale)
    return list(RemadeInputLinears.apply(h, remake, 3, x, shift, scale,
                                         *(p for lin in linears for p in (lin.weight, lin.bias))))


def _heads(qkv: torch.Tensor, head_dim: int, cp=None):
    """(B, S, heads*3*D) -> q, k, v (B, S, heads, D); under context parallel (B, S/cp, ...) ->
    (B, S, heads/cp, D), one all-to-all for the three.

    The QKV projections' output features are ordered (head, q|k|v, D), so a column-parallel
    shard of them (tensor parallelism) holds whole heads with their q, k and v.
    """
    B, S, _ = qkv.shape
    return seq_to_heads(qkv.view(B, S, -1, 3, head_dim), cp).unbind(3)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        w, self.cfg = cfg.width, cfg
        # tensor- / context-parallel (Ulysses) / ring-attention DeviceMesh, set by kiln.engine.parallel
        self.tp = self.cp = self.ring = None
        self.img_mod, self.txt_mod = nn.Linear(w, 6 * w), nn.Linear(w, 6 * w)
        self.img_qkv, self.txt_qkv = nn.Linear(w, 3 * w), nn.Linear(w, 3 * w)
        self.img_proj, self.txt_proj = SliceLinear(w, w), SliceLinear(w, w)  # read slices of the attention output
        self.img_mlp = MLP(w, cfg.mlp_hidden, w)
        self.txt_mlp = MLP(w, cfg.mlp_hidden, w)
        # rows: TEXT_GROUP, IMAGE_GROUP (separate text and image QK-norm weights, SD3)
        self.q_norm = nn.Parameter(torch.ones(2, cfg.head_dim))
        self.k_norm = nn.Parameter(torch.ones(2, cfg.head_dim))

    def forward(self, img, txt, c, rope, token_group, key_mask):
        # img (B, N', W), txt (B, L', W): N' = N/(cp·tp), L' = L/(cp·tp) tokens of this rank;
        # H' = H/(tp·cp) heads in attention
        L = txt.shape[1] * (self.tp.size() if self.tp is not None else 1)
        im = local_replicated(self.img_mod(F.silu(c))).chunk(6, dim=-1)  # 6 x (B, W)
        tm = local_replicated(self.txt_mod(F.silu(c))).chunk(6, dim=-1)
        (txt_qkv,) = _modulated([self.txt_qkv], txt, tm[0], tm[1], self.tp)  # (B, L, 3W/tp)
        (img_qkv,) = _modulated([self.img_qkv], img, im[0], im[1], self.tp)  # (B, N, 3W/tp)
        qkv = torch.cat([txt_qkv, img_qkv], dim=1)
        q, k, v = _heads(qkv, self.cfg.head_dim, self.cp)  # (B, S, H', D) of the joint sequence (ring: S/cp, H/tp)
        attn = heads_to_seq(_attend(q, k, v, self.q_norm, self.k_norm, rope, token_group, key_mask, self.cfg,
                                    self.ring), self.cp)  # (B, S/cp, H/tp, D): this rank's tokens, its TP heads
        txt_a, img_a = attn.flatten(2).split([L, attn.shape[1] - L], dim=1)
        img = gated_residual(img, im[2], [(self.img_proj, img_a)])  # (B, N', W)
        (hidden,) = _modulated([self.img_mlp.fc1], img, im[3], im[4], self.tp)  # (B, N, 4W/tp)
        img = gated_residual(img, im[5], [(self.img_mlp.fc2, hidden)])  # img + gate * fc2(gelu(hidden))
        txt = gated_residual(txt, tm[2], [(self.txt_proj, txt_a)])  # (B, L', W)
        (hidden,) = _modulated([self.txt_mlp.fc1], txt, tm[3], tm[4], self.tp)
        txt = gated_residual(txt, tm[5], [(self.txt_mlp.fc2, hidden)])
        return img, txt


class SingleStreamBlock(nn.Module):
    """Flux single-stream block: attention and MLP in parallel from one modulated input.

    Flux fuses QKV with MLP-in and attention-out with MLP-out; kiln keeps four linears (same
    function, same FLOPs) so that each can be column- or row-parallel on its own.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        w, self.cfg = cfg.width, cfg
        self.tp = self.cp = self.ring = None
        self.mod = nn.Linear(w, 3 * w)
        self.qkv = nn.Linear(w, 3 * w)
        self.mlp_in = nn.Linear(w, cfg.mlp_hidden)
        self.proj = nn.Linear(w, w)
        self.mlp_out = GeluLinear(cfg.mlp_hidden, w, bias=False)  # gelu inside; one bias for the sum (proj's)
        self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
        self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))

    def forward(self, x, c, rope, token_group, key_mask):
        # x (B, S', W), S' = S/(cp·tp) tokens of this rank
        shift, scale, gate = local_replicated(self.mod(F.silu(c))).chunk(3, dim=-1)  # 3 x (B, W)
        qkv, hidden = _modulated([self.qkv, self.mlp_in], x, shift, scale, self.tp)  # (B, S, 3W/tp), (B, S, 4W/tp)
        q, k, v = _heads(qkv, self.cfg.head_dim, self.cp)  # (B, S, H', D), H' = H/(tp·cp); ring: S/cp, H/tp
        attn = heads_to_seq(_attend(q, k, v, self.q_norm, self.k_norm, rope, token_group, key_mask, self.cfg,
                                    self.ring), self.cp)  # (B, S/cp, H/tp, D)
        # x + gate * (proj(attn) + mlp_out(gelu(mlp_in(h)))): (B, S', W)
        return gated_residual(x, gate, [(self.proj, attn.flatten(2)), (self.mlp_out, hidden)])


class MMDiT(nn.Module):
    """The denoiser; also one pipeline stage of itself.

    ``forward(x, t, text, text_mask, pooled, micro)`` runs the whole model. A pipeline stage
    (kiln.engine.parallel) is this module with some parts set to ``None`` and some blocks
    dropped: a stage without the input embedders takes the carrier ``(xs, cond)`` from the
    previous stage, and a stage without the output layer hands the carrier on. Blocks live in
    ModuleDicts keyed by their index, so parameter names are the same in every layout and a
    checkpoint moves between layouts.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.img_in = nn.Linear(cfg.in_channels * p * p, w)
        self.txt_in = nn.Linear(cfg.text_dim, w)
        self.t_embed = ScalarEmbedder(1, w, scale=1000.0)
        self.size_embed = ScalarEmbedder(6, w, freq_dim=64)
        self.pooled_embed = MLP(cfg.pooled_dim, w, w)
        self.double_blocks = nn.ModuleDict({str(i): DoubleStreamBlock(cfg) for i in range(cfg.depth)})
        self.single_blocks = nn.ModuleDict({str(i): SingleStreamBlock(cfg) for i in range(cfg.single_depth)})
        self.final_mod = nn.Linear(w, 2 * w)
        self.final = nn.Linear(w, cfg.in_channels * p * p)
        self.grid = (0, 0)  # (h, w) patches of the current batch; set by embed() or the trainer
        self.tp = self.cp = None  # tensor- / context-parallel DeviceMesh, set by kiln.engine.parallel
        self.ring = False  # context parallel by ring attention (blocks' .ring), not Ulysses
        self.init_weights()

    def init_weights(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) embedders; adaLN-Zero zeroes every modulation
        and the output layer, so each block starts as the identity and the model predicts 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in (self.t_embed.mlp, self.size_embed.mlp, self.pooled_embed):
            nn.init.normal_(emb.fc1.weight, std=0.02)
            nn.init.normal_(emb.fc2.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("q_norm") or name.endswith("k_norm"):
                nn.init.ones_(p)
        if self.cfg.adaln_zero:
            doubles = list(self.double_blocks.values())
            mods = [b.img_mod for b in doubles] + [b.txt_mod for b in doubles]
            mods += [b.mod for b in self.single_blocks.values()] + [self.final_mod, self.final]
            for m in mods:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def conditioning(self, t, pooled, micro):
        # t (B,), pooled (B, Dp), micro (B, 6) -> c (B, W)
        return self.t_embed(t[:, None]) + self.pooled_embed(pooled) + self.size_embed(micro)

    def forward(self, *inputs: torch.Tensor):
        """Predict the velocity for noisy input ``x`` (B, C, H, W) at times ``t`` (B,) in [0, 1].

        Inputs ``(x, t, text, text_mask, pooled, micro)``: text (B, L, text_dim) per-token
        states, text_mask (B, L) bool (True = real token), pooled (B, pooled_dim), micro (B, 6) =
        (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels. Returns (B, C, H, W).
        Pipeline stages take / return the carrier instead (see the class docstring).
        """
        xs, cond = self.embed(*inputs) if self.img_in is not None else inputs
        xs = self.run_blocks(xs, cond)
        if self.final is None:
            return xs, cond
        return self.head(xs, cond)

    def embed(self, x, t, text, text_mask, pooled, micro):
        """-> carrier: xs (B, L+N, W) = [text tokens, image tokens], cond (B, W + L+N) = [c | key mask].

        c and the key mask travel as one tensor because a pipeline stage sends a gradient back for
        every tensor it received and torch 2.11's PipelineStage refuses a None one: the mask alone
        has no gradient, [c | mask] has c's (zero in the mask columns).
        """
        cfg = self.cfg
        B, _, Hpx, Wpx = x.shape
        self.grid = h, w = Hpx // cfg.patch_size, Wpx // cfg.patch_size
        img = self.img_in(patchify(x, cfg.patch_size))  # (B, N, W), N = h*w
        if cfg.abs_pos:
            img = img + sincos_2d(h, w, cfg.width, device=x.device).to(img.dtype)
        txt = self.txt_in(text)  # (B, L, W)
        c = self.conditioning(t, pooled, micro)  # (B, W)
        key_mask = torch.cat([text_mask, text_mask.new_ones(B, h * w)], 1).to(c.dtype)  # (B, L+N)
        return torch.cat([txt, img], dim=1), torch.cat([c, key_mask], dim=1)

    def _split(self) -> int:
        """Ranks the image tokens are split over: cp x tp (1 without either)."""
        return (self.cp.size() if self.cp is not None else 1) * (self.tp.size() if self.tp is not None else 1)

    def padded_tokens(self) -> int:
        """Image tokens of the current grid, padded up to a multiple of cp·tp: every rank holds
        the same count (DTensor's and the all-to-all's even splits) whatever the bucket, so the
        layout never changes which buckets a dataset uses. Pads are masked out as keys."""
        n, k = self.grid[0] * self.grid[1], self._split()
        return -(-n // k) * k

    def run_blocks(self, xs, cond):
        """This module's blocks on the carrier; xs (B, L+N, W) in and out. Under context parallel
        the output is this rank's tokens, [its 1/cp of the text, its 1/cp of the padded image],
        and so is the input of a later pipeline stage (its cp peer in the previous stage sent it)."""
        cfg = self.cfg
        c, key_mask = cond[:, :cfg.width], cond[:, cfg.width:]  # (B, W), (B, L+N): the mask stays whole
        h, w = self.grid
        N, Np = h * w, self.padded_tokens()
        S, pad = xs.shape[1], Np - h * w
        L = key_mask.shape[1] - N
        received = self.cp is not None and self.img_in is None  # xs already padded and split
        cos_i, sin_i = rope_2d(h, w, cfg.head_dim, cfg.rope_theta, device=xs.device)  # (N, D)
        # text tokens and pads are not rotated: cos = 1, sin = 0
        cos = torch.cat([torch.ones(L, cfg.head_dim, device=xs.device), cos_i,
                         torch.ones(pad, cfg.head_dim, device=xs.device)])  # (L+Np, D)
        sin = torch.cat([torch.zeros(L, cfg.head_dim, device=xs.device), sin_i,
                         torch.zeros(pad, cfg.head_dim, device=xs.device)])
        token_group = torch.cat([
            torch.full((L,), TEXT_GROUP, device=xs.device), torch.full((Np,), IMAGE_GROUP, device=xs.device)
        ])  # (L+Np,)
        mask = key_mask > 0.5
        if pad:  # (B, L+Np, W); pads are never attended to
            xs = xs if received else _PadTokens.apply(xs, pad)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
        if self.cp is not None:
            order = _cp_order(L, Np, self.cp.size(), xs.device)  # attention sees the tokens in this order
            cos, sin, token_group, mask = cos[order], sin[order], token_group[order], mask[:, order]
            if not received:  # (B, (L+Np)/cp, W)
                xs = torch.cat([local_tokens(xs[:, :L], self.cp), local_tokens(xs[:, L:], self.cp)], dim=1)
            L //= self.cp.size()
            if self.ring:  # ring attention rotates and normalizes this rank's tokens only
                cos, sin, token_group = (t.chunk(self.cp.size())[self.cp.get_local_rank()]
                                         for t in (cos, sin, token_group))
        rope = (cos.to(xs.dtype), sin.to(xs.dtype))
        if len(self.double_blocks):
            # each stream is split along its own tokens under TP; joined again for single blocks
            txt, img = scatter_seq(xs[:, :L], self.tp), scatter_seq(xs[:, L:], self.tp)
            for block in self.double_blocks.values():
                img, txt = block(img, txt, c, rope, token_group, mask)
            xs = torch.cat([gather_seq(txt, self.tp), gather_seq(img, self.tp)], dim=1)
        if len(self.single_blocks):
            xs = scatter_seq(xs, self.tp)
            for block in self.single_blocks.values():
                xs = block(xs, c, rope, token_group, mask)
            xs = gather_seq(xs, self.tp)
        if self.cp is None and pad:
            xs = xs[:, :S].contiguous()  # the carrier keeps its shape (and is sent) between pipeline stages
        return xs  # (B, L+N, W), or (B, (L+Np)/cp, W) under cp

    def head(self, xs, cond):
        """Carrier -> velocity (B, C, H, W) from the image tokens; under context parallel this
        rank's padded image tokens' patches (B, Np/cp, C·p·p) (see :meth:`output_target`)."""
        cfg = self.cfg
        c = cond[:, :cfg.width]  # (B, W)
        h, w = self.grid
        local = self.padded_tokens() // self.cp.size() if self.cp is not None else h * w
        img = xs[:, xs.shape[1] - local:]  # (B, N or Np/cp, W)
        shift, scale = self.final_mod(F.silu(c)).chunk(2, dim=-1)
        out = self.final(adaln_modulate(img, shift, scale))  # (B, N or Np/cp, C*p*p)
        if self.cp is not None:
            return out
        return unpatchify(out, cfg.patch_size, cfg.in_channels, h, w)  # (B, C, H, W)

    def output_target(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A (B, C, H, W) target in the layout ``forward`` returns, and per-token loss weights:
        (itself, None), or under context parallel this rank's padded image tokens' patches
        (B, Np/cp, C·p·p) and, when there are pads, weights (Np/cp,) = Np/N on real tokens and 0
        on pads, so the mean of the cp ranks' weighted means is the mean over the N real tokens."""
        if self.cp is None:
            return target, None
        patches = patchify(target, self.cfg.patch_size)  # (B, N, C*p*p)
        N, Np = patches.shape[1], self.padded_tokens()
        if Np == N:
            return local_tokens(patches, self.cp), None
        patches = torch.cat([patches, patches.new_zeros(patches.shape[0], Np - N, patches.shape[2])], dim=1)
        weights = torch.cat([torch.full((N,), Np / N, device=target.device), target.new_zeros(Np - N)])
        return local_tokens(patches, self.cp), local_tokens(weights[None], self.cp)[0]


class _PadTokens(torch.autograd.Function):
    """(B, S, W) -> (B, S + pad, W) with zero tokens; the backward hands back a contiguous
    gradient (cat's and pad's are strided views), which a pipeline stage sends as it is."""

    @staticmethod
    def forward(ctx, x, pad: int):
        ctx.tokens = x.shape[1]
        return torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, : ctx.tokens].contiguous(), None


def _cp_order(L: int, N: int, cp: int, device) -> torch.Tensor:
    """Joint-sequence positions in the order context parallel's all-to-all gathers them: rank 0's
    text and image tokens, then rank 1's, ... (each rank holds [its L/cp text, its N/cp image])."""
    if L % cp or N % cp:
        raise ValueError(f"context parallel: {L} text and {N} image tokens do not split over parallel.cp={cp} "
                         "ranks (cp must divide text.max_length; run_blocks pads the image tokens)")
    text, image = torch.arange(L, device=device).view(cp, -1), L + torch.arange(N, device=device).view(cp, -1)
    return torch.cat([text, image], dim=1).flatten()
