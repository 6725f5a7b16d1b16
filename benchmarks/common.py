"""Shared benchmark plumbing: provenance, JSONL rows, medians, a short stdout table.

Every row carries what is needed to trust or reproduce it: device name, torch / triton / CUDA
versions, git sha, UTC timestamp, plus the measurement's p20 / p50 / p80.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch

from kiln.engine.metrics import device_name


def git_sha() -> str:
    """The checkout's commit, else $KILN_GIT_SHA (the GPU machine's copy of the tree has no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("KILN_GIT_SHA", "unknown")


def provenance(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def quantiles(samples_ms: list[float]) -> dict:
    q = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(samples_ms), "p80_ms": q[7]}


def append_rows(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


TIMINGS = ("graph", "eager")


def time_ms(make_step, timing: str = "eager") -> list[float]:
    """p20 / p50 / p80 milliseconds of one call of the step that ``make_step()`` returns.

    ``eager``: ``triton.testing.do_bench`` on the step as Python calls it, host overhead included
    (dispatch, custom-op and launch costs: what an eager training loop pays). ``graph``: the step
    captured back to back in one CUDA graph and the replays timed with events, so launch gaps
    vanish and a ~10 µs kernel is not hidden behind ~100 µs of Python (METHOD.md: for many small
    launches, time graph replays). ``make_step`` runs on the timing stream: a backward step's
    forward must run on the stream the graph captures.
    """
    if timing == "eager":
        from triton.testing import do_bench

        return do_bench(make_step(), quantiles=[0.2, 0.5, 0.8])
    if timing != "graph":
        raise ValueError(f"timing {timing!r} not in {TIMINGS}")
    q = quantiles(_graph_ms(make_step))
    return [q["p20_ms"], q["p50_ms"], q["p80_ms"]]


def _graph_ms(make_step, target_ms: float = 25.0, samples: int = 15) -> list[float]:
    """Per-step ms of ``samples`` replays of a graph holding n back-to-back steps (~target_ms)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step = make_step()
        for _ in range(3):  # compile, autotune and allocator warm-up stay out of the capture
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            step()
        end.record()
        torch.cuda.synchronize()
        # eager estimate (host overhead included) over-counts a step, so n errs small; 10 at least
        n = max(10, min(1000, int(target_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n):
                step()
        graph.replay()  # first replay uploads the graph
        times = []
        for _ in range(samples):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n)
    return times


def add_provider_arg(p, known: tuple[str, ...]) -> None:
    """--providers a,b,...: a subset of a benchmark's providers (all by default)."""
    p.add_argument("--providers", type=lambda s: provider_list(s, known), default=None,
                   help=f"comma-separated, from: {', '.join(known)} (default: all available)")


def provider_list(names: str, known: tuple[str, ...]) -> list[str]:
    """``names`` split, each checked against the benchmark's ``known`` providers."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{names!r}: {', '.join(unknown) or 'none given'}; allowed values are {', '.join(known)}")
    return chosen


def select(available: dict, chosen: list[str] | None) -> dict:
    """The ``chosen`` providers of ``available`` (all when None), in ``available``'s order; a chosen
    one that this machine lacks (csrc not built, flash-attn not installed) is left out, and said."""
    if chosen is None:
        return available
    for name in chosen:
        if name not in available:
            print(f"provider {name}: not available here, skipped", flush=True)
    return {k: v for k, v in available.items() if k in chosen}


def bandwidth_parser(prog: str, doc: str, known: tuple[str, ...]):
    """The arguments of a memory-bound kernel benchmark: --out, --copy-gbps, --timing, --providers."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--out", type=Path)
    add_provider_arg(p, known)
    p.add_argument("--copy-gbps", type=float, default=None, help="measured copy bandwidth (default: measure)")
    p.add_argument("--timing", choices=(*TIMINGS, "both"), default="both",
                   help="graph: device time of CUDA-graph replays; eager: host overhead included")
    return p


def timings(args) -> tuple[str, ...]:
    return TIMINGS if args.timing == "both" else (args.timing,)


def measured_copy_gbps(args) -> float:
    """--copy-gbps, or this device's copy bandwidth measured now (ceilings.py)."""
    if args.copy_gbps is not None:
        return args.copy_gbps
    from kiln.benchmarks.ceilings import measure

    return measure()[0]["gbps"]


def bandwidth_row(case: dict, measure, nbytes: int, copy: float, out: Path | None, label: str,
                  extra=None) -> dict:
    """One memory-bound measurement as a row: ``case`` plus GB/s and % of copy bandwidth (and
    ``extra()`` when given), or plus the error of a provider that cannot run the case. The row is
    appended to ``out`` at once and a one-line summary printed."""
    try:
        q = measure()
    except Exception as e:  # a provider that cannot run a case says why
        row = {**case, "error": f"{type(e).__name__}: {e}"[:200]}
    else:
        row = {**case, **bandwidth_fields(q, nbytes, copy), **(extra() if extra else {})}
        print(f"{label} {q[1]:.4f} ms {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}% of copy", flush=True)
    append_rows(out, [row])
    return row


def bandwidth_fields(q_ms: list[float], nbytes: int, copy: float) -> dict:
    """p20/p50/p80 ms of a do_bench run, GB/s moved at the median and % of copy bandwidth."""
    gbps = nbytes / (q_ms[1] / 1e3) / 1e9
    return {"p20_ms": q_ms[0], "p50_ms": q_ms[1], "p80_ms": q_ms[2], "gbps": gbps, "pct_copy": 100 * gbps / copy}
