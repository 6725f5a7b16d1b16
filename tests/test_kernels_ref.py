"""The plain-PyTorch references against independent formulations in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from kiln import kernels


def test_rms_norm_matches_definition():
    x, w = torch.randn(3, 5, 48, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(kernels.rms_norm(x, w), ref)
    assert kernels.rms_norm(x.float(), w.float()).dtype == torch.float32


def test_rope_is_a_rotation_matching_complex_multiplication():
    B, S, H, D = 2, 7, 3, 16
    x = torch.randn(B, S, H, D, dtype=torch.float64)
    ang = torch.randn(S, D // 2, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    y = kernels.apply_rope(x, cos, sin)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones_like(ang), ang)[:, None]
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], -1))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def _attention_fp64(q, k, v, qw, kw, cos, sin, group, kpm, causal):
    def norm_rope(x, w):
        w = w[group] if w.dim() == 2 else w.expand(x.shape[1], -1)
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w[:, None]
        if cos is not None:
            y = y * cos[:, None] + kernels.rotate_half(y) * sin[:, None]
        return y

    qn, kn = norm_rope(q, qw), norm_rope(k, kw)
    s = torch.einsum("bqhd,bkhd->bhqk", qn, kn) / math.sqrt(q.shape[-1])
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] & (kpm[:, None, None, :] if kpm is not None else True)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_qk_norm_attention_ref_matches_explicit_softmax(groups, causal, rope):
    B, S, H, D = 2, 13, 3, 16
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    shape = (groups, D) if groups == 2 else (D,)
    qw, kw = torch.rand(shape, dtype=torch.float64) + 0.5, torch.rand(shape, dtype=torch.float64) + 0.5
    group = (torch.arange(S) >= 5).long()
    cos = sin = None
    if rope:
        ang = torch.randn(S, D // 2, dtype=torch.float64)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[0, :3] = False  # leading padding: with causal, queries 0-2 of row 0 see no key
    kpm[1, 9:] = False
    out = kernels.qk_norm_attention(q, k, v, qw, kw, cos=cos, sin=sin, token_group=group,
                                    key_padding_mask=kpm, causal=causal)
    ref = _attention_fp64(q, k, v, qw, kw, cos, sin, group, kpm, causal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_qk_norm_attention_on_packed_qkv_views():
    B, S, H, D = 2, 9, 2, 16
    qkv = torch.randn(B, S, 3, H, D)
    w = torch.ones(D)
    out = kernels.qk_norm_attention(*qkv.unbind(2), w, w)
    ref = kernels.qk_norm_attention(*(t.contiguous() for t in qkv.unbind(2)), w, w)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm_ref_matches_nn_and_keeps_format(memory_format):
    x = torch.randn(2, 96, 5, 7).to(memory_format=memory_format)
    w, b = torch.randn(96), torch.randn(96)
    scale, shift = torch.randn(2, 96), torch.randn(2, 96)
    y = kernels.group_norm(x, 32, w, b, scale=scale, shift=shift, activation="silu")
    ref = F.silu(F.group_norm(x, 32, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=memory_format)


def test_group_norm_5d_and_errors():
    x = torch.randn(1, 6, 3, 4, 5)
    torch.testing.assert_close(kernels.group_norm(x, 3), F.group_norm(x, 3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        kernels.group_norm(x, 4)
    with pytest.raises(ValueError, match="activation"):
        kernels.group_norm(x, 3, activation="relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaln_modulate_gradients_within_twice_torch_keeping_x_and_statistics(dtype):
    """The torch backend's own backward (x and per-token statistics kept, the normalised x
    recomputed) against fp64, within 2x autograd-through-the-reference's error in the same
    dtype, for the output and the gradients of x, shift and scale; and what it keeps."""
    from kernel_rule import assert_within_twice_torch
    from saved_bytes import held_for_backward

    B, S, C = 3, 77 + 128, 96
    x0 = torch.randn(B, S, C, dtype=torch.float64) * 3 + 1  # an offset mean: cancellation in LN
    shift0, scale0 = torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, dtype=torch.float64)
    dy = torch.randn(B, S, C, dtype=torch.float64)

    def run(fn, dt):
        x, shift, scale = (t.to(dt).clone().requires_grad_() for t in (x0, shift0, scale0))
        y = fn(x, shift, scale)
        y.backward(dy.to(dt))
        return y, x.grad, shift.grad, scale.grad

    ours, ref, lowp = run(kernels.adaln_modulate, dtype), run(kernels.adaln_modulate_ref, torch.float64), \
        run(kernels.adaln_modulate_ref, dtype)
    assert_within_twice_torch(["out", "dx", "dshift", "dscale"], ours, ref, lowp, dtype)
    # kept for the backward: x in its dtype and fp32 mean and 1/std per token (shift and scale
    # come from outside); autograd through the reference keeps an fp32 x and fp32 LN(x)
    leaf = x0.to(dtype).requires_grad_()
    shift, scale = (t.to(dtype).clone().requires_grad_() for t in (shift0, scale0))  # as the model's are
    held = [held_for_backward(lambda x, f=f: f(x, shift, scale), lambda: (leaf * 1,))
            for f in (kernels.adaln_modulate, kernels.adaln_modulate_ref)]
    size = dtype.itemsize
    assert held[0] == B * S * (C * size + 2 * 4), held
    assert held[1] >= B * S * C * (4 + 4) > held[0], held


def test_adaln_modulate_matches_layer_norm():
    x = torch.randn(3, 11, 40, dtype=torch.float64)
    shift, scale = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(kernels.adaln_modulate(x, shift, scale), ref)
