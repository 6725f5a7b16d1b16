"""The other CLI entry points: model info, backends, the step benchmark, python -m kiln.engine.train."""

import json
import subprocess
import sys

import torch

from kiln.model import count_params, forward_flops, preset


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_model_info_reports_params_and_flops():
    proc = _run("-m", "kiln.engine.cli", "model", "info", "base", "--resolution", "1024")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = preset("base")
    assert info["params"] == count_params(cfg) and info["image_tokens"] == 4096
    assert info["train_flops_per_image"] == 3 * forward_flops(cfg, 128, 128, 77)


def test_model_scaling_prints_the_layout_per_gpu_count_and_cp_attention():
    """xl at 4096 px: the rows the README shows, the ring by default, Ulysses when asked."""
    rows = {}
    for attention in ("auto", "ulysses"):
        proc = _run("-m", "kiln.engine.cli", "model", "scaling", "xl", "--resolution", "4096", "--batch-per-gpu", "1",
                    "--gpus", "8", "--cp-attention", attention)
        assert proc.returncode == 0, proc.stderr
        rows[attention] = [line for line in proc.stdout.splitlines() if line.startswith("| 8 |")]
    assert len(rows["auto"]) == 1 and "cp=4" in rows["auto"][0] and "cp_attention=ring" in rows["auto"][0]
    assert "cp=4" in rows["ulysses"][0] and "cp_attention" not in rows["ulysses"][0]


def test_backends_lists_ops_and_reasons():
    proc = _run("-m", "kiln.engine.cli", "backends")
    out = json.loads(proc.stdout)
    assert out["available"]["torch"] is None and out["available"]["csrc"] is None  # pip install built it
    assert out["csrc_build"].startswith("cpu")
    if "cuda:" in out["csrc_build"]:  # a reason for each visible GPU the build has no code for (none here)
        assert out["csrc_gpus"] == {f"cuda:{i}": None for i in range(torch.cuda.device_count())}, out["csrc_gpus"]
    assert {"triton", "csrc"} <= set(out["ops"]["group_norm"])


def test_step_benchmark_writes_a_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    proc = _run("-m", "kiln.engine.cli", "bench", "step", "tiny", "--steps", "2", "--warmup", "1",
                "--set", "train.batch_size=4", "--set", "train.device=cpu", "--out", str(rows))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(rows.read_text())
    assert row["op"] == "train_step" and row["p50_ms"] > 0 and row["images_per_second"] > 0
    assert set(row["stage_ms"]) >= {"data", "text", "forward", "backward", "optimizer"}
    for key in ("device", "torch", "git", "timestamp"):
        assert row[key]


def test_python_m_train_takes_the_same_arguments(tmp_path):
    proc = _run("-m", "kiln.engine.train", "--steps", "2", "--out", str(tmp_path / "r"),
                "--set", "train.batch_size=4", "--set", "sample.num_prompts=2", "--set", "sample.steps=1",
                "--set", "train.device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 2
