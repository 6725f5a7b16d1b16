"""ShardedMuon (engine/muon.py): torch.optim.Muon's update in one process, bit for bit, and the
same update on weights sharded by FSDP2 x TP and HSDP (muon_layouts.py under torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiproc import torchrun

from kiln.engine.muon import ShardedMuon, newton_schulz


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (16, 48), (32, 32), (7, 5)]  # tall, wide, square, odd
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("nesterov, adjust", [(True, "match_rms_adamw"), (False, None), (True, "original")])
def test_one_process_update_is_torch_muon(nesterov, adjust):
    ours, theirs = _params(0), _params(0)
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    a, b = ShardedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
    assert a.state_dict()["param_groups"][0].keys() == b.state_dict()["param_groups"][0].keys()
    b.load_state_dict(a.state_dict())  # checkpoints move between the two


def test_newton_schulz_orthogonalizes():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(newton_schulz(g).float())
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1, not exactly 1 (by design)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(newton_schulz(g).float().flatten(), (u @ vh).flatten(), dim=0)
    assert cos > 0.95


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="adjust_lr_fn must be one of"):
        ShardedMuon(_params(0), adjust_lr_fn="spectral")
    with pytest.raises(ValueError, match=r"2-D weight matrices, got a parameter of shape \(5,\)"):
        ShardedMuon([torch.nn.Parameter(torch.zeros(5))])


def test_sharded_weights_get_one_process_update_bit_for_bit(tmp_path):
    torchrun(4, [str(Path(__file__).with_name("muon_layouts.py")), str(tmp_path)], timeout=300, out=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("ok_rank*.txt")) == [f"ok_rank{r}.txt" for r in range(4)]


def test_a_one_process_checkpoint_of_another_optimizer_is_refused_by_name():
    from kiln.engine.errors import KilnError
    from kiln.engine.optim import Optimizers
    from kiln.engine.recipes import recipe
    from kiln.model import MMDiT

    cfg = recipe("tiny")
    cfg.optim.name = "muon"
    opts = Optimizers(cfg, [MMDiT(cfg.model)], torch.device("cpu"))
    adamw_state = {"optimizers": [{"state": {}, "param_groups": []}], "schedulers": [{}]}
    with pytest.raises(KilnError, match="holds 1 optimizer states, optim.name=muon keeps 2"):
        opts.load_full_state_dict(adamw_state, cfg)
