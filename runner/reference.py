"""The recipe reference in the README, generated from the schema so the two never disagree."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .recipe import SECTIONS, load_schema

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def _type(prop: dict) -> str:
    kind = prop.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    text = " or ".join(kinds)
    if "enum" in prop:
        text = " \\| ".join(f"`{v}`" for v in prop["enum"])
    elif prop.get("items", {}).get("enum"):
        text = "list of " + " \\| ".join(f"`{v}`" for v in prop["items"]["enum"])
    return text


def _rows(properties: dict, prefix: str) -> list[str]:
    rows = []
    for key, prop in properties.items():
        default = json.dumps(prop.get("default"))
        description = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{key}` | {_type(prop)} | `{default}` | {description} |")
    return rows


def markdown() -> str:
    schema = load_schema()
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    lines = ["### Top level", "", *header]
    lines += _rows({k: v for k, v in schema["properties"].items() if k not in SECTIONS}, "")
    for section in SECTIONS:
        sub = schema["properties"][section]
        lines += ["", f"### `{section}`", "", sub["description"], "", *header]
        properties = sub["items"]["properties"] if sub["type"] == "array" else sub["properties"]
        lines += _rows(properties, f"{section}[]." if sub["type"] == "array" else f"{section}.")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path) -> bool:
    """Rewrites the reference between the markers; returns whether the file changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    updated = pattern.sub(lambda _: f"{START}\n{markdown()}{END}", text)
    readme.write_text(updated)
    return updated != text
