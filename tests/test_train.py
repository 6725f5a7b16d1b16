"""End-to-end training runs on a very small config (seconds each on 2 CPU cores)."""

import contextlib
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


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # (autocast objects made without a GPU)
@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(native_bf16, expected, monkeypatch):
    """train.precision=auto: bf16 autocast on a GPU with native bf16 (8.0+), fp32 on a V100 or T4,
    which would emulate it; bf16-autocast asked for explicitly is kept; the CPU stays fp32."""
    from kiln.engine.train import autocast_factory

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or native_bf16)
    cuda = torch.device("cuda")
    auto = autocast_factory(cuda, "auto")
    assert asked == [False]  # native bf16, not torch's emulation
    assert auto is contextlib.nullcontext if expected is None else auto().fast_dtype == expected
    assert autocast_factory(cuda, "bf16-autocast")().fast_dtype == torch.bfloat16
    assert autocast_factory(torch.device("cpu"), "auto") is contextlib.nullcontext
