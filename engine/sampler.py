"""Euler ODE sampler for rectified flow, with classifier-free guidance.

Integrates dx/dt = v(x, t) from t = 1 (pure noise) to t = 0 on the same resolution-shifted grid
the objective trains on. CFG runs the conditional and unconditional ("" caption) passes as one
batch of 2B: v = v_uncond + scale·(v_cond - v_uncond).
"""

from __future__ import annotations

import torch

from kiln.engine.objective import shift_timesteps
from kiln.model.text_encoder import TextBatch


def _cat(a: TextBatch, b: TextBatch) -> TextBatch:
    return TextBatch(torch.cat([a.tokens, b.tokens]), torch.cat([a.pooled, b.pooled]), torch.cat([a.mask, b.mask]))


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, cond: TextBatch, uncond: TextBatch, micro: torch.Tensor,
                 steps: int, cfg_scale: float, shift: float = 1.0) -> torch.Tensor:
    """Sample images (B, C, H, W) from ``noise`` given text conditioning (B rows each)."""
    B = noise.shape[0]
    ts = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=noise.device), shift)
    guided = cfg_scale != 1.0
    text = _cat(cond, uncond) if guided else cond
    micro2 = torch.cat([micro, micro]) if guided else micro
    x = noise
    for i in range(steps):
        t = ts[i].expand(B)
        xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        v = model(xin, tin, text.tokens, text.mask, text.pooled, micro2)
        if guided:
            vc, vu = v.chunk(2)
            v = vu + cfg_scale * (vc - vu)
        x = x + (ts[i + 1] - ts[i]) * v
    return x
