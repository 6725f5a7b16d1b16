"""CUDA checks of the foundation (model and training loop); skipped cleanly without a GPU (CI has
none: the device run in benchmarks/results/ records them passing on an H100). The kernels' CUDA
checks are in test_gpu_kernels.py."""

from pathlib import Path

import pytest
import torch
from multiproc import torchrun

from kiln.engine.metrics import read_metrics
from kiln.engine.train import train
from kiln.model import MMDiT, MMDiTConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_forward_matches_cpu_fp32():
    cfg = MMDiTConfig(width=128, depth=2, single_depth=2, heads=2, patch_size=4, text_dim=32, pooled_dim=32,
                      adaln_zero=False)
    model = MMDiT(cfg)
    B, L = 3, 9
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    args = (torch.randn(B, 3, 32, 48), torch.rand(B), torch.randn(B, L, 32), mask, torch.randn(B, 32),
            torch.rand(B, 6) * 64)
    ref = model(*args)
    out = model.cuda()(*(a.cuda() for a in args))
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)  # TF32-free fp32 paths differ ~1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = model(*(a.cuda() for a in args)).float().cpu()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_cuda_resume_is_exact_in_deterministic_mode(tmp_path, run_config):
    def cfg():
        c = run_config(steps=8)
        c.train.device, c.train.deterministic = "cuda", True
        return c

    train(cfg(), tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(cfg(), tmp_path / "crashed", fail_at_step=6)
    train(cfg(), tmp_path / "crashed", resume=True)
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "crashed") if "loss" in r]
    assert a == b and len(a) == 8


def test_cuda_training_run_bf16_autocast(tmp_path, run_config):
    cfg = run_config(steps=20)
    cfg.train.device = "cuda"
    summary = train(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert summary["device"] == torch.cuda.get_device_name()
    # memory: each logged step's peak since the previous one, the run's peak in the summary
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(0 < r["memory_gib"] <= r["reserved_gib"] for r in rows), rows[:2]
    assert summary["peak_memory_gib"] == max(r["memory_gib"] for r in rows)


def test_cuda_fp16_run_skips_overflows_on_the_device_and_learns(tmp_path, run_config):
    """fp16 autocast with the loss scale: fused AdamW takes the skip flag on the device; the run
    halves its scale through the first overflowing steps, then trains."""
    cfg = run_config(steps=20)
    cfg.train.device, cfg.train.precision, cfg.train.loss_scale_init = "cuda", "fp16-autocast", 2.0**24
    summary = train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
    assert rows[0]["loss_scale"] == 2.0**24 and 1 <= summary["loss_scale"]["skipped"] < 20
    assert summary["precision"] == "float16"


def test_cuda_profile_window_records_kernels_and_a_memory_snapshot(tmp_path, run_config):
    import json
    import pickle

    cfg = run_config(steps=4)
    cfg.train.device = "cuda"
    cfg.train.profile_from, cfg.train.profile_steps, cfg.train.profile_memory = 2, 2, True
    train(cfg, tmp_path / "run")
    stem = tmp_path / "run" / "profile" / "steps2-3_rank0"
    events = json.loads(stem.with_suffix(".json").read_text())["traceEvents"]
    assert sum(e.get("cat") == "kernel" for e in events) > 0  # CUDA kernels, not only CPU ops
    assert [e.get("name") for e in events].count("kiln/backward") == 2
    snapshot = pickle.loads((tmp_path / "run" / "profile" / "steps2-3_rank0_memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]


def test_ring_attention_on_cuda_runs_its_blocks_on_the_flash_kernels(tmp_path, monkeypatch):
    """Ring attention's flash path compiled for this GPU (the CPU tests run it under the
    interpreter, whose bf16 casts truncate): 2 ranks sharing the GPU through gloo's CUDA
    all-to-alls, output and every gradient (with the fused QK-norm, the weights' too) within
    kernel_rule's 2x bound against fp64 attention over the whole sequence, fp32 and bf16."""
    monkeypatch.setenv("KILN_AUTOTUNE", "0")  # each kernel's default launch config: one compile each, no timing
    entry = str(Path(__file__).with_name("ring_attention_ranks.py"))
    torchrun(2, [entry, str(tmp_path), "auto", "cuda"], timeout=300, out=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("ok_rank*.txt")) == ["ok_rank0.txt", "ok_rank1.txt"]
