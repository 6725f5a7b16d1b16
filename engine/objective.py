"""Rectified flow: x_t = (1 - t)·x0 + t·noise, velocity target v = noise - x0 (SD3).

Timesteps t in (0, 1) are logit-normal (SD3: sigmoid of N(mean, std), concentrating training on
mid-range noise where the velocity is hardest to predict) or uniform, then shifted toward noise
by s = sqrt(image tokens / base tokens): t' = s·t / (1 + (s - 1)·t). At 1024² with patch 2 on an
8x VAE (4096 tokens) against a 256-token base, s = 4; SD3 uses 3.0 at that size.
"""

from __future__ import annotations

import math

import torch

from kiln.engine.config import ObjectiveConfig


def resolution_shift(cfg: ObjectiveConfig, image_tokens: int) -> float:
    return math.sqrt(image_tokens / cfg.shift_base_tokens)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(cfg: ObjectiveConfig, n: int, image_tokens: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """(n,) training timesteps in (0, 1)."""
    if cfg.timesteps == "logit_normal":
        u = torch.randn(n, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        t = torch.sigmoid(u)
    else:
        t = torch.rand(n, generator=generator, device=device)
    return shift_timesteps(t, resolution_shift(cfg, image_tokens))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input x_t and velocity target v for clean x0 (B, ...) at times t (B,)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * noise, noise - x0


def caption_drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which captions become "" (the unconditional branch of CFG), each with probability p.

    Drawn for the whole global batch so that every data-parallel layout drops the same samples."""
    if p == 0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < p


def drop_captions(captions: list[str], drop: torch.Tensor) -> list[str]:
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
