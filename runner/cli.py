"""The `recipe` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .recipe import Problem, RecipeError, load_recipe

# bitsandbytes (peft imports it) looks for an optional CPU kernel package on AVX512-BF16 CPUs and warns at every start
# when it is absent; its own CPU code path works without it, and 4-bit training needs a GPU anyway
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

SET_OPTION = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe value (YAML syntax), e.g. --set train.max_steps=5. Repeatable.")


def _fail(problems: list[Problem]) -> None:
    for problem in problems:
        click.echo(str(problem), err=True)
    click.echo(f"{len(problems)} problem{'s' * (len(problems) != 1)} found", err=True)
    sys.exit(1)


@click.group()
def main() -> None:
    """Fine-tune Qwen2.5-VL into a LaTeX OCR model from one YAML recipe."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@SET_OPTION
@click.option("--here", is_flag=True, help="Also check that this machine can run them (GPU, Unsloth, llama-cpp-python), "
              "as `recipe run` does before its first step.")
def validate(files: tuple[str, ...], overrides: tuple[str, ...], here: bool) -> None:
    """Check recipes without running them; report every problem of every file. A directory means every .yaml
    recipe under it."""
    from .run import preflight

    problems, expanded = [], []
    for file in files:
        if Path(file).is_dir():
            found = sorted(str(p) for p in Path(file).rglob("*.yaml"))
            expanded += found or [file]  # an empty directory is reported by load_recipe
        else:
            expanded.append(file)
    for file in expanded:
        try:
            recipe = load_recipe(file, list(overrides))
        except RecipeError as error:
            problems += error.problems
            continue
        found = [Problem(file, path, message) for path, message in preflight(recipe)] if here else []
        problems += found
        if not found:
            click.echo(f"{file}: ok")
    if problems:
        _fail(problems)


@main.command()
@click.argument("file", type=click.Path())
@SET_OPTION
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN_DIR]",
              help="Continue an unfinished run from its newest checkpoint: the newest unfinished run of FILE's recipe, "
                   "or the run directory given.")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="Train in this many processes, one per GPU, "
              "through torchrun (sets distributed.processes_per_node, and distributed.strategy=ddp unless the recipe "
              "asks for fsdp or deepspeed).")
def run(file: str, overrides: tuple[str, ...], resume: str | None, gpus: int | None) -> None:
    """Validate FILE, print the resolved plan, and run every step."""
    from . import distributed, launch
    from .errors import RunError, RunInterrupted
    from .run import make_run_dir, preflight
    from .run import run as run_recipe

    overrides = list(overrides) + ([f"distributed.processes_per_node={gpus}"] if gpus else [])
    try:
        recipe = load_recipe(file, overrides)
    except RecipeError as error:
        _fail(error.problems)
    if gpus and recipe["distributed"]["strategy"] == "none":
        overrides.append("distributed.strategy=ddp")
        recipe["distributed"]["strategy"] = "ddp"
    resume_dir = None
    if resume is not None:
        from .checkpoints import run_to_resume

        try:
            resume_dir = run_to_resume(recipe, resume)
            recipe = load_recipe(resume_dir / "recipe.resolved.yaml", overrides)  # as it ran, plus any --set
        except ValueError as error:
            raise click.ClickException(f"{file}: {error}" if resume == "latest" else str(error))
        except RecipeError as error:
            _fail(error.problems)
    problems = [Problem(file, path, message) for path, message in preflight(recipe)]
    if problems:
        _fail(problems)
    recipe["distributed"] = distributed.resolve(recipe["distributed"])  # numbers, as recorded in the run directory
    if distributed.planned_world_size(recipe["distributed"]) > 1 and not distributed.launched():
        run_dir = resume_dir or (make_run_dir(recipe) if recipe["distributed"]["node_rank"] == 0 else None)
        extra = ["--resume", str(run_dir)] if resume_dir else []
        click.echo(f"launching {recipe['distributed']['processes_per_node']} processes x "
                   f"{recipe['distributed']['nodes']} node(s) through torchrun; rank 0 writes {run_dir}")
        code, stopped = launch.launch(file, overrides, recipe["distributed"], run_dir, extra)
        if stopped:
            click.echo(f"{file}: {stopped}; continue with `just run {file} --resume`", err=True)
        sys.exit(130 if stopped else code)
    distributed.bind_gpu()
    try:
        run_dir = run_recipe(recipe, resume_dir)
    except RunInterrupted as stopped:
        if launch.report_stop(stopped):
            sys.exit(0)
        click.echo(f"{file}: {stopped}; continue with `just run {file} --resume`", err=True)
        sys.exit(130)
    except RunError as error:
        click.echo(f"{file}: {error}", err=True)
        sys.exit(1)
    if distributed.is_main():
        click.echo(f"done: {run_dir}")


@main.command()
@click.option("--output-dir", default="runs", show_default=True, type=click.Path(path_type=Path),
              help="Where the recipes' run directories are (their `output_dir`).")
def runs(output_dir: Path) -> None:
    """List runs with how they ended (running, done, failed, interrupted, killed), step and key metrics."""
    from .status import format_table, summary_rows

    rows = summary_rows(output_dir)
    click.echo(format_table(rows) if rows else f"no runs under {output_dir}/")


@main.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--recipe", "recipe_file", required=True, type=click.Path(), help="Recipe whose model, dataset "
              "and eval sections to use.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory "
              "(default: TARGET/eval-<timestamp>).")
@SET_OPTION
def eval_command(target: Path, recipe_file: str, out: Path | None, overrides: tuple[str, ...]) -> None:
    """Evaluate TARGET (a run directory, a LoRA export or a merged model) on the recipe's evaluation rows."""
    from .errors import RunError
    from .run import preflight, run_eval

    try:
        recipe = load_recipe(recipe_file, list(overrides))
    except RecipeError as error:
        _fail(error.problems)
    problems = [Problem(recipe_file, p, m) for p, m in preflight(recipe) if not p.startswith("export")]
    if problems:
        _fail(problems)
    try:
        click.echo(f"done: {run_eval(recipe, target, out)}")
    except (RunError, FileNotFoundError, ValueError) as error:
        click.echo(f"{target}: {error}", err=True)
        sys.exit(1)


@main.command("pairs")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--recipe", "recipe_file", default=None, type=click.Path(), help="Recipe whose model and dataset to "
              "use (default: TARGET's recipe.resolved.yaml).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Parquet file to write (default: TARGET/pairs.parquet).")
@SET_OPTION
def pairs_command(target: Path, recipe_file: str | None, out: Path | None, overrides: tuple[str, ...]) -> None:
    """DPO pairs from TARGET's mistakes: its adapter answers the training rows (up to eval.max_samples, eval's batch
    and token limits) and each wrong answer becomes (image, chosen = reference, rejected = the answer)."""
    from .pairs import make_pairs
    from .run import adapter_dir, preflight, setup_logging

    if not (target / "recipe.resolved.yaml").is_file() and adapter_dir(target) is not None:
        target = adapter_dir(target).parent  # a recipe's runs directory: its newest run
    recipe_file = recipe_file or str(target / "recipe.resolved.yaml")
    try:
        recipe = load_recipe(recipe_file, list(overrides))
    except RecipeError as error:
        _fail(error.problems)
    problems = [Problem(recipe_file, p, m) for p, m in preflight(recipe) if p.startswith(("model.id", "model.backend",
                                                                                          "model.quantization"))]
    if problems:
        _fail(problems)
    out = out or target / "pairs.parquet"
    setup_logging()
    try:
        counts = make_pairs(recipe, target, out)
    except (FileNotFoundError, ValueError, OSError) as error:
        click.echo(f"{target}: {error}", err=True)
        sys.exit(1)
    click.echo(f"done: {out} ({counts['pairs']} pairs from {counts['rows']} training rows; {counts['right']} answered "
               f"right and left out); train on them with train.method=dpo and dpo.pairs={out}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "formats", multiple=True, required=True, type=click.Choice(["lora", "merged_16bit", "gguf"]),
              help="Export format; repeatable.")
@click.option("--quantization", "quantizations", multiple=True, type=click.Choice(["f16", "q8_0", "q4_k_m"]),
              help="GGUF quantization; repeatable (default q4_k_m).")
def export_command(run_dir: Path, formats: tuple[str, ...], quantizations: tuple[str, ...]) -> None:
    """Export a finished run (its adapter and resolved recipe) without retraining.

    RUN_DIR is a run directory, or a recipe file, whose latest run is exported."""
    import yaml

    from .export import export
    from .run import adapter_dir, setup_logging

    if run_dir.is_file():
        recipe = load_recipe(run_dir)
        adapter = adapter_dir(Path(recipe["output_dir"]) / recipe["name"])  # its newest run with an adapter
        if adapter is None:
            raise click.ClickException(f"{run_dir}: no finished run under {recipe['output_dir']}/{recipe['name']}/")
        run_dir = adapter.parent

    resolved = run_dir / "recipe.resolved.yaml"
    if not (run_dir / "adapter" / "adapter_config.json").exists() or not resolved.exists():
        raise click.ClickException(f"{run_dir}: not a finished run directory (no adapter/ or recipe.resolved.yaml)")
    recipe = yaml.safe_load(resolved.read_text())
    targets = [{"format": f, **({"quantizations": list(quantizations or ["q4_k_m"])} if f == "gguf" else {})}
               for f in formats]
    setup_logging()
    written = export(targets, run_dir / "adapter", Path("exports") / recipe["name"], recipe["model"]["id"],
                     recipe["dataset"]["id"], recipe["model"]["dtype"], recipe["dataset"]["instruction"])
    for fmt, path in written.items():
        click.echo(f"{fmt}: {path}")


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path),
              help="A LoRA export, a merged model directory, or a GGUF file / directory with its mmproj.")
@click.option("--instruction", default=None, help="Defaults to the schema's (the recipes') instruction.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
def predict_command(images: tuple[Path, ...], model: Path, instruction: str | None, batch_size: int,
                    max_new_tokens: int) -> None:
    """Print the LaTeX for each IMAGE (one line each: path, tab, LaTeX)."""
    from .predict import predict
    from .recipe import load_schema

    instruction = instruction or load_schema()["properties"]["dataset"]["properties"]["instruction"]["default"]
    for path, latex in zip(images, predict(list(images), model, instruction, batch_size, max_new_tokens)):
        click.echo(f"{path}\t{latex}")


@main.command()
@click.argument("names", nargs=-1, required=True, type=click.Choice(["cpu", "gpu", "colab-a100", "gguf", "deepspeed"]))
@click.option("--dry-run", is_flag=True, help="Print the pip commands without running them.")
def install(names: tuple[str, ...], dry_run: bool) -> None:
    """Install named install sets into this Python environment: a set (cpu, gpu, colab-a100) and add-ons (gguf, deepspeed)."""
    from . import install_sets

    for name in names:
        about = {**install_sets.SETS, **install_sets.ADDONS}[name]["about"]
        click.echo(f"install set {name}: {about}")
        if dry_run:
            for command in install_sets.commands(name):
                click.echo(" ".join(command))
        else:
            install_sets.install(name)


@main.command()
@click.option("--root", default="assets/tiny", show_default=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild even if the assets exist.")
def tiny(root: Path, force: bool) -> None:
    """Build the embedded default: a tiny random-weight Qwen2.5-VL and rendered formulas (no network)."""
    from .tiny import build_assets

    if (root / "model" / "config.json").exists() and (root / "data" / "test.parquet").exists() and not force:
        click.echo(f"{root}: already built (--force rebuilds)")
        return
    paths = build_assets(root)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@main.command()
@click.argument("name")
@click.option("--from", "source", default="recipes/qwen25vl_latex_a100.yaml", show_default=True,
              type=click.Path(exists=True, path_type=Path), help="Recipe to copy.")
@click.option("--dataset", default=None, help="Dataset id or local path for the new recipe.")
def new(name: str, source: Path, dataset: str | None) -> None:
    """Copy a recipe as recipes/NAME.yaml, with its own header, name (and dataset)."""
    from .recipe import new_recipe_text

    target = Path("recipes") / f"{name}.yaml"
    if target.exists():
        raise click.ClickException(f"{target} exists already")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(new_recipe_text(source.read_text(), name, str(source), dataset))
    try:
        load_recipe(target)
    except RecipeError as error:
        target.unlink()
        _fail(error.problems)
    click.echo(f"{target}: written; edit it, then `just run {target}`")


@main.command()
@click.option("--readme", default="README.md", show_default=True, type=click.Path(exists=True, path_type=Path))
@click.option("--check", is_flag=True, help="Fail if the README's reference is out of date instead of rewriting it.")
def reference(readme: Path, check: bool) -> None:
    """Regenerate the README's recipe reference from the schema."""
    from .reference import update_readme

    original = readme.read_text()
    changed = update_readme(readme)
    if check and changed:
        readme.write_text(original)
        raise click.ClickException(f"{readme}: the recipe reference is out of date; run `recipe reference`")
    click.echo(f"{readme}: {'updated' if changed else 'up to date'}")


if __name__ == "__main__":
    main()
