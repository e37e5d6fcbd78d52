"""Reading a recipe file: its bytes as UTF-8, its YAML with the line and column of every key, and the problems a
person must fix reported as `file:line:col: key.path: message` (runner/recipe.py validates what is read here)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Problem:
    where: str  # "file:line:col" or "--set"
    path: str  # dotted key path, "" for the whole recipe
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path or '<recipe>'}: {self.message}"


class RecipeError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads `2e-4` as a number (YAML 1.2), not as the string PyYAML's YAML 1.1 rules make it."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _positions(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, tuple[int, int]]:
    """Maps each key path to (line, col) of its key in the file (1-based); the root maps to (1, 1)."""
    out = {(): (1, 1)} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _positions(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _positions(item, child, out)
    return out


def _duplicate_keys(node: yaml.Node, filename: str, path: tuple = ()) -> list[Problem]:
    """PyYAML keeps the last of two equal keys without a word; a recipe with both is a mistake to report."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                where = f"{filename}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
                problems.append(Problem(where, ".".join(map(str, path + (key,))),
                                        f"duplicate key (first at line {seen[key]}); keep one"))
            seen.setdefault(key, key_node.start_mark.line + 1)
            problems += _duplicate_keys(value_node, filename, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, filename, path + (index,))
    return problems


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[tuple, tuple[int, int]]]:
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
        duplicates = _duplicate_keys(node, filename) if node is not None else []
        if duplicates:
            raise RecipeError(duplicates)
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = f"YAML syntax error: {error.problem or error}"
        if isinstance(error, yaml.constructor.ConstructorError):
            problem = f"YAML tag not allowed: {error.problem}; recipes hold plain YAML values only"
        raise RecipeError([Problem(where, "", problem)]) from None
    except yaml.YAMLError as error:  # errors without a position (e.g. a bad stream)
        raise RecipeError([Problem(filename, "", f"YAML error: {error}")]) from None
    return (data if data is not None else {}), (_positions(node) if node is not None else {(): (1, 1)})


def read_text(path: Path) -> str:
    """The recipe file's text, or a RecipeError that says what is wrong with the path or its bytes."""
    filename = str(path)
    if path.is_dir():
        raise RecipeError([Problem(filename, "", "is a directory; give recipe files, e.g. recipes/*.yaml")])
    if not path.exists():
        raise RecipeError([Problem(filename, "", "no such recipe file")])
    if not path.is_file():
        raise RecipeError([Problem(filename, "", "not a regular file (a device, pipe or socket); give a .yaml file")])
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise RecipeError([Problem(f"{filename}:{line}:{column}", "", f"not valid UTF-8 (byte 0x{data[error.start]:02x}); "
                                   "save the recipe as UTF-8")]) from None
