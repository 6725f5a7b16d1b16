"""torchrun entry for test_parallel: after parallel.shutdown no process group may be left alive
(their gloo threads would outlive the interpreter: parallel.release_process_groups). A cp=2
(ring) model under FSDP runs forward and backward first: DeviceMeshes, FSDP's DTensor weights
and kiln's custom ops, the holders found. Writes OUT/threads_rankR.json with the thread names before and after."""

import json
import os
import sys
from pathlib import Path

import torch

from kiln.engine import parallel
from kiln.engine.config import apply_override
from kiln.engine.recipes import recipe


def _threads() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


out = Path(sys.argv[1])
cfg = recipe("tiny")
for s in ["parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1"]:
    apply_override(cfg, s)
cpu = torch.device("cpu")
d = parallel.init(cfg, cpu)
[model] = parallel.build_parts(cfg, d, cpu, None)
torch.manual_seed(0)
m, B, L, HW = cfg.model, 2, cfg.text.max_length, (32, 32)
inputs = (torch.randn(B, m.in_channels, *HW), torch.rand(B), torch.randn(B, L, m.text_dim),
          torch.ones(B, L, dtype=torch.bool), torch.randn(B, m.pooled_dim),
          torch.tensor([[*HW, 0, 0, *HW]] * B, dtype=torch.float32))
model(*inputs).square().mean().backward()
running = _threads()
parallel.shutdown(d)
(out / f"threads_rank{os.environ['RANK']}.json").write_text(json.dumps({"running": running, "after": _threads()}))
