"""torchrun entry for test_parallel: what one double-stream and one single-stream block keep
for their backward on this rank, under the layout ``--set`` gives (tp, cp), for each activation
checkpointing mode and for "policy" (selective's policy forced on both kinds of block); in
bytes per token of this rank's S/cp and unit of width W, written to
OUT/block_memory_rankR.json. bf16 weights under autocast and the Triton attention, as on a GPU."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: its kernels on CPU tensors

import torch  # noqa: E402
from saved_bytes import held_for_backward  # noqa: E402

from kiln.engine import parallel  # noqa: E402
from kiln.engine.config import apply_override  # noqa: E402
from kiln.engine.recipes import recipe  # noqa: E402
from kiln.kernels import use_backend  # noqa: E402
from kiln.model import layers  # noqa: E402

layers.LEAN_GATE_TOKENS = 0  # 192 tokens here: the gated residuals as they run at 1024 px and up

B, L, HW = 2, 64, (64, 32)  # 64 text + 16 x 8 image tokens (patch 4): every split even
out, sets = Path(sys.argv[1]), sys.argv[2:]
cfg = recipe("tiny")
for s in ["model.width=256", "model.heads=4", "model.depth=1", "model.single_depth=1", "text.max_length=64", *sets]:
    apply_override(cfg, s)
cpu, bf16 = torch.device("cpu"), torch.bfloat16
d = parallel.init(cfg, cpu)
torch.manual_seed(0)  # the same samples on every rank
m = cfg.model
inputs = (torch.randn(B, m.in_channels, *HW), torch.rand(B), torch.randn(B, L, m.text_dim),
          torch.ones(B, L, dtype=torch.bool), torch.randn(B, m.pooled_dim),
          torch.tensor([[*HW, 0, 0, *HW]] * B, dtype=torch.float32))
S = L + (HW[0] // m.patch_size) * (HW[1] // m.patch_size)
local = S // d.sizes["cp"]
result = {}
# "policy": selective's policy on both kinds of block, whether or not selective applies it there
for ac in ("none", "selective", "full", "policy"):
    cfg.parallel.activation_checkpoint = "none" if ac == "policy" else ac
    [model] = parallel.build_parts(cfg, d, cpu, None)
    model.to(bf16)  # as FSDP gathers them: no autocast copies of fp32 weights
    blocks = {"double": (model.double_blocks["0"], 2), "single": (model.single_blocks["0"], 1)}
    for block, _ in blocks.values() if ac == "policy" else ():
        parallel.checkpoint_block(block, "selective")
    args = {}
    hooks = [block.register_forward_pre_hook(lambda mod, a, kind=kind, seen=args: seen.update({kind: a}))
             for kind, (block, _) in blocks.items()]
    with use_backend("triton"), torch.autocast("cpu", dtype=bf16):
        model(*inputs)  # each block's arguments, as the model calls it
        for h in hooks:
            h.remove()
        for kind, (block, n) in blocks.items():
            a = args[kind]
            kept = held_for_backward(lambda *xs, a=a, n=n, block=block: block(*xs, *a[n:]),
                                     lambda a=a, n=n: tuple(x.detach().requires_grad_() * 1 for x in a[:n]))
            result[f"{ac} {kind}"] = kept / (B * local * m.width)
(out / f"block_memory_rank{os.environ['RANK']}.json").write_text(json.dumps(result))
parallel.shutdown(d)
