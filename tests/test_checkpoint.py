import pytest
import torch

from kiln.engine import checkpoint
from kiln.engine.errors import KilnError


def _state(step):
    return {"step": step, "model": {"w": torch.randn(3)}, "optimizer": {}, "rng": {}, "data": {}}


def test_save_load_latest_and_prune(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step_00000004.pt", "step_00000006.pt"]
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 6
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    checkpoint.save(tmp_path, 2, _state(2), keep=2)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(tmp_path, 4, {**_state(4), "bad": Boom()}, keep=2)
    assert checkpoint.latest(tmp_path).name == "step_00000002.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 2
    assert not (tmp_path / "checkpoints" / "step_00000004.pt").exists()


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = checkpoint.save(tmp_path, 2, _state(2), keep=2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KilnError, match=r"checkpoint .*step_00000002.pt is corrupt") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_incomplete_checkpoint_and_missing_run(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(KilnError, match="incomplete: missing data, model, optimizer, rng"):
        checkpoint.load(path)
    with pytest.raises(KilnError, match="has no checkpoint"):
        checkpoint.latest(tmp_path / "empty")
