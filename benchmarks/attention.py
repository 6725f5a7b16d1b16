"""QK-norm + RoPE attention benchmark: TFLOP/s forward, backward and forward+backward.

    kiln bench attention [--out FILE.jsonl] [--shapes all|target|rest] [--providers triton,eager,...]

FLOPs (attention matmuls only, CONVENTIONS.md): forward 4·B·H·S²·D (QKᵀ and PV), backward
2.5x that (five matmuls against two), halved for causal; the norm and RoPE are O(B·S·H·D) and
count as zero, so a provider that spends time on them scores lower — that is the point.
Providers:
  eager       kiln.kernels.qk_norm_attention_ref (norm + RoPE in fp32 eager ops, then SDPA)
  compile     torch.compile of the same reference
  sdpa-flash  SDPA (flash backend) on pre-normalised Q, K: the attention-only lower bound
  sdpa-cudnn  SDPA (cuDNN backend) on pre-normalised Q, K
  flash-attn  flash_attn_func on pre-normalised Q, K (when installed)
  triton      kiln's whole op (pre-pass + flash attention), use_backend("triton"); launch configs
              autotuned on first use (rows carry the choices, kernels/autotune.py)
  triton-default  the same with every kernel at its default config (what deterministic mode runs)
  triton-core kiln's attention kernels alone on pre-normalised Q, K (the "attention core" target);
              its backward is whichever of the two modes the autotuner timed faster
  core-separate, core-atomic  the same with the backward forced to one mode: dK/dV and dQ kernels
              (deterministic), or dQ added by the dK/dV kernel's fp32 atomics (KILN_ATTN_BWD)
  prepass+cudnn  kiln's Triton norm+RoPE pre-pass (kiln.kernels.qk_norm_rope) then cuDNN SDPA:
              the other whole-op design; whichever of it and "triton" wins is the one to ship
  csrc+cudnn  the compiled (csrc) norm+RoPE pre-kernel then cuDNN SDPA: the model's
              attention="norm_rope_sdpa" path with train.kernel_backend=csrc
Shapes: DiT sequence lengths 1k-16k including 4096 image + 77 text tokens, D = 64 and 128,
H·D = 1536 and 3072, bf16, ~16k tokens per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln import kernels
from kiln.benchmarks.common import add_provider_arg, append_rows, print_table, provenance, select
from kiln.kernels import autotune

# (S, H, D): B = max(1, 16384 // S). The target shape (issue 4: D = 128, S >= 4096) first: rows are
# appended as they are measured, so a run cut short by a device call's time limit still has it.
SHAPES = [(4173, 24, 128), (8192, 24, 128), (16384, 24, 128), (4173, 12, 128), (4173, 24, 64), (1024, 24, 64)]
SHAPE_SETS = {"all": SHAPES, "target": SHAPES[:1], "rest": SHAPES[1:]}
PROVIDERS = ("triton", "triton-default", "triton-core", "core-separate", "core-atomic", "prepass+cudnn", "csrc+cudnn",
             "eager", "sdpa-flash", "sdpa-cudnn", "flash-attn", "compile")


def make_inputs(S, H, D, device, dtype=torch.bfloat16):
    B = max(1, 16384 // S)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    n_text = 77 if S % 1024 else 0
    q_weight = torch.ones(2, D, device=device, dtype=dtype)
    k_weight = torch.ones(2, D, device=device, dtype=dtype)
    token_group = (torch.arange(S, device=device) >= n_text).long()
    ang = torch.rand(S, D // 2, device=device) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kw = {"cos": cos, "sin": sin, "token_group": token_group}
    return (q, k, v, q_weight, k_weight), kw


def providers(kw):
    torch._dynamo.reset()
    torch._functorch.config.donated_buffer = False  # the timed backward replays one graph

    def whole(backend, defaults=False):
        def fn(q, k, v, qw, kw_):
            with kernels.use_backend(backend), (autotune.defaults_only() if defaults else contextlib.nullcontext()):
                return kernels.qk_norm_attention(q, k, v, qw, kw_, **kw)
        return fn

    def sdpa(backend):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

        def fn(q, k, v, qw, kw_):  # q, k already normalised: attention only
            with sdpa_kernel([which]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return fn

    def triton_core(bwd_mode=None):
        def fn(q, k, v, qw, kw_):
            return _CoreAttention.apply(q, k, v, bwd_mode)
        return fn

    def prepass_cudnn(backend):
        def fn(q, k, v, qw, kw_):
            with kernels.use_backend(backend):
                qn, kn = kernels.qk_norm_rope(q, k, qw, kw_, **kw)
            return sdpa("cudnn")(qn, kn, v, qw, kw_)
        return fn

    out = {"triton": whole("triton"), "triton-default": whole("triton", defaults=True),
           "triton-core": triton_core(), "core-separate": triton_core("separate"),
           "core-atomic": triton_core("atomic"), "prepass+cudnn": prepass_cudnn("triton"),
           "eager": whole("torch"),
           "sdpa-flash": sdpa("flash"), "sdpa-cudnn": sdpa("cudnn")}
    if kernels.available_backends()["csrc"] is None:
        out["csrc+cudnn"] = prepass_cudnn("csrc")
    try:
        from flash_attn import flash_attn_func

        out["flash-attn"] = lambda q, k, v, qw, kw_: flash_attn_func(q, k, v)
    except ImportError:
        pass
    ref = torch.compile(lambda q, k, v, qw, kw_: kernels.qk_norm_attention_ref(q, k, v, qw, kw_, upcast=False, **kw))
    out["compile"] = ref  # last: its first call per shape compiles
    return out


class _CoreAttention(torch.autograd.Function):
    """kiln's attention kernels without the norm pre-pass (for the attention-core number)."""

    @staticmethod
    def forward(ctx, q, k, v, bwd_mode):
        from kiln.kernels.qk_norm_attention_triton import attention_fwd

        out, lse = attention_fwd(q, k, v, None, 1 / math.sqrt(q.shape[-1]), False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd_mode = bwd_mode
        return out

    @staticmethod
    def backward(ctx, dout):
        from kiln.kernels.qk_norm_attention_triton import attention_bwd

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, None, 1 / math.sqrt(q.shape[-1]), False, ctx.bwd_mode)
        return dq, dk, dv, None


def bench_one(fn, args, mode):
    from triton.testing import do_bench

    if mode == "fwd":
        return do_bench(lambda: fn(*args), quantiles=[0.2, 0.5, 0.8])
    leaves = [a.detach().requires_grad_() for a in args]
    if mode == "fwd+bwd":
        def step():
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves[:3], torch.ones_like(out))
        return do_bench(step, quantiles=[0.2, 0.5, 0.8])
    out = fn(*leaves)
    dout = torch.randn_like(out)
    return do_bench(lambda: torch.autograd.grad(out, leaves[:3], dout, retain_graph=True), quantiles=[0.2, 0.5, 0.8])


def _for_shape(table: dict, S, D) -> dict:
    """The entries of an autotuner table (choices or timings) for this shape class (key:
    kernel/dtype/D/pad/causal/tma/S class/B·H class/GPU; the S class is read from the end, so
    flags added to the key do not shift it)."""
    return {k: v for k, v in table.items()
            if k.split("/")[2] == str(D) and k.split("/")[-3] == str(autotune.size_class(S))}


def flops(B, S, H, D, mode):
    fwd = 4 * B * H * S * S * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def run(shapes, out: Path | None = None, chosen: list[str] | None = None) -> list[dict]:
    dev = torch.device("cuda")
    prov, rows = provenance(dev), []
    for S, H, D in shapes:
        args, kw = make_inputs(S, H, D, dev)
        B = args[0].shape[0]
        for name, fn in select(providers(kw), chosen).items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                if mode == "fwd" and name.startswith("core-"):  # the same forward as triton-core
                    continue
                base = {"op": "qk_norm_attention", "provider": name, "mode": mode, "B": B, "S": S, "H": H, "D": D,
                        "dtype": "bf16", **prov}
                try:
                    q = bench_one(fn, args, mode)
                except Exception as e:  # a provider that cannot run a case says why
                    rows.append({**base, "error": f"{type(e).__name__}: {e}"[:200]})
                    append_rows(out, rows[-1:])
                    continue
                tflops = flops(B, S, H, D, mode) / (q[1] / 1e3) / 1e12
                rows.append({**base, "p20_ms": q[0], "p50_ms": q[1], "p80_ms": q[2], "tflops": tflops})
                if name in ("triton", "triton-core", "core-separate", "core-atomic"):
                    rows[-1]["configs"] = _for_shape(autotune.choices(), S, D)
                    rows[-1]["candidate_ms"] = _for_shape(autotune.timings(), S, D)
                append_rows(out, rows[-1:])
                print(f"{name:12s} {mode:8s} B{B} S{S} H{H} D{D} {q[1]:.3f} ms {tflops:6.1f} TFLOP/s", flush=True)
    return rows


def add_shapes_arg(p) -> None:
    p.add_argument("--shapes", choices=tuple(SHAPE_SETS), default="all",
                   help="target: S = 4096 + 77, H 24, D 128 only (issue 4's target shape); rest: the others")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kiln bench attention", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    add_shapes_arg(p)
    add_provider_arg(p, PROVIDERS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kiln bench attention: needs a CUDA device")
    rows = run(SHAPE_SETS[args.shapes], args.out, args.providers)
    ok = [r for r in rows if "tflops" in r]
    print_table(ok, ["S", "H", "D", "mode", "provider", "p50_ms", "tflops"])
    for r in rows:
        if "error" in r:
            print("error:", r["provider"], r["mode"], r["S"], r["error"])
