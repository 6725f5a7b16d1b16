"""torchrun jobs of the multi-process tests (test_parallel, test_muon): CPU ranks under gloo,
one OpenMP thread each (4 ranks share CI's 2 cores), and a failure report one can read.

A job whose first-failing rank (torchrun's "Root Cause") was killed by a signal (SIGABRT,
SIGSEGV), not by a Python error of its own, is rerun once from the same starting files, with a
warning that carries the first attempt's report. On Dec 7 two CI runs each lost one job of ~40
that way (test_muon's 4 ranks; tp=2 on buckets), and 2 of ~100 runs of the ring attention entry
here did too, each rank's work done: process groups that outlived destroy_process_group took
their gloo threads into the interpreter's end; kiln.engine.parallel.shutdown now frees them
(test_no_process_group_outlives_shutdown). A warning from the rerun would be a new cause. A job
that fails twice, or fails with a Python error, fails the test. Every rank runs with
faulthandler on, so an abort prints each thread's Python stack.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# torch's logging warnings, "[rank2]:W1207 12:24:15.252000 7111 torch/...": DTensor prints one per
# redistribution it cannot merge, and in CI (2026-12-07) they filled the last 4000 characters of
# stderr that the report kept, hiding which rank failed and how
_TORCH_WARNING = re.compile(r"^(\[rank\d+\]:)?W\d{4} ")
# torchrun's summary of the rank that failed first: exit code -N = killed by signal N
_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-?\d+)", re.S)
# lines that say what went wrong, wherever they are in the interleaved output of the ranks
_NOTABLE = re.compile(r"terminate called|Fatal Python error|Error|Exception|Thread 0x|File \"|exitcode")
_LAUNCHER = re.compile(r"<frozen runpy>|torch/distributed/(run|launcher|elastic)|raise ChildFailedError")


def torchrun(nproc: int, args: list[str], timeout: int = 600, check: bool = True,
             out: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node=nproc *args``; with
    ``check``, asserts that every rank exited 0. ``out``: the folder the job writes, restored to
    what it held before if the job is rerun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryDirectory() as keep:
        before = Path(keep) / "out"
        if check and out is not None and out.exists():
            shutil.copytree(out, before, symlinks=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0 and _killed_by_signal(proc.stderr):
            warnings.warn(f"a rank was killed by a signal; rerunning the job once\n{report(cmd, proc)}", stacklevel=2)
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
                if before.exists():
                    shutil.copytree(before, out, symlinks=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert not check or proc.returncode == 0, report(cmd, proc)
    return proc


def _killed_by_signal(stderr: str) -> bool:
    """The rank that failed first (torchrun's "Root Cause") died by a signal, not by an error of
    its own (its peers then fail in their collectives, with Python errors of their own)."""
    first = _ROOT_CAUSE.search(stderr)
    return first is not None and int(first.group(1)) < 0 and int(first.group(1)) != -15


def report(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    """The command, its exit code, the lines that say what went wrong, and the ends of stdout
    and stderr, torch's warnings left out."""
    lines = proc.stderr.splitlines()
    kept = [line for line in lines if not _TORCH_WARNING.match(line)]
    notable = [line for line in kept if _NOTABLE.search(line) and not _LAUNCHER.search(line)][:60]
    stderr = "\n".join(kept)[-6000:]
    return (f"{' '.join(cmd)}\nexit code {proc.returncode}\n--- what went wrong (first {len(notable)} lines)\n"
            + "\n".join(notable) + f"\n--- stdout (end)\n{proc.stdout[-3000:]}\n"
            f"--- stderr (end; {len(lines) - len(kept)} torch warning lines left out)\n{stderr}")
