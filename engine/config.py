"""Typed run configuration: dataclasses, validation, ``--set a.b=c`` overrides, JSON round trip.

Every field lives in exactly one dataclass below; ``RunConfig`` nests them. Errors name the
field and what is allowed (``ConfigError: optim.schedule: 'linear' is not one of: cosine,
constant``). Recipes (engine/recipes.py) are Python functions returning a ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from kiln.engine.errors import ConfigError
from kiln.model.mmdit import MMDiTConfig


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of: {', '.join(map(str, allowed))}")


def _positive(name: str, value, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value}")


def _unit(name: str, value, low_open: bool = False, high_open: bool = False) -> None:
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}")


@dataclass
class TextConfig:
    family: str = "open_clip"
    name: str = "kiln-tiny-text"  # any open_clip model name
    weights: str | None = None  # local weights file; None = random init (warned once)
    max_length: int = 16  # tokens kept per caption (start + words + end-of-text)

    def validate(self) -> None:
        _choice("text.family", self.family, ("open_clip",))
        _positive("text.max_length", self.max_length)


@dataclass
class DataConfig:
    source: str = "shapes"  # the built-in procedural set
    resolution: int = 32  # square side in pixels (model input)
    captions: str = "short"  # short | long | mixed
    max_count: int = 1  # shapes per image: 1..max_count
    num_samples: int = 1_000_000  # epoch size of the procedural set
    caption_dropout: float = 0.1  # replace the caption by "" (the CFG unconditional)
    seed: int = 0

    def validate(self) -> None:
        _choice("data.source", self.source, ("shapes",))
        _choice("data.captions", self.captions, ("short", "long", "mixed"))
        _choice("data.max_count", self.max_count, (1, 2, 3))
        if self.resolution < 32 or self.resolution % 8:
            raise ConfigError(
                f"data.resolution must be a multiple of 8 and >= 32 (the scorer reads shapes exactly "
                f"from 32 px up), got {self.resolution}"
            )
        _positive("data.num_samples", self.num_samples)
        _unit("data.caption_dropout", self.caption_dropout, high_open=True)


@dataclass
class ObjectiveConfig:
    timesteps: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # SD3 resolution shift t' = s·t / (1 + (s - 1)·t), s = sqrt(tokens / shift_base_tokens):
    # more image tokens need more noise for the same signal-to-noise at a given t.
    shift_base_tokens: int = 64

    def validate(self) -> None:
        _choice("objective.timesteps", self.timesteps, ("logit_normal", "uniform"))
        _positive("objective.logit_std", self.logit_std)
        _positive("objective.shift_base_tokens", self.shift_base_tokens)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        _choice("optim.schedule", self.schedule, ("constant", "cosine"))
        for i, b in enumerate(self.betas):
            _unit(f"optim.betas[{i}]", b, high_open=True)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must have 2 values, got {len(self.betas)}")
        _positive("optim.warmup_steps", self.warmup_steps, strict=False)
        _unit("optim.min_lr_ratio", self.min_lr_ratio)
        _positive("optim.grad_clip", self.grad_clip, strict=False)
        _positive("optim.weight_decay", self.weight_decay, strict=False)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.995

    def validate(self) -> None:
        _unit("ema.decay", self.decay, high_open=True)


@dataclass
class SampleConfig:
    steps: int = 25  # Euler steps
    cfg_scale: float = 4.0
    num_prompts: int = 64  # held-out prompts scored for adherence
    every: int = 0  # sample + score every N train steps (0 = only at the end)
    grid_size: int = 16  # images in the PNG grid

    def validate(self) -> None:
        _positive("sample.steps", self.steps)
        _positive("sample.cfg_scale", self.cfg_scale, strict=False)
        _positive("sample.num_prompts", self.num_prompts)
        _positive("sample.every", self.every, strict=False)
        _positive("sample.grid_size", self.grid_size, strict=False)


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16-autocast
    log_every: int = 10  # flush buffered device losses to metrics.jsonl every N steps
    ckpt_every: int = 200
    keep_ckpts: int = 2
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    kernel_backend: str = "auto"  # auto | torch | triton | csrc (kiln.kernels.use_backend)
    # Bit-exact reruns and resumes on CUDA (deterministic kernels, cuBLAS workspace config);
    # CPU runs are deterministic already.
    deterministic: bool = False

    def validate(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device: {self.device!r} is not one of: auto, cpu, cuda, cuda:N")
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16-autocast"))
        _positive("train.log_every", self.log_every)
        _positive("train.ckpt_every", self.ckpt_every, strict=False)
        _positive("train.keep_ckpts", self.keep_ckpts)
        _positive("train.threads", self.threads, strict=False)
        _choice("train.kernel_backend", self.kernel_backend, ("auto", "torch", "triton", "csrc"))


@dataclass
class RunConfig:
    recipe: str = "tiny"
    seed: int = 0
    model: MMDiTConfig = field(default_factory=MMDiTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        from kiln.engine.data.shapes import CAPTION_TOKENS

        need = CAPTION_TOKENS[self.data.captions]
        if self.data.source == "shapes" and self.text.max_length < need:
            raise ConfigError(
                f"text.max_length ({self.text.max_length}) would cut {self.data.captions} captions "
                f"(up to {need} tokens); set text.max_length={need} or more"
            )
        if self.data.resolution % self.model.patch_size:
            raise ConfigError(
                f"data.resolution ({self.data.resolution}) must be a multiple of "
                f"model.patch_size ({self.model.patch_size})"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(path: str, text: str, tp):
    """Parse the string ``text`` as a value of type ``tp`` for field ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return _coerce(path, text, next(a for a in args if a is not type(None)))
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float, str):
            return tp(text)
        if origin is tuple:
            items = json.loads(text) if text.startswith("[") else text.split(",")
            return tuple(_coerce(path, str(v), a) for v, a in zip(items, args, strict=True))
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse {text!r} as {getattr(tp, '__name__', tp)}") from e
    raise ConfigError(f"{path}: fields of type {tp} cannot be set from the command line")


def _field_types(obj) -> dict:
    return typing.get_type_hints(type(obj))


def apply_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one ``a.b=c`` override in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    obj = cfg
    for i, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"unknown config field {path!r}: {where} has {', '.join(names)}")
        if i < len(parts) - 1:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
    tp = _field_types(obj)[parts[-1]]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{path} is a section; set one of its fields ({path}.FIELD=VALUE)")
    setattr(obj, parts[-1], _coerce(path, text.strip(), tp))


def from_dict(data: dict, cls=RunConfig):
    """Rebuild a config from :meth:`RunConfig.to_dict` output (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config field {key!r} in {cls.__name__}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = from_dict(value, tp)
        elif typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
