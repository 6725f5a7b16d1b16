"""Prepared datasets (issue 6): `kiln data prepare` on real-world file kinds, the shards loader
(buckets, filters, DALI vs Pillow decode, exact resume, rank x worker sharding), and training
from shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine.config import DataConfig
from kiln.engine.data.prepare import prepare
from kiln.engine.data.shards import ShardsLoader


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A real photograph (matplotlib's sample Grace Hopper portrait), cropped and resized."""
    img = Image.open(matplotlib_sample() / "grace_hopper.jpg").convert("RGB")
    box = (seed * 7, seed * 5, img.width - seed * 3, img.height - seed * 4)
    return img.resize((w, h), Image.Resampling.BICUBIC, box=box)


def matplotlib_sample() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Mixed real-world files, each with a .txt caption unless noted; 3 of them are broken."""
    root = tmp_path_factory.mktemp("photos")
    files: dict[str, bytes] = {}
    sample = matplotlib_sample()
    files["hopper.jpg"] = (sample / "grace_hopper.jpg").read_bytes()  # an untouched camera JPEG
    files["present.png"] = (sample / "Minduka_Present_Blue_Pack.png").read_bytes()
    files["plain.jpg"] = _jpeg(_photo(120, 90, 0))
    files["progressive.jpg"] = _jpeg(_photo(96, 128, 1), progressive=True)
    files["cmyk.jpg"] = _jpeg(_photo(100, 100, 2).convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to view: stored 160x90 landscape shows as 90x160 portrait
    files["rotated.jpg"] = _jpeg(_photo(160, 90, 3), exif=exif)
    buf = io.BytesIO()
    _photo(64, 48, 4).convert("L").save(buf, "PNG")
    files["gray.png"] = buf.getvalue()
    rgba = _photo(80, 80, 5).convert("RGBA")
    rgba.putalpha(Image.new("L", (80, 80), 0))  # fully transparent -> white
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    files["alpha.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((np.linspace(0, 65535, 70 * 50).reshape(50, 70)).astype(np.uint16)).save(buf, "PNG")
    files["sixteen.png"] = buf.getvalue()
    buf = io.BytesIO()
    _photo(90, 60, 6).save(buf, "WEBP", quality=90)
    files["pic.webp"] = buf.getvalue()
    files["huge.jpg"] = _jpeg(_photo(2400, 600, 7))  # downscaled to max_side=512 below
    files["truncated.jpg"] = _jpeg(_photo(120, 120, 8))[:400]
    files["notes.jpg"] = b"this is not an image at all"
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"a photo called {name}")
    (root / "nocaption.jpg").write_bytes(_jpeg(_photo(50, 50, 9)))
    return root


@pytest.fixture(scope="module")
def prepared(photo_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "photos"
    report = prepare(str(photo_folder), out, shard_size=4, workers=2, max_side=512, progress=False)
    return out, report


def _meta(out) -> dict[str, dict]:
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    return {r["source"].rsplit("/", 1)[-1]: r for r in rows}


def _image(out, row) -> np.ndarray:
    with open(out / "shards" / row["shard"], "rb") as f:
        f.seek(row["offset"])
        return np.asarray(Image.open(io.BytesIO(f.read(row["size"]))))


def test_prepare_writes_every_valid_file_and_counts_the_broken_ones(prepared):
    out, report = prepared
    assert report["written"] == 11 and report["items"] == 14
    assert report["skipped"] == {"no_caption": 1, "not_an_image": 1, "truncated": 1}
    assert json.loads((out / "prepare_report.json").read_text())["written"] == 11
    assert report["shards"] == len(list((out / "shards").glob("*.tar"))) == len(list((out / "shards").glob("*.idx")))
    assert not list(out.rglob("*.tmp"))


def test_prepare_converts_real_world_formats(prepared):
    out, _ = prepared
    meta = _meta(out)
    assert (meta["rotated.jpg"]["width"], meta["rotated.jpg"]["height"]) == (90, 160)  # EXIF applied
    assert (meta["huge.jpg"]["width"], meta["huge.jpg"]["height"]) == (512, 128)  # long side <= max_side
    for name in meta:
        assert _image(out, meta[name]).shape[-1] == 3, name  # everything stored as RGB JPEG
    cmyk = _image(out, meta["cmyk.jpg"]).astype(int)
    assert np.abs(cmyk - np.asarray(_photo(100, 100, 2)).astype(int)).mean() < 12  # colours survive CMYK
    assert _image(out, meta["alpha.png"]).min() > 240  # transparent composited on white
    sixteen = _image(out, meta["sixteen.png"]).astype(int)
    assert sixteen[0, 0, 0] < 10 and sixteen[-1, -1, 0] > 245  # full 16-bit range -> 0..255
    assert meta["plain.jpg"]["size"] == len(_jpeg(_photo(120, 90, 0)))  # clean JPEGs kept byte for byte
    assert (meta["hopper.jpg"]["source_height"], meta["hopper.jpg"]["height"]) == (600, 512)  # > max_side


def test_dali_index_reads_with_dali_webdataset_reader(prepared):
    from nvidia.dali import fn, pipeline_def

    out, report = prepared
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))

    @pipeline_def(batch_size=report["written"], num_threads=1, device_id=None)
    def pipe():
        img, txt = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "txt"])
        return fn.decoders.image(img, device="cpu"), txt

    p = pipe()
    p.build()
    images, texts = p.run()
    captions = {bytes(texts.at(i)).decode() for i in range(report["written"])}
    assert captions == {f"a photo called {n}" for n in _meta(out)}


def _cfg(path, **kw) -> DataConfig:
    cfg = DataConfig(**{"source": "shards", "path": str(path), "resolution": 64, **kw})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "synth"
    prepare("synthetic:400", out, shard_size=64, workers=2, progress=False)
    return out


def test_loader_yields_bucketed_batches_with_micro_conditioning(synthetic):
    loader = ShardsLoader(_cfg(synthetic, flip=True), 8)
    shapes = set()
    for _ in range(12):
        H, W = loader.next_shape()
        batch = loader.next_batch()
        assert batch.images.shape == (8, 3, H, W) and batch.images.dtype == torch.uint8
        assert (H, W) in loader.buckets and H % 16 == 0 and W % 16 == 0
        assert batch.micro[:, 4].eq(H).all() and batch.micro[:, 5].eq(W).all()
        assert len(batch.captions) == 8 and all(batch.captions)
        shapes.add((H, W))
    assert len(shapes) >= 3  # synthetic data spans portrait, square and landscape buckets


def test_dali_and_pillow_decoders_agree(synthetic):
    a = ShardsLoader(_cfg(synthetic, decoder="dali"), 8).next_batch()
    b = ShardsLoader(_cfg(synthetic, decoder="pillow"), 8).next_batch()
    assert a.captions == b.captions and torch.equal(a.micro, b.micro)
    diff = (a.images.float() - b.images.float()).abs()
    assert diff.mean() < 6, diff.mean()  # same geometry; resamplers differ by a few grey levels


def test_filters_count_what_they_drop(synthetic):
    loader = ShardsLoader(_cfg(synthetic, min_side=60, max_aspect=1.5), 8)
    assert loader.filtered["min_side"] > 0 and loader.filtered["aspect"] > 0
    assert all(min(r["width"], r["height"]) >= 60 and r["width"] / r["height"] <= 1.5 for r in loader.rows)
    assert len(loader.rows) + sum(loader.filtered.values()) == 400


def test_resume_reproduces_the_uninterrupted_order_exactly(synthetic):
    cfg = _cfg(synthetic, flip=True)
    straight = ShardsLoader(cfg, 8)
    ref = [straight.next_batch() for _ in range(60)]  # crosses an epoch boundary (~45 batches)
    assert straight.epoch == 1
    first = ShardsLoader(cfg, 8)
    for _ in range(40):
        first.next_batch()
    resumed = ShardsLoader(cfg, 8)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as stored in a checkpoint
    for want in ref[40:]:
        got = resumed.next_batch()
        assert got.captions == want.captions and torch.equal(got.images, want.images)
        assert torch.equal(got.micro, want.micro)


def test_no_sample_twice_across_two_ranks_and_two_workers_in_an_epoch(synthetic):
    seen: dict[tuple[int, int], list[int]] = {}
    loaders = [ShardsLoader(_cfg(synthetic, workers=2), 8, rank=r, world_size=2) for r in range(2)]
    plan = loaders[0]._plan
    for _ in range(len(plan)):
        for r, loader in enumerate(loaders):
            for w, part in enumerate(loader.worker_split(loader.next_indices())):
                seen.setdefault((r, w), []).extend(part)
    all_ids = [i for ids in seen.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == sum(len(b) for b in plan)
    assert all(len(v) > 0 for v in seen.values()) and len(seen) == 4
    per_bucket = np.bincount(loaders[0].bucket_of, minlength=len(loaders[0].buckets))
    assert 400 - len(all_ids) == sum(n % 8 for n in per_bucket)  # only each bucket's last partial batch waits


def test_train_from_shards_in_pixel_space_and_resume_exactly(synthetic, tmp_path, run_config):
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    def cfg(steps):
        c = run_config(steps=steps)
        c.data.source, c.data.path, c.data.resolution = "shards", str(synthetic), 32
        c.train.ckpt_every, c.sample.num_prompts = 2, 2
        return c

    train(cfg(4), tmp_path / "straight")
    train(cfg(2), tmp_path / "half")
    train(cfg(4), tmp_path / "half", resume=True)
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("straight", "half")}
    assert len(losses["straight"]) == 4
    torch.testing.assert_close(torch.tensor(losses["half"][-2:]), torch.tensor(losses["straight"][-2:]))


def test_score_writes_clip_and_aesthetic_scores_that_filters_use(tmp_path):
    from kiln.engine.data.score import score
    from kiln.model.text_encoder import open_clip_module

    open_clip = open_clip_module()

    out = tmp_path / "ds"
    prepare("synthetic:40", out, shard_size=20, workers=1, progress=False)
    clip = open_clip.create_model("kiln-tiny-text", pretrained=None)  # random weights, saved as a local file
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    torch.save({"weight": torch.randn(1, 192), "bias": torch.zeros(1)}, tmp_path / "head.pt")
    summary = score(out, "kiln-tiny-text", str(tmp_path / "clip.pt"), str(tmp_path / "head.pt"), batch_size=16,
                    device="cpu", progress=False)
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == summary["samples"] == 40
    assert all(-1 <= r["clip_score"] <= 1 and "aesthetic" in r for r in rows)
    median = summary["aesthetic"]["p50"]
    loader = ShardsLoader(_cfg(out, min_aesthetic=median, buckets=False, resolution=32), 4)
    assert loader.filtered["aesthetic"] == sum(r["aesthetic"] < median for r in rows) > 0
    with pytest.raises(Exception, match="aesthetic head is a linear layer"):
        torch.save({"w": torch.zeros(3)}, tmp_path / "bad.pt")
        score(out, "kiln-tiny-text", str(tmp_path / "clip.pt"), str(tmp_path / "bad.pt"), progress=False)


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(path)
    return path


def test_train_from_shards_with_online_vae_latents(synthetic, tmp_path, run_config):
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import Trainer, train
    from kiln.model.vae import LatentCodec

    vae_dir = _tiny_vae(tmp_path / "vae")
    codec = LatentCodec.load(str(vae_dir))
    from kiln.kernels import GroupNorm

    n_gn = sum(isinstance(m, GroupNorm) for m in codec.modules())
    assert codec.groupnorms == n_gn > 0 and (codec.channels, codec.factor) == (4, 2)  # GroupNorm via kiln.kernels
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 24) and torch.equal(z, codec.encode(x))  # posterior mean: deterministic
    assert codec.decode(z).shape == x.shape

    cfg = run_config(steps=3)
    cfg.data.source, cfg.data.path, cfg.data.vae, cfg.data.resolution = "shards", str(synthetic), str(vae_dir), 64
    cfg.model.patch_size, cfg.sample.num_prompts, cfg.sample.grid_size = 2, 2, 2
    summary = train(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert summary["heldout_loss"] > 0 and "vae" in summary["stage_seconds"] and (tmp_path / "run" / "samples").is_dir()
    trainer = Trainer(cfg, tmp_path / "other")
    assert trainer.model.cfg.in_channels == 4 and trainer.pixels_per_token == 4
    assert all(b[0] % 4 == 0 and b[1] % 4 == 0 for b in trainer.loader.buckets)
    # kiln sample on the latent run: noise in latents (4 x 24 x 40: 12 x 20 tokens), decoded to 80 x 48 pixels
    from kiln.engine.errors import KilnError
    from kiln.engine.generate import SampleRequest, sample_images

    images, made = sample_images(tmp_path / "run", SampleRequest(["a red circle"], size=(80, 48), steps=2))
    assert images.shape == (1, 48, 80, 3) and made["shift"] == pytest.approx((12 * 20 / 64) ** 0.5, abs=1e-6)
    with pytest.raises(KilnError, match="multiples of 4 px"):
        sample_images(tmp_path / "run", SampleRequest(["a red circle"], size=(82, 48)))


def test_encoded_latents_train_like_the_online_vae(synthetic, tmp_path, run_config):
    from kiln.engine.data.encode import encode
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    vae_dir = str(_tiny_vae(tmp_path / "vae"))
    meta = encode(synthetic, vae_dir, 64, max_length=16, batch_size=32, progress=False)
    assert meta["samples"] == 400 and sum(meta["per_bucket"].values()) == 400
    losses = {}
    for mode in ("online", "encoded"):
        cfg = run_config(steps=3)
        cfg.data.source, cfg.data.path, cfg.data.vae, cfg.data.resolution = "shards", str(synthetic), vae_dir, 64
        cfg.data.random_crop = False  # the encoded latents are center crops
        cfg.data.latents = mode == "encoded"
        cfg.model.patch_size, cfg.sample.num_prompts = 2, 0
        train(cfg, tmp_path / mode)
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode) if "loss" in r]
    # same samples, crops and captions; only the float16 storage of latents differs
    torch.testing.assert_close(torch.tensor(losses["encoded"]), torch.tensor(losses["online"]), rtol=2e-2, atol=0)

    cfg.text.max_length = 12  # features encoded for another text config are refused, naming both
    with pytest.raises(Exception, match="text features from"):
        train(cfg, tmp_path / "mismatch")


def test_stage_data_mix_replays_earlier_data_with_its_weight_and_resumes(synthetic, tmp_path):
    from kiln.engine.data.mix import MixLoader

    other = tmp_path / "other"
    prepare("synthetic:300:96", other, shard_size=100, workers=2, progress=False)
    cfg = _cfg(synthetic)
    first = MixLoader(cfg, [str(synthetic)], [], 8)
    for _ in range(5):
        first.next_batch()
    a_pos = first.sources[0].state_dict()
    second = MixLoader(cfg, [str(other), str(synthetic)], [3.0, 1.0], 8)  # stage 2: new data + 25% replay
    second.load_state_dict(first.state_dict())
    assert second.sources[1].state_dict() == a_pos and second.drawn == 5  # replay continues, not restarts
    picks = []
    for _ in range(80):
        before = [s.state_dict() for s in second.sources]
        second.next_batch()
        picks.append(next(i for i, s in enumerate(second.sources) if s.state_dict() != before[i]))
    assert 0.15 < picks.count(1) / len(picks) < 0.35  # ~ weight 1 / (3 + 1)
    state = json.loads(json.dumps(second.state_dict()))
    ref = [second.next_batch() for _ in range(6)]
    resumed = MixLoader(cfg, [str(other), str(synthetic)], [3.0, 1.0], 8)
    resumed.load_state_dict(state)
    for want in ref:
        got = resumed.next_batch()
        assert got.captions == want.captions and torch.equal(got.images, want.images)
    bigger = MixLoader(cfg, [str(synthetic)], [], 16)  # a new batch size: the replayed set starts a fresh epoch
    bigger.load_state_dict(state)
    assert bigger.sources[0].state_dict()["offset"] == 0
    assert bigger.sources[0].state_dict()["epoch"] == state["sources"][str(synthetic)]["epoch"] + 1


def test_multi_stage_run_switches_datasets_and_resumes_exactly(synthetic, tmp_path, run_config):
    from kiln.engine.config import StageConfig
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    other = tmp_path / "other"
    prepare("synthetic:200:80", other, shard_size=100, workers=2, progress=False)

    def cfg(steps):
        c = run_config(steps=steps)
        c.train.steps, c.train.ckpt_every, c.sample.num_prompts = 4, 2, 0
        c.data.source, c.data.path = "shards", str(synthetic)
        c.stages = [StageConfig(2, 32, 8), StageConfig(2, 48, 8, data=[str(other), str(synthetic)], weights=[3, 1])]
        return c

    train(cfg(4), tmp_path / "straight")
    with pytest.raises(RuntimeError):
        train(cfg(4), tmp_path / "cut", fail_at_step=3)
    train(cfg(4), tmp_path / "cut", resume=True)
    got = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("straight", "cut")}
    assert len(got["straight"]) == 4
    torch.testing.assert_close(torch.tensor(got["cut"][-2:]), torch.tensor(got["straight"][-2:]))


def test_preview_cli_draws_the_bucketed_crops_with_captions(prepared, tmp_path):
    import subprocess
    import sys

    out, _ = prepared
    png = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "kiln.engine.cli", "data", "preview", str(out), "--out", str(png),
                           "--resolution", "64", "--batches", "2", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["samples"] == 11 and Image.open(png).size[0] > 2 * 48
    grid = np.asarray(Image.open(png))
    assert grid.std() > 20  # pictures and caption text, not a blank canvas


def test_data_bench_writes_rows_for_both_loaders_and_every_stage(synthetic, tmp_path):
    from kiln.benchmarks.data import main as bench

    rows_file = tmp_path / "rows.jsonl"
    vae_dir = str(_tiny_vae(tmp_path / "vae"))
    rows = bench([str(synthetic), "--batches", "3", "--warmup", "1", "--batch-size", "8", "--resolution", "64",
                  "--threads", "2", "--vae", vae_dir, "--out", str(rows_file)])
    assert [r["provider"] for r in rows][:2] == ["dali-cpu", "pillow-dataloader"]
    assert all(r["img_per_s"] > 0 for r in rows) and rows[0]["speedup_vs_baseline"] > 0
    assert rows[0]["read_ms"] > 0 and rows[0]["decode_ms"] > 0 and rows[0]["vae_ms"] > 0
    assert len(rows_file.read_text().splitlines()) == len(rows) and rows[0]["device"]


def test_heldout_split_is_never_trained_on_and_is_what_eval_uses(tmp_path):
    from kiln.engine.data.loader import eval_prompts

    out = tmp_path / "ds"
    report = prepare("synthetic:120", out, shard_size=60, workers=1, heldout=10, progress=False)
    assert report["heldout"] == 10 and report["written"] == 120
    held = {r["caption"] for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())
            if r.get("split") == "heldout"}
    loader = ShardsLoader(_cfg(out, buckets=False, resolution=32), 4)
    assert loader.filtered["heldout"] == 10 and all(r.get("split") != "heldout" for r in loader.rows)
    prompts = eval_prompts(_cfg(out, resolution=32), 6)
    assert len(prompts.captions) == 6 and set(prompts.captions) <= held and prompts.images.shape[-2:] == (32, 32)
