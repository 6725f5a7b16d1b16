"""Training options the ablations switch: stages, Muon, bf16 weight storage, divergence, kiln eval."""

import json
import subprocess
import sys

import pytest
import torch

from kiln.engine import checkpoint
from kiln.engine.config import StageConfig, apply_override
from kiln.engine.errors import ConfigError
from kiln.engine.evaluate import evaluate_run
from kiln.engine.metrics import read_metrics
from kiln.engine.optim import muon_params
from kiln.engine.train import train
from kiln.model.mmdit import MMDiT


def _staged(run_config, steps=8):
    cfg = run_config(steps=steps)
    cfg.stages = [StageConfig(steps=5, resolution=32, batch_size=8), StageConfig(steps=3, resolution=48, batch_size=4)]
    return cfg


def test_stages_switch_resolution_and_batch_at_the_boundary(tmp_path, run_config):
    summary = train(_staged(run_config), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["images_seen"] for r in rows] == [8 * s for s in range(1, 6)] + [40 + 4 * s for s in range(1, 4)]
    assert summary["images_seen"] == 52
    from PIL import Image

    # the final samples are drawn at the last stage's resolution (48 px + 2 px border, x4 upscale)
    assert Image.open(tmp_path / "run" / "samples" / "final.png").size[0] % (50 * 4) == 0


def test_resume_inside_the_second_stage_is_exact(tmp_path, run_config):
    train(_staged(run_config), tmp_path / "full")
    with pytest.raises(RuntimeError):
        train(_staged(run_config), tmp_path / "crashed", fail_at_step=7)  # checkpoint at 4, stage 2 at 6
    train(_staged(run_config), tmp_path / "crashed", resume=True)
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "crashed")]
    assert losses[0] == losses[1]


def test_stage_steps_must_add_up(run_config):
    cfg = _staged(run_config, steps=9)
    with pytest.raises(ConfigError, match="stages: steps add up to 8, but train.steps is 9"):
        cfg.validate()
    apply_override(cfg, 'stages=[{"steps": 9, "resolution": 40, "batch_size": 2}]')
    assert cfg.validate().stage_at(8).resolution == 40
    with pytest.raises(ConfigError, match="stages\\[0\\].resolution must be a multiple of 8"):
        apply_override(cfg, 'stages=[{"steps": 9, "resolution": 36, "batch_size": 2}]')
        cfg.validate()


def test_muon_takes_the_block_matrices_and_training_resumes_exactly(tmp_path, run_config):
    cfg = run_config(steps=6)
    model = MMDiT(cfg.model)
    matrices, rest = muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert matrices and all(p.ndim == 2 and "blocks." in names[id(p)] for p in matrices)
    assert not any(names[id(p)].endswith("_norm") for p in matrices)  # (G, D) norm weights stay on AdamW
    assert any(names[id(p)].startswith("img_in") for p in rest)
    cfg.optim.name = "muon"
    train(cfg, tmp_path / "full")
    with pytest.raises(RuntimeError):
        cfg2 = run_config(steps=6)
        cfg2.optim.name = "muon"
        train(cfg2, tmp_path / "crashed", fail_at_step=5)
    train(cfg2, tmp_path / "crashed", resume=True)
    a, b = ([(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "crashed"))
    assert a == b


def test_bf16_weight_storage_keeps_every_weight_on_the_bf16_grid(tmp_path, run_config):
    cfg = run_config(steps=3)
    cfg.optim.weight_storage = "bf16"
    train(cfg, tmp_path / "run")
    weights = checkpoint.load(checkpoint.latest(tmp_path / "run"))["model"]
    for name, w in weights.items():
        assert torch.equal(w, w.to(torch.bfloat16).float()), name
    cfg = run_config(steps=3)
    train(cfg, tmp_path / "fp32")
    weights = checkpoint.load(checkpoint.latest(tmp_path / "fp32"))["model"]
    assert not all(torch.equal(w, w.to(torch.bfloat16).float()) for w in weights.values())


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, run_config):
    cfg = run_config(steps=12)
    cfg.train.ckpt_every = 2
    cfg.optim.grad_clip, cfg.optim.warmup_steps = 0.0, 0
    run = tmp_path / "run"
    cfg.optim.lr = 1e30  # the first update sends every weight to ~1e30; the forward overflows
    summary = train(cfg, run)
    assert summary["diverged_at_step"] is not None and summary["diverged_at_step"] <= 3
    assert not (run / "samples" / "final.png").exists()
    for path in checkpoint.list_checkpoints(run):  # whatever was saved is finite
        state = checkpoint.load(path)
        assert all(torch.isfinite(w).all() for w in state["model"].values())
        assert state["step"] < summary["diverged_at_step"]
    assert json.loads((run / "summary.json").read_text())["diverged_at_step"] == summary["diverged_at_step"]


def test_kiln_eval_rescores_a_run_with_sample_overrides(tmp_path, run_config):
    cfg = run_config(steps=4)
    summary = train(cfg, tmp_path / "run")
    same = evaluate_run(tmp_path / "run", [])
    assert same["step"] == 4
    assert same["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-6)
    assert {k: same[k] for k in summary["adherence"]} == summary["adherence"]
    raw = evaluate_run(tmp_path / "run", ["sample.use_ema=false"])
    assert raw["heldout_loss"] != same["heldout_loss"]  # raw weights, not the EMA
    with pytest.raises(ConfigError, match="only sample.\\* fields"):
        evaluate_run(tmp_path / "run", ["optim.lr=1"])
    out = subprocess.run([sys.executable, "-m", "kiln.engine.cli", "eval", str(tmp_path / "run"),
                          "--set", "sample.cfg_scale=1", "--out", str(tmp_path / "e.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "e.json").read_text())["overrides"] == ["sample.cfg_scale=1"]
