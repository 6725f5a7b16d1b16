"""Deterministic, resumable batches of the built-in shapes set.

Order: each epoch is a permutation of ``num_samples`` indices drawn from (seed, epoch); a batch
takes the next ``batch_size`` of them. Data-parallel ranks take interleaved slices of every
global batch, so ranks never share a sample. The whole position is (epoch, offset):
:meth:`state_dict` goes into every checkpoint, so a resumed run sees exactly the samples the
uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.engine.config import DataConfig
from kiln.engine.data.shapes import EVAL_STREAM, Attributes, ShapesDataset


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, 3, H, W) uint8; None when latents were precomputed
    captions: list[str]
    attributes: list[Attributes | None]
    micro: torch.Tensor  # (B, 6) float: orig_h, orig_w, crop_top, crop_left, target_h, target_w
    latents: torch.Tensor | None = None  # (B, C, h, w) from `kiln data encode` (data.latents=true)
    text: object | None = None  # TextBatch of the captions, precomputed with the latents


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def collate(items: list[tuple[np.ndarray, str, Attributes]]) -> Batch:
    images = torch.from_numpy(np.stack([it[0] for it in items])).permute(0, 3, 1, 2).contiguous()
    H, W = images.shape[-2:]
    # Rendered directly at the target size: original = target, no crop.
    micro = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32).expand(len(items), 6)
    return Batch(images, [it[1] for it in items], [it[2] for it in items], micro.contiguous())


class ShapesLoader:
    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} not divisible by {world_size} ranks")
        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world_size
        self.dataset = ShapesDataset(cfg.resolution, cfg.captions, cfg.max_count, cfg.seed)
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, 99, epoch]).permutation(self.cfg.num_samples)

    def next_shape(self) -> tuple[int, int]:
        """(H, W) of the next batch: always the square resolution."""
        return self.cfg.resolution, self.cfg.resolution

    def next_indices(self) -> list[int]:
        """Global indices of the next batch; this rank's share is every world-th one."""
        out = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.cfg.num_samples - self.offset)
            out.extend(self._perm[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == self.cfg.num_samples:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out[self.rank :: self.world]

    def next_batch(self) -> Batch:
        return collate([self.dataset[i] for i in self.next_indices()])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


def eval_prompts(cfg: DataConfig, n: int) -> Batch:
    """The fixed evaluation prompts and images at the square ``cfg.resolution``.

    Shapes set: indices of the eval stream, never drawn in training. Prepared shards: the held-out
    split of ``kiln data prepare --heldout N`` (never trained on), else the first n samples (then
    also training samples), center-cropped, with no attributes, so no adherence score.
    """
    if cfg.source == "shards":
        from kiln.engine.data.shards import first_samples

        return first_samples(cfg, n)
    ds = ShapesDataset(cfg.resolution, cfg.captions, cfg.max_count, cfg.seed, stream=EVAL_STREAM)
    return collate([ds[i] for i in range(n)])
