"""torchrun entry for test_parallel: ``kiln train ARGS`` that counts FSDP2's collectives on this
rank (parameter all-gathers, gradient reduce-scatters within the shard group, all-reduces across
HSDP replicas), context parallel's all-to-alls and DTensor's collectives (tensor parallel), and
writes them to OUT/collectives_rankR.txt (a file each: the ranks' stdout lines interleave)."""

import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from kiln.engine.cli import main

calls: Counter = Counter()


def _counting(name: str, collective, caller: str = "fsdp"):
    def wrapper(*args, **kwargs):
        if caller in sys._getframe(1).f_globals.get("__name__", ""):  # FSDP's, not the loss / norm ones
            calls[name] += 1
        return collective(*args, **kwargs)

    return wrapper


# FSDP2 looks them up on the module at each call
dist.all_gather_single = _counting("all-gathers", dist.all_gather_single)
dist.reduce_scatter_single = _counting("reduce-scatters", dist.reduce_scatter_single)
dist.all_reduce = _counting("all-reduces", dist.all_reduce)
dist.all_to_all_single = _counting("all-to-alls", dist.all_to_all_single, caller="sequence_parallel")
# DTensor's (tensor parallel's sequence gathers and scatters) go through the functional collectives
for _fn, _name in (("all_gather_single", "all-gathers"), ("reduce_scatter_single", "reduce-scatters"),
                   ("all_reduce", "all-reduces")):
    setattr(funcol, _fn, _counting(f"dtensor {_name}", getattr(funcol, _fn), caller="torch.distributed.tensor"))
NAMES = ("all-gathers", "reduce-scatters", "all-reduces", "all-to-alls", "dtensor all-gathers",
         "dtensor reduce-scatters", "dtensor all-reduces")
main(["train", *sys.argv[1:]])
rank, out = os.environ["RANK"], Path(sys.argv[sys.argv.index("--out") + 1])
(out / f"collectives_rank{rank}.txt").write_text(f"rank {rank} " + " ".join(f"{n} {calls[n]}" for n in NAMES) + "\n")
