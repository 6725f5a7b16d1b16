"""torchrun entry for test_parallel: ``kiln train ARGS`` that counts the gradient reduce-scatters
FSDP2 issues on this rank (torch.distributed.reduce_scatter_single) and prints the count."""

import os
import sys

import torch.distributed as dist

from kiln.engine.cli import main

calls = 0
_reduce_scatter = dist.reduce_scatter_single


def _counting(*args, **kwargs):
    global calls
    calls += 1
    return _reduce_scatter(*args, **kwargs)


dist.reduce_scatter_single = _counting  # FSDP2 looks it up on the module at each call
main(["train", *sys.argv[1:]])
print(f"rank {os.environ['RANK']} reduce-scatters {calls}", flush=True)
