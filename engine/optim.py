"""Optimizers and the LR schedule: AdamW, or Muon for the blocks' matrices; bf16 weight storage.

``optim.name=muon`` splits the parameters the way Muon is meant to be used: the 2-D weights
inside the transformer blocks (attention and MLP projections, modulation) go to Muon
(``engine/muon.py``: torch.optim.Muon's update for sharded weights, so any layout trains
with it); embeddings, the output layer, norms and biases stay on AdamW. All share one schedule
(``lr_lambda``), so they are one optimizer from the loop's point of view.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from kiln.engine.config import RunConfig
from kiln.engine.errors import KilnError
from kiln.engine.muon import ShardedMuon

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
    """The torch optimizers of one run with one LR schedule, stepped and checkpointed together.

    One AdamW per model part (pipeline stages held by this rank; one part otherwise), or per
    part an AdamW and a Muon. Per-part optimizers keep the distributed checkpoint keyed by
    parameter name, so it loads into any other layout.
    """

    def __init__(self, cfg: RunConfig, parts: nn.Module | list[nn.Module], device: torch.device):
        o = cfg.optim
        self.parts = parts if isinstance(parts, list) else [parts]
        adamw = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                     fused=device.type == "cuda")
        self.owners: list[nn.Module] = []  # the part each optimizer's parameters belong to
        self.opts: list[torch.optim.Optimizer] = []
        for part in self.parts:
            if o.name == "muon":
                matrices, rest = muon_params(part)
                self.opts += [torch.optim.AdamW(rest, **adamw),
                              ShardedMuon(matrices, lr=o.lr, weight_decay=o.weight_decay,
                                          adjust_lr_fn="match_rms_adamw")]
                self.owners += [part, part]
            else:
                self.opts.append(torch.optim.AdamW(part.parameters(), **adamw))
                self.owners.append(part)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)) for opt in self.opts]
        self.params = [p for part in self.parts for p in part.parameters()]
        self.bf16_storage = o.weight_storage == "bf16"

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One update; ``found_inf`` (fp16 loss scaling: 1.0 when the gradients overflowed)
        skips it. The schedule advances either way: it follows the loop's steps."""
        skip = None  # read from the device only for an optimizer that cannot take the flag
        for opt in self.opts:
            if found_inf is None:
                opt.step()
            elif opt.defaults.get("fused"):
                _fused_step(opt, found_inf)
            else:
                skip = bool(found_inf.item()) if skip is None else skip
                if not skip:
                    opt.step()
            opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step is not the misuse this warns about
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
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
        self.load_schedulers(state["schedulers"])

    def load_schedulers(self, states: list[dict]) -> None:
        for sched in self.scheds:  # every scheduler follows the same schedule
            sched.load_state_dict(states[0])

    # distributed checkpoints: optimizer state keyed by parameter name, schedules apart
    def sharded_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        out = {}
        for part, opt in zip(self.owners, self.opts, strict=True):
            out.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return out

    def load_sharded_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for part, opt in zip(self.owners, self.opts, strict=True):
            set_optimizer_state_dict(part, opt, state, options=_FLAT)


    def load_full_state_dict(self, state: dict, cfg: RunConfig) -> None:
        """A single-process checkpoint's optimizer state (torch's ``state_dict()``, keyed by
        parameter position: one AdamW, or AdamW and Muon) into this layout's optimizers (per
        pipeline stage), sharded as they are."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        orders = single_process_order(cfg)
        if len(state["optimizers"]) != len(orders):
            raise KilnError(f"this checkpoint holds {len(state['optimizers'])} optimizer states, optim.name="
                            f"{cfg.optim.name} keeps {len(orders)}: the optimizer cannot change on resume")
        saved = [_named_state(s, order) for s, order in zip(state["optimizers"], orders, strict=True)]
        kinds = len(saved)  # optimizers per part, in the same order as one process's
        for i, (part, opt) in enumerate(zip(self.owners, self.opts, strict=True)):
            held = {id(q) for g in opt.param_groups for q in g["params"]}
            names = {n for n, p in part.named_parameters() if id(p) in held}
            mine = _restrict(saved[i % kinds], names)  # a stage holds some names
            set_optimizer_state_dict(part, opt, mine, options=StateDictOptions(full_state_dict=True))
        self.load_schedulers(state["schedulers"])


def single_process_order(cfg: RunConfig) -> list[list[str]]:
    """Per optimizer of one process, the parameter names in the order it holds them (its
    state's keys): [all] for AdamW, [the rest, the block matrices] for Muon."""
    from kiln.model.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    if cfg.optim.name != "muon":
        return [list(names.values())]
    matrices, rest = muon_params(model)
    return [[names[id(p)] for p in rest], [names[id(p)] for p in matrices]]


def _named_state(saved: dict, order: list[str]) -> dict:
    """torch's optimizer state_dict (params as positions) -> the same keyed by parameter name."""
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def _restrict(saved: dict, keep: set[str]) -> dict:
    """The named state of the parameters in ``keep``."""
    groups = [{**g, "params": [n for n in g["params"] if n in keep]} for g in saved["param_groups"]]
    return {"state": {n: s for n, s in saved["state"].items() if n in keep},
            "param_groups": [g for g in groups if g["params"]]}


def _fused_step(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """A fused AdamW step that the device skips when ``found_inf`` is set (no host sync): the
    attributes torch.amp.GradScaler hands fused optimizers; the gradients are already unscaled."""
    opt.grad_scale, opt.found_inf = None, found_inf
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


_FLAT = _flat_options()


@torch.no_grad()
def round_to_bf16_(params: list[torch.Tensor]) -> None:
    """Round fp32 tensors to the nearest bf16 value in place (round-to-nearest-even)."""
    for p in params:
        p.copy_(p.to(torch.bfloat16))
