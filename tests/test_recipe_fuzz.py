"""Hundreds of seeded mutations of the shipped recipes: each ends in the project's clear error, never a traceback."""

from __future__ import annotations

import random
import re
from pathlib import Path

from click.testing import CliRunner

from runner.cli import main
from runner.recipe import RecipeError, load_recipe
from runner.run import preflight

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
MUTATIONS_PER_RECIPE = 100
WRONG_VALUES = ["two", "[1, 2]", "{a: 1}", "-1", "0", "-3.5", "1e400", "99999999999999999999999", ".nan", ".inf",
                "-.inf", "true", "null", "''", "!!python/object/apply:os.system ['echo pwned']", "!!binary aGk=",
                "&anchor 3", "*undefined_alias", "\"unterminated", "[unclosed", "0x1F", "~"]


def _value_lines(lines):
    return [i for i, line in enumerate(lines) if re.match(r"^\s+[a-z_]+:\s*\S", line) and not line.strip().startswith("#")]


def mutate(text: str, rng: random.Random) -> tuple[str, bytes]:
    """One named mutation of a recipe's text; returns (name, bytes to write)."""
    lines = text.splitlines()
    kind = rng.choice(["wrong_value", "misspelt_key", "unknown_key", "missing_section", "tab", "duplicate_key",
                       "truncate", "non_utf8", "empty", "tag_document", "drop_char", "unknown_section", "list_root"])
    if kind == "wrong_value":
        i = rng.choice(_value_lines(lines))
        key = lines[i].split(":")[0]
        lines[i] = f"{key}: {rng.choice(WRONG_VALUES)}"
    elif kind == "misspelt_key":
        i = rng.choice(_value_lines(lines))
        key, rest = lines[i].split(":", 1)
        name = key.strip()
        position = rng.randrange(len(name))
        name = name[:position] + name[position + 1:] if rng.random() < 0.5 else name[:position] + "x" + name[position:]
        lines[i] = key[: len(key) - len(key.lstrip())] + name + ":" + rest
    elif kind == "unknown_key":
        i = rng.choice(_value_lines(lines))
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines.insert(i + 1, f"{indent}surely_not_a_key_{rng.randrange(100)}: 1")
    elif kind == "missing_section":
        starts = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:\s*$", line)]
        if starts:
            start = rng.choice(starts)
            end = next((j for j in range(start + 1, len(lines)) if re.match(r"^\S", lines[j])), len(lines))
            del lines[start:end]
    elif kind == "tab":
        i = rng.choice(_value_lines(lines))
        lines[i] = "\t" + lines[i].lstrip()
    elif kind == "duplicate_key":
        i = rng.choice(_value_lines(lines))
        lines.insert(i + 1, lines[i])
    elif kind == "truncate":
        encoded = text.encode()
        return kind, encoded[: rng.randrange(1, len(encoded))]
    elif kind == "non_utf8":
        encoded = bytearray(text.encode())
        encoded[rng.randrange(len(encoded))] = rng.choice([0xFF, 0xC3, 0x80, 0xFE])
        return kind, bytes(encoded)
    elif kind == "empty":
        return kind, rng.choice([b"", b"\n", b"# only a comment\n", b"---\n", b"...\n"])
    elif kind == "tag_document":
        return kind, b"!!python/object/apply:os.system ['echo pwned']\n"
    elif kind == "drop_char":
        punctuation = [i for i, c in enumerate(text) if c in ":-[]{}'\""]
        position = rng.choice(punctuation)
        return kind, (text[:position] + text[position + 1:]).encode()
    elif kind == "unknown_section":
        lines.append(f"{rng.choice(['trainer', 'evaluation', 'optim', 'lora_config'])}:\n  x: 1")
    elif kind == "list_root":
        return kind, b"- name: x\n- model: {}\n"
    return kind, ("\n".join(lines) + "\n").encode()


PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+)(:(?P<line>\d+):(?P<col>\d+))?: (?P<path>\S+): \S")


def test_mutated_recipes_end_in_clear_errors(tmp_path):
    rng = random.Random(20261129)
    tried, rejected, kinds = 0, 0, {}
    for recipe in RECIPES:
        text = recipe.read_text()
        for index in range(MUTATIONS_PER_RECIPE):
            kind, data = mutate(text, rng)
            path = tmp_path / f"{recipe.stem}-{index}.yaml"
            path.write_bytes(data)
            result = CliRunner().invoke(main, ["validate", str(path)])
            tried += 1
            kinds[kind] = kinds.get(kind, 0) + 1
            context = f"{kind} of {recipe.name}:\n{data[:2000]!r}\n{result.output}"
            assert result.exception is None or isinstance(result.exception, SystemExit), context
            assert "Traceback" not in result.output and result.exit_code in (0, 1), context
            if result.exit_code == 0:
                assert result.output.strip() == f"{path}: ok", context
                preflight(load_recipe(path))  # what validate accepted, run's loading and machine checks take
                continue
            rejected += 1
            problems = result.output.strip().splitlines()
            assert re.match(r"^\d+ problems? found$", problems[-1]), context
            for line in problems[:-1]:
                match = PROBLEM_LINE.match(line)
                assert match and match["file"] == str(path), context
                if kind in ("wrong_value", "misspelt_key", "unknown_key", "tab", "duplicate_key", "non_utf8"):
                    assert match["line"], context  # the mutation has a place in the file, and the error names it
            try:
                load_recipe(path)
            except RecipeError as error:
                assert error.problems, context
            else:
                raise AssertionError(f"validate rejected what load_recipe accepts: {context}")
    print(f"recipe fuzz: {tried} mutations of {len(RECIPES)} recipes, {rejected} rejected with clear errors, "
          f"{tried - rejected} still valid; by kind: {dict(sorted(kinds.items()))}")
    assert tried == MUTATIONS_PER_RECIPE * len(RECIPES) and rejected > tried // 2


def test_paths_that_are_not_recipe_files_say_what_they_are(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "empty"): "is a directory; give recipe files, e.g. recipes/*.yaml",
        "/dev/null": "not a regular file (a device, pipe or socket); give a .yaml file",
        str(tmp_path / "missing.yaml"): "no such recipe file",
        str(tmp_path / "latin1.yaml"): "not valid UTF-8 (byte 0xe9); save the recipe as UTF-8",
    }
    for path, message in cases.items():
        result = CliRunner().invoke(main, ["validate", path])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert f"{tmp_path / 'latin1.yaml'}:1:10: <recipe>: not valid UTF-8" in CliRunner().invoke(
        main, ["validate", str(tmp_path / "latin1.yaml")]).output
    every = CliRunner().invoke(main, ["validate", str(REPO / "recipes")])  # a directory: each recipe under it
    assert every.exit_code == 0 and every.output.count(": ok") == len(RECIPES), every.output


def test_duplicate_keys_and_tags_are_errors_with_positions(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\ntrain:\n  batch_size: 2\n  batch_size: 4\n")
    output = CliRunner().invoke(main, ["validate", str(path)]).output
    assert f"{path}:4:3: train.batch_size: duplicate key (first at line 3); keep one" in output
    path.write_text("name: a\ntrain:\n  learning_rate: !!python/object/apply:os.system ['true']\n")
    output = CliRunner().invoke(main, ["validate", str(path)]).output
    assert f"{path}:3:18: <recipe>: YAML tag not allowed" in output and "plain YAML values only" in output
    path.write_text("name: a\ntrain:\n  learning_rate: .nan\n")
    assert f"{path}:3:3: train.learning_rate: must be a finite number, got nan" in \
        CliRunner().invoke(main, ["validate", str(path)]).output
    assert Path(path).exists()
