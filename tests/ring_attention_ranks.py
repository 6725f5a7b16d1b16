"""torchrun entry for test_ring_attention: each rank holds 1/n of the tokens of one sequence and
runs kiln.model.ring_attention; its output and its share of dq, dk, dv must match attention over
the whole sequence in fp64 (FlashAttention's rule: within 2x the error of PyTorch's attention
in the same dtype). Odd lengths (7 tokens a rank), 3 heads, keys masked on some ranks, a whole
rank's keys masked in one sample and a sample with no valid key (zeros); q, k as given, and with
QK-norm ((G, D) weights, token groups) and RoPE fused in (then also both weights' gradients,
summed over the ranks, against qk_norm_attention_ref's); the bytes it sends are what the scaling
model's ring_bytes charges. Blocks on the eager
path (the CPU's automatic choice), or with BACKEND "triton" on the flash kernels
(TRITON_INTERPRET=1 on the CPU); DEVICE "cuda": every rank on the same GPU, where the flash
kernels are the automatic choice. Usage: ring_attention_ranks.py OUT [BACKEND [DEVICE]]
(BACKEND auto | triton; DEVICE cpu | cuda); writes OUT/ok_rankR.txt with the worst errors."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from count_collectives import calls  # counts the bytes ring attention sends
from kernel_rule import FLOOR

from kiln.engine import parallel  # imports torch._dynamo before any process group exists
from kiln.engine.scaling import ring_bytes
from kiln.kernels import qk_norm_attention_ref, use_backend
from kiln.model.ring_attention import _ring_fwd_op, ring_attention, use_flash

B, PER_RANK, H, D, G = 3, 7, 3, 16, 2


def whole_attention(q, k, v, ok):
    """Attention over the whole sequence in the inputs' dtype; rows with no valid key -> 0."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=ok[:, None, None, :]).transpose(1, 2)
    return torch.where(ok.any(-1)[:, None, None, None], out, torch.zeros((), dtype=out.dtype))


def _inputs(n: int):
    """q, k, v, dout (B, S, H, D), (G, D) QK-norm weights, the key mask and the norm's tables."""
    g = torch.Generator().manual_seed(0)
    S = n * PER_RANK
    q, k, v, do = (torch.randn(B, S, H, D, generator=g) for _ in range(4))
    qw, kw = (1 + 0.2 * torch.randn(G, D, generator=g) for _ in range(2))
    ok = torch.rand(B, S, generator=g) > 0.3
    ok[1, :PER_RANK] = False  # sample 1: rank 0's keys all masked
    ok[2] = False  # sample 2: no valid key anywhere
    angle = torch.randn(S, D // 2, generator=g, dtype=torch.float64)
    tables = {"cos": torch.cat([angle.cos()] * 2, -1), "sin": torch.cat([angle.sin()] * 2, -1),
              "token_group": torch.randint(0, G, (S,), generator=g)}
    return [q, k, v, qw, kw], do, ok, tables


def _grads(fn, tensors, do):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def _check(name, dtype, got, low, want, r, report):
    """2x PyTorch's error in the dtype + kernel_rule's floor for bf16 (CONVENTIONS.md); fp32
    tighter than kernel_rule's 1e-5 floor, which would leave these errors (~5e-7) at 2% of it."""
    err = (got.double() - want).abs().max().item()
    floor = 1e-6 if dtype == torch.float32 else FLOOR[dtype] * (1 + want.abs().max().item())
    bound = 2 * (low.double() - want).abs().max().item() + floor
    report[f"{name} {dtype}"] = [err, bound]
    assert err <= bound, f"rank {r}: {name} in {dtype} is off by {err:.3e} > {bound:.3e}"


def main(out_dir: Path, backend: str | None, device: str) -> None:
    dist.init_process_group("gloo")  # (its all-to-alls also move CUDA tensors: every rank may share one GPU)
    r, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    (q, k, v, qw, kw), do, ok, tables = _inputs(n)  # the references run on the CPU, the ring on device
    mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
    local = {name: t[mine].to(device) for name, t in tables.items()}  # this rank's rows of the norm's tables
    flash = backend == "triton" or device == "cuda"  # the blocks' path this rank must take
    report = {}
    # plain: q, k used as given; fused: QK-norm + RoPE of each rank's tokens inside the op
    for fused in (False, True):
        def whole(a, b, c, qw_=None, kw_=None, upcast=True, fused=fused):
            if not fused:
                return whole_attention(a, b, c, ok)
            return qk_norm_attention_ref(a, b, c, qw_, kw_, key_padding_mask=ok, upcast=upcast,
                                         **{name: t.to(a.dtype) if t.is_floating_point() else t
                                            for name, t in tables.items()})

        def ring(a, b, c, qw_=None, kw_=None, fused=fused):
            norm = ({"q_weight": qw_, "k_weight": kw_, **{name: t.to(a.dtype) if t.is_floating_point() else t
                                                          for name, t in local.items()}} if fused else {})
            return ring_attention(a, b, c, ok.to(device), dist.group.WORLD, **norm)

        inputs = [q, k, v, qw, kw] if fused else [q, k, v]
        names = ["out", "dq", "dk", "dv", "dq_weight", "dk_weight"][:len(inputs) + 1]
        exact = _grads(whole, [t.double() for t in inputs], do.double())
        for dtype in (torch.float32, torch.bfloat16):
            low = _grads(lambda *a: whole(*a, upcast=False), [t.to(dtype) for t in inputs], do.to(dtype))
            with use_backend(backend):
                assert use_flash(*(t.to(device, dtype) for t in (q, k, v))) == flash, "blocks on the wrong path"
                calls["ring bytes"] = 0
                got = _grads(ring, [t[:, mine].to(device, dtype) for t in inputs[:3]]
                             + [t.to(device, dtype) for t in inputs[3:]], do[:, mine].to(device, dtype))
                got = [t.cpu() for t in got]
            # what the scaling model charges a ring attention (forward and backward, one rank)
            sent = calls["ring bytes"]
            assert sent == ring_bytes(B * PER_RANK * H * D, n, act=dtype.itemsize, head_dim=D), (sent, dtype)
            for i, (name, a, b, c) in enumerate(zip(names, got, low, exact, strict=True)):
                if i >= 4:  # the weights' gradients: each rank holds its tokens' share
                    dist.all_reduce(a)
                else:
                    b, c = b[:, mine], c[:, mine]
                _check(f"{name}{' fused' if fused else ''}", dtype, a, b, c, r, report)
            assert got[0][2].abs().max() == 0 and got[1][2].abs().max() == 0, "sample without keys must give zeros"
    # the custom ops' registrations (fake tensors, autograd, schema), run on every rank alike
    for norm in ((None,) * 5, (qw, kw, local["cos"].float(), local["sin"].float(), local["token_group"])):
        tensors = [t.to(device) if t is not None else None for t in (q[:, mine], k[:, mine], v[:, mine], ok, *norm)]
        args = (*tensors, 1e-6, D ** -0.5, dist.group.WORLD.group_name, r, n, flash)
        with use_backend(backend):
            torch.library.opcheck(_ring_fwd_op, tuple(t.detach().requires_grad_() if i in (0, 1, 2, 4, 5)
                                                      and t is not None else t for i, t in enumerate(args)))
    (out_dir / f"ok_rank{r}.txt").write_text(json.dumps(report))
    parallel.shutdown()


if __name__ == "__main__":
    given = sys.argv[1:]
    out, backend, device = given + ["auto", "cpu"][len(given) - 1:]
    main(Path(out), None if backend == "auto" else backend, device)
