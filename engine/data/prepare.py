"""``kiln data prepare SRC OUT``: image-caption sources -> webdataset shards + DALI indexes.

SRC is a folder (images with same-stem ``.txt`` captions, searched recursively), a JSONL or CSV
manifest (``file`` relative to the manifest, ``caption``, any extra fields kept as metadata), or
``synthetic:N[:SIDE]`` (N shapes images at random sizes and aspect ratios; with SIDE, photo-sized
with grain, for benchmarks).
OUT receives:
    shards/shard-000000.tar   webdataset: <key>.jpg, <key>.txt (caption), <key>.json (metadata)
    shards/shard-000000.idx   DALI index (wds2idx format v1.2) for fn.readers.webdataset
    metadata.jsonl            one row per written sample: key, shard, byte offset/size of the
                              image inside the tar, width, height, caption, source, extras
    prepare_report.json       written, skipped (reason -> count), shards, examples of skips
Each shard is built by one worker process from ``shard_size`` consecutive items and written to
``.tmp`` then renamed, so an interrupted prepare never leaves a half-written shard; a bad file
is skipped with a counted reason (images.py), never written.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kiln.engine.data.images import CleanImage, SkipSample, clean_image
from kiln.engine.errors import KilnError

IDX_VERSION = "v1.2"
SIDE_CAR = ".txt"


@dataclass
class Item:
    source: str  # file path, or "synthetic:<i>"
    caption: str | None
    extra: dict = field(default_factory=dict)


# ---- sources -----------------------------------------------------------------------------------

def _folder_items(root: Path) -> list[Item]:
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() == SIDE_CAR:
            continue
        side = path.with_suffix(SIDE_CAR)
        caption = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else None
        items.append(Item(str(path), caption))
    return items


def _manifest_items(path: Path) -> list[Item]:
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    items = []
    for i, row in enumerate(rows):
        if "file" not in row:
            raise KilnError(f"{path}: row {i + 1} has no 'file' field (manifest rows need file and caption)")
        extra = {k: v for k, v in row.items() if k not in ("file", "caption")}
        items.append(Item(str(path.parent / row["file"]), row.get("caption"), extra))
    return items


def list_items(src: str) -> list[Item]:
    if src.startswith("synthetic:"):
        try:
            n, _, side = src.split(":", 1)[1].partition(":")
            n, side = int(n), (int(side) if side else None)
        except ValueError as e:
            raise KilnError(f"data source {src!r}: expected synthetic:N or synthetic:N:SIDE") from e
        return [Item(f"synthetic:{i}", None, {"synthetic_side": side} if side else {}) for i in range(n)]
    path = Path(src)
    if path.is_dir():
        return _folder_items(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return _manifest_items(path)
    raise KilnError(f"data source {src!r} is not a folder, a .jsonl/.csv manifest or synthetic:N")


# ---- one sample --------------------------------------------------------------------------------

SYNTH_ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3)]


def _synthetic(index: int, side: int | None) -> tuple[bytes, str]:
    """A shapes image at a random size/aspect (deterministic in the index) and its caption.

    ``side`` None: long side 48-128 px (tests, demos). Given: long side within ±25% of it, with
    film grain (σ = 6 grey levels) so JPEG sizes and decode cost resemble photos (benchmarks).
    """
    import numpy as np
    from PIL import Image

    from kiln.engine.data.shapes import caption, render, sample_attributes

    rng = np.random.default_rng([7, index])
    aw, ah = SYNTH_ASPECTS[rng.integers(len(SYNTH_ASPECTS))]
    long = int(rng.integers(48, 129)) if side is None else int(rng.integers(side * 3 // 4, side * 5 // 4 + 1))
    w, h = (long, long * ah // aw) if aw >= ah else (long * aw // ah, long)
    a = sample_attributes(0, 3, index)
    img = render(a, h, w)
    if side is not None:
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92)
    return buf.getvalue(), caption(a, "short")


def load_item(item: Item, max_side: int) -> tuple[CleanImage, str]:
    if item.source.startswith("synthetic:"):
        raw, cap = _synthetic(int(item.source.split(":", 1)[1]), item.extra.get("synthetic_side"))
        return clean_image(raw, max_side), cap
    if not item.caption or not item.caption.strip():
        raise SkipSample("no_caption", "no sidecar .txt or empty caption")
    try:
        raw = Path(item.source).read_bytes()
    except OSError as e:
        raise SkipSample("unreadable", str(e)) from e
    return clean_image(raw, max_side), item.caption.strip()


# ---- one shard ---------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_index(tar_path: Path, idx_path: Path) -> dict[str, tuple[int, int]]:
    """DALI's webdataset index for ``tar_path``; returns key -> (offset, size) of each .jpg."""
    samples: list[list[tuple[str, int, int, str]]] = []
    images = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0][3].split(".", 1)[0] != key:
                samples.append([])
            samples[-1].append((ext, m.offset_data, m.size, m.name))
            if ext == "jpg":
                images[key] = (m.offset_data, m.size)
    lines = [f"{IDX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in bundle) for bundle in samples]
    idx_path.write_text("\n".join(lines) + "\n")
    return images


def build_shard(args) -> tuple[int, list[dict], Counter, list[str]]:
    """Worker: clean items[start:stop], write shard ``shard_id`` atomically; metadata rows out."""
    shard_id, start, items, out_dir, max_side = args
    skipped, examples, rows = Counter(), [], []
    tar_path = out_dir / f"shard-{shard_id:06d}.tar"
    tmp = tar_path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, item in enumerate(items):
            key = f"{start + i:09d}"
            try:
                img, cap = load_item(item, max_side)
            except SkipSample as e:
                skipped[e.reason] += 1
                if len(examples) < 20:
                    examples.append(f"{item.source}: {e}")
                continue
            except Exception as e:  # a decoder bug on one odd file must not lose the whole shard
                skipped[f"error_{type(e).__name__}"] += 1
                examples.append(f"{item.source}: {type(e).__name__}: {e}")
                continue
            meta = {"key": key, "width": img.width, "height": img.height, "source_width": img.source_width,
                    "source_height": img.source_height, "caption": cap, "source": item.source, **item.extra}
            _add(tar, f"{key}.jpg", img.data)
            _add(tar, f"{key}.txt", cap.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append(meta)
    if not rows:
        tmp.unlink()
        return shard_id, rows, skipped, examples
    os.replace(tmp, tar_path)
    offsets = write_index(tar_path, tar_path.with_suffix(".idx"))
    for r in rows:
        r["shard"] = tar_path.name
        r["offset"], r["size"] = offsets[r["key"]]
    return shard_id, rows, skipped, examples


# ---- driver ------------------------------------------------------------------------------------

def prepare(src: str, out: str | Path, shard_size: int = 1000, workers: int | None = None, max_side: int = 4096,
            heldout: int = 0, progress: bool = True) -> dict:
    """Build the dataset in ``out`` (which must not already hold one); returns the report.

    ``heldout``: that many samples, drawn at random (seed 0) across the whole set, get
    ``"split": "heldout"``: the loader never trains on them and evaluation uses them.
    """
    from tqdm import tqdm

    out = Path(out)
    if (out / "metadata.jsonl").exists():
        raise KilnError(f"{out} already holds a prepared dataset (metadata.jsonl); choose another OUT")
    items = list_items(src)
    if not items:
        raise KilnError(f"data source {src!r} has no files")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(os.cpu_count() or 1, 16))
    jobs = [(k, s, items[s : s + shard_size], out / "shards", max_side)
            for k, s in enumerate(range(0, len(items), shard_size))]
    t0, results = time.time(), []
    bar = tqdm(total=len(items), desc="prepare", unit="img", disable=not progress)
    with mp.get_context("spawn").Pool(workers) as pool:
        for res in pool.imap_unordered(build_shard, jobs):
            results.append(res)
            bar.update(len(jobs[res[0]][2]))
    bar.close()
    results.sort(key=lambda r: r[0])
    skipped, examples = Counter(), []
    all_rows = [r for res in results for r in res[1]]
    if heldout:
        import numpy as np

        for i in np.random.default_rng(0).choice(len(all_rows), min(heldout, len(all_rows)), replace=False):
            all_rows[i]["split"] = "heldout"
    for _, _, sk, ex in results:
        skipped.update(sk)
        examples.extend(ex)
    with open(out / "metadata.jsonl.tmp", "w") as f:
        for r in all_rows:
            f.write(json.dumps(r) + "\n")
    os.replace(out / "metadata.jsonl.tmp", out / "metadata.jsonl")
    report = {"source": src, "items": len(items), "written": len(all_rows),
              "heldout": sum(r.get("split") == "heldout" for r in all_rows),
              "skipped": dict(sorted(skipped.items())), "shards": sum(1 for r in results if r[1]),
              "skip_examples": examples[:50], "seconds": round(time.time() - t0, 2)}
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
