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


def _bad_arguments(S, D):
    ang = torch.ones(S, D)
    return [  # (kwargs replaced, what the error must name); each failed in a broadcast or read past a tensor
        ({"q_weight": torch.ones(D + 1)}, "q_weight must be"),
        ({"k_weight": torch.ones(D, device="meta")}, "k_weight is on meta, q on cpu"),
        ({"k_weight": torch.ones(2, 3, D)}, "k_weight must be"),
        ({"cos": ang}, "cos and sin come together"),
        ({"cos": ang[None], "sin": ang[None]}, r"cos must be \(S, D\)"),
        ({"cos": ang[:-1], "sin": ang[:-1]}, r"cos must be \(S, D\)"),
        ({"token_group": torch.zeros(S + 1, dtype=torch.long)}, "token_group must be"),
        ({"token_group": torch.zeros(S)}, "integer tensor"),
        ({"token_group": torch.full((S,), 2)}, r"token_group values must lie in \[0, G\) = \[0, 2\)"),
        ({"token_group": torch.full((S,), -1)}, "from -1 to -1"),
    ]


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("op", ["qk_norm_rope", "qk_norm_attention"])
def test_bad_arguments_are_named_before_any_backend_runs(op, backend):
    S, D = 7, 16
    q, k = torch.randn(2, S, 2, D), torch.randn(2, S, 2, D)
    base = {"q_weight": torch.ones(2, D), "k_weight": torch.ones(2, D), "token_group": torch.zeros(S, dtype=torch.long)}
    cases = _bad_arguments(S, D)
    if op == "qk_norm_attention":
        cases.append(({"key_padding_mask": torch.ones(2, S + 1, dtype=torch.bool)}, "key_padding_mask must be"))
    for bad, match in cases:
        kw = {**base, **bad}
        args = (q, k, kw.pop("q_weight"), kw.pop("k_weight"))
        with pytest.raises(ValueError, match=match), kernels.use_backend(backend):
            if op == "qk_norm_rope":
                kernels.qk_norm_rope(*args, **kw)
            else:
                kernels.qk_norm_attention(q, k, torch.randn_like(q), *args[2:], **kw)


def bad_token_case():
    """A G = 2 case (B, S, H, D = 2, 13, 2, 32) whose tokens 3 and 9 name weight rows 2 and -1,
    outside the (2, D) weights: (q, k, q_weight, k_weight, cos, sin, token_group, good), ``good``
    the mask of the other tokens."""
    (q, k, _, qw, kw_), kw = make_case(2, 13, 2, 32, 2, True, False, False, torch.float32, seed=8)
    bad = kw["token_group"].clone()
    bad[[3, 9]] = torch.tensor([2, -1])
    good = torch.ones(13, dtype=torch.bool)
    good[[3, 9]] = False
    return q, k, qw, kw_, kw["cos"], kw["sin"], bad, good


def reference_on_good_tokens(q, k, qw, kw_, cos, sin, token_group, good):
    """The reference on the good tokens alone (what a kernel must give them): its leaves
    (q, k, q_weight, k_weight) and its (q_out, k_out)."""
    leaves = [t[:, good].clone().requires_grad_() for t in (q, k)] + [t.clone().requires_grad_() for t in (qw, kw_)]
    return leaves, kernels.qk_norm_rope_ref(*leaves, cos=cos[good], sin=sin[good], token_group=token_group[good])


def test_triton_kernels_give_a_token_outside_the_weights_nan_rows_not_a_read_past_them():
    """Values of a CUDA token_group are not checked on the host (a sync every call): the kernels
    (the op called below the check, here on CPU) make that token's rows NaN and leave it out of the
    weight gradients, where they read, and added to, memory past the (G, D) weight."""
    case = q, k, qw, kw_, cos, sin, bad, good = bad_token_case()
    leaves = [t.clone().requires_grad_() for t in (q, k, qw, kw_)]
    qo, ko, _, _ = _fwd_op(*leaves, cos, sin, bad, 1e-6)
    assert qo[:, ~good].isnan().all() and ko[:, ~good].isnan().all()
    sub, ref = reference_on_good_tokens(*case)
    torch.testing.assert_close(qo[:, good], ref[0], atol=1e-5, rtol=1e-5)
    dq, _, dqw, _ = torch.autograd.grad((qo[:, good].sum() + ko[:, good].sum()), leaves)
    assert dq[:, ~good].isnan().all() and dq[:, good].isfinite().all() and dqw.isfinite().all()
    torch.testing.assert_close(dqw, torch.autograd.grad(ref[0].sum() + ref[1].sum(), sub[2])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B,S,H,D,G,rope", [(2, 19, 3, 16, 2, True), (1, 9, 2, 8, 0, False), (2, 5, 1, 32, 3, True)])
def test_written_out_backward_is_autograd_of_the_reference(B, S, H, D, G, rope):
    """norm_rope_bwd (the gradients ring attention's eager path computes inside its custom op)
    against autograd through norm_rope, in fp64; (G, D) weights with a token's row picked by
    token_group, a (D,) weight, a (G, D) weight without token_group (every token on row 0)."""
    from kiln.kernels.qk_norm_rope import norm_rope, norm_rope_bwd

    (x, _, _, w, _), kw = make_case(B, S, H, D, G, rope, False, False, torch.float64, seed=S)
    cos, sin, group = kw.get("cos"), kw.get("sin"), kw.get("token_group")
    if G == 3:
        group = None
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    want = torch.autograd.grad(norm_rope(x, w, group, cos, sin, 1e-6, torch.float64), (x, w), dy)
    got = norm_rope_bwd(dy, x.detach(), w.detach(), group, cos, sin, 1e-6, torch.float64)
    for name, a, b in zip(("dx", "dweight"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
