"""Exponential moving average of the model weights, kept in fp32 beside the master weights.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: with a fixed 0.995 from
step 0, the average of an adaLN-Zero model still holds 37% of its all-zero output layer at
step 200 and samples pure noise (measured on the tiny recipe), while the raw weights already
draw shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """fp32 copies of the parameters, named as in the full model.

    Under FSDP / TP the copies are DTensors with the parameters' placements, so each rank keeps
    and updates only its own shard (no gather); checkpoints reshard them like the weights.
    """

    def __init__(self, parts: nn.Module | list[nn.Module], decay: float):
        self.decay, self.updates = decay, 0  # updates: calls of update()
        self.skipped: torch.Tensor | None = None  # of those, skipped fp16 steps: a device count
        self.params = {n: p.detach().clone() for n, p in _named(parts)}

    def current_decay(self) -> float:
        return _warm(self.decay, self.updates)

    def applied(self) -> int:
        """Updates that moved the average (reads the device count: checkpoints only)."""
        return self.updates - (int(self.skipped.item()) if self.skipped is not None else 0)

    @torch.no_grad()
    def update(self, parts: nn.Module | list[nn.Module], skip: torch.Tensor | None = None) -> None:
        """Move toward the weights; ``skip`` (a device flag, 1.0 = the optimizer skipped this
        fp16 step) leaves the average as it is and the warm-up where it was, as fused AdamW
        takes its step count back (all on the device: no host sync per step)."""
        if skip is None:
            weight = 1.0 - self.current_decay()
        else:
            before = self.skipped if self.skipped is not None else torch.zeros_like(skip)
            weight = (1.0 - _warm(self.decay, self.updates - before)) * (1.0 - skip)
            self.skipped = before + skip
        self.updates += 1
        named = _named(parts)
        torch._foreach_lerp_([_local(self.params[n]) for n, _ in named], [_local(p.detach()) for _, p in named], weight)

    def state_dict(self) -> dict:
        return {"params": self.params, "updates": self.applied()}

    def load_state_dict(self, state: dict) -> None:
        """Full (single-process) tensors; under FSDP / TP each rank keeps its shard of them."""
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for name, value in state["params"].items():
                if name not in self.params:  # a pipeline stage holds some of the names
                    continue
                mine = self.params[name]
                if isinstance(mine, DTensor):
                    value = distribute_tensor(value.to(mine.device), mine.device_mesh, mine.placements)
                mine.copy_(value)
        self.updates, self.skipped = int(state["updates"]), None


def _warm(decay: float, n):
    """The decay after n applied updates (a number, or a device tensor)."""
    if isinstance(n, torch.Tensor):
        return ((1 + n) / (10 + n)).clamp(max=decay)
    return min(decay, (1 + n) / (10 + n))


def _named(parts: nn.Module | list[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    parts = parts if isinstance(parts, list) else [parts]
    return [(n, p) for part in parts for n, p in part.named_parameters()]
