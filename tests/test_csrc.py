"""The compiled extension (csrc/ -> kiln.kernels._C): built by the README install, reported by
available_backends(), its C++ CPU ops against the fp64 reference with FlashAttention's 2x rule,
opcheck, torch.compile, clear errors, and the model's "csrc pre-kernel + SDPA" attention path.
(qk_norm_rope's numerics for both kernel backends: test_qk_norm_rope.py.)"""

import os
import shutil

import pytest
import torch
from kernel_rule import fake_cuda_tensor
from test_group_norm_triton import CASES, _inputs, check_against_reference

from kiln import kernels
from kiln.kernels import csrc


def _nvcc_present() -> bool:
    return bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_the_install_built_and_loaded_the_extension():
    assert csrc.load_error() is None
    assert kernels.available_backends()["csrc"] is None
    ops = kernels.implemented_ops()
    assert "csrc" in ops["group_norm"] and "csrc" in ops["qk_norm_rope"]


@pytest.mark.skipif(not (torch.version.cuda and _nvcc_present()), reason="CPU-only torch or no CUDA toolkit here")
def test_cuda_kernels_were_compiled_for_sm90a():
    """With a CUDA torch and nvcc (CI's machine), pip install compiles every .cu for sm_90a."""
    info = csrc.build_info()
    assert info.startswith("cpu+cuda:") and "9.0a" in info, info
    for op in ("group_norm_fwd", "group_norm_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd"):
        assert csrc.has_cuda_kernels(op), op


@pytest.mark.skipif(not (torch.version.cuda and _nvcc_present()), reason="CPU-only torch or no CUDA toolkit here")
def test_the_default_build_runs_on_every_gpu_family():
    """The default TORCH_CUDA_ARCH_LIST (setup.py) gives every GPU from the A100 on something to
    run: sm_80 and sm_90a machine code, and compute_80 PTX, which the library must hold, for the
    Blackwell GPUs (10.0, 12.0) that neither runs on; that PTX compiles for them (what the driver
    does at the first load; 16 s for both files on the 2-core CI machine)."""
    from kiln.kernels import sm90

    assert csrc.CUDA_ARCHS == "8.0+PTX;9.0a", csrc.build_info()
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert csrc.runs_on(csrc._BUILT, capability), capability
    ptx = sm90.embedded_ptx(csrc.library_path())
    assert sorted(ptx) == ["group_norm_cuda.sm_80.ptx", "qk_norm_rope_cuda.sm_80.ptx"], sorted(ptx)
    jobs = [(name, arch) for name in ptx for arch in ("sm_100", "sm_120")]
    reports = sm90.in_parallel([lambda n=name, a=arch: sm90.ptxas_report(ptx[n], a, "ptxas-blackwell")
                                for name, arch in jobs])
    for job, report in zip(jobs, reports, strict=True):
        assert report["registers"], (job, report)


# The hot CUDA kernels (16/32-bit instantiations with 16-byte vectors) and how many 16-byte loads
# one trip of the loop that streams x (and dy) must issue per thread before using them
# (sm90.trip_vector_loads): the loads a thread keeps in flight. The channels-last ones walk token
# rows with `#pragma unroll 4`; the NCHW ones nvcc unrolls (gn_partials 4x, gn_bwd_partials 2x)
# or a ChannelWalk is read in batches (stream_chunk: gn_normalize, gn_bwd_dx; 1-2 before 2026-12-02).
_STREAMING = {"gn_partials": 4, "gn_normalize": 4, "gn_bwd_partials": 4, "gn_bwd_dx": 4,
              "gn_cl_partials": 4, "gn_cl_apply": 4, "gn_cl_bwd_partials": 8, "gn_cl_dx": 8}


@pytest.mark.skipif(not csrc.has_cuda_kernels("group_norm_fwd"), reason="extension built without CUDA kernels")
def test_cuda_kernels_disassembly_on_sm90a():
    """What the sm_90a code does, read off the disassembly (cuobjdump, shipped with Triton): no
    local memory (spills) in any 16/32-bit kernel; the GroupNorm kernels move data in 16-byte
    vectors, at most one 2-byte load (the group's shift element): channels-last included, whose
    per-group blocks used 2-byte loads at C/G = 4 before the whole-row rewrite, and issue several
    of them per loop trip before using any; the QK-norm+RoPE kernels load vectors at D = 128 and
    256."""
    from kiln.kernels import sm90

    facts = sm90.csrc_sass_facts(csrc.library_path())
    assert len(facts) > 100, sorted(facts)
    spills = {k: f["local_ops"] for k, f in facts.items() if f["local_ops"] and "double" not in k}
    assert not spills, spills
    for kernel, wide in _STREAMING.items():
        for inst in ("c10::BFloat16, 8", "c10::Half, 8", "float, 4"):
            found = {k: f["global_load_bits"] for k, f in facts.items() if k.startswith(f"{kernel}<{inst}")}
            assert found, (kernel, inst)
            for name, bits in found.items():
                assert bits.get("128", 0) >= wide and bits.get("16", 0) <= 1, (name, bits)
                assert facts[name]["trip_vector_loads"] >= wide, (name, facts[name])
    # the NCHW one-launch GroupNorm (gn_pipelined<T, V, backward, team>): its pass-2 loops as
    # streaming as the two-launch kernels', its ticket, arrival and publication atomic adds; two
    # 2-byte loads of the group's shift element (its pass 1 and its finalize) in the forward
    for inst in ("c10::BFloat16, 8, false, 256", "c10::BFloat16, 8, true, 256", "c10::BFloat16, 8, true, 32",
                 "float, 4, false, 256", "float, 4, true, 256"):
        f = facts[f"gn_pipelined<{inst}>"]
        assert f["trip_vector_loads"] >= 4 and f["global_load_bits"].get("16", 0) <= 2, (inst, f)
        assert f["atomic_adds"] >= 3, (inst, f)
    # ... and the channels-last one (gn_cl_pipelined<T, V, backward>): 4 rows a trip of x, of x and dy
    for inst, wide in (("c10::BFloat16, 8, false", 4), ("c10::BFloat16, 8, true", 8), ("float, 4, false", 4),
                       ("float, 4, true", 8)):
        f = facts[f"gn_cl_pipelined<{inst}>"]
        assert f["trip_vector_loads"] >= wide and f["atomic_adds"] >= 3, (inst, f)
    # QK-norm+RoPE with P = 2 or 4 pairs per lane (D = 128, 256): each half row is one vector
    # per lane (bf16 4 or 8 bytes), no 2-byte loads left (the scalar path had 8-16 per row).
    for kernel in ("norm_rope_fwd_kernel", "norm_rope_bwd_kernel"):
        for inst in ("c10::BFloat16, 2, true", "c10::BFloat16, 4, true", "c10::Half, 4, true"):
            bits = facts[f"{kernel}<{inst}>"]["global_load_bits"]
            assert "16" not in bits and "8" not in bits, (kernel, inst, bits)
    # ... and at bf16 D = 128 a warp's item of 4 rows (one token's heads) loads them all before
    # using any: 4 rows x 2 halves of x in the forward, x and dy in the backward (a warp per row
    # or two issued 4 and 10 before 2026-12-02; the 10 counted the rows' 2 rstd loads)
    assert facts["norm_rope_fwd_kernel<c10::BFloat16, 2, true>"]["trip_loads_32"] >= 8
    assert facts["norm_rope_bwd_kernel<c10::BFloat16, 2, true>"]["trip_loads_32"] >= 16


def test_reason_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(csrc, "load_error", lambda: "the kiln_ext extension did not load: No module named x")
    assert "did not load" in kernels.available_backends()["csrc"]
    with kernels.use_backend("csrc"), pytest.raises(kernels.BackendError, match="did not load"):
        kernels.group_norm(torch.randn(1, 4, 3, 3), 2)


# (TORCH_CUDA_ARCH_LIST entries, compute capability, whether the build has code that GPU runs)
_RUNS_ON = [
    (["8.0", "9.0a"], (8, 0), True), (["8.0", "9.0a"], (8, 6), True), (["8.0", "9.0a"], (8, 9), True),
    (["8.0", "9.0a"], (9, 0), True), (["8.0", "9.0a"], (10, 0), False), (["8.0", "9.0a"], (12, 0), False),
    (["8.6"], (8, 0), False), (["9.0a"], (9, 1), False), (["9.0a+PTX"], (10, 0), False),
    (["8.0+PTX", "9.0a"], (10, 0), True), (["8.0+PTX", "9.0a"], (12, 0), True), (["8.0+PTX"], (7, 5), False),
    ([], (9, 0), False), (["Ampere"], (8, 6), True),
]


@pytest.mark.parametrize("archs, capability, expected", _RUNS_ON)
def test_which_gpus_a_build_runs_on(archs, capability, expected):
    assert csrc.runs_on(csrc.parse_archs(";".join(archs)), capability) is expected


def _fake_gpu(monkeypatch, archs: list[str], major: int, minor: int, name: str) -> torch.Tensor:
    """A (fake) CUDA tensor on a GPU of compute capability major.minor, with the extension's CUDA
    part taken as built for ``archs``."""
    monkeypatch.setattr(csrc, "CUDA_ARCHS", ";".join(archs))
    monkeypatch.setattr(csrc, "_BUILT", csrc.parse_archs(";".join(archs)))
    monkeypatch.setattr(csrc, "has_cuda_kernels", lambda op: True)
    return fake_cuda_tensor(monkeypatch, (2, 64, 8, 8), major, minor, name)


def test_a_gpu_the_build_has_no_code_for_gets_a_clear_reason(monkeypatch):
    """sm_80 / sm_90a machine code runs on no Blackwell GPU: the csrc backend refuses a B200's
    tensors, naming the build's list and the reinstall, instead of CUDA's "no kernel image is
    available" at the launch; with compute_80 PTX in the build (the default) it takes them."""
    x = _fake_gpu(monkeypatch, ["8.0", "9.0a"], 10, 0, "NVIDIA B200")
    with kernels.use_backend("csrc"), pytest.raises(
            kernels.BackendError, match=r"built for 8\.0;9\.0a .* none of it runs on NVIDIA B200 \(compute capability "
                                        r"10\.0\): reinstall with TORCH_CUDA_ARCH_LIST='10\.0'"):
        kernels.select("group_norm", x, 8)
    x = _fake_gpu(monkeypatch, ["8.0+PTX", "9.0a"], 10, 0, "NVIDIA B200")
    with kernels.use_backend("csrc"):
        assert kernels.select("group_norm", x, 8) == "csrc"


def test_cpu_tensors_take_the_reference_unless_csrc_is_forced():
    x = torch.randn(1, 8, 4, 4)
    assert kernels.select("group_norm", x, 2) == "torch"
    with kernels.use_backend("csrc"):
        assert kernels.select("group_norm", x, 2) == "csrc"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'nc'}" for c in CASES])
def test_group_norm_matches_fp64_reference_within_twice_torch_error(case, dtype):
    check_against_reference(case, dtype, backend="csrc")


def test_group_norm_large_mean_and_unseen_shapes():
    x = torch.randn(1, 32, 16, 16) * 0.1 + 1000.0  # fp32 E[x²] - E[x]² would lose the variance
    with kernels.use_backend("csrc"):
        y = kernels.group_norm(x, 8)
    ref = kernels.group_norm_ref(x.double(), 8)
    torch_err = (torch.nn.functional.group_norm(x, 8).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * torch_err + 1e-4
    for seed, shape in enumerate([(1, 320, 13, 3), (4, 96, 1, 1), (1, 128, 2, 3, 7)]):
        x, p = _inputs(shape, 32, torch.float32, seed % 2 == 1, True, True, seed=100 + seed)
        with kernels.use_backend("csrc"):
            y = kernels.group_norm(x, 32, scale=p["scale"], activation="silu")
        torch.testing.assert_close(y, kernels.group_norm_ref(x, 32, scale=p["scale"], activation="silu"),
                                   atol=2e-5, rtol=2e-5)


def test_group_norm_opcheck_and_compile():
    fwd, bwd = torch.ops.kiln_ext.group_norm_fwd, torch.ops.kiln_ext.group_norm_bwd
    x, p = _inputs((2, 32, 5, 7), 8, torch.float32, True, True, True, seed=5)
    args = (x, 8, p["weight"], p["bias"], p["scale"], p["shift"], 1e-5, "silu")
    torch.library.opcheck(fwd, args)
    y, mean, rstd = fwd(*args)
    torch.library.opcheck(bwd, (torch.randn_like(y), x, mean, rstd, p["weight"], p["bias"], p["scale"], p["shift"],
                                8, "silu"))
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), 8, None, None, None, None, 1e-5, "none"))

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    f = torch.compile(lambda x, w, b: kernels.group_norm(x, 8, w, b, activation="silu"), fullgraph=True,
                      backend=backend)
    with kernels.use_backend("csrc"):
        out = f(x, p["weight"], p["bias"])
    torch.testing.assert_close(out, kernels.group_norm_ref(x, 8, p["weight"], p["bias"], activation="silu"))
    assert any(s.startswith("kiln_ext.group_norm_fwd") for s in seen), seen


def test_bad_arguments_get_clear_errors():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(RuntimeError, match=r"token_group\[4\] = 3 outside \[0, 2\)"):
        torch.ops.kiln_ext.qk_norm_rope_fwd(q, q, torch.ones(2, 8), torch.ones(2, 8), None, None,
                                            torch.tensor([0, 1, 1, 1, 3]), 1e-6)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \(S, D\)"):
        torch.ops.kiln_ext.qk_norm_rope_fwd(q, q, torch.ones(8), torch.ones(8), torch.ones(4, 8), torch.ones(4, 8),
                                            None, 1e-6)
    with pytest.raises(RuntimeError, match="activation must be 'none' or 'silu'"):
        torch.ops.kiln_ext.group_norm_fwd(torch.randn(1, 4, 3), 2, None, None, None, None, 1e-5, "gelu")
    with pytest.raises(RuntimeError, match="not divisible by num_groups 3"):
        torch.ops.kiln_ext.group_norm_fwd(torch.randn(1, 4, 3), 3, None, None, None, None, 1e-5, "none")


def pre_kernel_losses(run_dir, run_config, backend: str) -> torch.Tensor:
    """The losses of 3 training steps with attention = "norm_rope_sdpa" on ``backend``."""
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    cfg = run_config(steps=3)
    cfg.model.attention = "norm_rope_sdpa"
    cfg.train.kernel_backend = backend
    cfg.sample.num_prompts = 0
    train(cfg, run_dir)
    return torch.tensor([r["loss"] for r in read_metrics(run_dir) if "loss" in r])


def test_model_trains_on_the_csrc_pre_kernel_plus_sdpa_with_the_reference_losses(tmp_path, run_config):
    ours, ref = (pre_kernel_losses(tmp_path / b, run_config, b) for b in ("csrc", "torch"))
    assert len(ours) == 3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
