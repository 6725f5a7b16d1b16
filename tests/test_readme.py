"""The README's two commands are the product's front door: keep .ci/run and them in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_blocks():
    return re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_train_and_test_commands():
    train, test = _code_blocks()[:2]
    assert "pip install ." in train and "kiln train" in train
    assert 'pip install ".[test]"' in test and "pytest" in test


VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def test_ci_runs_the_readme_test_command():
    test_cmd = _code_blocks()[1].strip().splitlines()[-1]
    assert test_cmd.startswith(VENV)  # .ci/run makes its own fresh venv the same way
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[len(VENV):] in ci, f"{test_cmd!r} is not in .ci/run"
