"""FlashAttention's test idiom, shared by the kernel tests.

max|ours - ref_fp64| <= 2 * max|torch_lowp - ref_fp64| + floor · (1 + max|ref|) for the output
and every gradient, where torch_lowp is the plain-PyTorch op in the same low precision.
"""

import json
import os
import subprocess
import sys

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_within_twice_torch(names, ours, ref, lowp, dtype):
    for name, o, r, lo in zip(names, ours, ref, lowp, strict=True):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        err = (o.double() - r).abs().max().item()
        bound = 2 * (lo.double() - r).abs().max().item() + FLOOR[dtype] * (1 + r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def sm90_reports(module: str, function: str = "compile_for_sm90", *args) -> list[dict]:
    """``module.function(*args)`` (an ahead-of-time compile for a GPU) in a subprocess without
    TRITON_INTERPRET (the interpreter's kernels cannot be compiled); returns its per-kernel
    reports, printed for ``pytest -s``."""
    code = f"import json; from {module} import {function}; print(json.dumps({function}(*{args!r})))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in reports:
        print(r)
    return reports


def fake_cuda_tensor(monkeypatch, shape: tuple, major: int, minor: int, name: str,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CUDA tensor without a GPU (a FakeTensor: shapes, dtypes and devices, no data) on a GPU
    that ``torch.cuda.get_device_properties`` reports as ``name`` of compute capability
    major.minor: what the dispatch point's per-GPU reasons look at."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=major, minor=minor, name=name))
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype, device="cuda")
