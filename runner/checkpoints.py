"""Checkpoints a run can resume from: saved by steps and by minutes, on Ctrl-C / SIGTERM, and found again.

The trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, trainer state) into
`checkpoints/checkpoint-<step>/`, the trainer state last. A checkpoint counts as usable only when its
`trainer_state.json` parses and its adapter weights exist, so a kill in the middle of a save leaves the previous
checkpoint as the one `--resume` picks; the trainer deletes old checkpoints (`save_total_limit`) only after a new
one is complete. Resuming hands the checkpoint to `Trainer.train(resume_from_checkpoint=...)`, which restores
the optimizer, the learning-rate schedule, the RNG states and the position in the data.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from functools import partial
from pathlib import Path

from transformers import TrainerCallback

from .distributed import any_rank, rank0_decides
from .status import effective_state, read_status, run_dirs, write_status

log = logging.getLogger("runner")


def is_usable(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((checkpoint / name).exists() for name in ("adapter_model.safetensors", "adapter_model.bin"))


def newest_usable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run; incomplete ones (a kill during a save) are set aside."""
    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for checkpoint in reversed(found):
        if is_usable(checkpoint):
            return checkpoint
        aside = checkpoint.with_name(f"incomplete-{checkpoint.name}")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
        log.warning("checkpoint %s is incomplete (killed during the save?); set aside as %s", checkpoint, aside.name)
    return None


def resumable_run(output_dir: str, name: str) -> Path | None:
    """The newest run of recipe `name` that did not finish and has a usable checkpoint."""
    for run_dir in reversed(run_dirs(Path(output_dir), name)):
        if effective_state(read_status(run_dir)) != "done" and any((run_dir / "checkpoints").glob("checkpoint-*")):
            return run_dir
    return None


def run_to_resume(recipe: dict, resume: str) -> Path:
    """`--resume`'s run directory: the newest unfinished run of the recipe ("latest") or the one given; raises
    ValueError saying why there is none."""
    if resume == "latest":
        run_dir = resumable_run(recipe["output_dir"], recipe["name"])
        if run_dir is None:
            raise ValueError(f"no unfinished run with a checkpoint under {recipe['output_dir']}/{recipe['name']}/ "
                             "to resume")
        return run_dir
    run_dir = Path(resume)
    if not (run_dir / "recipe.resolved.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run directory (no recipe.resolved.yaml)")
    if effective_state(read_status(run_dir)) == "done":
        raise ValueError(f"{run_dir}: this run finished; there is nothing to resume")
    return run_dir


class SaveEveryMinutes(TrainerCallback):
    """Asks the trainer for a checkpoint whenever `minutes` have passed since the last one (or the start)."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else minutes * 60
        self.last = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and rank0_decides(time.monotonic() - self.last >= self.seconds):
            control.should_save = True


def _worker_ignores_stop_signals(worker_id: int, init_fn=None) -> None:
    """A data loader worker's start. Ctrl-C, `timeout`, SLURM's scancel and most schedulers signal the whole
    process group; torch's workers die of a SIGTERM that does not come from their parent, and the main process
    then fails on its next batch instead of finishing the step and saving. The main process decides when to stop;
    the workers end with it (torch's workers also exit when their parent is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def workers_outlive_stop_signals(loader) -> None:
    """Makes `loader`'s worker processes (started at each epoch) ignore SIGINT and SIGTERM. accelerate's loaders
    wrap the torch DataLoader that starts them (`base_dataloader`)."""
    loader = getattr(loader, "base_dataloader", loader)
    if loader is not None and loader.num_workers > 0:
        loader.worker_init_fn = partial(_worker_ignores_stop_signals, init_fn=loader.worker_init_fn)


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) and SIGTERM (a Colab disconnect, preemption) finish the current step, write a checkpoint
    and stop training; a second signal stops at once. With several processes a signal on any of them stops all of
    them after the same step. `interrupted` names the signal once training stopped for it.

    A second signal within `SAME_STOP_S` of the first is the same stop delivered twice, not a user insisting: SLURM
    signals every process of a job step, so a rank gets SIGTERM from SLURM and again from the launching process."""

    SAME_STOP_S = 2.0

    def __init__(self):
        self.signalled: str | None = None
        self.interrupted: str | None = None
        self.previous = {}
        self.first_signal_at = None

    def _handle(self, number, frame):
        if self.signalled:
            if time.monotonic() - self.first_signal_at < self.SAME_STOP_S:
                return
            raise KeyboardInterrupt  # the user does not want to wait for the checkpoint
        self.signalled, self.first_signal_at = signal.Signals(number).name, time.monotonic()
        log.warning("%s: finishing this step, saving a checkpoint, then stopping (again to stop at once)",
                    self.signalled)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        workers_outlive_stop_signals(train_dataloader)  # before the first epoch starts them

    def on_train_end(self, args, state, control, **kwargs):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.signalled is not None):
            self.interrupted = self.signalled or "SIGTERM"  # the signal reached another rank
            control.should_save = True
            control.should_training_stop = True


class RecordStatus(TrainerCallback):
    """Keeps status.json's step, loss and last checkpoint current while training."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_step_end(self, args, state, control, **kwargs):
        write_status(self.run_dir, step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            write_status(self.run_dir, loss=logs["loss"])

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_status(self.run_dir, last_checkpoint=str(checkpoint))
        log.info("checkpoint: %s", checkpoint)
