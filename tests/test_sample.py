"""``kiln sample``: a run's weights and frozen parts rebuilt without its data or optimizer,
reproducible noise per image, sizes, and the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine import checkpoint
from kiln.engine.errors import KilnError
from kiln.engine.generate import SampleRequest, load_sampler, parse_size, sample_images, sample_run
from kiln.engine.train import Trainer, load_run_config, train

PROMPTS = ["a small red circle in the center, blue background", "a large green square on the left, white background",
           "a small yellow triangle on the top, black background"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from conftest import small_run_config

    out = tmp_path_factory.mktemp("sample") / "run"
    cfg = small_run_config(steps=4)
    cfg.ema.decay = 0.5  # EMA and raw weights differ clearly after 4 steps
    train(cfg, out)
    return out


def test_weights_and_text_features_are_the_runs(run):
    state = checkpoint.load(checkpoint.latest(run))
    for use_ema, want in ((True, state["ema"]["params"]), (False, state["model"])):
        *_, model, encoder, _, _, path, step = load_sampler(run, SampleRequest(PROMPTS, use_ema=use_ema))
        got = model.state_dict()
        assert step == 4 and path == checkpoint.latest(run) and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), "weights differ from the checkpoint's"
    trainer = Trainer(load_run_config(run), run)  # the text encoder is random-init: the run's seed rebuilds it
    a, b = encoder.encode(PROMPTS), trainer.encoder.encode(PROMPTS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)


def test_each_image_has_its_own_seed_whatever_the_batch(run):
    together, made = sample_images(run, SampleRequest(PROMPTS, seed=7, steps=3, batch_size=3))
    one_by_one, _ = sample_images(run, SampleRequest(PROMPTS, seed=7, steps=3, batch_size=1))
    third, _ = sample_images(run, SampleRequest(PROMPTS[2:], seed=9, steps=3))
    assert together.shape == (3, 32, 32, 3) and together.dtype == np.uint8
    assert np.abs(together.astype(int) - one_by_one).max() <= 1  # batched matmuls may round differently
    assert np.abs(together[2].astype(int) - third[0]).max() <= 1  # image i is seed + i
    other, _ = sample_images(run, SampleRequest(PROMPTS, seed=8, steps=3))
    assert np.abs(together.astype(int) - other).mean() > 5
    raw, _ = sample_images(run, SampleRequest(PROMPTS, seed=7, steps=3, use_ema=False))
    assert (together != raw).any()  # 4 steps in: close to each other (test above: which weights load)
    assert made["weights"] == "ema" and made["steps"] == 3 and made["cfg_scale"] == 4.0


def test_guidance_and_negative_prompt_change_the_images(run):
    base, _ = sample_images(run, SampleRequest(PROMPTS[:1], steps=3))
    plain, _ = sample_images(run, SampleRequest(PROMPTS[:1], steps=3, cfg_scale=1.0))
    negative, made = sample_images(run, SampleRequest(PROMPTS[:1], steps=3, negative="blue background"))
    assert (base != plain).any() and (base != negative).any()
    assert made["negative"] == "blue background"
    with pytest.raises(KilnError, match="--negative needs guidance"):
        sample_images(run, SampleRequest(PROMPTS[:1], cfg_scale=1.0, negative="blue"))


def test_sizes(run):
    wide, made = sample_images(run, SampleRequest(PROMPTS[:2], size=(48, 32), steps=2))
    assert wide.shape == (2, 32, 48, 3) and (made["width"], made["height"]) == (48, 32)
    assert made["shift"] == pytest.approx((6 * 4 / 64) ** 0.5, abs=1e-6)  # 6 x 4 tokens vs shift_base_tokens 64
    with pytest.raises(KilnError, match="multiples of 8 px"):
        sample_images(run, SampleRequest(PROMPTS[:1], size=(36, 32)))
    assert parse_size("64") == (64, 64) and parse_size("96x64") == (96, 64)
    for bad in ("64x", "x64", "0", "64x64x2", "big"):
        with pytest.raises(KilnError, match="SIDE or WIDTHxHEIGHT"):
            parse_size(bad)


def test_bad_requests_name_the_problem(run, tmp_path):
    with pytest.raises(KilnError, match="no prompts"):
        sample_images(run, SampleRequest([]))
    config = json.loads((run / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))  # a run folder without checkpoints
    with pytest.raises(KilnError, match="has no checkpoint"):
        sample_images(tmp_path, SampleRequest(PROMPTS))
    config["ema"]["enabled"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnError, match=r"trained without EMA \(ema.enabled=false\).*--raw"):
        sample_images(tmp_path, SampleRequest(PROMPTS))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KilnError, match="corrupt or unreadable"):
        sample_images(run, SampleRequest(PROMPTS, checkpoint=str(bad)))


def test_cli_writes_images_grid_and_index_and_never_overwrites(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "kiln.engine.cli", "sample", str(run), "--prompt", PROMPTS[2], "--prompts",
           str(prompts), "--out", str(out), "--steps", "2", "--seed", "3", "--size", "40x32"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(r) for r in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPTS[2], PROMPTS[0], PROMPTS[1]]  # --prompt's, then the file's
    assert [r["seed"] for r in rows] == [3, 4, 5] and {r["step"] for r in rows} == {4}
    for r in rows:
        assert Image.open(out / r["file"]).size == (40, 32)
    assert (out / "grid.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "already holds samples" in again.stderr
    default = sample_run(run, SampleRequest(PROMPTS[:1], steps=1))
    assert default == run / "generated" / "step_00000004"
    assert sample_run(run, SampleRequest(PROMPTS[:1], steps=1)) == run / "generated" / "step_00000004-2"


def test_clip_weights_score_each_image_against_its_prompt(run, tiny_clip_file, tmp_path):
    from kiln.engine.clip import ClipEmbedder, clip_scores

    req = SampleRequest(PROMPTS, steps=2, clip_weights=tiny_clip_file, clip_model="kiln-tiny-text")
    out = sample_run(run, req, tmp_path / "scored")
    rows = [json.loads(r) for r in (out / "samples.jsonl").read_text().splitlines()]
    clip = ClipEmbedder("kiln-tiny-text", tiny_clip_file)
    images = np.stack([np.asarray(Image.open(out / r["file"])) for r in rows])
    want = clip_scores(clip.images(images), clip.texts(PROMPTS)).tolist()
    assert [r["clip_score"] for r in rows] == pytest.approx(want, abs=1e-5)
    with pytest.raises(KilnError, match="--clip-weights 'nope.pt' is not a file"):
        sample_images(run, SampleRequest(PROMPTS, clip_weights="nope.pt"))


def test_export_holds_the_checkpoints_weights_and_what_sampling_needs(run, tmp_path):
    from safetensors.torch import save_file

    from kiln.engine.export import export_run
    from kiln.model import load_exported

    state = checkpoint.load(checkpoint.latest(run))
    path = export_run(run, tmp_path / "ema.safetensors")
    model, meta = load_exported(path)
    got, want = model.state_dict(), state["ema"]["params"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (meta["kiln.step"], meta["kiln.weights"], meta["kiln.seed"]) == ("4", "ema", "0")
    assert json.loads(meta["kiln.text"])["name"] == "kiln-tiny-text"
    half = export_run(run, tmp_path / "raw_bf16.safetensors", use_ema=False, dtype="bf16")
    raw, _ = load_exported(half)
    assert all(torch.equal(raw.state_dict()[k], v.bfloat16().float()) for k, v in state["model"].items())
    assert half.stat().st_size < 0.6 * path.stat().st_size
    # the exported model is the one kiln sample runs
    *_, sampler_model, encoder, _, _, _, _ = load_sampler(run, SampleRequest(PROMPTS))
    text = encoder.encode(PROMPTS[:2])
    inputs = (torch.randn(2, 3, 32, 32), torch.rand(2), text.tokens, text.mask, text.pooled,
              torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    with torch.no_grad():
        assert torch.equal(model(*inputs), sampler_model(*inputs))
    with pytest.raises(KilnError, match="ema.safetensors exists"):
        export_run(run, path)
    with pytest.raises(KilnError, match="--dtype 'fp8' is not one of: fp32, bf16"):
        export_run(run, tmp_path / "x.safetensors", dtype="fp8")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KilnError, match="not a kiln MMDiT export"):
        load_exported(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(KilnError, match="not a readable safetensors file"):
        load_exported(tmp_path / "junk.safetensors")
    proc = subprocess.run([sys.executable, "-m", "kiln.engine.cli", "export", str(run), "--dtype", "bf16"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (run / "model_step00000004_ema_bf16.safetensors").is_file()
