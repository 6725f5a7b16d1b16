"""Weighted mixes of prepared datasets, for multi-stage training with replay of earlier data.

A stage lists its datasets and weights (``stages[i].data`` / ``stages[i].weights``; none = the
single ``data.path``). Each dataset keeps its own bucketed, resumable order (a ShardsLoader);
batch n of the run comes from the dataset drawn with the stage's weights from (seed, n), so the
mix is exact on resume too. A dataset used by an earlier stage continues where it stopped when a
later stage replays it, rather than starting over; when the batch size or resolution changed, it
moves on to a fresh epoch (its old plan no longer describes the batches).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kiln.engine.data.loader import Batch
from kiln.engine.data.shards import ShardsLoader


class MixLoader:
    def __init__(self, cfg, paths: list[str], weights: list[float], batch_size: int, rank: int = 0,
                 world_size: int = 1, multiple: int = 16, device: torch.device | None = None):
        self.cfg, self.paths = cfg, list(paths)
        w = np.asarray(weights if weights else [1.0] * len(paths), dtype=np.float64)
        self.weights = w / w.sum()
        self.sources = [ShardsLoader(dataclasses.replace(cfg, path=p), batch_size, rank, world_size, multiple, device)
                        for p in self.paths]
        self.drawn = 0  # batches taken so far in the run (all stages)
        self._choice = self._draw(self.drawn)

    def _draw(self, n: int) -> int:
        if len(self.sources) == 1:
            return 0
        return int(np.random.default_rng([self.cfg.seed, 303, n]).choice(len(self.sources), p=self.weights))

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return self.sources[0].buckets

    def next_shape(self) -> tuple[int, int]:
        return self.sources[self._choice].next_shape()

    def _advance_source(self) -> ShardsLoader:
        src = self.sources[self._choice]
        self.drawn += 1
        self._choice = self._draw(self.drawn)
        return src

    def next_indices(self) -> list[int]:
        return self._advance_source().next_indices()

    def next_batch(self) -> Batch:
        return self._advance_source().next_batch()

    def state_dict(self) -> dict:
        sources = {p: s.state_dict() for p, s in zip(self.paths, self.sources, strict=True)}
        return {"drawn": self.drawn, "sources": sources}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])
        self._choice = self._draw(self.drawn)
        for path, src in zip(self.paths, self.sources, strict=True):
            if path in state["sources"]:
                src.load_state_dict(state["sources"][path])
