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


@pytest.fixture(scope="session")
def memorized(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """recipes/memorize_tiny.yaml run once per session, with every export format: the model that read 16 formulas.

    Returns the run directory and the export directories (lora, merged_16bit, gguf)."""
    import os

    from click.testing import CliRunner

    from runner.cli import main

    work = tmp_path_factory.mktemp("memorized")
    export = "export=[{format: lora}, {format: merged_16bit}, {format: gguf, quantizations: [f16, q4_k_m]}]"
    args = ["run", str(REPO / "recipes" / "memorize_tiny.yaml")]
    for override in [*smoke_overrides(tiny_assets, work / "runs"), export]:
        args += ["--set", override]
    previous = os.getcwd()
    os.chdir(work)  # exports/ is relative to the working directory
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    (run_dir,) = list((work / "runs").glob("*/*"))
    exports = work / "exports" / "memorize-tiny"
    return {"run": run_dir, "work": work, **{f: exports / f for f in ("lora", "merged_16bit", "gguf")}}


def run_cli(args: list[str], cwd: Path | None = None):
    """`recipe ARGS` in this process (so a test can patch what it runs); returns click's result."""
    import os

    from click.testing import CliRunner

    from runner.cli import main

    previous = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(previous)


def refused_output(recipe: str, overrides: list[str], tmp_path: Path) -> str:
    """`recipe run RECIPE --set ...`, which must fail before anything runs (no run directory); returns its output."""
    args = ["run", recipe, "--set", f"output_dir={tmp_path / 'runs'}"]
    for override in overrides:
        args += ["--set", override]
    result = run_cli(args)
    assert result.exit_code == 1 and not (tmp_path / "runs").exists(), result.output
    return result.output


@pytest.fixture(scope="session")
def half_trained(tiny_assets, tmp_path_factory) -> Path:
    """memorize_tiny stopped at 110 of 200 steps: 7 of its 16 formulas right, the start of the GRPO and DPO tests.
    Returns the run directory."""
    work = tmp_path_factory.mktemp("half_trained")
    args = ["run", str(REPO / "recipes" / "memorize_tiny.yaml"), "--set", "train.max_steps=110"]
    for override in smoke_overrides(tiny_assets, work / "runs"):
        args += ["--set", override]
    result = run_cli(args, cwd=work)
    assert result.exit_code == 0, result.output
    (run_dir,) = list((work / "runs").glob("*/*"))
    return run_dir
