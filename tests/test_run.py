"""End to end: the CLI runs whole recipes on the tiny model (CPU, minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from runner.cli import main

from .conftest import smoke_overrides

REPO = Path(__file__).resolve().parent.parent


def run_recipe(recipe: str, tiny_assets, tmp_path, monkeypatch, *extra) -> Path:
    monkeypatch.chdir(tmp_path)  # exports/ is relative to the working directory
    args = ["run", str(REPO / "recipes" / recipe)]
    for override in [*smoke_overrides(tiny_assets, tmp_path / "runs"), *extra]:
        args += ["--set", override]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dirs = list((tmp_path / "runs").glob("*/*"))
    assert len(run_dirs) == 1
    return run_dirs[0]


@pytest.mark.slow
def test_smoke_recipe_writes_a_complete_run_directory_and_exports(tiny_assets, tmp_path, monkeypatch):
    run_dir = run_recipe("smoke_tiny.yaml", tiny_assets, tmp_path, monkeypatch, "train.max_steps=4",
                         "train.logging_steps=2")
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["lora"]["dropout"] == 0.0  # overrides and defaults
    log = (run_dir / "run.log").read_text()
    for step in ("model", "data", "lora", "train", "eval", "export"):
        assert f"── {step} done in" in log
    assert "backend: transformers (set in the recipe)" in log and "step 2/4: loss=" in log and "step 4/4: loss=" in log
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["train"] == {"rows": 64, "kept": 64, "skipped": {}}
    assert metrics["train"]["first_loss"] > 0 and metrics["train"]["train_runtime"] > 0
    after, before = metrics["eval"]["after"], metrics["eval"]["before"]  # smoke_tiny sets eval.compare_base
    assert after["rows"] == before["rows"] == 16 and 0 <= after["edit_distance"] <= 1
    assert {"bleu", "bleu_normalized", "edit_distance_normalized", "token_exact_match", "token_edit_distance",
            "samples_per_s"} <= after.keys()
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {"row_id", "reference", "prediction", "exact_match", "edit_distance",
                                       "token_edit_distance"} <= predictions[0].keys()
    base_predictions = (run_dir / "predictions_base.jsonl").read_text().splitlines()
    assert [json.loads(line)["row_id"] for line in base_predictions] == [p["row_id"] for p in predictions]
    report = (run_dir / "report.md").read_text()
    assert "| metric | before training | after training | change |" in report
    assert "## Examples, before and after" in report and "## The 10 worst rows" in report
    assert (run_dir / "edit_distance_histogram.png").exists() and len(list((run_dir / "report_images").glob("*.png"))) == 10
    assert (run_dir / "adapter" / "adapter_config.json").exists()

    lora_dir, merged_dir = tmp_path / "exports" / "smoke-tiny" / "lora", tmp_path / "exports" / "smoke-tiny" / "merged_16bit"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in lora_dir.iterdir()}
    merged_files = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in merged_files and "adapter_config.json" not in merged_files
    assert not [p for p in (tmp_path / "exports" / "smoke-tiny").iterdir() if p.name.startswith(".")]  # no staging left
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    # `recipe eval` on the finished run reproduces the run's own evaluation
    args = ["eval", str(run_dir), "--recipe", str(REPO / "recipes" / "smoke_tiny.yaml"), "--out", str(tmp_path / "ev")]
    for override in smoke_overrides(tiny_assets, tmp_path / "runs") + ["eval.compare_base=false"]:
        args += ["--set", override]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())["after"]
    assert again["exact_match"] == after["exact_match"] and again["edit_distance"] == pytest.approx(after["edit_distance"])


@pytest.mark.slow
def test_the_model_learns_from_the_image_memorizes_16_formulas(memorized):
    """Same instruction for every sample, so only the image can tell the 16 answers apart."""
    run_dir = memorized["run"]
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    references = [p["reference"] for p in predictions]
    assert len(references) == 16 and len(set(references)) == 16
    exact = sum(p["prediction"] == p["reference"] for p in predictions)
    print(f"memorization: {exact}/16 exact")
    assert exact >= 15, "\n".join(f"{p['reference']!r} -> {p['prediction']!r}" for p in predictions)
    reported = json.loads((run_dir / "metrics.json").read_text())["eval"]["after"]
    assert reported["exact_match"] * 16 >= 15  # the eval step's own figure says the same


def test_run_refuses_a_recipe_this_machine_cannot_run(tmp_path, monkeypatch):
    from runner import backends

    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "qwen25vl_latex_a100.yaml"),
                                       "--set", "model.backend=unsloth"])
    assert result.exit_code == 1
    assert "model.backend: unsloth needs a CUDA GPU" in result.output
    assert "model.quantization: 4bit (bitsandbytes) needs a CUDA GPU" in result.output


def test_validate_here_refuses_unsloth_on_a_machine_without_a_gpu(monkeypatch):
    from runner import backends

    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    recipe = str(REPO / "recipes" / "smoke_tiny.yaml")
    assert CliRunner().invoke(main, ["validate", recipe, "--set", "model.backend=unsloth"]).exit_code == 0
    result = CliRunner().invoke(main, ["validate", "--here", recipe, "--set", "model.backend=unsloth"])
    assert result.exit_code == 1
    assert "model.backend: unsloth needs a CUDA GPU and this machine has none; use backend: transformers" in result.output


def test_validate_reports_every_file_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 4\n")
    result = CliRunner().invoke(main, ["validate", str(REPO / "recipes" / "smoke_tiny.yaml"), str(bad)])
    assert result.exit_code == 1
    assert "smoke_tiny.yaml: ok" in result.output
    assert f"{bad}:2:3: lora.rank: unknown key (did you mean 'r'?)" in result.output
    assert "1 problem found" in result.output


def test_new_copies_a_recipe_for_another_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    result = CliRunner().invoke(main, ["new", "my_formulas", "--from", str(REPO / "recipes" / "qwen25vl_latex_a100.yaml"),
                                       "--dataset", "data/mine.parquet"])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((tmp_path / "recipes" / "my_formulas.yaml").read_text())
    assert recipe["name"] == "my_formulas" and recipe["dataset"]["id"] == "data/mine.parquet"


def test_readme_recipe_reference_matches_the_schema():
    result = CliRunner().invoke(main, ["reference", "--readme", str(REPO / "README.md"), "--check"])
    assert result.exit_code == 0, result.output


def test_run_refuses_gguf_export_without_llama_cpp_before_training(monkeypatch):
    from runner import gguf
    from runner.run import preflight
    from runner.recipe import load_recipe

    def missing():
        raise gguf.GGUFError("GGUF export needs llama-cpp-python: `pip install -e '.[gguf]'`")

    monkeypatch.setattr(gguf, "llama_cpp_version", missing)
    recipe = load_recipe(REPO / "recipes" / "smoke_tiny.yaml", ["export=[{format: lora}, {format: gguf}]"])
    assert ("export.1.format", "GGUF export needs llama-cpp-python: `pip install -e '.[gguf]'`") in preflight(recipe)
