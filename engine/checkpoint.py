"""Atomic checkpoints in ``RUN/checkpoints/step_XXXXXXXX.pt``.

A checkpoint is written to a temporary file in the same folder, flushed to disk (fsync), then
renamed over its final name (atomic on POSIX); ``latest`` is updated the same way afterwards.
A crash mid-save leaves only a ``.tmp`` file behind and the previous checkpoint intact; a
failing run never touches checkpoints it did not finish. Older checkpoints beyond ``keep`` are
pruned only after the new one is in place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from kiln.engine.errors import KilnError

_NAME = re.compile(r"^step_(\d{8})\.pt$")


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
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def latest(run_dir: Path) -> Path:
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if path.is_file():
            return path
    found = list_checkpoints(run_dir)
    if not found:
        raise KilnError(f"resume: {run_dir} has no checkpoint (expected {folder}/step_*.pt)")
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
