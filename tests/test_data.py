"""Prepared datasets (issue 6): `kiln data prepare` on real-world file kinds, the shards loader
(buckets, filters, DALI vs Pillow decode, exact resume, rank x worker sharding), and training
from shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.engine.config import DataConfig
from kiln.engine.data.prepare import prepare
from kiln.engine.data.shards import ShardsLoader


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour image (gradients + a red disc) that survives JPEG well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w * 255, y / h * 255, np.full_like(x, 80 + seed * 10)], -1)
    disc = (x - w / 3) ** 2 + (y - h / 3) ** 2 < (min(w, h) / 5) ** 2
    rgb[disc] = (230, 20, 20)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Mixed real-world files, each with a .txt caption unless noted; 3 of them are broken."""
    root = tmp_path_factory.mktemp("photos")
    files: dict[str, bytes] = {}
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
    assert report["written"] == 9 and report["items"] == 12
    assert report["skipped"] == {"no_caption": 1, "not_an_image": 1, "truncated": 1}
    assert json.loads((out / "prepare_report.json").read_text())["written"] == 9
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
    assert cmyk[33, 33, 0] > 180 and cmyk[33, 33, 1] < 80  # the red disc is still red
    assert _image(out, meta["alpha.png"]).min() > 240  # transparent composited on white
    sixteen = _image(out, meta["sixteen.png"]).astype(int)
    assert sixteen[0, 0, 0] < 10 and sixteen[-1, -1, 0] > 245  # full 16-bit range -> 0..255
    assert meta["plain.jpg"]["size"] == len(_jpeg(_photo(120, 90, 0)))  # clean JPEG kept byte for byte


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
    cfg = DataConfig(source="shards", path=str(path), resolution=64, **kw)
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
