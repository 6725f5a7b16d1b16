"""``kiln data encode DATASET --vae VAE``: precompute latents and text features for training.

For a base ``--resolution``, every sample is center-cropped into its aspect bucket (the loader's
geometry with a center crop and no flip), encoded by the VAE (posterior mean, scaled and shifted
as in training) and its caption by the text encoder. Written to ``DATASET/latents-<res>/``:
    meta.json                  resolution, buckets, VAE and text-encoder identity, sample count
    b<k>.latents.npy           (N_k, C, H/f, W/f) float16, bucket k's samples in metadata order
    b<k>.tokens.npy / .mask.npy / .pooled.npy   text features (float16, bool, float16)
    b<k>.keys.json             their sample keys
The folder is built as ``latents-<res>.tmp`` and renamed when complete. With
``data.latents=true`` the loader reads these instead of decoding images, and training skips the
VAE and the text encoder (dropped captions still use the encoder's "" features). Latents are
~(C·f⁻²)/3 of the pixels at float16: 1/24 for a 4-channel 8x VAE.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kiln.engine.data.buckets import DEFAULT_ASPECTS, cover_and_crop, make_buckets, nearest_bucket
from kiln.engine.data.decode import PillowDecoder
from kiln.engine.data.loader import to_model_range
from kiln.engine.data.shards import Geometry, read_bytes, read_metadata
from kiln.engine.errors import KilnError


def latents_dir(dataset: str | Path, resolution: int) -> Path:
    return Path(dataset) / f"latents-{resolution}"


def text_identity(name: str, weights: str | None, max_length: int) -> dict:
    return {"name": name, "weights": str(weights) if weights else None, "max_length": max_length}


@torch.no_grad()
def encode(dataset: str | Path, vae: str, resolution: int, text_name: str = "kiln-tiny-text",
           text_weights: str | None = None, max_length: int = 77, multiple: int = 16,
           aspects=DEFAULT_ASPECTS, batch_size: int = 16, device: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from kiln.model.text_encoder import build_text_encoder
    from kiln.model.vae import LatentCodec

    root = Path(dataset)
    rows = read_metadata(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec = LatentCodec.load(vae, dev)
    if multiple % codec.factor:
        raise KilnError(f"--multiple {multiple} must be a multiple of the VAE's downsampling {codec.factor}")
    encoder = build_text_encoder("open_clip", text_name, text_weights, max_length).to(dev)
    buckets = make_buckets(resolution, multiple, aspects)
    members: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(nearest_bucket(r["height"], r["width"], buckets), []).append(i)
    out, tmp = latents_dir(root, resolution), latents_dir(root, resolution).with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decoder = PillowDecoder(torch.device("cpu"))
    bar = tqdm(total=len(rows), desc="encode", unit="img", disable=not progress)
    for k, ids in sorted(members.items()):
        bucket = buckets[k]
        parts: dict[str, list[np.ndarray]] = {"latents": [], "tokens": [], "mask": [], "pooled": []}
        for start in range(0, len(ids), batch_size):
            chunk = [rows[i] for i in ids[start : start + batch_size]]
            geos = [Geometry(*cover_and_crop(r["height"], r["width"], bucket, 0.5, 0.5), False, r["height"],
                             r["width"]) for r in chunk]
            images = decoder([read_bytes(root, r) for r in chunk], geos, bucket)
            z = codec.encode(to_model_range(images.to(dev)))
            text = encoder.encode([r["caption"] for r in chunk])
            parts["latents"].append(z.half().cpu().numpy())
            parts["tokens"].append(text.tokens.half().cpu().numpy())
            parts["mask"].append(text.mask.cpu().numpy())
            parts["pooled"].append(text.pooled.half().cpu().numpy())
            bar.update(len(chunk))
        for name, arrays in parts.items():
            np.save(tmp / f"b{k}.{name}.npy", np.concatenate(arrays))
        (tmp / f"b{k}.keys.json").write_text(json.dumps([rows[i]["key"] for i in ids]))
    bar.close()
    meta = {"resolution": resolution, "multiple": multiple, "buckets": buckets, "aspects": list(aspects),
            "samples": len(rows), "per_bucket": {str(k): len(v) for k, v in sorted(members.items())},
            "vae": {"path": str(vae), "channels": codec.channels, "factor": codec.factor, "scale": codec.scale,
                    "shift": codec.shift},
            "text": text_identity(text_name, text_weights, max_length)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta
