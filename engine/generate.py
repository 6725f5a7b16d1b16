"""``kiln sample``: images from text prompts with a trained run's checkpoint.

The frozen parts (text encoder, VAE) are rebuilt as training built them; only the chosen weights
(EMA by default) are read from the checkpoint, so sampling needs neither the training data nor
memory for the optimizer. One process, any checkpoint layout.

Image i's starting noise is drawn on the CPU from a generator seeded with ``seed + i``: the
same prompt file and seed give the same noise whatever the batch size or device, and one image
can be redone alone with ``--seed seed+i``. Micro-conditioning asks for an uncropped image
(original size = target size, crop 0, 0), as SDXL recommends at inference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.engine import checkpoint
from kiln.engine.data.loader import to_uint8
from kiln.engine.errors import KilnError
from kiln.engine.evaluate import save_grid
from kiln.engine.objective import resolution_shift
from kiln.engine.sampler import euler_sample


@dataclasses.dataclass
class SampleRequest:
    prompts: list[str]
    size: tuple[int, int] | None = None  # (width, height) in pixels; None = the run's stage resolution, square
    seed: int = 0
    steps: int | None = None  # None = the run's sample.steps
    cfg_scale: float | None = None  # None = the run's sample.cfg_scale
    negative: str = ""  # the unconditional branch of CFG: "" is what caption dropout trained
    use_ema: bool = True
    batch_size: int = 8
    device: str = "auto"
    checkpoint: str | None = None  # a step_*.pt file or step_*/ folder; None = the run's latest
    clip_weights: str | None = None  # score each image against its prompt (CLIP score) with this open_clip file
    clip_model: str = "ViT-L-14"

    def validate(self) -> None:
        if not self.prompts:
            raise KilnError("sample: no prompts (give --prompt TEXT or --prompts FILE)")
        if self.batch_size < 1:
            raise KilnError(f"sample: --batch-size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise KilnError(f"sample: --steps must be >= 1, got {self.steps}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise KilnError(f"sample: --cfg must be >= 0, got {self.cfg_scale}")
        if self.clip_weights and not Path(self.clip_weights).is_file():
            raise KilnError(f"sample: --clip-weights {self.clip_weights!r} is not a file (local open_clip weights)")


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as width x height."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise KilnError(f"sample: --size {text!r} is not SIDE or WIDTHxHEIGHT in pixels") from None
    if len(parts) > 2 or w <= 0 or h <= 0:
        raise KilnError(f"sample: --size {text!r} is not SIDE or WIDTHxHEIGHT in pixels")
    return w, h


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    if not path.is_file():
        raise KilnError(f"sample: prompts file {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def run_weights(run_dir: Path, use_ema: bool, path: str | None, command: str = "sample"):
    """(the run's config, one process; its EMA or raw weights, checked against the model the
    config builds; the checkpoint path; its step). ``path`` None = the run's latest checkpoint."""
    from kiln.engine.config import ParallelConfig
    from kiln.engine.train import load_run_config
    from kiln.model.mmdit import MMDiT

    cfg = load_run_config(run_dir)
    cfg.parallel = ParallelConfig()  # one process, whatever layout trained the run
    if use_ema and not cfg.ema.enabled:
        raise KilnError(f"{command}: {run_dir} trained without EMA (ema.enabled=false); use its raw weights (--raw)")
    path = Path(path) if path else checkpoint.latest(run_dir)
    with torch.device("meta"):  # shapes only: every weight comes from the checkpoint
        like = MMDiT(cfg.model).state_dict()
    weights, step = checkpoint.load_weights(path, "ema" if use_ema else "model", like)
    wrong = sorted(set(like) ^ set(weights)) or [k for k in like if weights[k].shape != like[k].shape]
    if wrong:
        raise KilnError(f"{command}: checkpoint {path} does not fit the model in {run_dir}/config.json "
                        f"(first mismatch: {wrong[0]})")
    return cfg, weights, path, step


def load_sampler(run_dir: Path, req: SampleRequest):
    """(cfg, model in eval mode, text encoder, VAE or None, device, checkpoint path, its step)."""
    from kiln.engine.train import build_frozen, resolve_device
    from kiln.model.mmdit import MMDiT

    cfg, weights, path, step = run_weights(run_dir, req.use_ema, req.checkpoint)
    device = resolve_device(req.device)
    encoder, vae = build_frozen(cfg, device)
    with torch.device("meta"):
        model = MMDiT(cfg.model).requires_grad_(False)
    model = model.to_empty(device=device)
    model.load_state_dict(weights)
    return cfg, model.eval(), encoder, vae, device, path, step


def _check_size(size: tuple[int, int], multiple: int) -> None:
    w, h = size
    if w % multiple or h % multiple:
        raise KilnError(f"sample: --size {w}x{h}: width and height must be multiples of {multiple} px "
                        "(patch size x VAE downsampling: one token each)")


def _noise(seeds: range, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(len(seeds), *shape): one CPU generator per image, so batching and device change nothing."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def sample_images(run_dir: Path, req: SampleRequest) -> tuple[np.ndarray, dict]:
    """uint8 (N, H, W, 3) images for ``req.prompts`` and what made them (one dict for all)."""
    from kiln.engine.train import autocast_factory, compute_dtype

    req.validate()
    cfg, model, encoder, vae, device, path, step = load_sampler(run_dir, req)
    factor = vae.factor if vae is not None else 1
    w, h = req.size or (cfg.stage_at(step).resolution,) * 2
    _check_size((w, h), cfg.model.patch_size * factor)
    steps = req.steps or cfg.sample.steps
    scale = cfg.sample.cfg_scale if req.cfg_scale is None else req.cfg_scale
    if req.negative and scale == 1.0:
        raise KilnError("sample: --negative needs guidance (--cfg other than 1): at 1 there is no unconditional pass")
    shape = (cfg.model.in_channels, h // factor, w // factor)  # what the model sees: pixels or latents
    shift = resolution_shift(cfg.objective, (shape[1] // cfg.model.patch_size) * (shape[2] // cfg.model.patch_size))
    autocast = autocast_factory(device, compute_dtype(device, cfg.train.precision))
    images = []
    for first in range(0, len(req.prompts), req.batch_size):
        chunk = req.prompts[first : first + req.batch_size]
        noise = _noise(range(req.seed + first, req.seed + first + len(chunk)), shape, device)
        micro = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).expand(len(chunk), 6)
        with torch.no_grad(), autocast():
            x = euler_sample(model, noise, encoder.encode(chunk), encoder.encode([req.negative] * len(chunk)),
                             micro, steps, scale, shift)
            images.append(to_uint8((vae.decode(x) if vae is not None else x).float()))
    made = {"checkpoint": str(path), "step": step, "weights": "ema" if req.use_ema else "raw", "width": w,
            "height": h, "steps": steps, "cfg_scale": scale, "negative": req.negative, "shift": round(shift, 6)}
    return np.concatenate(images), made


def default_out(run_dir: Path, step: int) -> Path:
    """RUN/generated/step_XXXXXXXX, or -2, -3... beside an earlier batch of the same step."""
    base = Path(run_dir) / "generated" / f"step_{step:08d}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _clip_scores(images: np.ndarray, req: SampleRequest) -> list[float | None]:
    if not req.clip_weights:
        return [None] * len(images)
    from kiln.engine.clip import ClipEmbedder, clip_scores

    clip = ClipEmbedder(req.clip_model, req.clip_weights, "cuda" if torch.cuda.is_available() else "cpu")
    return [round(v, 5) for v in clip_scores(clip.images(images), clip.texts(req.prompts)).tolist()]


def write_samples(images: np.ndarray, made: dict, req: SampleRequest, out: Path) -> Path:
    """NNNNN.png per prompt, grid.png, and samples.jsonl (prompt, seed and settings per file;
    with ``req.clip_weights``, each image's CLIP score against its prompt)."""
    _check_out(out)
    scores = _clip_scores(images, req)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, prompt, score) in enumerate(zip(images, req.prompts, scores, strict=True)):
        name = f"{i:05d}.png"
        Image.fromarray(img).save(out / name)
        extra = {"clip_score": score} if score is not None else {}
        rows.append(json.dumps({"file": name, "prompt": prompt, "seed": req.seed + i, **made, **extra}))
    H, W = images.shape[1:3]
    save_grid(images, out / "grid.png", upscale=max(1, 128 // max(H, W)))  # tiny runs' 32 px: 4x
    checkpoint.atomic_write_text(out / "samples.jsonl", "".join(r + "\n" for r in rows))
    return out


def _check_out(out: Path) -> None:
    if (out / "samples.jsonl").exists():
        raise KilnError(f"sample: {out} already holds samples (samples.jsonl); choose another --out")


def sample_run(run_dir: Path, req: SampleRequest, out: Path | None = None) -> Path:
    if out is not None:
        _check_out(out)  # before the sampling, not after
    images, made = sample_images(run_dir, req)
    return write_samples(images, made, req, out or default_out(run_dir, made["step"]))
