from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The embedded tiny model and rendered data, built once per test session the way `recipe tiny` builds them."""
    from runner.tiny import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_assets["model"])


def smoke_overrides(tiny_assets: dict[str, Path], output_dir: Path) -> list[str]:
    """`--set` overrides that point the smoke recipe at a test's own tiny assets and output directory."""
    return [f"model.id={tiny_assets['model']}", f"dataset.id={tiny_assets['train']}", f"output_dir={output_dir}"]
