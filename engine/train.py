"""The training loop: rectified flow on an MMDiT, AdamW on fp32 master weights, EMA, exact resume.

One step: data -> caption dropout -> text encode (cached) -> t, noise -> forward (bf16
autocast on CUDA) -> backward -> clip -> AdamW -> LR schedule -> EMA. Each arrow has a stage
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
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kiln import kernels
from kiln.engine import checkpoint
from kiln.engine.config import RunConfig, from_dict
from kiln.engine.data.loader import ShapesLoader, to_model_range
from kiln.engine.ema import EMA
from kiln.engine.evaluate import evaluate, heldout_loss
from kiln.engine.metrics import MetricsLog, StageTimer, device_name
from kiln.engine.objective import drop_captions, interpolate, sample_timesteps
from kiln.engine.optim import Optimizers
from kiln.model.mmdit import MMDiT
from kiln.model.text_encoder import build_text_encoder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_factory(device: torch.device, precision: str):
    bf16 = precision == "bf16-autocast" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.encoder = build_text_encoder(cfg.text.family, cfg.text.name, cfg.text.weights, cfg.text.max_length)
        self.encoder.to(self.device)
        self.encoder.batch_invariant = cfg.train.deterministic
        cfg.model.text_dim, cfg.model.pooled_dim = self.encoder.width, self.encoder.pooled_dim
        self.model = MMDiT(cfg.model).to(self.device)  # fp32 master weights
        self.ema = EMA(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        self.opt = Optimizers(cfg, self.model, self.device)
        self.stage = cfg.stage_at(0)
        self.loader = self._make_loader(self.stage)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)  # t and noise
        self.cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)  # caption dropout
        self.autocast = autocast_factory(self.device, cfg.train.precision)
        self.timer = StageTimer(self.device)
        self.step = 0

    def _make_loader(self, stage) -> ShapesLoader:
        data = dataclasses.replace(self.cfg.data, resolution=stage.resolution)
        return ShapesLoader(data, stage.batch_size)

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
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.opt.state_dict(),
            "rng": {"gen": self.gen.get_state(), "cpu_gen": self.cpu_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "data": self.loader.state_dict(),
            "stage_seconds": dict(self.timer.resolve()),
            "config": self.cfg.to_json(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        # RNG states are CPU byte tensors even for a CUDA generator; map_location moved them
        self.gen.set_state(state["rng"]["gen"].cpu())
        self.cpu_gen.set_state(state["rng"]["cpu_gen"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.stage = self.cfg.stage_at(self.step)
        self.loader = self._make_loader(self.stage)
        self.loader.load_state_dict(state["data"])
        self.timer.seconds.update(state.get("stage_seconds", {}))

    # -- one step ----------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        cfg, t = self.cfg, self.timer
        with t.stage("data"):
            batch = self.loader.next_batch()
            captions = drop_captions(batch.captions, cfg.data.caption_dropout, self.cpu_gen)
            x0 = to_model_range(batch.images.to(self.device, non_blocking=True))
            micro = batch.micro.to(self.device, non_blocking=True)
        with t.stage("text"):
            text = self.encoder.encode(captions)
        B, _, H, W = x0.shape
        tokens = (H // cfg.model.patch_size) * (W // cfg.model.patch_size)
        times = sample_timesteps(cfg.objective, B, tokens, self.gen, self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        xt, target = interpolate(x0, noise, times)
        with t.stage("forward"), self.autocast():
            pred = self.model(xt, times, text.tokens, text.mask, text.pooled, micro)
            loss = F.mse_loss(pred.float(), target)
        with t.stage("backward"):
            loss.backward()
        with t.stage("optimizer"):
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return loss.detach()

    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None and self.cfg.sample.use_ema else self.model

    def run_eval(self, tag: str | None) -> dict:
        """Adherence per attribute and the held-out loss (key ``heldout_loss``) at the current stage."""
        res = self.stage.resolution
        png = self.run_dir / "samples" / f"{tag}.png" if tag else None
        with self.timer.stage("sampling"):
            scores = evaluate(self.cfg, self.eval_model(), self.encoder, self.device, self.autocast, png, res)
            scores["heldout_loss"] = heldout_loss(self.cfg, self.eval_model(), self.encoder, self.device,
                                                  self.autocast, res)
        return scores


class Diverged(Exception):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


def _flush(log: MetricsLog, trainer: Trainer, buffered: list, t_window: float, bar) -> list[float]:
    losses = torch.stack([b[1] for b in buffered]).tolist()  # the one host sync per window
    ips = len(buffered) * trainer.stage.batch_size / max(t_window, 1e-9)
    for (step, _, lr), loss in zip(buffered, losses, strict=True):
        log.write({"step": step, "loss": loss, "lr": lr, "images_per_second": ips,
                   "images_seen": trainer.images_seen(step)})
    log.flush()
    bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{ips:.0f}")
    bad = [step for (step, _, _), loss in zip(buffered, losses, strict=True) if not math.isfinite(loss)]
    if bad and trainer.cfg.train.stop_on_divergence:
        raise Diverged(bad[0])
    return losses


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, fail_at_step: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``; ``resume`` continues from its latest checkpoint.

    ``fail_at_step`` raises inside that step (tests use it to simulate a crash).
    """
    run_dir = Path(run_dir)
    cfg.validate()
    backend_ctx = kernels.use_backend(None if cfg.train.kernel_backend == "auto" else cfg.train.kernel_backend)
    with backend_ctx:
        trainer = Trainer(cfg, run_dir)
        if resume:
            trainer.load_state_dict(checkpoint.load(checkpoint.latest(run_dir), map_location=trainer.device))
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        return _loop(trainer, fail_at_step)


def _loop(trainer: Trainer, fail_at_step: int | None) -> dict:
    cfg, run_dir = trainer.cfg, trainer.run_dir
    log = MetricsLog(run_dir, resume_step=trainer.step)
    stop = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True)) \
        if _main_thread() else None
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc=f"kiln train {cfg.recipe}", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    buffered, all_losses, adherence_hist = [], [], {}
    t_train, t_window = 0.0, time.perf_counter()
    try:
        while trainer.step < cfg.train.steps and not stop["flag"]:
            if fail_at_step is not None and trainer.step + 1 == fail_at_step:
                raise RuntimeError(f"simulated failure at step {fail_at_step}")
            trainer.enter_stage()
            loss = trainer.train_step()
            trainer.step += 1
            buffered.append((trainer.step, loss, trainer.opt.last_lr()))
            bar.update(1)
            at_end = trainer.step == cfg.train.steps
            if len(buffered) >= cfg.train.log_every or at_end or _due(trainer.step, cfg.train.ckpt_every):
                dt = time.perf_counter() - t_window
                t_train += dt
                all_losses += _flush(log, trainer, buffered, dt, bar)
                buffered = []
                if _due(trainer.step, cfg.train.ckpt_every) or at_end:
                    with trainer.timer.stage("checkpoint"):
                        checkpoint.save(run_dir, trainer.step, trainer.state_dict(), cfg.train.keep_ckpts)
                if _due(trainer.step, cfg.sample.every) and not at_end:
                    adherence_hist[trainer.step] = scores = trainer.run_eval(f"step_{trainer.step:08d}")
                    log.write({"step": trainer.step, "images_seen": trainer.images_seen(trainer.step),
                               **_eval_metrics(scores)})
                t_window = time.perf_counter()
        if stop["flag"]:  # Ctrl-C: the step in flight finished; keep it and stop
            if buffered:
                all_losses += _flush(log, trainer, buffered, time.perf_counter() - t_window, bar)
            checkpoint.save(run_dir, trainer.step, trainer.state_dict(), cfg.train.keep_ckpts)
            raise KeyboardInterrupt
        final = trainer.run_eval("final")
        log.write({"step": trainer.step, "images_seen": trainer.images_seen(trainer.step), **_eval_metrics(final)})
    except Diverged as d:  # nothing of the broken weights is saved; the last checkpoint stays
        summary = _summary(trainer, all_losses, t_train, {}, adherence_hist, diverged_at=d.step)
        checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.write({"step": d.step, "diverged": True})
        return summary
    finally:
        bar.close()
        log.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    summary = _summary(trainer, all_losses, t_train, final, adherence_hist)
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _eval_metrics(scores: dict) -> dict:
    return {(k if k == "heldout_loss" else f"adherence/{k}"): v for k, v in scores.items()}


def _split_heldout(scores: dict) -> tuple[dict, float | None]:
    rest = {k: v for k, v in scores.items() if k != "heldout_loss"}
    return rest, scores.get("heldout_loss")


def _summary(trainer: Trainer, losses: list[float], t_train: float, final: dict, hist: dict,
             diverged_at: int | None = None) -> dict:
    cfg = trainer.cfg
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else [float("nan")]
    dev = trainer.device
    adherence, heldout = _split_heldout(final)
    images = trainer.images_seen(trainer.step) - trainer.images_seen(trainer.step - len(losses))
    return {
        "steps": trainer.step,
        "diverged_at_step": diverged_at,
        "final_loss": sum(tail) / len(tail),  # mean over the last 10% of this run's steps (<= 50)
        "heldout_loss": heldout,
        "images_seen": trainer.images_seen(trainer.step),
        "images_per_second": images / max(t_train, 1e-9),
        "train_seconds": round(t_train, 2),
        "stage_seconds": {k: round(v, 3) for k, v in trainer.timer.resolve().items()},
        "adherence": adherence,
        "adherence_history": {str(k): _split_heldout(v)[0] for k, v in hist.items()},
        "heldout_loss_history": {str(k): _split_heldout(v)[1] for k, v in hist.items()},
        "params": sum(p.numel() for p in trainer.model.parameters()),
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
