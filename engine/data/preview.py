"""``kiln data preview OUT --out grid.png``: what the model will see from a prepared dataset.

Draws batches from the loader exactly as training does (buckets, resize-to-cover, crop, flip,
same decoder) and lays them out one batch per row, each image with its caption and its
micro-conditioning (original size, crop corner) underneath.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kiln.engine.config import DataConfig
from kiln.engine.data.shards import ShardsLoader


def preview(cfg: DataConfig, out: str | Path, batches: int = 4, batch_size: int = 4) -> dict:
    loader = ShardsLoader(cfg, batch_size, multiple=16)
    tiles, text_h, pad = [], 44, 6
    for _ in range(batches):
        batch = loader.next_batch()
        imgs = batch.images.permute(0, 2, 3, 1).numpy()
        row = []
        for img, cap, m in zip(imgs, batch.captions, batch.micro.tolist(), strict=True):
            tile = Image.new("RGB", (img.shape[1], img.shape[0] + text_h), "white")
            tile.paste(Image.fromarray(img), (0, 0))
            draw = ImageDraw.Draw(tile)
            width = max(8, img.shape[1] // 6)
            lines = textwrap.wrap(cap, width)[:2] + [f"{int(m[0])}x{int(m[1])} crop {int(m[2])},{int(m[3])}"]
            draw.multiline_text((2, img.shape[0] + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
            row.append(tile)
        tiles.append(row)
    width = max(sum(t.width + pad for t in row) for row in tiles) + pad
    height = sum(max(t.height for t in row) + pad for row in tiles) + pad
    grid = Image.new("RGB", (width, height), (235, 235, 235))
    y = pad
    for row in tiles:
        x = pad
        for t in row:
            grid.paste(t, (x, y))
            x += t.width + pad
        y += max(t.height for t in row) + pad
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return {"out": str(out), "buckets": loader.buckets, "samples": len(loader.rows), "filtered": loader.filtered,
            "image": list(np.asarray(grid).shape)}
