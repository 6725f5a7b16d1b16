"""Optimizers and the LR schedule: AdamW, or Muon for the blocks' matrices; bf16 weight storage.

``optim.name=muon`` splits the parameters the way Muon is meant to be used: the 2-D weights
inside the transformer blocks (attention and MLP projections, modulation) go to
``torch.optim.Muon``; embeddings, the output layer, norms and biases stay on AdamW. Both share
one schedule (``lr_lambda``), so the two are one optimizer from the loop's point of view.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kiln.engine.config import RunConfig

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def lr_lambda(cfg: RunConfig):
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices for Muon, everything else for AdamW)."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim == 2 and name.startswith(BLOCK_PREFIXES) and not name.endswith("_norm")
        (matrices if is_matrix else rest).append(p)
    return matrices, rest


class Optimizers:
    """One or two torch optimizers with one LR schedule, stepped and checkpointed together."""

    def __init__(self, cfg: RunConfig, model: nn.Module, device: torch.device):
        o = cfg.optim
        adamw = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                     fused=device.type == "cuda")
        if o.name == "muon":
            matrices, rest = muon_params(model)
            self.opts = [torch.optim.AdamW(rest, **adamw),
                         torch.optim.Muon(matrices, lr=o.lr, weight_decay=o.weight_decay,
                                          adjust_lr_fn="match_rms_adamw")]
        else:
            self.opts = [torch.optim.AdamW(model.parameters(), **adamw)]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)) for opt in self.opts]
        self.params = [p for p in model.parameters()]
        self.bf16_storage = o.weight_storage == "bf16"

    def step(self) -> None:
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in self.scheds:
            sched.step()
        if self.bf16_storage:
            round_to_bf16_(self.params)

    def last_lr(self) -> float:
        return self.scheds[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.opts],
                "schedulers": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        for sched, s in zip(self.scheds, state["schedulers"], strict=True):
            sched.load_state_dict(s)


@torch.no_grad()
def round_to_bf16_(params: list[torch.Tensor]) -> None:
    """Round fp32 tensors to the nearest bf16 value in place (round-to-nearest-even)."""
    for p in params:
        p.copy_(p.to(torch.bfloat16))
