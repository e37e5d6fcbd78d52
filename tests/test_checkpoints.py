"""Resume after SIGKILL, checkpoint on SIGTERM, and checkpoints that survive a kill during a save (CPU, subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from runner.checkpoints import is_usable, newest_usable
from runner.status import effective_state, read_status

from .conftest import REPO, smoke_overrides

pytestmark = pytest.mark.slow
RECIPE = str(REPO / "recipes" / "smoke_tiny.yaml")
# 16 steps, a checkpoint every 4, one loss per step; no eval or export: only training is compared.
TRAINING = ["train.max_steps=16", "train.save_steps=4", "train.save_total_limit=3", "train.logging_steps=1",
            "train.warmup_steps=2", "eval.enabled=false", "export=[]"]


def command(tiny_assets, runs: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "runner", "run", RECIPE]
    for override in [*smoke_overrides(tiny_assets, runs), *TRAINING]:
        args += ["--set", override]
    return args + list(extra)


def wait_for(condition, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def the_run_dir(runs: Path) -> Path:
    (run_dir,) = list(runs.glob("smoke-tiny/*"))
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    return {int(step): loss for step, loss in json.loads((run_dir / "metrics.json").read_text())["train"]["losses"].items()}


def test_a_run_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(tiny_assets, tmp_path):
    reference = subprocess.run(command(tiny_assets, tmp_path / "reference"), cwd=tmp_path, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_dir = the_run_dir(tmp_path / "reference")

    runs = tmp_path / "runs"
    victim = subprocess.Popen(command(tiny_assets, runs), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = wait_for(lambda: any(is_usable(p) for p in runs.glob("smoke-tiny/*/checkpoints/checkpoint-8")), victim)
    assert killed, "the run ended before its step-8 checkpoint"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    run_dir = the_run_dir(runs)
    assert effective_state(read_status(run_dir)) == "killed"  # it could not write a word: status says running, pid gone

    resumed = subprocess.run(command(tiny_assets, runs, "--resume"), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert the_run_dir(runs) == run_dir  # the same directory, continued
    status = read_status(run_dir)
    assert status["state"] == "done" and status["step"] == 16
    k = int(Path(status["resumed_from"]).name.split("-")[1])
    assert k >= 8 and f"resuming {run_dir} from {status['resumed_from']}" in (run_dir / "run.log").read_text()

    # Same global steps, schedule, data order and RNG: the losses after step k are the uninterrupted run's. The
    # tolerance only absorbs float32 summation order (the resumed process reloads the weights it saved).
    expected, actual = losses(reference_dir), losses(run_dir)
    after_k = [step for step in expected if step > k]
    assert after_k and all(abs(actual[s] - expected[s]) <= 1e-4 * abs(expected[s]) for s in after_k), (expected, actual)
    # ... and so are the final adapters
    ref_weights = load_file(reference_dir / "adapter" / "adapter_model.safetensors")
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert ref_weights.keys() == weights.keys()
    assert max((weights[n] - ref_weights[n]).abs().max().item() for n in weights) < 1e-5
    assert any(ref_weights[n].abs().sum() > 0 for n in ref_weights)

    # A kill during a save leaves a checkpoint without its trainer state: it is set aside, the previous one is used.
    checkpoints = run_dir / "checkpoints"
    newest = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    half_written = checkpoints / "checkpoint-99"
    shutil.copytree(newest, half_written)
    (half_written / "trainer_state.json").write_text('{"global_step": 9')  # cut off mid-write
    assert newest_usable(run_dir) == newest
    assert not half_written.exists() and (checkpoints / "incomplete-checkpoint-99").exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tiny_assets, tmp_path):
    runs = tmp_path / "runs"
    # The signal goes to the whole process group, as `timeout`, SLURM's scancel and Ctrl-C send it: data loader
    # workers get it too, and must not die before the step finishes and the checkpoint is written.
    process = subprocess.Popen(command(tiny_assets, runs, "--set", "train.save_steps=null", "--set",
                                       "train.dataloader_workers=2"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)

    def started_training():
        dirs = list(runs.glob("smoke-tiny/*"))
        return bool(dirs) and read_status(dirs[0]).get("step", 0) >= 3

    assert wait_for(started_training, process), "training did not start"
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stderr and "--resume" in stderr
    run_dir = the_run_dir(runs)
    status = read_status(run_dir)
    checkpoint = newest_usable(run_dir)
    assert status["state"] == "interrupted" and checkpoint is not None
    assert status["last_checkpoint"] == str(checkpoint) and int(checkpoint.name.split("-")[1]) == status["step"] < 16
    assert not (run_dir / "adapter").exists()  # an interrupted run has no final adapter yet

    resumed = subprocess.run(command(tiny_assets, runs, "--resume", str(run_dir), "--set", "train.save_steps=null"),
                             cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(run_dir)["state"] == "done" and (run_dir / "adapter" / "adapter_config.json").exists()


def test_runs_lists_each_runs_state_step_and_metrics(tmp_path):
    from click.testing import CliRunner

    from runner.cli import main
    from runner.status import write_status

    for name, state, pid in (("a", "done", os.getpid()), ("b", "failed", os.getpid()), ("c", "running", 2**22 + 7)):
        run_dir = tmp_path / name / "20261129-120000"
        run_dir.mkdir(parents=True)
        (run_dir / "recipe.resolved.yaml").write_text("name: x\n")
        write_status(run_dir, state=state, pid=pid, step=4, max_steps=8, error="boom" if state == "failed" else None)
    (tmp_path / "a" / "20261129-120000" / "metrics.json").write_text(json.dumps(
        {"train": {"final_loss": 0.25}, "eval": {"after": {"exact_match": 0.5, "edit_distance": 0.125}}}))
    result = CliRunner().invoke(main, ["runs", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["run", "state", "step", "checkpoint", "loss", "exact_match", "edit_distance", "error"]
    assert lines[1].split()[1:] == ["done", "4/8", "-", "0.25", "0.5", "0.125", "-"]
    assert lines[2].split()[1:4] == ["failed", "4/8", "-"] and lines[2].endswith("boom")
    assert lines[3].split()[1] == "killed"  # recorded as running, but its process is gone


def test_resume_without_an_unfinished_run_says_so(tiny_assets, tmp_path):
    result = subprocess.run(command(tiny_assets, tmp_path / "runs", "--resume"), cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 1 and "no unfinished run with a checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_stop_signal_stops_at_once_unless_it_is_the_first_delivered_twice(monkeypatch):
    from runner import checkpoints

    clock = [100.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    stop = checkpoints.StopOnSignal()
    stop._handle(signal.SIGTERM, None)
    clock[0] += 0.5  # SLURM's copy and the launcher's arrive together: still the graceful stop
    stop._handle(signal.SIGTERM, None)
    assert stop.signalled == "SIGTERM"
    clock[0] += 5  # a user pressing Ctrl-C again seconds later
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
