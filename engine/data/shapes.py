"""The built-in text-image set: flat coloured shapes on coloured backgrounds.

Each sample is a pure function of (seed, stream, index): attributes are drawn from
``numpy.random.default_rng([seed, stream, index])`` and rendered at any H x W with hard edges in
an 8-colour palette, so :mod:`kiln.engine.data.scorer` can read every attribute back from the
pixels exactly. Attributes: shape kind (4), shape colour (8), background colour (7 others),
size (small/large), position (5; single shapes only), count (1..max_count, in a row).

Chance levels for a model that ignores the prompt: shape colour 1/8, background 1/8, both
colours 1/56 ~ 1.8%, kind 1/4, size 1/2, position 1/5.

Captions come in a short and a long variant (caption length is one of the ablations): both
name every attribute; the long one wraps them in descriptive filler, as recaptioned web data
does.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Longest caption in CLIP BPE tokens, start and end-of-text included (measured over 2000 samples
# per style and count); a text.max_length below this would silently cut captions.
CAPTION_TOKENS = {"short": 13, "long": 37, "mixed": 37}
# Geometry as fractions of the image: diameter by size (and for rows of 2-3), centre offset.
DIAMETER = {"small": 0.28, "large": 0.5, "row": 0.22}
OFFSET = 0.22
_DELTA = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
TRAIN_STREAM, EVAL_STREAM = 0, 1


@dataclass(frozen=True)
class Attributes:
    kind: str
    color: str
    background: str
    size: str
    position: str
    count: int

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1 << 16)
def sample_attributes(seed: int, stream: int, index: int, max_count: int = 1) -> Attributes:
    # Cached (64k entries, ~20 MB): seeding a generator costs ~0.15 ms, most of a 32x32 sample's
    # time; evaluation prompts and datasets of <= 64k samples are drawn again every epoch.
    rng = np.random.default_rng([seed, stream, index])
    color = COLORS[rng.integers(len(COLORS))]
    background = [c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)]
    count = int(rng.integers(1, max_count + 1))
    kind = KINDS[rng.integers(len(KINDS))]
    size = SIZES[rng.integers(len(SIZES))] if count == 1 else "small"
    position = POSITIONS[rng.integers(len(POSITIONS))] if count == 1 else "center"
    return Attributes(kind, color, background, size, position, count)


def caption(a: Attributes, style: str) -> str:
    plural = "s" if a.count > 1 else ""
    where = "in the center" if a.position == "center" else f"on the {a.position}"
    if a.count > 1:
        where = "in a row"
    if style == "short":
        return f"{COUNT_WORDS[a.count]} {a.size} {a.color} {a.kind}{plural} {where}, {a.background} background"
    return (
        f"a simple flat illustration showing {COUNT_WORDS[a.count]} {a.size} solid {a.color} "
        f"{a.kind}{plural} placed {where} of the picture, drawn on a plain {a.background} "
        f"background with no texture, no shading and no other objects"
    )


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # u, v: pixel-centre coordinates in units of the radius, origin at the shape centre.
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":  # side 1.7 r: area 2.9 r^2, close to the circle's 3.1 r^2
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if kind == "triangle":  # apex up at v = -1, base at v = 0.8 with half-width 1
        return (v >= -1.0) & (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape kind {kind!r}")


def shape_centres(a: Attributes, height: int, width: int) -> list[tuple[float, float]]:
    if a.count == 1:
        dx, dy = _DELTA[a.position]
        return [(width / 2 + dx * OFFSET * width, height / 2 + dy * OFFSET * height)]
    return [(width * (i + 1) / (a.count + 1), height / 2) for i in range(a.count)]


@functools.lru_cache(maxsize=16)
def _pixel_centres(height: int, width: int) -> np.ndarray:
    """(2, height, width) float32 pixel-centre coordinates (y, x), built once per size (read-only)."""
    grid = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    grid.setflags(write=False)
    return grid


def render(a: Attributes, height: int, width: int) -> np.ndarray:
    """Render to a uint8 (height, width, 3) array with exact palette colours."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = PALETTE[a.background]
    side = min(height, width)
    radius = DIAMETER["row" if a.count > 1 else a.size] * side / 2
    ys, xs = _pixel_centres(height, width)
    for cx, cy in shape_centres(a, height, width):
        img[_shape_mask(a.kind, (xs - cx) / radius, (ys - cy) / radius)] = PALETTE[a.color]
    return img


class ShapesDataset:
    """Index -> (image, caption, attributes); deterministic for (seed, stream, index)."""

    def __init__(self, resolution: int, captions: str = "short", max_count: int = 1, seed: int = 0,
                 stream: int = TRAIN_STREAM):
        self.resolution, self.captions, self.max_count = resolution, captions, max_count
        self.seed, self.stream = seed, stream

    def attributes(self, index: int) -> Attributes:
        return sample_attributes(self.seed, self.stream, index, self.max_count)

    def caption_style(self, index: int) -> str:
        if self.captions != "mixed":
            return self.captions
        return ("short", "long")[int(np.random.default_rng([self.seed, 7, index]).integers(2))]

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Attributes]:
        a = self.attributes(index)
        return render(a, self.resolution, self.resolution), caption(a, self.caption_style(index)), a
