"""Ring attention (model/ring_attention.py): the block math in one process against attention
over the whole sequence, the op on 3 ranks with either block path (ring_attention_ranks.py under
torchrun), and the config field. Training like one process: test_parallel's *_ring layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiproc import torchrun
from ring_attention_ranks import whole_attention

from kiln.engine.config import apply_override
from kiln.engine.errors import ConfigError
from kiln.engine.recipes import recipe
from kiln.model.ring_attention import block_bwd, block_fwd, merge


@pytest.mark.parametrize("splits", [(5, 4, 6), (15,), (1, 13, 1)])
def test_blocks_merged_and_their_gradients_are_whole_attention(splits, monkeypatch):
    """Keys in blocks of uneven sizes (one of a single key), one sample's first block all masked,
    one sample without any valid key; heads in chunks of 2 (of 3) as at long sequences."""
    import kiln.model.ring_attention as ring

    monkeypatch.setattr(ring, "SCORE_BYTES", 2 * 4 * 3 * 15 * max(splits))  # 2 heads of 3 a chunk
    g = torch.Generator().manual_seed(1)
    B, S, H, D = 3, sum(splits), 3, 8
    q, k, v, do = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    ok = torch.rand(B, S, generator=g) > 0.3
    ok[1, :splits[0]], ok[2] = False, False
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    want = whole_attention(q, k, v, ok)
    want.backward(do)
    scale = D ** -0.5
    blocks = list(zip(k.detach().split(splits, 1), v.detach().split(splits, 1), ok.split(splits, 1), strict=True))
    o = lse = None
    for kb, vb, okb in blocks:
        o_j, lse_j = block_fwd(q.detach(), kb, vb, okb, scale)
        o, lse = (o_j, lse_j) if o is None else merge(o, lse, o_j, lse_j)
    torch.testing.assert_close(o.double(), want.detach(), atol=1e-6, rtol=1e-6)  # fp32 block math
    delta = (do * o.double()).sum(-1).transpose(1, 2)
    parts = [block_bwd(do, delta, q.detach(), kb, vb, okb, lse, scale) for kb, vb, okb in blocks]
    torch.testing.assert_close(sum(p[0] for p in parts).double(), q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1).double(), k.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p[2] for p in parts], 1).double(), v.grad, atol=1e-5, rtol=1e-5)
    assert o[2].abs().max() == 0 and torch.isinf(lse[2]).all(), "no valid key: zeros, lse = -inf"


@pytest.mark.parametrize("ranks, backend", [(3, "eager"), (3, "triton"), (1, "eager")])
def test_ranks_match_whole_attention_in_fp32_and_bf16(ranks, backend, tmp_path):
    """Output and every gradient within 2x PyTorch's own error in the dtype, opcheck of the op,
    the bytes sent; blocks on the eager path, or on the flash kernels (under the interpreter:
    TRITON_INTERPRET=1 from conftest reaches the ranks through the environment); a ring of one
    rank is attention and sends nothing."""
    entry = [str(Path(__file__).with_name("ring_attention_ranks.py")), str(tmp_path)]
    torchrun(ranks, entry + (["triton"] if backend == "triton" else []), timeout=300, out=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("ok_rank*.txt")) == [f"ok_rank{r}.txt" for r in range(ranks)]


def test_cp_attention_names_its_choices():
    cfg = recipe("tiny")
    apply_override(cfg, "parallel.cp_attention=ring")
    cfg.validate()
    apply_override(cfg, "parallel.cp_attention=rings")
    with pytest.raises(ConfigError, match="parallel.cp_attention: 'rings' is not one of: ulysses, ring"):
        cfg.validate()
