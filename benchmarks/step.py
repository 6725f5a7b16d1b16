"""End-to-end training-step benchmark: images/s, MFU, the per-stage split of one step and (CUDA) peak memory.

    kiln bench step [RECIPE] [--steps N] [--warmup W] [--set a.b=c ...] [--out FILE.jsonl]

Each timed step is synchronised (CUDA) so its wall time is exact; stage times come from the
engine's own StageTimer. MFU = 3 · forward FLOPs (kiln.model.forward_flops: linears plus the
S^2 attention terms, modulation per sample) · batch / step time / dense bf16 peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kiln.benchmarks.common import append_rows, print_table, provenance, quantiles
from kiln.engine.config import apply_override
from kiln.engine.metrics import peak_flops
from kiln.engine.recipes import recipe
from kiln.engine.train import Trainer


def run(recipe_name: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    cfg = recipe(recipe_name)
    for a in overrides:
        apply_override(cfg, a)
    cfg.validate()
    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="kiln-bench-")))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step()
    sync()
    trainer.timer.resolve()
    trainer.timer.seconds.clear()
    cuda = trainer.device.type == "cuda"
    if cuda:  # the timed steps' peak: weights, optimizer state, activations and workspace
        torch.cuda.reset_peak_memory_stats(trainer.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    stages = {k: v / steps * 1000 for k, v in trainer.timer.resolve().items()}
    res, B = cfg.data.resolution, cfg.train.batch_size
    flops = trainer.last_step_flops  # 3 forwards at the batch's model-input size (latents with a VAE)
    q = quantiles(times)
    peak = peak_flops(trainer.device)
    return {
        "op": "train_step", "provider": "kiln", "mode": "fwd+bwd+opt", "recipe": recipe_name,
        "shape": f"B={B} {cfg.model.in_channels}x{res}x{res} text={cfg.text.max_length}",
        "dtype": {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}.get(trainer.compute_dtype, "fp32"),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        **q,
        "images_per_second": B / (q["p50_ms"] / 1000),
        "tflops": flops / (q["p50_ms"] / 1000) / 1e12,
        "mfu": flops / (q["p50_ms"] / 1000) / peak if peak else None,
        "stage_ms": {k: round(v, 3) for k, v in stages.items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else None,
        "overrides": overrides,
        **provenance(trainer.device),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kiln bench step", description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="a.b=c")
    p.add_argument("--out", type=Path, help="append the JSONL row here")
    args = p.parse_args(argv)
    row = run(args.recipe, args.steps, args.warmup, args.set)
    append_rows(args.out, [row])
    print_table([row], ["recipe", "shape", "p50_ms", "images_per_second", "tflops", "mfu", "peak_memory_gib", "device"])
    print("stage ms/step:", row["stage_ms"])


if __name__ == "__main__":
    main()
