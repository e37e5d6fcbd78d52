"""Recipe loading: YAML with positions, `--set` overrides, JSON Schema validation, defaults.

Every problem is collected before anything is reported, as `file:line:col: key.path: message`, so a user
fixes a recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from .recipe_file import Problem, RecipeError, RecipeLoader, parse_yaml, read_text  # noqa: F401 (the public names)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SECTIONS = ("model", "dataset", "lora", "train", "grpo", "dpo", "eval", "export", "distributed")


def load_schema() -> dict:
    """The recipe schema with each section's `$ref` replaced by the section file's contents."""
    schema = json.loads((SCHEMA_DIR / "recipe.schema.json").read_text())
    for name, prop in schema["properties"].items():
        if "$ref" in prop:
            section = json.loads((SCHEMA_DIR / prop["$ref"]).read_text())
            section.pop("$schema", None)
            section.pop("$id", None)
            schema["properties"][name] = section
    return schema


# --- overrides -----------------------------------------------------------------------------------------------


def apply_overrides(recipe: dict, overrides: list[str]) -> tuple[dict, list[Problem], dict[tuple, str]]:
    """Applies `key.path=value` overrides (values parsed as YAML). Returns recipe, problems, override origins."""
    recipe = copy.deepcopy(recipe)
    problems, origins = [], {}
    for override in overrides:
        where = f"--set {override}"
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(where, "", "expected KEY.PATH=VALUE, for example train.max_steps=5"))
            continue
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else ""
        except yaml.YAMLError as error:
            problems.append(Problem(where, key, f"value is not valid YAML: {error}"))
            continue
        parts = key.strip().split(".")
        target = recipe
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(target.get(part, {}), dict):
                problems.append(Problem(where, key, f"'{part}' is not a section"))
                break
            if part not in target:
                origins[tuple(parts[: depth + 1])] = where
            target = target.setdefault(part, {})
        else:
            target[parts[-1]] = value
            origins[tuple(parts)] = where
    return recipe, problems, origins


# --- validation ----------------------------------------------------------------------------------------------


def _subschema(schema: dict, path: tuple) -> dict:
    for part in path:
        schema = schema.get("items", {}) if isinstance(part, int) else schema.get("properties", {}).get(part, {})
    return schema


# Names users bring from transformers, peft, trl and Unsloth notebooks, mapped to this schema's keys.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "use_rslora",
    "finetune_vision_layers": "vision_layers", "finetune_language_layers": "language_layers",
    "finetune_attention_modules": "attention_modules", "finetune_mlp_modules": "mlp_modules",
    "random_state": "seed", "lr": "learning_rate", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "optim": "optimizer", "lr_scheduler_type": "lr_scheduler",
    "max_length": "max_seq_length", "model_name": "id", "load_in_4bit": "quantization",
    "torch_dtype": "dtype", "name": "id", "path": "id", "warmup_ratio": "warmup_steps",
}


def _did_you_mean(word: Any, choices) -> str:
    choices = [str(c) for c in choices]
    if SYNONYMS.get(str(word)) in choices:
        return f" (did you mean '{SYNONYMS[str(word)]}'?)"
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


def _messages(error, schema: dict) -> list[tuple[tuple, str]]:
    """Turns one jsonschema error into (path, message) pairs a person can act on."""
    path = tuple(error.absolute_path)
    value = error.instance
    if error.validator == "additionalProperties":
        allowed = list(_subschema(schema, path).get("properties", {}))
        return [
            (path + (key,), f"unknown key{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}")
            for key in value if key not in allowed
        ]
    if error.validator == "enum":
        options = ", ".join(repr(o) for o in error.validator_value)
        return [(path, f"must be one of {options}, got {value!r}{_did_you_mean(value, error.validator_value)}")]
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return [(path, f"expected {' or '.join(expected)}, got {_type_name(value)} {value!r}")]
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        symbol = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
        return [(path, f"must be {symbol[error.validator]} {error.validator_value}, got {value!r}")]
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in value]
        return [(path, f"missing required key '{key}'") for key in missing]
    if error.validator == "pattern":
        return [(path, f"{value!r} does not match {error.validator_value}")]
    return [(path, error.message)]


def _fill_defaults(schema: dict, value: Any) -> Any:
    """Returns `value` with every missing property set to its schema default, recursively."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = _fill_defaults(prop, value[key])
    elif schema.get("type") == "array" and isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_fill_defaults(schema["items"], item) for item in value]
    return value


def _non_finite(value: Any, path: tuple = ()):
    """`.nan` and `.inf` (or 1e999) pass JSON Schema's number checks; no recipe value may be either."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, f"must be a finite number, got {value}"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, path + (index,))


def _cross_checks(recipe: dict) -> list[tuple[tuple, str]]:
    """Rules that span keys, which JSON Schema would only state as unreadable combinators."""
    def section(name):
        value = recipe.get(name)
        return value if isinstance(value, (dict, list)) else {}

    problems = []
    for index, target in enumerate(section("export")):
        if isinstance(target, dict) and target.get("format") != "gguf" and "quantizations" in target:
            problems.append((("export", index, "quantizations"), "only the gguf format takes quantizations"))
    dataset = section("dataset")
    fraction = dataset.get("eval_fraction", 0)
    if dataset.get("eval_split") is not None and isinstance(fraction, (int, float)) and fraction > 0:
        problems.append((("dataset", "eval_fraction"), "set eval_split to null to hold out a fraction instead"))
    model = section("model")
    low, high = model.get("image_min_pixels"), model.get("image_max_pixels")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append((("model", "image_min_pixels"), f"is larger than image_max_pixels ({low} > {high})"))
    if model.get("backend") == "unsloth" and section("eval").get("kv_cache") == "static":
        problems.append((("eval", "kv_cache"), "static compiles the decode step, and Unsloth's forward is compiled "
                         "already (torch.compile fails inside it: docs/benchmarks.md, eval round 3); use auto "
                         "(dynamic under Unsloth), or model.backend: transformers"))
    if model.get("backend") == "transformers" and section("train").get("activation_offload") == "cpu":
        problems.append((("train", "activation_offload"), "cpu is Unsloth's offload; the transformers backend keeps "
                         "checkpointed activations on the GPU: use auto or none, or model.backend: unsloth"))
    problems += _method_checks(section("train"), section("grpo"), section("dpo"), section("distributed"))
    return problems


def _method_checks(train: dict, grpo: dict, dpo: dict, distributed: dict) -> list[tuple[tuple, str]]:
    """What GRPO and DPO need beyond their sections' own types."""
    problems, method = [], train.get("method", "sft")
    if method == "grpo":
        rewards = grpo.get("rewards", {})
        if isinstance(rewards, dict) and rewards and all(isinstance(w, (int, float)) and w == 0 for w in rewards.values()):
            problems.append((("grpo", "rewards"), "every reward weight is 0: nothing to learn from; give at least one "
                             "a weight above 0"))
        generations, batch, steps = grpo.get("num_generations", 8), train.get("batch_size", 2), \
            train.get("gradient_accumulation_steps", 1)
        processes = distributed.get("processes_per_node", 1) if distributed.get("strategy", "none") != "none" else 1
        processes = (processes if isinstance(processes, int) else 1) * (distributed.get("nodes", 1) or 1)
        if all(isinstance(v, int) and v > 0 for v in (generations, batch, steps)) and \
                (batch * steps * processes) % generations:
            problems.append((("grpo", "num_generations"), f"{generations} does not divide the {batch * steps * processes} "
                             f"answers generated per step (train.batch_size {batch} x gradient_accumulation_steps "
                             f"{steps} x {processes} process(es)); every image needs all its answers in the same step"))
    if method == "dpo" and dpo.get("pairs", None) is None:
        problems.append((("dpo", "pairs"), "train.method is dpo but there are no pairs: set dpo.pairs to a parquet of "
                         "image, chosen, rejected, e.g. one made by `recipe pairs RUN_DIR`"))
    return problems


def validate(recipe: Any, positions: dict, filename: str, origins: dict | None = None) -> tuple[dict, list[Problem]]:
    """Validates a parsed recipe; returns it with defaults filled in and all problems found."""
    schema = load_schema()
    origins = origins or {}

    def where(path: tuple) -> str:
        for length in range(len(path), -1, -1):
            if path[:length] in origins:
                return origins[path[:length]]
            if path[:length] in positions:
                line, col = positions[path[:length]]
                return f"{filename}:{line}:{col}"
        return filename

    found: list[tuple[tuple, str]] = list(_non_finite(recipe))
    for error in Draft202012Validator(schema).iter_errors(recipe):
        found.extend(_messages(error, schema))
    found.extend(_cross_checks(recipe))
    recipe = _fill_defaults(schema, copy.deepcopy(recipe))
    for target in recipe.get("export", []) if isinstance(recipe.get("export"), list) else []:
        if isinstance(target, dict) and target.get("format") != "gguf":
            target.pop("quantizations", None)  # the default applies to gguf targets only
    problems = [Problem(where(p), ".".join(str(k) for k in p), m) for p, m in found]
    problems.sort(key=lambda p: _sort_key(p.where))
    return recipe, problems


def _sort_key(where: str):
    parts = where.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return (0, int(parts[1]), int(parts[2]), "")
    return (1, 0, 0, where)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Reads, overrides, validates and resolves a recipe file; raises RecipeError listing every problem."""
    path = Path(path)
    filename = str(path)
    data, positions = parse_yaml(read_text(path), filename)
    if data == {} and len(positions) == 1:
        raise RecipeError([Problem(filename, "", "the recipe is empty; start from a file in recipes/ "
                                                 "(or `recipe new NAME`)")])
    if not isinstance(data, dict):
        raise RecipeError([Problem(f"{filename}:1:1", "", f"a recipe is a mapping of sections, got {_type_name(data)}")])
    data, problems, origins = apply_overrides(data, overrides or [])
    recipe, schema_problems = validate(data, positions, filename, origins)
    problems += schema_problems
    if problems:
        raise RecipeError(problems)
    return recipe


def dump(recipe: dict) -> str:
    """The resolved recipe as YAML, in schema order."""
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, width=120)


def new_recipe_text(source_text: str, name: str, source: str, dataset: str | None) -> str:
    """A copy of a recipe for `recipe new`: a header of its own, the new name and, if given, the new dataset."""
    lines = source_text.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):]
    text = re.sub(r"(?m)^name: .*$", f"name: {name}", "\n".join(body) + "\n", count=1)
    if dataset is not None:  # the dataset section's id line, with the source dataset's comment dropped
        text = re.sub(r"(?ms)^(dataset:\s*\n(?:[ \t]+.*\n)*?[ \t]+id:)[^\n]*", rf"\g<1> {dataset}", text, count=1)
    trains_on = dataset if dataset is not None else "the dataset in its `dataset` section"
    header = [
        f"# {name}: Qwen2.5-VL fine-tuned into a LaTeX OCR model on {trains_on}.",
        f"# Made by `recipe new` from {source};",
        "# check the dataset section (columns, splits) before running.",
        "#",
        f"#   just run recipes/{name}.yaml",
        f"#   just run recipes/{name}.yaml --set train.max_steps=null --set train.epochs=1   # a full epoch",
    ]
    return "\n".join(header) + "\n" + text
