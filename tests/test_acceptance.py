"""The one-call GPU acceptance run (benchmarks/acceptance.py) and its verdicts (verdicts.py), on
the CPU: verdicts from made-up rows, the stage runner's deadline, timeout, retry and pytest
counts on small subprocesses, and every stage's command line accepted by what it calls."""

import json
import re
import subprocess
import sys
import time

import pytest

from kiln.benchmarks import acceptance, verdicts
from kiln.benchmarks.acceptance import PY, Runner, Stage
from kiln.benchmarks.attention import SHAPE_SETS
from kiln.benchmarks.group_norm import SHAPES as GN_SHAPES

S, H, D = SHAPE_SETS["target"][0]


def passing_rows() -> list[dict]:
    att = dict(op="qk_norm_attention", S=S, H=H, D=D)
    rows = [{**att, "provider": p, "mode": "fwd+bwd", "p50_ms": ms} for p, ms in
            (("triton", 1.0), ("eager", 2.0), ("compile", 1.5))]
    rows += [{**att, "provider": "triton-core", "mode": "fwd", "p50_ms": 1.0, "tflops": 500.0},
             {**att, "provider": "triton-core", "mode": "bwd", "p50_ms": 2.0, "tflops": 400.0}]
    for shape in GN_SHAPES:
        for layout in ("nchw", "channels_last"):
            for mode in ("fwd", "bwd"):
                case = dict(op="group_norm", mode=mode, timing="graph", shape=list(shape), layout=layout)
                rows += [{**case, "provider": p, "p50_ms": ms, "pct_copy": pct}
                         for p, ms, pct in (("triton", 0.1, 85.0), ("csrc", 0.1, 90.0), ("torch", 1.0, 9.0))]
    for mode in ("fwd", "bwd"):
        case = dict(op="qk_norm_rope", mode=mode, timing="graph", S=S, H=H, D=D)
        rows += [{**case, "provider": "csrc", "p50_ms": 0.1, "pct_copy": 82.0},
                 {**case, "provider": "eager", "p50_ms": 0.6, "pct_copy": 13.0}]
    rows += [{"op": "stage", "stage": s, "status": "ok", "passed": 40, "failed": 0, "error": 0}
             for s in ("tests-triton", "tests-csrc")]
    return rows


def by_point(rows):
    return {v.point: v for v in verdicts.judge(rows)}


def test_every_point_passes_on_rows_that_meet_the_targets():
    got = verdicts.judge(passing_rows())
    assert len(got) == 10 and [v.word for v in got] == ["PASS"] * 10
    assert by_point(passing_rows())["whole op fwd+bwd vs the faster of eager and torch.compile (D 128, S >= 4096)"] \
        .measured.startswith("worst 0.667x")  # 1.0 ms against compile's 1.5


def test_one_slow_case_fails_its_point_and_is_named():
    rows = passing_rows()
    slow = next(r for r in rows if r.get("provider") == "triton" and r.get("op") == "group_norm"
                and r["mode"] == "bwd" and r["layout"] == "channels_last" and r["shape"][1] == 512)
    slow["pct_copy"], slow["p50_ms"] = 70.0, 0.3
    v = by_point(rows)
    gn = v["triton GroupNorm fwd and bwd, VAE shapes, NCHW and channels-last"]
    assert gn.ok is False and "70%" in gn.measured and "bwd 1x512x128x128 channels_last" in gn.measured
    assert v["triton GroupNorm vs torch native at batch 1"].ok is False  # 1.0 / 0.3 = 3.3x < 5x
    assert v["csrc GroupNorm fwd and bwd, VAE shapes, NCHW and channels-last"].ok is True


def test_missing_rows_are_not_measured_not_passed():
    rows = [r for r in passing_rows() if not (r.get("provider") == "compile" or r.get("op") == "qk_norm_rope")]
    rows = [r for r in rows if not (r.get("provider") == "csrc" and r.get("shape") == [8, 512, 64, 64])]
    v = by_point(rows)
    assert v["whole op fwd+bwd vs the faster of eager and torch.compile (D 128, S >= 4096)"].ok is None
    assert v[f"csrc QK-norm+RoPE fwd and bwd (S {S}, H {H}, D {D})"].ok is None
    csrc = v["csrc GroupNorm fwd and bwd, VAE shapes, NCHW and channels-last"]
    assert csrc.ok is None and "12/16 cases" in csrc.measured
    assert verdicts.judge([])[0].measured == "no rows"


def test_a_second_shape_counts_where_complete_and_error_rows_do_not():
    rows = passing_rows() + [
        {"op": "qk_norm_attention", "S": 8192, "H": 24, "D": 128, "provider": "triton-core", "mode": "fwd",
         "p50_ms": 5.0, "tflops": 450.0},
        {"op": "qk_norm_attention", "S": S, "H": H, "D": D, "provider": "triton-core", "mode": "bwd",
         "error": "OutOfResources"}]
    rows.append({"op": "qk_norm_attention", "S": 8192, "H": 24, "D": 128, "provider": "triton", "mode": "fwd+bwd",
                 "p50_ms": 9.0})  # eager and compile never ran at 8192 (a run cut short): not a case
    v = by_point(rows)
    assert v["whole op fwd+bwd vs the faster of eager and torch.compile (D 128, S >= 4096)"].ok is True
    fwd = v["attention core forward (D 128, S >= 4096)"]
    assert fwd.ok is False and "450" in fwd.measured and "S8192 H24" in fwd.measured
    assert v["attention core backward (D 128, S >= 4096)"].ok is True  # the earlier measured row stands


@pytest.mark.parametrize("row,word", [
    ({"status": "ok", "passed": 5, "failed": 0, "error": 0}, "PASS"),
    ({"status": "failed (rc 1)", "passed": 5, "failed": 1, "error": 0}, "FAIL"),
    ({"status": "failed (rc 2)", "passed": 0, "failed": 0, "error": 1}, "FAIL"),
    ({"status": "timed out after 240 s", "passed": 9, "failed": 0, "error": 0}, "not measured"),
    ({"status": "ok", "passed": 0, "failed": 0, "error": 0}, "FAIL"),  # selected nothing
])
def test_test_stage_verdicts(row, word):
    assert verdicts.tests([{"op": "stage", "stage": "tests-csrc", **row}], "tests-csrc", "7", "x").word == word


def test_pytest_counts_read_the_closing_line():
    text = "....F\nFAILED tests/x.py::t - 3 passed\n= 1 failed, 40 passed, 2 skipped, 1 error in 9.1s ="
    assert acceptance.pytest_counts(text) == {"passed": 40, "failed": 1, "error": 1, "skipped": 2}
    assert acceptance.pytest_counts("") == {"passed": 0, "failed": 0, "error": 0, "skipped": 0}


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_runner_kills_a_stage_at_its_cap_and_skips_what_the_budget_cannot_hold(tmp_path):
    runner = Runner(tmp_path, budget_s=60)
    t0 = time.monotonic()
    row = runner.run(Stage("hang", (PY, "-c", "import time; print('started', flush=True); time.sleep(60)"), 1.5, 0))
    assert row["status"] == "timed out after 2 s" and time.monotonic() - t0 < 20
    assert "started" in (tmp_path / "log.txt").read_text()
    big = runner.run(Stage("big", (PY, "-c", "pass"), 100, 100))["status"]
    assert re.fullmatch(r"skipped: \d+ s left, needs 100", big)
    assert runner.run(Stage("needs-csrc", (PY, "-c", "pass"), 10, 0, csrc="needs"))["status"] == \
        "skipped: csrc unavailable (no build started)"
    assert runner.run(Stage("after-build", (PY, "-c", "pass"), 10, 0, csrc="after"))["status"] == "ok"
    assert [(r["stage"], r["status"][:8]) for r in _rows(tmp_path)] == [
        ("hang", "timed ou"), ("big", "skipped:"), ("needs-csrc", "skipped:"), ("after-build", "ok")]


def test_stages_waiting_for_the_build_let_others_go_first():
    plan = {s.name: s for s in acceptance.stages(acceptance.Path("r.jsonl"), None, 1)}
    order = list(acceptance.STAGE_NAMES)
    assert acceptance.next_stage(order[2:], plan, building=True) == "tests-triton"  # group_norm waits
    assert acceptance.next_stage(order[2:], plan, building=False) == "group_norm"
    assert acceptance.next_stage(["tests-csrc", "extra"], plan, building=True) == "tests-csrc"  # waits, not extra


def test_runner_reruns_a_failed_stage_with_its_retry_env_and_counts_tests(tmp_path):
    runner = Runner(tmp_path, budget_s=60)
    code = "import os, sys; print('2 passed, 1 failed in 0.1s'); sys.exit(0 if os.environ.get('KILN_X') == '1' else 1)"
    row = runner.run(Stage("tests-fake", (PY, "-c", code), 30, 0, retry_env={"KILN_X": "1"}))
    assert row["status"] == "ok" and row["env"] == {"KILN_X": "1"} and row["passed"] == 2 and row["failed"] == 1
    assert [(r["status"], r["env"]) for r in _rows(tmp_path)] == [("failed (rc 1)", {}), ("ok", {"KILN_X": "1"})]


@pytest.mark.parametrize("name", [n for n in acceptance.STAGE_NAMES if not n.startswith("tests")])
def test_each_benchmark_stage_command_line_is_accepted(name, capsys):
    """The stage's arguments parse in the benchmark it calls (--help after them: argparse converts
    every earlier value, a wrong provider name included, before it stops at --help)."""
    stage = next(s for s in acceptance.stages(acceptance.Path("r.jsonl"), 3000.0, 1) if s.name == name)
    assert stage.argv[:2] == (PY, "-m")
    module = __import__(stage.argv[2], fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        module.main([*stage.argv[3:], "--help"])
    assert e.value.code == 0, capsys.readouterr().err


def test_test_stages_split_the_gpu_kernel_tests_between_them():
    def collected(k):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/test_gpu_kernels.py", "-k", k], capture_output=True, text=True)
        return {line for line in out.stdout.splitlines() if "::" in line}

    stage_k = {s.name: s.argv[-1] for s in acceptance.stages(acceptance.Path("r.jsonl"), None, 1)
               if "tests/test_gpu_kernels.py" in s.argv}
    triton, csrc, every = collected(stage_k["tests-triton"]), collected(stage_k["tests-csrc"]), collected("")
    assert triton and csrc and not (triton & csrc) and triton | csrc == every
    assert any("atomic_backward" in t for t in triton) and any("csrc_group_norm" in t for t in csrc)


def test_provider_names_are_the_benchmarks_own():
    """--providers checks names against each benchmark's PROVIDERS: every provider the benchmark
    can build on this machine must be listed there (else it could never be selected)."""
    import torch

    from kiln.benchmarks import attention, group_norm, qk_norm_rope

    _, kw = attention.make_inputs(64, 2, 16, torch.device("cpu"))
    assert set(attention.providers(kw)) <= set(attention.PROVIDERS)
    assert set(qk_norm_rope.providers(kw)) <= set(qk_norm_rope.PROVIDERS)
    assert set(group_norm.providers()) <= set(group_norm.PROVIDERS)


def test_a_case_without_graph_rows_falls_back_to_eager_timing_and_says_so():
    rows = [r for r in passing_rows() if not (r.get("op") == "group_norm" and r["shape"] == [1, 128, 512, 512]
                                              and r["layout"] == "nchw" and r["mode"] == "fwd")]
    case = dict(op="group_norm", mode="fwd", timing="eager", shape=[1, 128, 512, 512], layout="nchw")
    rows += [{**case, "provider": "triton", "p50_ms": 0.2, "pct_copy": 81.0},
             {**case, "provider": "torch", "p50_ms": 1.2, "pct_copy": 14.0}]
    v = by_point(rows)
    gn = v["triton GroupNorm fwd and bwd, VAE shapes, NCHW and channels-last"]
    assert gn.ok is True and "16/16 cases" in gn.measured and "eager timing in 1" in gn.measured
    assert v["triton GroupNorm vs torch native at batch 1"].ok is True  # 1.2 / 0.2 = 6x, both eager
    rows = [r for r in rows if not (r.get("provider") == "torch" and r.get("timing") == "eager")]
    speed = by_point(rows)["triton GroupNorm vs torch native at batch 1"]  # ours eager, native nowhere: no ratio
    assert speed.ok is None and "11/12 cases" in speed.measured


def test_verdict_files_name_where_the_rows_were_measured(tmp_path, capsys):
    rows = [{"op": "copy", "device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
             "git": "abc1234", "gbps": 4300.0}] + passing_rows()
    table = verdicts.write_verdicts(rows, tmp_path)
    assert table.splitlines()[0] == ("measured on: device NVIDIA H200, torch 2.11.0, triton 3.6.0, cuda 13.0, "
                                     "git abc1234")
    assert (tmp_path / "acceptance.md").read_text() == table + "\n"
    assert [v["verdict"] for v in json.loads((tmp_path / "acceptance.json").read_text())] == ["PASS"] * 10
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    acceptance.main(["--judge", str(tmp_path / "rows.jsonl")])  # the committed rows, judged again
    assert capsys.readouterr().out == table + "\n"


def test_verdict_file_lists_the_candidates_each_choice_was_made_against(tmp_path):
    """Rows that carry the autotuner's timings (candidate_ms) add one line per key, fastest
    first, dropped candidates last; a later row's timings of a key replace an earlier row's."""
    key = "group_norm_fwd/nchw/bfloat16/128/32/False/False/1/262144"
    rows = passing_rows() + [
        {"op": "group_norm", "provider": "triton", "candidate_ms": {key: {"a": 0.09, "b": 0.05}}},
        {"op": "group_norm", "provider": "triton", "candidate_ms": {key: {"a": 0.08, "b": 0.06, "c": None}}},
    ]
    table = verdicts.write_verdicts(rows, tmp_path)
    assert table.splitlines()[-1] == f"- `{key}`: b 0.0600, a 0.0800, c -"
    assert sum(line.startswith("- `") for line in table.splitlines()) == 1
    assert verdicts.candidate_lines(passing_rows()) == []
