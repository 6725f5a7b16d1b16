"""Data-loading benchmark: images/s of the DALI loader vs a Pillow + torch DataLoader baseline.

    kiln data bench DATASET [--batches 40] [--batch-size 32] [--resolution 256] [--threads N]
                    [--out F.jsonl]

Both read the same prepared shards (byte ranges by offset), in the same bucketed order, with the
same resize-to-cover + random crop geometry, on ``--threads`` CPU cores: DALI with that many
decode threads (and as many reader threads), the baseline with that many DataLoader worker
processes each decoding whole batches with Pillow (the usual PyTorch recipe). Timed: throughput
from the end of batch ``--warmup`` to the last of ``--warmup + --batches``. Per-stage times (ms
per batch, DALI loader): read (tar byte ranges), decode (a decode-only DALI pipeline), resize +
crop (the rest of a loader batch), host-to-device (with CUDA), VAE encode (with ``--vae``).
With CUDA a "dali-gpu" row adds the GPU decode (nvJPEG) throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from kiln.benchmarks.common import append_rows, print_table, provenance
from kiln.engine.config import DataConfig


def _loader(cfg: DataConfig, batch: int, device: torch.device | None = None):
    from kiln.engine.data.shards import ShardsLoader

    return ShardsLoader(cfg, batch, device=device)


class _PlanDataset(torch.utils.data.Dataset):
    """Batch i of the loader's plan, decoded with Pillow (one DataLoader item = one batch)."""

    def __init__(self, cfg: DataConfig, batch: int, n: int):
        from kiln.engine.data.decode import PillowDecoder

        loader = _loader(cfg, batch)
        self.jobs = []
        for _ in range(n):
            bucket, (epoch, ids) = loader.next_shape(), loader._advance()
            ids = ids.tolist()
            self.jobs.append((bucket, [loader.rows[i] for i in ids], [loader.geometry(i, bucket, epoch) for i in ids]))
        self.root, self.decode = loader.root, PillowDecoder(torch.device("cpu"))

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        from kiln.engine.data.shards import read_bytes

        bucket, rows, geos = self.jobs[i]
        return self.decode([read_bytes(self.root, r) for r in rows], geos, bucket)


def _median_rate(times: list[float], batch: int) -> tuple[float, float]:
    med = statistics.median(times)
    return batch / med, med * 1e3


def _steady_rate(stamps: list[float], warmup: int, batch: int) -> tuple[float, float]:
    """Images/s and ms/batch from batch ``warmup`` to the last: a pipeline's throughput, which
    per-batch gaps misstate when two workers deliver in bursts."""
    span, n = stamps[-1] - stamps[warmup], len(stamps) - 1 - warmup
    return batch * n / span, span / n * 1e3


def bench_dali(cfg: DataConfig, batch: int, batches: int, warmup: int) -> dict:
    loader = _loader(cfg, batch)
    times, reads = [], []
    for i in range(warmup + batches):
        t0 = time.perf_counter()
        loader.next_batch()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    for _ in range(batches):  # read stage alone, on the batches that follow
        ids = loader.next_indices()
        t0 = time.perf_counter()
        loader._read(ids)
        reads.append(time.perf_counter() - t0)
    rate, ms = _median_rate(times, batch)
    return {"img_per_s": rate, "ms_per_batch": ms, "read_ms": statistics.median(reads) * 1e3}


def bench_decode_only(cfg: DataConfig, batch: int, batches: int) -> float:
    """ms per batch of a DALI pipeline that only decodes (no resize/crop)."""
    from nvidia.dali import fn, pipeline, types

    loader = _loader(cfg, batch)
    pipe = pipeline.Pipeline(batch_size=batch, num_threads=cfg.decode_threads, device_id=None,
                             exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    with pipe:
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        pipe.set_outputs(fn.decoders.image(enc, device="cpu", output_type=types.RGB))
    pipe.build()
    import numpy as np

    times = []
    for _ in range(batches + 2):
        data = loader._read(loader.next_indices())
        t0 = time.perf_counter()
        pipe.feed_input("enc", [np.frombuffer(b, dtype=np.uint8) for b in data])
        pipe.run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def bench_baseline(cfg: DataConfig, batch: int, batches: int, warmup: int, workers: int) -> dict:
    ds = _PlanDataset(cfg, batch, warmup + batches)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                     persistent_workers=False)
    t_start, stamps = time.perf_counter(), []
    for _ in dl:
        stamps.append(time.perf_counter())
    rate, ms = _steady_rate(stamps, warmup, batch)
    return {"img_per_s": rate, "ms_per_batch": ms, "startup_s": stamps[warmup] - t_start}


def bench_dali_steady(cfg: DataConfig, batch: int, batches: int, warmup: int,
                      device: torch.device | None = None) -> dict:
    """Same throughput measure as the baseline, for a like-for-like ratio (GPU decode with CUDA)."""
    loader = _loader(cfg, batch, device)
    stamps = []
    for _ in range(warmup + batches):
        out = loader.next_batch().images
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        stamps.append(time.perf_counter())
    rate, ms = _steady_rate(stamps, warmup, batch)
    return {"img_per_s": rate, "ms_per_batch": ms}


def _median_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up (allocations, cuDNN/oneDNN plans)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_h2d_and_vae(cfg: DataConfig, batch: int, vae: str | None, dev: torch.device) -> dict:
    """ms per batch to copy the uint8 batch to the GPU, and to VAE-encode it (``--vae``)."""
    images = _loader(cfg, batch).next_batch().images
    out = {"h2d_ms": None, "vae_ms": None}
    if dev.type == "cuda":
        def copy():
            images.to(dev, non_blocking=False)
            torch.cuda.synchronize(dev)
        out["h2d_ms"] = _median_ms(copy)
    if vae:
        from kiln.engine.data.loader import to_model_range
        from kiln.model.vae import LatentCodec

        codec, x = LatentCodec.load(vae, dev), to_model_range(images.to(dev))

        def enc():
            codec.encode(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        out["vae_ms"] = _median_ms(enc, reps=3)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="kiln data bench", description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU cores for each loader")
    p.add_argument("--vae", help="also time encoding a batch with this AutoencoderKL folder")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cfg = DataConfig(source="shards", path=args.dataset, resolution=args.resolution, decoder="dali",
                     workers=args.threads, decode_threads=args.threads)
    cfg.validate()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = {"op": "data_loader", "dataset": str(args.dataset), "batch": args.batch_size, "resolution": args.resolution,
            "threads": args.threads, **provenance(dev)}
    dali = bench_dali_steady(cfg, args.batch_size, args.batches, args.warmup)
    stages = bench_dali(cfg, args.batch_size, args.batches, args.warmup)
    decode_ms = bench_decode_only(cfg, args.batch_size, args.batches)
    pillow = bench_baseline(cfg, args.batch_size, args.batches, args.warmup, args.threads)
    rows = [
        {**base, "provider": "dali-cpu", **dali, "read_ms": stages["read_ms"], "decode_ms": decode_ms,
         "resize_crop_ms": max(0.0, stages["ms_per_batch"] - stages["read_ms"] - decode_ms),
         **bench_h2d_and_vae(cfg, args.batch_size, args.vae, dev)},
        {**base, "provider": "pillow-dataloader", **pillow},
    ]
    rows[0]["speedup_vs_baseline"] = rows[0]["img_per_s"] / rows[1]["img_per_s"]
    if dev.type == "cuda":  # nvJPEG ("mixed") decode + DALI GPU resize/crop
        rows.append({**base, "provider": "dali-gpu", **bench_dali_steady(cfg, args.batch_size, args.batches,
                                                                          args.warmup, dev)})
    append_rows(args.out, rows)
    print_table(rows, ["provider", "threads", "batch", "img_per_s", "ms_per_batch", "read_ms", "decode_ms",
                       "resize_crop_ms", "h2d_ms", "vae_ms"])
    print(f"DALI / baseline: {rows[0]['speedup_vs_baseline']:.2f}x on {args.threads} cores")
    return rows


if __name__ == "__main__":
    main()
