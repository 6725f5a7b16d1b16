from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kiln.model import MMDiT, MMDiTConfig, count_params, forward_flops, preset
from kiln.model.layers import patchify, unpatchify


def _inputs(cfg, B, H, W, L=7):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    return (torch.randn(B, cfg.in_channels, H, W), torch.rand(B), torch.randn(B, L, cfg.text_dim), mask,
            torch.randn(B, cfg.pooled_dim), torch.tensor([[H, W, 0, 0, H, W]] * B, dtype=torch.float32))


def _small(**kw):
    return MMDiTConfig(width=64, depth=1, single_depth=1, heads=4, patch_size=4, text_dim=24, pooled_dim=20, **kw)


@pytest.mark.parametrize("hw", [(32, 32), (32, 64), (64, 32), (48, 80), (16, 112)])
@pytest.mark.parametrize("channels", [3, 4, 16])
def test_output_shape_any_aspect_ratio_and_channels(hw, channels):
    cfg = _small(in_channels=channels, adaln_zero=False)
    out = MMDiT(cfg)(*_inputs(cfg, 2, *hw))
    assert out.shape == (2, channels, *hw)
    assert torch.isfinite(out).all()


def test_adaln_zero_init_predicts_zero_and_blocks_are_identity():
    cfg = _small()
    model = MMDiT(cfg)
    assert model(*_inputs(cfg, 2, 32, 32)).abs().max() == 0
    for block in model.double_blocks.values():
        assert block.img_mod.weight.abs().sum() == 0 and block.txt_mod.weight.abs().sum() == 0
    assert model.final.weight.abs().sum() == 0


def test_default_init_is_not_zero():
    cfg = _small(adaln_zero=False)
    assert MMDiT(cfg)(*_inputs(cfg, 2, 32, 32)).abs().max() > 0


def test_all_parameters_get_gradients_within_four_updates():
    cfg = _small()
    model = MMDiT(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = _inputs(cfg, 2, 32, 32)
    target = torch.randn_like(inputs[0])
    for _ in range(4):  # adaLN-Zero opens one layer of gates per step, back from the output
        opt.zero_grad()
        (model(*inputs) - target).square().mean().backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_padded_text_tokens_do_not_change_output():
    cfg = _small(adaln_zero=False)
    model = MMDiT(cfg).eval()
    x, t, text, mask, pooled, micro = _inputs(cfg, 2, 32, 32)
    out = model(x, t, text, mask, pooled, micro)
    text2 = text.clone()
    text2[0, 4:] = torch.randn_like(text2[0, 4:]) * 100  # row 0 tokens 4.. are padding
    out2 = model(x, t, text2, mask, pooled, micro)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], model(x, t, text2.roll(1, 0), mask.roll(1, 0), pooled, micro)[1])


def test_qk_norm_off_runs_the_plain_path():
    cfg = _small(qk_norm=False, adaln_zero=False)
    assert torch.isfinite(MMDiT(cfg)(*_inputs(cfg, 2, 32, 48))).all()


def test_patchify_roundtrip():
    x = torch.randn(2, 5, 24, 40)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4, 5, 6, 10), x)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.randn(1, 3, 30, 32), 4)


@pytest.mark.parametrize("hw,L", [((32, 32), 7), ((48, 80), 16)])
def test_flop_formula_matches_flop_counter(hw, L):
    cfg = _small()
    model = MMDiT(cfg)
    # the math SDPA backend decomposes into counted matmuls (CPU flash attention is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*_inputs(cfg, 1, *hw, L=L))
    assert forward_flops(cfg, *hw, L) == counter.get_total_flops()


def test_presets_have_their_advertised_sizes():
    sizes = {name: count_params(preset(name)) for name in ("tiny", "small", "base", "large", "xl")}
    assert 1e6 < sizes["tiny"] < 3e6
    assert 0.9e9 < sizes["base"] < 1.2e9
    assert 2.2e9 < sizes["large"] < 2.8e9
    assert 7.5e9 < sizes["xl"] < 9e9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("branch", ["attention", "mlp", "single", "chunked"])
def test_gated_residual_within_twice_torch_keeping_no_branch(branch, dtype, monkeypatch):
    """x + gate * (sum of linears), the adaLN-Zero gated residual of every block (attention: a
    double-stream projection of a token slice; mlp: its MLP output layer, gelu inside; single:
    a single-stream block's projection plus its MLP output layer; chunked: per-sample weight
    gradients one sample a chunk): output and the gradients of x, gate and every linear's input,
    weight and bias against fp64 within 2x autograd's error at the same precision (bf16: under
    autocast over fp32 weights, as training runs). Autograd keeps the branch for gate's
    gradient (B·S·N values) and more; this keeps nothing its inputs' producers do not."""
    from kernel_rule import assert_within_twice_torch
    from saved_bytes import held_for_backward

    import kiln.model.layers as layers

    B, L, S, N, K, hidden = 3, 77, 77 + 128, 40, 48, 96
    monkeypatch.setattr(layers, "LEAN_GATE_TOKENS", S - L)  # the image tokens of the attention branch
    if branch == "chunked":  # one sample's (N, hidden) fp32 gradient a chunk
        monkeypatch.setattr(layers, "_PER_SAMPLE_BYTES", 4 * N * hidden)
    lins = {"attention": [layers.SliceLinear(K, N)], "mlp": [layers.GeluLinear(hidden, N)],
            "single": [nn.Linear(K, N), layers.GeluLinear(hidden, N, bias=False)]}
    lins = lins["mlp" if branch == "chunked" else branch]
    part = slice(L, None) if branch == "attention" else slice(None)  # the image tokens of (text | image)
    T = S - L if branch == "attention" else S
    inputs0 = [torch.randn(B, S, lin.in_features, dtype=torch.float64) * 2 for lin in lins]
    x0, gate0 = torch.randn(B, T, N, dtype=torch.float64), torch.randn(B, N, dtype=torch.float64)
    dout = torch.randn(B, T, N, dtype=torch.float64)
    autocast = dtype != torch.float32
    weights = torch.float32 if autocast else dtype

    def run(fn, dt, weights_dt):
        x, gate, *hs = (t.to(dt).clone().requires_grad_() for t in (x0, gate0, *inputs0))
        params = [[p.detach().to(weights_dt).clone().requires_grad_() for p in lin.parameters()] for lin in lins]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and dt != torch.float64):
            out = fn(x, gate, [h[:, part] for h in hs], params)
        out.backward(dout.to(out.dtype))
        return [out, x.grad, gate.grad, *(h.grad for h in hs), *(p.grad for ps in params for p in ps)]

    class Branch(nn.Module):  # the linears, called as a block calls them
        def __init__(self):
            super().__init__()
            self.lins = nn.ModuleList(lins)

        def forward(self, x, gate, hs):
            return layers.gated_residual(x, gate, list(zip(self.lins, hs, strict=True)))

    module = Branch()

    def ours(x, gate, hs, params):
        named = dict(zip((n for n, _ in module.named_parameters()), (p for ps in params for p in ps), strict=True))
        return torch.func.functional_call(module, named, (x, gate, hs))

    def plain(x, gate, hs, params):
        y = sum(F.linear(F.gelu(h, approximate="tanh") if isinstance(lin, layers.GeluLinear) else h, *ps)
                for lin, h, ps in zip(lins, hs, params, strict=True))
        return x + gate[:, None] * y

    names = ["out", "dx", "dgate", *(f"dh{i}" for i in range(len(lins))),
             *(f"d{n}{i}" for i, lin in enumerate(lins) for n, _ in lin.named_parameters())]
    assert_within_twice_torch(names, run(ours, dtype, weights), run(plain, torch.float64, torch.float64),
                              run(plain, dtype, weights), dtype)
    module.to(weights)
    params = [list(lin.parameters()) for lin in lins]

    def forward(x, gate, *hs, f):  # autocast exits inside: its cache of bf16 weight copies is not what the graph keeps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return f(x, gate, [h[:, part] for h in hs], params), x, gate, hs  # inputs kept by their producers

    leaves = [t.to(dtype).requires_grad_() for t in (x0, gate0, *inputs0)]
    kept = [held_for_backward(partial(forward, f=f), lambda: [t * 1 for t in leaves]) for f in (ours, plain)]
    assert kept[0] == 0 and kept[1] >= B * T * N * dtype.itemsize, kept
    monkeypatch.setattr(layers, "LEAN_GATE_TOKENS", T + 1)  # fewer tokens a sample: autograd's way, the branch kept
    assert held_for_backward(partial(forward, f=ours), lambda: [t * 1 for t in leaves]) >= B * T * N * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remade_input_linears_within_twice_torch_keeping_only_the_modulation_input(dtype):
    """A single-stream block's QKV and MLP-in reading one adaLN modulation (RemadeInputLinears,
    the modulation made again, once, in the backward; here one linear without bias): outputs and
    the gradients of x, shift, scale, the weights and the bias against fp64 within 2x autograd's
    error at the same precision (bf16: under autocast over fp32 weights, as training runs). It
    keeps what the modulation keeps (x and two fp32 statistics a token), autograd's linears the
    modulated copy too; made again on the forward's backend, h is bit for bit the same."""
    from kernel_rule import assert_within_twice_torch
    from saved_bytes import held_for_backward

    from kiln.kernels import adaln_modulate
    from kiln.kernels.dispatch import implementation
    from kiln.model.layers import RemadeInputLinears

    B, S, W = 2, 77 + 128, 40
    lins = [nn.Linear(W, 96), nn.Linear(W, 56, bias=False)]
    x0, shift0, scale0 = (torch.randn(*shape, dtype=torch.float64) for shape in ((B, S, W), (B, W), (B, W)))
    dys = [torch.randn(B, S, lin.out_features, dtype=torch.float64) for lin in lins]
    autocast = dtype != torch.float32
    weights = torch.float32 if autocast else dtype

    def ours(x, shift, scale, params):
        remake = implementation("adaln_modulate", x, shift, scale)
        h = adaln_modulate(x, shift, scale)
        assert torch.equal(remake(x, shift, scale), h)  # what the backward will multiply by
        wb = [t for ps in params for t in (ps[0], ps[1] if len(ps) > 1 else None)]
        return RemadeInputLinears.apply(h, remake, 3, x, shift, scale, *wb)

    def plain(x, shift, scale, params):
        h = adaln_modulate(x, shift, scale)
        return [F.linear(h, *ps) for ps in params]

    def run(fn, dt, weights_dt):
        x, shift, scale = (t.to(dt).clone().requires_grad_() for t in (x0, shift0, scale0))
        params = [[p.detach().to(weights_dt).clone().requires_grad_() for p in lin.parameters()] for lin in lins]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and dt != torch.float64):
            ys = fn(x, shift, scale, params)
        torch.autograd.backward(ys, [dy.to(y.dtype) for y, dy in zip(ys, dys, strict=True)])
        return [*ys, x.grad, shift.grad, scale.grad, *(p.grad for ps in params for p in ps)]

    names = ["out0", "out1", "dx", "dshift", "dscale", "dweight0", "dbias0", "dweight1"]
    assert_within_twice_torch(names, run(ours, dtype, weights), run(plain, torch.float64, torch.float64),
                              run(plain, dtype, weights), dtype)
    params = [list(lin.to(weights).parameters()) for lin in lins]
    x_leaf, mod_leaf = (t.to(dtype).requires_grad_() for t in (x0, torch.cat([shift0, scale0], -1)))

    def inputs():  # shift and scale are views of one modulation vector, as in the blocks
        return [x_leaf * 1, *(mod_leaf * 1).chunk(2, dim=-1)]

    def forward(x, shift, scale, f):  # autocast exits inside: its bf16 weight copies are not what the graph keeps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return f(x, shift, scale, params)

    kept = [held_for_backward(partial(forward, f=f), inputs)
            for f in (ours, plain, lambda x, shift, scale, params: adaln_modulate(x, shift, scale))]
    assert kept[0] == kept[2] and kept[1] >= kept[2] + B * S * W * dtype.itemsize, kept


def test_invalid_model_config_names_the_field():
    from kiln.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="model.width"):
        MMDiT(MMDiTConfig(width=130, heads=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "slice"])
def test_lean_linears_within_twice_torch_keeping_only_their_input(gelu, dtype):
    """GeluLinear = linear(gelu(h)), whose backward recomputes gelu(h), and SliceLinear =
    linear(h) on a token slice of a (B, S, W) tensor, not contiguous at B = 2, as a double-stream
    block's projections read its attention output: output and gradients of h, weight and bias
    against fp64 within 2x autograd's error at the same precision (bf16: under autocast over
    fp32 weights, as training runs). They keep nothing but their input as it came: autograd
    keeps gelu(h), or the copy F.linear makes of the slice, and the weights' autocast copies."""
    from kernel_rule import assert_within_twice_torch
    from saved_bytes import held_for_backward

    from kiln.model.layers import GeluLinear, SliceLinear

    B, L, S, hidden, out = 2, 77, 77 + 128, 96, 40
    lin = (GeluLinear if gelu else SliceLinear)(hidden, out)
    part = slice(None) if gelu else slice(L, None)  # the image tokens of (text | image)
    h0 = torch.randn(B, S, hidden, dtype=torch.float64) * 2
    dy = torch.randn(B, S if gelu else S - L, out, dtype=torch.float64)
    autocast = dtype != torch.float32

    def run(fn, dt, weights_dt):
        h = h0.to(dt).clone().requires_grad_()
        w, b = (p.detach().to(weights_dt).clone().requires_grad_() for p in (lin.weight, lin.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and dt != torch.float64):
            y = fn(h[:, part], w, b)
        y.backward(dy.to(y.dtype))
        return y, h.grad, w.grad, b.grad

    def plain(h, w, b):
        return F.linear(F.gelu(h, approximate="tanh") if gelu else h, w, b)

    def ours(h, w, b):
        return torch.func.functional_call(lin, {"weight": w, "bias": b}, (h,))

    weights = torch.float32 if autocast else dtype
    assert_within_twice_torch(["out", "dh", "dweight", "dbias"], run(ours, dtype, weights),
                              run(plain, torch.float64, torch.float64), run(plain, dtype, weights), dtype)
    leaf = h0.to(dtype).requires_grad_()
    lin.to(weights)

    def forward(h, f):  # autocast exits inside: its cache of bf16 weight copies is not what the graph keeps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return f(h[:, part], lin.weight, lin.bias), h  # h is returned: something else keeps it
    kept = [held_for_backward(lambda h, f=f: forward(h, f), lambda: (leaf * 1,)) for f in (ours, plain)]
    assert kept[0] == 0 and kept[1] >= B * (S if gelu else S - L) * hidden * dtype.itemsize, kept
