"""qk_norm_rope (the pre-kernel without attention): reference vs Triton under TRITON_INTERPRET=1,
FlashAttention's 2x rule for both outputs and all four gradients; opcheck."""

import pytest
import torch
from kernel_rule import assert_within_twice_torch
from test_qk_norm_attention_triton import make_case

from kiln import kernels
from kiln.kernels.qk_norm_rope import _bwd_op, _fwd_op


def _run(fn, tensors, kw, douts):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves, **kw)
    grads = torch.autograd.grad(outs, leaves, douts)
    return [o.detach() for o in outs] + list(grads)


def _triton(*a, **kw):
    with kernels.use_backend("triton"):
        return kernels.qk_norm_rope(*a, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,H,D,G,rope",
                         [(2, 93, 3, 64, 2, True), (1, 21, 2, 40, 0, False), (3, 17, 1, 128, 1, True)])
def test_matches_fp64_reference_within_twice_torch_error(B, S, H, D, G, rope, dtype):
    (q, k, _, qw, kw_), kw = make_case(B, S, H, D, G, rope, False, False, dtype, seed=S + D)
    kw.pop("causal")
    g = torch.Generator().manual_seed(1)
    douts = [torch.randn(q.shape, generator=g).to(dtype) for _ in range(2)]
    ref = _run(lambda *a, **k: kernels.qk_norm_rope_ref(*a, **k), [t.double() for t in (q, k, qw, kw_)],
               {n: (v.double() if n in ("cos", "sin") else v) for n, v in kw.items()}, [d.double() for d in douts])
    lowp = _run(lambda *a, **k: kernels.qk_norm_rope_ref(*a, **k), (q, k, qw, kw_), kw, douts)  # fp32 math, 1 rounding
    ours = _run(_triton, (q, k, qw, kw_), kw, douts)
    assert ours[0].dtype == dtype
    assert_within_twice_torch(["q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight"], ours, ref, lowp, dtype)


def test_packed_qkv_input_and_opcheck():
    (q, k, v, qw, kw_), kw = make_case(2, 30, 2, 32, 2, True, False, False, torch.float32, seed=2)
    qkv = torch.stack([q, k, v], 2)
    qo, ko = _triton(qkv[:, :, 0], qkv[:, :, 1], qw, kw_, cos=kw["cos"], sin=kw["sin"], token_group=kw["token_group"])
    ro, rk = kernels.qk_norm_rope_ref(q, k, qw, kw_, cos=kw["cos"], sin=kw["sin"], token_group=kw["token_group"])
    torch.testing.assert_close(qo, ro)
    torch.testing.assert_close(ko, rk)
    args = (q, k, qw, kw_, kw["cos"], kw["sin"], kw["token_group"], 1e-6)
    torch.library.opcheck(_fwd_op, args)
    qo, ko, rq, rk = _fwd_op(*args)
    torch.library.opcheck(_bwd_op, (torch.randn_like(qo), torch.randn_like(ko), q, k, qw, kw_, kw["cos"], kw["sin"],
                                    kw["token_group"], rq, rk))
