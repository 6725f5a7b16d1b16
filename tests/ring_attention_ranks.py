"""torchrun entry for test_ring_attention: each rank holds 1/n of the tokens of one sequence and
runs kiln.model.ring_attention; its output and its share of dq, dk, dv must match attention over
the whole sequence in fp64 (FlashAttention's rule: within 2x the error of PyTorch's attention
in the same dtype). Odd lengths (7 tokens a rank), 3 heads, keys masked on some ranks, a whole
rank's keys masked in one sample and a sample with no valid key (zeros). Writes
OUT/ok_rankR.txt with the worst errors."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kiln.engine import parallel  # imports torch._dynamo before any process group exists
from kiln.model.ring_attention import _ring_fwd_op, ring_attention

B, PER_RANK, H, D = 3, 7, 3, 16


def _reference(q, k, v, ok):
    """Attention over the whole sequence in the inputs' dtype; rows with no valid key -> 0."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=ok[:, None, None, :]).transpose(1, 2)
    return torch.where(ok.any(-1)[:, None, None, None], out, torch.zeros((), dtype=out.dtype))


def _inputs(n: int):
    g = torch.Generator().manual_seed(0)
    S = n * PER_RANK
    q, k, v, do = (torch.randn(B, S, H, D, generator=g) for _ in range(4))
    ok = torch.rand(B, S, generator=g) > 0.3
    ok[1, :PER_RANK] = False  # sample 1: rank 0's keys all masked
    ok[2] = False  # sample 2: no valid key anywhere
    return q, k, v, do, ok


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    r, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    q, k, v, do, ok = _inputs(n)
    mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
    exact = _grads(lambda a, b, c: _reference(a, b, c, ok), *(t.double() for t in (q, k, v, do)))
    exact = [exact[0][:, mine], exact[1][:, mine], exact[2][:, mine], exact[3][:, mine]]
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        low = _grads(lambda a, b, c: _reference(a, b, c, ok), *(t.to(dtype) for t in (q, k, v, do)))
        ring = _grads(lambda a, b, c: ring_attention(a, b, c, ok, dist.group.WORLD),
                      *(t[:, mine].to(dtype) for t in (q, k, v, do)))
        for name, got, torch_low, want in zip(("out", "dq", "dk", "dv"), ring, low, exact, strict=True):
            err = (got.double() - want).abs().max().item()
            bound = 2 * (torch_low[:, mine].double() - want).abs().max().item() + 1e-6
            report[f"{name} {dtype}"] = [err, bound]
            assert err <= bound, f"rank {r}: {name} in {dtype} is off by {err:.3e} > {bound:.3e}"
        assert ring[0][2].abs().max() == 0 and ring[1][2].abs().max() == 0, "sample without keys must give zeros"
    # the custom ops' registrations (fake tensors, autograd, schema), run on every rank alike
    args = (q[:, mine], k[:, mine], v[:, mine], ok, D ** -0.5, dist.group.WORLD.group_name, r, n)
    torch.library.opcheck(_ring_fwd_op, tuple(t.requires_grad_() if t.is_floating_point() else t
                                              for t in args[:3]) + args[3:])
    (out_dir / f"ok_rank{r}.txt").write_text(json.dumps(report))
    parallel.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
