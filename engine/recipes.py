"""Recipes: named Python functions returning a complete ``RunConfig``.

``tiny`` is the CPU demo (`kiln train` with no arguments): a 1.9M-parameter MMDiT on 32 px
shapes, batch 32, 1000 steps, about 8 minutes on 2 cores. ``small`` and ``base`` are GPU recipes on the same built-in
data (real image data plugs in with the data issue).
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.engine.config import DataConfig, RunConfig, SampleConfig, TextConfig, TrainConfig
from kiln.engine.errors import ConfigError
from kiln.model.presets import preset


def tiny() -> RunConfig:
    # Batch 32 beats 64 per second of CPU time: both-colour adherence 0.67 at 1000 steps of 32
    # vs 0.47 at 500 steps of 64 (benchmarks/results/cpu-demo-sweep.txt, 2 threads each).
    return RunConfig(recipe="tiny", model=preset("tiny"), train=TrainConfig(steps=1000, batch_size=32))


def small() -> RunConfig:
    model = preset("small")
    model.in_channels = 3  # pixel space on the built-in data
    return RunConfig(
        recipe="small",
        model=model,
        text=TextConfig(name="ViT-B-32", max_length=40),
        data=DataConfig(resolution=128, max_count=3, captions="mixed"),
        train=TrainConfig(steps=20_000, batch_size=128, ckpt_every=1000),
        sample=SampleConfig(every=2000),
    )


def base() -> RunConfig:
    model = preset("base")
    model.in_channels = 3
    return RunConfig(
        recipe="base",
        model=model,
        text=TextConfig(name="ViT-L-14", max_length=77),
        data=DataConfig(resolution=256, max_count=3, captions="mixed"),
        train=TrainConfig(steps=100_000, batch_size=256, ckpt_every=2000),
        sample=SampleConfig(every=5000),
    )


RECIPES: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "small": small, "base": base}


def recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r} is not one of: {', '.join(RECIPES)}")
    return RECIPES[name]()
