"""Built-in ablation studies on the tiny recipe and the built-in shapes data.

A study is data: a baseline and its variants, each a list of ``--set`` overrides (or a function
of the step budget ``n`` returning them, for variants that trade steps for batch or resolution).
Copy one into a .py file as ``STUDY = Study(...)`` and run ``kiln ablate my_study.py``.

Every run of a study shares the seed, data order, held-out prompts and noise; only the
overrides differ. Default sizes keep each study within 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Overrides = list[str] | Callable[[int], list[str]]


@dataclass
class Study:
    name: str
    question: str  # one line: what the study measures
    variants: dict[str, Overrides]  # the first one is the baseline
    literature: str = ""  # the published finding it echoes
    recipe: str = "tiny"
    steps: int = 1000  # the baseline's training steps (kiln ablate --steps changes it)
    common: list[str] = field(default_factory=list)  # overrides for every run
    # an eval-time sweep of one sample.* field: every trained run is scored at each value
    sweep: tuple[str, list] | None = None

    def overrides(self, variant: str, steps: int) -> list[str]:
        spec = self.variants[variant]
        own = spec(steps) if callable(spec) else spec
        every = max(1, steps // 4)  # four evaluations per run feed the adherence-vs-step plot
        # 128 prompts: adherence standard error <= 0.044 (64: 0.062); ~30 s per evaluation
        return [f"train.steps={steps}", f"sample.every={every}", f"train.ckpt_every={every}",
                "sample.num_prompts=128", *self.common, *own]


def _stages(n: int, low: int, high: int, batch: int, low_fraction: float) -> list[str]:
    """Overrides for ``low`` px then ``high`` px at the compute of n steps at ``high`` px.

    A step's cost scales with image tokens (the tiny model's FLOPs are ~linear in tokens at these
    sizes: 256 vs 576 tokens), so one high-res step buys (high/low)^2 low-res steps.
    """
    ratio = (high / low) ** 2
    n_low = round(n * low_fraction * ratio)
    n_high = n - round(n * low_fraction)
    stages = (f'[{{"steps":{n_low},"resolution":{low},"batch_size":{batch}}},'
              f'{{"steps":{n_high},"resolution":{high},"batch_size":{batch}}}]')
    return [f"train.steps={n_low + n_high}", f"stages={stages}", f"data.resolution={high}"]


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study(
        name="caption_length",
        question="Train on long, descriptive captions or on short ones? Scored on both prompt styles.",
        literature="PRX: short captions FID 18.2 -> 36.8, the largest single effect",
        common=["text.max_length=40"],
        variants={"long captions": ["data.captions=long"], "short captions": ["data.captions=short"]},
        sweep=("sample.captions", ["long", "short"]),
    ),
    Study(
        name="weight_storage",
        question="fp32 master weights or weights stored in bf16 (rounded after every update)?",
        literature="PRX: bf16 weight storage FID 18.2 -> 21.9",
        variants={"fp32 master weights": [], "bf16 weight storage": ["optim.weight_storage=bf16"]},
    ),
    Study(
        name="qk_norm",
        question="Does QK-norm keep training stable at a learning rate where the plain model struggles?",
        literature="SD3, ViT-22B: QK-norm removes attention-logit growth and loss spikes at high LR",
        common=["optim.lr=0.01", "optim.grad_clip=0", "train.stop_on_divergence=true"],
        variants={"QK-norm, lr 1e-2": [], "no QK-norm, lr 1e-2": ["model.qk_norm=false"]},
    ),
    Study(
        name="adaln_zero",
        question="adaLN-Zero (zero-initialised modulation and output) or default init?",
        literature="DiT: adaLN-Zero FID 42.7 vs 45.3 cross-attention / 51.8 in-context at 400k steps",
        variants={"adaLN-Zero": [], "default init": ["model.adaln_zero=false"]},
    ),
    Study(
        name="cfg",
        question="Caption dropout makes CFG possible: guidance scale sweep with and without dropout.",
        literature="Classifier-free guidance (Ho & Salimans): 10-20% dropout, scale 3-7",
        variants={"caption dropout 0.1": [], "no caption dropout": ["data.caption_dropout=0"]},
        sweep=("sample.cfg_scale", [1.0, 2.0, 4.0, 7.0]),
    ),
    Study(
        name="timesteps",
        question="Logit-normal or uniform training timesteps?",
        literature="SD3: logit-normal(0, 1) best of 61 samplers by CLIP score and FID",
        variants={"logit-normal": [], "uniform": ["objective.timesteps=uniform"]},
    ),
    Study(
        name="multi_stage",
        question="48 px only, or 32 px first then 48 px, at equal training compute?",
        literature="SD3, SDXL, PixArt: pretrain at low resolution, finish at high",
        steps=500,
        variants={
            "48 px only": ["data.resolution=48"],
            "32 px (50% of compute) then 48 px": lambda n: _stages(n, 32, 48, 32, 0.5),
        },
    ),
    Study(
        name="batch_size",
        question="At equal images seen (and equal LR), which batch size trains best per image?",
        literature="DiT/SD practice: large batches need LR scaling; small ones take more steps",
        variants={
            "batch 32": [],
            "batch 64 (half the steps)": lambda n: ["train.batch_size=64", f"train.steps={n // 2}"],
            "batch 16 (twice the steps)": lambda n: ["train.batch_size=16", f"train.steps={n * 2}"],
        },
        steps=800,
    ),
    Study(
        name="ema",
        question="Sample from the EMA weights or the raw weights? (one run, scored both ways)",
        literature="DiT/EDM practice: EMA 0.9999 of the weights for sampling",
        variants={"EMA 0.995": []},
        sweep=("sample.use_ema", [True, False]),
    ),
    Study(
        name="optimizer",
        question="AdamW, or Muon for the transformer blocks' matrices (same LR and schedule)?",
        literature="PRX: Muon a clear gain over AdamW",
        # Muon (torch.optim.Muon's arithmetic) runs Newton-Schulz in bf16, which a CPU without bf16 units emulates:
        # 2.3 s/step against 0.43 for AdamW on 2 cores, so 400 steps keep the study near 25 min
        steps=400,
        variants={"AdamW": [], "Muon (blocks) + AdamW": ["optim.name=muon"]},
    ),
]}
