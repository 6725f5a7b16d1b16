"""CLIP metrics: CMMD against a float64 loop, its unbiasedness, and clip_score / cmmd flowing
from each evaluation into metrics.jsonl, summary.json, ``kiln eval`` and the ablation report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.engine.clip import CMMD_SCALE, CMMD_SIGMA, ClipEmbedder, clip_scores, cmmd
from kiln.engine.errors import ConfigError, KilnError


def _cmmd_loops(x, y):
    def k(a, b):
        return math.exp(-sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / (2 * CMMD_SIGMA**2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return CMMD_SCALE * (xx + yy - 2 * xy)


def _unit(n, d, shift=0.0, gen=None):
    v = torch.randn(n, d, generator=gen) + shift
    return torch.nn.functional.normalize(v, dim=-1)


def test_cmmd_matches_a_float64_loop_on_odd_set_sizes():
    x, y = _unit(7, 5), _unit(11, 5, shift=0.5)
    assert cmmd(x, y) == pytest.approx(_cmmd_loops(x.tolist(), y.tolist()), rel=1e-9, abs=1e-12)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-12)
    with pytest.raises(KilnError, match="at least 2 images"):
        cmmd(x[:1], y)


def test_cmmd_is_unbiased_and_grows_with_the_distance():
    """Two samples of one distribution average 0 (the all-pairs V-statistic would sit near
    +2·1000·(1 - k̄)/m, about 2 here); a shifted distribution scores far above."""
    gen = torch.Generator().manual_seed(0)
    same = [cmmd(_unit(8, 4, gen=gen), _unit(8, 4, gen=gen)) for _ in range(400)]
    apart = [cmmd(_unit(8, 4, gen=gen), _unit(8, 4, shift=1.0, gen=gen)) for _ in range(100)]
    se = np.std(same) / math.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * se and 4 * se < 0.5, (np.mean(same), se)
    assert np.mean(apart) > 10 * max(abs(np.mean(same)), se)


def test_embedder_scores_an_image_against_its_own_caption(tiny_clip_file):
    clip = ClipEmbedder("kiln-tiny-text", tiny_clip_file)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 24, 3), dtype=np.uint8)  # odd, non-square
    emb, txt = clip.images(images), clip.texts(["a red circle", "a blue square", "a green triangle"])
    assert emb.shape == (3, clip.dim) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    sims = clip_scores(emb, txt)
    assert torch.allclose(sims, torch.stack([emb[i] @ txt[i] for i in range(3)])) and (sims.abs() <= 1).all()
    with pytest.raises(KilnError, match="is not a file"):
        ClipEmbedder("kiln-tiny-text", tiny_clip_file + ".missing")


def test_evaluations_report_clip_score_and_cmmd(tiny_clip_file, tmp_path, run_config):
    from kiln.engine.evaluate import evaluate_run
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    cfg = run_config(steps=4)
    cfg.sample.clip_model, cfg.sample.clip_weights, cfg.sample.every = "kiln-tiny-text", tiny_clip_file, 2
    summary = train(cfg, tmp_path / "run")
    assert -1 <= summary["clip_score"] <= 1 and math.isfinite(summary["cmmd"])
    assert set(summary["adherence"]) == {"color", "background", "colors", "kind", "size", "position", "count"}
    evals = [m for m in read_metrics(tmp_path / "run") if "heldout_loss" in m]
    assert [m["step"] for m in evals] == [2, 4] and all("cmmd" in m and "clip_score" in m for m in evals)
    again = evaluate_run(tmp_path / "run", [])  # same weights, same noise: the same numbers
    assert again["clip_score"] == pytest.approx(summary["clip_score"], abs=1e-6)
    assert again["cmmd"] == pytest.approx(summary["cmmd"], abs=1e-6)
    cfg.sample.clip_weights = tiny_clip_file + ".missing"
    with pytest.raises(ConfigError, match="sample.clip_weights: .* is not a file"):
        cfg.validate()


def test_report_adds_clip_columns_with_deltas_against_the_baseline():
    from kiln.engine.ablate import report_table

    def run(name, loss, clip, cmmd_):
        row = {"label": name, "heldout_loss": loss, "clip_score": clip, "cmmd": cmmd_, "adherence": {}}
        return {"variant": name, "failed": False, "diverged_at_step": None, "spikes": [], "final_loss": loss,
                "images_per_second": 10.0, "wall_seconds": 60.0, "rows": [row]}

    table = report_table({"runs": [run("base", 0.5, 0.25, 1.5), run("other", 0.4, 0.3, 1.0),
                                   {"variant": "broken", "failed": True, "rows": []}]})
    head, _, base, other, broken = table.splitlines()
    assert "| CLIP score | Δ | CMMD | Δ |" in head
    assert "| 0.300 | +0.050 | 1.000 | -0.500 |" in other and "| 0.250 | +0.000 | 1.500 | +0.000 |" in base
    assert broken.count("|") == head.count("|") and "see logs" in broken
    plain = report_table({"runs": [run("base", 0.5, None, None)]})
    assert "CLIP" not in plain and "CMMD" not in plain
