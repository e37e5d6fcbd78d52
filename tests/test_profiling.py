"""train.profile_steps: the profiled steps are the ones after the warm-up, and every process writes its own files."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import torch

from runner import distributed
from runner.profiling import ProfileSteps
from tests.test_run import run_recipe


def test_a_run_writes_the_profile_of_the_steps_after_the_warm_up(tiny_assets, tmp_path, monkeypatch):
    run_dir = run_recipe("smoke_tiny.yaml", tiny_assets, tmp_path, monkeypatch, "train.max_steps=5",
                         "train.profile_steps=2", "eval.enabled=false", "export=[]")
    table = (run_dir / "profile" / "rank0.txt").read_text()
    assert table.startswith("2 training step(s) profiled after 2 warm-up steps") and "## by CPU time" in table
    assert "aten::mm" in table or "aten::addmm" in table  # the model's matmuls were recorded
    trace = json.loads(gzip.decompress((run_dir / "profile" / "rank0.json.gz").read_bytes()))
    assert trace["traceEvents"]
    assert "profile: recording steps 3-4" in (run_dir / "run.log").read_text()


def test_a_run_that_ends_inside_the_profiled_steps_still_writes_them_under_its_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    callback = ProfileSteps(5, tmp_path)
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, 4):
        torch.ones(64, 64) @ torch.ones(64, 64)
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert (tmp_path / "profile" / "rank1.txt").read_text().startswith("1 training step(s) profiled")
    assert (tmp_path / "profile" / "rank1.json.gz").exists() and not (tmp_path / "profile" / "rank0.txt").exists()
