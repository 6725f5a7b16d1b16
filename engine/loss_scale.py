"""Dynamic loss scaling for ``train.precision=fp16-autocast`` (V100 / T4 class GPUs).

fp16 keeps 5 exponent bits: activation gradients below 6e-8 flush to zero and above 65504
overflow. The loss is multiplied by ``scale`` before backward so small gradients survive the
fp16 activations; the fp32 master gradients are divided back in the same pass that clips them.
A step whose gradients overflowed (non-finite global norm, the norm every rank already
all-reduces for clipping, so all ranks agree) is skipped and the scale halved; after
``growth_interval`` clean steps it doubles.

Nothing here syncs with the host: the skip flag stays a device tensor that fused AdamW reads as
its ``found_inf`` (the hook torch.amp.GradScaler uses), and the scale update is tensor ops.
Optimizers without that hook (CPU AdamW, Muon) read the flag once per step (optim.Optimizers).
"""

from __future__ import annotations

import torch

# a gradient of 1 scaled by 2^24 already overflows fp16 (max 65504 ~ 2^16); the cap keeps the
# scale finite on a model whose gradients are all tiny instead of doubling it into inf
MAX_SCALE = 2.0**24


class LossScaler:
    """The loss scale, its clean-step counter and the number of skipped steps, on the device."""

    def __init__(self, device: torch.device, init_scale: float, growth_interval: int):
        self.growth_interval = growth_interval
        self.scale = torch.full((), float(init_scale), device=device)
        self.clean = torch.zeros((), dtype=torch.int64, device=device)  # steps since the last overflow
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def unscale_factor(self) -> torch.Tensor:
        return 1.0 / self.scale

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        """After a step: halve on overflow (the step was skipped), double after a clean run."""
        found = found_inf > 0
        self.skipped += found.long()
        self.clean = torch.where(found, 0, self.clean + 1)
        grow = self.clean >= self.growth_interval
        self.scale = torch.where(found, self.scale * 0.5,
                                 torch.where(grow, (self.scale * 2.0).clamp(max=MAX_SCALE), self.scale))
        self.clean = torch.where(grow, 0, self.clean)

    def state_dict(self) -> dict:
        return {"scale": self.scale.item(), "clean": int(self.clean.item()), "skipped": int(self.skipped.item())}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["scale"])
        self.clean.fill_(state["clean"])
        self.skipped.fill_(state["skipped"])
