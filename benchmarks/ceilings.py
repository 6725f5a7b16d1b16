"""Measure the two ceilings on this machine (METHOD.md): device copy bandwidth and bf16 matmul.

Copy: a 2 GiB device-to-device copy, bytes read + bytes written. Matmul: 8192^3 bf16 on random
data (zeros run faster and flatter the number). Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kiln.benchmarks.common import append_rows, print_table, provenance


def measure() -> list[dict]:
    from triton.testing import do_bench

    dev = torch.device("cuda")
    src = torch.randn(2**29, device=dev)  # 2 GiB fp32
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.2, 0.5, 0.8])
    copy_bytes = 2 * src.numel() * src.element_size()
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm = do_bench(lambda: a @ b, quantiles=[0.2, 0.5, 0.8])
    prov = provenance(dev)
    return [
        {"op": "copy", "provider": "torch", "shape": f"{src.numel()} fp32", "p20_ms": ms[0], "p50_ms": ms[1],
         "p80_ms": ms[2], "gbps": copy_bytes / (ms[1] / 1e3) / 1e9, **prov},
        {"op": "matmul", "provider": "torch", "shape": f"{n}^3 bf16", "p20_ms": mm[0], "p50_ms": mm[1],
         "p80_ms": mm[2], "tflops": 2 * n**3 / (mm[1] / 1e3) / 1e12, **prov},
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = measure()
    append_rows(args.out, rows)
    print_table(rows, ["op", "shape", "p50_ms", "gbps", "tflops", "device"])


if __name__ == "__main__":
    main()
