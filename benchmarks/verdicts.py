"""The kernel issues' GPU acceptance points, judged from benchmark rows (benchmarks/acceptance.py).

Each verdict names the point, its target, the measured number (the worst case, named) and PASS,
FAIL or "not measured" (a case missing: a stage skipped, timed out or failed). Targets, from the
issues and ../shared/design/TARGETS.md:

- issue 4: at D = 128 and S >= 4096, bf16, the whole op's fwd+bwd <= 0.85x the faster of eager and
  torch.compile of the reference; the attention core >= 480 TFLOP/s forward, >= 350 backward;
- issue 5: Triton GroupNorm >= 80% of measured copy bandwidth forward and backward on the VAE
  shapes, NCHW and channels-last, and >= 5x torch native at batch 1;
- issue 7: csrc GroupNorm >= 80% of copy bandwidth (same cases); the csrc QK-norm+RoPE pre-kernel
  >= 80% of copy bandwidth and >= 5x the eager norm+RoPE;
- GPU tests pass: the Triton kernels' (issues 4, 5) and the csrc kernels' (issue 7).

Bandwidth cases are read at CUDA-graph timing (device time), or where a case has no graph row
(its capture failed) at eager timing, which adds the host's launch overhead and so can only
understate, and the verdict says how many. Rows repeated by a rerun: the last one counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.benchmarks.attention import SHAPE_SETS
from kiln.benchmarks.group_norm import SHAPES as GN_SHAPES

LAYOUTS, MODES = ("nchw", "channels_last"), ("fwd", "bwd")
TARGET_S, TARGET_H, TARGET_D = SHAPE_SETS["target"][0]


@dataclass
class Verdict:
    issue: str
    point: str
    target: str
    measured: str
    ok: bool | None  # None: not measured, or not every case was

    @property
    def word(self) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[self.ok]


def _last(rows: list[dict], **match) -> dict | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "p50_ms" in r]
    return hits[-1] if hits else None


def _ratio(slow: dict | None, fast: dict | None) -> float | None:
    """How many times faster ``fast`` ran than ``slow`` (None unless both were measured, alike)."""
    if not (slow and fast) or slow.get("timing") != fast.get("timing"):
        return None
    return slow["p50_ms"] / fast["p50_ms"]


def _worst(cases: dict[str, float | None], target: float, higher_is_better: bool, unit: str) -> tuple[str, bool | None]:
    """The worst measured case against the target; ok is None when any case is missing."""
    got = {k: v for k, v in cases.items() if v is not None}
    if not got:
        return "no rows", None
    pick = min if higher_is_better else max
    name = pick(got, key=got.get)
    ok = all((v >= target) if higher_is_better else (v <= target) for v in got.values())
    text = f"worst {got[name]:.3g}{unit} ({name}); {len(got)}/{len(cases)} cases"
    return text, ok if len(got) == len(cases) or not ok else None  # a failed case fails even when some are missing


def _attention_cases(rows: list[dict], providers: tuple[str, ...], mode: str) -> list[tuple[int, int]]:
    """(S, H) of the D = 128, S >= 4096 shapes measured for all ``providers`` (a shape a cut-short
    run left half measured does not count), and the target shape always: missing, it is "not
    measured"."""
    def measured(p):
        return {(r["S"], r["H"]) for r in rows if r.get("op") == "qk_norm_attention" and r.get("provider") == p
                and r.get("mode") == mode and r.get("D") == 128 and r.get("S", 0) >= 4096 and "p50_ms" in r}

    return sorted(set.intersection(*map(measured, providers)) | {(TARGET_S, TARGET_H)})


def attention(rows: list[dict]) -> list[Verdict]:
    def key(S, H):
        return dict(op="qk_norm_attention", S=S, H=H, D=128)

    ratio = {}
    for S, H in _attention_cases(rows, ("triton", "eager", "compile"), "fwd+bwd"):
        ours, *refs = (_last(rows, provider=p, mode="fwd+bwd", **key(S, H)) for p in ("triton", "eager", "compile"))
        ratio[f"S{S} H{H}"] = ours["p50_ms"] / min(r["p50_ms"] for r in refs) if ours and all(refs) else None
    core = {mode: {f"S{S} H{H}": r["tflops"] if (r := _last(rows, provider="triton-core", mode=mode, **key(S, H)))
                   else None for S, H in _attention_cases(rows, ("triton-core",), mode)} for mode in MODES}
    return [
        Verdict("4", "whole op fwd+bwd vs the faster of eager and torch.compile (D 128, S >= 4096)", "<= 0.85x",
                *_worst(ratio, 0.85, False, "x")),
        Verdict("4", "attention core forward (D 128, S >= 4096)", ">= 480 TFLOP/s",
                *_worst(core["fwd"], 480, True, " TFLOP/s")),
        Verdict("4", "attention core backward (D 128, S >= 4096)", ">= 350 TFLOP/s",
                *_worst(core["bwd"], 350, True, " TFLOP/s")),
    ]


def _one_timing(rows: list[dict], providers: tuple[str, ...], **case) -> list[dict | None]:
    """Each provider's row for one case, all at one timing: CUDA-graph replays (device time) where
    every provider has them, else eager (host overhead included: a pessimistic stand-in, for a
    case whose graph capture failed); else each provider's own, None where it has neither."""
    for timing in ("graph", "eager"):
        found = [_last(rows, provider=p, timing=timing, **case) for p in providers]
        if all(found):
            return found
    return [_last(rows, provider=p, timing="graph", **case) or _last(rows, provider=p, timing="eager", **case)
            for p in providers]


def _eager_note(used: list[dict | None]) -> str:
    n = sum(1 for r in used if r and r.get("timing") == "eager")
    return f"; eager timing in {n} (no graph row)" if n else ""


def _bandwidth(cases: dict[str, tuple], target: float) -> tuple[str, bool | None]:
    """Worst % of copy bandwidth over ``cases`` (name -> (ours, reference) rows)."""
    text, ok = _worst({k: o["pct_copy"] if o else None for k, (o, _) in cases.items()}, target, True, "%")
    return text + _eager_note([o for o, _ in cases.values()]), ok


def _speedup(cases: dict[str, tuple], target: float) -> tuple[str, bool | None]:
    """Worst reference time over ours (same timing only) over ``cases``."""
    text, ok = _worst({k: _ratio(r, o) for k, (o, r) in cases.items()}, target, True, "x")
    return text + _eager_note([o for o, _ in cases.values()]), ok


def group_norm(rows: list[dict], provider: str, issue: str) -> list[Verdict]:
    cases, batch1 = {}, {}
    for shape in GN_SHAPES:
        for layout in LAYOUTS:
            for mode in MODES:
                name = f"{mode} {'x'.join(map(str, shape))} {layout}"
                cases[name] = tuple(_one_timing(rows, (provider, "torch"), op="group_norm", mode=mode,
                                                shape=list(shape), layout=layout))
                if shape[0] == 1:  # native's weak case: one block per (n, g)
                    batch1[name] = cases[name]
    out = [Verdict(issue, f"{provider} GroupNorm fwd and bwd, VAE shapes, NCHW and channels-last",
                   ">= 80% of copy bandwidth", *_bandwidth(cases, 80))]
    if provider == "triton":
        out.append(Verdict(issue, "triton GroupNorm vs torch native at batch 1", ">= 5x", *_speedup(batch1, 5)))
    return out


def qk_norm_rope(rows: list[dict]) -> list[Verdict]:
    cases = {mode: tuple(_one_timing(rows, ("csrc", "eager"), op="qk_norm_rope", mode=mode, S=TARGET_S, H=TARGET_H,
                                     D=TARGET_D)) for mode in MODES}
    return [Verdict("7", f"csrc QK-norm+RoPE fwd and bwd (S {TARGET_S}, H {TARGET_H}, D {TARGET_D})",
                    ">= 80% of copy bandwidth", *_bandwidth(cases, 80)),
            Verdict("7", "csrc QK-norm+RoPE vs eager norm+RoPE", ">= 5x", *_speedup(cases, 5))]


def tests(rows: list[dict], stage: str, issue: str, what: str) -> Verdict:
    row = next((r for r in reversed(rows) if r.get("op") == "stage" and r.get("stage") == stage), None)
    if row is None or "passed" not in row:
        return Verdict(issue, what, "all pass", row["status"] if row else "not run", None)
    counts = f"{row['passed']} passed, {row['failed']} failed, {row['error']} errors ({row['status']})"
    broken = row["failed"] or row["error"]
    if row["status"] != "ok" and not broken:  # timed out or killed with nothing failed so far: incomplete
        return Verdict(issue, what, "all pass", counts, None)
    return Verdict(issue, what, "all pass", counts, row["passed"] > 0 and not broken)


def judge(rows: list[dict]) -> list[Verdict]:
    return [
        *attention(rows),
        tests(rows, "tests-triton", "4, 5", "CUDA tests of the Triton kernels (every launch candidate)"),
        *group_norm(rows, "triton", "5"),
        *group_norm(rows, "csrc", "7"),
        *qk_norm_rope(rows),
        tests(rows, "tests-csrc", "7", "CUDA tests of the csrc kernels"),
    ]


def provenance_line(rows: list[dict]) -> str:
    """Where the rows were measured: device, versions and commit of the first benchmark row."""
    row = next((r for r in rows if "device" in r), None)
    if row is None:
        return "measured on: no benchmark rows"
    return "measured on: " + ", ".join(f"{k} {row.get(k)}" for k in ("device", "torch", "triton", "cuda", "git"))


def candidate_lines(rows: list[dict]) -> list[str]:
    """The autotuner's timings carried by the rows (``candidate_ms``: key -> candidate -> median
    ms), fastest first, one line per key (the last row's wins): what each choice was made
    against, e.g. a staged GroupNorm candidate against the unstaged control."""
    keys: dict[str, dict] = {}
    for r in rows:
        keys.update(r.get("candidate_ms") or {})
    if not keys:
        return []
    lines = ["", "Autotuner candidates, median ms, fastest first (-: failed, or disagreed with the default):", ""]
    for key, cands in sorted(keys.items()):
        ranked = sorted(cands.items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0))
        lines.append(f"- `{key}`: " + ", ".join(f"{c} {'-' if ms is None else f'{ms:.4f}'}" for c, ms in ranked))
    return lines


def write_verdicts(rows: list[dict], out: Path | None) -> str:
    """The verdicts of ``rows`` as a Markdown table under a provenance line, then the autotuner's
    candidate timings (returned; also acceptance.md and .json in ``out``)."""
    verdicts = judge(rows)
    lines = [provenance_line(rows), "", "| issue | acceptance point | target | measured | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {v.issue} | {v.point} | {v.target} | {v.measured} | {v.word} |" for v in verdicts]
    table = "\n".join(lines + candidate_lines(rows))
    if out is not None:
        (Path(out) / "acceptance.md").write_text(table + "\n")
        (Path(out) / "acceptance.json").write_text(json.dumps([asdict(v) | {"verdict": v.word} for v in verdicts],
                                                              indent=1))
    return table
