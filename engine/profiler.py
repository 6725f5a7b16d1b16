"""A torch.profiler window over training steps (``train.profile_from``, ``train.profile_steps``).

Each rank writes ``RUN/profile/steps{A}-{B}_rank{R}.json`` (Chrome trace: open in Perfetto or
chrome://tracing), ``..._ops.txt`` (operators by self time: where the kernels' share of a step
shows) and, with ``train.profile_memory`` on CUDA, ``..._memory.pickle`` (allocator history:
drag into pytorch.org/memory_viz). The trainer's stages (StageTimer) appear in the trace as
``kiln/<stage>`` ranges, so data, text, forward, backward and optimizer time line up with the
kernels under them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.engine.errors import ConfigError


class StepProfiler:
    def __init__(self, first: int, steps: int, memory: bool, run_dir: Path, rank: int, device: torch.device):
        if memory and device.type != "cuda":
            raise ConfigError(f"train.profile_memory=true needs a CUDA device (allocator snapshots), not {device}")
        self.first, self.last = first, first + steps - 1  # 1-based steps; first = 0: off
        self.memory, self.cuda = memory, device.type == "cuda"
        self.folder, self.rank = Path(run_dir) / "profile", rank
        self._prof: torch.profiler.profile | None = None
        self._started_at = 0

    def before_step(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run."""
        if self.first and step == self.first and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # earlier steps' kernels stay out of the window
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.start()
            self._started_at = step

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self._finish(step)

    def close(self, step: int) -> None:
        """The run ended inside the window (last step, Ctrl-C, divergence): keep what was traced."""
        if self._prof is not None:
            self._finish(step)

    def _finish(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # the window's kernels are in the trace
        self._prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"steps{self._started_at}-{step}_rank{self.rank}"
        self._prof.export_chrome_trace(str(stem) + ".json")
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        Path(str(stem) + "_ops.txt").write_text(self._prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(stem) + "_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        self._prof = None
