"""Held-out evaluation: sample the held-out prompts and score adherence exactly (+ a PNG grid),
and the held-out loss at fixed timesteps."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.engine.config import RunConfig
from kiln.engine.data.loader import eval_prompts, to_model_range, to_uint8
from kiln.engine.data.scorer import adherence
from kiln.engine.objective import interpolate, resolution_shift, shift_timesteps
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


def heldout_batch(cfg: RunConfig, resolution: int):
    """The fixed held-out prompts (and images) at ``resolution`` in the sample.captions style."""
    style = cfg.data.captions if cfg.sample.captions == "same" else cfg.sample.captions
    data = dataclasses.replace(cfg.data, resolution=resolution, captions=style)
    return eval_prompts(data, cfg.sample.num_prompts)


@torch.no_grad()
def evaluate(cfg: RunConfig, model, encoder, device: torch.device, autocast, out_png: Path | None,
             resolution: int | None = None, vae=None) -> dict:
    """Generate one image per held-out prompt and return adherence per attribute (0-1)."""
    res = resolution or cfg.data.resolution
    prompts = heldout_batch(cfg, res)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)  # same noise every eval
    side = res // (vae.factor if vae is not None else 1)  # model input side: pixels or latents
    noise = torch.randn(len(prompts.captions), cfg.model.in_channels, side, side, generator=gen, device=device)
    cond = encoder.encode(prompts.captions)
    uncond = encoder.encode([""] * len(prompts.captions))
    tokens = (side // cfg.model.patch_size) ** 2
    was_training = model.training
    model.eval()
    with autocast():
        x = euler_sample(model, noise, cond, uncond, prompts.micro.to(device), cfg.sample.steps,
                         cfg.sample.cfg_scale, resolution_shift(cfg.objective, tokens))
    model.train(was_training)
    images = to_uint8((vae.decode(x) if vae is not None else x).float())
    if out_png is not None and cfg.sample.grid_size:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        k = min(cfg.sample.grid_size, len(images))
        save_grid(images[:k], out_png)
        out_png.with_suffix(".txt").write_text("".join(c + "\n" for c in prompts.captions[:k]))
    scores = clip_metrics(cfg, images, prompts, device) if cfg.sample.clip_weights else {}
    if any(a is None for a in prompts.attributes):  # real captions: no attribute scorer
        return scores
    return {**adherence(list(images), prompts.attributes), **scores}


def clip_metrics(cfg: RunConfig, images: np.ndarray, prompts, device: torch.device) -> dict:
    """clip_score: mean cosine of each generated image with its prompt; cmmd: CMMD between the
    generated images and the real held-out images (engine/clip.py)."""
    from kiln.engine.clip import cached_embedder, clip_scores, cmmd

    clip = cached_embedder(cfg.sample.clip_model, cfg.sample.clip_weights, str(device))
    generated = clip.images(images)
    real = clip.images(np.ascontiguousarray(prompts.images.permute(0, 2, 3, 1).numpy()))
    return {"clip_score": float(clip_scores(generated, clip.texts(prompts.captions)).mean()),
            "cmmd": cmmd(generated, real)}


METRICS = ("heldout_loss", "clip_score", "cmmd")  # the scores that are not exact-scorer attributes


def split_scores(scores: dict) -> tuple[dict, dict]:
    """An evaluation's scores -> (adherence per attribute, the METRICS present)."""
    return ({k: v for k, v in scores.items() if k not in METRICS},
            {k: scores[k] for k in METRICS if k in scores})


@torch.no_grad()
def heldout_loss(cfg: RunConfig, model, encoder, device: torch.device, autocast,
                 resolution: int | None = None, vae=None) -> float:
    """Mean velocity MSE on the held-out images, each at ``sample.heldout_timesteps`` fixed t.

    The t grid is the midpoints of equal bins of (0, 1) before the resolution shift, the same for
    every run whatever its training timestep sampler, and the noise is fixed: two runs' numbers
    differ only through their weights. ~3 training steps of compute at the defaults (64 x 8).
    """
    res = resolution or cfg.data.resolution
    batch = heldout_batch(cfg, res)
    x0 = to_model_range(batch.images.to(device))
    x0 = vae.encode(x0) if vae is not None else x0
    text = encoder.encode(batch.captions)
    micro = batch.micro.to(device)
    k = cfg.sample.heldout_timesteps
    grid = (torch.arange(k, device=device, dtype=torch.float32) + 0.5) / k
    tokens = (x0.shape[-2] // cfg.model.patch_size) * (x0.shape[-1] // cfg.model.patch_size)
    s = resolution_shift(cfg.objective, tokens)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 54321)
    was_training = model.training
    model.eval()
    total = 0.0
    for t in grid.tolist():
        noise = torch.randn(x0.shape, generator=gen, device=device)
        times = shift_timesteps(torch.full((len(x0),), t, device=device), s)
        xt, target = interpolate(x0, noise, times)
        with autocast():
            pred = model(xt, times, text.tokens, text.mask, text.pooled, micro)
        total += torch.nn.functional.mse_loss(pred.float(), target).item()
    model.train(was_training)
    return total / k


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict:
    """Scores of a run's latest checkpoint with ``sample.*`` overrides (CFG scale, EMA or raw...).

    The text encoder, model and EMA are rebuilt exactly as training built them (same seed), then
    the checkpoint is loaded; nothing in the run directory is written.
    """
    from kiln import kernels
    from kiln.engine import checkpoint
    from kiln.engine.config import ParallelConfig, apply_override
    from kiln.engine.errors import ConfigError
    from kiln.engine.train import Trainer, load_run_config

    cfg = load_run_config(run_dir)
    for assignment in overrides:
        if not assignment.strip().startswith("sample."):
            raise ConfigError(f"eval: only sample.* fields can change after training, got {assignment!r}")
        apply_override(cfg, assignment)
    cfg.validate()
    backend = None if cfg.train.kernel_backend == "auto" else cfg.train.kernel_backend
    with kernels.use_backend(backend):
        cfg.parallel = ParallelConfig()  # scoring runs in one process, whatever layout trained the run
        trainer = Trainer(cfg, run_dir)
        trainer.resume_from(checkpoint.latest(run_dir))
        scores = trainer.run_eval(None)
    return {"step": trainer.step, "overrides": list(overrides), **scores}
