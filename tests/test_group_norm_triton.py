"""Triton GroupNorm under TRITON_INTERPRET=1 (CPU) — FlashAttention's 2x rule for the output and
every gradient: max|out - ref_fp64| <= 2 * max|torch_lowp - ref_fp64| + floor."""


import math

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401 (the @triton.jit function below must see it)
from kernel_rule import assert_within_twice_torch, sm90_reports

from kiln import kernels
from kiln.kernels import group_norm_triton_pipelined as gnp
from kiln.kernels.group_norm import _gn_bwd_op, _gn_fwd_op


def _inputs(shape, groups, dtype, channels_last, affine, modulate, seed):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    p = {}
    if affine:
        p["weight"] = (torch.rand(C, generator=g) + 0.5).to(dtype)
        p["bias"] = torch.randn(C, generator=g).to(dtype)
    if modulate:
        p["scale"] = (torch.randn(N, C, generator=g) * 0.5).to(dtype)
        p["shift"] = torch.randn(N, C, generator=g).to(dtype)
    return x, p


def _run(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    out = fn(x, params)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in (x, *params.values())]


CASES = [
    # shape, groups, channels_last, affine, modulate, activation
    ((1, 96, 7, 9), 32, False, True, False, None),
    ((2, 320, 5, 3), 32, True, True, True, "silu"),
    ((1, 64, 33, 17), 1, False, False, True, None),
    ((3, 96, 4, 4), 32, True, False, False, "silu"),
    ((1, 32, 3, 5, 6), 8, False, True, True, "silu"),
    ((2, 32, 2, 3, 5), 4, True, True, False, None),
    ((2, 48, 50), 16, False, True, True, "silu"),
    ((1, 640, 6, 5), 32, False, True, False, "silu"),
    # channels-last with several token chunks per sample (1200 tokens > BLOCK_S) and a C that
    # is not a multiple of 32 (a masked channel block)
    ((1, 64, 40, 30), 32, True, True, True, "silu"),
    ((2, 48, 9, 7), 16, True, True, False, None),
]


def check_against_reference(case, dtype, device="cpu", backend="triton"):
    shape, groups, channels_last, affine, modulate, act = case
    x, params = _inputs(shape, groups, dtype, channels_last, affine, modulate, seed=sum(shape) + groups)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    x, dy, params = x.to(device), dy.to(device), {k: v.to(device) for k, v in params.items()}

    def op(x, p, upcast=None):
        if upcast is not None:
            return kernels.group_norm_ref(x, groups, eps=1e-5, activation=act, upcast=upcast, **p)
        with kernels.use_backend(backend):
            return kernels.group_norm(x, groups, eps=1e-5, activation=act, **p)

    ref = _run(lambda x, p: op(x, p, upcast=True), x.double(), {k: v.double() for k, v in params.items()},
               dy.double())
    lowp = _run(lambda x, p: op(x, p, upcast=False), x, params, dy)
    ours = _run(op, x, params, dy)
    assert all(o.dtype == dtype for o in ours)
    assert_within_twice_torch(["out", "dx", *params], ours, ref, lowp, dtype)
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    assert ours[0].is_contiguous(memory_format=fmt) and ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'nc'}" for c in CASES])
def test_matches_fp64_reference_within_twice_torch_error(case, dtype):
    check_against_reference(case, dtype)


# NCHW cases whose groups fit one program (group_norm_triton_onepass.CANDIDATES): odd spatial
# sizes, G = 1 and 32, 3-5 dims, with and without modulation and SiLU
# (backend, the limit lowered so that two samples of (5, 32, 6, 7) with G = 8 fit a chunk): the
# csrc NCHW kernels' grid rows (N·G blocks along y), the Triton kernels' 32-bit offsets
GN_CHUNK_LIMITS = {"csrc": ("MAX_GRID_Y", 2 * 8 + 1), "triton": ("MAX_OFFSET", 2 * 32 * 6 * 7 - 1)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend", list(GN_CHUNK_LIMITS))
def test_past_a_grids_rows_or_32_bit_offsets_runs_in_sample_chunks(monkeypatch, backend, channels_last):
    """Past dispatch.MAX_GRID_Y blocks along y (where the csrc NCHW kernels put N·G) or
    MAX_OFFSET elements (the Triton kernels' 32-bit offsets) GroupNorm runs on chunks of whole
    samples: the output and dx bit for bit, the memory format kept, the parameters' gradients
    summed over the chunks. A sample alone past 32-bit offsets is refused by Triton."""
    import importlib

    from kiln.kernels import dispatch

    gn = importlib.import_module("kiln.kernels.group_norm")  # (kiln.kernels.group_norm is also the op)
    x, p = _inputs((5, 32, 6, 7), 8, torch.float32, channels_last, True, True, seed=21)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(22))

    def fn(x, params):
        with kernels.use_backend(backend):
            return kernels.group_norm(x, 8, params["weight"], params["bias"], scale=params["scale"],
                                      shift=params["shift"], activation="silu")

    whole = _run(fn, x, p, dy)
    rows, run = [], gn._gn_run
    monkeypatch.setattr(gn, "_gn_run", lambda fwd, x, *a, **k: rows.append(x.shape[0]) or run(fwd, x, *a, **k))
    monkeypatch.setattr(dispatch, *GN_CHUNK_LIMITS[backend])
    chunked = _run(fn, x, p, dy)
    assert rows == [2, 2, 1]
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for a, b in zip(whole[2:], chunked[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if backend == "triton":
        monkeypatch.setattr(dispatch, "MAX_OFFSET", 32 * 6 * 7 - 2)
        with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="32-bit offsets"):
            kernels.group_norm(x, 8)


def _fits_one_program(case) -> bool:
    (shape, groups), spatial = case[:2], math.prod(case[0][2:])
    return (1 << (shape[1] // groups - 1).bit_length()) * (1 << (spatial - 1).bit_length()) <= 16384


ONEPASS_CASES = [c for c in CASES if not c[2] and _fits_one_program(c)] + [
    ((2, 320, 8, 12), 32, False, True, True, "silu"), ((1, 24, 9, 11), 1, False, False, True, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ONEPASS_CASES, ids=[f"{c[0]}-G{c[1]}" for c in ONEPASS_CASES])
def test_onepass_candidates_match_the_reference(case, dtype, monkeypatch):
    """The one-pass kernels (a whole group per program, x read once) pass the same 2x rule as the
    two-pass path, forced here (the autotuner picks them only by timing on a GPU)."""
    used = _forced(monkeypatch, "onepass")
    check_against_reference(case, dtype)
    assert len(used) == 2  # forward and backward


def _forced(monkeypatch, kind):
    """Offer the autotuner only the first candidate of ``kind``; returns the list of those used."""
    from kiln.kernels import group_norm_triton as gnt

    full, used = gnt.candidates, []

    def only(x, num_groups):
        picked = [k for k in full(x, num_groups) if k.kind == kind][:1]
        used.extend(picked)
        return picked

    monkeypatch.setattr(gnt, "candidates", only)
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'nc'}" for c in CASES])
def test_pipelined_candidates_match_the_reference(case, dtype, monkeypatch):
    """The one-launch kernels (pass 2 of a group, or of a block of groups in channels-last, behind
    its pass 1; work claimed by an atomic ticket; statistics published through flags) pass the
    2x rule, forced here."""
    used = _forced(monkeypatch, "pipelined")
    check_against_reference(case, dtype)
    assert len(used) == 2


def test_pipelined_forward_launches_with_its_register_cap(monkeypatch):
    """The first one-launch candidate's forward launches with maxnreg = its fwd_registers (as the
    sm_90a check compiles it: 4 programs of 4 warps fit an SM), its backward uncapped."""
    from kiln.kernels import group_norm_triton_pipelined as pipelined

    launched, real = [], pipelined.run_kernel

    def spy(kernel, grid, *args, **kwargs):
        launched.append((kwargs["BWD"], kwargs.get("maxnreg")))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(pipelined, "run_kernel", spy)
    used = _forced(monkeypatch, "pipelined")
    check_against_reference(CASES[0], torch.bfloat16)
    assert used[0].fwd_registers == 128 and set(launched) == {(False, 128), (True, None)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("lag", [1, 2, 5])
def test_pipelined_schedule_at_every_lag(lag, channels_last, monkeypatch):
    """Every order of the two passes the schedule can take: LAG 1 (a pass 2 right behind each
    pass 1), 2, and every unit's pass 1 first (LAG = the 5 groups of 1x80x28x25 at G = 5, 3
    chunks each; one group per unit in channels-last too, 16 channels each). A pass 2 claimed
    before its unit's statistics would spin out and give NaN (the next test), so a wrong order
    fails here instead of hanging."""
    from kiln.kernels import group_norm_triton_pipelined as pipelined

    used = _forced(monkeypatch, "pipelined")
    monkeypatch.setattr(pipelined, "lag", lambda grid, split, units: min(lag, units))
    case = ((1, 80, 28, 25), 5, channels_last, True, True, "silu")
    x, _ = _inputs(*case[:2], torch.float32, *case[2:5], seed=0)
    cfg = pipelined.schedule(x, 5, pipelined.CANDIDATES[0])
    assert (cfg["split"], cfg["units"]) == (3, 5)
    check_against_reference(case, torch.float32)
    assert len(used) == 2


@triton.jit
def _phases_swapped(t, NG, SPLIT, LAG):
    """The pipelined schedule with every pass 2 claimed before its pass 1."""
    phase, unit, sp = gnp._item_in_order(t, NG, SPLIT, LAG)
    return 1 - phase, unit, sp


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_a_broken_schedule_gives_nan_not_a_hang(channels_last, monkeypatch):
    """Every pass 2 claimed before its pass 1: each wait is bounded, then poisons its unit's
    statistics, so the output is NaN, loud in any loss check, rather than a hang or numbers from
    stale statistics."""
    _forced(monkeypatch, "pipelined")
    monkeypatch.setattr(gnp, "_item_in_order", gnp._item, raising=False)
    monkeypatch.setattr(gnp, "_item", _phases_swapped)
    x, _ = _inputs((1, 80, 28, 25), 5, torch.float32, channels_last, False, False, seed=0)
    with kernels.use_backend("triton"):
        assert kernels.group_norm(x, 5).isnan().all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128), (8, 512, 64, 64)])
def test_pipelined_schedule_keeps_rereads_in_l2(shape, channels_last):
    """The schedule an H100 (132 SMs) gets at issue 5's VAE shapes, bf16, G = 32 (meta tensors,
    no GPU): between a chunk's two reads at most ~25 MB of x and dy are claimed (half the 50 MB
    L2; whole-unit passes would be 134 MB at 1x128x512x512), every unit has several chunks and
    the grid fills the GPU."""
    from kiln.kernels import group_norm_triton_pipelined as pipelined

    x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for knobs in pipelined.CANDIDATES:
        cfg = pipelined.schedule(x, 32, knobs, sms=132)
        assert pipelined.reuse_distance(cfg, x, tensors=2) <= 26e6, cfg
        assert cfg["split"] >= 8 and cfg["grid"] == knobs.programs_per_sm * 132 and cfg["lag"] >= 1
        if channels_last:  # whole groups, 16-byte aligned loads
            width = cfg["UG"] * shape[1] // 32
            assert cfg["UNIT_ALIGN"] == width and width * 2 >= pipelined.MIN_SEGMENT


def test_fp32_matches_reference_closely():
    x, p = _inputs((2, 64, 9, 11), 32, torch.float32, False, True, True, seed=3)
    with kernels.use_backend("triton"):
        y = kernels.group_norm(x, 32, activation="silu", **p)
    torch.testing.assert_close(y, kernels.group_norm_ref(x, 32, activation="silu", **p), atol=1e-5, rtol=1e-5)


def test_scale_without_shift():
    x, p = _inputs((2, 32, 5, 5), 8, torch.float32, False, False, True, seed=4)
    with kernels.use_backend("triton"):
        y = kernels.group_norm(x, 8, scale=p["scale"])
    torch.testing.assert_close(y, kernels.group_norm_ref(x, 8, scale=p["scale"]), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("backend", ["torch", "triton", "csrc"])
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0, 4), (2, 8, 0)], ids=["no-samples", "no-pixels", "no-steps"])
def test_empty_input_gives_empty_output_and_zero_parameter_gradients(backend, shape):
    # an empty batch crashed the Triton launcher (x[0, 0] to key the tuner), an empty spatial extent
    # divided by S = 0 there and F.group_norm refuses it ("Expected HxW > 0"); csrc handled both
    x = torch.randn(shape, requires_grad=True)
    w, b, sc = (torch.randn(*s, requires_grad=True) for s in ((8,), (8,), (shape[0], 8)))
    with kernels.use_backend(backend):
        y = kernels.group_norm(x, 2, w, b, scale=sc, shift=sc * 2, activation="silu")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (w, b, sc))


@pytest.mark.parametrize("backend", ["torch", "triton", "csrc"])
def test_parameter_shapes_are_named_before_any_backend_runs(backend):
    # the Triton kernels index weight/bias by channel and scale/shift by (sample, channel): a (C,)
    # scale read past its end for the second sample, a (C + 1,) weight ran silently
    x = torch.randn(2, 8, 4, 4)
    bad = [({"weight": torch.ones(9)}, r"weight must be \(C,\) = \(8,\), got \(9,\)"),
           ({"bias": torch.ones(1, 8)}, r"bias must be \(C,\)"),
           ({"scale": torch.ones(8), "shift": torch.ones(2, 8)}, r"scale must be \(N, C\) = \(2, 8\), got \(8,\)"),
           ({"shift": torch.ones(3, 8)}, r"shift must be \(N, C\)"),
           ({"num_groups": 0}, "not divisible by num_groups 0")]
    for kw, match in bad:
        kw = dict(kw)
        with pytest.raises(ValueError, match=match), kernels.use_backend(backend):
            kernels.group_norm(x, kw.pop("num_groups", 2), **kw)

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_large_mean_is_stable(channels_last):
    # mean 1000, std 0.1: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance
    x = torch.randn(1, 32, 40, 30) * 0.1 + 1000.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with kernels.use_backend("triton"):
        y = kernels.group_norm(x, 8)
    ref = kernels.group_norm_ref(x.double(), 8)
    torch_err = (torch.nn.functional.group_norm(x, 8).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * torch_err + 1e-4


def test_opcheck_forward_and_backward_ops():
    x, p = _inputs((2, 32, 5, 7), 8, torch.float32, False, True, True, seed=5)
    torch.library.opcheck(_gn_fwd_op, (x, 8, p["weight"], p["bias"], p["scale"], p["shift"], 1e-5, "silu"))
    y, mean, rstd = _gn_fwd_op(x, 8, p["weight"], p["bias"], p["scale"], p["shift"], 1e-5, "silu")
    dy = torch.randn_like(y)
    torch.library.opcheck(_gn_bwd_op, (dy, x, mean, rstd, p["weight"], p["bias"], p["scale"], p["shift"], 8, "silu"))
    xr = x.clone().requires_grad_()
    torch.library.opcheck(_gn_fwd_op, (xr, 8, None, None, None, None, 1e-5, "none"))


def test_torch_compile_fullgraph():
    x, p = _inputs((2, 32, 6, 6), 8, torch.float32, True, True, False, seed=6)
    x.requires_grad_()

    def f(x, w, b):
        return kernels.group_norm(x, 8, w, b, activation="silu")

    seen = []

    def backend(gm, example_inputs):  # record the captured graph's ops, then run it eagerly
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    with kernels.use_backend("triton"):  # chosen outside the graph; dispatch runs at trace time
        out = compiled(x, p["weight"], p["bias"])
        ref = f(x, p["weight"], p["bias"])
    torch.testing.assert_close(out, ref)
    (gc,) = torch.autograd.grad(out.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gc, gr)
    assert "kiln.group_norm_fwd.default" in seen


def test_resident_programs_follow_the_sm90_occupancy_rules():
    """Programs per SM from registers (allocated per warp in 256s), shared memory (plus 1 KB each)
    and the 64-warp limit, the numbers behind loads_in_flight; and what the model gives a kernel."""
    from kiln.kernels.group_norm_triton import Knobs, loads_in_flight
    from kiln.kernels.sm90 import resident_programs

    def report(registers, warps, shared):
        return {"registers": registers, "warps_launched": warps, "shared_bytes": shared}

    assert resident_programs(report(40, 8, 32)) == 6  # 40·32 = 1280 per warp: 51 warps
    assert resident_programs(report(255, 8, 0)) == 1  # 8192 per warp: 8 warps
    assert resident_programs(report(32, 4, 100 * 1024)) == 2  # 228 KB / 101 KB
    assert resident_programs(report(16, 16, 0)) == 4  # the 64-warp limit
    # 4 programs asked, 6 fit: 4 x 2 tiles in flight (stages 3) x 4 KB of bf16 x = 32 KB
    assert loads_in_flight(Knobs(2048, 8, 4, stages=3), report(40, 8, 32), 1, 2) == 32 * 1024
    # unstaged, the backward's x and dy, 2 programs fit: 2 x 1 tile x 4 KB x 2 tensors = 16 KB
    assert loads_in_flight(Knobs(2048, 8, 4), report(127, 8, 0), 2, 2) == 16 * 1024


def test_sm90_compile_check():
    """Every kernel compiles for Hopper (sm_90a) without a GPU, specialised per layout as a real
    launch is, for every launch-knob candidate in bf16: no spills or local memory, the x / dy
    tiles move in 16-byte loads (the old channels-last path emitted 2-byte scalar loads only), or
    in cp.async copies where the candidate is staged, and the defaults keep enough loads in flight
    per SM. In a subprocess without TRITON_INTERPRET."""
    from kiln.kernels.group_norm_triton import CANDIDATES, IN_FLIGHT_TARGET
    from kiln.kernels.group_norm_triton_onepass import CANDIDATES as ONEPASS
    from kiln.kernels.group_norm_triton_pipelined import CANDIDATES as PIPELINED

    reports = sm90_reports("kiln.kernels.group_norm_triton")
    # bf16: every candidate (one-pass ones at 2 channel blocks, pipelined ones at 2 per layout);
    # fp32: the default
    assert len(reports) == 16 * len(CANDIDATES) + 4 * len(ONEPASS) + 8 * len(PIPELINED) + 2 + 16 + 2
    for r in reports:
        assert r["registers"] and r["registers"] <= 255 and r["spills"] == 0 and r["local_ops"] == 0, r
        if "finalize" in r["kernel"]:  # O(N·C) partial sums, no tiles
            continue
        # x (and dy in the backward) in 16-byte loads; 2-byte loads remain only for per-channel
        # vectors (weight, bias, scale, shift, pivot). The old channels-last path loaded x and dy
        # in 2-byte loads only (9-18 LDG.E.U16, no LDG.E.128).
        assert r["global_load_bits"].get("128", 0) >= (2 if "bwd" in r["kernel"] else 1), r
        # stages > 1: the chunk loop's tile loads become cp.async copies into shared memory
        staged = "/s" in r["knobs"]
        assert (r["async_copies"] > 0) == staged, r
        if staged:  # (stages - 1) tiles of 1024+ 16-bit elements in shared memory
            assert r["shared_bytes"] >= 2 * 2048, r
    # The default two-launch candidate and the first one-launch candidate keep enough loads in
    # flight per SM to stream at copy speed (IN_FLIGHT_TARGET, Little's law), in every kernel,
    # layout and direction, bf16 and fp32; the 2026-11-24 default kept 16 KB in the forward.
    for knobs in (CANDIDATES[0], PIPELINED[0]):
        rows = [r for r in reports if r.get("knobs") == str(knobs)]
        assert len(rows) == (32 if knobs.kind == "split" else 8)
        assert min(r["in_flight_bytes"] for r in rows) >= IN_FLIGHT_TARGET, [
            (r["kernel"], r["layout"], r["registers"], r["in_flight_bytes"]) for r in rows]
    old_default = [r["in_flight_bytes"] for r in reports if r.get("knobs") == "tile2048/w8/pps4"]
    assert min(old_default) == IN_FLIGHT_TARGET // 2
