"""The training loop: rectified flow on an MMDiT, AdamW on fp32 master weights, EMA, exact resume.

One step: data -> caption dropout -> text encode (cached) -> t, noise -> forward (bf16
autocast on CUDA; fp16 on 7.x GPUs) -> backward (of the loss times the fp16 loss scale) ->
unscale + clip -> AdamW (skipped on an fp16 overflow) -> LR schedule -> EMA. Each arrow has a stage
timer. Losses stay on the device until a flush every ``train.log_every`` steps.
Run as ``kiln train ...`` or ``python -m kiln.engine.train ...`` (same arguments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kiln import kernels
from kiln.engine import checkpoint, parallel
from kiln.engine.config import RunConfig, from_dict
from kiln.engine.data.loader import ShapesLoader, to_model_range
from kiln.engine.data.mix import MixLoader
from kiln.engine.ema import EMA
from kiln.engine.errors import ConfigError
from kiln.engine.evaluate import evaluate, heldout_batch, heldout_loss, split_scores
from kiln.engine.loss_scale import LossScaler
from kiln.engine.metrics import MetricsLog, StageTimer, device_name, peak_flops
from kiln.engine.objective import caption_drop_mask, drop_captions, interpolate, sample_timesteps
from kiln.engine.optim import Optimizers
from kiln.engine.profiler import StepProfiler
from kiln.model.mmdit import MMDiT
from kiln.model.presets import count_params, forward_flops
from kiln.model.text_encoder import FixedTexts, OpenCLIPTextEncoder, TextBatch, build_text_encoder
from kiln.model.vae import LatentCodec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; None = fp32 throughout."""
    if precision == "bf16-autocast":
        return torch.bfloat16
    if precision == "fp16-autocast":
        return torch.float16
    if precision == "fp32" or device.type != "cuda":
        return None
    # auto: bf16 only where the GPU has it natively (8.0+); a V100 / T4 would emulate it, slower
    # than its fp32, but has fp16 tensor cores (V100: 125 vs 15.7 TFLOP/s fp32), so loss-scaled fp16
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16 if torch.cuda.get_device_capability(device) >= (7, 0) else None


def autocast_factory(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_frozen(cfg: RunConfig, device: torch.device) -> tuple[OpenCLIPTextEncoder, LatentCodec | None]:
    """The frozen text encoder and VAE, built as every run builds them, and cfg.model's widths
    and input channels set from them.

    The global RNG is seeded with ``cfg.seed`` first: a text encoder without a weights file
    (text.weights) is random-init, and is not in checkpoints, so sampling a run needs the same draw.
    """
    torch.manual_seed(cfg.seed)
    encoder = build_text_encoder(cfg.text.family, cfg.text.name, cfg.text.weights, cfg.text.max_length)
    encoder.to(device)
    cfg.model.text_dim, cfg.model.pooled_dim = encoder.width, encoder.pooled_dim
    vae = LatentCodec.load(cfg.data.vae, device) if cfg.data.vae else None
    if vae is not None:  # the model sees latents: its input channels are the VAE's
        cfg.model.in_channels = vae.channels
    return encoder, vae


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = parallel.device_for_rank(cfg.train.device) if distributed else resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.dist = d = parallel.init(cfg, self.device)
        self.is_main = d.rank == 0
        self.encoder, self.vae = build_frozen(cfg, self.device)
        self.encoder.batch_invariant = cfg.train.deterministic
        if cfg.parallel.shard_text_encoder and d.dp_mesh() is not None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.encoder, mesh=d.dp_mesh())  # frozen: gathered per forward, never reduced
            self.encoder.sharded = True
        self.pixels_per_token = cfg.model.patch_size * (self.vae.factor if self.vae is not None else 1)
        _check_resolutions(cfg, self.pixels_per_token)
        if cfg.data.latents:
            _check_encoded(cfg, self.vae)
        self.compute_dtype = compute_dtype(self.device, cfg.train.precision)
        self.autocast = autocast_factory(self.device, self.compute_dtype)
        self.scaler = LossScaler(self.device, cfg.train.loss_scale_init, cfg.train.loss_scale_growth_interval) \
            if self.compute_dtype == torch.float16 else None
        self.parts = parallel.build_parts(cfg, d, self.device, self.compute_dtype)  # fp32 master weights
        self.model = self.parts[0]
        self.ema = EMA(self.parts, cfg.ema.decay) if cfg.ema.enabled else None
        self.opt = Optimizers(cfg, self.parts, self.device)
        # pipeline schedules by batch shape (batch, height, width): a stage learns its activation
        # shapes on its first step, so each aspect-ratio bucket and stage batch gets its own
        self.pipelined = d.sizes["pp"] > 1
        self.token_weights = None  # the last stage's loss weights of the current batch (see MMDiT.output_target)
        self.schedules: dict[tuple[int, int, int], parallel.Pipeline] = {}
        self.microbatches = parallel.microbatches(cfg, d.sizes)  # gradient accumulation without a pipeline
        self.stage = cfg.stage_at(0)
        self.loader = self._make_loader(self.stage)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)  # t
        self.cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)  # caption dropout
        self.noise_gen = torch.Generator(device=self.device)  # reseeded per sample
        self.timer = StageTimer(self.device)
        t = cfg.train
        self.profiler = StepProfiler(t.profile_from, t.profile_steps, t.profile_memory, run_dir, d.rank, self.device)
        self.step = 0
        self.last_step_flops = self.flops_done = 0.0  # model FLOPs of the last step / this process's steps
        self.peak_memory_gib = 0.0  # CUDA: the most any rank allocated in a logged window
        self._eval_copy: MMDiT | None = None
        self._pending_save: checkpoint.ShardedSave | None = None  # async_checkpoint in flight

    def _build_schedule(self):
        return parallel.build_schedule(self.cfg, self.dist, self.parts, self.device, self._stage_loss)

    def _make_loader(self, stage) -> ShapesLoader | MixLoader:
        data = dataclasses.replace(self.cfg.data, resolution=stage.resolution)
        if data.source == "shards":
            # the same buckets in every layout: tp / cp pad the image tokens to an even split
            return MixLoader(data, stage.data or [data.path], stage.weights, stage.batch_size, rank=self.dist.dp_rank,
                             world_size=self.dist.dp_size, multiple=self.pixels_per_token, device=self.device)
        return ShapesLoader(data, stage.batch_size, rank=self.dist.dp_rank, world_size=self.dist.dp_size)

    def enter_stage(self) -> None:
        """Switch resolution / batch size at a stage boundary; the sample order carries on."""
        stage = self.cfg.stage_at(self.step)
        if stage != self.stage:
            state = self.loader.state_dict()
            self.stage, self.loader = stage, self._make_loader(stage)
            self.loader.load_state_dict(state)

    def images_seen(self, step: int) -> int:
        """Training images consumed by the first ``step`` steps (stages may change the batch)."""
        if not self.cfg.stages:
            return step * self.cfg.train.batch_size
        seen, left = 0, step
        for stage in self.cfg.stages:
            take = min(left, stage.steps)
            seen, left = seen + take * stage.batch_size, left - take
        return seen

    # -- checkpoint state --------------------------------------------------------------
    def _extra_state(self) -> dict:
        """Everything but tensors sharded by the layout; the same on every rank."""
        return {
            "step": self.step,
            "rng": {"gen": self.gen.get_state(), "cpu_gen": self.cpu_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "data": self.loader.state_dict(),
            "stage_seconds": dict(self.timer.resolve()),
            "config": self.cfg.to_json(),
            "loss_scale": self.scaler.state_dict() if self.scaler else None,
        }

    def state_dict(self) -> dict:
        """Single-process checkpoint (one file)."""
        return {**self._extra_state(), "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "optimizer": self.opt.state_dict()}

    def sharded_state(self) -> tuple[dict, dict]:
        """Distributed checkpoint: (tensors keyed by parameter name, resharded on load; extras)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model = {}
        for part in self.parts:
            model.update(get_model_state_dict(part))
        tensors = {"model": model, "optimizer": self.opt.sharded_state_dict(),
                   "ema": self.ema.params if self.ema else {}}
        extra = {**self._extra_state(), "schedulers": [s.state_dict() for s in self.opt.scheds],
                 "ema_updates": self.ema.applied() if self.ema else 0, "layout": self.dist.sizes}
        return tensors, extra

    def _load_extra(self, state: dict) -> None:
        self.step = int(state["step"])
        # RNG states are CPU byte tensors even for a CUDA generator; map_location moved them
        self.gen.set_state(state["rng"]["gen"].cpu())
        self.cpu_gen.set_state(state["rng"]["cpu_gen"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.stage = self.cfg.stage_at(self.step)
        self.loader = self._make_loader(self.stage)
        self.loader.load_state_dict(state["data"])
        self.timer.seconds.update(state.get("stage_seconds", {}))
        if self.scaler is not None and state.get("loss_scale"):  # a bf16 / fp32 checkpoint starts a fresh scale
            self.scaler.load_state_dict(state["loss_scale"])

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self._load_extra(state)

    def _load_full_state(self, state: dict) -> None:
        """A single-process checkpoint into this layout: a run prototyped in one process goes on
        under FSDP / TP / PP (full tensors, resharded by torch.distributed.checkpoint's API)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = StateDictOptions(full_state_dict=True, strict=False)  # a stage holds some of the names
        for part in self.parts:
            set_model_state_dict(part, state["model"], options=full)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_full_state_dict(state["optimizer"], self.cfg)
        self._load_extra(state)

    def resume_from(self, path: Path) -> None:
        """Load a checkpoint: a single-process file, or a distributed one (any layout)."""
        if path.is_file():
            if self.dist.enabled:  # every rank reads the whole file and keeps its shards
                self._load_full_state(checkpoint.load(path, map_location="cpu"))
            else:
                self.load_state_dict(checkpoint.load(path, map_location=self.device))
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        tensors, _ = self.sharded_state()
        extra = checkpoint.load_sharded(path, tensors)
        for part in self.parts:
            set_model_state_dict(part, tensors["model"], options=_NON_STRICT)
        self.opt.load_sharded_state_dict(tensors["optimizer"])
        self.opt.load_schedulers(extra["schedulers"])
        if self.ema is not None:
            self.ema.updates, self.ema.skipped = int(extra["ema_updates"]), None
        self._load_extra(extra)

    def save_checkpoint(self) -> None:
        with self.timer.stage("checkpoint"):
            if self.dist.enabled:
                self.finish_checkpoint()
                tensors, extra = self.sharded_state()
                background = self.cfg.parallel.async_checkpoint
                pending = checkpoint.save_sharded(self.run_dir, self.step, tensors, extra,
                                                  self.cfg.train.keep_ckpts, self.is_main, background)
                self._pending_save = pending if background else None
            else:
                checkpoint.save(self.run_dir, self.step, self.state_dict(), self.cfg.train.keep_ckpts)

    def finish_checkpoint(self) -> None:
        """Publish a checkpoint still being written in the background (async_checkpoint)."""
        if self._pending_save is not None:
            self._pending_save.finish()
            self._pending_save = None

    # -- one step ----------------------------------------------------------------------
    def _noise(self, shape: tuple, first: int) -> torch.Tensor:
        """Noise for this rank's samples, each drawn from its own position in the data stream:
        the same numbers in every layout, and a resume needs no generator state for them."""
        d = self.dist
        rows = []
        for j in range(shape[0]):
            position = first + d.dp_rank + j * d.dp_size  # global index of local sample j
            self.noise_gen.manual_seed((self.cfg.seed * 1_000_003 + position) % (2**63))
            rows.append(torch.randn(shape[1:], generator=self.noise_gen, device=self.device))
        return torch.stack(rows)

    def train_step(self) -> torch.Tensor:
        cfg, t, d = self.cfg, self.timer, self.dist
        B = self.stage.batch_size  # global batch; this rank holds every dp-th sample
        local = slice(d.dp_rank, None, d.dp_size)
        # per-sample randomness is drawn for the global batch, then sliced: identical in every layout
        drop = caption_drop_mask(B, cfg.data.caption_dropout, self.cpu_gen)[local]
        H, W = self.loader.next_shape()  # this batch's bucket in pixels (square for the shapes set)
        grid = (H // self.pixels_per_token, W // self.pixels_per_token)
        side = self.pixels_per_token // cfg.model.patch_size  # pixels per model-input pixel: the VAE's factor
        # model FLOPs (MFU's numerator: 3 forwards, no recompute), all ranks together
        self.last_step_flops = 3 * forward_flops(cfg.model, H // side, W // side, cfg.text.max_length) * B
        self.flops_done += self.last_step_flops
        # contiguous: a pipeline's first stage checks its inputs' strides against the first step's
        times = sample_timesteps(cfg.objective, B, grid[0] * grid[1], self.gen, self.device)[local].contiguous()
        first = self.images_seen(self.step)
        for part in self.parts:
            part.grid = grid
        needs_data = d.first_stage or d.last_stage
        with t.stage("data"):
            batch = self.loader.next_batch() if needs_data else self.loader.next_indices()
        if needs_data:
            if batch.latents is not None:  # precomputed (kiln data encode)
                x0 = batch.latents.to(self.device, non_blocking=True)
            else:
                x0 = to_model_range(batch.images.to(self.device, non_blocking=True))
                if self.vae is not None:
                    with t.stage("vae"):
                        x0 = self.vae.encode(x0)
            xt, target = interpolate(x0, self._noise(tuple(x0.shape), first), times)
        if d.first_stage:
            with t.stage("text"):
                text = self._text(batch, drop)
            inputs = (xt, times, text.tokens, text.mask, text.pooled, batch.micro.to(self.device))
        if not self.pipelined:
            loss = self._accumulate(inputs, target)
        else:
            with t.stage("pipeline"), self.autocast():
                loss = self._pipeline_step((B, H, W), inputs if d.first_stage else (),
                                           target if d.last_stage else None)
        with t.stage("optimizer"):
            found_inf = self._unscale_and_clip()
            self.opt.step(found_inf)
            if self.scaler is not None:
                self.scaler.update(found_inf)
            if self.ema is not None:
                self.ema.update(self.parts, skip=found_inf)
        return loss.detach()

    def _accumulate(self, inputs: tuple, target: torch.Tensor) -> torch.Tensor:
        """Forward + backward over ``parallel.microbatches`` equal chunks of this rank's batch.

        Each chunk's loss is divided by the chunk count, so the summed gradients are the whole
        batch's. Activation memory is one chunk's. FSDP reduce-scatters after every chunk, or
        only after the last (``parallel.accumulate_sync``); HSDP all-reduces after the last;
        parameters are gathered per chunk, or once (``parallel.reshard=after-step``).
        Returns the batch's mean loss."""
        k, t = self.microbatches, self.timer
        total = None
        for i, (*args, part_target) in enumerate(zip(*(x.chunk(k) for x in (*inputs, target)), strict=True)):
            if k > 1:  # FSDP's defaults reduce every backward
                parallel.before_microbatch(self.parts, i == k - 1, self.cfg.parallel.accumulate_sync,
                                           parallel.keeps_params(self.cfg, self.dist.sizes))
            with t.stage("forward"), self.autocast():
                loss = _loss(self.model(*args), *self.model.output_target(part_target))
                loss = loss / k if k > 1 else loss  # 1: bit-identical to no accumulation
            with t.stage("backward"):
                (loss * self.scaler.scale if self.scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def _unscale_and_clip(self) -> torch.Tensor | None:
        """Divide out the loss scale and clip, in one pass over the gradients; under fp16, a
        device flag (1.0) when the global gradient norm overflowed and the step must be skipped."""
        clip, d = self.cfg.optim.grad_clip, self.dist
        if self.scaler is None:
            if clip:
                parallel.mul_grads_(self.parts, parallel.clip_coef(parallel.grad_norm(self.parts, d), clip))
            return None
        unscale = self.scaler.unscale_factor()
        norm = parallel.grad_norm(self.parts, d) * unscale  # of the true (unscaled) gradients
        parallel.mul_grads_(self.parts, unscale * parallel.clip_coef(norm, clip) if clip else unscale)
        return (~torch.isfinite(norm)).float()

    def _text(self, batch, drop: torch.Tensor):
        """Text features of the batch with dropped captions replaced by the empty caption's."""
        if batch.text is None:
            return self.encoder.encode(drop_captions(batch.captions, drop))
        empty, pre = self.encoder.encode([""]), batch.text
        keep = ~drop.to(self.device)
        return TextBatch(
            torch.where(keep[:, None, None], pre.tokens.to(self.device), empty.tokens),
            torch.where(keep[:, None], pre.pooled.to(self.device), empty.pooled),
            torch.where(keep[:, None], pre.mask.to(self.device), empty.mask),
        )

    def _pipeline_step(self, shape: tuple[int, int, int], inputs: tuple, target: torch.Tensor | None) -> torch.Tensor:
        """One pipelined forward + backward over the microbatches; the last stage's mean loss.
        ``shape`` (global batch, H, W) picks the schedule (every pipeline rank sees the same)."""
        if shape not in self.schedules:
            self.schedules[shape] = self._build_schedule()
        if target is not None:  # under cp, this rank's tokens and their weights (one set for every microbatch)
            target, self.token_weights = self.parts[-1].output_target(target)
        losses: list[torch.Tensor] = []
        self.schedules[shape].step(*inputs, target=target, losses=losses if target is not None else None)
        if not losses:
            return torch.zeros((), device=self.device)
        loss = torch.stack(losses).mean()  # scaled for fp16 by _stage_loss
        return loss / self.scaler.scale if self.scaler else loss

    def _stage_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The pipeline's loss_fn (one microbatch); its backward starts from the fp16-scaled loss."""
        loss = _loss(pred, target, self.token_weights)
        return loss * self.scaler.scale if self.scaler else loss

    # -- evaluation --------------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module | None:
        """The weights to sample from (EMA or raw) as one plain model on rank 0; None elsewhere.

        Sharded or pipelined weights are gathered to rank 0, which evaluates alone."""
        use_ema = self.ema is not None and self.cfg.sample.use_ema
        if not use_ema and not self.dist.enabled:
            return self.model
        named = self.ema.params if use_ema else {n: p for part in self.parts for n, p in part.named_parameters()}
        full = parallel.full_weights(named, self.dist)
        if full is None:
            return None
        if self._eval_copy is None:  # built on meta: no init work, no draw from the global RNG
            with torch.device("meta"):
                model = MMDiT(dataclasses.replace(self.cfg.model)).requires_grad_(False)
            self._eval_copy = model.to_empty(device=self.device)
        self._eval_copy.load_state_dict(full)
        return self._eval_copy

    def run_eval(self, tag: str | None) -> dict:
        """Adherence per attribute, the held-out loss (key ``heldout_loss``) and, with
        sample.clip_weights, ``clip_score`` and ``cmmd``, at the current stage.

        Every rank takes part (weights are gathered); rank 0 scores, the others get {}."""
        res = self.stage.resolution
        png = self.run_dir / "samples" / f"{tag}.png" if tag else None
        scores = {}
        if self.cfg.sample.num_prompts:
            with self.timer.stage("sampling"):
                encoder = self.encoder
                if encoder.sharded:  # its forward is collective: every rank encodes the prompts now
                    encoder = FixedTexts(encoder, heldout_batch(self.cfg, res).captions + [""])
                model = self.eval_model()
                if model is not None:
                    scores = evaluate(self.cfg, model, encoder, self.device, self.autocast, png, res, self.vae)
                    scores["heldout_loss"] = heldout_loss(self.cfg, model, encoder, self.device,
                                                          self.autocast, res, self.vae)
        parallel.barrier(self.dist)
        return scores


def _check_resolutions(cfg: RunConfig, multiple: int) -> None:
    """Every stage's resolution must tile into whole tokens (patch x VAE factor pixels)."""
    for res in {cfg.data.resolution, *(s.resolution for s in cfg.stages)}:
        if res % multiple:
            raise ConfigError(f"data.resolution / stages[].resolution {res} must be a multiple of {multiple} "
                              f"(model.patch_size {cfg.model.patch_size} x the VAE's downsampling)")


def _check_encoded(cfg: RunConfig, vae: LatentCodec) -> None:
    """Precomputed latents must come from this run's VAE and text encoder, at its resolutions."""
    from kiln.engine.data.encode import latents_dir, text_identity

    want_text = text_identity(cfg.text.name, cfg.text.weights, cfg.text.max_length)
    for stage in cfg.stages or [cfg.stage_at(0)]:
        for path in stage.data or [cfg.data.path]:
            meta_path = latents_dir(path, stage.resolution) / "meta.json"
            if not meta_path.is_file():
                raise ConfigError(f"data.latents=true: {meta_path.parent} missing; run "
                                  f"`kiln data encode {path} --vae {cfg.data.vae} --resolution {stage.resolution}`")
            meta = json.loads(meta_path.read_text())
            if meta["text"] != want_text:
                raise ConfigError(f"{meta_path}: text features from {meta['text']}, but this run's text config is "
                                  f"{want_text}; re-run `kiln data encode` with the run's text.* settings")
            if (meta["vae"]["channels"], meta["vae"]["factor"]) != (vae.channels, vae.factor):
                got = f"{meta['vae']['channels']}-channel /{meta['vae']['factor']}"
                raise ConfigError(f"{meta_path}: latents of a {got} VAE, but data.vae is "
                                  f"{vae.channels}-channel /{vae.factor}")
            if meta["multiple"] % (cfg.model.patch_size * vae.factor):
                raise ConfigError(f"{meta_path}: buckets are multiples of {meta['multiple']} px, not of "
                                  f"model.patch_size x VAE factor = {cfg.model.patch_size * vae.factor}")


def _loss(pred: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE; with ``token_weights`` (context parallel over padded image tokens, (T,) for pred
    (B, T, C·p·p)), each token's squared error weighted before the mean."""
    if token_weights is None:
        return F.mse_loss(pred.float(), target)
    return ((pred.float() - target).square() * token_weights[:, None]).mean()


def _non_strict():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # a pipeline stage holds some of the names


_NON_STRICT = _non_strict()


class Diverged(Exception):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


def _flush(log: MetricsLog | None, trainer: Trainer, buffered: list, t_window: float, bar) -> list[float]:
    # the one host sync per window; on several ranks, the global (data-parallel mean) losses
    losses = parallel.global_mean(torch.stack([b[1] for b in buffered]), trainer.dist).tolist()
    # fp16: the loss scale each step ran with (halved after a skipped step; the same on every rank)
    scales = torch.stack([b[3] for b in buffered]).tolist() if trainer.scaler else [None] * len(buffered)
    ips = len(buffered) * trainer.stage.batch_size / max(t_window, 1e-9)
    speed = {**_throughput(trainer, sum(b[4] for b in buffered), t_window), **_memory(trainer)}
    if log is not None:
        for (step, _, lr, _, _), loss, scale in zip(buffered, losses, scales, strict=True):
            row = {"step": step, "loss": loss, "lr": lr, "images_per_second": ips,
                   "images_seen": trainer.images_seen(step), **speed}
            log.write(row if scale is None else {**row, "loss_scale": scale})
        log.flush()
    bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{ips:.0f}")
    bad = [b[0] for b, loss in zip(buffered, losses, strict=True) if not math.isfinite(loss)]
    if bad and trainer.cfg.train.stop_on_divergence:
        raise Diverged(bad[0])
    return losses


def _throughput(trainer: Trainer, flops: float, seconds: float) -> dict:
    """Model TFLOP/s per GPU (per process on the CPU) and, on GPUs with a known peak, MFU."""
    tflops = flops / max(seconds, 1e-9) / trainer.dist.world / 1e12
    peak = peak_flops(trainer.device)
    return {"tflops_per_gpu": tflops, **({"mfu": tflops * 1e12 / peak} if peak else {})}


def _memory(trainer: Trainer) -> dict:
    """On CUDA, GiB: the most any rank allocated since the last window (its peak, then reset)
    and the most its caching allocator reserves; the run's peak goes to summary.json."""
    dev = trainer.device
    if dev.type != "cuda":
        return {}
    held = torch.tensor([torch.cuda.max_memory_allocated(dev), torch.cuda.memory_reserved(dev)],
                        dtype=torch.float64, device=dev)
    peak, reserved = (parallel.global_max(held, trainer.dist) / 2**30).tolist()
    torch.cuda.reset_peak_memory_stats(dev)
    trainer.peak_memory_gib = max(trainer.peak_memory_gib, peak)
    return {"memory_gib": peak, "reserved_gib": reserved}


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, fail_at_step: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``; ``resume`` continues from its latest checkpoint.

    ``fail_at_step`` raises inside that step (tests use it to simulate a crash). Under torchrun
    every rank calls this; rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    backend_ctx = kernels.use_backend(None if cfg.train.kernel_backend == "auto" else cfg.train.kernel_backend)
    with backend_ctx:
        trainer = Trainer(cfg, run_dir)
        try:
            if resume:
                trainer.resume_from(checkpoint.latest(run_dir))
            elif trainer.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
            if trainer.is_main:
                checkpoint.atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
            parallel.barrier(trainer.dist)
            summary = _loop(trainer, fail_at_step)
        except Exception as e:
            if trainer.dist.enabled:  # torchrun prints every rank's traceback; this line names ours
                print(f"kiln: rank {trainer.dist.rank} failed at step {trainer.step + 1}: {_why(e, cfg)}",
                      file=sys.stderr, flush=True)
            # no process-group teardown here: peers may sit in a collective, and tearing down would
            # wait for them; exiting lets torchrun stop (or restart) the whole group at once
            raise
        parallel.shutdown(trainer.dist)
        return summary


def _why(e: Exception, cfg: RunConfig) -> str:
    text = (str(e).splitlines() or [type(e).__name__])[0][:200]
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"a collective timed out after parallel.timeout_s={cfg.parallel.timeout_s} s: another rank "
                f"has probably died or hung; its own 'kiln: rank N failed' line names it ({text})")
    return f"{type(e).__name__}: {text}"


def _loop(trainer: Trainer, fail_at_step: int | None) -> dict:
    cfg, run_dir, d = trainer.cfg, trainer.run_dir, trainer.dist
    log = MetricsLog(run_dir, resume_step=trainer.step) if trainer.is_main else None
    stop = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True)) \
        if _main_thread() else None
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc=f"kiln train {cfg.recipe}", unit="step",
               dynamic_ncols=True, mininterval=1.0, disable=not trainer.is_main)
    prof = trainer.profiler
    buffered, all_losses, adherence_hist = [], [], {}
    t_train, t_window = 0.0, time.perf_counter()
    # several ranks must agree on stopping: they compare their Ctrl-C flags at each flush
    stopping = (lambda: stop["flag"]) if not d.enabled else (lambda: False)
    try:
        while trainer.step < cfg.train.steps and not stopping():
            if fail_at_step is not None and trainer.step + 1 == fail_at_step:
                raise RuntimeError(f"simulated failure at step {fail_at_step}")
            trainer.enter_stage()
            scale = trainer.scaler.scale.clone() if trainer.scaler else None  # before the step updates it
            prof.before_step(trainer.step + 1)
            loss = trainer.train_step()
            trainer.step += 1
            prof.after_step(trainer.step)
            buffered.append((trainer.step, loss, trainer.opt.last_lr(), scale, trainer.last_step_flops))
            bar.update(1)
            at_end = trainer.step == cfg.train.steps
            if len(buffered) >= cfg.train.log_every or at_end or _due(trainer.step, cfg.train.ckpt_every):
                dt = time.perf_counter() - t_window
                t_train += dt
                all_losses += _flush(log, trainer, buffered, dt, bar)
                buffered = []
                if _due(trainer.step, cfg.train.ckpt_every) or at_end:
                    trainer.save_checkpoint()
                if _due(trainer.step, cfg.sample.every) and not at_end:
                    adherence_hist[trainer.step] = scores = trainer.run_eval(f"step_{trainer.step:08d}")
                    if log is not None:
                        log.write({"step": trainer.step, "images_seen": trainer.images_seen(trainer.step),
                                   **_eval_metrics(scores)})
                if d.enabled and parallel.any_rank(stop["flag"], d):
                    stop["flag"] = True
                    break
                t_window = time.perf_counter()
        if stop["flag"]:  # Ctrl-C: the step in flight finished; keep it and stop
            if buffered:
                all_losses += _flush(log, trainer, buffered, time.perf_counter() - t_window, bar)
            trainer.save_checkpoint()
            trainer.finish_checkpoint()
            raise KeyboardInterrupt
        trainer.finish_checkpoint()
        final = trainer.run_eval("final")
        if log is not None:
            log.write({"step": trainer.step, "images_seen": trainer.images_seen(trainer.step),
                       **_eval_metrics(final)})
    except Diverged as e:  # nothing of the broken weights is saved; the last checkpoint stays
        trainer.finish_checkpoint()
        summary = _summary(trainer, all_losses, t_train, {}, adherence_hist, diverged_at=e.step)
        _write_summary(trainer, summary)
        if log is not None:
            log.write({"step": e.step, "diverged": True})
        return summary
    finally:
        prof.close(trainer.step)
        bar.close()
        if log is not None:
            log.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    summary = _summary(trainer, all_losses, t_train, final, adherence_hist)
    _write_summary(trainer, summary)
    return summary


def _write_summary(trainer: Trainer, summary: dict) -> None:
    if trainer.is_main:
        checkpoint.atomic_write_text(trainer.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _eval_metrics(scores: dict) -> dict:
    adherence, metrics = split_scores(scores)
    return {**{f"adherence/{k}": v for k, v in adherence.items()}, **metrics}


def _summary(trainer: Trainer, losses: list[float], t_train: float, final: dict, hist: dict,
             diverged_at: int | None = None) -> dict:
    cfg = trainer.cfg
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else [float("nan")]
    dev = trainer.device
    adherence, metrics = split_scores(final)
    images = trainer.images_seen(trainer.step) - trainer.images_seen(trainer.step - len(losses))
    return {
        "steps": trainer.step,
        "diverged_at_step": diverged_at,
        "final_loss": sum(tail) / len(tail),  # mean over the last 10% of this run's steps (<= 50)
        "heldout_loss": metrics.get("heldout_loss"),
        "clip_score": metrics.get("clip_score"),  # with sample.clip_weights
        "cmmd": metrics.get("cmmd"),
        "images_seen": trainer.images_seen(trainer.step),
        "images_per_second": images / max(t_train, 1e-9),
        **_throughput(trainer, trainer.flops_done, t_train),
        "peak_memory_gib": trainer.peak_memory_gib if dev.type == "cuda" else None,  # any rank's, over the run
        "train_seconds": round(t_train, 2),
        "stage_seconds": {k: round(v, 3) for k, v in trainer.timer.resolve().items()},
        "precision": str(trainer.compute_dtype or torch.float32).removeprefix("torch."),
        "loss_scale": trainer.scaler.state_dict() if trainer.scaler else None,  # fp16: scale, skipped steps
        "adherence": adherence,
        "adherence_history": {str(k): split_scores(v)[0] for k, v in hist.items()},
        "heldout_loss_history": {str(k): v.get("heldout_loss") for k, v in hist.items()},
        "params": count_params(cfg.model),
        "layout": trainer.dist.sizes,
        "device": device_name(dev),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": json.loads(cfg.to_json()),
    }


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        from kiln.engine.errors import KilnError

        raise KilnError(f"resume: {path} not found (is {run_dir} a kiln run directory?)")
    return from_dict(json.loads(path.read_text()))


if __name__ == "__main__":
    from kiln.engine.cli import main

    main(["train", *__import__("sys").argv[1:]])
