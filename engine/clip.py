"""CLIP embeddings of images and captions (open_clip, local weights only), and the two metrics
built on them: CLIP score (image-caption agreement) and CMMD (distance between two image sets).

Used by ``kiln data score`` (filtering the training data) and by evaluation
(``sample.clip_weights``: generated held-out images against their prompts and against the real
held-out images), so a run on real captions, which the exact shapes scorer cannot read, still
gets a prompt-adherence number and a distribution distance per evaluation.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from kiln.engine.errors import KilnError

# CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID"): squared MMD with a Gaussian RBF
# kernel of bandwidth 10 between L2-normalised CLIP image embeddings, times 1000; the paper
# chose both constants so that values read like FID's small numbers. Unlike FID it assumes no
# normality and its estimate is unbiased in the sample count, so 64 held-out prompts compare runs.
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


class ClipEmbedder:
    def __init__(self, name: str, weights: str, device: torch.device | str = "cpu"):
        from kiln.model.text_encoder import open_clip_module

        open_clip = open_clip_module()
        if name not in open_clip.list_models():
            raise KilnError(f"CLIP model {name!r} is not an open_clip model (e.g. ViT-B-32, ViT-L-14)")
        if not os.path.isfile(weights):
            raise KilnError(f"CLIP weights {weights!r} is not a file (open_clip checkpoint, local path)")
        self.device = torch.device(device)
        model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.dim = model.visual.output_dim

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        """PIL images, or uint8 (N, H, W, 3) -> unit-norm embeddings (N, dim), fp32 on the CPU."""
        from PIL import Image

        if isinstance(images, np.ndarray):
            images = [Image.fromarray(a) for a in images]
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, captions: list[str]) -> torch.Tensor:
        """Captions -> unit-norm embeddings (N, dim), fp32 on the CPU."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


@functools.lru_cache(maxsize=2)
def cached_embedder(name: str, weights: str, device: str) -> ClipEmbedder:
    """One CLIP model per process and device: evaluation runs every sample.every steps."""
    return ClipEmbedder(name, weights, device)


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(N,) cosine of each image with its own caption, in [-1, 1]."""
    return (image_emb * text_emb).sum(-1)


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """Squared MMD between embedding sets x (m, d) and y (n, d), Gaussian RBF kernel, x scale.

    The unbiased estimator: each set's own pairs leave out the i = j terms (k = 1 there), so two
    samples of one distribution average 0. The paper's released code keeps them, which adds
    scale·(1 - k̄)·(1/m + 1/n): up to 0.6 at 64 images a side (unit vectors: k >= e^-0.02).
    """
    x, y = x.double(), y.double()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise KilnError(f"CMMD needs at least 2 images per set, got {m} and {n}")
    gamma = 1.0 / (2 * sigma**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).square())
    kyy = torch.exp(-gamma * torch.cdist(y, y).square())
    kxy = torch.exp(-gamma * torch.cdist(x, y).square())
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(scale * (within_x + within_y - 2 * kxy.mean()))
