"""CUDA checks of kiln's kernels (Triton and csrc), skipped cleanly without a GPU. They import
nothing beyond torch, triton and kiln's kernels, so they run on the GPU machine's image as it is
(benchmarks/run_gpu_acceptance.sh: ``-k csrc`` and ``-k "not csrc"``)."""

import pytest
import torch
import triton
import triton.language as tl
from test_qk_norm_attention_triton import PRE_HOPPER_CASES

from kiln import kernels
from kiln.kernels.qk_norm_attention_triton import ATTN_CANDIDATES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


GPU_CASES = [
    ((1, 128, 96, 80), 32, False, True, False, None),
    ((1, 128, 96, 80), 32, True, True, True, "silu"),
    ((2, 320, 33, 17), 32, True, True, False, "silu"),
    ((4, 64, 7, 9, 5), 8, False, True, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(i) for i in range(len(GPU_CASES))])
def test_triton_group_norm_on_cuda(case, dtype):
    from test_group_norm_triton import check_against_reference

    check_against_reference(case, dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 333, 4, 64, 2, True, True, False), (1, 1100, 2, 128, 2, True, False, True),
                                  (2, 200, 3, 80, 0, False, True, False)], ids=["mmdit", "causal-1100", "d80"])
def test_triton_qk_norm_attention_on_cuda(case, dtype):
    from test_qk_norm_attention_triton import check

    check(*case, dtype, seed=1, device="cuda")


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("case", [GPU_CASES[0], ((2, 320, 33, 17), 32, True, True, True, "silu"),
                                  ((2, 64, 7, 9, 5), 16, False, True, True, "silu")],
                         ids=["nchw", "cl", "nchw-onepass"])  # the last fits both one-pass knobs
def test_every_group_norm_knob_on_cuda(case, index, monkeypatch):
    """Each GroupNorm launch-knob candidate the autotuner may pick for the case (candidate
    ``index``, wrapping round; the one-pass ones where the group fits, the pipelined ones on
    NCHW) passes the 2x rule."""
    from test_group_norm_triton import check_against_reference

    from kiln.kernels import autotune
    from kiln.kernels import group_norm_triton as gnt

    full = gnt.candidates

    def forced(x, num_groups):
        cands = full(x, num_groups)
        return [cands[index % len(cands)]]

    monkeypatch.setattr(gnt, "candidates", forced)
    autotune.forget()
    check_against_reference(case, torch.bfloat16, device="cuda")


def assert_runs_agree_bitwise(case, backend: str, runs: int = 6) -> None:
    """``runs`` forward + backward passes of a one-launch GroupNorm (bf16, G = 32, SiLU) give the
    same bits: fixed-order reductions, so a chunk that read its unit's statistics before they
    were published would show as a difference."""
    from test_group_norm_triton import _inputs

    x, p = _inputs(case[0], case[1], torch.bfloat16, *case[2:5], seed=11)
    x = x.cuda().requires_grad_()
    p = {k: v.cuda() for k, v in p.items()}
    dy = torch.randn_like(x)
    out = []
    for _ in range(runs):
        with kernels.use_backend(backend):
            y = kernels.group_norm(x, 32, activation="silu", **p)
        (dx,) = torch.autograd.grad(y, x, dy)
        out.append((y, dx))
    for y, dx in out[1:]:
        assert torch.equal(y, out[0][0]) and torch.equal(dx, out[0][1])


@pytest.mark.parametrize("knobs", range(2), ids=["tile2048", "tile4096"])
def test_pipelined_group_norm_at_vae_scale_on_cuda(knobs, monkeypatch):
    """The one-launch GroupNorm where its programs really race: 1x128x512x512 bf16 (32 groups of
    128 chunks, 132-264 programs, a pass 2 one or two groups behind its pass 1). The 2x rule,
    then five more forward + backward runs bitwise equal to the first (fixed-order reductions:
    a chunk read before its group's statistics were published would show as a difference)."""
    from test_group_norm_triton import check_against_reference

    from kiln.kernels import autotune
    from kiln.kernels import group_norm_triton as gnt
    from kiln.kernels import group_norm_triton_pipelined as pipelined

    monkeypatch.setattr(gnt, "candidates", lambda x, num_groups: [pipelined.CANDIDATES[knobs]])
    autotune.forget()
    case = ((1, 128, 512, 512), 32, False, True, True, "silu")
    check_against_reference(case, torch.bfloat16, device="cuda")
    assert_runs_agree_bitwise(case, "triton")


# (D, candidate index, key padding): -k D128 runs one head dim per device call. Padded, every
# block of the forward takes the masked path (keys past S and padded keys as a score bias); at
# D = 128 also unpadded: the forward's unmasked loop over the full key blocks, then one masked.
ATTN_GPU = [(D, i, pad) for D in (64, 128, 256) for i in range(max(map(len, ATTN_CANDIDATES.values())))
            for pad in ((True, False) if D == 128 else (True,))]


@pytest.mark.parametrize("D,index,pad", ATTN_GPU, ids=[f"D{d}-{i}{'-pad' * p}" for d, i, p in ATTN_GPU])
def test_every_attention_launch_config_on_cuda(D, index, pad, monkeypatch):
    """Each launch-config candidate the autotuner may pick (candidate ``index`` of each kernel,
    wrapping round; TMA and warp-specialised candidates included) computes the op within the 2x
    rule, not only the one that wins the timing."""
    from test_qk_norm_attention_triton import check

    from kiln.kernels import autotune
    from kiln.kernels import qk_norm_attention_triton as attn

    full = attn.attn_candidates

    def forced(kernel, dtype, head_dim, tma=False, arch="sm90"):
        cands = full(kernel, dtype, head_dim, tma, arch)
        return [cands[index % len(cands)]]

    monkeypatch.setattr(attn, "attn_candidates", forced)
    monkeypatch.setenv("KILN_ATTN_BWD", "separate")  # the atomic backward's kernels: the next test
    autotune.forget()
    try:
        check(2, 333, 3, D, 2, True, pad, False, torch.bfloat16, seed=index, device="cuda")
    finally:
        autotune.forget()


def test_attention_defaults_on_a_gpu_with_less_shared_memory(monkeypatch):
    """With the GPU's shared memory a program faked down to 120 KB, the launcher's defaults are the
    first candidates whose real (Hopper) compiles fit, found by compiling without launching: dq at
    D = 128 moves off its 128 KB default (64x64/w4/s3; 128x32/w8/s3 takes 112 KB, 2026-12-06),
    and the op still computes within the 2x rule."""
    from test_qk_norm_attention_triton import check

    from kiln.kernels import autotune

    monkeypatch.setenv("KILN_AUTOTUNE", "0")  # the defaults, untimed
    monkeypatch.setattr(autotune, "shared_memory_limit", lambda probe: 120 * 1024)
    autotune.forget()
    try:
        check(2, 333, 3, 128, 2, True, True, False, torch.bfloat16, seed=5, device="cuda")
        moved = {key[0][0] for key, index in autotune._FIRST_FIT.items() if index > 0}
        assert "dq" in moved, autotune._FIRST_FIT
    finally:
        autotune.forget()


def test_attention_with_more_batch_heads_than_a_grid_holds_on_cuda():
    """B·H = 2731 · 24 = 65,544, past the 65,535 programs a CUDA grid takes along y: the kernels
    run on batch chunks (without them the launch fails), within the 2x rule."""
    from test_qk_norm_attention_triton import check

    check(2731, 16, 24, 64, 2, True, True, False, torch.bfloat16, seed=7, device="cuda")


def test_kernels_past_32_bit_offsets_on_cuda():
    """Tensors past 2^31 elements, where the Triton kernels' 32-bit offsets would wrap: an SDXL
    VAE's 128-channel GroupNorm on 17 images at 1024² (2.28e9 elements) and attention on packed
    QKV (60, 4096, 3, 24, 128) (2.26e9): both run on batch chunks; the last image / batch row,
    the one past 2^31, matches the reference on its own."""
    torch.manual_seed(0)
    x = torch.randn(17, 128, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with kernels.use_backend("triton"):
        y = kernels.group_norm(x, 32, activation="silu")
    ref = kernels.group_norm_ref(x[-1:].float(), 32, activation="silu")
    assert (y[-1:].float() - ref).abs().max() < 0.05
    del x, y
    qkv = torch.randn(60, 4096, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(128, device="cuda")
    with kernels.use_backend("triton"):
        out = kernels.qk_norm_attention(*qkv.unbind(2), w, w)
    ref = kernels.qk_norm_attention_ref(*qkv[-1:].float().unbind(2), w, w)
    assert (out[-1:].float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("scale", [None, -0.3])
def test_attention_batch_row_with_every_key_padded_is_zero_on_cuda(scale, monkeypatch):
    """The forward's epilogue zeroes a batch row that kept the padding bias as its max (it averaged
    V before), as the reference does; its gradients stay zero. At the defaults (the epilogue is
    every candidate's): a negative scale is a new specialisation, not worth a tuning round."""
    from test_qk_norm_attention_triton import _run, _triton, make_case

    monkeypatch.setenv("KILN_AUTOTUNE", "0")

    tensors, kw = make_case(3, 300, 2, 128, 2, True, True, False, torch.bfloat16, seed=6)
    tensors, kw = [t.cuda() for t in tensors], {n: v.cuda() if torch.is_tensor(v) else v for n, v in kw.items()}
    kw["key_padding_mask"][1] = False
    kw["scale"] = scale
    ours = _run(_triton, tensors, kw, torch.randn(3, 300, 2, 128, device="cuda", dtype=torch.bfloat16))
    assert (ours[0][1] == 0).all() and (ours[1][1] == 0).all() and ours[0][0].abs().max() > 0


@pytest.mark.parametrize("backend", ["csrc", "triton"])
def test_token_group_outside_the_weights_gives_nan_rows_on_cuda(backend):
    """CUDA token_group values are not checked on the host: a token outside [0, G) gets NaN rows
    (its weight row is not read past the (G, D) weight), the others are unchanged."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k = (torch.randn(2, 13, 3, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    w = 1 + 0.1 * torch.randn(2, 64, device="cuda", generator=g)
    tg = torch.zeros(13, dtype=torch.long, device="cuda")
    tg[5:] = 1
    bad = tg.clone()
    bad[[3, 9]] = torch.tensor([2, -1], device="cuda")
    with kernels.use_backend(backend):
        qo, ko = kernels.qk_norm_rope(q, k, w, w, token_group=bad)
        ref_q, _ = kernels.qk_norm_rope(q, k, w, w, token_group=tg)
    torch.cuda.synchronize()
    good = torch.ones(13, dtype=torch.bool)
    good[[3, 9]] = False
    assert qo[:, ~good].isnan().all() and ko[:, ~good].isnan().all()
    assert torch.equal(qo[:, good], ref_q[:, good])


ATOMIC_GPU = [(d, i) for d in (64, 128) for i in range(len(ATTN_CANDIDATES[("dkdv_dq", d)]))]  # none at D = 256


@pytest.mark.parametrize("D,index", ATOMIC_GPU, ids=[f"D{d}-{i}" for d, i in ATOMIC_GPU])
def test_every_atomic_backward_config_on_cuda(D, index, monkeypatch):
    """The atomic backward (KILN_ATTN_BWD=atomic: dQ added by the dkdv kernel's fp32 atomics), in
    each of its launch candidates, passes the 2x rule on the GPU, where the adds really race.
    (Hopper: at D = 128 its candidates are TMA ones.)"""
    from test_qk_norm_attention_triton import check

    from kiln.kernels import autotune
    from kiln.kernels import qk_norm_attention_triton as attn

    full, used = attn.attn_candidates, []

    def forced(kernel, dtype, head_dim, tma=False, arch="sm90"):
        cands = full(kernel, dtype, head_dim, tma, arch)
        if kernel != "dkdv_dq":
            return cands[:1]
        used.extend(cands[index % max(len(cands), 1):][:1])
        return used[-1:]

    monkeypatch.setattr(attn, "attn_candidates", forced)
    monkeypatch.setenv("KILN_ATTN_BWD", "atomic")
    autotune.forget()
    try:
        # odd candidates causal: their query loop starts at the key block's diagonal
        check(2, 1100, 3, D, 2, True, True, bool(index % 2), torch.bfloat16, seed=index, device="cuda")
    finally:
        autotune.forget()
    assert used, "no atomic candidate ran"


FP32_GPU = [(d, i) for d in (64, 128, 256) for i in range(2)]  # (two candidates per kernel and head dim)


@pytest.mark.parametrize("D,index", FP32_GPU, ids=[f"D{d}-{i}" for d, i in FP32_GPU])
def test_every_fp32_attention_config_on_cuda(D, index, monkeypatch):
    """fp32 attention (full-precision FMA dots: the deterministic path) passes the 2x rule on the
    GPU in launch candidate ``index`` of every kernel, with the separate and the atomic backward."""
    from test_qk_norm_attention_triton import check

    from kiln.kernels import autotune
    from kiln.kernels import qk_norm_attention_triton as attn

    full, used = attn.attn_candidates, set()

    def forced(kernel, dtype, head_dim, tma=False, arch="sm90"):
        pick = full(kernel, dtype, head_dim, tma, arch)[index:][:1]
        used.update((kernel, str(c)) for c in pick)
        return pick

    monkeypatch.setattr(attn, "attn_candidates", forced)
    for mode in ("separate", "atomic"):
        monkeypatch.setenv("KILN_ATTN_BWD", mode)
        autotune.forget()
        try:
            check(2, 300, 2, D, 2, True, True, mode == "atomic", torch.float32, seed=index, device="cuda")
        finally:
            autotune.forget()
    assert {kernel for kernel, _ in used} == {"fwd", "dkdv", "dq", "dkdv_dq"}, used


@pytest.mark.parametrize("D,index,mode", PRE_HOPPER_CASES, ids=[f"D{d}-{i}-{m}" for d, i, m in PRE_HOPPER_CASES])
def test_every_pre_hopper_attention_config_on_cuda(D, index, mode, monkeypatch):
    """The pre-Hopper lists' tiles (what an A100 or an L4 launches: pointer loads, 16 to 128 rows)
    pass the 2x rule on this GPU too, candidate ``index`` of each kernel (wrapping round), forward
    and both backwards: correctness here; their speed is for such a GPU's autotuner."""
    from test_qk_norm_attention_triton import check, force_candidate

    from kiln.kernels import autotune

    used = force_candidate(monkeypatch, index, "sm80")
    monkeypatch.setenv("KILN_ATTN_BWD", mode)
    autotune.forget()
    try:
        check(2, 1100, 3, D, 2, True, True, bool(index % 2), torch.bfloat16, seed=index, device="cuda")
    finally:
        autotune.forget()
    assert {kernel for kernel, _ in used} == ({"fwd", "dkdv", "dq"} if mode == "separate" else {"fwd", "dkdv_dq"})


# The csrc CUDA kernels' other paths: NCHW backward with block-wide channel pieces (HW = 20480),
# channels-last with more channel vectors than threads (C = 2560: 2-3 passes per block), and
# channels-last without 16-byte vectors (C = 36 in bf16) or with idle threads (C = 36 in fp32: 9
# vectors per row, 28 rows of 256 threads).
CSRC_GPU_CASES = GPU_CASES + [
    ((1, 64, 160, 128), 32, False, True, True, "silu"),
    ((1, 2560, 12, 20), 32, True, True, False, None),
    ((2, 36, 50, 30), 6, True, False, True, "silu"),
    ((2049, 64, 3, 5), 32, False, True, True, "silu"),  # N·G = 65,568 > a grid's 65,535 rows: sample chunks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CSRC_GPU_CASES, ids=[str(i) for i in range(len(CSRC_GPU_CASES))])
def test_csrc_group_norm_on_cuda(case, dtype):
    from test_group_norm_triton import check_against_reference

    check_against_reference(case, dtype, device="cuda", backend="csrc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CSRC_GPU_CASES, ids=lambda c: "x".join(map(str, c[0])) + ("-cl" if c[2] else ""))
def test_csrc_one_launch_group_norm_on_cuda(case, dtype, monkeypatch):
    """The one-launch plans (gn_pipelined, gn_cl_pipelined), forced on shapes the size rule
    gives two launches."""
    from test_group_norm_triton import check_against_reference

    monkeypatch.setenv("KILN_CSRC_GN_PLAN", "pipelined")
    check_against_reference(case, dtype, device="cuda", backend="csrc")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_csrc_one_launch_group_norm_at_vae_scale_on_cuda(channels_last):
    """The csrc one-launch GroupNorm where its blocks really race: 1x128x512x512 bf16 (the size
    rule's choice there: 67 MB of x; NCHW 32 groups of 128 chunks, channels-last 16 units of 2
    groups, 256 chunks). The 2x rule, then five more forward + backward runs bitwise equal to the
    first (a chunk that read its unit's statistics before they were published would show)."""
    from test_group_norm_triton import check_against_reference

    case = ((1, 128, 512, 512), 32, channels_last, True, True, "silu")
    check_against_reference(case, torch.bfloat16, device="cuda", backend="csrc")
    assert_runs_agree_bitwise(case, "csrc")


@pytest.mark.parametrize("backend", ["csrc", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 333, 4, 64, 2, True), (1, 1100, 2, 128, 2, True), (2, 200, 3, 80, 0, False),
                                  (1, 64, 2, 256, 1, True), (2, 50, 3, 66, 1, True), (1, 77, 3, 192, 2, True)],
                         ids=["mmdit", "long-128", "d80", "d256", "d66-scalar", "d192-3-pairs"])
def test_qk_norm_rope_on_cuda(case, dtype, backend):
    from test_qk_norm_rope import check

    check(*case, dtype, backend, device="cuda")


def _grads_twice(fn, *inputs):
    """Gradients of sum(fn(*inputs) * fixed weights) for all inputs, computed twice from scratch."""
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator(device="cuda").manual_seed(3)
        sum((o.float() * torch.randn(o.shape, device="cuda", generator=g)).sum() for o in outs).backward()
        runs.append([t.grad for t in leaves])
    return runs


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_csrc_group_norm_backward_is_bitwise_reproducible(channels_last):
    """No atomics in the csrc CUDA backward: per-block partials reduced in a fixed order, so two
    backward passes agree bit for bit (atomicAdd order differed run to run), and deterministic
    mode selects csrc like any other backend."""
    x = torch.randn(2, 128, 96, 80, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    scale, shift = torch.randn(2, 128, device="cuda") * 0.1, torch.randn(2, 128, device="cuda") * 0.1
    torch.use_deterministic_algorithms(True)
    try:
        with kernels.use_backend("csrc"):
            first, second = _grads_twice(lambda *a: kernels.group_norm(a[0], 32, a[1], a[2], scale=a[3], shift=a[4],
                                                                       activation="silu"), x, w, b, scale, shift)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, c in zip(first, second, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, c)


def test_csrc_qk_norm_rope_backward_is_bitwise_reproducible():
    from test_qk_norm_attention_triton import make_case

    (q, k, _, qw, kw_), kw = make_case(2, 1100, 4, 128, 2, True, False, False, torch.bfloat16, seed=5)
    tables = {n: kw[n].cuda() for n in ("cos", "sin", "token_group")}
    torch.use_deterministic_algorithms(True)
    try:
        with kernels.use_backend("csrc"):
            first, second = _grads_twice(lambda *a: kernels.qk_norm_rope(*a, **tables),
                                         *(t.cuda() for t in (q, k, qw, kw_)))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, c in zip(first, second, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, c)


@triton.jit
def _fill_kernel(x_ptr, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, value, mask=offs < n)


def test_autotune_compiles_candidates_together_then_times_them():
    """The autotuner's compile pass (Triton's AsyncCompileMode on a thread pool, run_kernel in
    compile-only mode) writes nothing; the timed launches after it run the compiled kernels."""
    from kiln.kernels import autotune

    x = torch.zeros(5000, device="cuda")

    def launch(block):
        autotune.run_kernel(_fill_kernel, (triton.cdiv(x.numel(), block),), x, x.numel(), 2.0, BLOCK=block)

    autotune._compile_all([128, 256, 512], launch)
    assert autotune._COMPILING.get() is None and torch.count_nonzero(x) == 0
    try:
        assert autotune.choose(("fill", 5000), [128, 256, 512], launch, x) in (128, 256, 512)
        # the choice is kept under the GPU's name
        assert f"fill/5000/{torch.cuda.get_device_name()}" in autotune.choices()
    finally:
        autotune.forget()
    assert torch.all(x == 2.0)
