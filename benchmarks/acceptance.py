"""The GPU acceptance run of the kernel issues (4, 5, 7) in one device call, and its verdicts.

    bash benchmarks/run_gpu_acceptance.sh          # on the GPU machine: files land in $OUT
    python -m kiln.benchmarks.acceptance --out DIR [--budget SECONDS] [--stages a,b] [--dry-run]
    python -m kiln.benchmarks.acceptance --judge ROWS.jsonl   # verdicts of rows measured earlier

A task that is lent a GPU gets 15 minutes of device time in all (a machine start included) and 10
minutes a call, so one call has to build, test and time everything the acceptance points name.
Stages run in the order below, each a subprocess whose timeout is cut to the time left; a stage
that needs more than is left is skipped and says so, and the verdicts mark what was not measured.

  build         csrc extension for sm_90a (``setup.py build_ext --inplace``), in the background
                from the start: it needs CPUs only; the stages with csrc providers wait for it
                (the next stage without any goes first), the csrc tests are skipped without it
  ceilings      copy bandwidth and bf16 matmul (the bandwidth benchmarks' 100%)
  attention     S = 4096 + 77, H 24, D 128: the whole op against eager and torch.compile, the
                attention core forward and backward (issue 4); rerun with KILN_ATTN_WS=0,
                KILN_ATTN_BULK_DQ=0 and KILN_ATTN_OVERLAP=0 if it fails or hangs (Triton's warp
                specialisation, the atomic backward's TMA bulk reductions and the forward run one
                key block ahead are the newest, least-proven paths)
  group_norm    the four VAE shapes, NCHW and channels-last, CUDA-graph and eager timing:
                triton, csrc, torch native (issues 5 and 7); device time of csrc's two plans
                forced (csrc-two-pass, csrc-one-launch: is its size rule right?)
  qk_norm_rope  the target shape, both timings: csrc, triton, eager (issue 7)
  tests-triton  tests/test_gpu_kernels.py without csrc: every Triton launch candidate against the
                reference with the 2x rule (xdist workers, so the JIT compiles run in parallel)
  tests-csrc    the csrc CUDA tests
  tests-engine  tests/test_gpu.py: the engine on CUDA (bf16 and fp16 training with its loss scale,
                exact resume, ring attention's flash blocks on 2 ranks sharing the GPU); no
                kernel point, so no verdict: its row and output only
  extra         the attention benchmark's other shapes, if time is left

Files in --out (a device call returns at most 8): ``log.txt`` (every stage's output),
``build.log``, ``results.jsonl`` (benchmark rows plus one row per stage), ``acceptance.json`` and
``acceptance.md`` (the verdict table, also printed last).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.benchmarks.common import append_rows
from kiln.benchmarks.verdicts import write_verdicts

PY = sys.executable
BENCH = (PY, "-m", "kiln.engine.cli", "bench")
PYTEST = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py")
ENGINE_TESTS = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py")


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]
    cap_s: float  # the longest it may run
    min_s: float  # not started with less time than this left
    csrc: str = ""  # "after": runs once the build has ended, with or without it; "needs": skipped without it
    retry_env: dict = field(default_factory=dict)  # rerun once with these set if it fails (time permitting)


def stages(rows: Path, copy_gbps: float | None, workers: int) -> list[Stage]:
    copy = ("--copy-gbps", f"{copy_gbps:.1f}") if copy_gbps else ()
    xdist = ("-n", str(workers)) if workers > 1 else ()
    out = ("--out", str(rows))
    return [
        Stage("ceilings", (PY, "-m", "kiln.benchmarks.ceilings", *out), 60, 20),
        Stage("attention", (*BENCH, "attention", "--shapes", "target", *out, "--providers",
                            "triton,triton-core,core-separate,core-atomic,eager,sdpa-cudnn,compile"), 200, 60,
              retry_env={"KILN_ATTN_WS": "0", "KILN_ATTN_BULK_DQ": "0", "KILN_ATTN_OVERLAP": "0"}),
        Stage("group_norm", (*BENCH, "group_norm", "--providers", "csrc,csrc-two-pass,csrc-one-launch,triton,torch",
                             *copy, *out), 150, 40, csrc="after"),
        Stage("qk_norm_rope", (*BENCH, "qk_norm_rope", "--shapes", "target", "--providers",
                               "csrc,triton,eager", *copy, *out), 60, 20, csrc="after"),
        Stage("tests-triton", (*PYTEST, *xdist, "-k", "not csrc"), 240, 60),
        Stage("tests-csrc", (*PYTEST, *xdist, "-k", "csrc"), 120, 30, csrc="needs"),
        Stage("tests-engine", ENGINE_TESTS, 210, 40, csrc="after"),
        Stage("extra", (*BENCH, "attention", "--shapes", "rest", *out, "--providers",
                        "triton,triton-core,eager,sdpa-cudnn,compile"), 600, 60),
    ]


STAGE_NAMES = ("ceilings", "attention", "group_norm", "qk_norm_rope", "tests-triton", "tests-csrc", "tests-engine",
               "extra")


def next_stage(pending: list[str], plan: dict[str, Stage], building: bool) -> str:
    """The first pending stage, except that while the build runs a stage waiting for it lets the
    next one that does not go first (not "extra", which takes all the time left)."""
    if building:
        return next((n for n in pending if not plan[n].csrc and n != "extra"), pending[0])
    return pending[0]


def pytest_counts(text: str) -> dict:
    """passed / failed / errors / skipped from pytest's closing line (0 when absent)."""
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    return {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", tail)) else 0
            for k in ("passed", "failed", "error", "skipped")}


class Runner:
    """Runs stages against one deadline, appending their output to log.txt and a row per stage."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool = False):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.log, self.rows = out / "log.txt", out / "results.jsonl"
        self.build: subprocess.Popen | None = None
        self.build_status: str | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start_build(self) -> None:
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "6"}  # Hopper only: half the nvcc work
        argv = (PY, "setup.py", "build_ext", "--inplace")
        if self.dry_run:
            print("build:", " ".join(argv))
            self.build_status = "dry run"
            return
        with open(self.out / "build.log", "w") as log:  # the child keeps its own copy of the file
            self.build = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def build_running(self) -> bool:
        return self.build is not None and self.build.poll() is None

    def csrc_ready(self) -> str | None:
        """None once the extension is built and loads, else why not (waits for the build)."""
        if self.build_status is None and self.build is not None:
            try:
                rc = self.build.wait(timeout=max(1.0, self.left() - 30))
            except subprocess.TimeoutExpired:
                os.killpg(self.build.pid, signal.SIGKILL)
                rc = "timed out"
            probe = subprocess.run((PY, "-c", "from kiln.kernels import csrc; print(csrc.build_info())"),
                                   capture_output=True, text=True, timeout=120)
            info = (probe.stdout or probe.stderr).strip().splitlines()[-1:] or ["no output"]
            self.build_status = f"build rc {rc}: {info[0]}"
            self._record({"op": "stage", "stage": "build", "status": self.build_status})
        ok = self.build_status is not None and "cpu+cuda" in self.build_status
        return None if ok or self.dry_run else f"csrc unavailable ({self.build_status or 'no build started'})"

    def run(self, stage: Stage, env_extra: dict | None = None) -> dict:
        """Run ``stage`` (or skip it, saying why); its row, also appended to results.jsonl."""
        left = self.left()
        why = f"{left:.0f} s left, needs {stage.min_s:.0f}" if left < stage.min_s else None
        if why is None and stage.csrc:
            missing = self.csrc_ready()
            why = missing if stage.csrc == "needs" else None
        if why is not None or self.dry_run:
            row = {"op": "stage", "stage": stage.name, "status": f"skipped: {why}" if why else "dry run"}
            self._record(row)
            print(row["status"], "|", " ".join(stage.argv))
            return row
        rc, status, text, seconds = self._execute(stage, env_extra or {})
        row = {"op": "stage", "stage": stage.name, "env": env_extra or {}, "rc": rc,
               "status": status or ("ok" if rc == 0 else f"failed (rc {rc})"), "seconds": seconds}
        if stage.name.startswith("tests"):
            row.update(pytest_counts(text))
        self._record(row)
        print(f"{stage.name:13s} {row['status']:24s} {seconds:6.1f} s  {text.strip()[-160:]!r}", flush=True)
        if row["status"] != "ok" and stage.retry_env and env_extra is None and self.left() >= stage.min_s:
            return self.run(stage, stage.retry_env)
        return row

    def _execute(self, stage: Stage, env_extra: dict) -> tuple:
        """(rc, timeout note or None, its output, seconds): output appended to log.txt as it comes,
        the process group killed at the stage's cap or the deadline, whichever is first."""
        timeout = min(stage.cap_s, self.left())
        with open(self.log, "a") as log:
            log.write(f"\n===== {stage.name} {env_extra or ''}: {' '.join(stage.argv)}\n")
            log.flush()
            start_at, t0 = log.tell(), time.monotonic()
            proc = subprocess.Popen(stage.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env_extra},
                                    start_new_session=True)
            try:
                rc, status = proc.wait(timeout=timeout), None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, status = proc.wait(), f"timed out after {timeout:.0f} s"
        text = self.log.read_bytes()[start_at:].decode(errors="replace")
        return rc, status, text, round(time.monotonic() - t0, 1)

    def _record(self, row: dict) -> None:
        if not self.dry_run:
            append_rows(self.rows, [row])


def _copy_gbps(rows: Path) -> float | None:
    return next((r["gbps"] for r in read_rows(rows) if r.get("op") == "copy"), None)


def read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.benchmarks.acceptance", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-out"))
    p.add_argument("--budget", type=float, default=510, help="seconds for all stages (a device call allows 600)")
    p.add_argument("--stages", type=lambda s: [x for x in s.split(",") if x], default=list(STAGE_NAMES),
                   help=f"comma-separated subset of: {', '.join(STAGE_NAMES)}")
    p.add_argument("--workers", type=int, default=12, help="pytest-xdist workers (1 without xdist)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--judge", type=Path, help="only print the verdicts of this results.jsonl")
    args = p.parse_args(argv)
    if args.judge:
        print(write_verdicts(read_rows(args.judge), None))
        return
    unknown = [s for s in args.stages if s not in STAGE_NAMES]
    if unknown:
        p.error(f"--stages: {', '.join(unknown)} not among {', '.join(STAGE_NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if _has_xdist() else 1
    runner = Runner(args.out, args.budget, args.dry_run)
    if any(s.csrc for s in stages(runner.rows, None, workers) if s.name in args.stages):
        runner.start_build()
    pending = list(args.stages)
    while pending:
        plan = {s.name: s for s in stages(runner.rows, _copy_gbps(runner.rows), workers)}  # copy GB/s once measured
        name = next_stage(pending, plan, runner.build_running())
        pending.remove(name)
        runner.run(plan[name])
    if runner.build is not None and runner.build.poll() is None:
        os.killpg(runner.build.pid, signal.SIGKILL)
    if not args.dry_run:
        print(write_verdicts(read_rows(runner.rows), args.out))


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


if __name__ == "__main__":
    main()
