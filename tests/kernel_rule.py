"""FlashAttention's test idiom, shared by the kernel tests.

max|ours - ref_fp64| <= 2 * max|torch_lowp - ref_fp64| + floor · (1 + max|ref|) for the output
and every gradient, where torch_lowp is the plain-PyTorch op in the same low precision.
"""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_within_twice_torch(names, ours, ref, lowp, dtype):
    for name, o, r, lo in zip(names, ours, ref, lowp, strict=True):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        err = (o.double() - r).abs().max().item()
        bound = 2 * (lo.double() - r).abs().max().item() + FLOOR[dtype] * (1 + r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
