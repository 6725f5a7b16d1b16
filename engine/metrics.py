"""Run logging: per-step ``metrics.jsonl``, TensorBoard scalars, and per-stage timers.

Losses stay on the device as 0-d tensors and are flushed every ``log_every`` steps with one
``torch.stack(...).tolist()``, the only host sync of the loop. Stage times on CUDA are pairs of
CUDA events resolved at flush time (no sync per stage); on the CPU they are wall-clock.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

# Dense bf16 tensor-core peak by device name (datasheet, SXM parts); MFU is quoted against it.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, None where unknown (CPUs, other GPUs: no MFU is reported)."""
    name = device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its thread count (rows and summaries carry it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class StageTimer:
    STAGES = ("data", "text", "forward", "backward", "pipeline", "optimizer", "sampling", "checkpoint")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        # a named range in profiler traces (engine/profiler.py); ~1 us when no profiler runs
        with torch.profiler.record_function(f"kiln/{name}"), self._timed(name):
            yield

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t0

    def resolve(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.seconds[name] += start.elapsed_time(end) / 1000.0
            self._pending.clear()
        return dict(self.seconds)


class MetricsLog:
    """Appends one JSON row per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a declared dependency; stay usable without it
            pass
        self._fh = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        # Rows past the checkpoint came from the interrupted run; the resumed run rewrites them.
        from kiln.engine.checkpoint import atomic_write_text

        rows = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(r + "\n" for r in rows))

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        self._fh.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]
