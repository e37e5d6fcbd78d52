"""Training throughput of the Qwen2.5-VL-7B architecture through the real recipe path, one setting per process.

Each setting is `recipe run RECIPE --set ...` in a fresh Python process (Unsloth patches transformers when
imported, so settings must not share a process), on real formula images, with the model directory built by
bench/qwen25vl_7b.py. Figures come from the run's own metrics.json (`train.speed`, measured by
runner.train.SpeedMeter): steady-state samples/s after two warm-up steps, real (unpadded) tokens/s, peak GPU
memory, time to first step.

    python -m bench.train_speed --model-dir /tmp/qwen7b --data bench_data/validation_2048.parquet \
        --settings notebook_transformers_bf16,notebook_transformers_4bit,notebook_unsloth_4bit,fast \
        --out docs/benchmarks/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FLAGSHIP = "recipes/qwen25vl_latex_a100.yaml"
FAST = "recipes/qwen25vl_latex_fast.yaml"
# name -> (recipe, overrides, steps). The notebook settings keep the flagship's batch 2 x accumulation 4.
SETTINGS: dict[str, tuple[str, list[str], int]] = {
    "notebook_transformers_bf16": (FLAGSHIP, ["model.backend=transformers", "model.quantization=none"], 12),
    "notebook_transformers_4bit": (FLAGSHIP, ["model.backend=transformers", "model.quantization=4bit"], 12),
    "notebook_unsloth_4bit": (FLAGSHIP, ["model.backend=unsloth", "model.quantization=4bit"], 12),
    "fast": (FAST, [], 12),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Training throughput per setting, through `recipe run`.")
    parser.add_argument("--model-dir", type=Path, required=True, help="built here first if it has no config.json")
    parser.add_argument("--data", type=Path, required=True, help="parquet in the unsloth/LaTeX_OCR schema")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=RECIPE;KEY=VALUE;...",
                        help="an ad-hoc setting (repeatable), e.g. 'bs64=recipes/qwen25vl_latex_fast.yaml;train.batch_size=64'")
    parser.add_argument("--steps", type=int, default=None, help="override every setting's step count")
    parser.add_argument("--repeat", type=int, default=1, help="train on the rows N times over (a copy written into "
                        "--runs-dir): the trainer's length grouping sorts rows in groups of up to 50 batches only when "
                        "the data holds 200 batches or more, so a small subset groups unlike an epoch of the real "
                        "training split (under --gpus 2 at batch 128: 51,200 rows; the 4,800-row subset x 11)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the raw figures")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench_runs"))
    parser.add_argument("--eval-rows", type=int, default=0, help="also time the recipe's own eval step on this many "
                        "training rows (its backend, quantization and batch size, the trained LoRA attached)")
    parser.add_argument("--eval-new-tokens", type=int, default=64, help="eval.max_new_tokens for --eval-rows "
                        "(random weights never stop early, so every row generates this many)")
    parser.add_argument("--recipe-eval", action="store_true", help="also time `recipe eval` on each finished run")
    parser.add_argument("--recipe-eval-rows", type=int, default=None, help="rows for `recipe eval` (default: --eval-rows)")
    parser.add_argument("--recipe-eval-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for `recipe eval` alone (repeatable), e.g. model.backend=transformers")
    args = parser.parse_args(argv)
    settings = {}
    for name in filter(None, args.settings.split(",")):
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        settings[name] = SETTINGS[name]
    for extra in args.extra:
        name, _, spec = extra.partition("=")
        recipe, *overrides = spec.split(";")
        if not name or not recipe:
            parser.error(f"--extra {extra!r}: expected NAME=RECIPE;KEY=VALUE;...")
        settings[name] = (recipe, overrides, 12)
    args.settings = settings
    return args


def repeated(data: Path, times: int, directory: Path) -> Path:
    """`data`'s rows `times` over, as a parquet beside the runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(data)
    out = directory / f"{data.stem}_x{times}.parquet"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables([table] * times), out)
    return out


def command(name: str, recipe: str, overrides: list[str], steps: int, args) -> list[str]:
    common = [f"model.id={args.model_dir}", f"dataset.id={args.data}", "dataset.eval_split=null",
              "dataset.shuffle=false", "export=[]", f"output_dir={args.runs_dir}",
              f"name={name}", f"train.max_steps={steps}", "train.save_steps=null", "install=none"]
    if args.eval_rows:
        common += ["eval.enabled=true", "eval.split=train", f"eval.max_samples={args.eval_rows}",
                   f"eval.max_new_tokens={args.eval_new_tokens}", "eval.compare_base=false"]
    else:
        common += ["eval.enabled=false"]
    cmd = [sys.executable, "-m", "runner", "run", recipe]
    for override in common + overrides:
        cmd += ["--set", override]
    return cmd


def run_setting(name: str, recipe: str, overrides: list[str], steps: int, args) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command(name, recipe, overrides, steps, args), env=os.environ.copy())
    row = {"setting": name, "recipe": recipe, "overrides": overrides, "steps": steps, "exit_code": result.returncode,
           "wall_s": round(time.perf_counter() - started, 1)}
    runs = sorted((args.runs_dir / name).glob("*/metrics.json"))
    if result.returncode == 0 and runs:
        metrics = json.loads(runs[-1].read_text())
        row.update(backend=metrics["backend"], **metrics["train"]["speed"])
        row["train_loss"] = metrics["train"].get("train_loss")
        if "eval" in metrics:
            after = metrics["eval"]["after"]
            row.update(eval_samples_per_s=after["samples_per_s"], eval_rows=after["rows"],
                       eval_new_tokens=args.eval_new_tokens, eval_step_s=metrics["timings_s"].get("eval"),
                       eval_peak_allocated_gib=after.get("peak_allocated_gib"))
        if args.recipe_eval:
            row.update(recipe_eval(runs[-1].parent, recipe, overrides, args))
    return row


def recipe_eval_command(run_dir: Path, recipe: str, overrides: list[str], args) -> tuple[list[str], int]:
    """`recipe eval RUN_DIR --recipe RECIPE` on the first rows: the setting's overrides, then --recipe-eval-set's."""
    rows = args.recipe_eval_rows or args.eval_rows
    sets = [f"model.id={args.model_dir}", f"dataset.id={args.data}", "dataset.eval_split=null", "dataset.shuffle=false",
            "eval.split=train", f"eval.max_samples={rows}", f"eval.max_new_tokens={args.eval_new_tokens}",
            "eval.compare_base=false", "install=none", *overrides, *args.recipe_eval_set]
    cmd = [sys.executable, "-m", "runner", "eval", str(run_dir), "--recipe", recipe, "--out", str(run_dir / "recipe-eval")]
    return cmd + sum((["--set", s] for s in sets), []), rows


def recipe_eval(run_dir: Path, recipe: str, overrides: list[str], args) -> dict:
    """Times `recipe eval` on a finished run: loads the base model, attaches the adapter, evaluates."""
    cmd, rows = recipe_eval_command(run_dir, recipe, overrides, args)
    started = time.perf_counter()
    result = subprocess.run(cmd, env=os.environ.copy())
    figures = {"recipe_eval_exit_code": result.returncode, "recipe_eval_wall_s": round(time.perf_counter() - started, 1),
               "recipe_eval_rows": rows, "recipe_eval_overrides": args.recipe_eval_set}
    metrics_file = run_dir / "recipe-eval" / "metrics.json"
    if result.returncode == 0 and metrics_file.exists():
        after = json.loads(metrics_file.read_text())["after"]
        figures.update(recipe_eval_samples_per_s=after["samples_per_s"], recipe_eval_seconds=after["seconds"],
                       recipe_eval_peak_allocated_gib=after.get("peak_allocated_gib"))
    return figures


def table(rows: list[dict]) -> str:
    lines = ["| setting | backend | samples/step | samples/s | real tokens/s | peak alloc GiB | peak reserved GiB "
             "| first step s | epoch (68,686 rows) | eval samples/s | recipe eval samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "samples_per_s" not in r:
            why = "no steady steps" if r["exit_code"] == 0 else f"failed (exit {r['exit_code']})"
            lines.append(f"| {r['setting']} | {why} | | | | | | | | "
                         f"{r.get('eval_samples_per_s', '')} | {r.get('recipe_eval_samples_per_s', '')} |")
            continue
        epoch_min = 68686 / r["samples_per_s"] / 60
        lines.append(f"| {r['setting']} | {r['backend']} | {r['samples_per_step']} | {r['samples_per_s']:.2f} | "
                     f"{r.get('real_tokens_per_s', 0):.0f} | {r.get('peak_allocated_gib', 0):.1f} | "
                     f"{r.get('peak_reserved_gib', 0):.1f} | {r['time_to_first_step_s']:.1f} | {epoch_min:.0f} min | "
                     f"{r.get('eval_samples_per_s', '')} | {r.get('recipe_eval_samples_per_s', '')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from bench.common import device_name, versions

    args = parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        from bench import qwen25vl_7b

        qwen25vl_7b.build(args.model_dir)
    if args.repeat > 1:
        args.data = repeated(args.data, args.repeat, args.runs_dir)
    rows = []
    for name, (recipe, overrides, steps) in args.settings.items():
        rows.append(run_setting(name, recipe, overrides, args.steps or steps, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # written after every setting, so a cut-off run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"benchmark": "train_speed", "date": time.strftime("%Y-%m-%d"),
                                            "device": device_name(), "versions": versions(), "data": str(args.data),
                                            "results": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
