"""Triton QK-norm + RoPE attention under TRITON_INTERPRET=1 (CPU): FlashAttention's 2x rule for the
output and all five gradients (q, k, v, q_weight, k_weight), on shapes that are not multiples of
the 64x64 blocks, with G = 1 and 2, with and without RoPE and padding, causal and not."""

import math

import pytest
import torch
from kernel_rule import assert_within_twice_torch, fake_cuda_tensor, sm90_reports

from kiln import kernels
from kiln.kernels.qk_norm_attention import _qkna_bwd_op, _qkna_fwd_op
from kiln.kernels.qk_norm_attention_triton import PRE_HOPPER_CANDIDATES


def _rope_tables(S, D, n_text, g):
    ang = torch.rand(S, D // 2, generator=g) * 2 * math.pi
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cos[:n_text], sin[:n_text] = 1.0, 0.0  # text tokens stay unrotated
    return cos, sin


def make_case(B, S, H, D, G, rope, pad, causal, dtype, seed, n_text=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = ((torch.randn(B, S, H, D, generator=g) * s).to(dtype) for s in (1.0, 2.0, 1.0))
    shape = (D,) if G == 0 else (G, D)  # G = 0 means a plain (D,) weight
    q_weight, k_weight = ((1 + 0.2 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(2))
    n_text = S // 4 if n_text is None else n_text
    kw = {"causal": causal}
    if G >= 2:
        kw["token_group"] = torch.cat([torch.zeros(n_text, dtype=torch.long),
                                       torch.randint(1, G, (S - n_text,), generator=g)])
    if rope:
        kw["cos"], kw["sin"] = _rope_tables(S, D, n_text, g)
    if pad:
        mask = torch.ones(B, S, dtype=torch.bool)
        for b in range(1, B):
            mask[b, S - (S * b) // (B + 1):] = False  # later rows lose more keys
        kw["key_padding_mask"] = mask
    return (q, k, v, q_weight, k_weight), kw


def _run(fn, tensors, kw, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach(), *grads]


def _triton(*a, **kw):
    with kernels.use_backend("triton"):
        return kernels.qk_norm_attention(*a, **kw)


def check(B, S, H, D, G, rope, pad, causal, dtype, seed=0, n_text=None, device="cpu", **extra):
    tensors, kw = make_case(B, S, H, D, G, rope, pad, causal, dtype, seed, n_text)
    kw.update(extra)
    tensors, kw = [t.to(device) for t in tensors], {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    dout = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    ref = _run(lambda *a, **k: kernels.qk_norm_attention_ref(*a, upcast=True, **k),
               [t.double() for t in tensors], {k: (v.double() if k in ("cos", "sin") else v) for k, v in kw.items()},
               dout.double())
    lowp = _run(lambda *a, **k: kernels.qk_norm_attention_ref(*a, upcast=False, **k), tensors, kw, dout)
    ours = _run(_triton, tensors, kw, dout)
    assert ours[0].dtype == dtype and ours[4].dtype == tensors[3].dtype
    assert_within_twice_torch(["out", "dq", "dk", "dv", "dq_weight", "dk_weight"], ours, ref, lowp, dtype)
    return ours


CASES = [
    # B, S, H, D, G, rope, pad, causal, dtypes
    (2, 117, 2, 64, 2, True, True, False, (torch.float32, torch.float16, torch.bfloat16)),  # 77 text + 40 image
    (2, 50, 3, 128, 0, False, True, True, (torch.float16, torch.bfloat16)),
    (1, 19, 2, 80, 1, True, False, True, (torch.float32,)),  # D = 80: a masked head dimension
    (3, 70, 1, 32, 2, True, False, False, (torch.float16,)),
    (1, 130, 2, 128, 2, False, False, False, (torch.bfloat16,)),
]
PARAMS = [(*c[:8], dt) for c in CASES for dt in c[8]]


@pytest.mark.parametrize("B,S,H,D,G,rope,pad,causal,dtype", PARAMS,
                         ids=[f"B{p[0]}S{p[1]}H{p[2]}D{p[3]}G{p[4]}{'-rope' * p[5]}{'-pad' * p[6]}"
                              f"{'-causal' * p[7]}-{str(p[8])[6:]}" for p in PARAMS])
def test_matches_fp64_reference_within_twice_torch_error(B, S, H, D, G, rope, pad, causal, dtype):
    check(B, S, H, D, G, rope, pad, causal, dtype, seed=S * 7 + D)


def test_mmdit_shape_77_text_plus_256_image_tokens():
    check(1, 333, 1, 64, 2, True, True, False, torch.float16, seed=11, n_text=77)


def test_queries_without_any_valid_key_are_zero_and_gradients_finite():
    # causal + padding where row 1's first keys are invalid: its first queries see no key at all
    tensors, kw = make_case(2, 40, 2, 32, 2, True, False, True, torch.float32, seed=5)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :9] = False
    kw["key_padding_mask"] = mask
    ours = _run(_triton, tensors, kw, torch.ones(2, 40, 2, 32))
    assert all(torch.isfinite(t).all() for t in ours)
    assert (ours[0][1, :9] == 0).all()
    ref = _run(lambda *a, **k: kernels.qk_norm_attention_ref(*a, **k), tensors, kw, torch.ones(2, 40, 2, 32))
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scale", [None, 2.0, -0.3])
def test_a_batch_row_without_any_valid_key_is_zero_like_the_reference(scale):
    # non-causal: padded keys are a -1e30 bias on the scores, so a row whose keys are all padded
    # kept the bias as its max and averaged V (0.29 off the reference's zeros) while its gradients
    # were zero; scale 2 puts the bias below the running max's start, -0.3 scales scores first
    tensors, kw = make_case(3, 40, 2, 32, 2, True, True, False, torch.float32, seed=6)
    kw["key_padding_mask"][1] = False
    kw["scale"] = scale
    dout = torch.randn(3, 40, 2, 32, generator=torch.Generator().manual_seed(7))
    ours = _run(_triton, tensors, kw, dout)
    assert (ours[0][1] == 0).all() and (ours[1][1] == 0).all()
    ref = _run(lambda *a, **k: kernels.qk_norm_attention_ref(*a, **k), tensors, kw, dout)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, atol=5e-5, rtol=5e-5)


# B = 3, H = 2, S = 37, D = 32: a (B, S, H, D) row spans 2,368 elements; each limit lowered so
# that two rows fit: a grid's rows (B·H programs along y) or 32-bit offsets
CHUNK_LIMITS = {"grid": ("MAX_GRID_Y", 5), "offsets": ("MAX_OFFSET", 2 * 2368 - 1)}


@pytest.mark.parametrize("mode", ["separate", "atomic"])
@pytest.mark.parametrize("limit", list(CHUNK_LIMITS))
def test_past_a_grids_rows_or_32_bit_offsets_runs_in_batch_chunks(monkeypatch, mode, limit):
    """Past dispatch.MAX_GRID_Y (65535 programs along a CUDA grid's y, where B·H goes) or
    MAX_OFFSET (2^31 - 1 elements from a tensor's base, the kernels' 32-bit offsets) the op runs
    on chunks of whole batch rows: same numbers bit for bit, padding rows kept with their batch,
    the weights' gradients summed over the chunks. A batch row alone past 32-bit offsets is
    refused with that reason."""
    import importlib

    from kiln.kernels import dispatch

    qkna = importlib.import_module("kiln.kernels.qk_norm_attention")
    tensors, kw = make_case(3, 37, 2, 32, 2, True, True, False, torch.float16, seed=9)
    dout = torch.randn(3, 37, 2, 32, generator=torch.Generator().manual_seed(10)).half()
    monkeypatch.setenv("KILN_ATTN_BWD", mode)
    whole = _run(_triton, tensors, kw, dout)
    rows, op = [], qkna._qkna_fwd_op
    monkeypatch.setattr(qkna, "_qkna_fwd_op", lambda q, *a: rows.append(q.shape[0]) or op(q, *a))
    monkeypatch.setattr(dispatch, *CHUNK_LIMITS[limit])
    chunked = _run(_triton, tensors, kw, dout)
    assert rows == [2, 1]
    for name, a, b in zip(["out", "dq", "dk", "dv"], whole, chunked, strict=False):
        assert torch.equal(a, b), name
    for a, b in zip(whole[4:], chunked[4:], strict=True):  # q_weight, k_weight: sums over chunks
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(dispatch, "MAX_OFFSET", 2367)  # one row spans 2,367 elements past its first
    assert dispatch.rows_within_offsets(tensors[0]) == 1
    monkeypatch.setattr(dispatch, "MAX_OFFSET", 2366)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="32-bit offsets"):
        kernels.qk_norm_attention(*tensors, **kw)


def test_a_view_past_32_bit_offsets_runs_in_batch_chunks():
    """q is a view into a 4 GiB buffer with a batch stride of 2^30 elements (pages never touched
    cost no memory), so its last row starts 2^31 elements past its base, where the kernels'
    32-bit offsets wrap: the op segfaulted there before it ran on batch chunks (rc 139 at
    b1f855b). Now within the 2x rule for the output, q's row past 2^31 included."""
    B, S, H, D = 3, 16, 2, 32
    base = torch.empty(2 * 2**30 + S * H * D, dtype=torch.float16)
    q = base.as_strided((B, S, H, D), (2**30, H * D, D, 1))
    (q_dense, k, v, qw, kw_), kw = make_case(B, S, H, D, 2, True, False, False, torch.float16, seed=12)
    q.copy_(q_dense)
    with kernels.use_backend("triton"):
        out = kernels.qk_norm_attention(q, k, v, qw, kw_, **kw)
    ref = kernels.qk_norm_attention_ref(*(t.double() for t in (q_dense, k, v, qw, kw_)), upcast=True,
                                        **{n: (t.double() if n in ("cos", "sin") else t) for n, t in kw.items()})
    lowp = kernels.qk_norm_attention_ref(q_dense, k, v, qw, kw_, upcast=False, **kw)
    assert (out.double() - ref).abs().max() <= 2 * (lowp.double() - ref).abs().max() + 1e-3


def test_packed_qkv_views_work_without_a_copy_and_match_separate_tensors():
    tensors, kw = make_case(2, 45, 2, 32, 2, True, True, False, torch.float32, seed=3)
    q, k, v, qw, kw_ = tensors
    qkv = torch.stack([q, k, v], dim=2).requires_grad_()  # (B, S, 3, H, D)
    out = _triton(*qkv.unbind(2), qw, kw_, **kw)
    (g_packed,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    sep = _run(_triton, tensors, kw, torch.ones_like(out))
    torch.testing.assert_close(out, sep[0])
    torch.testing.assert_close(g_packed, torch.stack(sep[1:4], dim=2))


def test_opcheck_forward_and_backward_ops():
    (q, k, v, qw, kw_), kw = make_case(1, 24, 2, 32, 2, True, True, False, torch.float32, seed=9)
    args = (q, k, v, qw, kw_, kw["cos"], kw["sin"], kw["token_group"], kw["key_padding_mask"], 1e-6, 0.2, False)
    torch.library.opcheck(_qkna_fwd_op, args)
    out, lse, rq, rk = _qkna_fwd_op(*args)
    torch.library.opcheck(_qkna_bwd_op, (torch.randn_like(out), q, k, v, out, lse, rq, rk, qw, kw_, kw["cos"],
                                         kw["sin"], kw["token_group"], kw["key_padding_mask"], 1e-6, 0.2, False))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, qw, kw_)]
    torch.library.opcheck(_qkna_fwd_op, (*leaves, None, None, None, None, 1e-6, 0.2, True))


def test_torch_compile_fullgraph():
    tensors, kw = make_case(1, 33, 2, 32, 2, True, True, False, torch.float32, seed=4)
    leaves = [t.clone().requires_grad_() for t in tensors]
    seen = []

    def backend(gm, example_inputs):  # record the captured graph's ops, then run it eagerly
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    def f(q, k, v, qw, kw_):
        return kernels.qk_norm_attention(q, k, v, qw, kw_, **kw)

    with kernels.use_backend("triton"):  # chosen outside the graph; dispatch runs at trace time
        out = torch.compile(f, fullgraph=True, backend=backend)(*leaves)
        ref = f(*leaves)
    torch.testing.assert_close(out, ref)
    gc = torch.autograd.grad(out.sum(), leaves)
    gr = torch.autograd.grad(ref.sum(), leaves)
    for a, b in zip(gc, gr, strict=True):
        torch.testing.assert_close(a, b)
    assert "kiln.qk_norm_attention_fwd.default" in seen


def test_model_trains_on_the_triton_backend_with_the_reference_losses(tmp_path, run_config):
    from kiln.engine.metrics import read_metrics
    from kiln.engine.train import train

    losses = {}
    for backend in ("torch", "triton"):
        cfg = run_config(steps=3)
        cfg.model.heads = 2  # width 32 -> head dim 16, the smallest the kernel takes
        cfg.train.kernel_backend = backend
        cfg.sample.num_prompts, cfg.sample.steps = 2, 1
        train(cfg, tmp_path / backend)
        losses[backend] = [r["loss"] for r in read_metrics(tmp_path / backend) if "loss" in r]
    assert len(losses["triton"]) == 3
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), rtol=1e-4, atol=1e-6)


def test_reasons_name_what_the_triton_backend_cannot_run():
    q = torch.randn(1, 8, 2, 24)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="head dim 24 is not a multiple"):
        kernels.qk_norm_attention(q, q, q, torch.ones(24), torch.ones(24))


@pytest.mark.parametrize("gpu, capability, backend", [
    ("Tesla V100-SXM2-32GB", (7, 0), "torch"), ("Tesla T4", (7, 5), "torch"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "triton"), ("NVIDIA GeForce RTX 5090", (12, 0), "triton"),
])
def test_gpus_without_triton_tensor_core_code_run_attention_on_sdpa(gpu, capability, backend, monkeypatch):
    """Below compute capability 8.0 Triton builds the fused attention without MMA instructions
    (MIN_CAPABILITY): the dispatch point sends such a GPU's tensors to the reference (SDPA), and
    forcing Triton there says why."""
    q = fake_cuda_tensor(monkeypatch, (1, 64, 2, 64), *capability, gpu, torch.bfloat16)
    w = fake_cuda_tensor(monkeypatch, (64,), *capability, gpu)
    assert kernels.select("qk_norm_attention", q, q, q, w, w) == backend
    if backend == "torch":
        why = rf"{gpu} has compute capability {capability[0]}\.{capability[1]}: below 8\.0"
        with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match=why):
            kernels.select("qk_norm_attention", q, q, q, w, w)


def test_rocm_runs_attention_on_sdpa(monkeypatch):
    """On ROCm (an MI300X reports compute capability 9.4) the NVIDIA launch lists do not apply."""
    q = fake_cuda_tensor(monkeypatch, (1, 64, 2, 64), 9, 4, "AMD Instinct MI300X", torch.bfloat16)
    w = fake_cuda_tensor(monkeypatch, (64,), 9, 4, "AMD Instinct MI300X")
    assert kernels.select("qk_norm_attention", q, q, q, w, w) == "triton"  # (CUDA torch: a 9.x GPU is Hopper)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert kernels.select("qk_norm_attention", q, q, q, w, w) == "torch"


@pytest.mark.parametrize("variant", ["tma", "warp_specialised", "overlap"])
@pytest.mark.parametrize("B,S,H,D,G,rope,pad,causal,dtype", [
    (2, 117, 2, 64, 2, True, True, False, torch.float16),  # 77 text + 40 image tokens, padding
    (1, 100, 3, 128, 1, True, False, True, torch.bfloat16),  # causal, 100 = 64 + 36: a partial box
    (2, 70, 1, 128, 0, False, False, False, torch.float16),  # no masks: the unmasked-block path
    (1, 128, 2, 64, 0, True, False, False, torch.float16),  # S a multiple of the blocks: no masked block
    (1, 333, 2, 64, 2, True, True, False, torch.float16),  # several programs and loop steps per head
])
def test_tma_candidates_match_the_reference(B, S, H, D, G, rope, pad, causal, dtype, variant, monkeypatch):
    """The TMA candidates of the forward and both backward kernels (Q, K, V, dO tiles through tensor
    descriptors over the (B, S, H·D) view; rows past S zero-filled by the copy engine, here by the
    interpreter's emulation of it) pass the same 2x rule as the pointer kernels, on boxes that
    overrun S and a batch boundary; so do the warp-specialised ones (descriptors made in the
    kernel, lse / delta / pad mask through 1-D descriptors, dK and dV computed transposed; the
    interpreter runs them as plain programs, the specialisation itself is checked in the sm_90a
    compile and on a GPU) and the forward's overlapped ones (one key block ahead: the scores of a
    block past the last are computed and dropped)."""
    from kiln.kernels import qk_norm_attention_triton as attn

    full, used = attn.attn_candidates, []

    def wanted(c, kernel):
        if variant == "overlap" and kernel == "fwd":
            return c.overlap
        return c.tma and c.ws == (variant == "warp_specialised") and not c.overlap

    def tma_only(kernel, dt, head_dim, tma=False, arch="sm90"):
        assert tma and arch == "sm90", "these inputs allow descriptors"
        cands = [c for c in full(kernel, dt, head_dim, tma) if wanted(c, kernel)]
        used.append((kernel, cands[0]))
        return cands

    monkeypatch.setattr(attn, "attn_candidates", tma_only)
    check(B, S, H, D, G, rope, pad, causal, dtype, seed=11)
    assert sorted(k for k, _ in used) == ["dkdv", "dq", "fwd"] and all(wanted(c, k) for k, c in used)
    assert any(c.overlap for _, c in used) == (variant == "overlap")


@pytest.mark.parametrize("scale", [-0.3, 0.05])
def test_explicit_scales_match_the_reference(scale):
    """The forward takes each row's max on unscaled scores and scales it once (its exp2 argument
    then one FFMA a score) only for a positive scale; a negative one, which the contract allows as
    SDPA does, scales every score first. Both against the reference, with padding and causality."""
    check(2, 70, 2, 64, 2, True, True, True, torch.float16, seed=3, scale=scale)


@pytest.mark.parametrize("B,S,H,D,G,rope,pad,causal,dtype,tma,bulk", [
    # (pointer tiles: D = 64 and fp32 only; at D = 128 the atomic candidates are all TMA ones)
    (2, 117, 2, 64, 2, True, True, False, torch.float16, False, False),  # padding; several key blocks add per dQ row
    (2, 117, 2, 64, 2, True, True, False, torch.float16, True, False),
    (2, 117, 2, 64, 2, True, True, False, torch.float16, True, True),  # dQ tiles by bulk reduction
    (1, 100, 3, 128, 1, True, False, True, torch.bfloat16, True, False),  # causal: only key blocks <= the query's add
    (1, 100, 3, 64, 1, True, False, True, torch.bfloat16, True, True),
    (2, 70, 1, 64, 0, False, False, False, torch.float16, True, True),  # no masks: keys past S add nothing, and
    (2, 70, 1, 128, 0, False, False, False, torch.float16, True, False),  # the bulk adds' rows past S are dropped
    (1, 70, 2, 64, 0, False, False, True, torch.bfloat16, False, False),
    (1, 19, 2, 80, 1, True, False, True, torch.float32, False, False),  # fp32, masked head dimension
])
def test_atomic_backward_matches_the_reference(B, S, H, D, G, rope, pad, causal, dtype, tma, bulk, monkeypatch):
    """KILN_ATTN_BWD=atomic: dQ comes from the dkdv kernel's fp32 atomic adds (no dq kernel runs),
    with pointer and TMA tiles, per-thread or bulk (TMA reduction) adds, and passes the same 2x
    rule for the output and all gradients."""
    from kiln.kernels import qk_norm_attention_triton as attn

    full, used = attn.attn_candidates, []

    def record(kernel, dt, head_dim, tma_ok=False, arch="sm90"):
        cands = [c for c in full(kernel, dt, head_dim, tma_ok, arch)
                 if c.tma == (tma and kernel != "fwd") and c.bulk_dq == (bulk and kernel == "dkdv_dq")]
        used.append((kernel, cands[0]))
        return cands

    monkeypatch.setattr(attn, "attn_candidates", record)
    monkeypatch.setenv("KILN_ATTN_BWD", "atomic")
    check(B, S, H, D, G, rope, pad, causal, dtype, seed=5)
    assert {k for k, _ in used} - {"fwd"} == {"dkdv_dq"}, used
    assert all(c.bulk_dq == bulk for k, c in used if k == "dkdv_dq")


def force_candidate(monkeypatch, index: int, family: str) -> set:
    """Launch attention as on a GPU of family ``family`` (attn._arch faked; "sm80": an sm_80 / sm_86
    / sm_89 GPU), each kernel in candidate ``index`` of its list there (wrapping round); returns
    the (kernel, config) pairs launched."""
    from kiln.kernels import qk_norm_attention_triton as attn

    full, used = attn.attn_candidates, set()

    def forced(kernel, dtype, head_dim, tma=False, arch="sm90"):
        assert arch == family, f"launched as on an {family} GPU"
        cands = full(kernel, dtype, head_dim, tma, arch)
        pick = cands[index % len(cands):][:1] if cands else []
        used.update((kernel, str(c)) for c in pick)
        return pick

    monkeypatch.setattr(attn, "_arch", lambda t: family)
    monkeypatch.setattr(attn, "attn_candidates", forced)
    return used


# (D, candidate index, backward): every candidate of each list (shorter lists wrap round), the
# atomic backward where it has candidates (D = 64)
PRE_HOPPER_CASES = [(D, i, "separate") for D in (64, 128, 256)
                    for i in range(max(len(PRE_HOPPER_CANDIDATES[(k, D)]) for k in ("fwd", "dkdv", "dq")))]
PRE_HOPPER_CASES += [(64, i, "atomic") for i in range(len(PRE_HOPPER_CANDIDATES[("dkdv_dq", 64)]))]


@pytest.mark.parametrize("D,index,mode", PRE_HOPPER_CASES, ids=[f"D{d}-{i}-{m}" for d, i, m in PRE_HOPPER_CASES])
def test_pre_hopper_candidates_match_the_reference(D, index, mode, monkeypatch):
    """Every candidate of the pre-Hopper lists (PRE_HOPPER_CANDIDATES: the tiles an A100 or an L4
    launches, 16 to 128 rows) passes the 2x rule, forward and both backwards (the atomic one has
    candidates at D = 64 only); odd indices causal."""
    used = force_candidate(monkeypatch, index, "sm80")
    monkeypatch.setenv("KILN_ATTN_BWD", mode)
    check(2, 70, 2, D, 2, True, True, bool(index % 2), torch.float16, seed=index)
    assert {k for k, _ in used} == ({"fwd", "dkdv", "dq"} if mode == "separate" else {"fwd", "dkdv_dq"}), used


FP32_CASES = [(D, mode) for D in (64, 128, 256) for mode in ("separate", "atomic")]


@pytest.mark.parametrize("D,mode", FP32_CASES, ids=[f"D{d}-{m}" for d, m in FP32_CASES])
def test_fp32_second_candidates_match_the_reference(D, mode, monkeypatch):
    """fp32's second candidates (FP32_CANDIDATES: smaller tiles, the autotuner's alternative and
    a 99 KB GPU's default where the first does not fit) pass the 2x rule, forward and both
    backwards; the first ones run in every fp32 case above."""
    used = force_candidate(monkeypatch, 1, "sm90")
    monkeypatch.setenv("KILN_ATTN_BWD", mode)
    check(1, 45, 2, D, 2, True, True, mode == "atomic", torch.float32, seed=D)
    assert {k for k, _ in used} == ({"fwd", "dkdv", "dq"} if mode == "separate" else {"fwd", "dkdv_dq"}), used


def test_backward_mode_switch(monkeypatch):
    """Which backward runs: "separate" by default (and always under deterministic algorithms or
    where no atomic candidate exists, D > 128), "atomic" on request; a bad value names the allowed ones."""
    from kiln.kernels.qk_norm_attention_triton import _bwd_mode

    def mode_of(D, setting, deterministic=False):
        launched = []
        q = torch.empty(1, 8, 1, D, dtype=torch.bfloat16)
        monkeypatch.setenv("KILN_ATTN_BWD", setting)
        prior = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            mode = _bwd_mode(q, (False, False), False, lambda cfg, atomic=False: launched.append(("dkdv", atomic)),
                             lambda cfg: launched.append(("dq", False)))
        finally:
            torch.use_deterministic_algorithms(prior)
        return mode, launched

    assert mode_of(128, "auto") == ("separate", [("dkdv", False), ("dq", False)])
    assert mode_of(128, "auto", deterministic=True)[0] == "separate"
    assert mode_of(64, "atomic") == ("atomic", [("dkdv", True)])
    assert mode_of(256, "atomic") == ("separate", [("dkdv", False), ("dq", False)])
    assert mode_of(128, "atomic")[0] == "separate"  # pointer tiles (tma=False here): none at D = 128
    assert mode_of(128, "separate")[0] == "separate"
    with pytest.raises(ValueError, match="KILN_ATTN_BWD='fast': allowed values are auto, separate, atomic"):
        mode_of(128, "fast")


def test_backward_takes_a_delta_the_caller_computed():
    """attention_bwd(delta=rowsum(do * out)) (ring attention: once per rank's queries) gives the
    gradients the kernel's own delta gives; a delta of the wrong layout is refused by name."""
    from kiln.kernels.qk_norm_attention_triton import attention_bwd, attention_fwd, side_cols

    g = torch.Generator().manual_seed(3)
    B, S, H, D = 2, 21, 2, 16
    q, k, v, do = (torch.randn(B, S, H, D, generator=g) for _ in range(4))
    ok = torch.rand(B, S, generator=g) > 0.2
    out, lse = attention_fwd(q, k, v, ok, D ** -0.5, False)
    delta = torch.zeros(B, H, side_cols(S))
    delta[..., :S] = torch.einsum("bshd,bshd->bhs", do, out)
    own = attention_bwd(do, q, k, v, out, lse, ok, D ** -0.5, False)
    given = attention_bwd(do, q, k, v, None, lse, ok, D ** -0.5, False, delta=delta)
    for a, b in zip(own, given, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=rf"delta must be contiguous fp32 \({B}, {H}, {side_cols(S)}\)"):
        attention_bwd(do, q, k, v, None, lse, ok, D ** -0.5, False, delta=delta[..., :S])


def test_tma_is_used_only_where_descriptors_fit():
    from kiln.kernels.qk_norm_attention_triton import _tma_ok

    x = torch.randn(2, 33, 3, 64, dtype=torch.float16)
    qkv = torch.randn(2, 33, 3, 3, 64, dtype=torch.bfloat16)
    assert _tma_ok(x, x, x) and _tma_ok(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # packed QKV views
    assert not _tma_ok(x.float(), x.float(), x.float())  # fp32: FMA path, no descriptors
    y = torch.randn(2, 33, 3, 80, dtype=torch.float16)
    assert not _tma_ok(y, y, y)  # D = 80: a 128-wide box would take in the next head
    t = torch.randn(2, 3, 33, 64, dtype=torch.float16).transpose(1, 2)
    assert not _tma_ok(t, t, t)  # heads not adjacent (stride 33·64)


@pytest.mark.parametrize("env,flag,kernels", [("KILN_ATTN_WS", "ws", ("fwd", "dkdv", "dq")),
                                               ("KILN_ATTN_OVERLAP", "overlap", ("fwd",)),
                                               ("KILN_ATTN_BULK_DQ", "bulk_dq", ("dkdv_dq",))])
def test_newest_candidates_are_tma_ones_and_can_be_switched_off(env, flag, kernels, monkeypatch):
    """The warp-specialised, overlapped forward and bulk-dq candidates are offered only where TMA
    descriptors fit, and each has a switch: what the acceptance run's attention retry sets if one
    of these newest paths fails."""
    from kiln.kernels.qk_norm_attention_triton import attn_candidates

    for kernel in kernels:
        full = attn_candidates(kernel, torch.bfloat16, 64, tma=True)
        assert any(getattr(c, flag) for c in full) and all(c.tma for c in full if getattr(c, flag))
        assert not any(getattr(c, flag) for c in attn_candidates(kernel, torch.bfloat16, 64, tma=False))
        monkeypatch.setenv(env, "0")
        assert attn_candidates(kernel, torch.bfloat16, 64, tma=True) == [c for c in full if not getattr(c, flag)]
        monkeypatch.delenv(env)


def test_benchmark_rows_find_the_autotuner_choice_for_their_shape(monkeypatch):
    """benchmarks/attention.py reports the configs chosen for its shape class from the tuner's keys."""
    from kiln.benchmarks.attention import _for_shape
    from kiln.kernels import autotune
    from kiln.kernels.qk_norm_attention_triton import LaunchConfig, tuning_key

    monkeypatch.setattr(autotune, "_CHOSEN", {})
    q = torch.empty(3, 4173, 24, 128, dtype=torch.bfloat16)

    def chosen(q, cfg):  # as autotune.choose keeps it: the kernel's key and the device
        autotune._CHOSEN[autotune.device_key(tuning_key("fwd", q, (False, False), True), q)] = cfg

    chosen(q, LaunchConfig(128, 64, 8, 3, tma=True))
    chosen(q[:, :1000], LaunchConfig(64, 64, 4, 3))
    assert list(_for_shape(autotune.choices(), 4173, 128).values()) == ["128x64/w8/s3/tma"]


DOTS = {"fwd": 2, "dq": 3, "dkdv": 4, "dkdv_dq": 5}  # per loop trip: (BLOCK_M x BLOCK_N x D) MMAs


def assert_mma_work(r):
    """A candidate's steady-state loop issues its dots' MMA work and no more: the HGMMA shapes of
    one warp group's trip (sm90's "hgmma_macs") times its warp groups (two consumer groups when
    warp-specialised) against the dots' BLOCK_M · BLOCK_N · D multiply-adds. A 64-row tile at 8
    warps, laid out 8 warps along its rows, has both warp groups compute it (1.5-1.67x); only the
    pairs in ALLOWED_REPLICATION may."""
    from kiln.kernels.qk_norm_attention_triton import ALLOWED_REPLICATION

    c = r["constexprs"]
    groups = 2 if r.get("ws") else r["num_warps"] // 4
    want = DOTS[r["candidates"]] * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_D"]
    got = r["mma_loop_ops"]["hgmma_macs"] * groups
    if (r["candidates"], c["BLOCK_D"]) in ALLOWED_REPLICATION:
        assert got >= want, r
    else:
        assert got == want, (r["candidates"], c, r["num_warps"], got / want)


# per family, a default each GPU there takes at D = 256 (16-bit dK/dV: the list's first only where
# it fits)
DKDV_256_DEFAULTS = {"sm80": {163 * 1024: "64x32/w8/s1", 99 * 1024: "16x64/w8/s1"},
                     "sm100": {227 * 1024: "64x32/w8/s1"}, "sm120": {99 * 1024: "16x64/w8/s1"}}


@pytest.mark.parametrize("arch", list(DKDV_256_DEFAULTS))
def test_every_gpu_family_gets_a_default_that_fits(arch):
    """On each family's GPUs besides Hopper (ARCH_SHARED: an A100's 163 KB a program and sm_86 /
    sm_89's 99 KB; B200's 227 KB; RTX 5090's 99 KB) every attention kernel has a launch config that
    fits at every head dim, 16-bit and fp32, and no candidate spills as Triton builds it for that
    GPU (16-bit with and without the pad mask), and 16-bit ones have their dots on MMA
    instructions. Hopper's lists spilled up to 21 KB on sm_80 and 8 KB on sm_120a, and on sm_100a
    neither its 16-bit dK/dV at D = 256 (273 KB) nor any warp-specialised dq at 128x128 (4
    registers, no MMA) would do. The default is what the launcher takes (autotune.first_fit on
    these compiles; a subprocess without TRITON_INTERPRET)."""
    from kiln.kernels.qk_norm_attention_triton import ARCH_CANDIDATES, ARCH_SHARED, CONFIGS_ARCH

    rows = sm90_reports("kiln.kernels.qk_norm_attention_triton", "arch_defaults", arch)
    # 4 kernels at each (dtype, D) and limit, but no 16-bit atomic dK/dV list at D = 256 anywhere,
    # nor at D = 128 except Hopper's (the separate backward runs)
    empty = sum(not cands for cands in ARCH_CANDIDATES[arch].values())
    assert empty == 2
    assert len(rows) == (4 * len(CONFIGS_ARCH) - empty) * len(ARCH_SHARED[arch])
    for r in rows:
        assert not r["warnings"], r  # every candidate compiles for the family's GPU
        assert r["default"] is not None and r["shared_bytes"] <= r["limit"], r
        for cfg, built in r["candidates"].items():
            assert isinstance(built, dict), (r["kernel"], r["dtype"], r["head_dim"], cfg, built)  # it compiled
            assert built["stack_bytes"] == 0, (r["kernel"], r["dtype"], r["head_dim"], cfg, built)
            assert built["mma"] or r["dtype"] == "fp32", (r["kernel"], r["head_dim"], cfg, built)
    first = {r["limit"]: r["default"] for r in rows
             if (r["kernel"], r["dtype"], r["head_dim"]) == ("dkdv", "bf16", 256)}
    assert first == DKDV_256_DEFAULTS[arch]
    if arch == "sm80":  # the 99 KB GPUs take a later candidate where the first needs more
        assert {r["default"] for r in rows if (r["kernel"], r["dtype"], r["head_dim"], r["limit"])
                == ("dq", "bf16", 256, 99 * 1024)} == {"64x32/w8/s1"}


def test_each_gpu_family_gets_its_own_lists(monkeypatch):
    """The launcher takes a GPU's candidates by its compute capability (8.x Ampere / Ada, 9.x
    Hopper, 10.x / 11.x datacenter Blackwell, 12.x consumer Blackwell; the interpreter's CPU
    tensors Hopper's), and every tile of the Blackwell lists is one of Hopper's or the pre-Hopper
    lists, which the interpreter tests above (and the GPU tests) run against the reference."""
    from kiln.kernels import qk_norm_attention_triton as attn

    cuda = torch.empty(0, device="meta")
    monkeypatch.setattr(type(cuda), "is_cuda", property(lambda t: True))
    for major, family in ((8, "sm80"), (9, "sm90"), (10, "sm100"), (11, "sm100"), (12, "sm120"), (7, "sm80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        assert attn._arch(cuda) == family
        q = cuda.new_empty((1, 8, 1, 128), dtype=torch.bfloat16)
        assert attn._candidates("dkdv", q, tma=True) == attn.ARCH_CANDIDATES[family][("dkdv", 128)]
    monkeypatch.undo()
    assert attn._arch(torch.empty(1)) == "sm90"
    known = {(key, c) for table in (attn.ATTN_CANDIDATES, attn.PRE_HOPPER_CANDIDATES) for key, cs in table.items()
             for c in cs}
    for family in ("sm100", "sm120"):
        table = attn.ARCH_CANDIDATES[family]
        assert table.keys() == attn.ATTN_CANDIDATES.keys()
        assert {(key, c) for key, cs in table.items() for c in cs} <= known, family
        assert not any(c.ws for cs in table.values() for c in cs)  # (Hopper's warp specialisation)
    assert not any(c.tma for cs in attn.SM120_CANDIDATES.values() for c in cs)


def test_sm90_compile_check():
    """Every kernel compiles for Hopper (sm_90a) without a GPU, in every launch configuration the
    autotuner may pick, specialised as a real launch is: no spills or local memory (fp32's FMA
    dots at D = 64, 128 and 256 too); for 16-bit inputs (the training path) the dots on HGMMA
    (warpgroup MMA, not the pre-Hopper HMMA) and no 2-byte scalar loads of tiles. Reports printed
    with pytest -s. In a subprocess without TRITON_INTERPRET."""
    from kiln.kernels.qk_norm_attention_triton import _TORCH_DT, CONFIGS_SM90, attn_candidates

    reports = sm90_reports("kiln.kernels.qk_norm_attention_triton")
    # per config: norm+RoPE fwd and bwd, the backward's delta pre-pass, every attention candidate
    # (16-bit ones with and without the pad mask)
    expected = sum(3 + (1 if dt == "fp32" else 2) * sum(len(attn_candidates(k, _TORCH_DT[dt], D, tma=True))
                                                          for k in ("fwd", "dkdv", "dq", "dkdv_dq"))
                   for dt, D in CONFIGS_SM90)
    assert len(reports) == expected
    assert sum(r.get("tma", False) for r in reports) >= 4
    assert {r["kernel"] for r in reports if r.get("ws")} == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                             "_attn_bwd_dq_kernel"}
    assert sum(r.get("candidates") == "dkdv_dq" for r in reports) >= 5
    assert sum(r.get("bulk_dq", False) for r in reports) >= 2
    assert sum(r.get("overlap", False) for r in reports) >= 5
    for r in reports:
        assert r["shared_bytes"] <= 227 * 1024, r  # Hopper's shared memory a program
        if r["kernel"].startswith("_attn") and r["dtype"] != "fp32":
            assert_mma_work(r)
        assert r["registers"] and r["registers"] <= 255, r
        # dQ by atomic adds only in the atomic backward's dkdv kernel: per-thread REDs, or in the
        # bulk-dq candidates one bulk tensor reduction a query block (UTMAREDG) and no REDs
        atomic, bulk = r.get("candidates") == "dkdv_dq", r.get("bulk_dq", False)
        assert (r["atomic_adds"] > 0) == (atomic and not bulk), r
        assert (r["tma_reduces"] > 0) == (atomic and bulk), r
        assert r["spills"] == 0 and r["local_ops"] == 0, r
        if r["dtype"] == "fp32":  # correctness path, full-precision FMA dots (no HGMMA, 4-byte data)
            continue
        assert "16" not in r["global_load_bits"], r
        if r.get("tma"):  # tiles by the Tensor Memory Accelerator (UTMALDG), no per-thread tile loads
            assert r["tma_loads"] > 0 and "128" not in r["global_load_bits"], r
        else:
            assert r["global_load_bits"].get("128", 0) > 0, r
        loop = r["mma_loop_ops"]  # the steady-state HGMMA loop: one thread's instructions a trip
        if loop and not r.get("ws") and "norm_rope" not in r["kernel"]:
            exps, d, bn = loop.get("MUFU", 0), r["constexprs"]["BLOCK_D"], r["constexprs"]["BLOCK_N"]
            if r["kernel"] == "_attn_fwd_kernel":
                # the scale folded into exp2's FFMA: FMULs only rescale the accumulator (D/BN a
                # score; one more a score before 2026-12-02)
                assert loop.get("FMUL", 0) <= (d / bn + 0.5) * exps, (r["kernel"], r["num_warps"], loop)
                # overlapped: the softmax's exp2s issue while the previous block's P·V is on the
                # tensor cores (all but at most the two row rescales)
                if r.get("overlap"):
                    assert loop["ex2_beside_mma"] >= exps - 2, (r["kernel"], r["constexprs"], loop)
            # at most one select a score (two before 2026-12-02): the forward's padded keys are an
            # additive bias, the backward zeroes its masked probabilities with one select
            assert loop.get("FSEL", 0) <= 1.25 * exps + 2, (r["kernel"], r["num_warps"], loop)
        if r.get("ws"):  # a producer and two consumer warp groups, registers moved between them
            assert r["warps_launched"] == 3 * r["num_warps"] and r["setmaxnreg"] > 0, r
            assert not r["global_load_bits"], r  # even lse, delta and the pad mask come by TMA
        else:
            assert r["warps_launched"] == r["num_warps"] and r["setmaxnreg"] == 0, r
        if r["kernel"].startswith("_attn"):
            assert r["hgmma"] > 0 and r["hmma"] == 0, r
