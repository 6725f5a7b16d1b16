"""torchrun entry for test_parallel: ``kiln train ARGS`` that records what this rank's pipeline
schedules hold in receive buffers (with those buffers' gradients): the most while a step runs
(the running schedule, measured as torch's step returns) and the most between steps (every
schedule built so far); and under FSDP the most unsharded gradient bytes its stage holds when a
micro-batch's backward starts, with 4 x the stage's parameters (every gradient unsharded, fp32).
Written to OUT/pipeline_rankR.txt; its collectives counted as tests/count_collectives.py does."""

import os
import sys
from pathlib import Path

from count_collectives import train_counting
from torch.distributed.pipelining import schedules

from kiln.engine import parallel

built: list = []
seen = {"schedules": 0, "during": 0, "between": 0, "grads": 0, "all_grads": 0}


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


def _unsharded_grads(part) -> tuple[int, int]:
    """(bytes of unsharded gradients FSDP holds for ``part``, 4 x its parameters' full numel)."""
    held = whole = 0
    for module in part.modules():
        group = module._get_fsdp_state()._fsdp_param_group if hasattr(module, "_get_fsdp_state") else None
        for fp in group.fsdp_params if group is not None else ():
            whole += 4 * fp._orig_size.numel()
            g = fp.unsharded_accumulated_grad
            if g is None and hasattr(fp, "_unsharded_param"):
                g = fp._unsharded_param.grad
            held += g.numel() * g.element_size() if g is not None else 0
    return held, whole


def _before_microbatch(inner):
    def wrapper(parts, *args):  # called as each micro-batch's backward starts
        held, whole = (sum(x) for x in zip(*(_unsharded_grads(p) for p in parts), strict=True))
        seen["grads"], seen["all_grads"] = max(seen["grads"], held), whole
        return inner(parts, *args)

    return wrapper


parallel.before_microbatch = _before_microbatch(parallel.before_microbatch)
_recording(parallel.Pipeline, "__init__", built.append)
_recording(parallel.Pipeline, "step", _between)
for cls in (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti):
    _recording(cls, "step", _during)
train_counting(sys.argv[1:])
rank, out = os.environ["RANK"], Path(sys.argv[sys.argv.index("--out") + 1])
(out / f"pipeline_rank{rank}.txt").write_text(" ".join(f"{k}={v}" for k, v in seen.items()) + "\n")
