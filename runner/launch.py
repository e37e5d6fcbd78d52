"""`recipe run` with several processes: torchrun's command line, and stop signals that end in a checkpoint.

The launching process starts torchrun (`python -m torch.distributed.run`) in a session of its own and waits for it.
Stop signals therefore reach the launching process alone (Ctrl-C, `timeout` and a closed terminal signal the
foreground process group; `docker stop` and `kill` signal one process), and it passes the first one on to each
rank once. Each rank finishes its step, rank 0 decides the step they all stop at, and rank 0 saves a checkpoint
(runner/checkpoints.py, StopOnSignal); then the launching process says how to resume and exits 130, as a run in one
process does. A second signal kills every rank at once.

torchrun's own signal handling is left out of this on purpose: it forwards a signal, then kills the ranks after a
grace period (30 s by default) that a checkpoint written to a slow disk can outlast, and it reports a stopped rank
as a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from . import distributed

# Set for the ranks of a launch: an interrupted rank exits 0 and leaves the report to the launching process.
STOP_REPORTED_BY_LAUNCHER = "RECIPE_STOP_REPORTED_BY_LAUNCHER"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def command(recipe_file: str, overrides: list[str], cfg: dict, extra: list[str]) -> list[str]:
    """torchrun's command line for this recipe: the same `runner run` with the same overrides in every process."""
    line = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg['processes_per_node']}",
            f"--nnodes={cfg['nodes']}", f"--node_rank={cfg['node_rank']}", f"--master_addr={cfg['master_addr']}",
            f"--master_port={cfg['master_port']}", "-m", "runner", "run", recipe_file]
    for override in overrides:
        line += ["--set", override]
    return line + extra


def rank_processes(torchrun_pid: int) -> list[int]:
    """torchrun's children: one process per rank, each the leader of its own process group (torchrun starts them
    in sessions of their own), so that signalling the group reaches the rank's data loader workers too."""
    try:
        return [int(pid) for pid in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()]
    except (OSError, ValueError):  # not Linux, or torchrun already gone
        return []


class StopRelay:
    """While torchrun runs: the first stop signal goes on to every rank (as SIGTERM for a closed terminal, which
    the ranks treat as a stop), a second kills them all."""

    def __init__(self, torchrun: subprocess.Popen):
        self.torchrun, self.received = torchrun, None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        first = self.received is None
        self.received = self.received or signal.Signals(number).name
        forwarded = signal.SIGTERM if number == signal.SIGHUP else number
        ranks = rank_processes(self.torchrun.pid)
        for pid in ranks:
            self._signal_group(pid, forwarded if first else signal.SIGKILL)
        if not ranks or not first:  # no rank to reach yet: torchrun forwards what it gets
            self._signal_group(self.torchrun.pid, forwarded if first else signal.SIGKILL)

    @staticmethod
    def _signal_group(pid: int, number: int) -> None:
        try:
            os.killpg(pid, number)
        except (ProcessLookupError, PermissionError):
            pass  # it ended meanwhile


def launch(recipe_file: str, overrides: list[str], cfg: dict, run_dir: Path | None,
           extra: list[str]) -> tuple[int, str | None]:
    """Runs the recipe under torchrun. Returns torchrun's exit code and the stop signal this process passed on to
    the ranks (None if none). `run_dir` (made by node 0's launcher) is handed to every rank, so that all of them
    agree on where rank 0 writes."""
    environment = dict(os.environ, **{STOP_REPORTED_BY_LAUNCHER: "1"})
    if run_dir is not None:
        environment[distributed.RUN_DIR_VARIABLE] = str(run_dir)
    if not distributed.visible_gpus():
        environment.setdefault("OMP_NUM_THREADS", "1")  # CPU processes share the cores instead of oversubscribing
        # accelerate names a CPU rank's device cpu:<rank>, which the trainer hands torch.load as the map_location
        # of a checkpoint's optimizer state on --resume, and torch.load refuses it
        environment.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    torchrun = subprocess.Popen(command(recipe_file, overrides, cfg, extra), env=environment, start_new_session=True)
    with StopRelay(torchrun) as relay:
        code = torchrun.wait()
    return code, relay.received


def stop_report(code: int, received: str | None, run_dir: Path | None) -> str | None:
    """What the launching process says when the ranks stopped on a signal (None when they did not): rank 0's
    status says after which step and with which checkpoint."""
    from .status import read_status

    status = read_status(run_dir) if run_dir is not None else {}
    if code != 0 or (received is None and status.get("state") != "interrupted"):
        return None
    if status.get("state") == "interrupted":
        return status.get("error") or f"{received}: stopped with a checkpoint saved"
    return f"{received}: stopped with the other nodes (node 0 saved the checkpoint)"
