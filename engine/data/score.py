"""``kiln data score OUT``: CLIP image-text similarity and an aesthetic score per sample.

clip_score = cosine(image embedding, caption embedding) of an open_clip model (in [-1, 1]; LAION
filtered its 5B set at 0.28 with ViT-B/32); aesthetic = a linear head on the L2-normalised image
embedding (the LAION aesthetic predictor v1 format: a state dict with ``weight`` (1, D) and
``bias`` (1,), D the CLIP embedding size). Weights come from local files only. The scores are
written into metadata.jsonl (atomically) and summarised in scores.json; the loader filters on
them with data.min_clip_score and data.min_aesthetic.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from kiln.engine.data.shards import read_bytes, read_metadata
from kiln.engine.errors import KilnError


def load_aesthetic_head(path: str, dim: int) -> torch.nn.Linear:
    if not os.path.isfile(path):
        raise KilnError(f"aesthetic head weights {path!r} is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (1, dim):
        shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else type(state).__name__
        raise KilnError(f"{path}: an aesthetic head is a linear layer's state dict {{weight: (1, {dim}), bias: (1,)}}, "
                        f"got {shapes}")
    head = torch.nn.Linear(dim, 1)
    head.load_state_dict(state)
    return head.eval()


def _stats(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p10": float(np.percentile(a, 10)), "p50": float(np.median(a)),
            "p90": float(np.percentile(a, 90))}


@torch.no_grad()
def score(dataset: str | Path, model: str, weights: str, aesthetic: str, batch_size: int = 64,
          device: str | None = None, progress: bool = True) -> dict:
    from PIL import Image
    from tqdm import tqdm

    from kiln.engine.clip import ClipEmbedder, clip_scores

    root = Path(dataset)
    rows = read_metadata(root)
    clip = ClipEmbedder(model, weights, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    head = load_aesthetic_head(aesthetic, clip.dim)
    for start in tqdm(range(0, len(rows), batch_size), desc="score", unit="batch", disable=not progress):
        chunk = rows[start : start + batch_size]
        img = clip.images([Image.open(io.BytesIO(read_bytes(root, r))) for r in chunk])
        sims, aes = clip_scores(img, clip.texts([r["caption"] for r in chunk])).tolist(), head(img).squeeze(-1).tolist()
        for r, s, a in zip(chunk, sims, aes, strict=True):
            r["clip_score"], r["aesthetic"] = round(s, 5), round(a, 5)
    tmp = root / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, root / "metadata.jsonl")
    summary = {"model": model, "weights": str(weights), "aesthetic_weights": str(aesthetic), "samples": len(rows),
               "clip_score": _stats([r["clip_score"] for r in rows]),
               "aesthetic": _stats([r["aesthetic"] for r in rows])}
    (root / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
