"""qk_norm_rope (the pre-kernel without attention): reference vs the Triton (TRITON_INTERPRET=1)
and csrc (C++ CPU) backends, FlashAttention's 2x rule for both outputs and all four gradients;
packed-QKV views; opcheck of both backends' ops."""

import pytest
import torch
from kernel_rule import assert_within_twice_torch
from test_qk_norm_attention_triton import make_case

from kiln import kernels
from kiln.kernels.qk_norm_rope import _bwd_op, _fwd_op

BACKENDS = ["triton", "csrc"]


def _run(fn, tensors, kw, douts):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves, **kw)
    grads = torch.autograd.grad(outs, leaves, douts)
    return [o.detach() for o in outs] + list(grads)


def _on(backend):
    def fn(*a, **kw):
        with kernels.use_backend(backend):
            return kernels.qk_norm_rope(*a, **kw)

    return fn


def check(B, S, H, D, G, rope, dtype, backend, device="cpu"):
    (q, k, _, qw, kw_), kw = make_case(B, S, H, D, G, rope, False, False, dtype, seed=S + D)
    kw.pop("causal")
    g = torch.Generator().manual_seed(1)
    douts = [torch.randn(q.shape, generator=g).to(dtype).to(device) for _ in range(2)]
    q, k, qw, kw_ = (t.to(device) for t in (q, k, qw, kw_))
    kw = {n: v.to(device) for n, v in kw.items()}
    ref = _run(lambda *a, **k: kernels.qk_norm_rope_ref(*a, **k), [t.double() for t in (q, k, qw, kw_)],
               {n: (v.double() if n in ("cos", "sin") else v) for n, v in kw.items()}, [d.double() for d in douts])
    lowp = _run(lambda *a, **k: kernels.qk_norm_rope_ref(*a, **k), (q, k, qw, kw_), kw, douts)  # fp32 math, 1 rounding
    ours = _run(_on(backend), (q, k, qw, kw_), kw, douts)
    assert ours[0].dtype == dtype and ours[0].device == q.device
    assert_within_twice_torch(["q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight"], ours, ref, lowp, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,H,D,G,rope",
                         [(2, 93, 3, 64, 2, True), (1, 21, 2, 40, 0, False), (3, 17, 1, 128, 1, True)])
def test_matches_fp64_reference_within_twice_torch_error(B, S, H, D, G, rope, dtype, backend):
    check(B, S, H, D, G, rope, dtype, backend)


def test_triton_past_32_bit_offsets_runs_in_batch_chunks(monkeypatch):
    """Past dispatch.MAX_OFFSET (lowered here to two rows of 2,368 elements) the Triton backend
    runs on chunks of whole batch rows, bit for bit; a row alone past it is refused."""
    from kiln.kernels import dispatch

    (q, k, _, qw, kw_), kw = make_case(3, 37, 2, 32, 2, True, False, False, torch.float16, seed=4)
    kw.pop("causal")
    douts = [torch.randn(q.shape, generator=torch.Generator().manual_seed(i)).half() for i in (5, 6)]
    whole = _run(_on("triton"), (q, k, qw, kw_), kw, douts)
    monkeypatch.setattr(dispatch, "MAX_OFFSET", 2 * 2368 - 1)
    assert dispatch.batch_chunks(3, within=dispatch.rows_within_offsets(q, k)) == [slice(0, 2), slice(2, 3)]
    chunked = _run(_on("triton"), (q, k, qw, kw_), kw, douts)
    for a, b in zip(whole[:4], chunked[:4], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole[4:], chunked[4:], strict=True):  # fp16 weight gradients: each chunk's sum rounded
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(dispatch, "MAX_OFFSET", 2366)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="32-bit offsets"):
        kernels.qk_norm_rope(q, k, qw, kw_, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_qkv_input_and_opcheck(backend):
    (q, k, v, qw, kw_), kw = make_case(2, 30, 2, 32, 2, True, False, False, torch.float32, seed=2)
    qkv = torch.stack([q, k, v], 2)
    tables = {n: kw[n] for n in ("cos", "sin", "token_group")}
    qo, ko = _on(backend)(qkv[:, :, 0], qkv[:, :, 1], qw, kw_, **tables)
    ro, rk = kernels.qk_norm_rope_ref(q, k, qw, kw_, **tables)
    torch.testing.assert_close(qo, ro)
    torch.testing.assert_close(ko, rk)
    fwd, bwd = (_fwd_op, _bwd_op) if backend == "triton" else (torch.ops.kiln_ext.qk_norm_rope_fwd,
                                                               torch.ops.kiln_ext.qk_norm_rope_bwd)
    args = (qkv[:, :, 0], qkv[:, :, 1], qw, kw_, kw["cos"], kw["sin"], kw["token_group"], 1e-6)
    torch.library.opcheck(fwd, args)
    qo, ko, rq, rk = fwd(*args)
    torch.library.opcheck(bwd, (torch.randn_like(qo), torch.randn_like(ko), q, k, qw, kw_, kw["cos"], kw["sin"],
                                kw["token_group"], rq, rk))
