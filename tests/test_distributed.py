"""Two training processes through the real launcher (torchrun, gloo on the CPU) against one process (tiny model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner import distributed, launch, strategies
from runner.cli import main
from runner.recipe import load_recipe

from .conftest import REPO, smoke_overrides

RECIPE = str(REPO / "recipes" / "smoke_tiny.yaml")
# 64 training rows; 8 steps of a global batch of 8 are exactly one epoch.
ONE_EPOCH = ["train.max_steps=8", "train.logging_steps=1", "train.warmup_steps=2", "train.save_steps=null",
             "train.group_by_length=true",
             "export=[]", "eval.compare_base=false", "eval.max_samples=4"]


def run(tiny_assets, runs: Path, *extra: str, trace: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runner", "run", RECIPE]
    for override in [*smoke_overrides(tiny_assets, runs), *ONE_EPOCH]:
        command += ["--set", override]
    environment = dict(os.environ, MASTER_PORT="29517")
    if trace is not None:
        trace.mkdir()
        environment["RECIPE_TRACE_ROWS"] = str(trace)
    return subprocess.run(command + list(extra), capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def one_metrics(tiny_assets, tmp_path_factory) -> dict:
    """metrics.json of one process at batch 8, which two processes at batch 4 must match step for step."""
    runs = tmp_path_factory.mktemp("one")
    one = run(tiny_assets, runs, "--set", "train.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    (one_dir,) = list(runs.glob("*/*"))
    return json.loads((one_dir / "metrics.json").read_text())


def losses_agree(expected: dict, actual: dict) -> bool:
    # The logged loss of 2 processes is the mean of the two ranks' token means, the 1-process one the token mean of
    # all 8 rows; with rows of unequal length that differs by ~0.1%, so the tolerance is 0.5%.
    return expected.keys() == actual.keys() and len(expected) == 8 and all(
        abs(actual[s] - expected[s]) <= 5e-3 * abs(expected[s]) for s in expected)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_double_batch(tiny_assets, tmp_path, one_metrics):
    two = run(tiny_assets, tmp_path / "two", "--gpus", "2", "--set", "train.batch_size=4", trace=tmp_path / "trace")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "through torchrun" in two.stdout

    (two_dir,) = list((tmp_path / "two").glob("*/*"))
    two_metrics = json.loads((two_dir / "metrics.json").read_text())
    # (a) The same 8 rows per step, the gradients averaged over all their tokens: the per-step losses agree.
    assert two_metrics["train"]["world_size"] == 2 and two_metrics["train"]["global_batch"] == 8
    expected, actual = one_metrics["train"]["losses"], two_metrics["train"]["losses"]
    assert losses_agree(expected, actual), (expected, actual)
    assert "global batch 8 = batch_size 4 x gradient_accumulation_steps 1 x 2 processes" in \
        (two_dir / "run.log").read_text()

    # (b) The rows each rank trained on are disjoint, and together they are the epoch, each row once.
    ranks = [[int(line) for line in (tmp_path / "trace" / f"rows-rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 32 and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(64))

    # (c) Rank 0 alone wrote the run directory (one log, one TensorBoard file, one status), and its adapter evaluates.
    written = sorted(str(p.relative_to(two_dir)) for p in two_dir.rglob("*") if p.is_file())
    assert len([p for p in written if p.startswith("tensorboard/")]) == 1
    assert {"run.log", "status.json", "metrics.json", "recipe.resolved.yaml", "predictions.jsonl",
            "adapter/adapter_config.json"} <= set(written)
    assert "[rank 1]" not in (two_dir / "run.log").read_text() and "rank" not in " ".join(written)
    assert json.loads((two_dir / "status.json").read_text())["state"] == "done"
    assert two_metrics["eval"]["after"]["rows"] == 4
    resolved = load_recipe(two_dir / "recipe.resolved.yaml")
    assert resolved["distributed"]["strategy"] == "ddp" and resolved["distributed"]["processes_per_node"] == 2
    assert two.stdout.count("done: ") == 1  # rank 1 says nothing on stdout


def test_length_grouping_gives_each_step_the_global_batch_of_one_process_at_the_global_batch_size():
    import torch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = torch.randint(40, 320, (2000,), generator=torch.Generator().manual_seed(0)).tolist()

    def sampler(batch_size):  # what the trainer builds, with the seed every process shares
        return LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(3407))

    one_process = list(BatchSampler(sampler(8), 8, drop_last=False))
    ranks = [list(BatchSamplerShard(BatchSampler(strategies.global_batch_sampler(sampler(4), 2), 4, drop_last=False),
                                    2, rank)) for rank in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(batch) for batch in one_process]
    # the trainer's own grouping (by one process's batch) gives other global batches at this size
    ranks = [list(BatchSamplerShard(BatchSampler(sampler(4), 4, drop_last=False), 2, rank)) for rank in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] != [sorted(batch) for batch in one_process]
    assert strategies.global_batch_sampler(sampler(4), 1).batch_size == 4


@pytest.mark.slow
def test_a_bfloat16_gradient_exchange_trains_within_the_tolerance_of_one_process(tiny_assets, tmp_path, one_metrics):
    two = run(tiny_assets, tmp_path / "runs", "--gpus", "2", "--set", "train.batch_size=4", "--set",
              "distributed.ddp_gradient_dtype=bfloat16", "--set", "distributed.ddp_bucket_mb=1")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    (two_dir,) = list((tmp_path / "runs").glob("*/*"))
    # logged only once the hook is seen on the DDP model that trains
    assert "ddp: gradients exchanged in bfloat16 (bf16_compress_hook), buckets of 1 MB" in \
        (two_dir / "run.log").read_text()
    actual = json.loads((two_dir / "metrics.json").read_text())["train"]["losses"]
    assert losses_agree(one_metrics["train"]["losses"], actual), (one_metrics["train"]["losses"], actual)


@pytest.mark.slow
@pytest.mark.parametrize("stage, offload", [(2, True), (3, False)])  # offload: DeepSpeed's CPU Adam steps instead
def test_deepspeed_zero_trains_like_one_process_and_rank_0_saves_the_whole_adapter(tiny_assets, tmp_path,
                                                                                  one_metrics, stage, offload):
    from safetensors.torch import load_file

    two = run(tiny_assets, tmp_path / "runs", "--gpus", "2", "--set", "train.batch_size=4", "--set",
              "distributed.strategy=deepspeed", "--set", f"distributed.deepspeed_stage={stage}", "--set",
              f"distributed.deepspeed_cpu_offload={str(offload).lower()}")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs").glob("*/*"))
    metrics, log = json.loads((run_dir / "metrics.json").read_text()), (run_dir / "run.log").read_text()
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["global_batch"] == 8
    assert losses_agree(one_metrics["train"]["losses"], metrics["train"]["losses"]), metrics["train"]["losses"]
    # ZeRO-3 partitions every weight (and says so); ZeRO-2 only the optimizer state and gradients.
    partitioned = re.search(r"deepspeed: (\d+) of (\d+) parameter tensors partitioned across 2 processes", log)
    assert (partitioned is not None and partitioned[1] == partitioned[2]) == (stage == 3), log[-2000:]
    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert {"run.log", "metrics.json", "predictions.jsonl", "adapter/adapter_model.safetensors"} <= set(written)
    assert "[rank 1]" not in log and "rank" not in " ".join(written)
    # The adapter rank 0 saved is whole (gathered from the shards) and trained, and rank 0 evaluated it.
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    r = load_recipe(run_dir / "recipe.resolved.yaml")["lora"]["r"]
    assert all(min(t.shape) == r for t in saved.values())
    assert any(t.abs().max() > 0 for name, t in saved.items() if "lora_B" in name)
    assert metrics["eval"]["after"]["rows"] == 4


@pytest.mark.parametrize("overrides, key, message", [
    (["distributed.strategy=ddp", "distributed.nodes=2", "distributed.node_rank=2"], "distributed.node_rank",
     "is 2 but nodes is 2; node ranks run from 0 to nodes - 1"),
    (["distributed.strategy=ddp", "distributed.processes_per_node=4096"], "distributed.processes_per_node",
     "4096 processes on a machine without a GPU"),
    (["distributed.strategy=ddp", "distributed.processes_per_node=3", "distributed.gpus_for_test=1"],
     "distributed.processes_per_node", "3 processes but 1 visible GPUs; use at most one process per GPU"),
    (["distributed.strategy=fsdp", "distributed.processes_per_node=2"], "distributed.strategy",
     "fsdp needs CUDA GPUs: accelerate runs CPU processes as plain DDP"),
    (["distributed.strategy=fsdp", "distributed.processes_per_node=1", "model.backend=unsloth",
      "distributed.gpus_for_test=1"], "distributed.strategy", "fsdp needs the transformers backend: Unsloth has no "
     "FSDP path; set model.backend: transformers (or auto), or use strategy: ddp"),
    (["distributed.strategy=fsdp", "distributed.processes_per_node=1", "model.quantization=8bit",
      "distributed.gpus_for_test=1"], "distributed.strategy", "fsdp cannot shard 8-bit"),
    (["distributed.strategy=ddp", "distributed.processes_per_node=2", "distributed.fsdp_cpu_offload=true"],
     "distributed.fsdp_cpu_offload", "applies to strategy fsdp only, not ddp"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=1", "model.backend=unsloth",
      "distributed.gpus_for_test=1"], "distributed.strategy", "deepspeed needs the transformers backend"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=1", "model.quantization=8bit",
      "distributed.gpus_for_test=1"], "distributed.strategy", "deepspeed with 8bit (bitsandbytes int8) weights is "
     "not supported here; use model.quantization: 4bit or none, or strategy: ddp"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=1", "model.quantization=4bit",
      "distributed.deepspeed_stage=3", "distributed.gpus_for_test=1"], "distributed.deepspeed_stage",
     "3 with 4-bit weights is not supported here"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=1", "train.optimizer=adamw_8bit",
      "distributed.gpus_for_test=1"], "train.optimizer", "adamw_8bit under deepspeed"),
    (["distributed.strategy=ddp", "distributed.processes_per_node=2", "distributed.deepspeed_cpu_offload=true"],
     "distributed.deepspeed_cpu_offload", "applies to strategy deepspeed only, not ddp"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=1", "distributed.ddp_gradient_dtype=bfloat16",
      "distributed.gpus_for_test=1"], "distributed.ddp_gradient_dtype", "applies to strategy ddp only, not deepspeed"),
    (["distributed.strategy=fsdp", "distributed.processes_per_node=1", "distributed.ddp_bucket_mb=100",
      "distributed.gpus_for_test=1"], "distributed.ddp_bucket_mb", "applies to strategy ddp only, not fsdp"),
    (["distributed.strategy=deepspeed", "distributed.processes_per_node=2", "distributed.deepspeed_stage=1"],
     "distributed.deepspeed_stage", "must be one of 2, 3, got 1"),
])
def test_invalid_combinations_fail_before_anything_launches(tmp_path, monkeypatch, overrides, key, message):
    gpus = 1 if "distributed.gpus_for_test=1" in overrides else 0
    overrides = [o for o in overrides if not o.startswith("distributed.gpus_for_test")]
    monkeypatch.setattr(distributed, "visible_gpus", lambda: gpus)
    args = ["run", RECIPE, "--set", f"output_dir={tmp_path / 'runs'}"]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"{key}: {message}" in result.output, result.output
    assert not (tmp_path / "runs").exists()  # nothing launched, no run directory


def test_a_rendezvous_port_in_use_is_refused_with_a_free_one_before_anything_launches(tmp_path):
    import socket

    args = ["run", RECIPE, "--set", f"output_dir={tmp_path / 'runs'}", "--set", "distributed.strategy=ddp",
            "--set", "distributed.processes_per_node=2"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_run:
        other_run.bind(("", 0))
        other_run.listen()
        port = other_run.getsockname()[1]
        result = CliRunner().invoke(main, [*args, "--set", f"distributed.master_port={port}"])
        assert result.exit_code == 1, result.output
        suggested = int(re.search(rf"distributed.master_port: {port} is in use on this machine .* e\.g\. (\d+)",
                                  result.output).group(1))
        assert suggested != port and not distributed.port_in_use(suggested)
    assert not (tmp_path / "runs").exists()
    assert not distributed.port_in_use(port)  # closed again: the same recipe passes this check
    assert distributed.problems(distributed.resolve({**load_recipe(RECIPE)["distributed"], "strategy": "ddp",
                                                     "master_port": port}), "transformers", "none") == []


def test_the_section_defaults_to_one_process_and_takes_the_usual_environment_variables(monkeypatch):
    defaults = load_recipe(RECIPE)["distributed"]
    assert distributed.resolve(defaults)["processes_per_node"] == 1 and distributed.planned_world_size(
        distributed.resolve(defaults)) == 1
    for variable, value in (("NPROC_PER_NODE", "3"), ("NNODES", "2"), ("NODE_RANK", "1"), ("MASTER_ADDR", "10.0.0.5"),
                            ("MASTER_PORT", "29999")):
        monkeypatch.setenv(variable, value)
    resolved = distributed.resolve({**defaults, "strategy": "ddp"})
    assert (resolved["processes_per_node"], resolved["nodes"], resolved["node_rank"], resolved["master_addr"],
            resolved["master_port"]) == (3, 2, 1, "10.0.0.5", 29999)
    assert distributed.planned_world_size(resolved) == 6
    command = launch.command("r.yaml", ["train.max_steps=5"], resolved, [])
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=3" in command
    assert "--nnodes=2" in command and "--node_rank=1" in command and "--master_addr=10.0.0.5" in command
    assert command[-3:] == ["r.yaml", "--set", "train.max_steps=5"]


def test_fsdp_wraps_each_decoder_layer_and_vision_block_and_auto_leaves_unsloth_out(tiny_assets):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from runner import backends

    assert backends.select("auto", "fsdp")[0] == "transformers"
    cfg = {**load_recipe(RECIPE)["distributed"], "strategy": "fsdp"}
    arguments = strategies.fsdp_arguments(cfg, gradient_checkpointing=True)
    assert arguments["fsdp"] is True and arguments["fsdp_config"]["activation_checkpointing"] is True
    # The wrapped classes must be the model's own unsplittable modules, or FSDP would shard nothing per layer.
    assert set(arguments["fsdp_config"]["transformer_layer_cls_to_wrap"]) == set(
        Qwen2_5_VLForConditionalGeneration._no_split_modules)
    assert strategies.fsdp_arguments({**cfg, "strategy": "ddp"}, True) == {}


def test_one_process_on_a_machine_with_several_gpus_trains_on_one_instead_of_dataparallel(tmp_path):
    from runner.train import one_gpu_per_process, sft_config

    train = load_recipe(RECIPE)["train"]
    config = sft_config(train, tmp_path, 256)
    config._n_gpu = 2  # what the trainer would see on a 2-GPU machine, where it would wrap nn.DataParallel
    assert one_gpu_per_process(config).n_gpu == 1


def test_deepspeed_not_installed_is_refused_with_how_to_add_it(tmp_path, monkeypatch):
    find_spec = distributed.importlib.util.find_spec
    monkeypatch.setattr(distributed.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    args = ["run", RECIPE, "--set", f"output_dir={tmp_path / 'runs'}", "--set", "distributed.strategy=deepspeed",
            "--set", "distributed.processes_per_node=2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "distributed.strategy: deepspeed is not installed; add it with `recipe install " \
        "deepspeed`" in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_deepspeed_config_leaves_batch_and_optimizer_to_the_trainer_and_gathers_zero3_weights_to_save():
    cfg = {**load_recipe(RECIPE)["distributed"], "strategy": "deepspeed"}
    zero2 = strategies.deepspeed_arguments(cfg)["deepspeed"]
    assert zero2["zero_optimization"]["stage"] == 2 and zero2["train_micro_batch_size_per_gpu"] == "auto"
    assert "optimizer" not in zero2 and not distributed.shards_weights(cfg)
    zero3 = strategies.deepspeed_arguments({**cfg, "deepspeed_stage": 3, "deepspeed_cpu_offload": True})["deepspeed"]
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["zero_optimization"]["offload_param"] == {"device": "cpu"} and zero3["optimizer"]["type"] == "AdamW"
    assert distributed.shards_weights({**cfg, "deepspeed_stage": 3}) and strategies.deepspeed_arguments(
        {**cfg, "strategy": "fsdp"}) == {}
