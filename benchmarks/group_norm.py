"""GroupNorm benchmark: GB/s and % of measured copy bandwidth, forward and backward.

    kiln bench group_norm [--out FILE.jsonl] [--copy-gbps G] [--timing graph|eager|both]
                          [--providers csrc,triton,torch,...]

Timing: ``graph`` is device time (CUDA-graph replays), ``eager`` includes host overhead. The
2026-11-24 H100 rows were eager only; their ~0.15 ms floor on shapes that move 32-64 MB (10-20 µs
at copy speed) was most likely host time: each op call then spent ~100 µs in the dispatcher's
``find_spec("triton")`` alone (measured on the CPU, fixed 2026-11-25).
Bytes (the traffic floor, CONVENTIONS.md): forward reads x and writes y (2·numel·itemsize);
backward reads x and dy and writes dx (3·numel·itemsize); parameters and statistics are
O(N·C) and ignored. Providers: torch native (F.group_norm), torch.compile of the reference,
apex when installed, kiln triton, kiln csrc (the compiled CUDA kernels,
when built). bf16, G = 32, VAE shapes, NCHW and channels-last.
``csrc`` picks its plan by size (csrc/group_norm_cuda.cu, gn_plan: one launch when the tensors
pass 1 reads exceed the L2); ``csrc-two-pass`` and ``csrc-one-launch`` force each plan
(KILN_CSRC_GN_PLAN), device time only, so one run shows whether that rule is right.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln import kernels
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
from kiln.kernels import autotune

SHAPES = [(1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128), (8, 512, 64, 64)]
PROVIDERS = ("csrc", "csrc-two-pass", "csrc-one-launch", "triton", "torch", "compile", "apex")
# providers that run csrc under one forced NCHW plan (the value of KILN_CSRC_GN_PLAN)
CSRC_PLANS = {"csrc-two-pass": "two_pass", "csrc-one-launch": "pipelined"}


def providers():
    torch._dynamo.reset()  # one compile per case: shapes and layouts would hit the recompile limit (8)
    # the timed backward replays one graph (retain_graph=True), which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    compiled_ref = torch.compile(lambda x, w, b: kernels.group_norm_ref(x, 32, w, b))

    def on(backend):
        def fn(x, w, b):
            with kernels.use_backend(backend):
                return kernels.group_norm(x, 32, w, b)
        return fn

    out = {}
    if kernels.available_backends()["csrc"] is None:
        out = {"csrc": on("csrc")} | dict.fromkeys(CSRC_PLANS, on("csrc"))
    out |= {"triton": on("triton"), "torch": lambda x, w, b: F.group_norm(x, 32, w, b)}
    apex = _apex_provider()
    if apex is not None:
        out["apex"] = apex
    out["compile"] = compiled_ref  # last: its first call per shape compiles (tens of seconds)
    return out


def _apex_provider():
    """NVIDIA apex's GroupNorm (apex.contrib, channels-last kernels; it falls back to torch for
    NCHW and for channel counts outside its list) called with the benchmark's own weight and bias
    through ``functional_call``, so the backward's weight and bias gradients are apex's too. None
    without apex (not on the package registries: never run here, only where apex is installed)."""
    try:
        from apex.contrib.group_norm import GroupNorm as ApexGroupNorm
    except ImportError:
        return None
    modules = {}

    def fn(x, w, b):
        key = (x.shape[1], x.device, w.dtype)
        if key not in modules:
            modules[key] = ApexGroupNorm(32, x.shape[1], device=x.device, dtype=w.dtype)
        return torch.func.functional_call(modules[key], {"weight": w, "bias": b}, (x,))

    return fn


def _rotation(x: torch.Tensor, min_bytes: float = 4 * 50e6) -> list[torch.Tensor]:
    """Copies of x spanning > 4x the H100's 50 MB L2, cycled so each call reads from HBM."""
    k = max(1, int(-(-min_bytes // (x.numel() * x.element_size()))))
    return [x.clone() for _ in range(k)]


def bench_one(fn, x, w, b, mode, timing="eager"):
    """p20/p50/p80 ms of the forward or backward of ``fn`` over rotated copies of x."""
    xs, i = _rotation(x), [0]

    def nxt():
        i[0] = (i[0] + 1) % len(xs)
        return i[0]

    def make_step():
        if mode == "fwd":
            return lambda: fn(xs[nxt()], w, b)
        leaves = [xi.detach().requires_grad_() for xi in xs]
        ys = [fn(xi, w, b) for xi in leaves]
        dys = [torch.randn_like(y) for y in ys]

        def step():
            j = nxt()
            return torch.autograd.grad(ys[j], (leaves[j], w, b), dys[j], retain_graph=True)

        return step

    return time_ms(make_step, timing)


@contextlib.contextmanager
def _plan(provider: str):
    """KILN_CSRC_GN_PLAN for the whole measurement (the backward reads it when autograd runs it)."""
    plan, saved = CSRC_PLANS.get(provider), os.environ.get("KILN_CSRC_GN_PLAN")
    if plan:
        os.environ["KILN_CSRC_GN_PLAN"] = plan
    try:
        yield
    finally:
        if plan and saved is None:
            os.environ.pop("KILN_CSRC_GN_PLAN")
        elif plan:
            os.environ["KILN_CSRC_GN_PLAN"] = saved


def _measured(name: str, timing: str, timing_modes) -> bool:
    """The forced-plan providers: device time where it is timed."""
    return name not in CSRC_PLANS or timing == ("graph" if "graph" in timing_modes else timing_modes[0])


def _tuned_configs(tag: str) -> dict:
    """The autotuner's knobs chosen for one shape and layout, and every candidate's median when
    they were timed (kernels/autotune.py)."""
    return {"configs": {k: v for k, v in autotune.choices().items() if tag in k},
            "candidate_ms": {k: v for k, v in autotune.timings().items() if tag in k}}


def run(shapes, copy_gbps: float, out: Path | None = None, timing_modes=("graph", "eager"),
        chosen: list[str] | None = None) -> list[dict]:
    """Measure every case (``chosen`` providers, all by default); each row is appended to ``out``
    as soon as it exists."""
    dev = torch.device("cuda")
    prov = provenance(dev)
    rows = []
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(shape, device=dev, dtype=torch.bfloat16)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(shape[1], device=dev, dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn(shape[1], device=dev, dtype=torch.bfloat16, requires_grad=True)
            for (name, fn), (mode, passes), timing in itertools.product(
                    select(providers(), chosen).items(), (("fwd", 2), ("bwd", 3)), timing_modes):
                if not _measured(name, timing, timing_modes):
                    continue
                base = {"op": "group_norm", "provider": name, "mode": mode, "timing": timing, "shape": list(shape),
                        "layout": layout, "dtype": "bf16", **prov}
                tag = f"/{'cl' if layout == 'channels_last' else 'nchw'}/bfloat16/{shape[1]}/"
                with _plan(name):
                    rows.append(bandwidth_row(
                        base, functools.partial(bench_one, fn, x, w, b, mode, timing),
                        passes * x.numel() * x.element_size(), copy_gbps, out,
                        f"{name:8s} {mode} {timing:5s} {shape} {layout:13s}",
                        functools.partial(_tuned_configs, tag) if name == "triton" else None))
    return rows


def main(argv=None) -> None:
    args = bandwidth_parser("kiln bench group_norm", __doc__, PROVIDERS).parse_args(argv)
    rows = run(SHAPES, measured_copy_gbps(args), args.out, timings(args), args.providers)
    ok = [r for r in rows if "gbps" in r]
    for r in ok:
        r["shape"] = "x".join(map(str, r["shape"]))
    print_table(ok, ["shape", "layout", "mode", "timing", "provider", "p50_ms", "gbps", "pct_copy"])
    for r in rows:
        if "error" in r:
            print("error:", r["provider"], r["mode"], r["shape"], r["layout"], r["error"])


if __name__ == "__main__":
    main()
