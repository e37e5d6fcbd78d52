"""Known failures end in one line that says what to change; run.log keeps the traceback (CPU, tiny model)."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from click.testing import CliRunner

from runner.cli import main
from runner.errors import NonFiniteLoss, explain
from runner.recipe import load_recipe
from runner.status import read_status

from .conftest import REPO, smoke_overrides

RECIPE = str(REPO / "recipes" / "smoke_tiny.yaml")


def invoke_run(tiny_assets, tmp_path, *extra):
    args = ["run", RECIPE]
    for override in [*smoke_overrides(tiny_assets, tmp_path / "runs"), "export=[]", *extra]:
        args += ["--set", override]
    return CliRunner().invoke(main, args)


def test_cuda_out_of_memory_names_the_batch_size_and_what_to_change(tiny_assets, tmp_path, monkeypatch):
    import runner.train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner.train, "train", out_of_memory)
    result = invoke_run(tiny_assets, tmp_path, "train.batch_size=3")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"{RECIPE}: CUDA out of memory at train.batch_size 3")
    assert "gradient_accumulation_steps" in line and "gradient_checkpointing" in line and "4bit" in line
    (run_dir,) = list((tmp_path / "runs").glob("*/*"))
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"].startswith("CUDA out of memory at train.batch_size 3")
    log = (run_dir / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "Tried to allocate 2.00 GiB" in log
    assert "Traceback" not in result.output


@pytest.mark.parametrize("override, expected", [
    ("model.id=/nonexistent", "model.id '/nonexistent' could not be loaded: it looks like a local path, and "
                              "/nonexistent does not exist. Check the spelling, the network"),
    ("dataset.id=/nonexistent.parquet", "dataset.id '/nonexistent.parquet' could not be loaded: it looks like a "
                                        "local path, and /nonexistent.parquet does not exist."),
])
def test_a_model_or_dataset_that_cannot_be_loaded_is_one_line(tiny_assets, tmp_path, override, expected):
    result = invoke_run(tiny_assets, tmp_path, override)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "HF_TOKEN" in result.output
    assert "Traceback" not in result.output


def test_a_hub_id_that_cannot_be_loaded_says_it_was_read_as_a_hub_id():
    from runner.errors import dataset_not_found, model_not_found

    error = OSError("someone/no-such-model is not a local folder and is not a valid model identifier\nmore")
    assert str(model_not_found("someone/no-such-model", error)) == (
        "model.id 'someone/no-such-model' could not be loaded: no local path someone/no-such-model exists, so it was "
        "read as a Hugging Face hub id. Check the spelling, the network (the Hugging Face hub must be reachable) and "
        "HF_TOKEN for gated models. (OSError: someone/no-such-model is not a local folder and is not a valid model "
        "identifier)")
    assert "read as a Hugging Face hub id" in str(dataset_not_found("unsloth/LaTeX_OCRR", ConnectionError("offline")))


def test_disk_full_and_other_errors_are_explained_in_one_line():
    recipe = load_recipe(RECIPE)
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/checkpoint-5/optimizer.pt")
    assert explain(full, recipe) == ("disk full while writing runs/x/checkpoints/checkpoint-5/optimizer.pt: free space "
                                     "under runs (checkpoints are kept up to train.save_total_limit) or set output_dir "
                                     "to a larger disk")
    assert explain(ValueError("bad shape\nmore detail"), recipe) == "ValueError: bad shape (the traceback is in run.log)"


def test_a_non_finite_loss_stops_before_the_update_and_names_the_step():
    from runner.train import TokenCounter, checked

    class Trainer:  # stands in for SFTTrainer: training_step returns the (detached) loss of one batch
        def __init__(self, loss):
            self.loss = loss
            self.state = type("State", (), {"global_step": 6})()

        def training_step(self, model, inputs, *args, **kwargs):
            return torch.tensor(self.loss)

    batch = {"attention_mask": torch.ones(2, 5)}
    assert checked(Trainer, TokenCounter())(1.5).training_step(None, batch) == 1.5
    with pytest.raises(NonFiniteLoss) as stopped:
        checked(Trainer, TokenCounter())(float("nan")).training_step(None, batch)
    assert stopped.value.step == 7 and "the loss became nan at step 7" in str(stopped.value)
    assert "last checkpoint is still good" in str(stopped.value)


@pytest.mark.slow
def test_the_hf_token_never_reaches_the_files_a_run_writes(tiny_assets, tmp_path, monkeypatch):
    token = "hf_FakeTokenForTheLeakTest0123456789abcd"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    monkeypatch.chdir(tmp_path)
    result = invoke_run(tiny_assets, tmp_path, "train.max_steps=2", "eval.max_samples=4",
                        "export=[{format: lora}, {format: merged_16bit}]")
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.log" for p in written) and any(p.name.startswith("events.out") for p in written)
    assert any("exports" in p.parts for p in written)
    leaks = [str(p) for p in written if token.encode() in p.read_bytes()]
    assert leaks == [] and token not in result.output
    json.loads(next(p for p in written if p.name == "metrics.json").read_text())  # the files are real
