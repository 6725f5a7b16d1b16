"""Sample the held-out prompts, score prompt adherence exactly, and save a PNG grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.engine.config import RunConfig
from kiln.engine.data.loader import eval_prompts, to_uint8
from kiln.engine.data.scorer import adherence
from kiln.engine.objective import resolution_shift
from kiln.engine.sampler import euler_sample


def save_grid(images: np.ndarray, path: Path, upscale: int = 4) -> None:
    """uint8 (N, H, W, 3) -> one PNG, ~square grid, nearest-neighbour upscaled for viewing."""
    n, H, W, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (H + 2), cols * (W + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (H + 2) + 1 : r * (H + 2) + 1 + H, c * (W + 2) + 1 : c * (W + 2) + 1 + W] = img
    Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST).save(path)


@torch.no_grad()
def evaluate(cfg: RunConfig, model, encoder, device: torch.device, autocast, out_png: Path | None) -> dict:
    """Generate one image per held-out prompt and return adherence per attribute (0-1)."""
    prompts = eval_prompts(cfg.data, cfg.sample.num_prompts)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)  # same noise every eval
    res = cfg.data.resolution
    noise = torch.randn(len(prompts.captions), cfg.model.in_channels, res, res, generator=gen, device=device)
    cond = encoder.encode(prompts.captions)
    uncond = encoder.encode([""] * len(prompts.captions))
    tokens = (res // cfg.model.patch_size) ** 2
    was_training = model.training
    model.eval()
    with autocast():
        x = euler_sample(model, noise, cond, uncond, prompts.micro.to(device), cfg.sample.steps,
                         cfg.sample.cfg_scale, resolution_shift(cfg.objective, tokens))
    model.train(was_training)
    images = to_uint8(x.float())
    if out_png is not None and cfg.sample.grid_size:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        k = min(cfg.sample.grid_size, len(images))
        save_grid(images[:k], out_png)
        out_png.with_suffix(".txt").write_text("".join(c + "\n" for c in prompts.captions[:k]))
    return adherence(list(images), prompts.attributes)
