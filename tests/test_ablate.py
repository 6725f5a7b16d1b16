"""kiln ablate: a 2-variant, few-step study end to end, resume/skip, clashes, report pieces."""

import json
import math

import pytest

from kiln.engine import ablate
from kiln.engine.errors import KilnError
from kiln.engine.studies import STUDIES

STUDY_FILE = '''
from kiln.engine.studies import Study

SHRINK = ["model.width=32", "model.depth=1", "model.single_depth=1", "model.heads=2", "model.patch_size=8",
          "train.batch_size=8", "train.device=cpu", "sample.num_prompts=4", "sample.steps=2",
          "sample.grid_size=4", "optim.warmup_steps=1"]

STUDY = Study(
    name="tiny_test",
    question="Does uniform t differ from logit-normal in 4 steps?",
    common=SHRINK,
    variants={"logit-normal": [], "uniform t": ["objective.timesteps=uniform"]},
    sweep=("sample.cfg_scale", [1.0, 4.0]),
    steps=4,
)
'''


def test_two_variant_study_runs_reports_and_skips_finished_runs(tmp_path):
    study_py = tmp_path / "my_study.py"
    study_py.write_text(STUDY_FILE)
    out = tmp_path / "abl"
    report = ablate.run_study(str(study_py), out=str(out))
    assert [r["variant"] for r in report["runs"]] == ["logit-normal", "uniform t"]
    for run in report["runs"]:
        assert not run["failed"] and run["diverged_at_step"] is None
        assert [row["label"].split(", ")[-1] for row in run["rows"]] == ["cfg_scale=1.0", "cfg_scale=4.0"]
        for row in run["rows"]:
            assert math.isfinite(row["heldout_loss"]) and 0 <= row["adherence"]["colors"] <= 1
        assert [e[1] for e in run["eval_curve"]] == [8, 16, 24, 32]  # every steps // 4, images seen
    # equal seed: the two runs share data, so their losses differ only through the timesteps
    a, b = ([c[2] for c in run["curve"]] for run in report["runs"])
    assert len(a) == len(b) == 4 and a != b
    # held-out loss does not depend on the CFG scale (it is not sampled with guidance)
    rows = report["runs"][0]["rows"]
    assert rows[0]["heldout_loss"] == pytest.approx(rows[1]["heldout_loss"])
    md = (out / "report.md").read_text()
    assert "| logit-normal, cfg_scale=1.0 |" in md and "| uniform t, cfg_scale=4.0 |" in md
    # 4.0 is the trained config's own scale: taken from the final evaluation, not re-sampled
    reused = json.loads((out / "runs" / "uniform-t" / "evals" / "sample.cfg_scale=4.0.json").read_text())
    assert reused["from_final_evaluation"] is True
    assert "from_final_evaluation" not in json.loads(
        (out / "runs" / "uniform-t" / "evals" / "sample.cfg_scale=1.0.json").read_text())
    for run in report["runs"]:  # rows hold attributes only: bookkeeping keys would enter the mean adherence
        assert all(set(row["adherence"]) == {"color", "background", "colors", "kind", "size", "position", "count"}
                   and row["clip_score"] is None for row in run["rows"])
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adherence.png").is_file()
    assert json.loads((out / "report.json").read_text())["study"] == "tiny_test"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    ablate.run_study(str(study_py), out=str(out))  # everything done: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps

    study_py.write_text(STUDY_FILE.replace('"optim.warmup_steps=1"', '"optim.warmup_steps=2"'))
    with pytest.raises(KilnError, match="holds a run with a different config"):
        ablate.run_study(str(study_py), out=str(out))


def test_builtin_studies_resolve_to_valid_configs():
    for study in STUDIES.values():
        configs = ablate.resolve_configs(study, study.steps)
        assert len(configs) == len(study.variants)
    ms = ablate.resolve_configs(STUDIES["multi_stage"], 500)
    low, high = ms["32 px (50% of compute) then 48 px"].stages
    # equal compute: 250 steps at 48 px become 562 at 32 px ((48/32)^2 = 2.25 tokens per image)
    assert (low.resolution, low.steps, high.resolution, high.steps) == (32, 562, 48, 250)
    bs = ablate.resolve_configs(STUDIES["batch_size"], 800)
    assert {c.train.batch_size * c.train.steps for c in bs.values()} == {32 * 800}


def test_unknown_study_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="study 'nope' is not one of: caption_length"):
        ablate.load_study("nope")
    with pytest.raises(KilnError, match="must define STUDY"):
        (tmp_path / "x.py").write_text("X = 1\n")
        ablate.load_study(str(tmp_path / "x.py"))


def test_loss_spikes_flag_jumps_over_the_running_median():
    losses = [(i, 1.0) for i in range(1, 80)]
    losses[60] = (61, 3.5)
    losses[70] = (71, float("nan"))
    assert ablate.loss_spikes(losses) == [61, 71]
    assert ablate.loss_spikes([(i, 1.0 + 0.5 * (i % 2)) for i in range(100)]) == []
