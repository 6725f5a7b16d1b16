"""Typed run configuration: dataclasses, validation, ``--set a.b=c`` overrides, JSON round trip.

Every field lives in exactly one dataclass below; ``RunConfig`` nests them. Errors name the
field and what is allowed (``ConfigError: optim.schedule: 'linear' is not one of: cosine,
constant``). Recipes (engine/recipes.py) are Python functions returning a ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from kiln.engine.data.buckets import DEFAULT_ASPECTS
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
    # --- source = "shards": a folder written by `kiln data prepare` (engine/data/shards.py) ---
    path: str = ""
    buckets: bool = True  # aspect-ratio buckets around resolution² (else one square bucket)
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECTS  # width/height of the buckets
    random_crop: bool = True  # else center crop after resize-to-cover
    flip: bool = False  # horizontal flip; off by default: captions may say "left" / "right"
    min_side: int = 0  # filters, applied at load time from the metadata
    max_aspect: float = 0.0  # keep width/height within [1/max_aspect, max_aspect]; 0 = any
    min_clip_score: float | None = None  # needs `kiln data score`
    min_aesthetic: float | None = None
    decoder: str = "dali"  # dali (GPU "mixed" decode with CUDA, CPU otherwise) | pillow
    vae: str = ""  # diffusers AutoencoderKL folder: train on its latents (encoded online); "" = pixels
    latents: bool = False  # read latents + text features from `kiln data encode` (center crops, no flip)
    workers: int = 2  # reader threads per rank
    prefetch: bool = True  # read + decode the next batch in the background during the step
    decode_threads: int = 2  # DALI CPU threads

    def validate(self) -> None:
        _choice("data.source", self.source, ("shapes", "shards"))
        if self.source == "shards" and not self.path:
            raise ConfigError("data.path must name a prepared dataset folder when data.source=shards")
        if self.latents and (self.source != "shards" or not self.vae):
            raise ConfigError("data.latents=true needs data.source=shards and data.vae (the VAE decodes samples "
                              "and encodes the held-out images)")
        _choice("data.decoder", self.decoder, ("dali", "pillow"))
        _positive("data.workers", self.workers)
        _positive("data.decode_threads", self.decode_threads)
        if self.max_aspect and self.max_aspect < 1:
            raise ConfigError(f"data.max_aspect must be 0 (any) or >= 1, got {self.max_aspect}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ConfigError(f"data.aspect_ratios must be positive width/height ratios, got {self.aspect_ratios}")
        _choice("data.captions", self.captions, ("short", "long", "mixed"))
        _choice("data.max_count", self.max_count, (1, 2, 3))
        _check_resolution("data.resolution", self.resolution)
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
    # adamw everywhere, or muon for the 2-D weights inside the transformer blocks (AdamW for
    # embeddings, norms, biases and the output layer; torch.optim.Muon's update with Moonshot's
    # RMS matching, so the AdamW learning rate carries over; any parallel layout: engine/muon.py)
    name: str = "adamw"
    # fp32: fp32 master weights. bf16: every weight is rounded to bf16 after each update, which
    # is what storing weights in bf16 keeps (updates below half a bf16 ulp, ~0.4% of |w|, are
    # lost); compute is unchanged, so the ablation isolates storage precision.
    weight_storage: str = "fp32"

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        _choice("optim.name", self.name, ("adamw", "muon"))
        _choice("optim.weight_storage", self.weight_storage, ("fp32", "bf16"))
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
    num_prompts: int = 64  # held-out prompts scored for adherence (0 = no evaluation)
    every: int = 0  # sample + score every N train steps (0 = only at the end)
    grid_size: int = 16  # images in the PNG grid
    use_ema: bool = True  # sample from the EMA weights (when ema.enabled) or the raw weights
    captions: str = "same"  # held-out prompt style: same (as data.captions) | short | long
    # held-out loss: each of num_prompts held-out images at this many fixed, evenly spaced t
    heldout_timesteps: int = 8
    # CLIP metrics per evaluation when clip_weights names a local open_clip checkpoint: clip_score
    # (generated image vs its prompt) and cmmd (generated vs real held-out images; engine/clip.py)
    clip_model: str = "ViT-L-14"
    clip_weights: str = ""

    def validate(self) -> None:
        _positive("sample.steps", self.steps)
        _positive("sample.cfg_scale", self.cfg_scale, strict=False)
        _positive("sample.num_prompts", self.num_prompts, strict=False)
        _positive("sample.every", self.every, strict=False)
        _positive("sample.grid_size", self.grid_size, strict=False)
        _choice("sample.captions", self.captions, ("same", "short", "long"))
        _positive("sample.heldout_timesteps", self.heldout_timesteps)
        if self.clip_weights and not os.path.isfile(self.clip_weights):
            raise ConfigError(f"sample.clip_weights: {self.clip_weights!r} is not a file (a local open_clip "
                              "checkpoint of sample.clip_model)")
        if self.clip_weights and self.num_prompts < 2:
            raise ConfigError(f"sample.clip_weights needs sample.num_prompts >= 2 (CMMD compares two sets of "
                              f"images), got {self.num_prompts}")


PRECISIONS = ("auto", "fp32", "bf16-autocast", "fp16-autocast")


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16-autocast on GPUs with native bf16 (8.0+), fp16-autocast on 7.x (V100, T4: fp16
    # tensor cores, no bf16), fp32 on the CPU | fp32 | bf16-autocast | fp16-autocast (loss scaled)
    precision: str = "auto"
    # fp16-autocast's dynamic loss scale (engine/loss_scale.py): the first scale, and the clean
    # steps after which it doubles (an overflow halves it and skips the step)
    loss_scale_init: float = 2.0**16
    loss_scale_growth_interval: int = 2000
    log_every: int = 10  # flush buffered device losses to metrics.jsonl every N steps
    ckpt_every: int = 200
    keep_ckpts: int = 2
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    kernel_backend: str = "auto"  # auto | torch | triton | csrc (kiln.kernels.use_backend)
    # Bit-exact reruns and resumes on CUDA (deterministic kernels, cuBLAS workspace config);
    # CPU runs are deterministic already.
    deterministic: bool = False
    # A non-finite loss ends the run (summary.json records diverged_at_step) before any
    # checkpoint of the broken weights is written; false keeps training through it.
    stop_on_divergence: bool = True
    # torch.profiler over steps profile_from .. profile_from + profile_steps - 1 (1-based; 0 = off):
    # RUN/profile/ gets a Chrome trace and an operator table per rank (engine/profiler.py);
    # profile_memory (CUDA) adds an allocator snapshot for pytorch.org/memory_viz
    profile_from: int = 0
    profile_steps: int = 3
    profile_memory: bool = False

    def validate(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device: {self.device!r} is not one of: auto, cpu, cuda, cuda:N")
        _choice("train.precision", self.precision, PRECISIONS)
        _positive("train.loss_scale_init", self.loss_scale_init)
        _positive("train.loss_scale_growth_interval", self.loss_scale_growth_interval)
        _positive("train.log_every", self.log_every)
        _positive("train.ckpt_every", self.ckpt_every, strict=False)
        _positive("train.keep_ckpts", self.keep_ckpts)
        _positive("train.threads", self.threads, strict=False)
        _choice("train.kernel_backend", self.kernel_backend, ("auto", "torch", "triton", "csrc"))
        _positive("train.profile_from", self.profile_from, strict=False)
        _positive("train.profile_steps", self.profile_steps)
        if self.profile_from > self.steps:
            raise ConfigError(f"train.profile_from = {self.profile_from} is past the run's last step "
                              f"(train.steps = {self.steps})")
        if self.profile_memory and not self.profile_from:
            raise ConfigError("train.profile_memory=true needs a window: set train.profile_from to a step")


AXES = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
RESHARDS = ("auto", "after-forward", "after-step")  # parallel.reshard


@dataclass
class ParallelConfig:
    """Layout over ``torchrun`` processes: the product of the four axes is the world size.

    Mesh order (outer to inner) is pp, dp_replicate, dp_shard, cp, tp: TP talks most and stays
    within a node (8 GPUs on NVLink), context parallel's all-to-alls next, then FSDP; pipeline
    and replicas cross nodes.
    """

    dp_replicate: int = 1  # HSDP replicas (each holds a full shard set; gradients all-reduced)
    dp_shard: int = -1  # FSDP2 shards; -1 fills whatever the other axes leave of the world
    # context parallel: each sample's text and image tokens split over cp ranks. Weights stay
    # whole (FSDP shards them over dp_shard x cp); activation memory per GPU / cp
    cp: int = 1
    # how attention sees every token under cp: ulysses = an all-to-all trades the token split for
    # a head split (cp must divide the heads tp leaves; model/sequence_parallel.py); ring = each
    # rank keeps its tokens and heads, keys and values travel around the cp group (any cp;
    # cp-1 times their bytes each way, block math in plain PyTorch: model/ring_attention.py)
    cp_attention: str = "ulysses"
    tp: int = 1  # tensor + sequence parallel degree (heads, MLP hidden, modulation sharded)
    pp: int = 1  # pipeline stages (blocks split by FLOPs)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b
    # chunks of each data-parallel rank's batch per step: the pipeline's microbatches, or
    # gradient accumulation without a pipeline (activation memory of one chunk); 0 = one per
    # pipeline stage (1 = no accumulation without a pipeline)
    microbatches: int = 0
    # gradient accumulation under FSDP, a pipeline's micro-batches too: every = reduce-scatter
    # after each micro-batch into the sharded gradients (no extra memory; HSDP's all-reduce across
    # replicas once, after the last); last = keep the unsharded gradients across micro-batches
    # (FSDP holds them in fp32: 4 bytes per parameter / (tp·pp)) and reduce once
    accumulate_sync: str = "every"
    # when FSDP frees each block's gathered parameters: after-forward = after each forward, gathered
    # again for its backward (least memory: 2 blocks at a time); after-step = kept from the step's
    # first forward to its last backward (one all-gather per block per step instead of 2 per
    # micro-batch, for 2 bytes per parameter / (tp·pp) more); auto = after-step with a pipeline
    # (at least one micro-batch per stage: after-forward gathers 2·pp times or more), after-forward
    # otherwise
    reshard: str = "auto"
    virtual_stages: int = 2  # stages per rank for interleaved-1f1b
    # none | selective (keep matmul, attention and TP reduce-scatter outputs; recompute norms,
    # modulation, activations, CP all-to-alls; in the kinds of block where that keeps less than
    # none, kiln.engine.scaling.checkpointed: since Dec 8 none, whose blocks keep 20 / 18 bytes per
    # token and unit of width against the policy's 22) | full (keep each block's input; rerun its forward)
    activation_checkpoint: str = "none"
    compile: bool = False  # torch.compile each block (after AC, before FSDP)
    shard_text_encoder: bool = False  # FSDP-shard the frozen text encoder over dp (big towers)
    async_checkpoint: bool = False  # torch.distributed.checkpoint.async_save
    timeout_s: int = 600  # collective timeout: a hung or dead rank ends the run after this

    def validate(self) -> None:
        fills = [a for a in AXES if getattr(self, a) == -1]
        if len(fills) > 1:
            raise ConfigError(f"parallel: only one of {', '.join(AXES)} may be -1, got {', '.join(fills)}")
        for a in AXES:
            if getattr(self, a) != -1:
                _positive(f"parallel.{a}", getattr(self, a))
        _choice("parallel.pp_schedule", self.pp_schedule, ("gpipe", "1f1b", "interleaved-1f1b"))
        _choice("parallel.cp_attention", self.cp_attention, ("ulysses", "ring"))
        _positive("parallel.microbatches", self.microbatches, strict=False)
        _choice("parallel.accumulate_sync", self.accumulate_sync, ("every", "last"))
        _choice("parallel.reshard", self.reshard, RESHARDS)
        _positive("parallel.virtual_stages", self.virtual_stages)
        _choice("parallel.activation_checkpoint", self.activation_checkpoint, ("none", "selective", "full"))
        _positive("parallel.timeout_s", self.timeout_s)

    def sizes(self, world: int) -> dict[str, int]:
        """The four axis sizes for ``world`` processes (-1 filled); errors name the fields."""
        fixed = 1
        for a in AXES:
            fixed *= max(1, getattr(self, a))
        sizes = {a: getattr(self, a) for a in AXES}
        for a in AXES:
            if sizes[a] == -1:
                if world % fixed:
                    raise ConfigError(f"parallel: world size {world} is not divisible by the fixed axes "
                                      f"({fixed}), so parallel.{a}=-1 cannot fill it")
                sizes[a] = world // fixed
        product = sizes["dp_replicate"] * sizes["dp_shard"] * sizes["cp"] * sizes["tp"] * sizes["pp"]
        if product != world:
            raise ConfigError(f"parallel: dp_replicate x dp_shard x cp x tp x pp = {product} but the world size is "
                              f"{world}; set one axis to -1 or make the product {world}")
        return sizes


@dataclass
class StageConfig:
    """One stage of multi-stage training: ``steps`` steps at ``resolution`` with ``batch_size``."""

    steps: int
    resolution: int
    batch_size: int
    # prepared datasets of this stage and their sampling weights (replay earlier stages' data with a
    # small weight); empty = data.path alone. Only with data.source=shards.
    data: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def validate(self, i: int = 0) -> None:
        if self.weights and len(self.weights) != len(self.data):
            raise ConfigError(f"stages[{i}].weights has {len(self.weights)} entries for {len(self.data)} datasets")
        if any(w <= 0 for w in self.weights):
            raise ConfigError(f"stages[{i}].weights must be > 0, got {self.weights}")
        _positive(f"stages[{i}].steps", self.steps)
        _positive(f"stages[{i}].batch_size", self.batch_size)
        _check_resolution(f"stages[{i}].resolution", self.resolution)


def _check_resolution(name: str, value: int) -> None:
    if value < 32 or value % 8:
        raise ConfigError(
            f"{name} must be a multiple of 8 and >= 32 (the scorer reads shapes exactly from 32 px up), got {value}"
        )


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Multi-stage training (e.g. 32 px then 48 px); empty = one stage at data.resolution with
    # train.batch_size. Stage steps must add up to train.steps; sampling uses the current stage's
    # resolution. Set from the command line as JSON:
    # --set 'stages=[{"steps":600,"resolution":32,"batch_size":32},{"steps":400,...}]'
    stages: list[StageConfig] = field(default_factory=list)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        for i, stage in enumerate(self.stages):
            stage.validate(i)
            if stage.data and self.data.source != "shards":
                raise ConfigError(f"stages[{i}].data lists datasets but data.source is {self.data.source!r}: "
                                  "set data.source=shards")
            if stage.resolution % self.model.patch_size:
                raise ConfigError(f"stages[{i}].resolution ({stage.resolution}) must be a multiple of "
                                  f"model.patch_size ({self.model.patch_size})")
        if self.stages and sum(s.steps for s in self.stages) != self.train.steps:
            raise ConfigError(f"stages: steps add up to {sum(s.steps for s in self.stages)}, "
                              f"but train.steps is {self.train.steps}")
        from kiln.engine.data.shapes import CAPTION_TOKENS

        styles = {self.data.captions, self.sample.captions} - {"same"}
        style = max(styles, key=CAPTION_TOKENS.get)
        need = CAPTION_TOKENS[style]
        if self.data.source == "shapes" and self.text.max_length < need:
            raise ConfigError(
                f"text.max_length ({self.text.max_length}) would cut {style} captions "
                f"(up to {need} tokens); set text.max_length={need} or more"
            )
        if self.data.resolution % self.model.patch_size:
            raise ConfigError(
                f"data.resolution ({self.data.resolution}) must be a multiple of "
                f"model.patch_size ({self.model.patch_size})"
            )
        return self

    def stage_at(self, step: int) -> StageConfig:
        """The stage that optimizer step ``step`` (0-based) belongs to."""
        if not self.stages:
            return StageConfig(self.train.steps, self.data.resolution, self.train.batch_size)
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage
        return self.stages[-1]

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
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[float, ...]
                args = (args[0],) * len(items)
            return tuple(_coerce(path, str(v), a) for v, a in zip(items, args, strict=True))
        if origin is list and dataclasses.is_dataclass(args[0]):
            items = json.loads(text)
            if not isinstance(items, list):
                raise ValueError
            return [from_dict(item, args[0]) for item in items]
    except (ValueError, TypeError, json.JSONDecodeError) as e:
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
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            value = [from_dict(v, typing.get_args(tp)[0]) for v in value]
        elif typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from e
