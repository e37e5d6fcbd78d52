"""A two-process run (torchrun, gloo on the CPU) stopped by a signal: a checkpoint, one report, exit 130, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from runner import launch
from runner.checkpoints import newest_usable
from runner.status import read_status

from .conftest import smoke_overrides
from .test_checkpoints import RECIPE, TRAINING, the_run_dir, wait_for

pytestmark = pytest.mark.slow


def two_process_run(tiny_assets, runs, port: int, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "runner", "run", RECIPE, "--gpus", "2"]
    for override in [*smoke_overrides(tiny_assets, runs), *TRAINING, "train.save_steps=null", "train.batch_size=4",
                     "train.dataloader_workers=1", f"distributed.master_port={port}"]:
        args += ["--set", override]
    return args + list(extra)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")  # reaped or a zombie: gone


@pytest.mark.parametrize("target, port", [("group", 29541), ("launcher", 29543)])
def test_a_stop_signal_ends_every_rank_with_a_checkpoint_and_one_report(tiny_assets, tmp_path, target, port):
    """`group`: Ctrl-C, `timeout` or a closed terminal signal the whole foreground process group; `launcher`:
    `docker stop` or `kill` signal the launching process alone. Both must stop the ranks the same way."""
    runs = tmp_path / "runs"
    process = subprocess.Popen(two_process_run(tiny_assets, runs, port), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)

    def training():
        dirs = list(runs.glob("smoke-tiny/*"))
        return bool(dirs) and read_status(dirs[0]).get("step", 0) >= 3

    assert wait_for(training, process), process.communicate()[1][-3000:]
    (torchrun,) = launch.rank_processes(process.pid)  # the launcher's one child
    ranks = launch.rank_processes(torchrun)
    assert len(ranks) == 2
    if target == "group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)

    assert process.returncode == 130, stderr[-3000:]
    assert stderr.count("continue with `just run") == 1 and "SIGTERM: stopped after step" in stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert not any(alive(pid) for pid in [torchrun, *ranks])  # nothing left running in the background
    run_dir = the_run_dir(runs)
    status, checkpoint = read_status(run_dir), newest_usable(run_dir)
    assert status["state"] == "interrupted" and checkpoint is not None
    assert int(checkpoint.name.split("-")[1]) == status["step"] < 16
    if target == "launcher":
        return
    resumed = subprocess.run(two_process_run(tiny_assets, runs, port, "--resume", str(run_dir)), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(run_dir)["state"] == "done" and (run_dir / "adapter" / "adapter_config.json").exists()


def test_two_nodes_stop_together_when_one_node_alone_is_signalled(tiny_assets, tmp_path):
    """Two launchers on this machine as node 0 and node 1, one process each (README's two-node commands): `kill`
    on node 1's launcher stops the ranks of both nodes after the same step, rank 0 saves the checkpoint, and each
    node's launcher reports the stop once and exits 130."""
    runs = tmp_path / "runs"

    def node(rank: int) -> tuple[subprocess.Popen, object]:
        args = [sys.executable, "-m", "runner", "run", RECIPE]
        for override in [*smoke_overrides(tiny_assets, runs), *TRAINING, "train.save_steps=null", "train.batch_size=4",
                         "train.dataloader_workers=1", "distributed.strategy=ddp", "distributed.processes_per_node=1",
                         "distributed.nodes=2", f"distributed.node_rank={rank}", "distributed.master_addr=127.0.0.1",
                         "distributed.master_port=29545"]:
            args += ["--set", override]
        stderr = open(tmp_path / f"node{rank}.err", "w+")
        return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=True), stderr

    nodes = [node(0), node(1)]

    def training():
        dirs = list(runs.glob("smoke-tiny/*"))
        return bool(dirs) and read_status(dirs[0]).get("step", 0) >= 3

    assert wait_for(training, nodes[0][0]), (tmp_path / "node0.err").read_text()[-3000:]
    nodes[1][0].send_signal(signal.SIGTERM)
    for process, stderr in nodes:
        process.wait(timeout=180)
        stderr.seek(0)
        said = stderr.read()
        assert process.returncode == 130, said[-3000:]
        assert said.count("continue with `just run") == 1 and "stopped after step" in said
    run_dir = the_run_dir(runs)  # one directory: node 1's rank took rank 0's from torchrun's store
    status, checkpoint = read_status(run_dir), newest_usable(run_dir)
    assert status["state"] == "interrupted" and checkpoint is not None
    assert int(checkpoint.name.split("-")[1]) == status["step"] < 16
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}  # each rank's, to resume
