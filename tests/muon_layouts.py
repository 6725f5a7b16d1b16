"""torchrun entry (4 ranks) for test_muon: ShardedMuon on weights sharded by FSDP2 alone (uneven
pieces, empty ones), HSDP (replicated x sharded), TP alone (rows and columns) and FSDP2 x TP
(2-D, strided) must give, bit for bit, the weights one process gets from the same gradients.
Writes OUT/ok_rankR.txt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from kiln.engine import parallel  # imports torch._dynamo before any process group exists
from kiln.engine.muon import ShardedMuon

# (out, in) of each linear: groups of 3, 2, 2 and 1 matrices (fewer and more than 4 ranks), tall
# and wide, and row counts that 4 ranks split unevenly (10 -> 3, 3, 3, 1; 7 -> 2, 2, 2, 1)
SHAPES = [(40, 24), (24, 40), (40, 24), (24, 40), (40, 24), (10, 24), (10, 24), (7, 5)]
LAYOUTS = {  # mesh (2-D: names) -> the placements every weight must end up with
    "fsdp4": ((4,), ("dp",), {("Shard",)}),
    "hsdp2x2": ((2, 2), ("replicate", "shard"), {("Replicate", "Shard")}),
    "tp4": ((4,), ("tp",), {("Shard",)}),
    "fsdp2_x_tp2": ((2, 2), ("dp", "tp"), {("_StridedShard", "Shard"), ("Shard", "Shard")}),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in SHAPES])  # never run: shapes need not chain


def _train(model: nn.Module, steps: int = 3) -> nn.Module:
    opt = ShardedMuon(model.parameters(), lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(steps):
        for p in model.parameters():  # elementwise in the weights: the same numbers in every layout
            p.grad = torch.sin(p.detach() * (7.0 + step)) + 0.01 * step
        opt.step()
    return model


def _shard(name: str, model: nn.Module, mesh) -> None:
    tp_plan = {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(len(SHAPES))}
    if name == "tp4":
        parallelize_module(model, mesh, tp_plan)
    elif name == "fsdp2_x_tp2":
        parallelize_module(model, mesh["tp"], tp_plan)
        fully_shard(model, mesh=mesh["dp"])
    else:
        fully_shard(model, mesh=mesh)  # a 2-D mesh: HSDP


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    want = [p.detach() for p in _train(_model()).parameters()]
    for name, (sizes, dims, placements) in LAYOUTS.items():
        mesh = init_device_mesh("cpu", sizes, mesh_dim_names=dims)
        model = _model()
        _shard(name, model, mesh)
        layouts = {tuple(type(q).__name__ for q in p.placements) for p in model.parameters()}
        assert layouts == placements, (name, layouts)
        got = [p.detach().full_tensor() for p in _train(model).parameters()]
        bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if not torch.equal(a, b)]
        assert not bad, f"{name}: parameters {bad} differ from one process's"
    (out / f"ok_rank{dist.get_rank()}.txt").write_text("ok\n")
    parallel.shutdown()  # barrier, destroy, and free the groups the meshes hold


if __name__ == "__main__":
    main(Path(sys.argv[1]))
