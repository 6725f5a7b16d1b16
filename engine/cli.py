"""The ``kiln`` command line.

    kiln train [RECIPE | --config FILE.json] [--steps N] [--out DIR] [--resume DIR] [--set a.b=c ...]
    kiln eval RUN_DIR [--set sample.cfg_scale=2 ...] [--out FILE.json]
    kiln ablate STUDY [--steps N] [--out DIR] [--jobs N] | kiln ablate --list
    kiln model info PRESET [--resolution PX] [--text-tokens L]
    kiln model scaling PRESET [--gpus 8,64,512] [--batch-per-gpu N] [--resolution PX] [--ac MODE] [--optim adamw|muon]
                              [--cp-attention auto|ulysses|ring]
    kiln backends
    kiln data prepare SRC OUT [--shard-size N] [--workers N] | kiln data preview DATASET [--out grid.png]
    kiln data score DATASET --weights CLIP.pt --aesthetic HEAD.pt [--model ViT-L-14] | kiln data bench DATASET
    kiln data encode DATASET --vae VAE_DIR --resolution PX [--text-name ...]
    kiln bench step [RECIPE] [--steps N] [--set a.b=c] [--out FILE.jsonl]
    kiln bench group_norm|attention|qk_norm_rope [--out FILE.jsonl]   (CUDA)

Errors a user can fix (bad config value, missing file, corrupt checkpoint, existing run
directory) print one line ``kiln: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from kiln.engine.errors import ConfigError, KilnError


def _train(args) -> None:
    from kiln.engine.config import apply_override
    from kiln.engine.recipes import recipe
    from kiln.engine.train import load_run_config, train

    if sum(map(bool, (args.resume, args.recipe, args.config))) > 1:
        raise KilnError("give one of RECIPE, --config FILE.json or --resume RUN_DIR")
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
    else:
        cfg = config_file(args.config) if args.config else recipe(args.recipe or "tiny")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.recipe}-{stamp}"
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if restarted and _has_checkpoint(run_dir):  # torchrun --max-restarts: continue the run
            args.resume, cfg = str(run_dir), load_run_config(run_dir)
        elif os.environ.get("RANK", "0") == "0" and run_dir.exists() and any(run_dir.iterdir()):
            # rank 0 alone: other torchrun ranks may start after rank 0 has created the folder
            raise KilnError(f"run directory {run_dir} already exists and is not empty: "
                            f"use --resume {run_dir} to continue it, or another --out")
    if args.steps is not None:
        cfg.train.steps = args.steps
    for assignment in args.set:
        apply_override(cfg, assignment)
    cfg.validate()
    print(f"kiln: run directory {run_dir}", file=sys.stderr)
    summary = train(cfg, run_dir, resume=bool(args.resume), fail_at_step=_injected_failure(args))
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
        return
    keys = ("steps", "final_loss", "heldout_loss", "clip_score", "cmmd", "images_per_second", "tflops_per_gpu",
            "mfu", "adherence", "stage_seconds")
    print(json.dumps({k: summary[k] for k in keys if summary.get(k) is not None or k == "heldout_loss"}, indent=2))
    if summary["diverged_at_step"] is not None:
        print(f"kiln: training diverged (non-finite loss) at step {summary['diverged_at_step']}; "
              f"the last good checkpoint in {run_dir} is kept", file=sys.stderr)
        sys.exit(3)


def _injected_failure(args) -> int | None:
    """--fail-at-step applies to one rank (the last) and to torchrun's first attempt only, so
    that a restart (--max-restarts) can show that the run resumes."""
    if args.fail_at_step is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    last = int(os.environ.get("WORLD_SIZE", "1")) - 1
    return args.fail_at_step if int(os.environ.get("RANK", "0")) == last else None


def _has_checkpoint(run_dir: Path) -> bool:
    from kiln.engine import checkpoint

    return bool(checkpoint.list_checkpoints(run_dir))


def config_file(path: str):
    from kiln.engine.config import from_dict

    try:
        return from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError as e:
        raise KilnError(f"--config: {path} not found") from e
    except json.JSONDecodeError as e:
        raise KilnError(f"--config: {path} is not valid JSON ({e})") from e


def _eval(args) -> None:
    from kiln.engine.evaluate import evaluate_run

    scores = evaluate_run(Path(args.run_dir), args.set)
    text = json.dumps(scores, indent=2)
    if args.out:
        from kiln.engine.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(text)


def _sample(args) -> None:
    from kiln.engine.generate import SampleRequest, parse_size, read_prompts, sample_run

    prompts = list(args.prompt) + (read_prompts(Path(args.prompts)) if args.prompts else [])
    req = SampleRequest(prompts, parse_size(args.size) if args.size else None, args.seed, args.steps, args.cfg,
                        args.negative, not args.raw, args.batch_size, args.device, args.checkpoint,
                        args.clip_weights, args.clip_model)
    out = sample_run(Path(args.run_dir), req, Path(args.out) if args.out else None)
    print(f"{len(prompts)} image(s) in {out} (grid.png, samples.jsonl)")


def _export(args) -> None:
    from kiln.engine.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out) if args.out else None, not args.raw, args.dtype,
                     args.checkpoint)
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")


def _ablate(args) -> None:
    from kiln.engine import ablate

    if args.list:
        ablate.print_studies()
        return
    if not args.study:
        raise KilnError("ablate: name a STUDY (kiln ablate --list shows them) or a study .py file")
    ablate.run_study(args.study, steps=args.steps, out=args.out, jobs=args.jobs)


def _model_info(args) -> None:
    from kiln.model.presets import count_params, forward_flops, preset

    cfg = preset(args.preset)
    res = args.resolution
    # latent presets see res/8 (an 8x VAE); pixel presets (3 channels) see res itself
    side = res // 8 if cfg.in_channels != 3 else res
    fwd = forward_flops(cfg, side, side, args.text_tokens)
    info = {
        "preset": args.preset,
        "params": count_params(cfg),
        "resolution": res,
        "model_input": f"{cfg.in_channels}x{side}x{side}",
        "image_tokens": (side // cfg.patch_size) ** 2,
        "text_tokens": args.text_tokens,
        "forward_flops_per_image": fwd,
        "train_flops_per_image": 3 * fwd,
        "config": cfg.__dict__,
    }
    print(json.dumps(info, indent=2))


def _model_scaling(args) -> None:
    from kiln.engine.scaling import table
    from kiln.model.presets import preset

    gpus = tuple(int(g) for g in args.gpus.split(","))
    print(table(args.preset, preset(args.preset), gpus, args.batch_per_gpu, args.resolution, args.ac, args.optim,
                args.cp_attention))


def _backends(_args) -> None:
    import torch

    from kiln import kernels
    from kiln.kernels import csrc

    out = {"available": kernels.available_backends(), "ops": kernels.implemented_ops(), "csrc_build": csrc.build_info()}
    if csrc.CUDA_ARCHS:  # whether each visible GPU runs what was built (None: it does)
        out["csrc_gpus"] = {f"cuda:{i}": csrc.gpu_reason(i) for i in range(torch.cuda.device_count())}
    print(json.dumps(out, indent=2))


def _data_prepare(args) -> None:
    from kiln.engine.data.prepare import prepare

    report = prepare(args.src, args.out, shard_size=args.shard_size, workers=args.workers, max_side=args.max_side,
                     heldout=args.heldout)
    print(json.dumps({k: v for k, v in report.items() if k != "skip_examples"}, indent=2))


def _data_score(args) -> None:
    from kiln.engine.data.score import score

    print(json.dumps(score(args.dataset, args.model, args.weights, args.aesthetic, args.batch_size), indent=2))


def _data_encode(args) -> None:
    from kiln.engine.data.encode import encode

    meta = encode(args.dataset, args.vae, args.resolution, args.text_name, args.text_weights, args.text_max_length,
                  args.multiple, batch_size=args.batch_size)
    print(json.dumps({k: meta[k] for k in ("resolution", "samples", "per_bucket", "vae", "text")}, indent=2))


def _data_preview(args) -> None:
    from kiln.engine.config import DataConfig
    from kiln.engine.data.preview import preview

    cfg = DataConfig(source="shards", path=args.dataset, resolution=args.resolution, decoder=args.decoder,
                     flip=args.flip)
    cfg.validate()
    print(json.dumps(preview(cfg, args.out, args.batches, args.batch_size)))


def _data_bench(args) -> None:
    from kiln.benchmarks.data import main as bench

    bench(args.rest)


BENCHMARKS = {"step": "kiln.benchmarks.step", "group_norm": "kiln.benchmarks.group_norm",
              "attention": "kiln.benchmarks.attention", "qk_norm_rope": "kiln.benchmarks.qk_norm_rope"}


def _bench(args) -> None:
    import importlib

    if args.name not in BENCHMARKS:
        raise KilnError(f"benchmark {args.name!r} is not one of: {', '.join(BENCHMARKS)}")
    importlib.import_module(BENCHMARKS[args.name]).main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: train text-to-image diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe (default: tiny, on the built-in data)")
    t.add_argument("recipe", nargs="?", help="recipe name: tiny (default), small, base")
    t.add_argument("--config", help="a full run config as JSON (e.g. another run's config.json)")
    t.add_argument("--steps", type=int, help="total training steps (overrides train.steps)")
    t.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="a.b=c", help="override a config field")
    t.add_argument("--fail-at-step", type=int, metavar="N",
                   help="fault injection: raise in step N (under torchrun: on the last rank, first attempt only)")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="held-out adherence, loss (and CLIP metrics) of a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--set", action="append", default=[], metavar="sample.x=y",
                   help="override a sample.* field (cfg_scale, use_ema, captions, num_prompts, steps)")
    e.add_argument("--out", help="also write the scores to this JSON file")
    e.set_defaults(fn=_eval)
    s = sub.add_parser("sample", help="images from text prompts with a run's checkpoint (EMA weights by default)")
    s.add_argument("run_dir")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line (after the --prompt ones)")
    s.add_argument("--out", help="output folder (default RUN/generated/step_N)")
    s.add_argument("--size", help="SIDE or WIDTHxHEIGHT in pixels (default: the run's resolution at that step)")
    s.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded seed + i")
    s.add_argument("--steps", type=int, help="Euler steps (default: the run's sample.steps)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's sample.cfg_scale)")
    s.add_argument("--negative", default="", help="negative prompt: the unconditional branch of CFG")
    s.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--checkpoint", help="a step_*.pt file or step_*/ folder (default: the run's latest)")
    s.add_argument("--clip-weights", help="local open_clip checkpoint: each image's CLIP score in samples.jsonl")
    s.add_argument("--clip-model", default="ViT-L-14", help="open_clip model of --clip-weights")
    s.set_defaults(fn=_sample)
    x = sub.add_parser("export", help="a run's EMA (or raw) weights as one safetensors file, config in its header")
    x.add_argument("run_dir")
    x.add_argument("--out", help="output file (default RUN/model_stepN_ema_fp32.safetensors)")
    x.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    x.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    x.add_argument("--checkpoint", help="a step_*.pt file or step_*/ folder (default: the run's latest)")
    x.set_defaults(fn=_export)
    a = sub.add_parser("ablate", help="run an ablation study and write report.md")
    a.add_argument("study", nargs="?", help="a built-in study name, or a .py file defining STUDY")
    a.add_argument("--list", action="store_true", help="list the built-in studies")
    a.add_argument("--steps", type=int, help="baseline step budget (default: the study's)")
    a.add_argument("--out", help="output folder (default ablations/<study>)")
    a.add_argument("--jobs", type=int, help="runs at once (default: one per CUDA device, 1 on CPU)")
    a.set_defaults(fn=_ablate)
    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="parameters and FLOPs of a preset")
    info.add_argument("preset")
    info.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    info.add_argument("--text-tokens", type=int, default=77)
    info.set_defaults(fn=_model_info)
    sc = msub.add_parser("scaling", help="memory, communication and the layout to use at N GPUs")
    sc.add_argument("preset")
    sc.add_argument("--gpus", default="8,64,512", help="comma-separated GPU counts")
    sc.add_argument("--batch-per-gpu", type=int, default=4, help="global batch = this x GPUs")
    sc.add_argument("--resolution", type=int, default=1024)
    sc.add_argument("--ac", default="auto", choices=("auto", "none", "selective", "full"),
                    help="activation checkpointing (auto: the fastest mode that fits, per layout)")
    sc.add_argument("--optim", default="adamw", choices=("adamw", "muon"),
                    help="muon: one momentum for the block matrices, and Newton-Schulz with its all-to-alls per step")
    sc.add_argument("--cp-attention", default="auto", choices=("auto", "ulysses", "ring"),
                    help="context parallel's attention (auto: the faster that fits, per layout with cp)")
    sc.set_defaults(fn=_model_scaling)
    data = sub.add_parser("data", help="prepare and inspect image-text datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="folder / manifest / synthetic:N -> webdataset shards + DALI indexes")
    prep.add_argument("src", help="image folder with .txt captions, a .jsonl/.csv manifest, or synthetic:N")
    prep.add_argument("out", help="output dataset folder")
    prep.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    prep.add_argument("--workers", type=int, help="processes (default: all cores, at most 16)")
    prep.add_argument("--max-side", type=int, default=4096, help="downscale images whose long side exceeds this")
    prep.add_argument("--heldout", type=int, default=0, help="samples set aside for evaluation (never trained on)")
    prep.set_defaults(fn=_data_prepare)
    sc_ = dsub.add_parser("score", help="CLIP image-text similarity and aesthetic score into the metadata")
    sc_.add_argument("dataset")
    sc_.add_argument("--model", default="ViT-L-14", help="open_clip model name")
    sc_.add_argument("--weights", required=True, help="local open_clip checkpoint file")
    sc_.add_argument("--aesthetic", required=True, help="local aesthetic head (linear: weight (1, D), bias (1,))")
    sc_.add_argument("--batch-size", type=int, default=64)
    sc_.set_defaults(fn=_data_score)
    enc = dsub.add_parser("encode", help="precompute VAE latents and text features (data.latents=true)")
    enc.add_argument("dataset")
    enc.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (local)")
    enc.add_argument("--resolution", type=int, required=True, help="bucket base resolution in pixels")
    enc.add_argument("--multiple", type=int, default=16, help="bucket sides are multiples of this (patch x VAE factor)")
    enc.add_argument("--text-name", default="kiln-tiny-text", help="open_clip model (the run's text.name)")
    enc.add_argument("--text-weights", help="its local weights (the run's text.weights)")
    enc.add_argument("--text-max-length", type=int, default=16, help="the run's text.max_length")
    enc.add_argument("--batch-size", type=int, default=16)
    enc.set_defaults(fn=_data_encode)
    pv = dsub.add_parser("preview", help="a grid of decoded, bucketed, cropped samples with their captions")
    pv.add_argument("dataset")
    pv.add_argument("--out", default="preview.png")
    pv.add_argument("--resolution", type=int, default=256, help="bucket base resolution")
    pv.add_argument("--batches", type=int, default=4)
    pv.add_argument("--batch-size", type=int, default=4)
    pv.add_argument("--decoder", default="dali", choices=("dali", "pillow"))
    pv.add_argument("--flip", action="store_true")
    pv.set_defaults(fn=_data_preview)
    db = dsub.add_parser("bench", help="images/s of the DALI loader vs a Pillow + DataLoader baseline")
    db.add_argument("rest", nargs=argparse.REMAINDER, help="DATASET [--batches N] [--batch-size N] [--threads N] ...")
    db.set_defaults(fn=_data_bench)
    b = sub.add_parser("backends", help="which kernel backends can run here, and why not")
    b.set_defaults(fn=_backends)
    bench = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHMARKS))
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="kiln: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, KilnError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kiln: interrupted; a checkpoint of the last finished step was saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
