"""``kiln ablate``: run a study's baseline and variants, collect their metrics, write a report.

    OUT/configs/<run>.json   the resolved config of each run (what ``kiln train --config`` gets)
    OUT/runs/<run>/          ordinary kiln run directories (checkpoints, metrics.jsonl, samples)
    OUT/logs/<run>.log       each run's console output
    OUT/report.md|json, OUT/loss.png, OUT/adherence.png

Each run is a ``kiln train`` subprocess (then ``kiln eval`` per sweep value), so a crash in one
run leaves the others alone, and runs go to separate devices when there are several. Re-running
the same command skips finished runs, resumes interrupted ones from their last checkpoint and
refuses to mix in a run directory that holds a different config.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kiln.engine.checkpoint import atomic_write_text
from kiln.engine.config import RunConfig, apply_override
from kiln.engine.errors import KilnError
from kiln.engine.evaluate import METRICS, split_scores
from kiln.engine.studies import STUDIES, Study

HEADLINE = "colors"  # both colours right: the attribute furthest from chance (1/56)
SPIKE_FACTOR, SPIKE_WINDOW = 3.0, 50  # a loss > 3x the median of the previous 50 steps


def print_studies() -> None:
    for s in STUDIES.values():
        print(f"{s.name:16s} {len(s.variants)} runs x {s.steps} steps  {s.question}")


def load_study(name: str) -> Study:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise KilnError(f"ablate: study file {path} not found")
        spec = importlib.util.spec_from_file_location(f"kiln_study_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not isinstance(getattr(module, "STUDY", None), Study):
            raise KilnError(f"ablate: {path} must define STUDY = kiln.engine.studies.Study(...)")
        return module.STUDY
    if name not in STUDIES:
        raise KilnError(f"ablate: study {name!r} is not one of: {', '.join(STUDIES)} (or a .py file)")
    return STUDIES[name]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def resolve_configs(study: Study, steps: int) -> dict[str, RunConfig]:
    """Every run's full config, validated before anything runs."""
    from kiln.engine.recipes import recipe

    out = {}
    for variant in study.variants:
        cfg = recipe(study.recipe)
        for assignment in study.overrides(variant, steps):
            apply_override(cfg, assignment)
        out[variant] = cfg.validate()
    return out


def _comparable(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].pop("device", None)  # the same run may go to another device when resumed
    cfg["model"].pop("text_dim", None)  # filled in from the text encoder at start
    cfg["model"].pop("pooled_dim", None)
    return cfg


def run_state(run_dir: Path, cfg: RunConfig) -> str:
    """'new', 'resume' or 'done'; a directory holding another config is an error."""
    if not (run_dir / "config.json").is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise KilnError(f"ablate: {run_dir} exists but is not a kiln run; remove it or use another --out")
        return "new"
    have = json.loads((run_dir / "config.json").read_text())
    if _comparable(have) != _comparable(cfg.to_dict()):
        raise KilnError(f"ablate: {run_dir} holds a run with a different config; "
                        f"remove it or use another --out")
    if (run_dir / "summary.json").is_file():
        return "done"
    return "resume" if any((run_dir / "checkpoints").glob("step_*")) else "new_again"


def _kiln(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln.engine.cli", *args]


def _run_one(name: str, cfg: RunConfig, out: Path, sweep, device: str | None) -> dict:
    """Train (or resume) one run, then score it at each sweep value; returns timing."""
    key = slug(name)
    run_dir, log_path = out / "runs" / key, out / "logs" / f"{key}.log"
    if device:
        cfg.train.device = device
    state = run_state(run_dir, cfg)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        if state != "done":
            if state == "new_again":  # started but never reached a checkpoint: start over
                import shutil

                shutil.rmtree(run_dir)
            if state == "resume":
                cmd = _kiln("train", "--resume", str(run_dir))
            else:
                cfg_path = out / "configs" / f"{key}.json"
                atomic_write_text(cfg_path, cfg.to_json() + "\n")
                cmd = _kiln("train", "--config", str(cfg_path), "--out", str(run_dir))
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        for value in (sweep[1] if sweep else []):
            dest = run_dir / "evals" / f"{sweep[0]}={value}.json"
            if not (run_dir / "summary.json").is_file() or dest.is_file() or _diverged(run_dir):
                continue
            if _same_as_trained(cfg, sweep[0], value):  # the final evaluation already scored it
                _eval_from_summary(run_dir, f"{sweep[0]}={value}", dest)
                continue
            subprocess.run(_kiln("eval", str(run_dir), "--set", f"{sweep[0]}={value}", "--out", str(dest)),
                           stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    timing_path = run_dir / "ablate_timing.json"
    previous = json.loads(timing_path.read_text())["wall_seconds"] if timing_path.is_file() else 0.0
    if run_dir.is_dir():
        atomic_write_text(timing_path, json.dumps({"wall_seconds": previous + wall}) + "\n")
    return {"name": name, "wall_seconds": previous + wall, "ok": (run_dir / "summary.json").is_file()}


def _effective_sample(cfg: RunConfig) -> dict:
    sample = dict(cfg.to_dict()["sample"])
    if sample["captions"] == "same":
        sample["captions"] = cfg.data.captions
    return sample


def _same_as_trained(cfg: RunConfig, key: str, value) -> bool:
    """Would ``kiln eval --set key=value`` score exactly what the run's final evaluation did?"""
    from kiln.engine.config import from_dict

    other = from_dict(cfg.to_dict())
    apply_override(other, f"{key}={value}")
    return _effective_sample(other) == _effective_sample(cfg)


def _eval_from_summary(run_dir: Path, override: str, dest: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {k: summary.get(k) for k in METRICS if summary.get(k) is not None}
    scores = {"step": summary["steps"], "overrides": [override], **summary["adherence"], **metrics,
              "from_final_evaluation": True}
    atomic_write_text(dest, json.dumps(scores, indent=2) + "\n")


def _diverged(run_dir: Path) -> bool:
    return json.loads((run_dir / "summary.json").read_text()).get("diverged_at_step") is not None


def _devices(jobs: int | None) -> list[str | None]:
    import torch

    n_cuda = torch.cuda.device_count()
    if n_cuda > 1:
        return [f"cuda:{i}" for i in range(jobs or n_cuda)][: max(1, jobs or n_cuda)]
    return [None] * (jobs or 1)


def run_study(name: str, steps: int | None = None, out: str | None = None, jobs: int | None = None) -> dict:
    study = load_study(name)
    steps = steps or study.steps
    out_dir = Path(out) if out else Path("ablations") / study.name
    configs = resolve_configs(study, steps)
    for sub in ("runs", "logs", "configs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for variant, cfg in configs.items():  # refuse a clashing directory before running anything
        run_state(out_dir / "runs" / slug(variant), cfg)
    devices = _devices(jobs)
    print(f"kiln ablate {study.name}: {len(configs)} runs, {steps} baseline steps, "
          f"{len(devices)} at a time -> {out_dir}", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        futures = {}
        for i, (variant, cfg) in enumerate(configs.items()):
            futures[pool.submit(_run_one, variant, cfg, out_dir, study.sweep, devices[i % len(devices)])] = variant
        for fut in concurrent.futures.as_completed(futures):
            res = fut.result()
            status = "done" if res["ok"] else f"FAILED (see {out_dir / 'logs' / slug(res['name'])}.log)"
            print(f"  {res['name']}: {status} in {res['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    report = collect(study, configs, out_dir)
    write_report(study, report, out_dir, steps)
    print(f"kiln ablate {study.name}: report {out_dir / 'report.md'}", file=sys.stderr)
    return report


# -- collection ------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []


def loss_spikes(losses: list[tuple[int, float]]) -> list[int]:
    """Steps whose loss exceeds SPIKE_FACTOR x the median of the previous SPIKE_WINDOW steps."""
    out = []
    for i in range(SPIKE_WINDOW, len(losses)):
        ref = statistics.median(v for _, v in losses[i - SPIKE_WINDOW : i])
        step, v = losses[i]
        if not math.isfinite(v) or v > SPIKE_FACTOR * ref:
            out.append(step)
    return out


def collect(study: Study, configs: dict[str, RunConfig], out_dir: Path) -> dict:
    runs = []
    for variant in configs:
        run_dir = out_dir / "runs" / slug(variant)
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            runs.append({"variant": variant, "failed": True, "rows": []})
            continue
        summary = json.loads(summary_path.read_text())
        metrics = _read_jsonl(run_dir / "metrics.jsonl")
        losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        evals = [m for m in metrics if "heldout_loss" in m]
        timing_path = run_dir / "ablate_timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
        base = {
            "variant": variant, "failed": False,
            "diverged_at_step": summary.get("diverged_at_step"),
            "spikes": loss_spikes(losses),
            "final_loss": summary["final_loss"],
            "images_per_second": summary["images_per_second"],
            "images_seen": summary.get("images_seen"),
            "wall_seconds": timing.get("wall_seconds"),
            "curve": [(m["step"], m.get("images_seen", m["step"]), m["loss"]) for m in metrics if "loss" in m],
            "eval_curve": [(m["step"], m.get("images_seen"), m["heldout_loss"], m.get(f"adherence/{HEADLINE}"))
                           for m in evals],
        }
        rows = []
        if study.sweep is None:
            rows.append(_row(variant, {**(summary.get("adherence") or {}),
                                       **{k: summary.get(k) for k in METRICS if summary.get(k) is not None}}))
        else:
            key, values = study.sweep
            for value in values:
                path = run_dir / "evals" / f"{key}={value}.json"
                scores = json.loads(path.read_text()) if path.is_file() else {}
                for bookkeeping in ("step", "overrides", "from_final_evaluation"):
                    scores.pop(bookkeeping, None)
                rows.append(_row(f"{variant}, {key.split('.')[-1]}={value}", scores))
        base["rows"] = rows
        runs.append(base)
    num_prompts = next(iter(configs.values())).sample.num_prompts
    return {"study": study.name, "question": study.question, "literature": study.literature,
            "num_prompts": num_prompts, "runs": runs}


def _row(label: str, scores: dict) -> dict:
    """One report row: the held-out loss, the CLIP metrics (None without sample.clip_weights) and
    the exact scorer's adherence per attribute (empty on real captions)."""
    adherence, metrics = split_scores(scores)
    return {"label": label, **{k: metrics.get(k) for k in METRICS}, "adherence": adherence}


# -- report ----------------------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _delta(v, ref, digits=3) -> str:
    if v is None or ref is None:
        return "—"
    return f"{v - ref:+.{digits}f}"


def _mean_adherence(adh: dict) -> float | None:
    return sum(adh.values()) / len(adh) if adh else None


def report_table(report: dict) -> str:
    rows = [(run, row) for run in report["runs"] for row in (run["rows"] or [{}])]  # a failed run: one line
    ok = [row for run, row in rows if not run["failed"]]
    ref = ok[0] if ok else {"adherence": {}}  # the baseline: Δ columns are against it
    clip = [k for k in ("clip_score", "cmmd") if any(row.get(k) is not None for row in ok)]
    names = {"clip_score": "CLIP score", "cmmd": "CMMD"}
    head = ("variant", "held-out loss", "Δ", *[c for k in clip for c in (names[k], "Δ")], "both colours", "Δ",
            "mean adherence", "Δ", "train loss", "img/s", "wall min", "notes")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for run, row in rows:
        if run["failed"]:
            lines.append(f"| {run['variant']} | failed |" + " |" * (len(head) - 3) + " see logs |")
            continue
        adh, notes = row["adherence"], []
        if run["diverged_at_step"] is not None:
            notes.append(f"diverged at step {run['diverged_at_step']}")
        if run["spikes"]:
            notes.append(f"{len(run['spikes'])} loss spikes (first at {run['spikes'][0]})")
        wall = run["wall_seconds"] / 60 if run["wall_seconds"] else None
        cells = [row["label"], *_with_delta(row.get("heldout_loss"), ref.get("heldout_loss"), 4)]
        for k in clip:
            cells += _with_delta(row.get(k), ref.get(k), 3)
        cells += _with_delta(adh.get(HEADLINE), ref["adherence"].get(HEADLINE), 2)
        cells += _with_delta(_mean_adherence(adh), _mean_adherence(ref["adherence"]), 2)
        cells += [_fmt(run["final_loss"], 4), f"{run['images_per_second']:.0f}", _fmt(wall, 1), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_delta(v, ref, digits: int) -> list[str]:
    return [_fmt(v, digits), _delta(v, ref, digits)]


def attribute_table(report: dict) -> str:
    rows = [row for run in report["runs"] for row in run["rows"] if row["adherence"]]
    if not rows:
        return ""
    keys = list(rows[0]["adherence"])
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row['adherence'].get(k), 2) for k in keys) + " |")
    return "\n".join(lines)


def write_report(study: Study, report: dict, out_dir: Path, steps: int) -> None:
    n = report["num_prompts"]
    se = math.sqrt(0.25 / n)  # the largest binomial standard error of a rate over n prompts
    table = report_table(report)
    md = [f"# Ablation: {study.name}", "", study.question, ""]
    if study.literature:
        md += [f"Literature: {study.literature}.", ""]
    md += [f"Command: `kiln ablate {study.name} --steps {steps}` (recipe `{study.recipe}`; "
           f"baseline = first row; Δ = row − baseline).", "",
           table, "",
           f"Held-out loss: velocity MSE on {n} held-out images × fixed timesteps and noise (lower is better). "
           f"Adherence: fraction of {n} held-out prompts whose sample the exact scorer reads back correctly; "
           f"its standard error is at most {se:.3f}, so |Δ| < {2 * se:.2f} is within noise."
           + (" CLIP score: mean cosine of each generated held-out image with its prompt (higher is better); "
              "CMMD: CLIP-embedding MMD² x 1000 between the generated and the real held-out images (lower is "
              "better; `engine/clip.py`)." if "CLIP score" in table else ""), "",
           "Per attribute:", "", attribute_table(report), "",
           "![loss](loss.png) ![adherence](adherence.png)", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    plot(report, out_dir)


def _smooth(values: list[float], k: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    fig2, c = plt.subplots(figsize=(6, 4))
    for run in report["runs"]:
        if run["failed"] or not run["curve"]:
            continue
        _, seen, loss = zip(*run["curve"], strict=True)
        finite = [v if math.isfinite(v) else float("nan") for v in loss]
        a.plot(seen, _smooth(finite), label=run["variant"], lw=1.2)
        ev = [e for e in run["eval_curve"] if e[1] is not None]
        if ev:
            b.plot([e[1] for e in ev], [e[2] for e in ev], "o-", label=run["variant"])
            c.plot([e[1] for e in ev], [e[3] for e in ev], "o-", label=run["variant"])
    a.set(title="train loss (25-step mean)", xlabel="images seen", ylabel="velocity MSE", yscale="log")
    b.set(title="held-out loss", xlabel="images seen", ylabel="velocity MSE")
    c.set(title="both colours right (held-out prompts)", xlabel="images seen", ylabel="adherence", ylim=(0, 1))
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    fig2.tight_layout()
    fig2.savefig(out_dir / "adherence.png", dpi=110)
    plt.close(fig)
    plt.close(fig2)
