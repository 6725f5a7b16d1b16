"""Aspect-ratio buckets: ~equal-area (H, W) sizes around a base resolution (SDXL, NovelAI).

Every batch comes from one bucket, so images keep their framing instead of being center-cropped
to a square; each image goes to the bucket nearest its aspect ratio in log space and is then
resized to cover that bucket and cropped (loader). Sizes are multiples of ``multiple`` (the
model's patch size in pixel space) and have area within a few percent of base².
"""

from __future__ import annotations

import math

# width / height: square, 4:3, 3:2, 16:9, 2:1 and their portrait twins (SDXL uses a similar set).
DEFAULT_ASPECTS = (0.5, 0.5625, 0.6667, 0.75, 1.0, 1.3333, 1.5, 1.7778, 2.0)


def make_buckets(base: int, multiple: int, aspects=DEFAULT_ASPECTS) -> list[tuple[int, int]]:
    """Distinct (H, W) buckets of area ~base², each side a positive multiple of ``multiple``."""
    out = []
    for r in sorted(aspects):
        h = max(multiple, round(base / math.sqrt(r) / multiple) * multiple)
        w = max(multiple, round(base * math.sqrt(r) / multiple) * multiple)
        if (h, w) not in out:
            out.append((h, w))
    return out


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to height x width."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


def cover_and_crop(height: int, width: int, bucket: tuple[int, int], u: float, v: float) -> tuple[int, int, int, int]:
    """Resize-to-cover size and crop corner for an image going into ``bucket``.

    The image is scaled so that it covers the bucket (the smaller scale that does) and cropped at
    a position given by u, v in [0, 1] (0.5, 0.5 = center crop). Returns (resized_h, resized_w,
    crop_top, crop_left).
    """
    H, W = bucket
    scale = max(H / height, W / width)
    rh, rw = max(H, round(height * scale)), max(W, round(width * scale))
    return rh, rw, int(round(u * (rh - H))), int(round(v * (rw - W)))
