"""Frozen text encoders. Interface: ``encode(captions) -> TextBatch`` plus ``width``/``pooled_dim``.

:class:`OpenCLIPTextEncoder` wraps the text tower of any open_clip model by name (``ViT-B-32``,
``ViT-L-14``, ... or kiln's own CPU-sized ``kiln-tiny-text``: width 192, 3 layers, ~5 ms per 8
captions on 2 CPU cores against ~0.5 s for ViT-B-32). Weights come from a local file; without
one the tower is randomly initialised and says so once: a random frozen tower still maps
different captions to different, deterministic features, which is enough to learn from.

Per-token states are the final-LayerNorm outputs of the (causal) text transformer; the pooled
vector is CLIP's projected end-of-text feature. Because the attention is causal, running only
the first ``max_length`` positions gives exactly the states a full 77-token pass would give.
A frozen encoder is a pure function of the caption, so results are cached per caption (LRU):
the built-in dataset's caption set is finite and each caption is encoded once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kiln.engine.errors import KilnError

log = logging.getLogger("kiln")
_CONFIG_DIR = Path(__file__).parent / "configs"
_warned: set[str] = set()


@functools.cache
def open_clip_module():
    """open_clip with kiln's model configs registered, imported on first use: ``kiln.model`` and
    the kernels import without it (a stack that embeds the MMDiT or the ops brings its own text
    encoder; the GPU machine's image has no open_clip)."""
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)  # kiln-tiny-text
    return open_clip


@dataclass
class TextBatch:
    tokens: torch.Tensor  # (B, L, width) per-token states
    pooled: torch.Tensor  # (B, pooled_dim)
    mask: torch.Tensor  # (B, L) bool, True = real token (start, words, end-of-text)


class OpenCLIPTextEncoder(nn.Module):
    def __init__(self, name: str, weights: str | None = None, max_length: int = 77, cache_size: int = 8192):
        super().__init__()
        open_clip = open_clip_module()
        if name not in open_clip.list_models():
            raise KilnError(f"text.name: {name!r} is not an open_clip model (e.g. kiln-tiny-text, ViT-B-32, ViT-L-14)")
        if weights is not None and not os.path.isfile(weights):
            raise KilnError(f"text.weights: file {weights!r} does not exist")
        if weights is None and name not in _warned:
            _warned.add(name)
            log.warning("text encoder %s: no weights file given (text.weights); using random init", name)
        logging.disable(logging.WARNING)  # open_clip repeats the random-init warning on every build
        try:
            clip = open_clip.create_model(name, pretrained=weights, pretrained_text=False)
        finally:
            logging.disable(logging.NOTSET)
        if not hasattr(clip, "token_embedding"):
            raise KilnError(f"text.name: {name!r} has a custom (HF) text tower, not supported yet")
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.transformer, self.ln_final = clip.transformer, clip.ln_final
        self.text_projection, self.pool_type = clip.text_projection, clip.text_pool_type
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.max_length = min(max_length, self.positional_embedding.shape[0])
        self.width = self.token_embedding.weight.shape[1]
        proj = self.text_projection
        self.pooled_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.requires_grad_(False).eval()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size
        # Batch-invariant mode: encode uncached captions in fixed chunks of 32 (padded with ""),
        # so a caption's features never depend on how many others missed the cache with it.
        # On CUDA, cuBLAS picks kernels by shape and a different batch size changed the 7th
        # digit of a resumed run's loss; deterministic runs turn this on.
        self.batch_invariant = False
        self.sharded = False  # set when FSDP shards the weights (parallel.shard_text_encoder)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def _run(self, captions: list[str]):
        ids = self.tokenizer(captions)[:, : self.max_length].to(self.positional_embedding.device)  # (B, L)
        return self(ids)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor):
        """ids (B, L) -> states (B, L, width), pooled (B, pooled_dim), valid (B, L). A forward (not
        a helper) so that FSDP's hooks gather a sharded encoder's weights around it."""
        dev = ids.device
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        mask = self.attn_mask[:L, :L] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))  # (B, L, width)
        eot = ids.argmax(dim=-1)  # end-of-text has the largest id in CLIP's vocabulary
        pooled = x[torch.arange(ids.shape[0], device=dev), eot]
        proj = self.text_projection
        pooled = pooled @ proj if isinstance(proj, torch.Tensor) else proj(pooled)
        valid = torch.arange(L, device=dev)[None, :] <= eot[:, None]  # start .. end-of-text
        return x.float(), pooled.float(), valid

    def encode(self, captions: list[str]) -> TextBatch:
        """Encode captions to per-token states, pooled vector and mask (cached per caption).

        A sharded encoder (``sharded`` = True, FSDP over the data-parallel ranks) skips the cache:
        its forward is a collective, so every rank must run the same number of forwards per call
        whatever it happens to have cached.
        """
        if self.sharded:
            chunk = 32 if self.batch_invariant else max(1, len(captions))
            parts = [captions[i : i + chunk] for i in range(0, len(captions), chunk)]
            outs = [self._run(p + [""] * (chunk - len(p))) for p in parts]
            x, pooled, valid = (torch.cat(col)[: len(captions)] for col in zip(*outs, strict=True))
            return TextBatch(x, pooled, valid)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        chunk = 32 if self.batch_invariant else max(1, len(missing))
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            x, pooled, valid = self._run(part + [""] * (chunk - len(part)))
            for i, cap in enumerate(part):
                self._cache[cap] = (x[i], pooled[i], valid[i])
        rows = [self._cache[c] for c in captions]
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return TextBatch(*(torch.stack(col) for col in zip(*rows, strict=True)))

    def to(self, *args, **kwargs):
        self._cache.clear()  # cached tensors live on the old device
        return super().to(*args, **kwargs)


def build_text_encoder(family: str, name: str, weights: str | None, max_length: int) -> OpenCLIPTextEncoder:
    """The pluggable entry point: ``family`` picks the implementation (only open_clip so far)."""
    if family != "open_clip":
        raise KilnError(f"text.family: {family!r} is not one of: open_clip")
    return OpenCLIPTextEncoder(name, weights, max_length)


class FixedTexts:
    """Stand-in encoder holding the features of a fixed caption set, computed beforehand by all
    ranks together (a sharded encoder cannot run on rank 0 alone during evaluation)."""

    def __init__(self, encoder: OpenCLIPTextEncoder, captions: list[str]):
        unique = list(dict.fromkeys(captions))
        feats = encoder.encode(unique)
        self.rows = {c: (feats.tokens[i], feats.pooled[i], feats.mask[i]) for i, c in enumerate(unique)}

    def encode(self, captions: list[str]) -> TextBatch:
        return TextBatch(*(torch.stack(col) for col in zip(*(self.rows[c] for c in captions), strict=True)))
