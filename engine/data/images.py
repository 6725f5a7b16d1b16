"""Turning one real-world image file into a clean RGB sample, or a counted reason to skip it.

Handled (each seen in the wild): progressive and CMYK JPEG, grayscale, palette and alpha PNGs
(composited on white, as a viewer shows them), 16-bit PNG (scaled to 8 bits), WebP, EXIF
orientation (applied, so the pixels are upright), huge images (downscaled so the long side is at
most ``max_side``), truncated files and non-images (skipped). A JPEG that needs none of these
fixes keeps its original bytes (no generation loss); anything else is re-encoded as JPEG q=95,
the format DALI decodes on the GPU.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses > ~179 MP as a "decompression bomb"; allow up to 500 MP (a 22k x 22k scan) and
# downscale, and call anything larger a skip with its own reason.
MAX_PIXELS = 500_000_000
EXIF_ORIENTATION = 0x0112


class SkipSample(Exception):
    """A file that cannot become a sample; ``reason`` is the counted key in prepare_report.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class CleanImage:
    data: bytes  # JPEG bytes
    width: int
    height: int
    source_width: int  # as stored in the source file, before orientation and downscaling
    source_height: int
    reencoded: bool


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, CMYK (Pillow inverts Adobe CMYK correctly), YCbCr, 1, F, ...


def clean_image(raw: bytes, max_side: int = 4096, min_side: int = 8) -> CleanImage:
    """Decode, fix and (if needed) re-encode ``raw``; raises :class:`SkipSample` with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError as e:
            raise SkipSample("not_an_image", str(e)) from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SkipSample("too_large", str(e)) from e
        except (OSError, SyntaxError, ValueError) as e:  # header cut short ("Truncated File Read")
            raise SkipSample("truncated", str(e)) from e
        src_w, src_h = img.size
        if src_w * src_h > MAX_PIXELS:
            raise SkipSample("too_large", f"{src_w}x{src_h}")
        fmt = img.format
        if fmt == "JPEG":
            img.draft("RGB", (max_side, max_side))  # huge JPEGs: decode at 1/2..1/8 scale directly
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken chunks
            raise SkipSample("truncated", str(e)) from e
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    img = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
    if min(img.size) < min_side:
        raise SkipSample("too_small", f"{img.size[0]}x{img.size[1]} < {min_side} px")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    keep = fmt == "JPEG" and img.mode == "RGB" and orientation in (None, 1) and img.size == (src_w, src_h)
    if keep:
        return CleanImage(raw, src_w, src_h, src_w, src_h, reencoded=False)
    rgb = _to_rgb(img)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    return CleanImage(buf.getvalue(), rgb.size[0], rgb.size[1], src_w, src_h, reencoded=True)
