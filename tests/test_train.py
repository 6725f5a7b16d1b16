"""End-to-end training runs on a very small config (seconds each on 2 CPU cores)."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from kiln.engine import checkpoint
from kiln.engine.metrics import read_metrics
from kiln.engine.train import train


def test_run_writes_summary_metrics_samples_and_checkpoints(tmp_path, run_config):
    cfg = run_config(steps=6)
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["images_per_second"] > 0 and r["lr"] > 0 for r in rows)
    s = json.loads((run / "summary.json").read_text())
    for key in ("steps", "final_loss", "images_per_second", "stage_seconds", "adherence", "device", "config"):
        assert key in s
    assert s["steps"] == 6 and s == json.loads(json.dumps(summary))
    assert set(s["stage_seconds"]) >= {"data", "text", "forward", "backward", "optimizer", "sampling"}
    assert 0 <= s["adherence"]["colors"] <= 1
    assert (run / "samples" / "final.png").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000004.pt", "step_00000006.pt"]
    assert list((run / "tb").iterdir())


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path, run_config):
    full = tmp_path / "full"
    train(run_config(steps=10), full)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated failure at step 7"):
        train(run_config(steps=10), crashed, fail_at_step=7)
    assert checkpoint.latest(crashed).name == "step_00000004.pt"  # the crash never touched it
    assert not (crashed / "summary.json").exists()
    train(run_config(steps=10), crashed, resume=True)
    a = [(r["step"], r["loss"]) for r in read_metrics(full) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(crashed) if "loss" in r]
    assert [s for s, _ in b] == list(range(1, 11))
    assert b == a  # bit-exact on CPU: same data, noise, timesteps, dropout and optimizer state


def test_gradient_accumulation_trains_like_the_whole_batch(tmp_path, run_config):
    """parallel.microbatches=4 without a pipeline: the batch of 8 runs as 4 chunks of 2 whose
    gradients add up to the whole batch's; losses and weights follow the one-chunk run."""
    runs = {}
    for k in (1, 4):
        cfg = run_config(steps=4)
        cfg.parallel.microbatches, cfg.sample.num_prompts = k, 0
        train(cfg, tmp_path / str(k))
        runs[k] = tmp_path / str(k)
    losses = [[r["loss"] for r in read_metrics(runs[k]) if "loss" in r] for k in (1, 4)]
    assert len(losses[0]) == 4 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses, strict=True))
    whole, chunked = (torch.load(checkpoint.latest(runs[k]), weights_only=True)["model"] for k in (1, 4))
    worst = max(((whole[n] - chunked[n]).norm() / whole[n].norm().clamp_min(1e-12)).item() for n in whole)
    assert worst <= 1e-4, f"weights differ by {worst:.2e}"
    assert any(not torch.equal(whole[n], chunked[n]) for n in whole)  # the chunks really ran apart


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kiln.engine.cli", *args], capture_output=True, text=True)


def test_cli_refuses_to_overwrite_an_existing_run(tmp_path, run_config):
    run = tmp_path / "run"
    train(run_config(steps=4), run)
    before = _digest(run)
    proc = _cli("train", "--out", str(run))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--resume" in proc.stderr
    assert _digest(run) == before


def test_cli_resume_from_corrupt_checkpoint_is_one_line_and_changes_nothing(tmp_path, run_config):
    run = tmp_path / "run"
    train(run_config(steps=4), run)
    ckpt = checkpoint.latest(run)
    ckpt.write_bytes(ckpt.read_bytes()[:64])
    before = _digest(run)
    proc = _cli("train", "--resume", str(run), "--steps", "8")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("kiln: error")]
    assert proc.returncode == 2 and len(errors) == 1 and "is corrupt" in errors[0]
    assert _digest(run) == before


def test_cli_missing_text_weights_is_one_line(tmp_path):
    proc = _cli("train", "--out", str(tmp_path / "r"), "--set", f"text.weights={tmp_path}/missing.pt")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"kiln: error: text.weights: file '{tmp_path}/missing.pt' does not exist"
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, run_config):
    import os
    import signal
    import time

    run = tmp_path / "run"
    here = str(__import__("pathlib").Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); from conftest import small_run_config; "
            f"from kiln.engine.train import train; train(small_run_config(steps=400), {str(run)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # KeyboardInterrupt after saving
    step = int(checkpoint.latest(run).name[5:13])
    assert 2 <= step < 400 and not (run / "summary.json").exists()
    rows = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert rows == list(range(1, step + 1))


@pytest.mark.parametrize("native_bf16, capability, expected", [
    (True, (9, 0), torch.bfloat16),  # H100
    (False, (7, 5), torch.float16),  # T4: fp16 tensor cores, bf16 only emulated
    (False, (6, 1), None),  # P40: no tensor cores
])
def test_auto_precision_follows_what_the_gpu_has(native_bf16, capability, expected, monkeypatch):
    """train.precision=auto: bf16 autocast where the GPU has native bf16 (8.0+), loss-scaled fp16
    on a V100 / T4, fp32 on older GPUs and on the CPU; an explicit choice is kept."""
    from kiln.engine.train import compute_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert compute_dtype(cuda, "auto") == expected
    assert asked == [False]  # native bf16, not torch's emulation
    assert compute_dtype(cuda, "bf16-autocast") == torch.bfloat16
    assert compute_dtype(cuda, "fp16-autocast") == torch.float16
    assert compute_dtype(cuda, "fp32") is None
    assert compute_dtype(torch.device("cpu"), "auto") is None


def test_loss_scale_halves_on_overflow_and_doubles_after_clean_steps():
    from kiln.engine.loss_scale import MAX_SCALE, LossScaler

    s = LossScaler(torch.device("cpu"), 1024.0, growth_interval=3)
    scales = []
    for overflow in (0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1):
        s.update(torch.tensor(float(overflow)))
        scales.append(s.scale.item())
    assert scales == [1024, 1024, 512, 512, 512, 1024, 1024, 1024, 2048, 1024, 512]
    assert s.state_dict() == {"scale": 512.0, "clean": 0, "skipped": 3}
    top = LossScaler(torch.device("cpu"), MAX_SCALE, growth_interval=1)
    top.update(torch.tensor(0.0))
    assert top.scale.item() == MAX_SCALE  # capped, never doubled into inf


def _fp16_config(run_config, steps: int = 6):
    cfg = run_config(steps=steps)
    cfg.train.precision, cfg.sample.num_prompts = "fp16-autocast", 0
    cfg.train.loss_scale_init = 2.0**24  # overflows fp16 activation gradients for the first few steps
    return cfg


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    named = {f"model.{n}": p for n, p in trainer.model.named_parameters()}
    return {k: v.detach().clone() for k, v in {**named, **trainer.ema.params}.items()}


def test_an_overflowing_fp16_step_changes_no_weight_moment_or_average(tmp_path, run_config):
    """A skipped step leaves weights, AdamW moments and the EMA bit-identical; the first clean
    step after it updates all three."""
    from kiln.engine.train import Trainer

    trainer = Trainer(_fp16_config(run_config), tmp_path)
    before = _snapshot(trainer)
    trainer.train_step()
    assert trainer.scaler.state_dict() == {"scale": 2.0**23, "clean": 0, "skipped": 1}
    after = _snapshot(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.opt.opts[0].state  # no moments were made
    while trainer.scaler.clean.item() == 0:
        trainer.train_step()
    changed = _snapshot(trainer)
    assert all(not torch.equal(before[k], changed[k]) for k in before if k.endswith("final.linear.weight"))
    assert len(trainer.opt.opts[0].state) == len(trainer.opt.params)


def test_fp16_run_logs_its_loss_scale_and_resumes_with_it(tmp_path, run_config):
    """Each overflow halves the scale (the logged scale is the one a step ran with); a crash and
    resume continue with the checkpointed scale: losses and scales equal the uninterrupted run."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    summary = train(_fp16_config(run_config, steps=8), full)
    skipped = summary["loss_scale"]["skipped"]
    rows = [r for r in read_metrics(full) if "loss" in r]
    scales = [r["loss_scale"] for r in rows]
    steps = list(zip(scales, [*scales[1:], summary["loss_scale"]["scale"]], strict=True))  # (ran with, next step's)
    assert all(after in (before, before / 2) for before, after in steps)  # no growth before 2000 clean steps
    halved = [after == before / 2 for before, after in steps]
    assert halved[0] and sum(halved) == skipped < 8 and summary["precision"] == "float16"
    assert all(r["loss"] == r["loss"] for r in rows)
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(_fp16_config(run_config, steps=8), crashed, fail_at_step=6)
    train(_fp16_config(run_config, steps=8), crashed, resume=True)
    resumed = [(r["step"], r["loss"], r["loss_scale"]) for r in read_metrics(crashed) if "loss" in r]
    assert resumed == [(r["step"], r["loss"], r["loss_scale"]) for r in rows]


def _flag(value: float, fused: bool) -> torch.Tensor:
    flag = torch.tensor(value)
    if fused:  # fused AdamW reads it on the device
        flag.item = lambda: pytest.fail("the skip flag was read on the host")
    return flag


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_fp16_step_skips_every_optimizer(fused, run_config):
    """A clean flag steps exactly as no flag does; a set flag changes no weight and no AdamW
    state. Fused AdamW takes the flag on the device, the others read it once."""
    from kiln.engine.optim import Optimizers
    from kiln.model.mmdit import MMDiT

    cfg = run_config()
    models = [MMDiT(cfg.model) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    device = torch.device("cuda" if fused else "cpu")  # only picks fused AdamW; the tensors stay on the CPU
    opts = [Optimizers(cfg, m, device) for m in models]
    assert opts[0].opts[0].defaults["fused"] == fused
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    for m in models:
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    opts[0].step(_flag(0.0, fused))
    opts[1].step()
    pairs = list(zip(models[0].parameters(), models[1].parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert all(not torch.equal(start[n], p) for n, p in models[0].named_parameters())
    stepped = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    state = {k: v.clone() for k, v in opts[0].opts[0].state[next(models[0].parameters())].items()}
    for p in models[0].parameters():
        p.grad = torch.ones_like(p)
    opts[0].step(_flag(1.0, fused))
    assert all(torch.equal(stepped[n], p) for n, p in models[0].named_parameters())
    after = opts[0].opts[0].state[next(models[0].parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state)  # moments and step count
    assert not hasattr(opts[0].opts[0], "found_inf") and all(p.grad is None for p in models[0].parameters())


def test_profile_window_writes_a_trace_and_an_op_table(tmp_path, run_config):
    from kiln.engine.errors import ConfigError

    cfg = run_config(steps=4)
    cfg.train.profile_from, cfg.train.profile_steps = 2, 2
    train(cfg, tmp_path / "run")
    trace = json.loads((tmp_path / "run" / "profile" / "steps2-3_rank0.json").read_text())
    names = [e.get("name") for e in trace["traceEvents"]]
    # the trainer's stages, once per profiled step, with the ops under them
    assert names.count("kiln/forward") == 2 and names.count("kiln/optimizer") == 2 and names.count("kiln/data") == 2
    assert any(str(n).startswith("aten::") for n in names)
    assert "aten::" in (tmp_path / "run" / "profile" / "steps2-3_rank0_ops.txt").read_text()
    cfg = run_config(steps=4)
    cfg.train.profile_from, cfg.train.profile_steps = 4, 3  # cut by the end of the run
    train(cfg, tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut" / "profile").iterdir()) == ["steps4-4_rank0.json",
                                                                            "steps4-4_rank0_ops.txt"]
    cfg.train.profile_from = 5
    with pytest.raises(ConfigError, match=r"train.profile_from = 5 is past the run's last step \(train.steps = 4\)"):
        cfg.validate()
    cfg.train.profile_from, cfg.train.profile_memory = 2, True
    with pytest.raises(ConfigError, match="train.profile_memory=true needs a CUDA device"):
        train(cfg, tmp_path / "memory")
    assert not (tmp_path / "memory").exists()  # refused before the run directory is made


def test_metrics_log_model_tflops_and_mfu_where_the_peak_is_known(tmp_path, run_config, monkeypatch):
    from kiln.engine import train as train_module
    from kiln.model.presets import forward_flops

    cfg = run_config(steps=4)
    summary = train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    per_image = 3 * forward_flops(cfg.model, 32, 32, cfg.text.max_length)  # pixel space, 32 px, fwd + bwd
    for r in rows:  # one process: model FLOP/s = images/s x FLOPs per image
        assert r["tflops_per_gpu"] == pytest.approx(r["images_per_second"] * per_image / 1e12, rel=1e-9)
        assert "mfu" not in r  # no known peak for a CPU
    assert summary["tflops_per_gpu"] == pytest.approx(summary["images_per_second"] * per_image / 1e12, rel=1e-9)
    monkeypatch.setattr(train_module, "peak_flops", lambda device: 1e9)
    summary = train(run_config(steps=2), tmp_path / "peak")
    assert summary["mfu"] == pytest.approx(summary["tflops_per_gpu"] * 1e12 / 1e9)
