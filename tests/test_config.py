import json
import subprocess
import sys

import pytest

from kiln.engine.config import RunConfig, apply_override, from_dict
from kiln.engine.errors import ConfigError
from kiln.engine.recipes import RECIPES, recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_validate_and_roundtrip_through_json(name):
    cfg = recipe(name).validate()
    back = from_dict(json.loads(cfg.to_json()))
    assert back == cfg


def test_overrides_coerce_types():
    cfg = RunConfig()
    apply_override(cfg, "train.steps=12")
    apply_override(cfg, "optim.lr=3e-4")
    apply_override(cfg, "ema.enabled=false")
    apply_override(cfg, "optim.betas=0.8,0.95")
    apply_override(cfg, "text.weights=/x/y.bin")
    apply_override(cfg, "text.weights=none")
    assert cfg.train.steps == 12 and cfg.optim.lr == 3e-4 and cfg.ema.enabled is False
    assert cfg.optim.betas == (0.8, 0.95) and cfg.text.weights is None


@pytest.mark.parametrize("assignment,match", [
    ("optim.schedule=linear", "optim.schedule: 'linear' is not one of: constant, cosine"),
    ("train.steps=0", "train.steps must be > 0"),
    ("data.caption_dropout=1.5", r"data.caption_dropout must be in \[0, 1\)"),
    ("data.resolution=30", "data.resolution must be a multiple of 8"),
    ("model.heads=3", r"model.width \(128\) must be divisible by model.heads \(3\)"),
    ("train.device=tpu", "train.device: 'tpu' is not one of"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of: auto, fp32, bf16-autocast, fp16-autocast"),
    ("train.loss_scale_init=0", "train.loss_scale_init must be > 0, got 0.0"),
    ("parallel.reshard=never", "parallel.reshard: 'never' is not one of: auto, after-forward, after-step"),
    ("data.captions=long", r"text.max_length \(16\) would cut long captions \(up to 37 tokens\)"),
])
def test_invalid_values_name_the_field(assignment, match):
    cfg = RunConfig()
    with pytest.raises(ConfigError, match=match):
        apply_override(cfg, assignment)
        cfg.validate()


@pytest.mark.parametrize("assignment,match", [
    ("optim.nope=1", "unknown config field 'optim.nope': optim has lr, betas"),
    ("train.steps=many", "train.steps: cannot parse 'many' as int"),
    ("optim=1", "optim is a section"),
    ("steps", "must look like section.field=value"),
])
def test_malformed_overrides_are_clear(assignment, match):
    with pytest.raises(ConfigError, match=match):
        apply_override(RunConfig(), assignment)


def test_cli_reports_bad_config_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kiln.engine.cli", "train", "--out", str(out),
                           "--set", "optim.schedule=linear"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["kiln: error: optim.schedule: 'linear' is not one of: constant, cosine"]
    assert not out.exists()


def test_cli_unknown_recipe(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kiln.engine.cli", "train", "huge", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe 'huge' is not one of: tiny, small, base" in proc.stderr
