"""torchrun jobs of the multi-process tests (test_parallel, test_muon): CPU ranks under gloo,
one OpenMP thread each (4 ranks share CI's 2 cores), and a failure report one can read."""

from __future__ import annotations

import os
import re
import subprocess
import sys

# torch's logging warnings, "[rank2]:W1207 12:24:15.252000 7111 torch/...": DTensor prints one per
# redistribution it cannot merge, and in CI (2026-12-07) they filled the last 4000 characters of
# stderr that the report kept, hiding which rank failed and how
_TORCH_WARNING = re.compile(r"^(\[rank\d+\]:)?W\d{4} ")


def torchrun(nproc: int, args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node=nproc *args``; with
    ``check``, asserts that every rank exited 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)
    assert not check or proc.returncode == 0, report(cmd, proc)
    return proc


def report(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    """The command, its exit code and the ends of stdout and stderr, torch's warnings left out."""
    lines = proc.stderr.splitlines()
    kept = [line for line in lines if not _TORCH_WARNING.match(line)]
    stderr = "\n".join(kept)[-6000:]
    return (f"{' '.join(cmd)}\nexit code {proc.returncode}\n--- stdout (end)\n{proc.stdout[-3000:]}\n"
            f"--- stderr (end; {len(lines) - len(kept)} torch warning lines left out)\n{stderr}")
