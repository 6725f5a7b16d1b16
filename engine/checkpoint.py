"""Atomic checkpoints in ``RUN/checkpoints/step_XXXXXXXX.pt`` (one process) or
``RUN/checkpoints/step_XXXXXXXX/`` (torch.distributed.checkpoint, any number of processes).

A checkpoint is written to a temporary file in the same folder, flushed to disk (fsync), then
renamed over its final name (atomic on POSIX); ``latest`` is updated the same way afterwards.
A crash mid-save leaves only a ``.tmp`` file behind and the previous checkpoint intact; a
failing run never touches checkpoints it did not finish. Older checkpoints beyond ``keep`` are
pruned only after the new one is in place. A distributed checkpoint is written the same way:
every rank saves its shards into ``step_XXXXXXXX.tmp/``, rank 0 adds ``extra.pt`` (step, RNG,
data position, schedule) and renames the folder once all ranks are done.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from kiln.engine.errors import KilnError

_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_text(folder / "latest", path.name + "\n")
    _prune(run_dir, keep)
    return path


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class ShardedSave:
    """A distributed checkpoint being written; :meth:`finish` publishes it (all ranks call it)."""

    def __init__(self, run_dir: Path, step: int, keep: int, is_main: bool, future=None):
        self.run_dir, self.keep, self.is_main, self.future = Path(run_dir), keep, is_main, future
        folder = self.run_dir / "checkpoints"
        self.final, self.tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"

    def finish(self) -> Path:
        import torch.distributed as dist

        if self.future is not None:
            self.future.result()  # this rank's shards are on disk
        dist.barrier()
        if self.is_main:
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            atomic_write_text(self.final.parent / "latest", self.final.name + "\n")
            _prune(self.run_dir, self.keep)
        dist.barrier()
        return self.final


def save_sharded(run_dir: Path, step: int, tensors: dict, extra: dict, keep: int, is_main: bool,
                 background: bool = False) -> ShardedSave:
    """Every rank calls this; see the module docstring for the protocol. With ``background``
    the shards are written by a thread (torch.distributed.checkpoint.async_save) and the caller
    must call ``finish()`` later; otherwise the checkpoint is published before returning."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    pending = ShardedSave(run_dir, step, keep, is_main)
    if is_main:
        shutil.rmtree(pending.tmp, ignore_errors=True)  # a crashed earlier attempt
        pending.tmp.mkdir(parents=True)
        _atomic_write(pending.tmp / "extra.pt", lambda f: torch.save(extra, f))
    dist.barrier()
    if background:
        pending.future = dcp.async_save(tensors, checkpoint_id=str(pending.tmp))
        return pending
    dcp.save(tensors, checkpoint_id=str(pending.tmp))
    pending.finish()
    return pending


def load_sharded(path: Path, tensors: dict) -> dict:
    """Load a distributed checkpoint into ``tensors`` in place (any layout); returns the extras."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, checkpoint_id=str(path))
        extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        raise KilnError(f"checkpoint {path} is corrupt, incomplete or from another model ({why})") from e
    return extra


def latest(run_dir: Path) -> Path:
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if path.exists():
            return path
    found = list_checkpoints(run_dir)
    if not found:
        raise KilnError(f"resume: {run_dir} has no checkpoint (expected {folder}/step_*.pt or step_*/)")
    return found[-1]


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint; a truncated or garbled file raises a one-line KilnError naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt zip/pickle data
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        raise KilnError(f"checkpoint {path} is corrupt or unreadable ({why})") from e
    missing = {"step", "model", "optimizer", "rng", "data"} - set(state)
    if missing:
        raise KilnError(f"checkpoint {path} is incomplete: missing {', '.join(sorted(missing))}")
    return state


def load_weights(path: Path, which: str, like: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """One set of weights, ``which`` = "model" (raw) or "ema", from a checkpoint of any layout,
    as full tensors named and shaped like ``like`` (a plain model's state dict); and its step.

    Only those tensors are read: a one-file checkpoint is memory-mapped, a distributed one is
    read through torch.distributed.checkpoint, which reassembles the shards in one process; the
    optimizer state (2x the weights) is never loaded.
    """
    path = Path(path)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            raise KilnError(f"checkpoint {path} is corrupt or unreadable ({why})") from e
        found = state.get(which)
        if which == "ema" and found is not None:
            found = found["params"]
        if found is None:
            raise KilnError(f"checkpoint {path} has no {which} weights")
        return dict(found), int(state["step"])
    if not (path / "extra.pt").is_file():
        raise KilnError(f"checkpoint {path} is neither a step_*.pt file nor a distributed checkpoint folder")
    tensors = {which: {name: torch.empty_like(t, device="cpu") for name, t in like.items()}}
    extra = load_sharded(path, tensors)
    return tensors[which], int(extra["step"])
