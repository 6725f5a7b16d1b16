"""``kiln export``: a run's EMA (or raw) weights as one safetensors file (model/exported.py).

Only the weights travel: no optimizer state (2x the weights in fp32), no RNG or data position.
The header records what a sampler needs besides them: the MMDiT config, the text encoder (name,
weights file, max length, and the run's seed, which a random-init encoder depends on), the VAE
folder, the step and which weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.engine.errors import KilnError
from kiln.engine.generate import run_weights
from kiln.model.exported import save_exported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_run(run_dir: Path, out: Path | None = None, use_ema: bool = True, dtype: str = "fp32",
               checkpoint: str | None = None) -> Path:
    if dtype not in DTYPES:
        raise KilnError(f"export: --dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    cfg, weights, path, step = run_weights(run_dir, use_ema, checkpoint, command="export")
    which = "ema" if use_ema else "raw"
    out = Path(out) if out else Path(run_dir) / f"model_step{step:08d}_{which}_{dtype}.safetensors"
    if out.exists():
        raise KilnError(f"export: {out} exists; choose another --out")
    extra = {"kiln.text": json.dumps({"family": cfg.text.family, "name": cfg.text.name, "weights": cfg.text.weights,
                                      "max_length": cfg.text.max_length}),
             "kiln.seed": str(cfg.seed), "kiln.vae": cfg.data.vae, "kiln.step": str(step), "kiln.weights": which,
             "kiln.checkpoint": str(path)}
    save_exported(weights, cfg.model, out, DTYPES[dtype], extra)
    return out
