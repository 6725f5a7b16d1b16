"""Loader of prepared shards (``kiln data prepare``): buckets, filters, exact resume, DALI decode.

Order. The metadata (metadata.jsonl) is filtered (data.min_side, aspect range, min CLIP and
aesthetic scores) and every sample is put in its nearest aspect bucket. Epoch e's plan is drawn
from (seed, e): each bucket's samples are permuted and cut into global batches (a bucket's last
partial batch waits for the next epoch's permutation: no sample repeats within an epoch), then
the batches of all buckets are shuffled together, so buckets are drawn in proportion to their
data. The position is (epoch, batch): :meth:`state_dict` goes into checkpoints and a resumed run
sees exactly the batches of the uninterrupted one. Per-sample crop position and flip are drawn
from (seed, epoch, sample), so they resume exactly too.

Sharding. Data-parallel rank r takes items r, r + world, ... of each global batch; within a rank,
reader worker w reads items w, w + workers, ... of that share (byte ranges of the tars, by
offset, in a thread pool). No sample is read twice within an epoch across ranks x workers.

Decoding (decode.py). NVIDIA DALI decodes each crop's region, on the GPU (``mixed``) when CUDA
is present and on the CPU otherwise, then it is resized into the bucket and optionally flipped.
``data.decoder = "pillow"`` does the same with Pillow (the benchmark baseline, and the path when
DALI is not installed). With ``data.prefetch`` the next batch is read and decoded on a background
thread while the caller trains on the current one.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.engine.data.buckets import cover_and_crop, make_buckets, nearest_bucket
from kiln.engine.data.loader import Batch
from kiln.engine.errors import KilnError


@dataclass(frozen=True)
class Geometry:
    """Where one sample goes: resized to cover the bucket as (rh, rw), cropped at (top, left),
    optionally flipped. Decoders take the same crop as a region of the source image (``roi``),
    decode only that region and resize it straight to the bucket: same pixels, less work."""

    rh: int
    rw: int
    top: int
    left: int
    flip: bool
    src_h: int
    src_w: int

    def roi(self, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
        """(top, left, height, width) of the crop in source pixels."""
        sy, sx = self.src_h / self.rh, self.src_w / self.rw
        return self.top * sy, self.left * sx, bucket[0] * sy, bucket[1] * sx


def read_metadata(root: str | Path) -> list[dict]:
    path = Path(root) / "metadata.jsonl"
    if not path.is_file():
        raise KilnError(f"{root} is not a prepared dataset: {path.name} missing (run `kiln data prepare SRC {root}`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_bytes(root: Path, row: dict) -> bytes:
    """The encoded image of metadata ``row``: one positioned read of its tar shard."""
    with open(Path(root) / "shards" / row["shard"], "rb") as f:
        return os.pread(f.fileno(), row["size"], row["offset"])


def micro_conditioning(rows: list[dict], geos: list[Geometry], bucket: tuple[int, int]) -> torch.Tensor:
    """(B, 6): original height, width, crop top, left (in resized pixels), target height, width."""
    return torch.tensor([[r["height"], r["width"], g.top, g.left, *bucket] for r, g in zip(rows, geos, strict=True)],
                        dtype=torch.float32)


def filter_reasons(row: dict, cfg) -> str | None:
    """Why ``row`` is filtered out by the data config (None = kept)."""
    if row.get("split") == "heldout":  # prepare --heldout: evaluation only
        return "heldout"
    w, h = row["width"], row["height"]
    if min(w, h) < cfg.min_side:
        return "min_side"
    if cfg.max_aspect and not (1 / cfg.max_aspect <= w / h <= cfg.max_aspect):
        return "aspect"
    if cfg.min_clip_score is not None and row.get("clip_score", -1e9) < cfg.min_clip_score:
        return "clip_score"
    if cfg.min_aesthetic is not None and row.get("aesthetic", -1e9) < cfg.min_aesthetic:
        return "aesthetic"
    return None


class ShardsLoader:
    """Bucketed, deterministic, resumable batches from prepared shards (see the module doc)."""

    def __init__(self, cfg, batch_size: int, rank: int = 0, world_size: int = 1, multiple: int = 16,
                 device: torch.device | None = None):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} not divisible by {world_size} ranks")
        self.cfg, self.batch_size, self.rank, self.world = cfg, batch_size, rank, world_size
        self.root = Path(cfg.path)
        rows = read_metadata(self.root)
        self.filtered: dict[str, int] = {}
        self.rows = []
        for r in rows:
            why = filter_reasons(r, cfg)
            if why:
                self.filtered[why] = self.filtered.get(why, 0) + 1
            else:
                self.rows.append(r)
        self.encoded = _Encoded(self.root, cfg.resolution) if cfg.latents else None
        if self.encoded is not None:  # buckets were fixed when the latents were encoded
            self.buckets = self.encoded.buckets
            self.rows = [r for r in self.rows if r["key"] in self.encoded.where]
            self.bucket_of = np.array([self.encoded.where[r["key"]][0] for r in self.rows])
        else:
            aspects = cfg.aspect_ratios if cfg.buckets else (1.0,)
            self.buckets = make_buckets(cfg.resolution, multiple, aspects)
            self.bucket_of = np.array([nearest_bucket(r["height"], r["width"], self.buckets) for r in self.rows])
        self.device = device or torch.device("cpu")
        self.epoch, self.pos = 0, 0
        self._plan = self._make_plan(0)
        self._pool = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="kiln-read")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kiln-prefetch")
        self._ahead = None  # ((epoch, pos), Future[Batch]) of the batch after the last one returned
        self._decoder = None

    # ---- order -------------------------------------------------------------------------------
    def _make_plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, 101, epoch])
        plan = []
        for b in range(len(self.buckets)):
            ids = rng.permutation(np.flatnonzero(self.bucket_of == b))
            plan += [ids[i : i + self.batch_size] for i in range(0, len(ids) - self.batch_size + 1, self.batch_size)]
        if not plan:
            sizes = np.bincount(self.bucket_of, minlength=len(self.buckets)).tolist()
            raise KilnError(f"{self.root}: no aspect bucket holds a full batch of {self.batch_size} "
                            f"({len(self.rows)} samples after filters {self.filtered}; per bucket {sizes})")
        order = rng.permutation(len(plan))
        return [plan[i] for i in order]

    def _peek(self) -> tuple[int, np.ndarray]:
        """(epoch, global ids) of the next batch, without moving the position."""
        return self.epoch, self._plan[self.pos]

    def _advance(self) -> tuple[int, np.ndarray]:
        """(epoch, global ids) of the next batch; moves the position on."""
        epoch, ids = self.epoch, self._plan[self.pos]
        self.pos += 1
        if self.pos == len(self._plan):
            self.epoch, self.pos = self.epoch + 1, 0
            self._plan = self._make_plan(self.epoch)
        return epoch, ids

    def next_shape(self) -> tuple[int, int]:
        """(H, W) of the next batch (its bucket)."""
        return self.buckets[self.bucket_of[self._plan[self.pos][0]]]

    def next_indices(self) -> list[int]:
        """This rank's sample ids of the next global batch."""
        self._drop_ahead()
        return self._advance()[1][self.rank :: self.world].tolist()

    def worker_split(self, ids: list[int]) -> list[list[int]]:
        """The ids each reader worker reads (worker w takes items w, w + workers, ...)."""
        n = max(1, self.cfg.workers)
        return [ids[w::n] for w in range(n)]

    def geometry(self, sample: int, bucket: tuple[int, int], epoch: int) -> Geometry:
        row = self.rows[sample]
        rng = np.random.default_rng([self.cfg.seed, 202, epoch, sample])
        u, v = (rng.random(), rng.random()) if self.cfg.random_crop else (0.5, 0.5)
        flip = bool(self.cfg.flip and rng.random() < 0.5)
        return Geometry(*cover_and_crop(row["height"], row["width"], bucket, u, v), flip, row["height"], row["width"])

    # ---- reading and decoding ----------------------------------------------------------------
    def _read(self, ids: list[int]) -> list[bytes]:
        def read_part(part: list[int]) -> list[bytes]:
            return [read_bytes(self.root, self.rows[i]) for i in part]

        parts = self.worker_split(ids)
        got = list(self._pool.map(read_part, parts))
        data = [b""] * len(ids)
        for w, part in enumerate(got):  # undo the interleaving
            data[w :: len(parts)] = part
        return data

    def decoder(self):
        if self._decoder is None:
            from kiln.engine.data.decode import make_decoder

            self._decoder = make_decoder(self.cfg.decoder, self.batch_size // self.world, self.cfg.decode_threads,
                                         self.device, flip=self.cfg.flip)
        return self._decoder

    def next_batch(self) -> Batch:
        """This rank's next batch. The batch after it is read and decoded in the background while
        the caller trains on this one (one batch ahead; the position saved is the caller's)."""
        key = (self.epoch, self.pos)
        ahead = self._ahead
        self._drop_ahead()  # waits for it: the decoder is never used by two threads at once
        bucket = self.next_shape()
        epoch, ids = self._advance()
        batch = ahead[1].result() if ahead is not None and ahead[0] == key else self._produce(epoch, ids, bucket)
        if self.cfg.prefetch:
            nxt = (self.epoch, self.pos)
            self._ahead = (nxt, self._prefetcher.submit(self._produce, *self._peek(), self.next_shape()))
        return batch

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].result()  # let it finish: the decoder is not shared across threads
            self._ahead = None

    def _produce(self, epoch: int, ids: np.ndarray, bucket: tuple[int, int]) -> Batch:
        ids = ids[self.rank :: self.world].tolist()
        if self.encoded is not None:
            return self.encoded.batch([self.rows[i] for i in ids], bucket)
        geos = [self.geometry(i, bucket, epoch) for i in ids]
        images = self.decoder()(self._read(ids), geos, bucket)  # (B, 3, H, W) uint8
        rows = [self.rows[i] for i in ids]
        return Batch(images, [r["caption"] for r in rows], [None] * len(rows), micro_conditioning(rows, geos, bucket))

    def _signature(self) -> list:
        return [self.batch_size, self.cfg.resolution, len(self.rows)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.pos, "plan": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self.epoch, self.pos = int(state["epoch"]), int(state["offset"])
        if state.get("plan", self._signature()) != self._signature():
            # batch size, resolution or filters changed (a new stage): the old plan's position means
            # nothing in the new one, so move on to a fresh epoch rather than repeat or skip samples
            self.epoch, self.pos = self.epoch + 1, 0
        self._plan = self._make_plan(self.epoch)
        if self.pos >= len(self._plan):
            raise KilnError(f"data position {self.pos} is past the {len(self._plan)} batches of epoch {self.epoch}: "
                            "the checkpoint was written for another dataset, filter or batch size")


def first_samples(cfg, n: int) -> Batch:
    """n evaluation samples, center-cropped to the square cfg.resolution: the held-out split
    (``kiln data prepare --heldout N``) when there is one, else the first n samples."""
    from kiln.engine.data.decode import PillowDecoder

    rows = read_metadata(cfg.path)
    held = [r for r in rows if r.get("split") == "heldout"]
    rows = (held or rows)[:n]
    bucket = (cfg.resolution, cfg.resolution)
    geos = [Geometry(*cover_and_crop(r["height"], r["width"], bucket, 0.5, 0.5), False, r["height"], r["width"])
            for r in rows]
    images = PillowDecoder(torch.device("cpu"))([read_bytes(cfg.path, r) for r in rows], geos, bucket)
    return Batch(images, [r["caption"] for r in rows], [None] * len(rows), micro_conditioning(rows, geos, bucket))


class _Encoded:
    """Latents and text features written by `kiln data encode` for one resolution (memory-mapped)."""

    def __init__(self, root: Path, resolution: int):
        from kiln.engine.data.encode import latents_dir

        folder = latents_dir(root, resolution)
        if not (folder / "meta.json").is_file():
            raise KilnError(f"data.latents=true but {folder} does not exist: run "
                            f"`kiln data encode {root} --vae VAE --resolution {resolution}`")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.buckets = [tuple(b) for b in self.meta["buckets"]]
        self.where: dict[str, tuple[int, int]] = {}  # key -> (bucket, row in the bucket's arrays)
        self.arrays: dict[int, dict[str, np.ndarray]] = {}
        for k in map(int, self.meta["per_bucket"]):
            keys = json.loads((folder / f"b{k}.keys.json").read_text())
            self.where.update({key: (k, j) for j, key in enumerate(keys)})
            self.arrays[k] = {n: np.load(folder / f"b{k}.{n}.npy", mmap_mode="r")
                              for n in ("latents", "tokens", "mask", "pooled")}

    def batch(self, rows: list[dict], bucket: tuple[int, int]) -> Batch:
        from kiln.model.text_encoder import TextBatch

        k = self.buckets.index(bucket)
        idx = [self.where[r["key"]][1] for r in rows]
        a = self.arrays[k]
        take = {n: torch.from_numpy(np.ascontiguousarray(a[n][idx])) for n in a}
        geos = [Geometry(*cover_and_crop(r["height"], r["width"], bucket, 0.5, 0.5), False, r["height"], r["width"])
                for r in rows]
        text = TextBatch(take["tokens"].float(), take["pooled"].float(), take["mask"])
        return Batch(None, [r["caption"] for r in rows], [None] * len(rows), micro_conditioning(rows, geos, bucket),
                     latents=take["latents"].float(), text=text)
