"""Sweep the Triton GroupNorm launch knobs (kernel kind, tile, warps, programs per SM, stages) on a GPU.

    python -m kiln.benchmarks.tune_group_norm [--out FILE.jsonl]

Prints the median device time (CUDA-graph replays) of forward and backward per shape and layout
for every setting, and the best setting per case; rows carry the knobs, so the autotuner's
candidate lists (group_norm_triton.CANDIDATES, group_norm_triton_pipelined.CANDIDATES) can be
traced to numbers.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from kiln import kernels
from kiln.benchmarks.common import append_rows, provenance
from kiln.benchmarks.group_norm import SHAPES, bench_one
from kiln.kernels import group_norm_triton as gnt


def _triton(x, w, b):
    with kernels.use_backend("triton"):
        return kernels.group_norm(x, 32, w, b)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    prov = provenance(dev)
    knobs = [gnt.Knobs(tile, warps, pps, kind, stages) for kind in ("split", "pipelined")
             for tile, warps, pps, stages in itertools.product((1024, 2048, 4096), (4, 8), (2, 4, 8), (1, 3))]
    best = {}
    for shape, layout in itertools.product(SHAPES, ("nchw", "channels_last")):
        x = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(shape[1], device=dev, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(shape[1], device=dev, dtype=torch.bfloat16, requires_grad=True)
        for k in knobs:
            gnt.candidates = lambda x, num_groups, k=k: [k]  # one candidate: launched untimed
            for mode, passes in (("fwd", 2), ("bwd", 3)):
                q = bench_one(_triton, x, w, b, mode, "graph")  # device time: knobs do not move host cost
                gbps = passes * x.numel() * x.element_size() / (q[1] / 1e3) / 1e9
                row = {"op": "group_norm", "provider": "triton", "mode": mode, "shape": "x".join(map(str, shape)),
                       "layout": layout, "timing": "graph", "kind": k.kind, "tile": k.tile, "num_warps": k.num_warps,
                       "programs_per_sm": k.programs_per_sm, "stages": k.stages,
                       "p50_ms": q[1], "gbps": gbps, **prov}
                append_rows(args.out, [row])
                key = (row["shape"], layout, mode)
                if key not in best or gbps > best[key]["gbps"]:
                    best[key] = row
    for (shape, layout, mode), r in sorted(best.items()):
        print(f"{shape:14s} {layout:13s} {mode}  best {r['gbps']:7.0f} GB/s  {r['kind']} tile={r['tile']} "
              f"warps={r['num_warps']} programs/SM={r['programs_per_sm']} stages={r['stages']}")


if __name__ == "__main__":
    main()
