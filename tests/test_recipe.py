from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.recipe import RecipeError, load_recipe, load_schema

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def problems_of(tmp_path: Path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, list(overrides))
    return [str(p).replace(str(path), "R") for p in caught.value.problems]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates(recipe):
    resolved = load_recipe(recipe)
    assert resolved["name"]


def check_header(recipe: Path, recipes_dir: Path) -> str:
    """A recipe's header: a comment that names its own `just run` command and shows one override."""
    header = recipe.read_text().split("\nname:")[0]
    assert header.startswith("#")
    assert f"just run recipes/{recipe.relative_to(recipes_dir)}" in header
    assert "--set" in header  # one override example
    return header


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_starts_with_a_header_naming_its_just_run_command(recipe):
    check_header(recipe, REPO / "recipes")


def test_every_schema_property_has_a_default_and_a_description():
    def walk(schema, path):
        for key, prop in schema.get("properties", {}).items():
            assert "default" in prop, f"{path}{key} has no default"
            assert prop.get("description"), f"{path}{key} has no description"
            assert prop.get("type") != "object" or prop.get("additionalProperties") is False
            walk(prop, f"{path}{key}.")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[].")

    schema = load_schema()
    assert schema["additionalProperties"] is False
    walk(schema, "")


def test_defaults_fill_a_minimal_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: minimal\nexport:\n  - format: gguf\n  - format: lora\n")
    recipe = load_recipe(path)
    assert recipe["model"]["id"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert recipe["lora"]["r"] == 16 and recipe["train"]["learning_rate"] == 2e-4
    assert recipe["export"] == [{"format": "gguf", "quantizations": ["q4_k_m"]}, {"format": "lora"}]


def test_all_problems_are_reported_together_with_positions_and_suggestions(tmp_path):
    text = (
        "name: x\n"
        "model:\n"
        "  backend: unslot\n"
        "lora:\n"
        "  rank: 8\n"
        "  r: many\n"
        "train:\n"
        "  max_steps: 0\n"
        "evl: {}\n"
    )
    assert problems_of(tmp_path, text) == [
        "R:3:3: model.backend: must be one of 'auto', 'unsloth', 'transformers', got 'unslot' (did you mean 'unsloth'?)",
        "R:5:3: lora.rank: unknown key (did you mean 'r'?); allowed keys: r, alpha, dropout, bias, vision_layers, "
        "language_layers, attention_modules, mlp_modules, target_modules, use_rslora, seed",
        "R:6:3: lora.r: expected integer, got string 'many'",
        "R:8:3: train.max_steps: must be >= 1, got 0",
        "R:9:1: evl: unknown key (did you mean 'eval'?); allowed keys: name, install, output_dir, model, dataset, "
        "lora, train, grpo, dpo, eval, export, distributed",
    ]


def test_yaml_syntax_errors_have_line_and_column(tmp_path):
    assert problems_of(tmp_path, "name: x\nmodel:\n  id: [unclosed\n") == [
        "R:4:1: <recipe>: YAML syntax error: expected ',' or ']', but got '<stream end>'"
    ]


def test_overrides_are_validated_like_the_file(tmp_path):
    problems = problems_of(tmp_path, "name: x\n", ["train.batch_size=two", "train.lr=1e-4", "nokey"])
    assert problems == [
        "--set nokey: <recipe>: expected KEY.PATH=VALUE, for example train.max_steps=5",
        "--set train.batch_size=two: train.batch_size: expected integer, got string 'two'",
        "--set train.lr=1e-4: train.lr: unknown key (did you mean 'learning_rate'?); allowed keys: method, max_steps, epochs, "
        "batch_size, gradient_accumulation_steps, group_by_length, learning_rate, lr_scheduler, warmup_steps, optimizer, weight_decay, "
        "max_grad_norm, gradient_checkpointing, activation_offload, precision, logging_steps, save_steps, save_every_minutes, save_total_limit, seed, "
        "dataloader_workers, profile_steps",
    ]


def test_overrides_apply_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  max_steps: 30\n")
    recipe = load_recipe(path, ["train.max_steps=null", "train.learning_rate=5e-5", "export=[{format: lora}]"])
    assert recipe["train"]["max_steps"] is None
    assert recipe["train"]["learning_rate"] == 5e-5
    assert recipe["export"] == [{"format": "lora"}]


def test_scientific_notation_is_a_number_not_a_string(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n")
    assert load_recipe(path)["train"]["learning_rate"] == 2e-4


def test_cross_key_rules(tmp_path):
    text = (
        "dataset:\n  eval_split: test\n  eval_fraction: 0.1\n"
        "model:\n  image_min_pixels: 5000\n  image_max_pixels: 1000\n  backend: unsloth\n"
        "export:\n  - format: lora\n    quantizations: [f16]\n"
        "eval:\n  kv_cache: static\n"
    )
    assert problems_of(tmp_path, text) == [
        "R:3:3: dataset.eval_fraction: set eval_split to null to hold out a fraction instead",
        "R:5:3: model.image_min_pixels: is larger than image_max_pixels (5000 > 1000)",
        "R:10:5: export.0.quantizations: only the gguf format takes quantizations",
        "R:12:3: eval.kv_cache: static compiles the decode step, and Unsloth's forward is compiled already "
        "(torch.compile fails inside it: docs/benchmarks.md, eval round 3); use auto (dynamic under Unsloth), or "
        "model.backend: transformers",
    ]


def test_offloading_activations_to_the_cpu_is_refused_on_the_transformers_backend(tmp_path):
    text = "model:\n  backend: transformers\ntrain:\n  activation_offload: cpu\n"
    assert problems_of(tmp_path, text) == [
        "R:4:3: train.activation_offload: cpu is Unsloth's offload; the transformers backend keeps checkpointed "
        "activations on the GPU: use auto or none, or model.backend: unsloth"]
    (tmp_path / "recipe.yaml").write_text(text.replace("cpu", "none"))
    assert load_recipe(tmp_path / "recipe.yaml")["train"]["activation_offload"] == "none"


def test_a_recipe_must_be_a_mapping(tmp_path):
    assert problems_of(tmp_path, "- a\n- b\n") == ["R:1:1: <recipe>: a recipe is a mapping of sections, got list"]


def test_schema_files_are_valid_json_schema():
    from jsonschema import Draft202012Validator

    for path in (REPO / "schemas").glob("*.json"):
        Draft202012Validator.check_schema(json.loads(path.read_text()))
