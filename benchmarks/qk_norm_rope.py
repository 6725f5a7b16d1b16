"""QK RMSNorm + RoPE pre-kernel benchmark: GB/s and % of measured copy bandwidth, fwd and bwd.

    kiln bench qk_norm_rope [--out FILE.jsonl] [--copy-gbps G] [--timing graph|eager|both]
                            [--shapes all|target|rest]
                            [--providers csrc,triton,...]

Bytes (the traffic floor): forward reads q, k and writes q_out, k_out (4·numel·itemsize, numel
of one of q/k); backward reads dq_out, dk_out, q, k and writes dq, dk (6·numel·itemsize). The
(S, D) RoPE tables, weights and (B, S, H) statistics are small and ignored.
Providers: eager (kiln.kernels.qk_norm_rope_ref: fp32 norm + RoPE in eager ops, what a model
without kernels runs), compile (torch.compile of it), triton (kiln's Triton pre-pass), csrc
(kiln's compiled CUDA kernel, when built). q and k are views of a packed (B, S, 3, H, D) QKV,
as in the model. Shapes: the attention benchmark's DiT shapes, bf16.
Targets (issue 7): csrc >= 80% of copy bandwidth and >= 5x eager.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import torch

from kiln import kernels
from kiln.benchmarks.attention import SHAPE_SETS, add_shapes_arg, make_inputs
from kiln.benchmarks.common import (
    bandwidth_parser,
    bandwidth_row,
    measured_copy_gbps,
    print_table,
    provenance,
    select,
    time_ms,
    timings,
)

PROVIDERS = ("csrc", "triton", "eager", "compile")


def providers(kw):
    torch._dynamo.reset()
    torch._functorch.config.donated_buffer = False  # the timed backward replays one graph

    def on(backend):
        def fn(q, k, qw, kw_):
            with kernels.use_backend(backend):
                return kernels.qk_norm_rope(q, k, qw, kw_, **kw)
        return fn

    out = {"triton": on("triton"), "eager": lambda q, k, qw, kw_: kernels.qk_norm_rope_ref(q, k, qw, kw_, **kw)}
    if kernels.available_backends()["csrc"] is None:
        out = {"csrc": on("csrc"), **out}
    out["compile"] = torch.compile(lambda q, k, qw, kw_: kernels.qk_norm_rope_ref(q, k, qw, kw_, **kw))
    return out


def bench_one(fn, q, k, qw, kw_, mode, timing="eager"):
    def make_step():
        if mode == "fwd":
            return lambda: fn(q, k, qw, kw_)
        leaves = [t.detach().requires_grad_() for t in (q, k)]
        outs = fn(*leaves, qw, kw_)
        douts = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, leaves, douts, retain_graph=True)

    return time_ms(make_step, timing)


def run(shapes, copy_gbps: float, out: Path | None = None, timing_modes=("graph", "eager"),
        chosen: list[str] | None = None) -> list[dict]:
    dev = torch.device("cuda")
    prov, rows = provenance(dev), []
    for S, H, D in shapes:
        (q, k, v, qw, kw_), kw = make_inputs(S, H, D, dev)
        qkv = torch.stack([q, k, v], 2)  # (B, S, 3, H, D): q, k below are strided views
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        base = {"op": "qk_norm_rope", "B": q.shape[0], "S": S, "H": H, "D": D, "dtype": "bf16", **prov}
        for (name, fn), (mode, passes), timing in itertools.product(
                select(providers(kw), chosen).items(), (("fwd", 4), ("bwd", 6)), timing_modes):
            case = {**base, "provider": name, "mode": mode, "timing": timing}
            rows.append(bandwidth_row(
                case, functools.partial(bench_one, fn, q, k, qw, kw_, mode, timing),
                passes * q.numel() * q.element_size(), copy_gbps, out,
                f"{name:8s} {mode} {timing:5s} S={S} H={H} D={D}"))
    return rows


def main(argv=None) -> None:
    p = bandwidth_parser("kiln bench qk_norm_rope", __doc__, PROVIDERS)
    add_shapes_arg(p)
    args = p.parse_args(argv)
    rows = run(SHAPE_SETS[args.shapes], measured_copy_gbps(args), args.out, timings(args), args.providers)
    print_table([r for r in rows if "gbps" in r],
                ["S", "H", "D", "mode", "timing", "provider", "p50_ms", "gbps", "pct_copy"])
    for r in rows:
        if "error" in r:
            print("error:", r["provider"], r["mode"], r["S"], r["error"])


if __name__ == "__main__":
    main()
