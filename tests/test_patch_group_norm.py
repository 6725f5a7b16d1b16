"""patch_group_norm on a diffusers AutoencoderKL (built from a config, random weights, offline)."""

import copy

import diffusers  # the test extra installs it
import torch

from kiln import kernels


def _vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def test_patch_counts_and_keeps_state_dict():
    vae = _vae()
    native = sum(type(m) is torch.nn.GroupNorm for m in vae.modules())
    state = copy.deepcopy(vae.state_dict())
    assert kernels.patch_group_norm(vae) == native > 0
    assert not any(type(m) is torch.nn.GroupNorm for m in vae.modules())
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())


def test_patched_vae_matches_outputs_and_gradients_on_triton():
    ref_vae, vae = _vae(), _vae()
    kernels.patch_group_norm(vae)
    x = torch.randn(1, 3, 16, 16)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = ref_vae.decode(ref_vae.encode(xr).latent_dist.mean).sample
    with kernels.use_backend("triton"):
        out = vae.decode(vae.encode(xp).latent_dist.mean).sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    out.backward(dy)
    torch.testing.assert_close(xp.grad, xr.grad, atol=1e-4, rtol=1e-4)
    g_ref = dict(ref_vae.named_parameters())
    for name, p in vae.named_parameters():
        if "norm" in name:
            torch.testing.assert_close(p.grad, g_ref[name].grad, atol=1e-4, rtol=1e-4)


def test_patched_module_takes_every_shape_nn_group_norm_takes():
    # (N, C) features and 4 spatial dims are outside the op's (N, C, 1-3 spatial dims): the module
    # runs them flattened to (N, C, L) rather than raising inside a patched model
    torch.manual_seed(1)
    native = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(native.weight)
    torch.nn.init.normal_(native.bias)
    patched = copy.deepcopy(native)
    assert kernels.patch_group_norm(patched) == 1
    for shape in [(3, 8), (2, 8, 3, 2, 2, 3)]:
        x = torch.randn(shape)
        with kernels.use_backend("triton"):
            y = patched(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, native(x), atol=1e-5, rtol=1e-5)
