"""MMDiT weights as one safetensors file that any stack can load without kiln's training code.

The file holds the state dict (fp32 or bf16) and, in the safetensors header's string metadata,
``kiln.format`` = "mmdit-v1", ``kiln.model`` (MMDiTConfig as JSON) and whatever the exporter
adds (``kiln export`` records the text encoder, VAE, seed, step and which weights).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kiln.engine.errors import KilnError
from kiln.model.mmdit import MMDiT, MMDiTConfig

FORMAT = "mmdit-v1"


def save_exported(state: dict[str, torch.Tensor], cfg: MMDiTConfig, path: Path, dtype: torch.dtype,
                  extra: dict[str, str] | None = None) -> None:
    """Write ``state`` (a MMDiT state dict) as ``dtype`` to ``path`` via a temporary file + rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    meta = {"kiln.format": FORMAT, "kiln.model": json.dumps(dataclasses.asdict(cfg)), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[MMDiT, dict[str, str]]:
    """(the MMDiT with the file's weights in fp32, in eval mode; the file's metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("kiln.format") != FORMAT:
                raise KilnError(f"{path} is not a kiln MMDiT export (kiln.format = {meta.get('kiln.format')!r}, "
                                f"expected {FORMAT!r})")
            state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except KilnError:
        raise
    except Exception as e:
        raise KilnError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") from e
    cfg = MMDiTConfig(**json.loads(meta["kiln.model"]))
    with torch.device("meta"):
        model = MMDiT(cfg).requires_grad_(False)
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval(), meta
