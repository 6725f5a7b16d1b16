"""Named MMDiT presets (DiT style: a dict of named constructors) and an honest FLOP count.

Parameter counts (pixel space, patch 2 unless noted; `kiln model info NAME` prints exact ones):
tiny ~1.9M (CPU demo), small ~140M, base ~1.0B, large ~2.5B, xl ~8B. Text dims follow the
open_clip tower each size is meant to pair with (kiln-tiny-text 192, ViT-B-32 512,
ViT-L-14 768, ViT-bigG-14 1280).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.model.mmdit import MMDiT, MMDiTConfig


def tiny() -> MMDiTConfig:
    return MMDiTConfig(width=128, depth=2, single_depth=2, heads=4, patch_size=4, text_dim=192, pooled_dim=192)


def small() -> MMDiTConfig:
    return MMDiTConfig(width=512, depth=8, single_depth=16, heads=8, patch_size=2, in_channels=4,
                       text_dim=512, pooled_dim=512)


def base() -> MMDiTConfig:
    return MMDiTConfig(width=1536, depth=12, single_depth=0, heads=12, patch_size=2, in_channels=16,
                       text_dim=768, pooled_dim=768)


def large() -> MMDiTConfig:
    return MMDiTConfig(width=2048, depth=16, single_depth=0, heads=16, patch_size=2, in_channels=16,
                       text_dim=1280, pooled_dim=1280)


def xl() -> MMDiTConfig:
    return MMDiTConfig(width=3072, depth=16, single_depth=20, heads=24, patch_size=2, in_channels=16,
                       text_dim=1280, pooled_dim=1280)


PRESETS: dict[str, Callable[[], MMDiTConfig]] = {
    "tiny": tiny, "small": small, "base": base, "large": large, "xl": xl,
}


def preset(name: str) -> MMDiTConfig:
    if name not in PRESETS:
        from kiln.engine.errors import ConfigError

        raise ConfigError(f"model preset {name!r} is not one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def count_params(cfg: MMDiTConfig) -> int:
    """Exact parameter count, built on the meta device (no memory, works for xl)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: MMDiTConfig, height: int, width: int, text_tokens: int) -> int:
    """Matmul FLOPs of one forward pass for ONE image of height x width (model input pixels).

    Counts every linear (2 FLOPs per multiply-add) and attention's two S^2 products
    (QK^T and PV: 4·S^2·width). adaLN modulation is per sample (c is one vector per image),
    not per token. Elementwise work (norms, RoPE, softmax) is excluded, as in MFU practice.
    A training step costs 3x this (backward = 2x forward).
    """
    p, w, m = cfg.patch_size, cfg.width, cfg.mlp_hidden
    n = (height // p) * (width // p)
    L, S = text_tokens, n + text_tokens
    P = cfg.in_channels * p * p
    flops = 2 * n * P * w + 2 * L * cfg.text_dim * w  # img_in, txt_in
    flops += 2 * (256 * w + w * w) + 2 * (6 * 64 * w + w * w) + 2 * (cfg.pooled_dim * w + w * w)
    double = 2 * S * (4 * w * w + 2 * w * m) + 4 * S * S * w + 2 * 2 * 6 * w * w
    single = 2 * S * (w * (3 * w + m) + (w + m) * w) + 4 * S * S * w + 2 * 3 * w * w
    flops += cfg.depth * double + cfg.single_depth * single
    flops += 2 * 2 * w * w + 2 * n * w * P  # final modulation + output projection
    return flops
