"""train.profile_steps: torch.profiler over a few training steps, written beside the run's checkpoints.

Speed figures say how fast a run went; a profile says where the time went (which kernels, which operators, how
long the GPU waited on the CPU). Each process profiles the same steps and writes its own files, so ranks can be
compared under DDP, FSDP or DeepSpeed: the one place where processes other than rank 0 write to the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import distributed

log = logging.getLogger("runner")
WARMUP_STEPS = 2  # as the speed meter: the first steps compile and allocate


class ProfileSteps(TrainerCallback):
    """Profiles `steps` optimizer steps after the warm-up steps, then writes `profile/rank<R>.txt` (operators by
    device time, then by CPU time) and `profile/rank<R>.json.gz` (a trace for Perfetto or chrome://tracing)."""

    def __init__(self, steps: int, run_dir: Path):
        self.steps, self.out_dir = steps, run_dir / "profile"
        self.profiler, self.start_step, self.done = None, 0, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.start_step
        if done == WARMUP_STEPS and not self.done:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            log.info("profile: recording steps %d-%d", state.global_step + 1, state.global_step + self.steps)
        elif self.profiler is not None and done == WARMUP_STEPS + self.steps:
            self._write(self.steps)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # training ended inside the profiled steps
            self._write(state.global_step - self.start_step - WARMUP_STEPS)

    def _write(self, steps: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{distributed.rank()}"
        averages = self.profiler.key_averages()
        tables = []
        if torch.cuda.is_available():
            tables.append(("by device time", averages.table(sort_by="self_device_time_total", row_limit=40)))
        tables.append(("by CPU time", averages.table(sort_by="self_cpu_time_total", row_limit=40)))
        (self.out_dir / f"{name}.txt").write_text(
            f"{steps} training step(s) profiled after {WARMUP_STEPS} warm-up steps, process {name}\n\n"
            + "\n\n".join(f"## {title}\n{table}" for title, table in tables))
        self.profiler.export_chrome_trace(str(self.out_dir / f"{name}.json.gz"))
        log.info("profile: %d step(s) written to %s", steps, self.out_dir / f"{name}.txt")
        self.profiler, self.done = None, True
