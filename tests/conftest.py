"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported, so
Triton kernels run on CPU tensors here (ENVIRONMENT.md)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kiln.engine.config import RunConfig  # noqa: E402
from kiln.model.mmdit import MMDiTConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_run_config(steps: int = 6) -> RunConfig:
    """A run that takes a few seconds on 2 CPU cores: width 32, 2 blocks, batch 8."""
    cfg = RunConfig(recipe="test", model=MMDiTConfig(width=32, depth=1, single_depth=1, heads=2, patch_size=8))
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = steps, 8, 2
    cfg.train.device = "cpu"  # CPU tests stay on the CPU on GPU machines too (test_gpu.py covers CUDA)
    cfg.train.ckpt_every, cfg.train.keep_ckpts = 4, 3
    cfg.optim.warmup_steps = 2
    cfg.sample.num_prompts, cfg.sample.steps, cfg.sample.grid_size = 4, 2, 4
    cfg.text.max_length = 16
    return cfg


@pytest.fixture
def run_config():
    return small_run_config


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory) -> str:
    """A random-init kiln-tiny-text open_clip checkpoint (32 px vision tower), saved as a local file."""
    from kiln.model.text_encoder import open_clip_module

    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(open_clip_module().create_model("kiln-tiny-text", pretrained=None).state_dict(), path)
    return str(path)
