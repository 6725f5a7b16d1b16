"""torchrun entry for test_parallel: ``kiln train ARGS`` that records what this rank's pipeline
schedules hold in receive buffers (with those buffers' gradients): the most while a step runs
(the running schedule, measured as torch's step returns) and the most between steps (every
schedule built so far). Written to OUT/pipeline_rankR.txt."""

import os
import sys
from pathlib import Path

from torch.distributed.pipelining import schedules

from kiln.engine import parallel
from kiln.engine.cli import main

built: list = []
seen = {"schedules": 0, "during": 0, "between": 0}


def _held(p) -> int:
    return sum(b.untyped_storage().nbytes() + (b.grad.untyped_storage().nbytes() if b.grad is not None else 0)
               for b in p.buffers())


def _recording(cls, method: str, after):
    inner = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        after(self)
        return out

    setattr(cls, method, wrapper)


def _during(schedule) -> None:
    seen["during"] = max(seen["during"], *(_held(p) for p in built if p.schedule is schedule))


def _between(pipeline) -> None:
    seen["schedules"] = len(built)
    seen["between"] = max(seen["between"], sum(_held(p) for p in built))


_recording(parallel.Pipeline, "__init__", built.append)
_recording(parallel.Pipeline, "step", _between)
for cls in (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti):
    _recording(cls, "step", _during)
main(["train", *sys.argv[1:]])
rank, out = os.environ["RANK"], Path(sys.argv[sys.argv.index("--out") + 1])
(out / f"pipeline_rank{rank}.txt").write_text(" ".join(f"{k}={v}" for k, v in seen.items()) + "\n")
