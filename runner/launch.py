"""`recipe run` with several processes: torchrun's command line, and stop signals that end in a checkpoint.

The launching process starts torchrun (`python -m torch.distributed.run`) in a session of its own and waits for it.
Stop signals therefore reach the launching process alone (Ctrl-C, `timeout` and a closed terminal signal the
foreground process group; `docker stop` and `kill` signal one process), and it passes the first one on to each
rank once. Each rank finishes its step, rank 0 decides the step they all stop at, and rank 0 saves a checkpoint
(runner/checkpoints.py, StopOnSignal); each rank leaves a line for its node's launching process, which prints it
once, with how to resume, and exits 130, as a run in one process does. A second signal kills every rank at once.

torchrun's own signal handling is left out of this on purpose: it forwards a signal, then kills the ranks after a
grace period (30 s by default) that a checkpoint written to a slow disk can outlast, and it reports a stopped rank
as a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import distributed

# Where a launch's ranks say they stopped on a signal (a folder on each node): a rank that stopped exits 0, since
# torchrun reports any other exit as a failure, and the launching process reports the stop.
STOP_REPORTS = "RECIPE_STOP_REPORTS"
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
        self.torchrun, self.relayed = torchrun, False

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        first, self.relayed = not self.relayed, True
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
    """Runs the recipe under torchrun. Returns torchrun's exit code and, when the ranks stopped on a signal, what
    they said (after which step, with which checkpoint). `run_dir` (made by node 0's launcher) is handed to every
    rank, so that all of them agree on where rank 0 writes."""
    reports = Path(tempfile.mkdtemp(prefix="recipe-stop-"))
    environment = dict(os.environ, **{STOP_REPORTS: str(reports)})
    if run_dir is not None:
        environment[distributed.RUN_DIR_VARIABLE] = str(run_dir)
    if not distributed.visible_gpus():
        environment.setdefault("OMP_NUM_THREADS", "1")  # CPU processes share the cores instead of oversubscribing
        # accelerate names a CPU rank's device cpu:<rank>, which the trainer hands torch.load as the map_location
        # of a checkpoint's optimizer state on --resume, and torch.load refuses it
        environment.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    try:
        torchrun = subprocess.Popen(command(recipe_file, overrides, cfg, extra), env=environment,
                                    start_new_session=True)
        with StopRelay(torchrun):
            code = torchrun.wait()
        said = sorted(reports.glob("rank*.txt"), key=lambda path: int(path.stem[4:]))
        return code, (said[0].read_text() if code == 0 and said else None)
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def report_stop(stopped) -> bool:
    """In a launched rank that stopped on a signal: leaves what it says for the launching process (which prints it
    once, for all ranks, and exits 130) and returns True; False outside a launch."""
    reports = os.environ.get(STOP_REPORTS)
    if not (reports and distributed.launched()):
        return False
    (Path(reports) / f"rank{distributed.rank()}.txt").write_text(str(stopped))
    return True
