"""torchrun entry for test_parallel: ``kiln train ARGS`` that counts this rank's collectives and
writes them to OUT/collectives_rankR.txt (a file each: the ranks' stdout lines interleave).
Importing it patches torch.distributed's collectives and ring attention's transfers
(tests/pipeline_memory.py and tests/ring_attention_ranks.py count with it too).

- FSDP2's (parameter all-gathers, gradient reduce-scatters within the shard group, all-reduces
  across HSDP replicas): its calls into torch.distributed.
- The functional collectives that reach the dispatcher: context parallel's all-to-alls and
  tensor parallel's DTensor sequence gathers and scatters. Counted by a dispatch mode under
  every other one, so an output that selective checkpointing kept and hands back in the
  recompute is not counted: the count is what was sent. (DTensor's collectives inside its own
  op dispatch, e.g. the partial sums of replicated weights' gradients, are not seen.)
- Ring attention's transfers, in bytes (``ring bytes``): they run inside its custom op, which
  the dispatch mode sees only as a whole, so kiln.model.ring_attention._rotate is wrapped.
"""

import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.engine.cli import main
from kiln.model import ring_attention

calls: Counter = Counter()


def _counting(name: str, collective):
    def wrapper(*args, **kwargs):
        if "fsdp" in sys._getframe(1).f_globals.get("__name__", ""):  # FSDP's, not the loss / norm ones
            calls[name] += 1
        return collective(*args, **kwargs)

    return wrapper


# FSDP2 looks them up on the module at each call
dist.all_gather_single = _counting("all-gathers", dist.all_gather_single)
dist.reduce_scatter_single = _counting("reduce-scatters", dist.reduce_scatter_single)
dist.all_reduce = _counting("all-reduces", dist.all_reduce)

def _counting_bytes(name: str, rotate):
    def wrapper(x, *args):
        calls[name] += x.numel() * x.element_size()  # all of x goes to the next rank
        return rotate(x, *args)

    return wrapper


ring_attention._rotate = _counting_bytes("ring bytes", ring_attention._rotate)

FUNCTIONAL = {"all_to_all_single": "all-to-alls", "all_gather_into_tensor": "dtensor all-gathers",
              "reduce_scatter_tensor": "dtensor reduce-scatters", "all_reduce": "dtensor all-reduces"}


class _Sent(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func._opname in FUNCTIONAL:
            calls[FUNCTIONAL[func._opname]] += 1
        return func(*args, **(kwargs or {}))


NAMES = ("all-gathers", "reduce-scatters", "all-reduces", *FUNCTIONAL.values(), "ring bytes")


def train_counting(args: list[str]) -> None:
    """``kiln train ARGS``, then this rank's counts to OUT/collectives_rankR.txt (OUT: ``--out``)."""
    with _Sent():  # pushed first: selective checkpointing's cache sits above it
        main(["train", *args])
    rank, out = os.environ["RANK"], Path(args[args.index("--out") + 1])
    (out / f"collectives_rank{rank}.txt").write_text(f"rank {rank} " + " ".join(f"{n} {calls[n]}" for n in NAMES)
                                                     + "\n")


if __name__ == "__main__":
    train_counting(sys.argv[1:])
