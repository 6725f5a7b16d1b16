"""Exact prompt-adherence scorer for the built-in shapes set: attributes read from pixels.

No neural network. For one image:
1. every pixel takes the nearest palette colour; the background is the most common one;
2. the shape colour is the most common non-background colour; its pixels form the shape mask;
3. 4-connected components of the mask larger than a quarter of the largest give the count;
4. the largest component gives the kind from the corners of its bounding box (a square fills
   all four, an upward triangle the bottom two), else from its width a quarter of the way down
   (circle ~0.87 of the box, diamond ~0.5) and where its centroid sits (2/3 down the box for a triangle, 1/2 for a
   diamond); its box side gives the size;
5. the mask centroid gives the position (single shapes only).
On the dataset's own renders this scores >= 99% per attribute (tests/test_scorer.py).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from kiln.engine.data.shapes import COLORS, DIAMETER, OFFSET, PALETTE, SIZES, Attributes

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (8, 3)
ATTRIBUTES = ("color", "background", "colors", "kind", "size", "position", "count")


def palette_labels(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> (H, W) index of the nearest palette colour."""
    d = ((img.astype(np.float32)[:, :, None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    H, W = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pts))
    return out


def _kind(pts: np.ndarray) -> str:
    (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    box = np.zeros((h, w), dtype=bool)
    box[pts[:, 0] - y0, pts[:, 1] - x0] = True
    # Bounding-box corners separate kinds even at 7-pixel sizes where fill ratios blur:
    # a square fills all four, an upward triangle the two bottom ones, circle/diamond none.
    top, bottom = int(box[0, 0]) + int(box[0, -1]), int(box[-1, 0]) + int(box[-1, -1])
    if top + bottom == 4:
        return "square"
    if bottom == 2 and top == 0:
        return "triangle"
    # A quarter of the way down, a circle spans ~0.87 of its box, a diamond ~0.5.
    q = h // 4
    if (box[q].sum() + box[h - 1 - q].sum()) / (2 * w) > 0.75:
        return "circle"
    centroid = (pts[:, 0].mean() + 0.5 - y0) / h
    return "triangle" if centroid > 0.58 else "diamond"


def _position(mask: np.ndarray) -> str:
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    dx, dy = (xs.mean() + 0.5) / W - 0.5, (ys.mean() + 0.5) / H - 0.5
    half = OFFSET / 2
    if abs(dx) >= abs(dy) and abs(dx) > half:
        return "left" if dx < 0 else "right"
    if abs(dy) > half:
        return "top" if dy < 0 else "bottom"
    return "center"


def read_attributes(img: np.ndarray) -> dict:
    """Decode colour, background, kind, size, position and count from a uint8 (H, W, 3) image."""
    labels = palette_labels(img)
    counts = np.bincount(labels.ravel(), minlength=len(COLORS))
    bg = int(counts.argmax())
    counts[bg] = 0
    if counts.max() == 0:
        return {"background": COLORS[bg], "color": None, "kind": None, "size": None,
                "position": None, "count": 0}
    fg = int(counts.argmax())
    mask = labels == fg
    comps = sorted(components(mask), key=len, reverse=True)
    comps = [c for c in comps if len(c) >= len(comps[0]) / 4]
    big = comps[0]
    side = max(np.ptp(big[:, 0]) + 1, np.ptp(big[:, 1]) + 1) / min(mask.shape)
    threshold = (DIAMETER["small"] + DIAMETER["large"]) / 2
    return {
        "background": COLORS[bg],
        "color": COLORS[fg],
        "kind": _kind(big),
        "size": SIZES[int(side > threshold)],
        "position": _position(mask),
        "count": len(comps),
    }


def score(img: np.ndarray, target: Attributes) -> dict[str, bool]:
    """Per-attribute correctness of ``img`` against the prompt's attributes.

    ``colors`` is both colours right; ``size`` and ``position`` are only scored for single
    shapes (rows of 2-3 are always small and centred), so they are absent otherwise.
    """
    got = read_attributes(img)
    res = {
        "color": got["color"] == target.color,
        "background": got["background"] == target.background,
        "kind": got["kind"] == target.kind,
        "count": got["count"] == target.count,
    }
    res["colors"] = res["color"] and res["background"]
    if target.count == 1:
        res["size"] = got["size"] == target.size
        res["position"] = got["position"] == target.position
    return res


def adherence(images: list[np.ndarray], targets: list[Attributes]) -> dict[str, float]:
    """Mean of :func:`score` over images, per attribute (0-1)."""
    rows = [score(img, t) for img, t in zip(images, targets, strict=True)]
    out = {}
    for key in ATTRIBUTES:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    return out
