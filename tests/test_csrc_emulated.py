"""kiln_ext's CUDA kernels (csrc/*.cu) run on the CPU by the emulator (emulated_cuda.py,
csrc/emu/cuda_emu.h) and held to the same FlashAttention 2x rule as every kernel, for the output
and all gradients: the GPU code is checked on every CI run, not only when a GPU is lent.

Two launch plans each, since the plans read the SM count: an H100's 132 SMs (GroupNorm cuts
groups and token ranges into many blocks, a QK-norm warp takes one item of a token's heads or
two) and a single SM (few GroupNorm blocks, each QK-norm warp walks many items with its carried
(b, s, head-chunk) digits, H = 1, 2, 3, 5 leaving short last items). The GroupNorm's one-launch
plans (gn_pipelined, gn_cl_pipelined) run with their blocks in turn and with 4 resident at once."""

import subprocess
import sys

import pytest
import torch
from emulated_cuda import ASAN, as_csrc_cpu, asan_env, build
from kernel_rule import assert_within_twice_torch
from test_csrc import pre_kernel_losses
from test_group_norm_triton import CASES, _inputs, check_against_reference
from test_qk_norm_attention_triton import make_case
from test_qk_norm_rope import _on, _run, bad_token_case, check, reference_on_good_tokens

from kiln import kernels

SMS = [132, 1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# beyond CASES: NCHW groups in 16-byte vectors of bf16 (HW % 8 == 0) long enough to be split at
# 132 SMs (8192-element chunks at 4 vectors a thread), and a channels-last C = 8 (one thread a row)
EXTRA_GN = [
    ((2, 128, 16, 16), 32, False, True, True, "silu"),
    ((1, 32, 64, 64), 8, False, True, False, None),
    ((2, 8, 24, 20), 2, True, True, True, "silu"),
]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES + EXTRA_GN,
                         ids=[f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'nc'}" for c in CASES + EXTRA_GN])
def test_group_norm_cuda_kernels_within_twice_torch_error(case, dtype, sms):
    with as_csrc_cpu(sms):
        check_against_reference(case, dtype, backend="csrc")


GN_IDS = [f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'nc'}" for c in CASES + EXTRA_GN]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES + EXTRA_GN, ids=GN_IDS)
def test_group_norm_one_launch_plan_within_twice_torch_error(case, dtype, sms):
    """The one-launch plan (gn_pipelined, gn_cl_pipelined: tickets, per-unit flags, the last
    chunk's finalize): a few chunks a unit, lag 1 on one SM (2 blocks), every unit ahead at 132.
    A chunk that waited for statistics not yet published would stop the emulator with an error."""
    with as_csrc_cpu(sms, gn_plan="pipelined"):
        check_against_reference(case, dtype, backend="csrc")


def _gn_outputs(x, p, groups, dy, **emu):
    leaves = [x.clone().requires_grad_(), *(v.clone().requires_grad_() for v in p.values())]
    with as_csrc_cpu(**emu), kernels.use_backend("csrc"):
        y = kernels.group_norm(leaves[0], groups, activation="silu", **dict(zip(p, leaves[1:], strict=True)))
        y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("case", CASES + EXTRA_GN, ids=GN_IDS)
def test_group_norm_one_launch_plan_with_resident_blocks_bf16(case):
    """The same with 4 blocks resident at once (2 SMs' worth: lag 1), their turns passed at every
    atomic: pass-2 chunks claimed before their group's statistics really wait for them."""
    for seed in (1, 2):  # two interleavings
        with as_csrc_cpu(2, gn_plan="pipelined", resident=4, seed=seed):
            check_against_reference(case, torch.bfloat16, backend="csrc")


def test_group_norm_one_launch_blocks_really_wait_and_agree_bit_for_bit():
    """With resident blocks (three seeds: three interleavings) the one launch gives the bits of
    the blocks-in-turn run (fixed-order reductions, whichever block finalizes a group), and some
    pass-2 chunks did wait (emulator_waits counts the polls that found a flag short)."""
    shape, groups = (2, 64, 24, 24), 8
    x, p = _inputs(shape, groups, torch.float32, False, True, True, seed=5)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    for xx in (x, x.to(memory_format=torch.channels_last)):
        in_turn = _gn_outputs(xx, p, groups, dy, sms=2, gn_plan="pipelined")
        before = torch.ops.kiln_emu.emulator_waits()
        for seed in (1, 2, 3):
            resident = _gn_outputs(xx, p, groups, dy, sms=2, gn_plan="pipelined", resident=4, seed=seed)
            assert all(torch.equal(a, b) for a, b in zip(in_turn, resident, strict=True)), seed
        assert torch.ops.kiln_emu.emulator_waits() > before


def test_group_norm_plan_auto_takes_the_one_launch_when_the_bytes_exceed_l2():
    """auto: two launches while x (forward; x and dy backward) fit the L2, one launch beyond.
    The plans cut groups into different chunks, so their sums differ in the last bits: equal
    bits say which plan ran."""
    shape, groups = (2, 64, 24, 24), 8  # x 295 KB in fp32, x and dy 590 KB
    x, p = _inputs(shape, groups, torch.float32, False, True, True, seed=2)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    two, one = (_gn_outputs(x, p, groups, dy, sms=4, gn_plan=plan) for plan in ("two_pass", "pipelined"))
    assert not all(torch.equal(a, b) for a, b in zip(two, one, strict=True))
    for l2, expect in [(None, two), (1 << 20, two), (100_000, one)]:
        auto = _gn_outputs(x, p, groups, dy, sms=4, l2_bytes=l2)
        assert all(torch.equal(a, b) for a, b in zip(auto, expect, strict=True)), l2


def test_group_norm_plan_errors_name_the_setting():
    x = torch.randn(1, 8, 4, 4)
    with as_csrc_cpu(gn_plan="fast"), kernels.use_backend("csrc"), \
            pytest.raises(RuntimeError, match="KILN_CSRC_GN_PLAN='fast': expected auto, two_pass or pipelined"):
        kernels.group_norm(x, 2)
    wide = torch.randn(1, 600, 2, 2).to(memory_format=torch.channels_last)  # 300 channels a group
    with as_csrc_cpu(gn_plan="pipelined"), kernels.use_backend("csrc"), \
            pytest.raises(RuntimeError, match="C/G = 300 channels per group, more than a block's 256 threads"):
        kernels.group_norm(wide, 2)


def test_group_norm_cuda_kernels_on_unaligned_inputs():
    """A view 2 bytes into its storage: no 16-byte vectors (vec_width 1), the scalar kernels."""
    shape, groups = (2, 64, 8, 8), 16
    x, p = _inputs(shape, groups, torch.bfloat16, False, True, True, seed=3)
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
    assert x.data_ptr() % 16
    with as_csrc_cpu(), kernels.use_backend("csrc"):
        y = kernels.group_norm(x, groups, activation="silu", **p)
    ref = kernels.group_norm_ref(x.double(), groups, activation="silu", **{k: v.double() for k, v in p.items()})
    lowp = kernels.group_norm_ref(x, groups, activation="silu", upcast=False, **p)
    assert_within_twice_torch(["out"], [y], [ref], [lowp], torch.bfloat16)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,S,H,D,G,rope", [(2, 93, 3, 64, 2, True), (1, 21, 2, 40, 0, False),
                                            (3, 17, 1, 128, 1, True), (1, 11, 5, 256, 2, True)])
def test_qk_norm_rope_cuda_kernels_within_twice_torch_error(B, S, H, D, G, rope, dtype, sms):
    with as_csrc_cpu(sms):
        check(B, S, H, D, G, rope, dtype, "csrc")


@pytest.mark.parametrize("sms", SMS)
def test_qk_norm_rope_cuda_kernels_on_packed_qkv(sms):
    """q and k as views of a packed (B, S, 3, H, D) bf16 QKV: rows read through the (b, s, h)
    strides, 4-byte vectors at D = 128."""
    B, S, H, D = 2, 37, 3, 128
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(torch.bfloat16)
    qw, kw_ = ((1 + 0.2 * torch.randn(2, D, generator=g)).to(torch.bfloat16) for _ in range(2))
    angle = torch.arange(S)[:, None] * torch.rand(D // 2, generator=g).repeat(2)[None]
    tables = {"cos": angle.cos(), "sin": angle.sin(), "token_group": (torch.arange(S) >= 9).long()}
    douts = [torch.randn(B, S, H, D, generator=g).to(torch.bfloat16) for _ in range(2)]

    def on_views(qkv, qw, kw_, **kw):
        return _on("csrc")(qkv[:, :, 0], qkv[:, :, 1], qw, kw_, **kw)

    def ref(qkv, qw, kw_, **kw):
        return kernels.qk_norm_rope_ref(qkv[:, :, 0], qkv[:, :, 1], qw, kw_, **kw)

    with as_csrc_cpu(sms):
        ours = _run(on_views, (qkv, qw, kw_), tables, douts)
    exact = _run(ref, (qkv.double(), qw.double(), kw_.double()),
                 {n: v.double() if n != "token_group" else v for n, v in tables.items()}, [d.double() for d in douts])
    lowp = _run(ref, (qkv, qw, kw_), tables, douts)
    assert_within_twice_torch(["q_out", "k_out", "dqkv", "dq_weight", "dk_weight"], ours, exact, lowp, torch.bfloat16)


def test_model_trains_on_the_emulated_cuda_pre_kernel_with_the_reference_losses(tmp_path, run_config):
    """Three training steps through the CUDA QK-norm+RoPE kernels (attention = "norm_rope_sdpa"):
    the reference backend's losses."""
    with as_csrc_cpu(4):
        ours = pre_kernel_losses(tmp_path / "csrc", run_config, "csrc")
    ref = pre_kernel_losses(tmp_path / "torch", run_config, "torch")
    assert len(ours) == 3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _gn_grads(order):
    # fp32 channels-last with C / 4 > 256 channel vectors: two passes of each block over its
    # rows, the second reusing the shared partials of the first (rows_to_partials)
    shape, groups = (2, 1040, 3, 5), 16
    x, p = _inputs(shape, groups, torch.float32, True, True, True, seed=9)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outs = []
    # channels-last, then NCHW in two launches and in one
    for xx, plan in ((x, None), (x.contiguous(), "two_pass"), (x.contiguous(), "pipelined")):
        outs += _gn_outputs(xx, p, groups, dy, sms=4, order=order, gn_plan=plan)
    return outs


def _qk_grads(order):
    (q, k, _, qw, kw_), kw = make_case(2, 45, 3, 64, 2, True, False, False, torch.float32, seed=5)
    kw.pop("causal")
    g = torch.Generator().manual_seed(6)
    douts = [torch.randn(q.shape, generator=g) for _ in range(2)]
    with as_csrc_cpu(1, order):
        return _run(_on("csrc"), (q, k, qw, kw_), kw, douts)


def test_fiber_order_does_not_change_a_bit():
    """The emulator gives a block's warps priority first to last, or last to first (and runs
    the blocks in that order): a missing __syncthreads around shared memory (the block sums, the
    channels-last partials, the QK weight-gradient slices), or a block that read another's
    output within a launch, would let one order read what the other had not yet written."""
    for grads in (_gn_grads, _qk_grads):
        fwd, rev = grads("forward"), grads("reverse")
        assert all(torch.equal(a, b) for a, b in zip(fwd, rev, strict=True)), grads.__name__


def test_the_emulator_reports_the_bugs_it_is_for():
    """Its own check, on kernels written with each bug (csrc/emu/selftest.cpp)."""
    build()
    run = torch.ops.kiln_emu.emulator_selftest
    with as_csrc_cpu(order="forward"):
        race_fwd, clean_fwd, chain_fwd = run("race"), run("no_race"), run("chained_blocks")
    with as_csrc_cpu(order="reverse"):
        race_rev, clean_rev, chain_rev = run("race"), run("no_race"), run("chained_blocks")
    expected = (torch.arange(256) // 32 + 1) % 8 + 1  # warp w reads warp w + 1's w + 2
    assert torch.equal(clean_fwd, expected.float()) and torch.equal(clean_rev, clean_fwd)
    assert not torch.equal(race_fwd, race_rev)  # the missing barrier shows as an order dependence
    assert not torch.equal(chain_fwd, chain_rev)  # and so does a block that reads another's output
    for name, why in [("deadlock", "deadlock"), ("divergent_barrier", "different places"),
                      ("exited_lane", "exited lanes"), ("smem_too_big", "227 KB")]:
        with as_csrc_cpu(), pytest.raises(RuntimeError, match=why):
            run(name)
    with as_csrc_cpu(order="reverse"), pytest.raises(RuntimeError, match="no block still running can raise"):
        run("signal_chain")  # block 1 first, alone: its wait for block 0 would never end
    for order in ("forward", "reverse"):
        with as_csrc_cpu(order=order, resident=2):
            assert run("signal_chain")[:2].tolist() == [1.0, 2.0]  # resident together: it waits, then reads
    with as_csrc_cpu():
        assert run("signal_chain")[:2].tolist() == [1.0, 2.0]  # in turn, block 0 first
        assert run("smem_nan").isnan().all()  # dynamic shared memory starts as NaN, not zeros
        assert run("barrier_after_exit").sum() == 32  # legal: exited threads count as arrived


@pytest.mark.skipif(ASAN, reason="this is the run under AddressSanitizer")
def test_no_access_outside_the_tensors_under_addresssanitizer():
    """The bf16 and layout cases again, in a process under AddressSanitizer with the emulated
    kernels built with -fsanitize=address: a load or store past a tensor's allocation (a tail a
    bound misses) aborts it with the report. Checked by letting a token's last QK item read 4
    heads when it has 3: a heap-buffer-overflow in norm_rope_fwd_kernel; and a token_group value
    past the weights' rows, before weight_row: the same in RowTables."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__, "-k",
           "bf16 or packed or unaligned or bugs or outside_the_weights"]
    proc = subprocess.run(cmd, env=asan_env(), capture_output=True, text=True, timeout=1800)
    report = proc.stderr[max(0, proc.stderr.find("ERROR: AddressSanitizer")):][:4000]  # its head names the access
    assert proc.returncode == 0 and "AddressSanitizer" not in proc.stderr, (proc.stdout[-2000:], report)
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_qk_norm_rope_cuda_kernels_give_a_token_outside_the_weights_nan_rows():
    """A CUDA token_group's values are not checked on the host (that would sync every call): the
    kernels make a bad token's rows NaN and leave it out of the weight gradients, where they read
    the weight, and added to shared memory, past its G rows (the ops called below the host check)."""
    case = q, k, qw, kw_, cos, sin, bad, good = bad_token_case()
    dqo, dko = torch.randn_like(q), torch.randn_like(k)
    dqo[:, ~good], dko[:, ~good] = 0.0, 0.0
    with as_csrc_cpu(132):
        qo, ko, rq, rk = torch.ops.kiln_ext.qk_norm_rope_fwd(q, k, qw, kw_, cos, sin, bad, 1e-6)
        dq, dk, dqw, dkw = torch.ops.kiln_ext.qk_norm_rope_bwd(dqo, dko, q, k, qw, kw_, cos, sin, bad, rq, rk)
    assert qo[:, ~good].isnan().all() and ko[:, ~good].isnan().all() and dq[:, ~good].isnan().all()
    sub, ref = reference_on_good_tokens(*case)
    torch.testing.assert_close(qo[:, good], ref[0].detach(), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(ref, sub, (dqo[:, good], dko[:, good]))
    for ours, theirs in zip((dq[:, good], dk[:, good], dqw, dkw), grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
